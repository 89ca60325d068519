"""Calls to other services' BusItems, each bounded by a timeout so a hung service never blocks the loop."""
from __future__ import annotations

import asyncio
from typing import Any

from .lib import Message, MessageBus, MessageType
from .service import BUSITEM
from .values import unwrap, wrap

DEFAULT_TIMEOUT = 5.0


class CallError(Exception):
    """A call failed: the service answered with an error, vanished, or did not answer in time."""

    def __init__(self, service: str, path: str, member: str, reason: str, error_name: str = "") -> None:
        super().__init__(f"{member} {path} on {service}: {reason}")
        self.service = service
        self.path = path
        self.member = member
        self.error_name = error_name

    @property
    def timed_out(self) -> bool:
        return self.error_name == "timeout"


async def call(
    bus: MessageBus,
    service: str,
    path: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    *,
    interface: str | None = BUSITEM,
    timeout: float = DEFAULT_TIMEOUT,
    serial: int = 0,
    patient: bool = False,
) -> Message:
    """Send one method call and return the reply; CallError on an error reply or after `timeout` seconds.
    `patient`: on a connection read in batches, the reply may wait for the next batch (a side feature's periodic
    read: a fraction of a second later, with no wake-up of its own); otherwise it is read the moment it arrives."""
    msg = Message(
        destination=service, path=path, interface=interface, member=member,
        signature=signature, body=body or [], serial=serial,
    )
    if patient:
        try:
            msg.patient = True  # type: ignore[attr-defined]  # read by lib's writer
        except AttributeError:  # dbus-fast's compiled Message: its connections are not read in batches anyway
            pass
    try:
        reply = await asyncio.wait_for(bus.call(msg), timeout)
    except asyncio.TimeoutError:
        raise CallError(service, path, member, f"no answer within {timeout:g} s", "timeout") from None
    except Exception as exc:  # the connection failed under us
        raise CallError(service, path, member, str(exc), "connection") from exc
    if reply is None or reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply is not None and reply.body else "error"
        raise CallError(service, path, member, str(text), reply.error_name if reply is not None else "")
    return reply


async def get_value(bus: MessageBus, service: str, path: str, timeout: float = DEFAULT_TIMEOUT,
                    patient: bool = False) -> Any:
    """The value at `path` (None when invalid); `patient` as for call()."""
    reply = await call(bus, service, path, "GetValue", timeout=timeout, patient=patient)
    return unwrap(reply.body[0])


async def get_text(bus: MessageBus, service: str, path: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    reply = await call(bus, service, path, "GetText", timeout=timeout)
    return unwrap(reply.body[0])


async def set_value(bus: MessageBus, service: str, path: str, value: Any, timeout: float = DEFAULT_TIMEOUT,
                    patient: bool = False) -> int:
    """Write a value (None writes invalid); returns the service's code: 0 ok, 1 not writeable, 2 rejected.
    `patient` as for call()."""
    reply = await call(bus, service, path, "SetValue", "v", [wrap(value)], timeout=timeout, patient=patient)
    return int(reply.body[0])


async def get_items(bus: MessageBus, service: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Every leaf of a service: {absolute path: value}."""
    reply = await call(bus, service, "/", "GetItems", timeout=timeout)
    return parse_items(reply.body[0])


def parse_items(items: Any) -> dict[str, Any]:
    """The body of GetItems/ItemsChanged -> {path: value}; entries without a Value are skipped."""
    out: dict[str, Any] = {}
    if not isinstance(items, dict):
        return out
    for path, entry in items.items():
        if isinstance(entry, dict) and "Value" in entry:
            out[path] = unwrap(entry["Value"])
    return out


_DBUS = "org.freedesktop.DBus"
_DBUS_PATH = "/org/freedesktop/DBus"


async def add_match(bus: MessageBus, rule: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Ask the bus daemon for the signals matching `rule` (CallError if it refuses)."""
    await call(bus, _DBUS, _DBUS_PATH, "AddMatch", "s", [rule], interface=_DBUS, timeout=timeout)


async def remove_match(bus: MessageBus, rule: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Drop a match rule; quietly nothing when the connection is gone or the daemon objects."""
    if not bus.connected:
        return
    try:
        await call(bus, _DBUS, _DBUS_PATH, "RemoveMatch", "s", [rule], interface=_DBUS, timeout=timeout)
    except CallError:
        pass


async def name_owner(bus: MessageBus, name: str, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """The unique name owning a well-known name, or None when nobody does."""
    try:
        reply = await call(bus, _DBUS, _DBUS_PATH, "GetNameOwner", "s", [name], interface=_DBUS, timeout=timeout)
    except CallError:
        return None
    return str(reply.body[0])
