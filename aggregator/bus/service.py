"""Publish a Victron service: a tree of BusItems served by one message handler.

One handler answers every call on the connection instead of one dbus-next ServiceInterface per path: exports
cost memory and time per path, broadcast ObjectManager signals, and do not see the calls without an interface
header that Victron's client library sends. Leaf calls are one dict lookup; node calls walk only the leaves
below the node.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .lib import Message, MessageBus, MessageFlag, MessageType, NameFlag, RequestNameReply, Variant, raw_sender
from .encode import BUSITEM, ItemsChangedEncoder
from .values import (INVALID_TEXT, NOT_CONVERTIBLE, TextFormat, bounded, converted, oversize, product_id_text,
                     same_value, text_of, unwrap, wrap)

_LOG = logging.getLogger(__name__)

_INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
_UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"

# SetValue return codes of the BusItem contract.
SET_OK = 0
SET_NOT_WRITEABLE = 1  # also: a value with no form of the item's type
SET_REJECTED = 2  # the service's own check said no (also: a value larger than values.oversize allows)
CUT_LOG_INTERVAL = 600.0  # seconds: one log line per path whose value had to be cut

_NO_REPLY_EXPECTED = MessageFlag.NO_REPLY_EXPECTED
_ITEMS_CHANGED = ItemsChangedEncoder(BUSITEM)
_PLAIN = frozenset((float, int, str, bool, type(None)))  # always carriable: their variant is made on demand

OnChange = Callable[[str, Any], bool]

_INTROSPECT_HEAD = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n<node>\n'
    ' <interface name="org.freedesktop.DBus.Introspectable">\n'
    '  <method name="Introspect"><arg direction="out" type="s"/></method>\n </interface>\n'
    f' <interface name="{BUSITEM}">\n'
    '  <method name="GetValue"><arg direction="out" type="v"/></method>\n'
    '  <method name="GetText"><arg direction="out" type="{text_sig}"/></method>\n'
    '{leaf_methods}'
    '{root_methods}'
    ' </interface>\n'
)
_LEAF_METHODS = (
    '  <method name="SetValue"><arg direction="in" type="v"/><arg direction="out" type="i"/></method>\n'
    '  <method name="GetDescription"><arg direction="in" type="s"/><arg direction="in" type="i"/>'
    '<arg direction="out" type="s"/></method>\n'
    '  <signal name="PropertiesChanged"><arg type="a{sv}"/></signal>\n'
)
_ROOT_METHODS = (
    '  <method name="GetItems"><arg direction="out" type="a{sa{sv}}"/></method>\n'
    '  <signal name="ItemsChanged"><arg type="a{sa{sv}}"/></signal>\n'
)


class NameTakenError(RuntimeError):
    """The well-known name is owned by another connection (we never queue for a name)."""


@dataclass(slots=True)
class Item:
    """One published path. `text` is kept in step with `value` (every signal carries it); the variant is made
    only when a reader asks (GetValue, GetItems), since the signals encode values directly."""

    path: str
    value: Any
    text_format: TextFormat | None
    writeable: bool
    on_change: OnChange | None
    description: str
    value_types: tuple[type, ...] | None
    text: str
    digits: int | None = None  # a float is published rounded to this many decimals
    _variant: Variant | None = None

    def assign(self, value: Any) -> None:
        # A value D-Bus cannot carry fails here, at the caller, not later inside a signal.
        self._variant = None if type(value) in _PLAIN else wrap(value)
        self.value = value
        self.text = text_of(value, self.text_format)

    @property
    def wrapped(self) -> Variant:
        variant = self._variant
        if variant is None:
            variant = self._variant = wrap(self.value)
        return variant


class VeService:
    """A Victron service on its own bus connection.

    Create it, add paths, then `await register()`: the name is requested only after the paths exist, so a
    monitor's first GetItems sees them all.
    """

    def __init__(self, bus: MessageBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self._items: dict[str, Item] = {}
        # Every node path ('/', '/Dc', '/Dc/0') -> the leaf paths below it, in insertion order.
        self._nodes: dict[str, dict[str, None]] = {"/": {}}
        self._batch: dict[str, Item] | None = None
        self._batch_context = _Batch(self)
        self._batch_depth = 0
        self._registered = False
        self._methods: dict[tuple[str, str], Callable[[Message], Message]] = {}
        # Seconds to hold back every reply: the simulator's "answers slowly" fault. 0 in real services.
        self.reply_delay = 0.0
        # False: calls are swallowed unanswered, as by a process that is frozen (the simulator's "freeze").
        self.answering = True
        self._send_raw = raw_sender(bus)
        self._cut_logged: dict[str, float] = {}
        bus.add_message_handler(self._handle)

    def add_method(self, interface: str, member: str, handler: Callable[[Message], Message]) -> None:
        """Answer `interface.member` (on any path) with `handler(call) -> reply`: for services that offer
        methods beyond BusItem (localsettings' AddSettings, our own commands). Calls without an interface
        header reach it too, as Victron's clients send them."""
        self._methods[(interface, member)] = handler
        self._methods.setdefault(("", member), handler)

    # ---- building the tree -------------------------------------------------------------------------------

    def add_path(
        self,
        path: str,
        value: Any = None,
        *,
        text: TextFormat | str | None = None,
        writeable: bool = False,
        on_change: OnChange | None = None,
        description: str = "",
        value_types: Iterable[type] | None = None,
        digits: int | None = None,
    ) -> None:
        """Add a leaf. `text` is a formatter or a format string ('{:.2f}V'); `on_change(path, value)` returns
        False to reject a SetValue (code 2); `value_types` restricts what SetValue accepts (a value of another
        type is converted when it can be, else code 1). With `digits`, the floats set here are published rounded
        to that many decimals: a change below the resolution is no change, and sends no signal (a value
        written over the bus is kept as written)."""
        if not path.startswith("/") or path == "/" or path.endswith("/") or "//" in path:
            raise ValueError(f"not a BusItem leaf path: {path!r}")
        if path in self._items:
            raise ValueError(f"path already exists: {path}")
        if path in self._nodes:
            raise ValueError(f"{path} is a node (it has paths below it) and cannot be a leaf")
        parts = path.split("/")
        for depth in range(1, len(parts) - 1):
            if "/".join(parts[: depth + 1]) in self._items:
                raise ValueError(f"{path} would be below the leaf {'/'.join(parts[:depth + 1])}")
        if isinstance(text, str):
            text = text.format
        if text is None and path == "/ProductId":
            text = product_id_text
        types = tuple(value_types) if value_types is not None else None
        item = Item(path, None, text, writeable, on_change, description, types, INVALID_TEXT, digits)
        item.assign(self._publishable(item, value))
        self._items[path] = item
        for node in _nodes_above(path):
            self._nodes.setdefault(node, {})[path] = None
        if self._registered and value is not None:
            self._changed(item)

    def add_mandatory_paths(
        self,
        *,
        process_name: str,
        process_version: str,
        connection: str,
        device_instance: int,
        product_id: int,
        product_name: str,
        firmware_version: Any = None,
        hardware_version: Any = None,
        connected: int = 1,
    ) -> None:
        """The paths every Victron service has; monitors ignore a service without /DeviceInstance."""
        self.add_path("/Mgmt/ProcessName", process_name)
        self.add_path("/Mgmt/ProcessVersion", process_version)
        self.add_path("/Mgmt/Connection", connection)
        self.add_path("/DeviceInstance", device_instance)
        self.add_path("/ProductId", product_id)
        self.add_path("/ProductName", product_name)
        self.add_path("/FirmwareVersion", firmware_version)
        self.add_path("/HardwareVersion", hardware_version)
        self.add_path("/Connected", connected)

    def remove_path(self, path: str) -> None:
        """Remove a leaf. It is published as invalid first, so watchers do not keep a stale value."""
        item = self._items.get(path)
        if item is None:
            raise KeyError(path)
        if self._registered and item.value is not None:
            item.assign(None)
            self._changed(item)  # inside a batch, the invalid goes out with the batch's ItemsChanged
        del self._items[path]
        for node in _nodes_above(path):
            below = self._nodes[node]
            below.pop(path, None)
            if not below and node != "/":
                del self._nodes[node]

    # ---- values ------------------------------------------------------------------------------------------

    def __contains__(self, path: str) -> bool:
        return path in self._items

    def __getitem__(self, path: str) -> Any:
        return self._items[path].value

    def __setitem__(self, path: str, value: Any) -> None:
        self.set_value(path, value)

    def paths(self) -> list[str]:
        return list(self._items)

    def text(self, path: str) -> str:
        return self._items[path].text

    def set_value(self, path: str, value: Any) -> bool:
        """Set one value; emits PropertiesChanged (or joins the open batch). Returns whether it changed."""
        item = self._items[path]
        old = item.value
        if type(value) is type(old) and value == old:  # the common case, decided before rounding and cutting
            return False
        return self._assign(item, old, value)

    def update_values(self, values: Mapping[str, Any]) -> list[str]:
        """set_value() for every path of `values` this service has, in one loop (the aggregate's flush sets dozens
        of paths a few times a second, most of them unchanged); returns the paths it does not have."""
        items = self._items
        missing = []
        for path, value in values.items():
            item = items.get(path)
            if item is None:
                missing.append(path)
                continue
            old = item.value
            if type(value) is not type(old) or value != old:
                self._assign(item, old, value)
        return missing

    def _assign(self, item: Item, old: Any, value: Any) -> bool:
        value = self._publishable(item, value)
        if same_value(old, value):
            return False
        item.assign(value)
        if self._registered:
            self._changed(item)
        return True

    def _publishable(self, item: Item, value: Any) -> Any:
        """The value as it is published: a float at the item's resolution, a text or list cut to the size
        limits (whatever its source: a setting, a member, our own composition)."""
        kind = type(value)
        if kind is float:
            digits = item.digits
            return value if digits is None else round(value, digits) + 0.0  # + 0.0: no "-0.0"
        if kind is str or kind is list or kind is dict or kind is tuple:
            cut = bounded(value)
            if cut is not value:
                now = time.monotonic()
                if now - self._cut_logged.get(item.path, -CUT_LOG_INTERVAL) >= CUT_LOG_INTERVAL:
                    self._cut_logged[item.path] = now
                    _LOG.warning("%s: %s cut to the size limit: %s", self.name, item.path, oversize(value))
            return cut
        return value

    def set_value_if_present(self, path: str, value: Any) -> bool:
        """set_value() when the path exists; False (and nothing done) when it does not."""
        if path not in self._items:
            return False
        self.set_value(path, value)
        return True

    def set_values(self, values: Mapping[str, Any]) -> int:
        """Set many values at once: one ItemsChanged for all that changed. Returns how many changed."""
        with self.batch():
            changed = 0
            for path, value in values.items():
                changed += self.set_value(path, value)
        return changed

    def batch(self) -> _Batch:
        """Group changes: inside `with service.batch():`, set_value() collects; on exit one ItemsChanged
        carries them all. Batches nest; the outermost sends."""
        return self._batch_context

    def _begin_batch(self) -> None:
        if self._batch is None:
            self._batch = {}
        self._batch_depth += 1

    def _end_batch(self) -> None:
        self._batch_depth -= 1
        if self._batch_depth == 0:
            pending, self._batch = self._batch, None
            if pending and self._registered:
                self._emit_items_changed(pending.values())

    def _changed(self, item: Item) -> None:
        if self._batch is not None:
            self._batch[item.path] = item
            return
        self._send(
            Message.new_signal(
                item.path, BUSITEM, "PropertiesChanged", "a{sv}",
                [{"Value": item.wrapped, "Text": Variant("s", item.text)}],
            )
        )

    def _emit_items_changed(self, items: Iterable[Item]) -> None:
        if self._send_raw is not None:  # the hot path: bytes straight from the items
            self._send_raw(lambda serial: _ITEMS_CHANGED.encode(serial, items))
            return
        body = {item.path: {"Value": item.wrapped, "Text": Variant("s", item.text)} for item in items}
        self._send(Message.new_signal("/", BUSITEM, "ItemsChanged", "a{sa{sv}}", [body]))

    def _send(self, message: Message) -> None:
        if self.bus.connected:
            self.bus.send(message)

    # ---- the bus name -----------------------------------------------------------------------------------

    async def register(self) -> None:
        """Request the well-known name without queueing; NameTakenError if another connection has it."""
        reply = await self.bus.request_name(self.name, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise NameTakenError(f"D-Bus name {self.name} is already taken by another process")
        self._registered = True
        _LOG.info("registered %s with %d paths", self.name, len(self._items))

    async def unregister(self) -> None:
        if self._registered and self.bus.connected:
            self._registered = False
            await self.bus.release_name(self.name)

    def close(self) -> None:
        """Stop answering and drop the connection (the bus daemon releases the name)."""
        self._registered = False
        self.bus.remove_message_handler(self._handle)
        self.bus.disconnect()

    # ---- answering calls ---------------------------------------------------------------------------------

    def _handle(self, msg: Message) -> bool | None:
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        if not self.answering:
            return True
        reply = self._answer(msg)
        if reply is None:
            return None
        if msg.flags & _NO_REPLY_EXPECTED:
            return True  # handled, and the caller asked for no reply
        if self.reply_delay > 0:
            asyncio.get_running_loop().call_later(self.reply_delay, self._send, reply)
        else:
            # Sent here, not returned: dbus-next sends a returned reply only when it is exactly its own Message
            # class, and ours is the lean-codec subclass.
            self._send(reply)
        return True

    def _answer(self, msg: Message) -> Message | None:
        interface = msg.interface
        if self._methods:
            extra = self._methods.get((interface or "", msg.member))
            if extra is not None:
                try:
                    reply = extra(msg)
                except Exception:
                    _LOG.exception("%s: %s failed", self.name, msg.member)
                    return Message.new_error(msg, "org.freedesktop.DBus.Error.Failed", f"{msg.member} failed")
                if reply is not None:
                    return reply  # None: the handler declined (a node, say), the BusItem rules answer
        if interface is not None and interface != BUSITEM:
            if interface == _INTROSPECTABLE and msg.member == "Introspect":
                return self._introspect(msg)
            return None  # Peer, Properties...: dbus-next's defaults answer those
        member = msg.member
        path = msg.path
        item = self._items.get(path)
        try:
            if member == "GetValue":
                if item is not None:
                    return Message.new_method_return(msg, "v", [item.wrapped])
                below = self._below(path)
                if below is None:
                    return _no_object(msg)
                return Message.new_method_return(msg, "v", [Variant("a{sv}", {k: i.wrapped for k, i in below})])
            if member == "GetText":
                if item is not None:
                    return Message.new_method_return(msg, "s", [item.text])
                below = self._below(path)
                if below is None:
                    return _no_object(msg)
                return Message.new_method_return(msg, "v", [Variant("a{ss}", {k: i.text for k, i in below})])
            if member == "SetValue":
                if item is None:
                    return _no_object(msg)
                if msg.signature != "v":
                    return Message.new_error(msg, _INVALID_ARGS, "SetValue takes one variant")
                return Message.new_method_return(msg, "i", [self._set_from_bus(item, msg.body[0])])
            if member == "GetItems":
                if path != "/":
                    return _no_method(msg)
                body = {p: {"Value": i.wrapped, "Text": Variant("s", i.text)} for p, i in self._items.items()}
                return Message.new_method_return(msg, "a{sa{sv}}", [body])
            if member == "GetDescription":
                if item is None:
                    return _no_object(msg)
                return Message.new_method_return(msg, "s", [item.description or "No description given"])
        except Exception:  # a bug here must not take the service down: answer with an error instead
            _LOG.exception("%s: %s on %s failed", self.name, member, path)
            return Message.new_error(msg, "org.freedesktop.DBus.Error.Failed", f"{member} failed on {path}")
        if interface is None:
            return None
        return _no_method(msg)

    def _below(self, path: str) -> list[tuple[str, Item]] | None:
        """(relative key, item) of every leaf below a node, or None when the path is not a node."""
        leaves = self._nodes.get(path)
        if leaves is None:
            return None
        cut = 1 if path == "/" else len(path) + 1
        items = self._items
        return [(p[cut:], items[p]) for p in leaves]

    def _set_from_bus(self, item: Item, variant: Any) -> int:
        if not item.writeable:
            return SET_NOT_WRITEABLE
        try:
            value = unwrap(variant)
        except Exception:  # malformed variant content
            return SET_NOT_WRITEABLE
        too_large = oversize(value)
        if too_large is not None:
            _LOG.warning("%s: refused a write of %s: %s", self.name, item.path, too_large)
            return SET_REJECTED
        if item.value_types is not None:
            value = converted(value, item.value_types)
            if value is NOT_CONVERTIBLE:
                return SET_NOT_WRITEABLE
        if same_value(item.value, value):
            return SET_OK
        if item.on_change is not None:
            try:
                accepted = item.on_change(item.path, value)
            except Exception:
                _LOG.exception("%s: the change check of %s failed for %r", self.name, item.path, value)
                return SET_REJECTED
            if not accepted:
                return SET_REJECTED
        item.assign(value)
        self._changed(item)
        return SET_OK

    def _introspect(self, msg: Message) -> Message | None:
        path = msg.path
        is_leaf = path in self._items
        if not is_leaf and path not in self._nodes:
            return None
        xml = _INTROSPECT_HEAD.format(
            text_sig="s" if is_leaf else "v",
            leaf_methods=_LEAF_METHODS if is_leaf else "",
            root_methods=_ROOT_METHODS if path == "/" else "",
        )
        if not is_leaf:
            prefix = "/" if path == "/" else path + "/"
            children = dict.fromkeys(p[len(prefix):].split("/", 1)[0] for p in self._nodes[path])
            xml += "".join(f' <node name="{c}"/>\n' for c in children)
        return Message.new_method_return(msg, "s", [xml + "</node>\n"])


class _Batch:
    """The context of VeService.batch(): one object per service, reused (a generator-based context manager
    costs several calls and an allocation per use, and every flush opens one)."""

    __slots__ = ("_service",)

    def __init__(self, service: VeService) -> None:
        self._service = service

    def __enter__(self) -> VeService:
        self._service._begin_batch()
        return self._service

    def __exit__(self, *_exc: object) -> None:
        self._service._end_batch()


def _nodes_above(path: str) -> list[str]:
    """'/Dc/0/Voltage' -> ['/', '/Dc', '/Dc/0']."""
    parts = path.split("/")
    return ["/"] + ["/".join(parts[: i + 1]) for i in range(1, len(parts) - 1)]


def _no_object(msg: Message) -> Message:
    return Message.new_error(msg, _UNKNOWN_OBJECT, f"no such path: {msg.path}")


def _no_method(msg: Message) -> Message:
    return Message.new_error(msg, _UNKNOWN_METHOD, f"{msg.member} is not available on {msg.path}")
