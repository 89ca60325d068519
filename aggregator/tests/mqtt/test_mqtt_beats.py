"""The MQTT clients' housekeeping (paho's keep-alive check, once a second) runs on the service's 1-second
beats, in the wake-up of its tick, rather than on a timer of its own."""
from __future__ import annotations

import asyncio

import pytest

from aggregator.mqtt.beat_client import Client
from aggregator_dev.mqttbroker import MosquittoBroker, find_mosquitto

from ..helpers import eventually, on_tick_beat

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


async def test_the_keep_alive_checks_fall_on_the_ticks_beats() -> None:
    with MosquittoBroker() as broker:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.5 - loop.time() % 1.0 if loop.time() % 1.0 < 0.5 else 1.5 - loop.time() % 1.0)
        async with Client("127.0.0.1", broker.port, timeout=10) as client:  # connected half-way between beats
            checks: list[float] = []
            loop_misc = client._client.loop_misc

            def seen() -> int:
                checks.append(loop.time())
                return loop_misc()

            client._client.loop_misc = seen  # type: ignore[method-assign]
            await eventually(lambda: len(checks) >= 3, timeout=6)
    assert all(on_tick_beat(t) for t in checks), checks
