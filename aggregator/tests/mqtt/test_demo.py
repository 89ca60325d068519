"""`demo --all`: every side feature running together, read over the demo's buses and its broker."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator_dev.demo import COOP_HOUSEHOLDS, DISPATCH_TARGETS_W
from aggregator_dev.mqttbroker import find_mosquitto

from ..helpers import REPO, coop_states

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
AGGREGATE = "com.victronenergy.battery.aggregator"


async def until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll an async check until it returns something truthy (the demo's processes start slowly on a busy
    machine: a long bound, no fixed wait)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
            if last:
                return last
        except (client.CallError, OSError, KeyError) as exc:  # a service not up yet
            last = exc
        await asyncio.sleep(interval)
    raise AssertionError(f"{what}: not seen within {timeout} s (last: {last!r})")


async def _read_everything(info: dict[str, Any]) -> dict[str, Any]:
    bus = await connect(info["bus"])
    sites = {name: await connect(address) for name, address in info["coop"]["sites"].items()}
    seen: dict[str, Any] = {}
    try:
        # Energy reports arriving: both batteries counted, and their totals move from one report to the next.
        async def reports() -> dict[str, float] | None:
            items = await client.get_items(bus, AGGREGATE)
            ids = {items[p]: p.rsplit("/", 1)[0] for p in items if p.startswith("/Energy/External/") and
                   p.endswith("/Id") and items[p]}
            if {"sessy-1", "sessy-2"} <= ids.keys():
                return {i: items[f"{ids[i]}/ChargedEnergy"] + items[f"{ids[i]}/DischargedEnergy"] for i in ids}
            return None

        first = await until(reports, 120, "the reported batteries on the aggregate")
        seen["reports"] = await until(lambda: _moved(reports, first), 60, "a later report counted")
        # The grid battery: a level.
        seen["grid"] = await until(lambda: _valid(bus, "com.victronenergy.battery.grid", "/GridBattery/LevelKwh"),
                                   60, "the grid battery's level")

        # The dispatcher following a target of the schedule: what the batteries give comes near it.
        async def following() -> tuple[float, float] | None:
            items = await client.get_items(bus, AGGREGATE)
            target, achieved = items.get("/Dispatcher/TargetPower"), items.get("/Dispatcher/AchievedPower")
            if target in DISPATCH_TARGETS_W and isinstance(achieved, (int, float)) and \
                    abs(achieved - target) < 0.2 * abs(target):
                return target, achieved
            return None

        seen["dispatcher"] = await until(following, 120, "the dispatcher following its target")

        # The cooperative: each household (its own bus) counts the two others, they agree on the average,
        # and the one far above it delivers while the one far below imports.
        async def fleet() -> dict[str, dict[str, Any]] | None:
            views = {name: await client.get_items(b, AGGREGATE) for name, b in sites.items()}
            if any(v.get("/Coop/PeersOnline") != 2 for v in views.values()):
                return None
            return views if views["rivendell"]["/Coop/Transfer"] < 0 < views["shire"]["/Coop/Transfer"] else None

        views = seen["coop"] = await until(fleet, 120, "three households balancing")
        averages = [v["/Coop/AverageLevel"] for v in views.values()]
        assert max(averages) - min(averages) < 1.0, averages
    finally:
        bus.disconnect()
        for b in sites.values():
            b.disconnect()
    # Over MQTT, as the cooperative's read-only user: every household's state.
    states: dict[str, dict[str, Any]] = {}
    async with coop_states(info["coop"]["broker"]) as mqtt:
        async with asyncio.timeout(30):
            async for message in mqtt.messages:
                state = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                states[state["siteId"]] = state
                if len(states) == len(COOP_HOUSEHOLDS):
                    break
    seen["mqtt"] = states
    return seen


async def _moved(check: Callable[[], Any], before: dict[str, float]) -> dict[str, float] | None:
    now = await check()
    return now if now and all(now[k] > before[k] for k in before) else None


async def _valid(bus: Any, service: str, path: str) -> Any:
    value = (await client.get_items(bus, service)).get(path)
    return value if isinstance(value, (int, float)) else None


def test_demo_all_runs_every_side_feature_live_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(REPO))
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)  # the demo makes its own buses
    out = tmp_path / "screen.txt"
    with open(out, "w") as screen:
        # Reports 20 times as often (each still 5 s of the batteries): their totals, published to 0.01 kWh, move
        # within seconds rather than half a minute.
        demo = subprocess.Popen([sys.executable, "-m", "aggregator", "demo", "--all", "--duration", "600",
                                 "--refresh", "0.5", "--report-every", "0.25"], env=env, stdout=screen,
                                stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("battagg-demo-*/demo.json")):
            assert demo.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.2)
        info = json.loads(next(tmp_path.glob("battagg-demo-*/demo.json")).read_text())
        seen = asyncio.run(_read_everything(info))
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=60)
    screen_text = out.read_text()
    assert code == 0, screen_text[-3000:]
    assert set(seen["mqtt"]) == {h.site_id for h in COOP_HOUSEHOLDS}
    assert all(s["capacityKwh"] > 0 and 0 <= s["level"] <= 100 for s in seen["mqtt"].values())
    # The screen showed each feature with live values.
    last = screen_text.split("battery-aggregator demo")[-1]
    assert "sessy-1      online" in last and "Grid battery battery.grid: level" in last
    assert "Dispatcher: target" in last and "shed" in last
    assert "Cooperative: 3 households on one broker" in last and "rivendell" in last
    assert "STOPPED" not in screen_text  # no child died
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], leftovers
