"""Silence is not staleness: Victron's services signal a value only when it changes and have no heartbeat, so a
battery at rest may send nothing for minutes while alive. The aggregate asks a silent member (GetItems with a
timeout) and keeps it online when it answers; only no answer, an error or /Connected 0 makes it stale.

Members here are real services on a private bus that signal only changes; the aggregate is `battery-aggregator
run` in its own process, read over the bus by another client."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.bus.monitor import ServiceMonitor

from ..conftest import Processes
from ..helpers import CallWatch, eventually
from .test_aggregate import Bank, bus_address, start_aggregator  # noqa: F401
from .test_limits_bus import rows

CCL, DCL = "/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent"
FAST = {"rampUpRate": 1000, "hysteresis": 0, "staleAfter": 1}
LIMITS = {"Info__MaxChargeCurrent": 100.0, "Info__MaxDischargeCurrent": 150.0, "Io__AllowToCharge": 1,
          "Io__AllowToDischarge": 1}


async def test_quiet_members_are_asked_and_stay_online_with_their_limits(processes: Processes,
                                                                         tmp_path: Path) -> None:
    """Two members that signal nothing for several times staleAfter: before, both went stale and CCL and DCL fell to 0
    A (the inverter stops, the loads drop). Each silence now ends with a probe that they answer."""
    bank = Bank()
    await bank.add("a", **LIMITS)
    await bank.add("b", **LIMITS)
    async with CallWatch(processes.address, bank.name("a")) as probes_a, \
            CallWatch(processes.address, bank.name("b")) as probes_b:
        agg, proc = start_aggregator(processes, tmp_path, bank, currentRatioMethod="capacity", limits=FAST)
        await bank.value_is(agg, CCL, 200.0)
        await bank.value_is(agg, DCL, 300.0)
        row = await rows(bank, agg, 2)
        start = probes_a.count, probes_b.count
        # Silences of staleAfter each, one after the other, every one asked about and answered.
        await eventually(lambda: probes_a.count >= start[0] + 2 and probes_b.count >= start[1] + 2, timeout=20)
    for suffix in ("a", "b"):
        assert await bank.read(agg, f"/Batteries/{row[suffix]}/State") == "online"
    assert await bank.read(agg, CCL) == 200.0
    assert await bank.read(agg, DCL) == 300.0
    assert await bank.read(agg, "/Aggregator/Status") == "ok"
    assert "stale" not in processes.output(proc)
    bank.close()


async def test_a_member_that_does_not_answer_is_stale_until_it_answers_again(processes: Processes,
                                                                             tmp_path: Path) -> None:
    """No answer within the timeout (a hung driver) is what makes a silent member stale; an answer to a later probe
    brings it back without it having to signal anything."""
    bank = Bank()
    a = await bank.add("a", **LIMITS)
    await bank.add("b", **LIMITS)
    agg, proc = start_aggregator(processes, tmp_path, bank, currentRatioMethod="capacity", limits=FAST)
    await bank.value_is(agg, CCL, 200.0)
    row = await rows(bank, agg, 2)
    a.answering = False
    await bank.value_is(agg, f"/Batteries/{row['a']}/State", "stale")
    await bank.value_is(agg, CCL, 100.0)  # held at 200 A and lowered: b alone would carry it all
    assert "stale: " + bank.name("a") in await bank.read(agg, "/Aggregator/Status")
    assert await bank.read(agg, f"/Batteries/{row['b']}/State") == "online"
    assert "does not answer" in processes.output(proc)
    a.answering = True
    await bank.value_is(agg, f"/Batteries/{row['a']}/State", "online")
    await bank.value_is(agg, CCL, 200.0)
    bank.close()


async def test_connected_0_makes_a_member_stale_at_once_and_1_brings_it_back(processes: Processes,
                                                                            tmp_path: Path) -> None:
    """A service that lost its device says so with /Connected 0 (it still answers): stale, whatever it answers."""
    bank = Bank()
    a = await bank.add("a", **LIMITS)
    await bank.add("b", **LIMITS)
    agg, proc = start_aggregator(processes, tmp_path, bank, currentRatioMethod="capacity",
                                 limits={**FAST, "staleAfter": 3600})
    await bank.value_is(agg, CCL, 200.0)
    row = await rows(bank, agg, 2)
    a.set_value("/Connected", 0)
    await bank.value_is(agg, f"/Batteries/{row['a']}/State", "stale")
    await bank.value_is(agg, CCL, 100.0)
    assert "lost its device" in processes.output(proc)
    a.set_value("/Connected", 1)
    await bank.value_is(agg, f"/Batteries/{row['a']}/State", "online")
    await bank.value_is(agg, CCL, 200.0)
    bank.close()


async def test_a_probe_answer_refreshes_a_value_whose_signal_was_lost(processes: Processes, tmp_path: Path) -> None:
    """The answer to a probe is a full read: a value that changed without its signal reaching us is taken."""
    bank = Bank()
    a = await bank.add("a", **LIMITS)
    agg, _ = start_aggregator(processes, tmp_path, bank, limits=FAST)
    await bank.value_is(agg, CCL, 100.0)
    a._items["/Info/MaxChargeCurrent"].assign(40.0)  # changed on the service, no signal sent
    await bank.value_is(agg, CCL, 40.0)
    bank.close()


async def test_the_monitor_probe_reports_answers_and_silence(bus_address: str) -> None:  # noqa: F811
    """probe(): True on an answer (and what differs reported as a change), False on no answer or none followed."""
    bank = Bank()
    a = await bank.add("a", **LIMITS)
    bus = await connect()
    changes: list[dict[str, Any]] = []
    monitor = ServiceMonitor(bus, [bank.name("")], on_changed=lambda s, c: changes.append(c))
    await monitor.start()
    name = bank.name("a")
    assert await monitor.probe(name, 1.0) is True
    assert changes == []  # nothing differed
    a._items["/Soc"].assign(42.0)
    assert await monitor.probe(name, 1.0) is True
    assert changes == [{"/Soc": 42.0}] and monitor.services[name].values["/Soc"] == 42.0
    a.answering = False
    assert await monitor.probe(name, 0.5) is False
    assert await monitor.probe("com.victronenergy.battery.nobody", 0.5) is False
    await monitor.stop()
    bus.disconnect()
    bank.close()


async def test_a_frozen_simulator_process_goes_stale_and_a_quiet_one_does_not(processes: Processes,
                                                                             tmp_path: Path) -> None:
    """The simulator's quiet scenario: three packs whose values stand still (they signal nothing) stay online. The
    same process frozen with SIGSTOP answers nothing: its packs become stale; after SIGCONT they are online."""
    from .test_aggregate import start_settings

    settings = await start_settings()
    sim = processes.start("simulate", "quiet")
    bank = Bank()
    agg = bank.name("agg")
    config = tmp_path / "agg.json"
    config.write_text(json.dumps({"serviceName": agg, "stateDir": str(tmp_path / "state"), "reconnectTimeout": 0,
                                  "limits": FAST}))
    sim_a = "com.victronenergy.battery.sim_a"
    async with CallWatch(processes.address, sim_a) as probes:
        processes.start("run", "--config", str(config))
        await bank.value_is(agg, "/System/NrOfBatteries", 3, timeout=20)
        states = [f"/Batteries/{n}/State" for n in range(3)]
        await eventually(lambda: _all(bank, agg, states, "online"), timeout=10)
        reader = await connect()
        soc = await client.get_value(reader, sim_a, "/Soc")
        # Quiet for several staleAfter, each silence asked about and answered: still online.
        start = probes.count
        await eventually(lambda: probes.count >= start + 2, timeout=20)
        assert await client.get_value(reader, sim_a, "/Soc") == soc  # nothing moved: the packs are quiet
        assert await _all(bank, agg, states, "online")
        assert await bank.read(agg, "/Aggregator/Status") == "ok"
    os.kill(sim.pid, signal.SIGSTOP)
    try:
        await eventually(lambda: _all(bank, agg, states, "stale"), timeout=15)
    finally:
        os.kill(sim.pid, signal.SIGCONT)
    await eventually(lambda: _all(bank, agg, states, "online"), timeout=15)
    reader.disconnect()
    bank.close()
    settings.service.close()


async def _all(bank: Bank, agg: str, paths: list[str], value: Any) -> bool:
    try:
        return all([await bank.read(agg, p) == value for p in paths])
    except client.CallError:
        return False
