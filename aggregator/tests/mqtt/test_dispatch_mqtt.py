"""The dispatcher over MQTT against a real mosquitto: MQTT adapters, MQTT control, Home Assistant discovery in
the format Home Assistant expects, and a broker restart the runtime lives through."""
from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiomqtt
import pytest

from aggregator.bus.lib import connect
from aggregator.bus.service import VeService
from aggregator.mqtt import hass
from aggregator.features.dispatcher.core.controller import BatteryReading
from aggregator.features.dispatcher.runtime import DispatcherRuntime, fleet_energy_kwh
from aggregator.features.dispatcher.settings import parse_dispatcher_config
from aggregator_dev.mqttbroker import MosquittoBroker, find_mosquitto
from aggregator_dev.simulator.controllable import ControllableBattery, ControllableOnBus, ControllableParams, run_mqtt

from ..helpers import eventually

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

USERS = {"dispatcher": "dispatcher-secret", "device": "device-secret", "watcher": "watcher-secret"}
PREFIX = "battery-aggregator/dispatcher"
CONFIG_TOPIC = re.compile(r"^homeassistant/(number|switch|sensor)/battery_dispatcher/([A-Za-z0-9_-]+)/config$")
NUMBER_TOPIC = "homeassistant/number/battery_dispatcher/target_power/config"
REQUIRED = {  # what Home Assistant needs of each component (discovery through a device needs unique_id)
    "number": {"command_topic", "unique_id", "device", "min", "max"},
    "switch": {"command_topic", "unique_id", "device"},
    "sensor": {"state_topic", "unique_id", "device"},
}


def _battery(name: str) -> dict[str, Any]:
    state = f"sim/{name}/state"
    return {
        "name": name,
        "setpoint": {"mqtt": {"topic": f"sim/{name}/setpoint", "jsonKey": "setpoint"}},
        "measured": {"mqtt": {"topic": state, "jsonKey": "power"}},
        "soc": {"mqtt": {"topic": state, "jsonKey": "soc"}},
        "capacity": {"mqtt": {"topic": state, "jsonKey": "capacity"}},
        "maxChargeW": 2000,
        "maxDischargeW": {"mqtt": {"topic": state, "jsonKey": "maxDischarge"}},
    }


def _config(port: int, **mqtt: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "serviceName": "org.batteryaggregator.dispatcher_mqtt",
        "cycleSeconds": 0.25,
        "staleAfterS": 1.5,
        "minCommandW": 20,
        "maxStepWPerS": 4000,
        "mqtt": {"host": "127.0.0.1", "port": port, "username": "dispatcher", "password": USERS["dispatcher"],
                 "homeAssistant": True, **mqtt},
        "batteries": [_battery("A"), _battery("B")],
    }


class Watcher:
    """An independent MQTT client recording every message (with its retain flag) on the topics it follows."""

    def __init__(self, port: int, topics: list[str], **kwargs: Any) -> None:
        self.port = port
        self.topics = topics
        self.kwargs = kwargs
        self.messages: dict[str, tuple[bytes, bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, username="watcher", password=USERS["watcher"],
                                  **self.kwargs) as client:
            for topic in self.topics:
                await client.subscribe(topic)
            self.ready.set()
            async for message in client.messages:
                self.messages[message.topic.value] = (bytes(message.payload), bool(message.retain))

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.wait_for(self.ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def text(self, topic: str) -> str | None:
        entry = self.messages.get(topic)
        return None if entry is None else entry[0].decode()

    def number(self, topic: str) -> float | None:
        text = self.text(topic)
        try:
            return None if text in (None, "") else float(text)  # type: ignore[arg-type]
        except ValueError:
            return None


async def _devices(port: int, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """Two MQTT-only simulated batteries: A stops at 300 W discharge, B does what it is told."""
    tasks = []
    for name, max_discharge in (("A", 300.0), ("B", 3000.0)):
        sim = ControllableOnBus(ControllableBattery(ControllableParams(lag_s=0.5, max_discharge_w=max_discharge)),
                                f"unused.{name}", rate_hz=10)
        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(sim.run(stop)))
        tasks.append(loop.create_task(run_mqtt(sim, "127.0.0.1", port, f"sim/{name}/setpoint", f"sim/{name}/state",
                                               stop, "device", USERS["device"])))
    return tasks


async def _runtime(config: dict[str, Any]) -> tuple[DispatcherRuntime, VeService]:
    cfg = parse_dispatcher_config(config)
    bus = await connect()
    service = VeService(bus, cfg.serviceName)
    runtime = DispatcherRuntime(cfg, service)
    assert runtime.mqtt is not None
    runtime.mqtt.initial_backoff_s = 0.2
    runtime.mqtt.max_backoff_s = 0.5
    await service.register()
    await runtime.start()
    return runtime, service


@pytest.fixture
def broker() -> Any:
    with MosquittoBroker(users=USERS) as broker:
        yield broker


async def test_dispatch_over_mqtt_with_discovery_and_a_broker_restart(broker: MosquittoBroker,
                                                                      bus_address: str) -> None:
    stop = asyncio.Event()
    devices = await _devices(broker.port, stop)
    runtime, service = await _runtime(_config(broker.port))
    try:
        async with Watcher(broker.port, ["homeassistant/#", f"{PREFIX}/#"]) as watcher:
            # B's discharge limit comes from its state topic: the fleet range follows (-(300 + 3000)..4000).
            await eventually(lambda: runtime.fleet_range() == (-3300.0, 4000.0), timeout=10)

            # ---- Home Assistant discovery, as Home Assistant reads it
            await eventually(lambda: sum(1 for t in watcher.messages if CONFIG_TOPIC.match(t)) >= 20, timeout=10)
            # the target's range follows the fleet's limits (B's was read after the first discovery)
            await eventually(lambda: json.loads(watcher.text(NUMBER_TOPIC) or "{}").get("min") == -3300.0)
            async with Watcher(broker.port, ["homeassistant/#", f"{PREFIX}/availability"]) as late:
                # a client subscribing now gets them from the broker's store: retained
                await eventually(lambda: len(late.messages) >= 21)
                configs = {t: v for t, v in late.messages.items() if t.startswith("homeassistant/")}
                assert late.messages[f"{PREFIX}/availability"] == (b"online", True)
            unique_ids = set()
            for topic, (payload, retained) in configs.items():
                match = CONFIG_TOPIC.match(topic)
                assert match, topic
                assert retained, f"{topic} is not retained"
                data = json.loads(payload)
                component = match.group(1)
                assert REQUIRED[component] <= set(data), (topic, REQUIRED[component] - set(data))
                assert data["device"]["identifiers"] == ["battery_dispatcher"]
                assert data["availability_topic"] == f"{PREFIX}/availability"
                assert data["unique_id"] == f"battery_dispatcher_{match.group(2)}"
                unique_ids.add(data["unique_id"])
                for key in ("state_topic", "command_topic"):
                    if key in data:
                        assert data[key].startswith(PREFIX + "/") and "+" not in data[key] and "#" not in data[key]
            assert len(unique_ids) == len(configs)
            number = json.loads(configs[NUMBER_TOPIC][0])
            assert (number["min"], number["max"], number["unit_of_measurement"]) == (-3300.0, 4000.0, "W")
            switch = json.loads(configs["homeassistant/switch/battery_dispatcher/enabled/config"][0])
            assert switch["command_topic"] == f"{PREFIX}/enabled/set"
            assert "homeassistant/sensor/battery_dispatcher/b_discharge_limit/config" in configs
            # what Home Assistant users expect of batteries: the combined capacity, the energy stored, each SoC
            for object_id, unit, device_class in (("capacity", "kWh", "energy_storage"),
                                                  ("remaining_energy", "kWh", "energy_storage"),
                                                  ("a_soc", "%", "battery"), ("b_soc", "%", "battery")):
                data = json.loads(configs[f"homeassistant/sensor/battery_dispatcher/{object_id}/config"][0])
                assert (data["unit_of_measurement"], data["device_class"], data["state_class"]) == \
                    (unit, device_class, "measurement"), object_id

            # ---- the target from MQTT; the batteries are read and commanded over MQTT
            await eventually(lambda: watcher.text(f"{PREFIX}/enabled") == "ON")
            async with aiomqtt.Client("127.0.0.1", broker.port, username="watcher", password=USERS["watcher"]) as c:
                await c.publish(f"{PREFIX}/target_power/set", "-99999")  # beyond the fleet: refused
                await c.publish(f"{PREFIX}/target_power/set", "-800")
            await eventually(lambda: service["/Dispatcher/TargetPower"] == -800.0)
            await eventually(lambda: watcher.number(f"{PREFIX}/target_power") == -800.0)

            def delivered() -> bool:
                achieved = watcher.number(f"{PREFIX}/achieved_power")
                a = watcher.number(f"{PREFIX}/batteries/a/measured")
                assert achieved is not None and abs(achieved + 800) < 80, achieved
                assert a is not None and -330 < a < -250, a
                return True

            await eventually(delivered, timeout=25, interval=0.25)

            def stored() -> bool:  # two simulated 5 kWh batteries at about 50 %
                a_soc = watcher.number(f"{PREFIX}/batteries/a/soc")
                soc = watcher.number(f"{PREFIX}/soc")
                remaining = watcher.number(f"{PREFIX}/remaining_energy")
                assert watcher.number(f"{PREFIX}/capacity") == 10.0
                assert a_soc is not None and 45.0 < a_soc <= 50.0, a_soc
                assert soc is not None and remaining is not None and abs(remaining - 10.0 * soc / 100) < 0.05
                return True

            await eventually(stored, timeout=5)
            assert watcher.text(f"{PREFIX}/batteries/b/status") in ("ok", "learning", "limited")

            # ---- the broker restarts: the runtime lives on, the batteries go stale meanwhile, all comes back
            port = broker.port
            broker.stop()
            await eventually(lambda: service["/Dispatcher/Batteries/0/Status"] in ("stale", "unavailable"), timeout=8)
            assert runtime._task is not None and not runtime._task.done()
            assert service["/Dispatcher/Batteries/0/Setpoint"] == 0.0
        connections = runtime.mqtt.connections  # type: ignore[union-attr]
        with MosquittoBroker(users=USERS, port=port):
            async with Watcher(port, ["homeassistant/#", f"{PREFIX}/#"]) as watcher:
                await eventually(lambda: runtime.mqtt.connections > connections, timeout=10)  # type: ignore[union-attr]
                # the new broker knows nothing (no persistence): discovery and states are published again
                await eventually(lambda: "homeassistant/number/battery_dispatcher/target_power/config"
                                 in watcher.messages, timeout=10)
                await eventually(lambda: watcher.text(f"{PREFIX}/availability") == "online")
                await eventually(lambda: service["/Dispatcher/Batteries/0/Status"] not in ("stale", "unavailable")
                                 and (service["/Dispatcher/AchievedPower"] or 0) < -500, timeout=15)
            await runtime.stop()
            stop.set()
    finally:
        stop.set()
        await runtime.stop()
        service.close()
        for task in devices:
            task.cancel()
        await asyncio.gather(*devices, return_exceptions=True)


SWITCH_TOPIC = "homeassistant/switch/battery_dispatcher/enabled/config"


async def _retained(port: int, pattern: str, user: str | None = "watcher") -> dict[str, bytes]:
    """What the broker keeps retained under `pattern`, as a client subscribing now receives it."""
    found: dict[str, bytes] = {}
    password = USERS[user] if user else None
    async with aiomqtt.Client("127.0.0.1", port, username=user, password=password) as client:
        await client.subscribe(pattern)
        try:
            async with asyncio.timeout(1.0):  # retained messages arrive at once; then the broker is quiet
                async for message in client.messages:
                    if message.retain:
                        found[message.topic.value] = bytes(message.payload)
        except TimeoutError:
            pass
    return found


async def test_home_assistant_controls_leave_when_commands_are_turned_off(broker: MosquittoBroker,
                                                                         bus_address: str) -> None:
    async def run(name: str, **mqtt: Any) -> dict[str, bytes]:
        config = _config(broker.port, **mqtt)
        config["serviceName"] = f"org.batteryaggregator.dispatcher_{name}"
        async with Watcher(broker.port, ["homeassistant/#"]) as watcher:
            runtime, service = await _runtime(config)

            def sent(topic: str) -> bool:  # by this run: live, not the retained copy of a previous run's
                return topic in watcher.messages and not watcher.messages[topic][1]

            try:
                # discovery is sent once connected: the controls' config topics get a message either way
                await eventually(lambda: sent(NUMBER_TOPIC) and sent(SWITCH_TOPIC))
            finally:
                await runtime.stop()
                service.close()
        return await _retained(broker.port, "homeassistant/#")

    with_commands = await run("on")
    assert NUMBER_TOPIC in with_commands and SWITCH_TOPIC in with_commands
    # turned off by the config: the controls a previous run left retained on the broker are removed (an empty
    # retained payload deletes them), the sensors stay
    never = await run("never", acceptCommands="never")
    assert NUMBER_TOPIC not in never and SWITCH_TOPIC not in never, sorted(never)
    assert "homeassistant/sensor/battery_dispatcher/soc/config" in never
    # ... and so without credentials (on a broker that lets anyone in)
    with MosquittoBroker() as open_broker:
        async with aiomqtt.Client("127.0.0.1", open_broker.port) as client:
            for topic, payload in with_commands.items():  # what an earlier run with commands left there
                await client.publish(topic, payload, qos=1, retain=True)
        config = _config(open_broker.port)
        del config["mqtt"]["username"], config["mqtt"]["password"]
        config["serviceName"] = "org.batteryaggregator.dispatcher_anonymous"
        runtime, service = await _runtime(config)
        try:
            async def gone() -> bool:
                kept = await _retained(open_broker.port, "homeassistant/#", user=None)
                return NUMBER_TOPIC not in kept and SWITCH_TOPIC not in kept and len(kept) >= 10

            await eventually(gone, timeout=10)
        finally:
            await runtime.stop()
            service.close()
    # commands back: the controls are published again
    back = await run("back")
    assert json.loads(back[NUMBER_TOPIC])["command_topic"] == f"{PREFIX}/target_power/set"
    assert json.loads(back[SWITCH_TOPIC])["command_topic"] == f"{PREFIX}/enabled/set"


async def test_a_hostile_command_is_logged_by_its_beginning_and_size(broker: MosquittoBroker, bus_address: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    config = _config(broker.port)
    config["serviceName"] = "org.batteryaggregator.dispatcher_hostile"
    runtime, service = await _runtime(config)
    try:
        assert runtime.mqtt is not None
        await asyncio.wait_for(runtime.mqtt.connected.wait(), 10)
        huge = "A" * 10240
        with caplog.at_level(logging.WARNING, logger="aggregator.dispatch"):
            async with aiomqtt.Client("127.0.0.1", broker.port, username="watcher", password=USERS["watcher"]) as c:
                await c.publish(f"{PREFIX}/target_power/set", huge, qos=1)
                await c.publish(f"{PREFIX}/enabled/set", "X" * 10240, qos=1)
                await c.publish(f"{PREFIX}/target_power/set", b"\xff\xfe" * 5000, qos=1)

            def logged() -> list[str]:
                lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()
                         or "is not ON or OFF" in r.getMessage()]
                return lines if len(lines) >= 3 else []

            lines = await eventually(logged)
        for line in lines:
            assert len(line) < 300, line[:400]
        assert any("(10240 characters)" in line and "AAAA" in line for line in lines), lines
        assert service["/Dispatcher/TargetPower"] == 0.0 and service["/Dispatcher/Enabled"] == 1
    finally:
        await runtime.stop()
        service.close()


async def test_tls_broker_and_wrong_password(bus_address: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with MosquittoBroker(users=USERS, tls=True) as broker:
        assert broker.tls_files is not None
        runtime, service = await _runtime(_config(broker.port, tls=True, caFile=str(broker.tls_files.ca)))
        try:
            assert runtime.mqtt is not None
            await asyncio.wait_for(runtime.mqtt.connected.wait(), 10)
        finally:
            await runtime.stop()
            service.close()
        # A wrong password: no connection, retries, no crash; the batteries are simply not available.
        config = _config(broker.port, tls=True, caFile=str(broker.tls_files.ca), password="wrong")
        config["serviceName"] = "org.batteryaggregator.dispatcher_mqtt2"
        runtime, service = await _runtime(config)
        try:
            await eventually(lambda: "MQTT: no connection to" in caplog.text, timeout=10)  # refused
            await eventually(lambda: runtime.cycles > 2, timeout=10)  # and it dispatches on
            assert runtime.mqtt is not None and runtime.mqtt.connections == 0
            assert runtime._task is not None and not runtime._task.done()
            assert service["/Dispatcher/Batteries/0/Status"] in ("stale", "unavailable")
        finally:
            await runtime.stop()
            service.close()


def test_discovery_payloads_are_what_home_assistant_reads() -> None:
    ctx = hass.HassContext("homeassistant", "battery_dispatcher", hass.Topics("ba/d"))
    messages = hass.discovery_messages(ctx, ["Pack A", "Pack B"], -3000, 4000)
    topics = [t for t, _ in messages]
    assert len(topics) == len(set(topics))
    for topic, payload in messages:
        match = CONFIG_TOPIC.match(topic)
        assert match, topic
        json.dumps(payload)  # JSON-serialisable
        assert REQUIRED[match.group(1)] <= set(payload)
        assert payload["payload_available"] == "online" and payload["payload_not_available"] == "offline"
        assert payload["origin"]["name"] == "battery-aggregator"
        assert payload["device"]["name"] and payload["device"]["identifiers"] == ["battery_dispatcher"]
    by_topic = dict(messages)
    assert by_topic["homeassistant/sensor/battery_dispatcher/pack_a_setpoint/config"]["state_topic"] == \
        "ba/d/batteries/pack_a/setpoint"
    soc = by_topic["homeassistant/sensor/battery_dispatcher/soc/config"]
    assert (soc["device_class"], soc["unit_of_measurement"], soc["state_class"]) == ("battery", "%", "measurement")
    capacity = by_topic["homeassistant/sensor/battery_dispatcher/capacity/config"]
    assert (capacity["device_class"], capacity["unit_of_measurement"], capacity["state_topic"]) == \
        ("energy_storage", "kWh", "ba/d/capacity")
    assert by_topic["homeassistant/sensor/battery_dispatcher/remaining_energy/config"]["state_topic"] == \
        "ba/d/remaining_energy"
    assert by_topic["homeassistant/sensor/battery_dispatcher/pack_b_soc/config"]["state_topic"] == \
        "ba/d/batteries/pack_b/soc"
    assert hass.removal("homeassistant/sensor/x/y/config") == ("homeassistant/sensor/x/y/config", "")
    assert hass.slug("Pack A/1 #") == "pack_a_1"


def test_fleet_energy_counts_what_is_known_and_never_a_partial_sum() -> None:
    def r(name: str, soc: float | None, capacity: float | None) -> BatteryReading:
        return BatteryReading(name, 0.0, 0.0, soc=soc, capacity_wh=capacity)

    assert fleet_energy_kwh({"a": r("a", 50.0, 5000.0), "b": r("b", 80.0, 10000.0)}) == (15.0, 10.5)
    # a battery without SoC: its capacity counts, the stored energy is unknown (not 2.5 kWh: a false loss)
    assert fleet_energy_kwh({"a": r("a", 50.0, 5000.0), "b": r("b", None, 10000.0)}) == (15.0, None)
    # one without a capacity is in neither
    assert fleet_energy_kwh({"a": r("a", 50.0, 5000.0), "b": r("b", 80.0, None)}) == (5.0, 2.5)
    assert fleet_energy_kwh({"a": r("a", 50.0, None)}) == (None, None)
