"""Client of Victron's localsettings (`com.victronenergy.settings`).

Settings are declared with defaults; while the settings service is absent the defaults are used, and when it
appears (or comes back) every declared setting is added there and the stored values replace the defaults,
with watchers told of each value that differs. Device instances are reserved through
`/Settings/Devices/<unique id>/ClassAndVrmInstance`, which localsettings moves to the next free instance
when the preferred one is taken.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from . import client
from .client import CallError
from .lib import Message, MessageBus, MessageType
from .service import BUSITEM, VeService
from .values import same_value, unwrap, wrap

_LOG = logging.getLogger(__name__)

SETTINGS_SERVICE = "com.victronenergy.settings"
SETTINGS_INTERFACE = "com.victronenergy.Settings"
_DBUS = "org.freedesktop.DBus"

Watcher = Callable[[str, Any], None]


@dataclass(frozen=True, slots=True)
class Setting:
    """A setting to declare. The default's type decides the setting's type (int 'i', float 'f', str 's')."""

    path: str
    default: Any
    min: Any = None
    max: Any = None
    silent: bool = False

    def entry(self) -> dict[str, Any]:
        out = {"path": wrap(self.path), "default": wrap(self.default)}
        if self.min is not None:
            out["min"] = wrap(self.min)
        if self.max is not None:
            out["max"] = wrap(self.max)
        if self.silent:
            out["silent"] = wrap(1)
        return out


def device_instance_path(unique_id: str) -> str:
    return f"/Settings/Devices/{unique_id}/ClassAndVrmInstance"


def parse_class_and_instance(value: Any) -> tuple[str, int] | None:
    """'battery:512' -> ('battery', 512); None for anything else."""
    if not isinstance(value, str) or value.count(":") != 1:
        return None
    device_class, instance = value.split(":")
    try:
        return device_class, int(instance)
    except ValueError:
        return None


class LocalSettings:
    """Declared settings with their current values, kept in step with localsettings while it is present."""

    def __init__(self, bus: MessageBus, *, timeout: float = client.DEFAULT_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout
        self.values: dict[str, Any] = {}
        self._declared: dict[str, Setting] = {}
        self._watchers: dict[str, list[Watcher]] = {}
        self._owner: str | None = None
        self._sync: asyncio.Task[None] | None = None
        self._rules: list[str] = []

    @property
    def available(self) -> bool:
        """Whether localsettings is on the bus now."""
        return self._owner is not None

    async def start(self) -> None:
        self.bus.add_message_handler(self._on_message)
        for rule in (
            f"type='signal',sender='{_DBUS}',interface='{_DBUS}',member='NameOwnerChanged',arg0='{SETTINGS_SERVICE}'",
            f"type='signal',sender='{SETTINGS_SERVICE}',interface='{BUSITEM}',member='PropertiesChanged'",
        ):
            await client.add_match(self.bus, rule, self.timeout)
            self._rules.append(rule)
        self._owner = await client.name_owner(self.bus, SETTINGS_SERVICE, self.timeout)
        if self._owner is None:
            _LOG.warning("%s is not on the bus: using defaults until it appears", SETTINGS_SERVICE)

    async def stop(self) -> None:
        self.bus.remove_message_handler(self._on_message)
        if self._sync is not None:
            self._sync.cancel()
        for rule in self._rules:
            await client.remove_match(self.bus, rule, self.timeout)
        self._rules.clear()

    # ---- declaring and using settings -----------------------------------------------------------------

    async def add(self, *settings: Setting) -> dict[str, Any]:
        """Declare settings and return their values (defaults while localsettings is absent)."""
        for setting in settings:
            self._declared[setting.path] = setting
            self.values.setdefault(setting.path, setting.default)
        if self.available:
            try:
                await self._add_remote(settings)
            except CallError as exc:
                _LOG.warning("could not add settings to %s: %s; using defaults", SETTINGS_SERVICE, exc)
        return {s.path: self.values[s.path] for s in settings}

    def get(self, path: str) -> Any:
        return self.values.get(path)

    async def set(self, path: str, value: Any) -> bool:
        """Write a setting. The local value follows at once; False if localsettings refused or is absent."""
        old = self.values.get(path)
        self.values[path] = value
        if not same_value(old, value):
            self._notify(path, value)
        if not self.available:
            return False
        try:
            code = await client.set_value(self.bus, SETTINGS_SERVICE, path, value, self.timeout)
        except CallError as exc:
            _LOG.warning("could not write %s: %s", path, exc)
            return False
        if code != 0:
            _LOG.warning("%s refused %r for %s (code %d)", SETTINGS_SERVICE, value, path, code)
            stored = await self._read(path)
            if stored is not None:
                self._update(path, stored)
            return False
        return True

    def watch(self, path: str, watcher: Watcher) -> None:
        """Call `watcher(path, value)` whenever the setting changes (by anyone, or by localsettings appearing)."""
        self._watchers.setdefault(path, []).append(watcher)

    async def reserve_device_instance(self, unique_id: str, device_class: str, preferred: int) -> int:
        """The device instance for a service, reserved in localsettings under a stable unique id.

        While localsettings is absent this is the preferred instance.
        """
        path = device_instance_path(unique_id)
        values = await self.add(Setting(path, f"{device_class}:{preferred}"))
        parsed = parse_class_and_instance(values[path])
        if parsed is None or parsed[0] != device_class:
            _LOG.warning("%s holds %r, not a %s instance; using %d", path, values[path], device_class, preferred)
            return preferred
        return parsed[1]

    def unwatch(self, path: str, watcher: Watcher) -> None:
        watchers = self._watchers.get(path, [])
        if watcher in watchers:
            watchers.remove(watcher)

    def bind(self, service: VeService, path: str, setting_path: str) -> Callable[[], None]:
        """Keep a writeable service path (such as /CustomName) and a declared setting the same both ways; a
        SetValue is converted to the setting's type, as localsettings does. Returns what ends the binding (for
        a service that stops before this client does)."""
        default = self._declared[setting_path].default
        service.add_path(path, self.values.get(setting_path), writeable=True,
                         on_change=lambda _p, value: self._write_soon(setting_path, value),
                         value_types=(type(default),) if type(default) in (str, int, float) else None)

        def follow(_p: str, value: Any) -> None:
            service.set_value(path, value)
        self.watch(setting_path, follow)
        return lambda: self.unwatch(setting_path, follow)

    def _write_soon(self, path: str, value: Any) -> bool:
        asyncio.get_running_loop().create_task(self.set(path, value))
        return True

    # ---- talking to localsettings ---------------------------------------------------------------------

    async def _add_remote(self, settings: tuple[Setting, ...] | list[Setting]) -> None:
        if not settings:
            return
        try:
            reply = await client.call(self.bus, SETTINGS_SERVICE, "/", "AddSettings", "aa{sv}",
                                      [[s.entry() for s in settings]], interface=SETTINGS_INTERFACE,
                                      timeout=self.timeout)
            results = reply.body[0]
        except CallError as exc:
            if exc.error_name != "org.freedesktop.DBus.Error.UnknownMethod":
                raise
            results = [await self._add_one(s) for s in settings]  # an old localsettings without AddSettings
        for setting, result in zip(settings, results):
            error = unwrap(result.get("error")) if isinstance(result, dict) else None
            if error:
                _LOG.warning("%s rejected the setting %s (error %s)", SETTINGS_SERVICE, setting.path, error)
                continue
            value = unwrap(result.get("value")) if isinstance(result, dict) and "value" in result else None
            if value is None:
                value = await self._read(setting.path)
            if value is not None:
                self._update(setting.path, value)

    async def _add_one(self, setting: Setting) -> dict[str, Any]:
        group, _, name = setting.path.rpartition("/")
        kind = {int: "i", float: "f", str: "s"}.get(type(setting.default), "s")
        reply = await client.call(
            self.bus, SETTINGS_SERVICE, "/", "AddSetting", "ssvsvv",
            [group, name, wrap(setting.default), kind, wrap(setting.min or 0), wrap(setting.max or 0)],
            interface=SETTINGS_INTERFACE, timeout=self.timeout,
        )
        return {"error": reply.body[0]}

    async def _read(self, path: str) -> Any:
        try:
            return await client.get_value(self.bus, SETTINGS_SERVICE, path, self.timeout)
        except CallError as exc:
            _LOG.debug("could not read %s: %s", path, exc)
            return None

    async def _resync(self) -> None:
        """localsettings (re)appeared: declare everything again and take its stored values."""
        try:
            await self._add_remote(list(self._declared.values()))
            _LOG.info("%s is back: %d settings synchronised", SETTINGS_SERVICE, len(self._declared))
        except CallError as exc:
            _LOG.warning("could not synchronise with %s: %s", SETTINGS_SERVICE, exc)

    def _update(self, path: str, value: Any) -> None:
        if not same_value(self.values.get(path), value):
            self.values[path] = value
            self._notify(path, value)

    def _notify(self, path: str, value: Any) -> None:
        for watcher in self._watchers.get(path, ()):
            try:
                watcher(path, value)
            except Exception:
                _LOG.exception("setting watcher for %s failed", path)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return None
        if msg.member == "NameOwnerChanged" and msg.sender == _DBUS and msg.body and msg.body[0] == SETTINGS_SERVICE:
            new_owner = msg.body[2]
            self._owner = new_owner or None
            if new_owner:
                if self._sync is not None:
                    self._sync.cancel()
                self._sync = asyncio.get_running_loop().create_task(self._resync())
            else:
                _LOG.warning("%s left the bus: keeping the last values", SETTINGS_SERVICE)
        elif (msg.member == "PropertiesChanged" and msg.interface == BUSITEM and self._owner is not None
              and msg.sender == self._owner and msg.path in self._declared and msg.signature == "a{sv}"):
            body = msg.body[0]
            if isinstance(body, dict) and "Value" in body:
                value = unwrap(body["Value"])
                if value is not None:  # invalid = the setting was removed; keep what we had
                    self._update(msg.path, value)
        return None
