"""The localsettings stand-in (read through busctl) and the LocalSettings client against it."""
from __future__ import annotations

import asyncio
import itertools
import subprocess
import json
import time
from pathlib import Path
from typing import Any

import pytest

from aggregator.bus.lib import connect
from aggregator.bus.service import VeService
from aggregator.bus.settings import SETTINGS_INTERFACE, SETTINGS_SERVICE, LocalSettings, Setting, device_instance_path
from aggregator_dev.simulator.localsettings import SettingsStandIn, serve

from ..helpers import eventually

_ids = itertools.count()
_DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus")


def uid() -> str:
    return f"t{next(_ids)}x{time.monotonic_ns() % 1000000}"


async def name_has_owner(busctl: Any, name: str = SETTINGS_SERVICE) -> bool:
    reply = await busctl.acall_json(*_DBUS, "NameHasOwner", "s", name, interface="org.freedesktop.DBus")
    return reply["data"][0]


async def start_stand_in(busctl: Any, store: Path | None = None) -> SettingsStandIn:
    await eventually(lambda: _not(name_has_owner(busctl)), timeout=10)  # the previous test's one is gone
    return await serve(str(store) if store else None, busctl.address)


async def _not(awaitable: Any) -> bool:
    return not await awaitable


async def stop_stand_in(busctl: Any, stand_in: SettingsStandIn) -> None:
    stand_in.service.close()
    await eventually(lambda: _not(name_has_owner(busctl)), timeout=10)


async def get(busctl: Any, path: str) -> Any:
    reply = await busctl.acall_json(SETTINGS_SERVICE, path, "GetValue")
    return reply["data"][0]["data"]


async def set_(busctl: Any, service: str, path: str, sig: str, value: str) -> int:
    return (await busctl.acall_json(service, path, "SetValue", "v", sig, value))["data"][0]


async def settings_call(busctl: Any, member: str, *args: str) -> Any:
    return await busctl.acall_json(SETTINGS_SERVICE, "/", member, *args, interface=SETTINGS_INTERFACE)


# ---- the stand-in's rules, through busctl ----------------------------------------------------------------------

async def test_stand_in_add_settings_and_add_setting(busctl: Any) -> None:
    stand_in = await start_stand_in(busctl)
    group = f"Settings/T{uid()}"
    try:
        reply = await settings_call(busctl, "AddSettings", "aa{sv}", "3",
                                    "2", "path", "s", f"{group}/Count", "default", "i", "5",
                                    "3", "path", "s", f"/{group}/Level", "default", "d", "1.5", "max", "d", "3",
                                    "2", "path", "s", "Other/Thing", "default", "i", "1")
        assert reply["type"] == "aa{sv}"
        count, level, bad = reply["data"][0]
        assert count["path"]["data"] == f"{group}/Count"
        assert (count["error"]["data"], count["value"]) == (0, {"type": "i", "data": 5})
        assert (level["error"]["data"], level["value"]) == (0, {"type": "d", "data": 1.5})
        assert bad["error"]["data"] == -9 and "value" not in bad  # not below /Settings
        assert await get(busctl, f"/{group}/Count") == 5

        async def add_setting(name: str, sig: str, default: str, kind: str, lo: str = "0", hi: str = "0") -> int:
            reply = await settings_call(busctl, "AddSetting", "ssvsvv", group, name, sig, default, kind,
                                        "i", lo, "i", hi)
            return reply["data"][0]

        assert await add_setting("Name", "s", "hello", "s") == 0
        assert await get(busctl, f"/{group}/Name") == "hello"
        assert await add_setting("Count", "i", "9", "i") == 0  # exists: no change of value
        assert await get(busctl, f"/{group}/Count") == 5
        assert await add_setting("Count", "s", "x", "s") == -5  # type change
        assert await add_setting("Weird", "i", "1", "z") == -3  # unknown type
        assert await add_setting("Ranged", "i", "50", "i", "1", "10") == -7  # default out of range
        assert await add_setting("_hidden", "i", "1", "i") == -4
    finally:
        await stop_stand_in(busctl, stand_in)


async def test_stand_in_add_setting_with_plain_values(busctl: Any) -> None:
    """Victron's settingsdevice.py calls AddSetting without introspection: dbus-python sends the default, min
    and max as plain values, not variants, and localsettings takes them; a setting that exists it reads with
    GetAttributes."""
    stand_in = await start_stand_in(busctl)
    group = f"Settings/T{uid()}"
    try:
        reply = await settings_call(busctl, "AddSetting", "ssssii", group, "CustomName", "", "s", "0", "0")
        assert reply["data"] == [0]
        reply = await settings_call(busctl, "AddSetting", "ssisdd", group, "Level", "3", "i", "1", "10")
        assert reply["data"] == [0]
        assert await get(busctl, f"/{group}/CustomName") == ""
        assert await get(busctl, f"/{group}/Level") == 3
        with pytest.raises(AssertionError, match="AddSetting takes"):  # not six arguments of that form
            await settings_call(busctl, "AddSetting", "ssssi", group, "Other", "x", "s", "0")
        # What settingsdevice.py asks of a setting that exists, to take it as it is.
        reply = await busctl.acall_json(SETTINGS_SERVICE, f"/{group}/Level", "GetAttributes")
        assert reply["type"] == "vvvi"
        assert [v["data"] if isinstance(v, dict) else v for v in reply["data"]] == [3, 1, 10, 0]
        reply = await busctl.acall_json(SETTINGS_SERVICE, f"/{group}/CustomName", "GetAttributes")
        assert [v["data"] if isinstance(v, dict) else v for v in reply["data"]] == ["", 0, 0, 0]
    finally:
        await stop_stand_in(busctl, stand_in)


async def test_stand_in_class_and_vrm_instance(busctl: Any) -> None:
    stand_in = await start_stand_in(busctl)
    first, second = uid(), uid()
    try:
        for unique_id in (first, second):
            reply = await settings_call(busctl, "AddSetting", "ssvsvv", f"Settings/Devices/{unique_id}",
                                        "ClassAndVrmInstance", "s", "battery:1", "s", "s", "", "s", "")
            assert reply["data"] == [0]
        assert await get(busctl, device_instance_path(first)) == "battery:1"
        assert await get(busctl, device_instance_path(second)) == "battery:2"
        # asking for a taken instance by SetValue moves it too
        assert await set_(busctl, SETTINGS_SERVICE, device_instance_path(second), "s", "battery:1") == 0
        assert await get(busctl, device_instance_path(second)) == "battery:2"
    finally:
        await stop_stand_in(busctl, stand_in)


async def test_stand_in_setvalue_rules_and_remove(bus_address: str, busctl: Any) -> None:
    stand_in = await start_stand_in(busctl)
    group = f"Settings/T{uid()}"
    try:
        reply = await settings_call(busctl, "AddSettings", "aa{sv}", "2",
                                    "4", "path", "s", f"{group}/Limit", "default", "i", "5", "min", "i", "1",
                                    "max", "i", "10",
                                    "2", "path", "s", f"{group}/Ratio", "default", "d", "0.5")
        assert [r["error"]["data"] for r in reply["data"][0]] == [0, 0]
        limit, ratio = f"/{group}/Limit", f"/{group}/Ratio"

        assert await set_(busctl, SETTINGS_SERVICE, limit, "i", "50") == -1  # out of range
        assert await get(busctl, limit) == 5
        assert await set_(busctl, SETTINGS_SERVICE, limit, "s", "abc") == -1  # not convertible
        assert await get(busctl, limit) == 5
        assert await set_(busctl, SETTINGS_SERVICE, limit, "i", "7") == 0
        assert await get(busctl, limit) == 7

        assert await set_(busctl, SETTINGS_SERVICE, ratio, "i", "3") == 0  # int to a float setting
        reply = await busctl.acall_json(SETTINGS_SERVICE, ratio, "GetValue")
        assert reply["data"][0] == {"type": "d", "data": 3.0}

        # SetValue on a node is not a setting: the BusItem rules answer (an error), not a crash
        for target in (f"/{group}", f"/{group}/Nope"):
            result = await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
                ["dbus-send", f"--bus={bus_address}", "--print-reply", f"--dest={SETTINGS_SERVICE}", target,
                 "com.victronenergy.BusItem.SetValue", "variant:int32:1"], capture_output=True, text=True, timeout=20))
            assert result.returncode != 0
            assert "org.freedesktop.DBus.Error.UnknownObject" in result.stderr, result.stderr
        assert (await busctl.acall_json(SETTINGS_SERVICE, f"/{group}", "GetValue"))["data"][0]["type"] == "a{sv}"

        reply = await settings_call(busctl, "RemoveSettings", "as", "2", f"{group}/Limit", f"{group}/Nope")
        assert reply["data"][0] == [0, -1]
        result = await busctl.arun("call", SETTINGS_SERVICE, limit, "com.victronenergy.BusItem", "GetValue",
                                   check=False)
        assert result.returncode != 0
        assert await get(busctl, ratio) == 3.0
    finally:
        await stop_stand_in(busctl, stand_in)


# ---- the client ----------------------------------------------------------------------------------------------

async def test_client_add_returns_stored_values(busctl: Any, tmp_path: Path) -> None:
    path = f"/Settings/T{uid()}/Capacity"
    store = tmp_path / "settings.json"
    store.write_text(json.dumps({path: 280.0}))
    stand_in = await start_stand_in(busctl, store)
    settings = LocalSettings(await connect())
    try:
        await settings.start()
        assert settings.available
        values = await settings.add(Setting(path, 100.0, 0.0, 1000.0), Setting(path + "Two", "x"))
        assert values == {path: 280.0, path + "Two": "x"}
        assert settings.get(path) == 280.0
        assert await get(busctl, path + "Two") == "x"  # added there
    finally:
        await settings.stop()
        settings.bus.disconnect()
        await stop_stand_in(busctl, stand_in)


async def test_client_reserves_distinct_instances(busctl: Any) -> None:
    stand_in = await start_stand_in(busctl)
    settings = LocalSettings(await connect())
    first, second = uid(), uid()
    try:
        await settings.start()
        one = await settings.reserve_device_instance(first, "battery", 512)
        two = await settings.reserve_device_instance(second, "battery", 512)
        assert one == 512 and two != one
        assert await get(busctl, device_instance_path(first)) == f"battery:{one}"
        assert await get(busctl, device_instance_path(second)) == f"battery:{two}"
        assert await settings.reserve_device_instance(first, "battery", 512) == one  # stable
    finally:
        await settings.stop()
        settings.bus.disconnect()
        await stop_stand_in(busctl, stand_in)


async def test_client_set_and_watch(busctl: Any) -> None:
    stand_in = await start_stand_in(busctl)
    settings = LocalSettings(await connect())
    path = f"/Settings/T{uid()}/MaxCurrent"
    seen: list[tuple[str, Any]] = []
    try:
        await settings.start()
        await settings.add(Setting(path, 50, 1, 500))
        settings.watch(path, lambda p, v: seen.append((p, v)))
        assert await settings.set(path, 120) is True
        assert await get(busctl, path) == 120
        assert seen == [(path, 120)]

        assert await set_(busctl, SETTINGS_SERVICE, path, "i", "200") == 0  # another client
        await eventually(lambda: seen[-1] == (path, 200), timeout=5)
        assert settings.get(path) == 200

        assert await settings.set(path, 9999) is False  # refused: the stored value comes back
        assert await get(busctl, path) == 200
        assert settings.get(path) == 200
    finally:
        await settings.stop()
        settings.bus.disconnect()
        await stop_stand_in(busctl, stand_in)


async def test_bind_custom_name_persists(busctl: Any, tmp_path: Path) -> None:
    store = tmp_path / "settings.json"
    stand_in = await start_stand_in(busctl, store)
    setting = f"/Settings/Devices/{uid()}/CustomName"
    name = f"com.victronenergy.battery.bind{uid()}"

    async def publish() -> tuple[LocalSettings, VeService]:
        settings = LocalSettings(await connect())
        await settings.start()
        await settings.add(Setting(setting, ""))
        service = VeService(await connect(), name)
        settings.bind(service, "/CustomName", setting)
        await service.register()
        return settings, service

    settings, service = await publish()
    try:
        assert await set_(busctl, name, "/CustomName", "s", "House bank") == 0
        await eventually(lambda: _eq(get(busctl, setting), "House bank"), timeout=5)
        assert json.loads(store.read_text())[setting] == "House bank"
        # A number typed into the text field (dbus-spy sends it as int32) is that text, as localsettings takes it.
        assert await set_(busctl, name, "/CustomName", "i", "5") == 0
        await eventually(lambda: _eq(get(busctl, setting), "5"), timeout=5)

        assert await set_(busctl, name, "/CustomName", "b", "true") == 1  # a boolean is no text

        # a change in the settings reaches the service path
        assert await set_(busctl, SETTINGS_SERVICE, setting, "s", "Shed") == 0
        await eventually(lambda: _eq(busctl.acall_json(name, "/CustomName", "GetValue"),
                                     {"type": "v", "data": [{"type": "s", "data": "Shed"}]}), timeout=5)
        assert await set_(busctl, name, "/CustomName", "s", "House bank") == 0
        await eventually(lambda: _eq(get(busctl, setting), "House bank"), timeout=5)

        # the client and the service go away and come back; so does the stand-in (from its store)
        await settings.stop()
        settings.bus.disconnect()
        service.close()
        await eventually(lambda: _not(name_has_owner(busctl, name)), timeout=10)
        await stop_stand_in(busctl, stand_in)
        stand_in = await start_stand_in(busctl, store)
        settings, service = await publish()
        assert settings.get(setting) == "House bank"
        reply = await busctl.acall_json(name, "/CustomName", "GetValue")
        assert reply["data"][0] == {"type": "s", "data": "House bank"}
    finally:
        await settings.stop()
        settings.bus.disconnect()
        service.close()
        await stop_stand_in(busctl, stand_in)


async def _eq(awaitable: Any, wanted: Any) -> bool:
    return await awaitable == wanted


async def test_settings_absent_then_present_then_gone(busctl: Any, tmp_path: Path) -> None:
    await eventually(lambda: _not(name_has_owner(busctl)), timeout=10)
    group = f"/Settings/T{uid()}"
    store = tmp_path / "settings.json"
    store.write_text(json.dumps({f"{group}/Capacity": 300.0}))
    settings = LocalSettings(await connect(), timeout=2)
    seen: list[tuple[str, Any]] = []
    stand_in = None
    try:
        await settings.start()  # nothing raises
        assert settings.available is False
        values = await settings.add(Setting(f"{group}/Capacity", 100.0), Setting(f"{group}/Mode", 1))
        assert values == {f"{group}/Capacity": 100.0, f"{group}/Mode": 1}
        instance = await settings.reserve_device_instance(uid(), "battery", 7)
        assert instance == 7
        settings.watch(f"{group}/Capacity", lambda p, v: seen.append((p, v)))
        assert await settings.set(f"{group}/Mode", 2) is False  # kept locally only
        assert settings.get(f"{group}/Mode") == 2

        stand_in = await start_stand_in(busctl, store)
        await eventually(lambda: seen == [(f"{group}/Capacity", 300.0)], timeout=10)
        assert settings.available
        assert settings.get(f"{group}/Capacity") == 300.0
        assert await get(busctl, f"{group}/Capacity") == 300.0  # the client re-added its settings
        assert await get(busctl, f"{group}/Mode") == 1  # re-added with its default
        assert settings.get(f"{group}/Mode") == 1

        await stop_stand_in(busctl, stand_in)
        stand_in = None
        await eventually(lambda: not settings.available, timeout=5)
        assert settings.get(f"{group}/Capacity") == 300.0  # the last values stay
        values = await settings.add(Setting(f"{group}/Capacity", 100.0))
        assert values == {f"{group}/Capacity": 300.0}
        assert await settings.set(f"{group}/Capacity", 310.0) is False
        assert settings.get(f"{group}/Capacity") == 310.0
    finally:
        await settings.stop()
        settings.bus.disconnect()
        if stand_in is not None:
            await stop_stand_in(busctl, stand_in)
