"""The dispatcher on a private bus: D-Bus adapters against simulated controllable batteries (separate processes,
so one can be frozen with SIGSTOP like a hung driver), read back with busctl."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.bus.service import VeService
from aggregator.features.dispatcher.runtime import DispatcherRuntime
from aggregator.features.dispatcher.settings import parse_dispatcher_config

from ..conftest import REPO, Busctl
from ..helpers import eventually

# The generic layout: one service with /Setpoint and /Dc/0/Power, under a name that is not Victron's (those paths
# are not what com.victronenergy.acsystem publishes; test_dispatch_fallback uses the real ones).
SIM_A = "com.batteryaggregator.controllable.dispatch_a"
SIM_B = "com.batteryaggregator.controllable.dispatch_b"
BUSITEM = "com.victronenergy.BusItem"


def _battery(name: str, service: str, sign: int, max_discharge_w: float) -> dict[str, Any]:
    return {
        "name": name,
        "setpoint": {"dbus": {"service": service, "path": "/Setpoint"}},
        "measured": {"dbus": {"service": service, "path": "/Dc/0/Power"}},
        "soc": {"dbus": {"service": service, "path": "/Soc"}},
        "capacity": {"dbus": {"service": service, "path": "/CapacityWh"}},
        "maxChargeW": 2000,
        "maxDischargeW": max_discharge_w,
        "setpointSign": sign,
        "measuredSign": sign,
    }


def _config(**overrides: Any) -> dict[str, Any]:
    config = {
        "enabled": True,
        "serviceName": "org.batteryaggregator.dispatcher",
        "cycleSeconds": 0.25,
        "staleAfterS": 1.5,
        "readRefreshS": 0.4,
        "minCommandW": 20,
        "maxStepWPerS": 4000,
        "batteries": [
            # A believes it can give 1000 W but the device stops at 300 W (hidden from the config).
            _battery("Pack A", SIM_A, 1, 1000),
            # B's device counts the other way round: + means discharging, on both paths.
            _battery("Pack B", SIM_B, -1, 2000),
        ],
    }
    config.update(overrides)
    return config


class Sims:
    """Simulated controllable batteries as processes on the private bus."""

    def __init__(self, address: str, tmp: Path) -> None:
        self.address = address
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.address, PYTHONUNBUFFERED="1")
        log = open(self.tmp / f"sim_{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "aggregator_dev.simulator.controllable", "--name", name,
                                 "--layout", "generic", "--rate", "10", "--lag", "1.0", *args],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def sims(private_bus: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    sims = Sims(private_bus.address, tmp_path_factory.mktemp("dispatch_sims"))
    quick = ("--lag", "0.4")  # devices that follow their setpoint within a second or two: less to wait for
    sims.start("dispatch_a", "--gain", "1.0", "--max-discharge", "300", "--capacity", "5000", *quick)
    sims.start("dispatch_b", "--gain", "1.0", "--max-discharge", "3000", "--capacity", "10000",
               "--setpoint-sign", "-1", "--measured-sign", "-1", "--device-instance", "41", *quick)
    try:
        yield sims
    finally:
        sims.stop_all()


async def _wait_for_sims(busctl: Busctl) -> None:
    async def there() -> bool:
        names = (await busctl.arun("list", "--no-pager", "--acquired", check=False)).stdout
        return SIM_A in names and SIM_B in names

    await eventually(there, timeout=20, interval=0.2)


def _value(busctl: Busctl, service: str, path: str) -> Any:
    reply = busctl.call_json(service, path, "GetValue")
    variant = reply["data"][0]
    return variant["data"] if variant["type"] != "ai" else None


async def _avalue(busctl: Busctl, service: str, path: str) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, _value, busctl, service, path)


async def _set(busctl: Busctl, service: str, path: str, signature: str, value: str) -> int:
    # "--" so a negative number is not taken for an option
    out = await busctl.arun("--json=short", "call", "--", service, path, BUSITEM, "SetValue", "v", signature, value)
    return int(json.loads(out.stdout)["data"][0])


async def _runtime(config: dict[str, Any]) -> tuple[DispatcherRuntime, VeService]:
    cfg = parse_dispatcher_config(config)
    bus = await connect()
    service = VeService(bus, cfg.serviceName)
    runtime = DispatcherRuntime(cfg, service)
    await service.register()
    await runtime.start()
    return runtime, service


async def _close(runtime: DispatcherRuntime, service: VeService) -> None:
    await runtime.stop()
    service.close()


DISPATCHER = "org.batteryaggregator.dispatcher"


async def test_target_split_learned_cap_stale_battery_and_disable(sims: Sims, busctl: Busctl) -> None:
    await _wait_for_sims(busctl)
    runtime, service = await _runtime(_config())
    try:
        # the fleet's limits are known once the first cycle ran: -(1000+2000) .. 4000
        await eventually(lambda: runtime.cycles > 0 and runtime.fleet_range() == (-3000.0, 4000.0))
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "d", "-1000") == 0

        # The user's example: A stops at 300 W, B delivers the rest; the total reaches the target.
        async def split() -> bool:
            achieved = await _avalue(busctl, DISPATCHER, "/Dispatcher/AchievedPower")
            a = await _avalue(busctl, DISPATCHER, "/Dispatcher/Batteries/0/Measured")
            b = await _avalue(busctl, DISPATCHER, "/Dispatcher/Batteries/1/Measured")
            assert achieved is not None and a is not None and b is not None, (achieved, a, b)
            assert abs(achieved + 1000) < 60 and abs(a + 300) < 30 and abs(b + 700) < 70, (achieved, a, b)
            return True

        await eventually(split, timeout=25, interval=0.5)
        assert await _avalue(busctl, DISPATCHER, "/Dispatcher/Batteries/0/Name") == "Pack A"
        assert await _avalue(busctl, DISPATCHER, "/Dispatcher/Mode") == "target"
        assert await _avalue(busctl, DISPATCHER, "/Dispatcher/TargetPower") == -1000.0
        # B's device got its setpoint in its own sign: + means discharge there.
        assert await _avalue(busctl, SIM_B, "/Setpoint") > 600
        assert await _avalue(busctl, SIM_B, "/Dc/0/Power") > 600

        # B hangs (no signals, no answers): it goes stale, gets 0, and A is asked for what it can give.
        sims.procs["dispatch_b"].send_signal(signal.SIGSTOP)
        try:
            await eventually(lambda: service["/Dispatcher/Batteries/1/Status"] == "stale", timeout=8)
            assert await _avalue(busctl, DISPATCHER, "/Dispatcher/Batteries/1/Setpoint") == 0.0
            assert await _avalue(busctl, DISPATCHER, "/Dispatcher/Batteries/1/Status") == "stale"
        finally:
            sims.procs["dispatch_b"].send_signal(signal.SIGCONT)
        await eventually(lambda: service["/Dispatcher/Batteries/1/Status"] != "stale"
                         and service["/Dispatcher/Batteries/1/Setpoint"] < -100, timeout=10)

        # Disabling writes 0 to every device once; the devices follow.
        assert await _set(busctl, DISPATCHER, "/Dispatcher/Enabled", "i", "0") == 0

        async def zeroed() -> bool:
            return (await _avalue(busctl, SIM_A, "/Setpoint") == 0 and await _avalue(busctl, SIM_B, "/Setpoint") == 0
                    and await _avalue(busctl, DISPATCHER, "/Dispatcher/Status") == "disabled")

        await eventually(zeroed, timeout=5, interval=0.2)
        await eventually(lambda: abs(service["/Dispatcher/AchievedPower"] or 0) < 30, timeout=5)
        # ... and nothing is written while disabled: a value set by someone else stays.
        bus = await connect()
        assert await client.set_value(bus, SIM_A, "/Setpoint", 123.0) == 0
        cycles = runtime.cycles
        await eventually(lambda: runtime.cycles >= cycles + 2, timeout=10)  # a whole cycle ran since
        assert await client.get_value(bus, SIM_A, "/Setpoint") == 123.0
        assert await client.set_value(bus, SIM_A, "/Setpoint", 0.0) == 0
        bus.disconnect()
    finally:
        await _close(runtime, service)


async def test_bad_target_writes_are_refused(sims: Sims, busctl: Busctl) -> None:
    await _wait_for_sims(busctl)
    runtime, service = await _runtime(_config(enabled=False))
    try:
        await eventually(lambda: runtime.fleet_range() == (-3000.0, 4000.0))
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "s", "lots") == 1  # wrong type
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "b", "true") == 1
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "d", "-3500") == 2  # beyond the fleet
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "d", "4000.5") == 2
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "d", "nan") == 2
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "ai", "0") == 2  # invalid
        assert await _set(busctl, DISPATCHER, "/Dispatcher/Enabled", "i", "2") == 2
        assert await _avalue(busctl, DISPATCHER, "/Dispatcher/TargetPower") == 0.0
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "i", "-3000") == 0  # ints are watts too
        assert await _avalue(busctl, DISPATCHER, "/Dispatcher/TargetPower") == -3000.0
        assert runtime.target_w == -3000.0
        # disabled: nothing is written to the devices
        assert await _avalue(busctl, DISPATCHER, "/Dispatcher/Status") == "disabled"
        text = (await busctl.acall_json(DISPATCHER, "/Dispatcher/TargetPower", "GetText"))["data"][0]
        assert text == "-3000W"
    finally:
        await _close(runtime, service)
    assert runtime._task is None  # stopped cleanly


async def test_grid_zero_follows_the_meter(sims: Sims, busctl: Busctl) -> None:
    await _wait_for_sims(busctl)
    bus = await connect()
    meter = VeService(bus, "com.victronenergy.grid.dispatch_test")
    meter.add_path("/Ac/Power", 400.0)  # importing 400 W
    await meter.register()
    runtime, service = await _runtime(_config(mode="gridZero", gridMeter="com.victronenergy.grid.dispatch_test",
                                              gridDeadbandW=10))
    try:
        # The batteries take over the import: they discharge about 400 W in total.
        await eventually(lambda: (service["/Dispatcher/TargetPower"] or 0) < -300, timeout=10)
        assert await _set(busctl, DISPATCHER, "/Dispatcher/TargetPower", "d", "-100") == 2  # computed, not written
        meter["/Ac/Power"] = None  # the meter loses its value: stop rather than guess
        await eventually(lambda: service["/Dispatcher/TargetPower"] == 0.0
                         and "grid meter unavailable" in service["/Dispatcher/Status"], timeout=10)
    finally:
        await _close(runtime, service)
        meter.close()


def test_runtime_runs_alone_and_refuses_a_bad_config(tmp_path: Path, bus_address: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dispatcher": {"enabled": True, "cycleSeconds": 0}}))
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus_address)
    result = subprocess.run([sys.executable, "-m", "aggregator.features.dispatcher.runtime", "--config", str(bad)],
                            cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cycleSeconds" in result.stderr and "0.1" in result.stderr

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"dispatcher": _config(enabled=False, serviceName="org.batteryaggregator.dispatcher2")}))
    proc = subprocess.Popen([sys.executable, "-m", "aggregator.features.dispatcher.runtime", "--config", str(good)],
                            cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        busctl = Busctl(bus_address)
        for _ in range(100):
            names = busctl.run("list", "--no-pager", "--acquired", check=False).stdout
            if "org.batteryaggregator.dispatcher2" in names:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the dispatcher did not register")
        assert _value(busctl, "org.batteryaggregator.dispatcher2", "/Dispatcher/Enabled") == 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out


class Device:
    """A controllable battery in the test (the generic layout) that records every call it gets: (member, path,
    loop time). Its values change only when the test sets them, like a Victron service."""

    NAME = "com.batteryaggregator.controllable.dispatch_calls"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    async def start(self) -> None:
        bus = await connect()
        bus.add_message_handler(self._seen)  # before the service's own handler, which answers
        self.service = VeService(bus, self.NAME)
        self.service.add_path("/Setpoint", 0.0, writeable=True, value_types=(int, float))
        for path, value in (("/Dc/0/Power", 0.0), ("/Soc", 50.0), ("/CapacityWh", 5000.0)):
            self.service.add_path(path, value)
        await self.service.register()

    def _seen(self, msg: Any) -> None:
        if msg.member in ("GetValue", "SetValue"):
            self.calls.append((msg.member, msg.path, asyncio.get_running_loop().time()))
        return None

    def count(self, member: str, path: str | None = None, since: float = 0.0) -> int:
        return sum(1 for m, p, t in self.calls if m == member and (path is None or p == path) and t >= since)

    def close(self) -> None:
        self.service.close()


def _device_config(**overrides: Any) -> dict[str, Any]:
    battery = _battery("Pack C", Device.NAME, 1, 2000)
    battery.update(overrides.pop("battery", {}))
    return _config(batteries=[battery], **overrides)


async def _cycles(runtime: DispatcherRuntime, n: int) -> None:
    start = runtime.cycles
    await eventually(lambda: runtime.cycles >= start + n, timeout=10)


async def test_a_quiet_device_is_asked_one_value_per_refresh_and_its_signals_confirm_every_reading(
        bus_address: str) -> None:
    """Victron services signal only changes: a device that is silent is asked for one value every readRefreshS
    (its answer confirms all its readings), and one that signals is not asked at all; its quiet values stay fresh."""
    device = Device()
    await device.start()
    runtime, service = await _runtime(_device_config(enabled=False, serviceName="org.batteryaggregator.dcalls"))
    try:
        battery = runtime.batteries[0]
        await _cycles(runtime, 2)
        # Silent: some 2.5 s, about 6 refresh periods of 0.4 s.
        since = asyncio.get_running_loop().time()
        await _cycles(runtime, 10)
        asked = device.count("GetValue", since=since)
        assert 2 <= asked <= 8, device.calls
        assert device.count("GetValue", "/Soc", since) == device.count("GetValue", "/CapacityWh", since) == 0
        now = runtime.clock()
        assert max(r.age(now) for r in (battery.measured, battery.soc, battery.capacity)) < 1.5  # fresh
        assert service["/Dispatcher/Batteries/0/Status"] != "stale"

        # Signalling (its power moves): nothing is asked, and its quiet SoC and capacity stay confirmed.
        async def moving() -> None:
            watts = 0.0
            while True:
                watts += 1.0
                device.service["/Dc/0/Power"] = watts
                await asyncio.sleep(0.1)

        mover = asyncio.get_running_loop().create_task(moving())
        try:
            await _cycles(runtime, 2)
            since = asyncio.get_running_loop().time()
            await _cycles(runtime, 10)
            assert device.count("GetValue", since=since) == 0, device.calls
            now = runtime.clock()
            assert battery.soc is not None and battery.soc.age(now) < 0.5
            assert battery.soc.value == 50.0
        finally:
            mover.cancel()
    finally:
        await _close(runtime, service)
        device.close()


async def test_an_unchanged_setpoint_is_written_again_before_the_devices_timeout_not_every_cycle(
        bus_address: str) -> None:
    device = Device()
    await device.start()
    # setpointTimeoutS 1.5: written again within a third of it; the cycle is 0.25 s.
    runtime, service = await _runtime(_device_config(serviceName="org.batteryaggregator.dwrites",
                                                     battery={"setpointTimeoutS": 1.5}))
    try:
        await _cycles(runtime, 2)
        since = asyncio.get_running_loop().time()
        await _cycles(runtime, 16)  # some 4 s at target 0: the setpoint stays 0
        writes = [t for m, p, t in device.calls if m == "SetValue" and p == "/Setpoint" and t >= since]
        assert 4 <= len(writes) <= 10, writes  # every 0.5 s or so, not every cycle (16)
        gaps = [b - a for a, b in zip([since, *writes], writes)]
        assert max(gaps) < 1.0, gaps  # well inside the device's 1.5 s
        assert device.service["/Setpoint"] == 0.0
    finally:
        await _close(runtime, service)
        device.close()
