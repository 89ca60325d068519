"""Watch other Victron services: discover them, keep a value cache per service, report changes.

Discovery uses ListNames and NameOwnerChanged (matched by name namespace, so unrelated services do not wake
us). Each service is read with one GetItems (older services: Introspect and a GetValue per path) and then
followed through its ItemsChanged and PropertiesChanged signals, matched by that service's connection only.

The GetItems reply is applied inside the message handler, which sees messages in the order they arrived:
a signal sent after the reply can then never be applied before it nor lost, and one sent before it is
already contained in it.

Victron services signal only changes and have no heartbeat, so silence says nothing about liveness: a
consumer that wants to know asks with `probe()` (GetItems with a timeout), whose answer also refreshes the
cache in the same ordered way.
"""
from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from . import client
from .client import CallError
from .lib import Message, MessageBus, MessageType
from .service import BUSITEM
from .values import same_value, unwrap

_LOG = logging.getLogger(__name__)

_DBUS = "org.freedesktop.DBus"
_DBUS_PATH = "/org/freedesktop/DBus"
LATE_REPLIES_KEPT = 3  # unanswered GetItems calls per service whose late answer is still taken
_NO_GETITEMS = ("org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.UnknownObject")


@dataclass(slots=True)
class WatchedService:
    """One service as we know it: its well-known name, its connection, and the last value of every path."""

    name: str
    owner: str
    device_instance: int | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, path: str, default: Any = None) -> Any:
        value = self.values.get(path)
        return default if value is None else value


ServiceCallback = Callable[[WatchedService], None]
ChangeCallback = Callable[[WatchedService, dict[str, Any]], None]


class ServiceMonitor:
    """Follows every service whose name starts with one of `prefixes`, except those in `exclude`.

    Callbacks run in the event loop: `on_added(service)` once a service has been read and has a
    /DeviceInstance, `on_changed(service, changes)` once per signal with all its changes (the cache is
    already updated), `on_removed(service)` when it leaves the bus.
    """

    def __init__(
        self,
        bus: MessageBus,
        prefixes: Sequence[str],
        *,
        exclude: Iterable[str] = (),
        on_added: ServiceCallback | None = None,
        on_removed: ServiceCallback | None = None,
        on_changed: ChangeCallback | None = None,
        call_timeout: float = client.DEFAULT_TIMEOUT,
        retry_delay: float = 5.0,
        max_retry_delay: float = 60.0,
        require_device_instance: bool = True,
    ) -> None:
        self.bus = bus
        self.prefixes = tuple(prefixes)
        self.exclude = set(exclude)
        self.on_added = on_added
        self.on_removed = on_removed
        self.on_changed = on_changed
        self.call_timeout = call_timeout
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.require_device_instance = require_device_instance
        self.services: dict[str, WatchedService] = {}
        self._by_owner: dict[str, list[WatchedService]] = {}
        self._owners: dict[str, str] = {}  # name -> owner, for every wanted name on the bus
        self._scans: dict[str, asyncio.Task[None]] = {}
        self._scan_serials: dict[int, tuple[str, str]] = {}  # GetItems serial -> (name, owner)
        self._probe_serials: dict[int, tuple[str, str]] = {}  # a probe's GetItems serial -> (name, owner)
        self._matches: dict[str, str] = {}  # name -> match rule for its signals
        self._discovery_rules: list[str] = []
        self._started = False

    # ---- life cycle -------------------------------------------------------------------------------------

    async def start(self, wait: float | None = None) -> None:
        """Subscribe, list the services already there and read them, waiting for their first reads at most
        `wait` seconds (default: one call timeout); a service not read by then is read in the background."""
        self.bus.add_message_handler(self._on_message)
        self._started = True
        # arg0namespace matches whole dot-separated components: a prefix that ends inside a component
        # ('...battery.sim') is matched through its parent namespace and filtered by wanted().
        for namespace in sorted({p[:-1] if p.endswith(".") else p.rpartition(".")[0] or p for p in self.prefixes}):
            rule = (
                f"type='signal',sender='{_DBUS}',interface='{_DBUS}',member='NameOwnerChanged',"
                f"arg0namespace='{namespace}'"
            )
            await self._add_match(rule)
            self._discovery_rules.append(rule)
        reply = await client.call(self.bus, _DBUS, _DBUS_PATH, "ListNames", interface=_DBUS,
                                  timeout=self.call_timeout)
        names = [n for n in reply.body[0] if self.wanted(n)]
        owners = await asyncio.gather(*(client.name_owner(self.bus, n, self.call_timeout) for n in names))
        for name, owner in zip(names, owners):
            if owner and name not in self._owners:
                self._appeared(name, owner)
        # Wait for the first reads, but never longer than one call timeout: a hung service is retried in the
        # background while the others are already reported.
        await self.settle(self.call_timeout + 0.5 if wait is None else wait)

    async def settle(self, timeout: float) -> None:
        """Wait until the services being read now are read (or have left), at most `timeout` seconds."""
        if self._scans and timeout > 0:
            await asyncio.wait(list(self._scans.values()), timeout=timeout)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.bus.remove_message_handler(self._on_message)
        for task in self._scans.values():
            task.cancel()
        await asyncio.gather(*self._scans.values(), return_exceptions=True)
        self._scans.clear()
        for rule in list(self._matches.values()) + self._discovery_rules:
            await self._remove_match(rule)
        self._matches.clear()
        self._discovery_rules.clear()

    def wanted(self, name: str) -> bool:
        return name.startswith(self.prefixes) and name not in self.exclude

    @property
    def match_count(self) -> int:
        """Match rules this monitor holds on the bus daemon (a leak check for tests)."""
        return len(self._matches) + len(self._discovery_rules)

    @property
    def pending(self) -> list[str]:
        """Services on the bus that are not read yet (being read, or waiting for a retry)."""
        return sorted(self._scans)

    # ---- calls on other services ---------------------------------------------------------------------

    async def get_value(self, service: str, path: str) -> Any:
        return await client.get_value(self.bus, service, path, self.call_timeout)

    async def set_value(self, service: str, path: str, value: Any) -> int:
        return await client.set_value(self.bus, service, path, value, self.call_timeout)

    async def probe(self, name: str, timeout: float | None = None) -> bool:
        """Whether a service we follow answers now: GetItems within `timeout` (GetValue of /DeviceInstance for
        services without GetItems). The answer refreshes the cache, and what differs from it is reported
        through `on_changed` like a signal. False on no answer, an error, or when the service is not followed."""
        service = self.services.get(name)
        if service is None:
            return False
        timeout = self.call_timeout if timeout is None else timeout
        serial = self.bus.next_serial()
        self._probe_serials[serial] = (name, service.owner)
        try:
            await client.call(self.bus, name, "/", "GetItems", timeout=timeout, serial=serial)
            return True
        except CallError as exc:
            if exc.error_name not in _NO_GETITEMS:
                return False
        finally:
            self._probe_serials.pop(serial, None)
        try:  # an old service without GetItems: any answer will do, its values come by signal
            await client.get_value(self.bus, name, "/DeviceInstance", timeout)
        except CallError:
            return False
        return True

    def _apply_probe(self, name: str, owner: str, items: Any) -> None:
        service = self.services.get(name)
        if service is None or service.owner != owner:
            return
        values = client.parse_items(items)
        cached = service.values
        changes = {p: v for p, v in values.items() if p not in cached or not same_value(cached[p], v)}
        # A path the service no longer has is no value now.
        changes.update((p, None) for p, v in cached.items() if v is not None and p not in values)
        if changes:
            cached.update(changes)
            if self.on_changed is not None:
                self._callback(self.on_changed, service, changes)

    # ---- discovery -----------------------------------------------------------------------------------

    def _appeared(self, name: str, owner: str) -> None:
        self._owners[name] = owner
        self._scans[name] = asyncio.get_running_loop().create_task(self._scan(name, owner))

    def _forget_scans(self, name: str) -> None:
        for serial, (scanned, _) in list(self._scan_serials.items()):
            if scanned == name:
                del self._scan_serials[serial]

    def _vanished(self, name: str) -> None:
        self._owners.pop(name, None)
        task = self._scans.pop(name, None)
        if task is not None:
            task.cancel()
        self._forget_scans(name)
        rule = self._matches.pop(name, None)
        if rule is not None:
            asyncio.get_running_loop().create_task(self._remove_match(rule))
        service = self.services.pop(name, None)
        if service is None:
            return
        siblings = self._by_owner.get(service.owner, [])
        if service in siblings:
            siblings.remove(service)
        if not siblings:
            self._by_owner.pop(service.owner, None)
        _LOG.info("%s left the bus", name)
        if self.on_removed is not None:
            self._callback(self.on_removed, service)

    # ---- reading a service ---------------------------------------------------------------------------

    async def _scan(self, name: str, owner: str) -> None:
        delay = self.retry_delay
        failures = 0
        try:
            rule = f"type='signal',sender='{owner}',interface='{BUSITEM}'"
            if self._matches.get(name) != rule:
                await self._add_match(rule)
                self._matches[name] = rule
            while self._owners.get(name) == owner and name not in self.services:
                try:
                    await self._read(name, owner)
                    if failures:
                        _LOG.info("%s answers again", name)
                    return
                except CallError as exc:
                    failures += 1
                    level = logging.WARNING if failures == 1 else logging.DEBUG
                    _LOG.log(level, "cannot read %s (%s); retrying in %.0f s", name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)
        finally:
            if self._scans.get(name) is asyncio.current_task():
                del self._scans[name]

    async def _read(self, name: str, owner: str) -> None:
        serial = self.bus.next_serial()
        self._scan_serials[serial] = (name, owner)
        late_reply_welcome = False
        try:
            await client.call(self.bus, name, "/", "GetItems", timeout=self.call_timeout, serial=serial)
            return  # the handler has applied the reply already
        except CallError as exc:
            # A slow service (a BMS bridge answering after 10 s) is still read when its answer comes after
            # our timeout: the serial stays known until the service is read, leaves, or has retried often.
            late_reply_welcome = exc.timed_out
            if exc.error_name not in _NO_GETITEMS:
                raise
        finally:
            if not late_reply_welcome:
                self._scan_serials.pop(serial, None)
            else:
                waiting = [s for s, (n, _o) in self._scan_serials.items() if n == name]
                for stale in waiting[:-LATE_REPLIES_KEPT]:
                    del self._scan_serials[stale]
        values = await self._read_per_path(name)
        if self._owners.get(name) == owner:
            self._add_service(name, owner, values)

    async def _read_per_path(self, name: str) -> dict[str, Any]:
        """For services without GetItems: find the leaves by introspection, then GetValue each."""
        leaves: list[str] = []
        todo = ["/"]
        while todo:
            path = todo.pop()
            reply = await client.call(self.bus, name, path, "Introspect",
                                      interface="org.freedesktop.DBus.Introspectable", timeout=self.call_timeout)
            children = [n.get("name") for n in ElementTree.fromstring(reply.body[0]).findall("node")]
            children = [c for c in children if c]
            if not children and path != "/":
                leaves.append(path)
            base = "" if path == "/" else path
            todo.extend(f"{base}/{child}" for child in children)
        values = await asyncio.gather(*(client.get_value(self.bus, name, p, self.call_timeout) for p in leaves))
        return dict(zip(leaves, values))

    def _add_service(self, name: str, owner: str, values: dict[str, Any]) -> None:
        instance = values.get("/DeviceInstance")
        if self.require_device_instance and not isinstance(instance, int):
            _LOG.info("ignoring %s: it has no /DeviceInstance", name)
            return
        service = WatchedService(name, owner, instance if isinstance(instance, int) else None, values)
        self.services[name] = service
        self._by_owner.setdefault(owner, []).append(service)
        _LOG.info("found %s (instance %s, %d paths)", name, service.device_instance, len(values))
        if self.on_added is not None:
            self._callback(self.on_added, service)

    # ---- the message handler ---------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        kind = msg.message_type
        if kind is MessageType.SIGNAL:
            if msg.interface == BUSITEM:
                services = self._by_owner.get(msg.sender)
                if services:
                    self._on_values_signal(services, msg)
            elif msg.member == "NameOwnerChanged" and msg.sender == _DBUS:
                self._on_owner_changed(msg)
        elif kind is MessageType.METHOD_RETURN:
            if self._probe_serials:
                probe = self._probe_serials.pop(msg.reply_serial, None)
                if probe is not None and msg.sender == probe[1]:
                    self._apply_probe(probe[0], probe[1], msg.body[0] if msg.body else None)
                    return None
            scan = self._scan_serials.pop(msg.reply_serial, None)
            if scan is not None and msg.sender == scan[1] and self._owners.get(scan[0]) == scan[1] \
                    and scan[0] not in self.services:
                self._forget_scans(scan[0])
                self._add_service(scan[0], scan[1], client.parse_items(msg.body[0] if msg.body else None))
        return None  # never consume: dbus-next still resolves the caller's future

    def _on_values_signal(self, services: list[WatchedService], msg: Message) -> None:
        member = msg.member
        decoded = getattr(msg, "changes", None)  # the lean codec has read the values off the wire already
        try:
            if member == "ItemsChanged":
                if msg.path != "/" or msg.signature != "a{sa{sv}}":
                    return
                changes = decoded if decoded is not None else client.parse_items(msg.body[0])
            elif member == "PropertiesChanged":
                if decoded is not None:
                    changes = decoded
                else:
                    body = msg.body[0] if msg.signature == "a{sv}" else None
                    if not isinstance(body, dict) or "Value" not in body:
                        return
                    changes = {msg.path: unwrap(body["Value"])}
            else:
                return
        except Exception:  # a malformed signal from a misbehaving service is dropped, not fatal
            _LOG.debug("dropped a malformed %s from %s", member, msg.sender, exc_info=True)
            return
        if not changes:
            return
        for service in services:
            service.values.update(changes)
            if self.on_changed is not None:
                self._callback(self.on_changed, service, changes)

    def _on_owner_changed(self, msg: Message) -> None:
        try:
            name, old_owner, new_owner = msg.body
        except ValueError:
            return
        if not self.wanted(name):
            return
        if old_owner and name in self._owners:
            self._vanished(name)
        if new_owner:
            self._appeared(name, new_owner)

    def _callback(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # a consumer's bug must not stop the monitor
            _LOG.exception("monitor callback %s failed", getattr(callback, "__name__", callback))

    # ---- match rules -----------------------------------------------------------------------------------

    async def _add_match(self, rule: str) -> None:
        await client.add_match(self.bus, rule, self.call_timeout)

    async def _remove_match(self, rule: str) -> None:
        await client.remove_match(self.bus, rule, self.call_timeout)
