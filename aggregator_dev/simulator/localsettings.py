"""A stand-in for Victron's localsettings, for the demo and the tests (a GX has the real one).

It implements what clients use: AddSetting, AddSilentSetting, AddSettings, RemoveSettings on interface
com.victronenergy.Settings, GetValue/GetText/SetValue on settings and nodes, GetAttributes on settings,
PropertiesChanged, type conversion and min/max checks, and the ClassAndVrmInstance rule (a taken instance moves
to the next free one). Values may be kept in a JSON file so they survive restarts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

from aggregator.bus.lib import Message, Variant, connect
from aggregator.bus.service import BUSITEM, VeService
from aggregator.bus.settings import SETTINGS_INTERFACE, SETTINGS_SERVICE, parse_class_and_instance
from aggregator.bus.values import unwrap, wrap

_LOG = logging.getLogger("aggregator.simulator.localsettings")

# localsettings' result codes
OK = 0
ERR_TYPE = -3
ERR_PATH = -4
ERR_TYPE_CHANGE = -5
ERR_CONVERT = -6
ERR_RANGE = -7
ERR_GROUP = -8
ERR_NOT_SETTINGS = -9
_CONVERT = {"i": int, "f": float, "s": str}
_DEVICES = "/Settings/Devices/"
_ADD_SETTING_VALUES = frozenset("vsdiuxtnqy")  # a variant, or a plain text or number


@dataclass(slots=True)
class _Setting:
    kind: str
    default: Any
    min: Any
    max: Any
    silent: bool


class SettingsStandIn:
    def __init__(self, service: VeService, store: str | None = None) -> None:
        self.service = service
        self.store = store
        self.settings: dict[str, _Setting] = {}
        self._saved: dict[str, Any] = {}
        if store and os.path.exists(store):
            with open(store, encoding="utf-8") as f:
                self._saved = json.load(f)
        service.add_method(SETTINGS_INTERFACE, "AddSetting", self._add_setting)
        service.add_method(SETTINGS_INTERFACE, "AddSilentSetting", self._add_setting)
        service.add_method(SETTINGS_INTERFACE, "AddSettings", self._add_settings)
        service.add_method(SETTINGS_INTERFACE, "RemoveSettings", self._remove_settings)
        service.add_method(BUSITEM, "SetValue", self._set_value)
        service.add_method(BUSITEM, "GetAttributes", self._get_attributes)

    # ---- the rules -----------------------------------------------------------------------------------

    def add(self, path: str, default: Any, kind: str, lo: Any = None, hi: Any = None, silent: bool = False) -> int:
        if not path.startswith("/Settings/"):
            return ERR_NOT_SETTINGS
        if any(part.startswith("_") for part in path.split("/")):
            return ERR_PATH
        if kind not in _CONVERT:
            return ERR_TYPE
        try:
            default = _CONVERT[kind](default)
            lo = _CONVERT[kind](lo) if lo not in (None, "") and kind != "s" else None
            hi = _CONVERT[kind](hi) if hi not in (None, "") and kind != "s" else None
        except (TypeError, ValueError):
            return ERR_CONVERT
        if lo == 0 and hi == 0:
            lo = hi = None
        if not _in_range(default, lo, hi):
            return ERR_RANGE
        existing = self.settings.get(path)
        if existing is not None:
            if existing.kind != kind:
                return ERR_TYPE_CHANGE
            existing.default, existing.min, existing.max, existing.silent = default, lo, hi, silent
            return OK
        if path in self.service.paths() or any(p.startswith(path + "/") for p in self.service.paths()):
            return ERR_GROUP
        if _is_instance_setting(path):
            if parse_class_and_instance(default) is None:
                return ERR_CONVERT
        value = self._saved.get(path, default)
        if _is_instance_setting(path):
            value = self._free_instance(path, value)
        self.settings[path] = _Setting(kind, default, lo, hi, silent)
        self.service.add_path(path, value, writeable=True)
        self._save()
        return OK

    def _free_instance(self, path: str, wanted: str) -> str:
        """The wanted 'class:n', or the next n that no other ClassAndVrmInstance holds."""
        parsed = parse_class_and_instance(wanted)
        if parsed is None:
            return wanted
        device_class, instance = parsed
        taken = {self.service[p] for p in self.settings if p != path and _is_instance_setting(p)}
        while f"{device_class}:{instance}" in taken:
            instance += 1
        return f"{device_class}:{instance}"

    def set(self, path: str, raw: Any) -> int:
        setting = self.settings.get(path)
        if setting is None:
            return -1
        try:
            value = _CONVERT[setting.kind](raw)
        except (TypeError, ValueError):
            return -1
        if not _in_range(value, setting.min, setting.max):
            return -1
        if _is_instance_setting(path):
            if parse_class_and_instance(value) is None:
                return -1
            value = self._free_instance(path, value)
        if self.service.set_value(path, value):
            self._save()
        return OK

    def remove(self, path: str) -> int:
        if path not in self.settings:
            return -1
        del self.settings[path]
        self.service.remove_path(path)
        self._save()
        return OK

    def _save(self) -> None:
        if not self.store:
            return
        data = {p: self.service[p] for p in self.settings}
        tmp = self.store + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.store)

    # ---- D-Bus methods --------------------------------------------------------------------------------

    def _add_setting(self, msg: Message) -> Message:
        # The introspected form is ssvsvv; Victron's own settingsdevice.py calls without introspection, so
        # dbus-python sends the default, min and max as plain values (ssssii, sssidd...), which localsettings takes.
        signature = msg.signature
        if len(signature) != 6 or signature[:2] != "ss" or signature[3] != "s" \
                or any(code not in _ADD_SETTING_VALUES for code in signature[2] + signature[4:]):
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "AddSetting takes ssvsvv")
        group, name, default, kind, lo, hi = msg.body
        base = "" if msg.path == "/" else msg.path
        path = "/".join(p for p in f"{base}/{group}/{name}".split("/") if p)
        default, lo, hi = (unwrap(v) if isinstance(v, Variant) else v for v in (default, lo, hi))
        code = self.add("/" + path, default, kind, lo, hi, msg.member == "AddSilentSetting")
        return Message.new_method_return(msg, "i", [code])

    def _add_settings(self, msg: Message) -> Message:
        if msg.signature != "aa{sv}":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "AddSettings takes aa{sv}")
        base = "" if msg.path == "/" else msg.path
        results = []
        for entry in msg.body[0]:
            raw_path = unwrap(entry.get("path"))
            result: dict[str, Any] = {}
            if not isinstance(raw_path, str) or not raw_path:
                result["error"] = wrap(ERR_PATH)
                results.append(result)
                continue
            path = base + "/" + raw_path.lstrip("/")
            result["path"] = wrap(raw_path)
            default_variant = entry.get("default")
            kind = {"i": "i", "x": "i", "d": "f", "s": "s"}.get(getattr(default_variant, "signature", ""), "")
            code = self.add(path, unwrap(default_variant), kind, unwrap(entry.get("min")), unwrap(entry.get("max")),
                            bool(unwrap(entry.get("silent"))))
            result["error"] = wrap(code)
            if code == OK:
                result["value"] = wrap(self.service[path])
            results.append(result)
        return Message.new_method_return(msg, "aa{sv}", [results])

    def _remove_settings(self, msg: Message) -> Message:
        if msg.signature != "as":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "RemoveSettings takes as")
        base = "" if msg.path == "/" else msg.path
        return Message.new_method_return(msg, "ai", [[self.remove(base + "/" + p.lstrip("/")) for p in msg.body[0]]])

    def _get_attributes(self, msg: Message) -> Message:
        """A setting's default, min, max and silent flag (Victron's settingsdevice.py compares them with what it
        would add: a setting that exists with the same attributes is taken as it is)."""
        setting = self.settings.get(msg.path)
        if setting is None:
            return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", f"{msg.path} is not a setting")
        bound = 0.0 if setting.kind == "f" else 0
        return Message.new_method_return(msg, "vvvi", [wrap(setting.default), wrap(bound if setting.min is None else
                                                                                   setting.min),
                                                       wrap(bound if setting.max is None else setting.max),
                                                       int(setting.silent)])

    def _set_value(self, msg: Message) -> Message | None:
        if msg.path not in self.settings:
            return None  # nodes and unknown paths: the BusItem handler answers
        if msg.signature != "v":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "SetValue takes one variant")
        return Message.new_method_return(msg, "i", [self.set(msg.path, unwrap(msg.body[0]))])


def _in_range(value: Any, lo: Any, hi: Any) -> bool:
    # localsettings treats a bound of 0 as "no bound"
    if isinstance(value, str):
        return True
    return (not lo or value >= lo) and (not hi or value <= hi)


def _is_instance_setting(path: str) -> bool:
    return path.startswith(_DEVICES) and path.endswith("/ClassAndVrmInstance") and path.count("/") == 4


async def serve(store: str | None = None, bus_address: str | None = None) -> SettingsStandIn:
    bus = await connect(bus_address)
    service = VeService(bus, SETTINGS_SERVICE)
    stand_in = SettingsStandIn(service, store)
    await service.register()
    return stand_in


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A localsettings stand-in on the session bus (for demo/tests).")
    parser.add_argument("--store", help="JSON file that keeps the values across restarts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stand_in = await serve(args.store)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        stand_in.service.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
