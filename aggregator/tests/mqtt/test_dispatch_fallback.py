"""What a dispatcher that dies leaves behind, and who may command it.

The dispatcher runs as its own process and is killed with SIGKILL (no clean-up of any kind); the batteries are
simulated devices in other processes (D-Bus) or MQTT clients, and the tests read what the devices themselves
hold: a device with a setpoint watchdog falls back to 0 within its timeout (the dispatcher's heartbeat keeps it
alive until then), an MQTT device gets setpoint 0 from the broker (the dispatcher's last will). And an anonymous
client's TargetPower is not taken unless it was allowed."""
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

import aiomqtt
import pytest

from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.bus.service import VeService
from aggregator.features.dispatcher.runtime import DispatcherRuntime
from aggregator.features.dispatcher.settings import parse_dispatcher_config
from aggregator_dev.mqttbroker import MosquittoBroker, find_mosquitto
from aggregator_dev.simulator.controllable import ControllableBattery, ControllableOnBus, ControllableParams, run_mqtt

from ..conftest import REPO
from ..helpers import eventually
from ..bus.test_dispatch_bus import Sims

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

ACSYSTEM = "com.victronenergy.acsystem.fallback_a"
BATTERY = "com.victronenergy.battery.fallback_a"
SERVICE = "org.batteryaggregator.dispatcher_fallback"
TIMEOUT_S = 2.0


class Dispatcher:
    """`python -m aggregator.dispatch.runtime` as a process of its own."""

    def __init__(self, config: dict[str, Any], tmp: Path, bus_address: str) -> None:
        self.path = tmp / "dispatcher.json"
        self.path.write_text(json.dumps({"dispatcher": config}))
        self.log = tmp / "dispatcher.log"
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus_address, PYTHONUNBUFFERED="1")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "aggregator.features.dispatcher.runtime", "--config",
                                          str(self.path)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def acsystem(private_bus: Any, tmp_path: Path) -> Iterator[Sims]:
    """A Multi RS system as Victron's services publish it, whose setpoint expires after TIMEOUT_S."""
    sims = Sims(private_bus.address, tmp_path)
    sims.start("fallback_a", "--layout", "acsystem", "--max-discharge", "3000", "--capacity", "5000",
               "--setpoint-timeout", str(TIMEOUT_S), "--lag", "0.3")  # a quick inverter: less to wait for
    try:
        yield sims
    finally:
        sims.stop_all()


async def _get(service: str, path: str) -> Any:
    bus = await connect()
    try:
        return await client.get_value(bus, service, path, timeout=2.0)
    finally:
        bus.disconnect()


async def _wait_registered(service: str, path: str, timeout: float = 20) -> None:
    async def there() -> bool:
        try:
            await _get(service, path)
        except client.CallError:
            return False
        return True

    await eventually(there, timeout=timeout, interval=0.2)


def _acsystem_battery(**extra: Any) -> dict[str, Any]:
    return {
        "name": "RS",
        # ESS mode 3 on a Multi RS system: the DC-side setpoint, + charges the battery
        "setpoint": {"dbus": {"service": ACSYSTEM, "path": "/Ess/InverterPowerSetpoint"}},
        "measured": {"dbus": {"service": BATTERY, "path": "/Dc/0/Power"}},
        "soc": {"dbus": {"service": BATTERY, "path": "/Soc"}},
        "capacityWh": 5000, "maxChargeW": 3000, "maxDischargeW": 3000, **extra,
    }


async def test_a_killed_dispatcher_leaves_the_device_to_its_watchdog(acsystem: Sims, tmp_path: Path,
                                                                     bus_address: str) -> None:
    await _wait_registered(ACSYSTEM, "/Ess/InverterPowerSetpoint")
    await _wait_registered(BATTERY, "/Dc/0/Power")
    config = {"enabled": True, "serviceName": SERVICE, "cycleSeconds": 0.25, "staleAfterS": 1.5, "readRefreshS": 0.4,
              "maxStepWPerS": 4000, "setpointKeepAliveS": 30,
              "batteries": [_acsystem_battery(setpointTimeoutS=TIMEOUT_S)]}
    dispatcher = Dispatcher(config, tmp_path, bus_address)
    try:
        await _wait_registered(SERVICE, "/Dispatcher/TargetPower")
        bus = await connect()
        try:
            async def target_taken() -> bool:
                return await client.set_value(bus, SERVICE, "/Dispatcher/TargetPower", -800.0) == 0

            await eventually(target_taken, timeout=10, interval=0.2)  # (once the first cycle read the limits)
        finally:
            bus.disconnect()

        async def discharging() -> bool:
            setpoint = await _get(ACSYSTEM, "/Ess/InverterPowerSetpoint")
            power = await _get(BATTERY, "/Dc/0/Power")
            assert isinstance(setpoint, (int, float)) and setpoint < -700, (setpoint, power)
            assert power < -600, (setpoint, power)
            return True

        await eventually(discharging, timeout=20, interval=0.25)
        # The setpoint no longer changes, yet for longer than the device's timeout it keeps it: the heartbeat.
        # (Without one it would fall back at most TIMEOUT_S after the last change, before this window ends.)
        deadline = time.monotonic() + 1.5 * TIMEOUT_S
        while time.monotonic() < deadline:
            assert await _get(ACSYSTEM, "/Ess/InverterPowerSetpoint") < -700, dispatcher.output()[-2000:]
            await asyncio.sleep(0.2)

        dispatcher.kill9()
        killed = time.monotonic()

        async def fell_back() -> bool:
            setpoint = await _get(ACSYSTEM, "/Ess/InverterPowerSetpoint")
            assert setpoint == 0, setpoint
            return True

        await eventually(fell_back, timeout=TIMEOUT_S + 2.0, interval=0.1)
        assert time.monotonic() - killed <= TIMEOUT_S + 1.0

        async def idle() -> bool:
            power = await _get(BATTERY, "/Dc/0/Power")
            assert abs(power) < 30, power
            return True

        await eventually(idle, timeout=6, interval=0.2)
    finally:
        dispatcher.close()


# ---- MQTT ------------------------------------------------------------------------------------------------------

USERS = {"dispatcher": "dispatcher-secret", "device": "device-secret", "watcher": "watcher-secret"}
PREFIX = "battery-aggregator/dispatcher"


def _mqtt_battery() -> dict[str, Any]:
    return {"name": "Shed", "setpoint": {"mqtt": {"topic": "sim/shed/setpoint", "jsonKey": "setpoint"}},
            "measured": {"mqtt": {"topic": "sim/shed/state", "jsonKey": "power"}},
            "capacityWh": 5000, "maxChargeW": 2000, "maxDischargeW": 2000}


async def _device(port: int, stop: asyncio.Event, **login: Any) -> tuple[ControllableOnBus, list[asyncio.Task[None]]]:
    """An MQTT-only battery without a watchdog of its own: only the broker can stop it."""
    sim = ControllableOnBus(ControllableBattery(ControllableParams(lag_s=0.3)), "unused.shed", rate_hz=10)
    loop = asyncio.get_running_loop()
    return sim, [loop.create_task(sim.run(stop)),
                 loop.create_task(run_mqtt(sim, "127.0.0.1", port, "sim/shed/setpoint", "sim/shed/state", stop,
                                           login.get("username"), login.get("password")))]


@needs_mosquitto
async def test_a_killed_dispatcher_leaves_a_last_will_of_zero(tmp_path: Path, bus_address: str) -> None:
    with MosquittoBroker(users=USERS) as broker:
        stop = asyncio.Event()
        sim, tasks = await _device(broker.port, stop, username="device", password=USERS["device"])
        seen: list[tuple[bytes, bool]] = []

        async def watch() -> None:
            async with aiomqtt.Client("127.0.0.1", broker.port, username="watcher",
                                      password=USERS["watcher"]) as c:
                await c.subscribe("sim/shed/setpoint", qos=1)
                async for message in c.messages:
                    seen.append((bytes(message.payload), bool(message.retain)))

        tasks.append(asyncio.get_running_loop().create_task(watch()))
        config = {"enabled": True, "serviceName": SERVICE + "_mqtt", "cycleSeconds": 0.25, "staleAfterS": 1.5,
                  "maxStepWPerS": 4000, "batteries": [_mqtt_battery()],
                  "mqtt": {"host": "127.0.0.1", "port": broker.port, "username": "dispatcher",
                           "password": USERS["dispatcher"]}}
        dispatcher = Dispatcher(config, tmp_path, bus_address)
        try:
            async with aiomqtt.Client("127.0.0.1", broker.port, username="watcher", password=USERS["watcher"]) as c:
                async def commanded() -> bool:
                    await c.publish(f"{PREFIX}/target_power/set", "-900", qos=1)
                    await asyncio.sleep(0.5)
                    return sim.battery.setpoint_w < -800

                await eventually(commanded, timeout=20, interval=0.1)
            await eventually(lambda: sim.battery.measured_w < -700, timeout=10)
            dispatcher.kill9()
            # The broker notices the dead connection at once (the socket closes) and publishes the will.
            await eventually(lambda: sim.battery.setpoint_w == 0.0, timeout=5)
            await eventually(lambda: abs(sim.battery.measured_w) < 30, timeout=5)
            assert seen[-1] == (b'{"setpoint": 0}', False), seen[-3:]  # the device's own format, not retained
        finally:
            dispatcher.close()
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Not retained: a device that subscribes later gets no stale 0 (nor any old command).
        async with aiomqtt.Client("127.0.0.1", broker.port, username="watcher", password=USERS["watcher"]) as c:
            await c.subscribe("sim/shed/setpoint", qos=1)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(anext(aiter(c.messages)), 1.0)


# ---- who may command ---------------------------------------------------------------------------------------------

async def _runtime(config: dict[str, Any]) -> tuple[DispatcherRuntime, VeService]:
    cfg = parse_dispatcher_config(config)
    service = VeService(await connect(), cfg.serviceName)
    runtime = DispatcherRuntime(cfg, service)
    assert runtime.mqtt is not None
    runtime.mqtt.initial_backoff_s = 0.2
    await service.register()
    await runtime.start()
    return runtime, service


@needs_mosquitto
@pytest.mark.parametrize("accept, taken", [(None, False), ("loopback", True)])
async def test_an_anonymous_target_is_refused_unless_allowed(bus_address: str, accept: str | None,
                                                             taken: bool) -> None:
    # The case: a broker that lets anyone in, and a dispatcher configured without credentials.
    with MosquittoBroker() as broker:
        mqtt: dict[str, Any] = {"host": "127.0.0.1", "port": broker.port, "homeAssistant": True}
        if accept is not None:
            mqtt["acceptCommands"] = accept
        config = {"enabled": True, "serviceName": SERVICE + "_anon", "cycleSeconds": 0.25, "mqtt": mqtt,
                  "batteries": [_mqtt_battery()]}
        runtime, service = await _runtime(config)
        try:
            assert runtime.mqtt is not None
            await asyncio.wait_for(runtime.mqtt.connected.wait(), 10)
            configs: dict[str, bytes] = {}
            async with aiomqtt.Client("127.0.0.1", broker.port) as anonymous:
                await anonymous.subscribe("homeassistant/#")
                await anonymous.publish(f"{PREFIX}/target_power/set", "-1900", qos=1)
                await anonymous.publish(f"{PREFIX}/enabled/set", "OFF", qos=1)
                # A sentinel after the commands, from the same client: once the dispatcher has read it, it has
                # read the commands too (the broker keeps one client's messages in order).
                await anonymous.publish("sim/shed/state", json.dumps({"power": 123.0}), qos=1)
                try:
                    async with asyncio.timeout(1.5):
                        async for message in anonymous.messages:
                            configs[message.topic.value] = bytes(message.payload)
                except TimeoutError:
                    pass
            await eventually(lambda: runtime.batteries[0].measured.value is not None, timeout=5)
            if taken:
                await eventually(lambda: service["/Dispatcher/TargetPower"] == -1900.0, timeout=5)
                assert service["/Dispatcher/Enabled"] == 0
                assert "homeassistant/number/battery_dispatcher/target_power/config" in configs
            else:
                assert service["/Dispatcher/TargetPower"] == 0.0
                assert service["/Dispatcher/Enabled"] == 1
                # no controls offered in Home Assistant either, only the sensors
                assert configs and not any("/number/" in t or "/switch/" in t for t in configs), sorted(configs)
        finally:
            await runtime.stop()
            service.close()
