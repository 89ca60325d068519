"""Follow a few single paths of other services (DVCC settings, the system service's /Control/Dvcc).

For services too large to read whole (localsettings has hundreds of paths and no GetItems): each watched
path is read with GetValue when its service appears, then followed through PropertiesChanged on that path
and ItemsChanged on '/'. While the service is absent the value is None.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from . import client
from .client import CallError
from .lib import Message, MessageBus, MessageType
from .service import BUSITEM
from .values import unwrap

_LOG = logging.getLogger(__name__)
_DBUS = "org.freedesktop.DBus"

Callback = Callable[[str, str, Any], None]


class PathWatcher:
    """`watch(service, path)` then `start()`; `on_change(service, path, value)` on every change, and
    `on_signal(service)` before them on every BusItem signal of a watched service (a sign of life: Victron services
    signal only changes, so a path it did not signal still holds its value)."""

    def __init__(self, bus: MessageBus, on_change: Callback, timeout: float = client.DEFAULT_TIMEOUT,
                 on_signal: Callable[[str], None] | None = None) -> None:
        self.bus = bus
        self.on_change = on_change
        self.on_signal = on_signal
        self.timeout = timeout
        self.values: dict[tuple[str, str], Any] = {}
        self._paths: dict[str, set[str]] = {}
        self._owners: dict[str, str] = {}  # service -> unique name
        self._rules: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def watch(self, service: str, path: str) -> None:
        self._paths.setdefault(service, set()).add(path)
        self.values.setdefault((service, path), None)

    def get(self, service: str, path: str) -> Any:
        return self.values.get((service, path))

    async def start(self) -> None:
        self.bus.add_message_handler(self._on_message)
        for service in self._paths:
            for rule in (f"type='signal',sender='{_DBUS}',interface='{_DBUS}',member='NameOwnerChanged',"
                         f"arg0='{service}'",
                         f"type='signal',sender='{service}',interface='{BUSITEM}'"):
                await client.add_match(self.bus, rule, self.timeout)
                self._rules.append(rule)
            owner = await client.name_owner(self.bus, service, self.timeout)
            if owner is not None:
                self._owners[service] = owner
                await self._read(service)

    async def stop(self) -> None:
        self.bus.remove_message_handler(self._on_message)
        for task in self._tasks:
            task.cancel()
        for rule in self._rules:
            await client.remove_match(self.bus, rule, self.timeout)
        self._rules.clear()

    async def _read(self, service: str) -> None:
        for path in sorted(self._paths.get(service, ())):
            try:
                value = await client.get_value(self.bus, service, path, self.timeout)
            except CallError as exc:
                _LOG.debug("cannot read %s %s: %s", service, path, exc)
                value = None
            self._set(service, path, value)

    def _set(self, service: str, path: str, value: Any) -> None:
        key = (service, path)
        if self.values.get(key) != value or type(self.values.get(key)) is not type(value):
            self.values[key] = value
            try:
                self.on_change(service, path, value)
            except Exception:
                _LOG.exception("watcher callback for %s %s failed", service, path)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return None
        if msg.member == "NameOwnerChanged" and msg.sender == _DBUS:
            service, _old, new = msg.body
            if service in self._paths:
                if new:
                    self._owners[service] = new
                    task = asyncio.get_running_loop().create_task(self._read(service))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    self._owners.pop(service, None)
                    for path in self._paths[service]:
                        self._set(service, path, None)
            return None
        if msg.interface != BUSITEM:
            return None
        for service, owner in self._owners.items():
            if owner != msg.sender:
                continue
            paths = self._paths[service]
            if self.on_signal is not None:
                try:
                    self.on_signal(service)
                except Exception:
                    _LOG.exception("watcher callback for %s failed", service)
            try:
                if msg.member == "PropertiesChanged" and msg.path in paths and msg.signature == "a{sv}":
                    if "Value" in msg.body[0]:
                        self._set(service, msg.path, unwrap(msg.body[0]["Value"]))
                elif msg.member == "ItemsChanged" and msg.path == "/" and msg.signature == "a{sa{sv}}":
                    for path, value in client.parse_items(msg.body[0]).items():
                        if path in paths:
                            self._set(service, path, value)
            except Exception:
                _LOG.debug("dropped a malformed signal from %s", service, exc_info=True)
        return None
