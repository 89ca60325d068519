"""The one MQTT link (mqtt/link.py) against a real mosquitto: wildcard subscriptions beside exact ones, the
cooperative's site on it (its client id, its status as the link's availability with the will, what it sends again
after a reconnect), and the broker settings' keep-alive reaching the broker."""
from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from aggregator.features.coop.settings import parse_coop
from aggregator.features.coop.site import CoopSite
from aggregator.features.dispatcher.adapters import dispatcher_link
from aggregator.features.dispatcher.settings import parse_dispatcher_config
from aggregator.mqtt.link import MqttLink
from aggregator_dev.mqttbroker import MosquittoBroker, find_mosquitto, free_port

from ..helpers import eventually, retained_on

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


async def retained(port: int, topic: str, wait: float = 1.0) -> bytes | None:
    async with aiomqtt.Client("127.0.0.1", port, timeout=5) as c:
        return await retained_on(c, topic, wait)


def dispatcher_mqtt(port: int, **extra: Any) -> Any:
    return parse_dispatcher_config({"mqtt": {"host": "127.0.0.1", "port": port, **extra}}).mqtt


async def test_wildcard_and_exact_subscriptions_each_get_their_messages() -> None:
    with MosquittoBroker() as broker:
        link = MqttLink(dispatcher_mqtt(broker.port), client_id="link-test")
        got: dict[str, list[tuple[str, bytes]]] = {"exact": [], "plus": [], "hash": []}
        link.subscribe("home/a/power", lambda t, p, _r: got["exact"].append((t, p)))
        link.subscribe("home/+/power", lambda t, p, _r: got["plus"].append((t, p)))

        async def later(t: str, p: bytes, _r: bool) -> None:  # an async handler is awaited
            await asyncio.sleep(0)
            got["hash"].append((t, p))

        link.subscribe("home/#", later)
        done = asyncio.Event()
        link.subscribe("test/done", lambda _t, _p, _r: done.set())  # after the others: one publisher keeps order
        link.start()
        try:
            await eventually(link.connected.is_set)
            async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as c:
                for topic in ("home/a/power", "home/b/power", "home/b/soc", "home", "other/a/power", "test/done"):
                    await c.publish(topic, topic.encode(), qos=1)
            await asyncio.wait_for(done.wait(), 10)
        finally:
            await link.stop()
    assert got["exact"] == [("home/a/power", b"home/a/power")]
    assert got["plus"] == [("home/a/power", b"home/a/power"), ("home/b/power", b"home/b/power")]
    assert [t for t, _ in got["hash"]] == ["home/a/power", "home/b/power", "home/b/soc", "home"]


async def test_the_dispatchers_keepalive_reaches_the_broker() -> None:
    with MosquittoBroker() as broker:
        link = dispatcher_link(dispatcher_mqtt(broker.port, keepaliveSeconds=17, clientId="dispatcher-17"), "d/avail")
        link.start()
        try:
            await eventually(link.connected.is_set)
            await eventually(lambda: "as dispatcher-17 (" in broker.log())
        finally:
            await link.stop()
        assert re.search(r"as dispatcher-17 \(p\d, c\d, k17\b", broker.log()), broker.log()


async def test_a_coop_site_reconnects_through_the_link_and_states_itself_again(tmp_path: Path) -> None:
    """Its fixed client id and keep-alive, its status as the link's availability ("online", the will "offline"),
    and after the broker restarts (retained messages gone) its state, discovery and curtailment command again."""
    port = free_port()
    settings = parse_coop({"enabled": True, "siteId": "site-a", "publishSeconds": 0.5, "peerTimeoutSeconds": 5,
                           "broker": {"host": "127.0.0.1", "port": port, "tls": False, "keepaliveSeconds": 23}})
    first = MosquittoBroker(directory=tmp_path / "first", port=port).start()
    site = CoopSite(settings, reconnect_min_s=0.1, reconnect_max_s=0.3)
    run = asyncio.create_task(site.run())
    second = None
    try:
        await eventually(site.connected.is_set)
        assert site.link.availability_topic == "coop/site-a/status"
        assert re.search(r"as coop-site-a \(p\d, c\d, k23, u'site-a'\)", first.log()), first.log()
        await site.step(_state(), 0.0)
        await eventually(lambda: site._gate.last is not None)
        first.stop()
        await eventually(lambda: not site.connected.is_set())
        second = MosquittoBroker(directory=tmp_path / "second", port=port).start()
        await eventually(lambda: site.connects == 2)
        assert await retained(port, "coop/site-a/status") == b"online"
        assert await retained(port, "coop/site-a/curtail") == b"0"
        config = json.loads(await retained(port, "homeassistant/sensor/site-a/coop_average_level/config") or b"{}")
        assert config["availability_topic"] == "coop/site-a/status"
        async def state_level() -> float | None:
            raw = await retained(port, "coop/site-a/state")
            return json.loads(raw)["level"] if raw else None

        assert await eventually(state_level) == 40.0  # the state sent again
        run.cancel()
        await asyncio.wait({run}, timeout=5)
        assert await retained(port, "coop/site-a/status") == b"offline"  # a clean stop says it itself
    finally:
        run.cancel()
        await asyncio.wait({run}, timeout=5)
        first.stop()
        if second is not None:
            second.stop()


def _state() -> Any:
    from aggregator.features.coop.core import PeerState

    return PeerState("site-a", 40.0, 4.0, 10.0, 0.0, 500.0, 0.0, time.time())
