"""CoopSite against a real mosquitto: TLS, a password per site and the ACL of setup/coop/acl.example."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import aiomqtt
import pytest

from aggregator.features.coop.core import PeerState, fleet_average, fleet_transfers
from aggregator.features.coop.site import CoopSite
from aggregator.features.coop.settings import BrokerSettings, CoopSettingsError, parse_coop
from aggregator_dev.mqttbroker import MosquittoBroker, find_mosquitto, free_port, make_test_certificates

from ..helpers import coop_states, retained_on

REPO = Path(__file__).resolve().parents[3]
SETUP = REPO / "setup" / "coop"
USERS = {"site-a": "pw-a", "site-b": "pw-b", "site-c": "pw-c", "coop-homeassistant": "pw-ha"}

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker(users=USERS, acl=(SETUP / "acl.example").read_text(), tls=True) as b:
        yield b


def settings_for(broker: MosquittoBroker, site: str, **extra: Any) -> Any:
    assert broker.tls_files is not None
    data = {"enabled": True, "siteId": site, "publishSeconds": 0.5, "peerTimeoutSeconds": 5,
            "broker": {"host": "127.0.0.1", "port": broker.port, "caFile": str(broker.tls_files.ca),
                       "password": USERS[site]}}
    data.update(extra)
    return parse_coop(data)


def state(site: str, level: float, capacity: float = 10.0, production: float = 0.0, consumption: float = 500.0,
          timestamp: float | None = None) -> PeerState:
    return PeerState(site, level, capacity * level / 100, capacity, production, consumption, 0.0,
                     time.time() if timestamp is None else timestamp)


def client(broker: MosquittoBroker, user: str | None, password: str | None = None, **kw: Any) -> aiomqtt.Client:
    assert broker.tls_files is not None
    tls = ssl.create_default_context(cafile=str(broker.tls_files.ca))
    return aiomqtt.Client("127.0.0.1", broker.port, username=user, password=password, tls_context=tls, timeout=5,
                          **kw)


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.05)


async def retained(broker: MosquittoBroker, topic: str, wait: float = 1.0) -> bytes | None:
    """The retained message of `topic` as a fresh subscriber gets it (None if there is none)."""
    async with client(broker, "coop-homeassistant", USERS["coop-homeassistant"]) as c:
        return await retained_on(c, topic, wait)


class Running:
    """CoopSites with their run() tasks, cancelled at the end."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, site: CoopSite) -> CoopSite:
        self.tasks.append(asyncio.create_task(site.run()))
        return site

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.tasks:  # bounded, as CoopRuntime.stop is: a hang here would eat the whole test's time
            await asyncio.wait(self.tasks, timeout=5.0)


async def test_the_fleet_view_is_published_when_it_changes_and_the_state_every_period(broker: MosquittoBroker) -> None:
    """The state goes out every publishSeconds (peers time out without it); the fleet view's retained topics for
    Home Assistant only when their value changes: the broker keeps the last one."""
    running = Running()
    site = running.start(CoopSite(settings_for(broker, "site-b")))
    seen: dict[str, int] = {}
    try:
        async with client(broker, "coop-homeassistant", USERS["coop-homeassistant"]) as watcher:
            await watcher.subscribe("coop/site-b/#")

            async def count() -> None:
                async for message in watcher.messages:
                    topic = str(message.topic)
                    seen[topic] = seen.get(topic, 0) + 1

            counting = asyncio.create_task(count())
            await until(site.connected.is_set, what="connected")
            await site.step(state("site-b", 50.0), 0.0)
            await until(lambda: seen.get("coop/site-b/state", 0) >= 8, what="eight periods of the state")
            counting.cancel()
    finally:
        await running.stop()
    fleet = {topic: n for topic, n in seen.items() if "/fleet/" in topic}
    assert set(fleet) == {f"coop/site-b/fleet/{obj}" for obj in ("peers_online", "average_level", "own_target")}
    assert all(n <= 3 for n in fleet.values()), seen  # the retained one, the first and at most one change


async def test_sites_see_each_other_and_agree_on_the_average(broker: MosquittoBroker) -> None:
    running = Running()
    levels = {"site-a": 20.0, "site-b": 50.0, "site-c": 80.0}
    capacities = {"site-a": 5.0, "site-b": 10.0, "site-c": 20.0}
    sites = {name: running.start(CoopSite(settings_for(broker, name))) for name in levels}
    try:
        for name, site in sites.items():
            await until(site.connected.is_set, what=f"{name} connected")
        own = {name: state(name, levels[name], capacities[name]) for name in levels}
        for name, site in sites.items():
            await site.step(own[name], 0.0)
        for name, site in sites.items():
            await until(lambda s=site: len(s.peers_online()) == 2, what=f"{name} sees both peers")
        expected = fleet_average(own.values(), time.time(), 5)
        assert expected is not None
        averages = [site.fleet().level for site in sites.values()]  # type: ignore[union-attr]
        assert averages == pytest.approx([expected.level] * 3, abs=1e-9)
        assert expected.level == pytest.approx((1 + 5 + 16) / 35 * 100)
        # Everyone computes the same pairing: the transfers cancel out (before each site's own limits).
        views = [fleet_transfers(site.fleet(), site.site_settings) for site in sites.values()]  # type: ignore[arg-type]
        assert views[0] == pytest.approx(views[1]) and views[0] == pytest.approx(views[2])
        assert sum(views[0].values()) == pytest.approx(0.0, abs=1e-6)
        targets = {name: site.target().transfer_w for name, site in sites.items()}
        assert targets["site-a"] > 0 and targets["site-c"] < 0
        # Home Assistant discovery and the fleet view, retained.
        config = json.loads(await retained(broker, "homeassistant/sensor/site-a/coop_average_level/config") or b"{}")
        assert config["unique_id"] == "coop_site-a_average_level" and config["unit_of_measurement"] == "%"
        assert config["state_topic"] == "coop/site-a/fleet/average_level"
        assert config["device"]["identifiers"] == ["coop_site-a"]
        for _ in range(20):  # published with each state: 2 once both peers were in
            if await retained(broker, "coop/site-a/fleet/peers_online") == b"2":
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the fleet view never showed 2 peers")
        # The MQTT curtailment adapter states the command on the site's own topic.
        assert await retained(broker, "coop/site-a/curtail") == b"0"
    finally:
        await running.stop()


WORKER = """
import asyncio, json, sys
from aggregator.features.coop.site import CoopSite
from aggregator.features.coop.settings import parse_coop

async def main():
    site = CoopSite(parse_coop(json.loads(sys.argv[1])))
    task = asyncio.create_task(site.run())
    await site.connected.wait()
    print("ready", flush=True)
    await task

asyncio.run(main())
"""


async def test_last_will_marks_a_killed_site_offline(broker: MosquittoBroker) -> None:
    running = Running()
    watcher = running.start(CoopSite(settings_for(broker, "site-a")))
    data = settings_for(broker, "site-c").model_dump()
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(data)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline), 20)
        assert line.strip() == "ready"
        await until(watcher.connected.is_set)
        await until(lambda: watcher.connects > 0 and "site-c" not in watcher.offline)
        assert await retained(broker, "coop/site-c/status") == b"online"
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: only the broker's last will can tell
        proc.wait(10)
        await until(lambda: "site-c" in watcher.offline, what="the last will")
        assert await retained(broker, "coop/site-c/status") == b"offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await running.stop()


async def test_a_client_without_credentials_cannot_connect_or_publish(broker: MosquittoBroker) -> None:
    for user, password in ((None, None), ("site-a", "wrong"), ("nobody", "pw-a")):
        with pytest.raises(aiomqtt.MqttError):
            async with client(broker, user, password) as c:
                await c.publish("coop/site-a/state", b"{}", qos=1, retain=True)
    # Nor without TLS: the only listener speaks TLS.
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", broker.port, username="site-a", password="pw-a", timeout=3) as c:
            await c.publish("coop/site-a/state", b"{}", qos=1)
    # And without trusting the cooperative's CA: the default trust store does not know it.
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError)):
        async with aiomqtt.Client("127.0.0.1", broker.port, username="site-a", password="pw-a", timeout=3,
                                  tls_context=ssl.create_default_context()) as c:
            await c.publish("coop/site-a/state", b"{}", qos=1)


async def test_a_site_cannot_write_another_sites_topics(broker: MosquittoBroker) -> None:
    running = Running()
    b = running.start(CoopSite(settings_for(broker, "site-b")))
    try:
        await until(b.connected.is_set)
        genuine = state("site-b", 40.0)
        await b.step(genuine, 0.0)
        await until(lambda: b._gate.last == genuine, what="site-b published")
        before = await retained(broker, "coop/site-b/state")
        assert before is not None and json.loads(before)["level"] == 40.0
        await running.stop()  # nothing of site-b's own may overwrite what follows
        forged = json.dumps(dict(genuine.to_wire(), level=99.0, storedKwh=9.9)).encode()
        async with client(broker, "site-a", USERS["site-a"]) as a:
            await a.publish("coop/site-b/state", forged, qos=1, retain=True)
            await a.publish("coop/site-b/status", b"online", qos=1, retain=True)
            await a.publish("homeassistant/sensor/site-b/coop_own_target/config", b"{}", qos=1, retain=True)
            await a.publish("coop/site-a/state", b"", qos=1, retain=True)  # its own topic: allowed
        assert await retained(broker, "coop/site-b/state") == before
        assert await retained(broker, "coop/site-b/status") == b"offline"  # from site-b's own clean stop
        config = await retained(broker, "homeassistant/sensor/site-b/coop_own_target/config")
        assert config is not None and json.loads(config)["unique_id"] == "coop_site-b_own_target"
    finally:
        await running.stop()


async def test_out_of_range_values_are_dropped(broker: MosquittoBroker) -> None:
    running = Running()
    watcher = running.start(CoopSite(settings_for(broker, "site-b")))
    try:
        await until(watcher.connected.is_set)
        await watcher.step(state("site-b", 50.0), 0.0)
        good = state("site-a", 30.0)
        bad = [dict(good.to_wire(), level=250.0), dict(good.to_wire(), capacityKwh=-5.0),
               dict(good.to_wire(), productionW=1e9), dict(good.to_wire(), siteId="site-b"), "not json {"]
        async with client(broker, "site-a", USERS["site-a"]) as a:
            await a.publish("coop/site-a/status", b"online", qos=1, retain=True)
            await a.publish("coop/site-a/state", json.dumps(good.to_wire()), qos=1, retain=True)
            await until(lambda: "site-a" in watcher.peers_online(), what="the good state")
            for payload in bad:
                await a.publish("coop/site-a/state", payload if isinstance(payload, str) else json.dumps(payload),
                                qos=1)
            await until(lambda: watcher.rejected["site-a"] == len(bad), what="every bad state rejected")
        assert watcher.peers["site-a"].to_wire() == good.to_wire()  # the last good state stands
        assert watcher.last_rejection["site-a"] == "not JSON"
        fleet = watcher.fleet()
        assert fleet is not None and fleet.level == pytest.approx((3 + 5) / 20 * 100)
    finally:
        await running.stop()


async def test_reconnects_after_the_broker_restarts(tmp_path: Path) -> None:
    port = free_port()
    acl = (SETUP / "acl.example").read_text()
    first = MosquittoBroker(users=USERS, acl=acl, tls=True, directory=tmp_path / "broker", port=port).start()
    running = Running()
    try:
        site = running.start(CoopSite(settings_for(first, "site-a"), reconnect_min_s=0.1, reconnect_max_s=0.5))
        await until(site.connected.is_set)
        first.stop()
        await until(lambda: not site.connected.is_set(), what="the link lost")
        # The same directory: the new CA replaces the old one in the file the site reads at each attempt.
        second = MosquittoBroker(users=USERS, acl=acl, tls=True, directory=tmp_path / "broker", port=port).start()
        try:
            await until(site.connected.is_set, what="reconnected")
            assert site.connects == 2
        finally:
            await running.stop()
            second.stop()
    finally:
        await running.stop()
        first.stop()


def test_tls_is_on_in_the_examples_and_by_default(tmp_path: Path) -> None:
    conf = (SETUP / "mosquitto.conf.example").read_text()
    lines = [line.split() for line in conf.splitlines() if line.strip() and not line.startswith("#")]
    keys = [line[0] for line in lines]
    assert keys.count("listener") == 1 and "port" not in keys  # one listener only...
    assert {"cafile", "certfile", "keyfile"} <= set(keys)  # ...and it speaks TLS
    assert ["allow_anonymous", "false"] in lines
    assert any(k == "password_file" for k in keys) and any(k == "acl_file" for k in keys)
    acl = (SETUP / "acl.example").read_text()
    assert "pattern write coop/%u/#" in acl
    assert BrokerSettings(host="mqtt.coop.example").tls is True
    readme = (SETUP / "README.md").read_text()
    example = re.search(r"```json\n(.*?)```", readme, re.S)
    assert example is not None
    coop = parse_coop(json.loads(example.group(1))["coop"])
    assert coop.broker is not None and coop.broker.tls and coop.broker.caFile and coop.broker.port == 8883
    with pytest.raises(CoopSettingsError, match="clear text"):
        parse_coop({"enabled": True, "siteId": "x", "broker": {"host": "mqtt.coop.example", "tls": False}})


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


async def test_the_example_broker_config_runs(tmp_path: Path) -> None:
    """setup/coop/mosquitto.conf.example itself, with this run's paths, certificates and port."""
    mosquitto = find_mosquitto()
    assert mosquitto is not None
    tls = make_test_certificates(tmp_path / "tls")
    port = free_port()
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "site-a", "pw-a"], check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text((SETUP / "acl.example").read_text())
    os.chmod(passwd, 0o600)
    os.chmod(acl, 0o600)
    replace = {"/etc/mosquitto/coop.passwd": str(passwd), "/etc/mosquitto/coop.acl": str(acl),
               "/etc/mosquitto/certs/ca.crt": str(tls.ca), "/etc/mosquitto/certs/server.crt": str(tls.cert),
               "/etc/mosquitto/certs/server.key": str(tls.key), "/var/lib/mosquitto/": f"{tmp_path}/",
               "listener 8883": f"listener {port} 127.0.0.1"}
    conf = (SETUP / "mosquitto.conf.example").read_text()
    for old, new in replace.items():
        assert old in conf
        conf = conf.replace(old, new)
    import getpass
    (tmp_path / "mosquitto.conf").write_text(conf + f"\nuser {getpass.getuser()}\n")
    proc = subprocess.Popen([mosquitto, "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        await until(lambda: _listening(port), what="the example broker listening")
        settings = parse_coop({"enabled": True, "siteId": "site-a", "publishSeconds": 1, "broker": {
            "host": "127.0.0.1", "port": port, "caFile": str(tls.ca), "password": "pw-a"}})
        running = Running()
        site = running.start(CoopSite(settings, reconnect_min_s=0.1, reconnect_max_s=0.3))
        try:
            await until(site.connected.is_set, what="connected to the example broker")
        finally:
            await running.stop()
    finally:
        proc.terminate()
        proc.wait(5)


async def test_the_dbus_curtailment_adapter_writes_the_path(bus_address: str) -> None:
    from aggregator.bus.lib import connect
    from aggregator.bus.service import VeService
    from aggregator.features.coop.site import DbusCurtailAdapter

    charger = VeService(await connect(), "com.victronenergy.solarcharger.coop_test")
    charger.add_mandatory_paths(process_name="t", process_version="1", connection="t", device_instance=290,
                                product_id=1, product_name="MPPT")
    charger.add_path("/Mode", 1, writeable=True)
    await charger.register()
    bus = await connect()
    try:
        adapter = DbusCurtailAdapter(bus, "com.victronenergy.solarcharger.coop_test", "/Mode")
        await adapter.apply(True)
        assert charger["/Mode"] == 4
        await adapter.apply(False)
        assert charger["/Mode"] == 1
    finally:
        bus.disconnect()
        charger.close()


async def _clear(broker: MosquittoBroker, site: str) -> None:
    async with client(broker, site, USERS[site]) as c:
        await c.publish(f"coop/{site}/state", b"", qos=1, retain=True)


async def test_deep_or_huge_json_never_stops_a_site(broker: MosquittoBroker) -> None:
    """"[[[[..." deeper than the parser's recursion limit, retained (it would end the MQTT task of every
    site at every connect), is ignored, and the site reads and publishes on."""
    deep_array, deep_object = b"[" * 4000, b'{"a":' * 800  # both within the size bound, both too deep to parse
    async with client(broker, "site-a", USERS["site-a"]) as a:
        await a.publish("coop/site-a/state", deep_array, qos=1, retain=True)
    async with client(broker, "site-c", USERS["site-c"]) as c:
        await c.publish("coop/site-c/state", deep_object, qos=1, retain=True)
    running = Running()
    try:
        for attempt in range(2):  # the retained messages come again at every (re)start: survive them both times
            watcher = running.start(CoopSite(settings_for(broker, "site-b")))
            await until(watcher.connected.is_set, what="site-b connected")
            await until(lambda w=watcher: w.rejected["site-a"] >= 1 and w.rejected["site-c"] >= 1,
                        what="both deep messages rejected")
            assert "nested 4000 deep" in watcher.last_rejection["site-a"]
            assert "nested 800 deep" in watcher.last_rejection["site-c"]
            own = state("site-b", 40.0 + attempt)
            await watcher.step(own, 0.0)
            # It still publishes its own state (as a fresh subscriber reads it)...
            for _ in range(50):
                got = await retained(broker, "coop/site-b/state")
                if got is not None and json.loads(got)["level"] == own.level:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("site-b stopped publishing its state")
            await running.stop()
            running = Running()
        # ...and reads a good peer message after a huge one (bounded before anything parses it).
        watcher = running.start(CoopSite(settings_for(broker, "site-b")))
        await until(watcher.connected.is_set)
        await watcher.step(state("site-b", 50.0), 0.0)
        async with client(broker, "site-a", USERS["site-a"]) as a:
            await a.publish("coop/site-a/state", b"[" * 100_000, qos=1)
            await until(lambda: "bytes, not a state" in watcher.last_rejection.get("site-a", ""), what="too big")
            await a.publish("coop/site-a/status", b"online", qos=1, retain=True)
            await a.publish("coop/site-a/state", json.dumps(state("site-a", 30.0).to_wire()), qos=1)
            await until(lambda: "site-a" in watcher.peers_online(), what="the good state after the bad ones")
        assert watcher.connects == 1 and watcher.connected.is_set()  # one session throughout: nothing died
        assert "site-a" not in watcher.ignored and watcher.ignored["site-c"].startswith("JSON nested")
    finally:
        await running.stop()
        await _clear(broker, "site-a")
        await _clear(broker, "site-c")


@pytest.mark.parametrize("registry", [False, True], ids=["bound", "registry"])
async def test_a_lying_peer_does_not_drain_the_others(broker: MosquittoBroker, registry: bool) -> None:
    """One peer claiming 1000 kWh at 0 % pulled the fleet's average to the floor, and every other
    site delivered to it. Its claim is now refused (beyond the registered capacity, or beyond the bound
    without a registry), and so is a level that jumps; the honest sites balance among themselves."""
    extra: dict[str, Any] = {"curtail": {"adapter": "none"}, "peerTimeoutSeconds": 30}
    if registry:
        extra["peers"] = {"site-a": {"capacityKwh": 10.0}, "site-b": {"capacityKwh": 50.0},
                          "site-c": {"capacityKwh": 50.0}}
    for site in ("site-a", "site-b", "site-c"):  # no retained state of another test: a 20 -> 50 kWh step is refused
        await _clear(broker, site)
    running = Running()
    sites = {name: running.start(CoopSite(settings_for(broker, name, **extra))) for name in ("site-b", "site-c")}
    # Of 50 kWh each: with the liar's 1000 kWh the average was 6 %. Nobody uses power (no drift gates anyone).
    levels = {"site-b": 60.0, "site-c": 70.0}
    try:
        for name, site in sites.items():
            await until(site.connected.is_set, what=f"{name} connected")
            await site.step(state(name, levels[name], capacity=50.0, consumption=0), 0.0)
        async with client(broker, "site-a", USERS["site-a"]) as liar:
            await liar.publish("coop/site-a/status", b"online", qos=1, retain=True)
            # First a plausible state at the fleet's level: believed.
            await liar.publish("coop/site-a/state", json.dumps(state("site-a", 65.0, consumption=0).to_wire()),
                               qos=1)
            for site in sites.values():
                await until(lambda s=site: len(s.peers_online()) == 2, what="all three sites")
            # Then the lie: 1000 kWh, empty.
            lie = state("site-a", 0.0, capacity=1000.0, consumption=0)
            await liar.publish("coop/site-a/state", json.dumps(lie.to_wire()), qos=1, retain=True)
            for site in sites.values():
                await until(lambda s=site: "site-a" in s.ignored, what="the lie refused")
                assert "capacity 1000 kWh beyond" in site.ignored["site-a"]
            # Then an empty battery of the right size: a level that cannot have fallen 65 points in a moment.
            lie = state("site-a", 0.0, consumption=0)
            await liar.publish("coop/site-a/state", json.dumps(lie.to_wire()), qos=1, retain=True)
            for site in sites.values():
                await until(lambda s=site: "level jumped" in s.ignored.get("site-a", ""), what="the jump refused")
        for name, site in sites.items():
            await site.step(state(name, levels[name], capacity=50.0, consumption=0), 0.0)
        transfers = {name: site.target().transfer_w for name, site in sites.items()}
        # The honest sites exchange among themselves: what site-c delivers, site-b takes; nobody feeds site-a.
        assert transfers["site-b"] > 0 and transfers["site-c"] < 0, transfers
        assert transfers["site-b"] + transfers["site-c"] == pytest.approx(0.0, abs=1e-6)
        fleet = sites["site-b"].fleet()
        assert fleet is not None and fleet.level == pytest.approx(65.0, abs=0.01)  # the liar's last believed
    finally:
        await running.stop()
        await _clear(broker, "site-a")


@contextlib.asynccontextmanager
async def _site_b_on_the_bus(broker: MosquittoBroker, busctl: Any, name: str, device_instance: int,
                             battery: dict[str, float], **extra: Any) -> AsyncIterator[Callable[[str], Any]]:
    """site-b's cooperative on a service of our own with these battery values, connected; yields a reader of
    its /Coop/<path> with busctl. site-a's retained state is cleared at the end."""
    from aggregator.bus.lib import connect
    from aggregator.bus.service import VeService
    from aggregator.features.coop.runtime import CoopRuntime

    service = VeService(await connect(), name)
    service.add_mandatory_paths(process_name="t", process_version="1", connection="t",
                                device_instance=device_instance, product_id=1, product_name="Coop test")
    for path, value in battery.items():
        service.add_path(path, value)
    runtime = CoopRuntime(settings_for(broker, "site-b", curtail={"adapter": "none"}, **extra), service, service.bus,
                          cycle_s=0.2)
    await service.register()
    await runtime.start()

    async def read(path: str) -> Any:
        reply = await busctl.acall_json(name, f"/Coop/{path}", "GetValue")
        return reply["data"][0]["data"]

    try:
        await until(runtime.site.connected.is_set, what="connected")
        yield read
    finally:
        await runtime.stop()
        service.close()
        await _clear(broker, "site-a")


@pytest.fixture
def own_broker() -> Iterator[MosquittoBroker]:
    """A broker of the test's own: no state another test of the module retained counts as a peer."""
    with MosquittoBroker(users=USERS, acl=(SETUP / "acl.example").read_text(), tls=True) as b:
        yield b


async def test_dbus_shows_the_lying_peer_ignored_and_no_delivery_to_it(own_broker: MosquittoBroker,
                                                                       busctl: Any) -> None:
    """The whole path on the service: the liar's claim arrives over the broker, and what busctl reads on our
    /Coop/* paths is our own level as the average, no transfer, and the reason the peer does not count."""
    broker = own_broker
    battery = {"/Soc": 60.0, "/InstalledCapacity": 1000.0, "/Dc/0/Voltage": 50.0, "/Dc/0/Power": 0.0}  # 50 kWh
    async with _site_b_on_the_bus(broker, busctl, "com.victronenergy.battery.coop_liar_test", 291, battery) as read:
        async with client(broker, "site-a", USERS["site-a"]) as liar:
            await liar.publish("coop/site-a/status", b"online", qos=1, retain=True)
            deadline = time.monotonic() + 10
            while True:  # the liar keeps its claim fresh, as a real one would
                lie = state("site-a", 0.0, capacity=1000.0)
                await liar.publish("coop/site-a/state", json.dumps(lie.to_wire()), qos=1, retain=True)
                await asyncio.sleep(0.3)
                seen = {path: await read(path) for path in ("Status", "AverageLevel", "Transfer", "PeersOnline")}
                if "ignoring site-a" in seen["Status"]:
                    break
                assert time.monotonic() < deadline, f"/Coop/* never named the liar: {seen}"
        assert "capacity 1000 kWh beyond the bound of 100 kWh" in seen["Status"]
        assert seen["AverageLevel"] == pytest.approx(60.0)  # the liar's 0 % did not pull it down
        assert seen["Transfer"] == 0 and seen["PeersOnline"] == 0  # nothing delivered to it


# --- a site's judgement of its peers, messages handed in as the broker would (a simulated clock) ----------

def _local(hour: int) -> float:
    """A moment today at `hour` local time: a simulated night that stays within one calendar day."""
    return time.mktime(time.localtime()[:3] + (hour, 0, 0, 0, 0, -1))


def _offline_site(site: str, clock: Callable[[], float], **extra: Any) -> CoopSite:
    """A CoopSite that is never connected: the tests hand it the broker's messages with handle()."""
    data = {"enabled": True, "siteId": site, "broker": {"host": "127.0.0.1", "tls": False},
            "curtail": {"adapter": "none"}, "peerTimeoutSeconds": 300}
    return CoopSite(parse_coop(data | extra), clock=clock)


async def test_a_registered_peer_that_always_claims_empty_does_not_drain_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two honest 10 kWh sites at 80 and 70 % on a quiet night, and a registered member that always claims
    0 %: in 6 simulated hours the honest sites went to 10 % each, 13 kWh delivered into it. Its claims must
    add up (its level has to move with the energy it is sent): it is refused, and the site says why."""
    now = [_local(1)]
    registry = {"peers": {s: {"capacityKwh": 10} for s in ("site-a", "site-b", "liar")}, "maxChargeW": 4000,
                "maxDischargeW": 4000}
    sites = {name: _offline_site(name, lambda: now[0], **registry) for name in ("site-a", "site-b")}
    stored, delivered = {"site-a": 8.0, "site-b": 7.0}, 0.0
    for _ in range(6 * 60):
        states = {name: PeerState(name, 10 * kwh, kwh, 10.0, 0.0, 0.0, 0.0, now[0]) for name, kwh in stored.items()}
        states["liar"] = PeerState("liar", 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, now[0])
        for name, site in sites.items():
            for other, peer_state in states.items():
                if other != name:
                    await site.handle(f"coop/{other}/state", json.dumps(peer_state.to_wire()).encode())
        for name, site in sites.items():
            target = await site.step(states[name], 0.0)
            stored[name] = max(0.0, min(10.0, stored[name] + target.battery_w / 60_000))
            delivered += max(0.0, -target.transfer_w) / 60_000
        now[0] += 60
    assert delivered < 3.0, f"{delivered:.1f} kWh delivered into the liar"
    assert stored["site-a"] > 6.5 and stored["site-b"] > 6.0, stored
    for site in sites.values():
        assert site.ignored["liar"].startswith("its claims do not add up: the fleet sent it 2.5 kWh today")
    assert "coop: ignoring coop/liar/state: its claims do not add up" in caplog.text


async def test_back_dated_states_do_not_pass_the_level_jump_check() -> None:
    """90 % stamped two hours ago, then 0 % stamped now: both were admitted (the fleet's average 75 -> 50 %)."""
    now = [_local(12)]
    site = _offline_site("site-b", lambda: now[0], peerTimeoutSeconds=120)
    await site.step(state("site-b", 60.0, timestamp=now[0]), 0.0)
    await site.handle("coop/site-a/state", json.dumps(state("site-a", 90.0, timestamp=now[0]).to_wire()).encode())
    assert site.fleet().level == pytest.approx(75.0)  # type: ignore[union-attr]
    now[0] += 1
    back_dated = state("site-a", 90.0, timestamp=now[0] - 7200)
    await site.handle("coop/site-a/state", json.dumps(back_dated.to_wire()).encode())
    now[0] += 1
    await site.handle("coop/site-a/state", json.dumps(state("site-a", 0.0, timestamp=now[0]).to_wire()).encode())
    assert site.fleet().level == pytest.approx(75.0)  # type: ignore[union-attr]
    assert "level jumped from 90.0 to 0.0 % in 2 s" in site.ignored["site-a"]
    assert site.stale == 1  # the back-dated state was dropped: the 90 % that arrived 2 s before stayed believed
    # A stamp far ahead of our clock is refused too.
    await site.handle("coop/site-a/state", json.dumps(state("site-a", 90.0, timestamp=now[0] + 600).to_wire()).encode())
    assert "600 s in the future" in site.ignored["site-a"]


async def test_production_runs_again_as_soon_as_the_battery_is_used() -> None:
    """Production came back only 300 s after it was stopped, even while the battery discharged 800 W."""
    now = [_local(12)]
    sent: list[bool] = []

    class Adapter:
        async def apply(self, curtailed: bool) -> None:
            sent.append(curtailed)

    site = CoopSite(parse_coop({"enabled": True, "siteId": "site-a", "broker": {"host": "127.0.0.1", "tls": False},
                                "curtail": {"adapter": "none"}}), clock=lambda: now[0], curtail_adapter=Adapter())
    await site.step(state("site-a", 99.5, timestamp=now[0], production=3000, consumption=500), 2000.0)
    assert site.curtailment.curtailed and sent == [True]
    now[0] += 20
    await site.step(state("site-a", 99.4, timestamp=now[0], consumption=800), -800.0)
    assert not site.curtailment.curtailed and sent == [True, False]


async def test_a_hostile_payload_is_not_logged_in_full(caplog: pytest.LogCaptureFixture) -> None:
    """A refused message is not quoted whole in the log (10 kB lines); the topic names no site either."""
    caplog.set_level(logging.WARNING)  # the warnings alone, whatever level an earlier test left the root logger at
    site = _offline_site("site-b", time.time)
    hostile = dict(state("site-a", 50.0).to_wire(), level="x" * 3900)
    await site.handle("coop/site-a/state", json.dumps(hostile).encode())
    await site.handle("coop/" + "y" * 10_000 + "/state", json.dumps(state("site-a", 50.0).to_wire()).encode())
    lines = [r.getMessage() for r in caplog.records]
    assert all(len(line) < 400 for line in lines), [len(line) for line in lines]
    assert len(lines) == 2 and "level is not a number ('xxxx" in lines[0]
    assert site.rejected["site-a"] == 1 and site.rejected["?"] == 1
    assert set(site.ignored) <= {"site-a", "?"}  # no key of 10 000 characters kept


# --- three households on GXes of their own, end to end ----------------------------------------------------

def _throughput(start: dict[str, float], end: dict[str, float]) -> float:
    """kWh through the household's meters between two readings of its truth."""
    return sum(abs(end[p] - start[p]) for p in ("/Energy/Load", "/Energy/Stored", "/Energy/Production"))


async def _households_metered(coop: Any, least_wh: float) -> dict[str, Any]:
    """Run the households until each metered `least_wh` of throughput, stop their aggregators (which saves the
    ledgers) and return the truth over that time, the states read over MQTT and the system values beside them."""
    from aggregator.bus import client as bus_client
    from aggregator.bus.lib import connect
    from aggregator_dev.simulator.household import SYSTEM_SERVICE, TRUTH_PREFIX

    aggregate = "com.victronenergy.battery.aggregator"
    buses = {name: await connect(address) for name, address in coop.info()["sites"].items()}

    async def read(name: str, service: str) -> dict[str, Any]:
        return await bus_client.get_items(buses[name], service)

    async def metering(name: str) -> bool:  # the cooperative stepped once: it meters from the next step on
        try:
            return isinstance((await read(name, aggregate)).get("/Coop/OwnTarget"), (int, float))
        except bus_client.CallError:
            return False

    out: dict[str, Any] = {"truth": {}, "states": {}, "system": {}}
    try:
        start: dict[str, dict[str, float]] = {}
        deadline = time.monotonic() + 90
        while len(start) < len(buses):
            for name in buses:
                if name not in start and await metering(name):
                    start[name] = await read(name, TRUTH_PREFIX + name)
            assert time.monotonic() < deadline, f"the cooperative did not start at {set(buses) - set(start)}"
            await asyncio.sleep(0.2)
        # What a peer reads over MQTT, and the household's system calculator read on its bus at that moment.
        async with coop_states(coop.info()["broker"]) as mqtt:
            async with asyncio.timeout(30):
                async for message in mqtt.messages:
                    peer_state = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    name = peer_state["siteId"]
                    if message.retain or name in out["states"]:
                        continue  # a fresh state, not the one retained from before
                    out["states"][name] = peer_state
                    out["system"][name] = await read(name, SYSTEM_SERVICE)
                    if len(out["states"]) == len(buses):
                        break
        done: set[str] = set()
        while len(done) < len(buses):
            for name in set(buses) - done:
                now = await read(name, TRUTH_PREFIX + name)
                if _throughput(start[name], now) >= least_wh / 1000:
                    aggregator = dict(coop.children[name].procs)["aggregator"]
                    aggregator.terminate()
                    assert await asyncio.to_thread(aggregator.wait, 30) == 0
                    end = await read(name, TRUTH_PREFIX + name)
                    out["truth"][name] = {k: end[k] - start[name][k] for k in end if k.startswith("/Energy/")}
                    done.add(name)
            assert time.monotonic() < deadline + 240, f"too little metered at {set(buses) - done}"
            await asyncio.sleep(0.5)
    finally:
        for bus in buses.values():
            bus.disconnect()
    return out


def test_each_household_meters_v_equals_p_plus_l_minus_t_end_to_end(tmp_path: Path) -> None:
    """Three households on one broker, each a GX of its own: the household simulator publishes Victron's
    system calculator (what the cooperative reads) and the truth; the aggregator runs the dispatcher and the
    cooperative. What each site meters from the bus matches what its household did, its use adds up
    (V = P + L - T), the transfers are metered where they happened, and its state on MQTT carries its
    system calculator's values."""
    import csv
    import io

    import dataclasses

    from aggregator_dev.demo import COOP_HOUSEHOLDS, Cooperative

    # The run lasts until the household with the least throughput has metered enough: the demo's bree (400 W of
    # load, no panels) would take about a minute; with three times the load it is as quick as the others.
    households = tuple(dataclasses.replace(h, load_w=1200.0) if h.site_id == "bree" else h for h in COOP_HOUSEHOLDS)
    coop = Cooperative(tmp_path / "coop", households, publish_seconds=1.0)
    try:
        coop.start()
        seen = asyncio.run(_households_metered(coop, least_wh=12.0))
    finally:
        coop.stop()
    for name, peer_state in seen["states"].items():
        system = seen["system"][name]
        # Panels and load swing slowly; the grid follows the battery's every step, so it is checked in the ledger.
        for key, path in (("productionW", "/Ac/PvOnGrid/L1/Power"), ("consumptionW", "/Ac/Consumption/L1/Power")):
            assert peer_state[key] == pytest.approx(system[path], rel=0.1, abs=50), (name, key, peer_state, system)
    ledgers = {}
    for name, truth in seen["truth"].items():
        result = subprocess.run([sys.executable, "-m", "aggregator", "coop", "--csv", "--state-dir",
                                 str(tmp_path / "coop" / name / "state")], capture_output=True, text=True, cwd=REPO,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        (row,) = list(csv.DictReader(io.StringIO(result.stdout)))
        metered = {k: float(v) for k, v in row.items() if k != "site"}
        ledgers[name] = metered
        throughput = truth["/Energy/Load"] + abs(truth["/Energy/Stored"]) + truth["/Energy/Production"]
        close = {"rel": 0.0, "abs": 0.15 * throughput + 0.001}
        assert metered["production_kwh"] == pytest.approx(truth["/Energy/Production"], **close), (name, metered, truth)
        assert metered["load_kwh"] == pytest.approx(truth["/Energy/Load"], **close), (name, metered, truth)
        assert metered["stored_kwh"] == pytest.approx(truth["/Energy/Stored"], **close), (name, metered, truth)
        assert metered["import_kwh"] == pytest.approx(truth["/Energy/Import"], **close), (name, metered, truth)
        assert metered["export_kwh"] == pytest.approx(truth["/Energy/Export"], **close), (name, metered, truth)
        # V = P + L - T from what the site read on its own bus, each moment: the paths and their signs agree.
        assert abs(metered["balance_error_kwh"]) <= 0.03 * throughput + 0.0005, (name, metered)
        assert metered["use_kwh"] == pytest.approx(metered["load_kwh"] + metered["stored_kwh"], abs=1e-3)
    # The one far above the average delivered for the fleet, the one far below took it.
    assert ledgers["rivendell"]["transfer_export_kwh"] > 0 and ledgers["rivendell"]["transfer_import_kwh"] == 0
    assert ledgers["shire"]["transfer_import_kwh"] > 0 and ledgers["shire"]["transfer_export_kwh"] == 0


async def test_dbus_names_a_site_that_drew_the_days_bound(broker: MosquittoBroker, busctl: Any) -> None:
    """A peer whose claims add up (a load takes what it is sent) but draws the day's bound: it gets nothing
    more, and /Coop/Status names it."""
    battery = {"/Soc": 80.0, "/InstalledCapacity": 200.0, "/Dc/0/Power": 0.0, "/Dc/0/Voltage": 50.0}  # 10 kWh
    async with _site_b_on_the_bus(broker, busctl, "com.victronenergy.battery.coop_bound_test", 292, battery,
                                  maxDailyDrawPercent=0.01) as read:  # 1 Wh
        async with client(broker, "site-a", USERS["site-a"]) as peer:
            await peer.publish("coop/site-a/status", b"online", qos=1, retain=True)
            deadline = time.monotonic() + 20
            while True:
                heavy = state("site-a", 10.0, consumption=3000)
                await peer.publish("coop/site-a/state", json.dumps(dict(heavy.to_wire(), gridW=3000)), qos=1,
                                   retain=True)
                await asyncio.sleep(0.3)
                status = await read("Status")
                if "drew the day's bound from the fleet: site-a" in status:
                    break
                assert time.monotonic() < deadline, f"/Coop/Status never named the bound: {status}"
        assert await read("Transfer") == 0 and await read("PeersOnline") == 1  # believed, but sent nothing more
        assert "ignoring" not in status
