"""Charge limits of the aggregated battery over a real bus: `battery-aggregator run` as its own process, member
batteries (and localsettings / com.victronenergy.system stand-ins) built by the tests, the limits read by
another client as the GX would."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from aggregator.bus import client
from aggregator.bus.lib import Variant, connect
from aggregator.bus.service import VeService
from aggregator.bus.settings import LocalSettings, Setting
from aggregator_dev.simulator.physics import Bank as PhysicsBank
from aggregator_dev.simulator.physics import Pack

from ..conftest import Busctl, Processes
from ..helpers import CallWatch, eventually
from ..pure.test_limits import PHYSICS_PACKS
from .test_aggregate import Bank, bus_address, start_aggregator, start_settings  # noqa: F401

FAST = {"rampUpRate": 1000, "hysteresis": 0}
CCL, DCL, CVL = "/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent", "/Info/MaxChargeVoltage"
MAX_CURRENT = "/Settings/SystemSetup/MaxChargeCurrent"
MAX_VOLTAGE = "/Settings/SystemSetup/MaxChargeVoltage"


def run(processes: Processes, tmp_path: Path, bank: Bank, suffix: str = "agg", **config: Any) -> tuple[str, Any]:
    config.setdefault("stateDir", str(tmp_path / "state"))
    return start_aggregator(processes, tmp_path, bank, suffix, **config)


async def rows(bank: Bank, agg: str, count: int) -> dict[str, int]:
    """member suffix -> its /Batteries/<n> row, once the aggregate shows `count` members."""
    await bank.value_is(agg, "/System/NrOfBatteries", count)
    found: dict[str, int] = {}

    async def all_rows() -> bool:
        for n in range(count):
            try:
                service = await bank.read(agg, f"/Batteries/{n}/Service")
            except client.CallError:
                return False
            for suffix in bank.members:
                if service == bank.name(suffix):
                    found[suffix] = n
        return len(found) == count

    await eventually(all_rows, timeout=10)
    return found


async def sample(bank: Bank, agg: str, path: str, until: Any, timeout: float, interval: float = 0.25
                 ) -> list[tuple[float, Any]]:
    """(time, value) of `path` until it equals `until` (or the timeout passes)."""
    out: list[tuple[float, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await bank.read(agg, path)
        out.append((time.monotonic(), value))
        if value == until:
            break
        await asyncio.sleep(interval)
    return out


def changes(seen: list[tuple[float, Any]]) -> list[tuple[float, Any, Any]]:
    """(seconds between the two values first being seen, the value before, the value) of each change in a sample:
    a ramp steps by its rate times the time since its last step, which a late tick on a loaded machine makes
    longer than the usual second (the time between two reads is no measure of it)."""
    first = [(t, v) for n, (t, v) in enumerate(seen) if n == 0 or v != seen[n - 1][1]]
    return [(t1 - t0, v0, v1) for (t0, v0), (t1, v1) in zip(first, first[1:])]


async def recomputed(bank: Bank, agg: str, member: str) -> None:
    """Returns once the limits have been computed again after every value `member` sent before was handled: what
    a test asserts did not change then had its chance. A rise starts its ramp in one computation and shows in the
    next, and a change of current or voltage alone waits for the next tick; a change of a member's limit is
    computed at once, so the member's discharge limit is nudged between two barriers."""
    await bank.barrier(agg, member)
    battery = bank.members[member]
    battery.set_value("/Info/MaxDischargeCurrent", battery["/Info/MaxDischargeCurrent"] + 1.0)
    await bank.barrier(agg, member)


# ---- 1. share-aware CCL --------------------------------------------------------------------------------------

async def test_one_pack_under_two_services_is_not_counted_twice(processes: Processes, tmp_path: Path) -> None:
    """One BMS seen through two drivers (same serial): counted twice, its current would add up twice and, at a
    smaller share, its charge limit would let the bank take more than the pack may. It is counted once,
    through the service the aggregate saw first; when that one leaves, the other stands for the pack."""
    bank = Bank()
    pack = {"Info__MaxChargeCurrent": 50.0, "Io__AllowToCharge": 1, "InstalledCapacity": 100.0}
    await bank.add("can", Serial="SN-DUP", Dc__0__Current=20.0, **pack)
    await bank.add("ser", Serial="SN-DUP", Dc__0__Current=20.0, **pack)
    await bank.add("other", Dc__0__Current=10.0, **pack)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="capacity", limits=FAST)
    await bank.value_is(agg, "/System/NrOfBatteries", 2)
    await bank.value_is(agg, "/Dc/0/Current", 30.0)  # not 50
    assert await bank.read(agg, "/InstalledCapacity") == 200.0
    # Two packs at a half share each: 30 A now + (50 - 20) A / 0.5 = 90 A. Counted twice, three members at a
    # third each: 50 + (50 - 20) / (1/3) = 140 A.
    await bank.value_is(agg, CCL, 90.0)
    status = await bank.read(agg, "/Aggregator/Status")
    names = {bank.name(s): s for s in ("can", "ser")}
    chosen, duplicate = (("can", "ser") if f"{bank.name('ser')} (same battery as {bank.name('can')})" in status
                         else ("ser", "can"))
    assert f"{bank.name(duplicate)} (same battery as {bank.name(chosen)})" in status, status
    states = {}
    for n in range(3):
        states[names.get(await bank.read(agg, f"/Batteries/{n}/Service"))] = \
            await bank.read(agg, f"/Batteries/{n}/State")
    assert states[duplicate] == "duplicate" and states[chosen] == "online", states
    log = processes.output(proc)
    assert any(bank.name(duplicate) in line and "not counted twice" in line for line in log.splitlines()), log

    bank.members.pop(chosen).close()  # that driver stops: the other stands for the pack now
    bank.members[duplicate].set_value("/Dc/0/Current", 15.0)
    await bank.value_is(agg, "/Dc/0/Current", 25.0)
    assert await bank.read(agg, "/System/NrOfBatteries") == 2
    await bank.value_is(agg, CCL, 95.0)  # 25 A + (50 - 15) A / 0.5
    assert "not counted twice" not in await bank.read(agg, "/Aggregator/Status")
    bank.close()


async def test_ccl_is_share_aware_by_capacity_and_by_count(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, InstalledCapacity=200.0)
    b = await bank.add("b", Info__MaxChargeCurrent=50.0, Io__AllowToCharge=1, InstalledCapacity=100.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="capacity", limits=FAST)
    # a carries 2/3 and may take 100 A, b 1/3 and 50 A: the bank may take 150 A (not 2 x 50, not 150 + 50).
    await bank.value_is(agg, CCL, 150.0)
    row = await rows(bank, agg, 2)
    assert await bank.read(agg, f"/Batteries/{row['a']}/Share") == pytest.approx(0.6667, abs=1e-4)
    assert await bank.read(agg, f"/Batteries/{row['b']}/Share") == pytest.approx(0.3333, abs=1e-4)
    assert await bank.read(agg, f"/Batteries/{row['a']}/ChargeLimit") == 100.0
    assert await bank.read(agg, f"/Batteries/{row['b']}/ChargeLimit") == 50.0
    assert "(capacity)" in await bank.read(agg, "/Info/ChargeLimitation")
    # b binds alone now: 40 A / (1/3) = 120 A, and the reason names it.
    b.set_value("/Info/MaxChargeCurrent", 40.0)
    await bank.value_is(agg, CCL, 120.0)
    assert await bank.read(agg, "/Info/ChargeLimitation") == "Pack b: 40 A at a 33% share (capacity)"
    assert await bank.read(agg, f"/Batteries/{row['b']}/ChargeLimit") == 40.0
    b.set_value("/Info/MaxChargeCurrent", 50.0)
    await bank.value_is(agg, CCL, 150.0)
    proc.terminate()
    proc.wait(timeout=10)

    # Equal shares: b's 50 A at half the bank current binds: 100 A.
    agg, _ = run(processes, tmp_path, bank, suffix="count", currentRatioMethod="count", limits=FAST)
    await bank.value_is(agg, CCL, 100.0)
    row = await rows(bank, agg, 2)
    assert await bank.read(agg, "/Info/ChargeLimitation") == "Pack b: 50 A at a 50% share (count)"
    for suffix in ("a", "b"):
        assert await bank.read(agg, f"/Batteries/{row[suffix]}/Share") == 0.5
    assert await bank.read(agg, f"/Batteries/{row['a']}/ChargeLimit") == 100.0
    bank.close()


# ---- 2. AllowToCharge / AllowToDischarge -----------------------------------------------------------------------

async def test_a_member_forbidding_a_direction_leaves_the_sum(processes: Processes, tmp_path: Path) -> None:
    """A member that forbids a direction and carries nothing in it while the others do has its switch open: it
    leaves the sum, and the others go on."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=100.0, Info__MaxDischargeCurrent=150.0, Io__AllowToCharge=1,
                       Io__AllowToDischarge=1, Dc__0__Current=10.0)
    b = await bank.add("b", Info__MaxChargeCurrent=80.0, Info__MaxDischargeCurrent=120.0, Io__AllowToCharge=1,
                       Io__AllowToDischarge=1, Dc__0__Current=0.0)
    agg, _ = run(processes, tmp_path, bank, currentRatioMethod="count", limits=FAST)
    await bank.value_is(agg, CCL, 160.0)  # equal shares: b's 80 A at a 50% share
    row = await rows(bank, agg, 2)

    b.set_value("/Io/AllowToCharge", 0)
    await bank.value_is(agg, CCL, 100.0)  # a's own limit: not 0, not 180, not 160
    assert await bank.read(agg, f"/Batteries/{row['b']}/ChargeLimit") == 0.0
    assert await bank.read(agg, f"/Batteries/{row['a']}/ChargeLimit") == 100.0
    assert await bank.read(agg, "/Io/AllowToCharge") == 1
    assert await bank.read(agg, "/Alarms/HighChargeCurrent") in (None, 0)
    assert "held" not in await bank.read(agg, "/Aggregator/Status")
    a.set_value("/Io/AllowToCharge", 0)
    await bank.value_is(agg, CCL, 0.0)
    assert await bank.read(agg, "/Io/AllowToCharge") == 0
    a.set_value("/Io/AllowToCharge", 1)
    b.set_value("/Io/AllowToCharge", 1)
    await bank.value_is(agg, CCL, 160.0)

    a.set_value("/Dc/0/Current", -40.0)  # discharging now: a carries it all
    await bank.value_is(agg, DCL, 240.0)  # b's 120 A at a 50% share
    await bank.value_is(agg, CCL, 120.0)  # from the operating point: -40 A + (80 - 0) A / 0.5
    b.set_value("/Io/AllowToDischarge", 0)
    await bank.value_is(agg, DCL, 150.0)  # a's own: the inverter is not switched off for b
    assert await bank.read(agg, f"/Batteries/{row['b']}/DischargeLimit") == 0.0
    assert await bank.read(agg, "/Io/AllowToDischarge") == 1
    assert await bank.read(agg, "/Alarms/HighDischargeCurrent") in (None, 0)
    assert await bank.read(agg, CCL) == 120.0
    b.set_value("/Io/AllowToDischarge", 1)
    await bank.value_is(agg, DCL, 240.0)
    b.set_value("/Dc/0/Current", -40.0)
    await bank.barrier(agg, "b")  # b discharges when a starts forbidding with nothing: a's switch is open at once
    a.set_values({"/Dc/0/Current": 0.0, "/Io/AllowToDischarge": 0})
    await bank.value_is(agg, DCL, 120.0)  # b's own
    assert await bank.read(agg, f"/Batteries/{row['a']}/DischargeLimit") == 0.0
    await bank.value_is(agg, CCL, 160.0)  # -40 A + (100 - 0) A / 0.5
    b.set_value("/Io/AllowToDischarge", 0)
    await bank.value_is(agg, DCL, 0.0)
    assert await bank.read(agg, "/Io/AllowToDischarge") == 0
    bank.close()


# ---- 3. a frozen member ------------------------------------------------------------------------------------------

async def test_a_frozen_member_is_stale_and_carries_nothing_then_ramps_back(
        processes: Processes, tmp_path: Path) -> None:
    """A member whose driver hangs (it neither signals nor answers) is stale; one that is merely quiet is not.
    b carries 3/4 of the bank (by capacity), so the bank's own ramp from 0 at start is short next to the ramp
    back from a's share alone."""
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=25.0, Io__AllowToCharge=1, InstalledCapacity=100.0)
    b = await bank.add("b", Info__MaxChargeCurrent=75.0, Io__AllowToCharge=1, InstalledCapacity=300.0)
    async with CallWatch(processes.address, bank.name("b")) as probes:
        agg, _ = run(processes, tmp_path, bank, currentRatioMethod="capacity",
                     limits={"staleAfter": 1, "rampUpRate": 25, "hysteresis": 0})
        row = await rows(bank, agg, 2)
        await bank.value_is(agg, CCL, 100.0, timeout=10)  # 25 A at a 1/4 share, 75 A at 3/4
        await eventually(lambda: probes.count >= 2, timeout=10)  # quiet, asked, answering: not stale
    assert await bank.read(agg, f"/Batteries/{row['b']}/State") == "online"
    assert await bank.read(agg, CCL) == 100.0

    b.answering = False
    await bank.value_is(agg, f"/Batteries/{row['b']}/State", "stale", timeout=6)
    # b counts as carrying nothing: a takes it all, so the bank limit is a's own 25 A (never "no limit").
    await bank.value_is(agg, CCL, 25.0, timeout=3)
    assert "counted as carrying nothing: Pack b" in await bank.read(agg, "/Info/ChargeLimitation")
    assert "stale" in await bank.read(agg, "/Aggregator/Status")
    assert await bank.read(agg, f"/Batteries/{row['a']}/State") == "online"

    b.answering = True
    await bank.value_is(agg, f"/Batteries/{row['b']}/State", "online", timeout=5)
    seen = await sample(bank, agg, CCL, 100.0, timeout=10, interval=0.2)
    values = [v for _, v in seen]
    assert values[-1] == 100.0, seen
    assert values[0] < 100.0, seen  # not at once: ramped at 25 A/s
    assert any(25.0 < v < 100.0 for v in values), seen
    assert values == sorted(values), seen
    assert seen[-1][0] - seen[0][0] >= 1.5, seen  # 75 A at 25 A/s is about 3 s
    bank.close()


# ---- 4. ramp and hysteresis ----------------------------------------------------------------------------------------

async def test_rises_are_ramped_and_hysteretic_drops_go_out_at_once(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=10.0, Io__AllowToCharge=1, Info__MaxDischargeCurrent=100.0)
    agg, _ = run(processes, tmp_path, bank, limits={"rampUpRate": 10})  # hysteresis: the default 1 A
    await bank.value_is(agg, CCL, 10.0, timeout=10)  # ramped up from 0 at start, at 10 A/s

    a.set_value("/Info/MaxChargeCurrent", 60.0)
    seen = await sample(bank, agg, CCL, 60.0, timeout=15, interval=0.25)
    assert seen[-1][1] == 60.0, seen  # all the way: the last step is not held back by the hysteresis
    values = [v for _, v in seen]
    assert values == sorted(values), seen
    assert len(set(values)) >= 4, seen  # intermediate steps (one a second), not a jump
    for dt, v0, v1 in changes(seen):
        assert v1 - v0 <= 10.0 * (dt + 1.0) + 1.0, seen  # about 10 A/s (the service ticks once a second)
    assert seen[-1][0] - seen[0][0] >= 50.0 / 10.0 - 2.0, seen

    # A rise below the hysteresis is not published.
    published = await bank.read(agg, CCL)
    a.set_value("/Info/MaxChargeCurrent", published + 0.6)
    await recomputed(bank, agg, "a")
    assert await bank.read(agg, CCL) == published
    # A drop goes out at once.
    a.set_value("/Info/MaxChargeCurrent", 30.0)
    await bank.value_is(agg, CCL, 30.0, timeout=1.5)
    bank.close()


async def test_a_rise_is_ramped_even_when_members_were_quiet(processes: Processes, tmp_path: Path) -> None:
    """A rise after a quiet spell is ramped from when it comes (a ramp timed from the last recompute would send
    it out as 50 -> 110.1 A)."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=10.0, Io__AllowToCharge=1)
    agg, _ = run(processes, tmp_path, bank, limits={"rampUpRate": 5})
    await bank.value_is(agg, CCL, 10.0, timeout=10)  # ramped up from 0 at start, at 5 A/s
    # A steady BMS whose values do not change: nothing is recomputed. The quiet itself is the condition under
    # test; a ramp timed from the last recompute would jump by 5 A for each of its seconds (15 A more here).
    await asyncio.sleep(3.0)
    rose_at = time.monotonic()
    a.set_value("/Info/MaxChargeCurrent", 150.0)
    first = await eventually(lambda: _above(bank, agg, 10.0), timeout=10)
    # At most ~5 A/s from the moment the target rose (and one tick's step).
    assert first <= 10.0 + 5.0 * (time.monotonic() - rose_at) + 5.0, first
    bank.close()


async def test_a_ramp_reaches_its_target(processes: Processes, tmp_path: Path) -> None:
    """A ramp goes all the way (hysteresis applied to the rest of a ramp would stall it short of the target
    for good once the rest is below the hysteresis, here after a step or two of 10 A)."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=10.0, Io__AllowToCharge=1)
    agg, _ = run(processes, tmp_path, bank, limits={"rampUpRate": 10, "hysteresis": 25})
    await bank.value_is(agg, CCL, 10.0, timeout=10)  # ramped up from 0 at start, at 10 A/s
    a.set_value("/Info/MaxChargeCurrent", 50.0)  # a rise of 40 A, above the 25 A hysteresis
    try:
        await bank.value_is(agg, CCL, 50.0, timeout=10)  # 4 s at 10 A/s
    finally:
        bank.close()


async def test_a_large_bank_ramps_up_from_0_within_the_ramp_time(processes: Processes, tmp_path: Path) -> None:
    """After a start the CCL ramps up from 0; at 2 A/s alone, a bank whose limit is 2824 A (64 packs' worth) took
    23.5 minutes to get there. It takes at most rampUpTime (30 s by default: see the pure
    test_limits.py::test_by_default_a_current_limit_rises_at_2_a_per_s_or_within_30_s), whatever the bank, and
    still rises step by step. Here rampUpTime is 6 s with the default rampUpRate of 2 A/s."""
    bank = Bank()
    for k in range(8):
        await bank.add(f"p{k}", Info__MaxChargeCurrent=353.0, Io__AllowToCharge=1)
    agg, _ = run(processes, tmp_path, bank, limits={"rampUpTime": 6})
    await bank.value_is(agg, "/System/NrOfBatteries", 8)
    seen = await sample(bank, agg, CCL, 2824.0, timeout=20, interval=0.25)
    values = [v for _, v in seen]
    try:
        assert values[-1] == 2824.0, seen
        assert values == sorted(values), seen
        assert values[0] < 0.5 * 2824.0 and len(set(values)) >= 4, seen  # a ramp, not a jump
        assert seen[-1][0] - seen[0][0] <= 6.0 + 3.0, seen
        for dt, v0, v1 in changes(seen):
            assert v1 - v0 <= 2824.0 / 6.0 * (dt + 1.0) + 1.0, seen  # the service steps once a second
    finally:
        bank.close()


PHYSICS_PATHS = ("/Dc/0/Current", "/Dc/0/Voltage", "/Dc/0/Power", "/Soc", "/InstalledCapacity",
                 "/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent", "/Io/AllowToCharge", "/Io/AllowToDischarge")


async def test_at_the_bank_limit_the_most_loaded_pack_sits_at_90_to_100_percent_of_its_own(
        processes: Processes, tmp_path: Path) -> None:
    """Four packs in parallel at different states of charge, served on the bus and driven by the physics from
    the CCL another client reads (the charger delivers min(offered, CCL) twice a second). First the house's
    loads switch on and off every second (the bank's own changes teach the split), then the sun offers more than
    the bank takes. The fullest pack takes less than its share; with the lower of the plain ratio and the
    extrapolation the most loaded pack sat at 72% of its own limit. It must sit at 90% or more, never above.
    The CCL follows the packs in steps of a second or two (the limits follow measurements once a second and a
    rise shows at the next tick); it gets there within three, so six seconds after the sun came out it is
    measured for six more. Twelve seconds of loads teach the split on a loaded machine too (with six, a run
    now and then learned too few complete samples and overshot). (The pure test_limits.py runs the same
    physics for 35 simulated minutes.)"""
    packs = [Pack(dataclasses.replace(p, soc=soc), seed=1) for p, soc in zip(PHYSICS_PACKS, (60, 55, 70, 50))]
    physics = PhysicsBank(packs)
    bank = Bank()
    services = {}
    for pack in packs:
        values = pack.values()
        services[pack.service] = await bank.add(pack.service, **{path[1:].replace("/", "__"): values[path]
                                                                  for path in PHYSICS_PATHS})
    agg, _ = run(processes, tmp_path, bank, limits={"rampUpTime": 2})
    await bank.value_is(agg, "/System/NrOfBatteries", 4)
    loads: list[float] = []
    try:
        for tick in range(48):
            ccl = await bank.read(agg, CCL) or 0.0
            offered = 400.0 if tick >= 24 else (60.0 if tick % 4 < 2 else 20.0)  # loads on and off, then sun
            own = [p.limits().ccl for p in packs]
            state = physics.step(min(offered, ccl), 0.5)
            if tick >= 36:  # six seconds after the sun came out
                assert ccl < offered
                loads.append(max(i / limit for i, limit in zip(state.currents, own)))
            for pack in packs:
                values = pack.values()
                services[pack.service].set_values({path: values[path] for path in PHYSICS_PATHS})
            await asyncio.sleep(0.5)
        assert max(loads) <= 1.0, loads
        assert statistics.median(loads) >= 0.9, loads
    finally:
        bank.close()


# ---- 5. DVCC -----------------------------------------------------------------------------------------------------

async def test_dvcc_user_limits_are_followed_live(processes: Processes, tmp_path: Path) -> None:
    stand_in = await start_settings()
    ls = LocalSettings(await connect())
    await ls.start()
    await ls.add(Setting(MAX_CURRENT, -1), Setting(MAX_VOLTAGE, 0.0))
    system = VeService(await connect(), "com.victronenergy.system")
    system.add_path("/Control/Dvcc", 0)
    await system.register()

    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Info__MaxChargeVoltage=55.2, Balancing=0,
                   Info__MaxDischargeCurrent=100.0)
    b = await bank.add("b", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Info__MaxChargeVoltage=56.0,
                       Balancing=0)
    agg, proc = run(processes, tmp_path, bank, cclMode="battery+dvcc", cvlMode="max_when_balancing",
                    limits={**FAST, "voltageRampUpRate": 10, "voltageHysteresis": 0})
    await bank.value_is(agg, CCL, 200.0)
    await bank.value_is(agg, CVL, 55.2)  # the lowest while nobody balances

    # A user limit while DVCC is off changes nothing.
    assert await ls.set(MAX_CURRENT, 40)
    await eventually(lambda: "DVCC off, user limits 40" in processes.output(proc), timeout=10)
    await bank.barrier(agg, "a")  # the flush that took the setting in has gone out
    assert await bank.read(agg, CCL) == 200.0
    system.set_value("/Control/Dvcc", 1)
    await bank.value_is(agg, CCL, 40.0)
    assert await bank.read(agg, "/Info/ChargeLimitation") == "DVCC user limit 40 A"
    assert await ls.set(MAX_CURRENT, 150)  # above the batteries' limit: theirs applies
    await bank.value_is(agg, CCL, 150.0)
    await recomputed(bank, agg, "a")
    assert await bank.read(agg, CCL) == 150.0
    assert await ls.set(MAX_CURRENT, -1)
    await bank.value_is(agg, CCL, 200.0)
    assert await ls.set(MAX_CURRENT, 40)
    await bank.value_is(agg, CCL, 40.0)
    system.set_value("/Control/Dvcc", 0)
    await bank.value_is(agg, CCL, 200.0)
    system.set_value("/Control/Dvcc", 1)
    await bank.value_is(agg, CCL, 40.0)
    assert await ls.set(MAX_CURRENT, -1)
    await bank.value_is(agg, CCL, 200.0)

    # CVL: the highest while one balances, capped by the user voltage while DVCC is on.
    b.set_value("/Balancing", 1)
    await bank.value_is(agg, CVL, 56.0)
    assert await bank.read(agg, "/Balancing") == 1
    assert await ls.set(MAX_VOLTAGE, 53.0)
    await bank.value_is(agg, CVL, 53.0)
    system.set_value("/Control/Dvcc", 0)
    await bank.value_is(agg, CVL, 56.0)
    system.set_value("/Control/Dvcc", 1)
    await bank.value_is(agg, CVL, 53.0)
    assert await ls.set(MAX_VOLTAGE, 0.0)
    await bank.value_is(agg, CVL, 56.0)
    b.set_value("/Balancing", 0)
    await bank.value_is(agg, CVL, 55.2)
    assert proc.poll() is None
    bank.close()
    system.close()
    await ls.stop()
    ls.bus.disconnect()
    stand_in.service.close()


# ---- 6. over-current guard ---------------------------------------------------------------------------------------

async def test_over_current_guard_raises_the_share_and_logs_once(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=50.0, Io__AllowToCharge=1, Dc__0__Current=60.0)
    b = await bank.add("b", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Dc__0__Current=40.0,
                       Info__MaxDischargeCurrent=100.0)
    # Capacity shares (0.5 each): the guard's correction, not the learner, is what is seen here.
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="capacity", limits=FAST)
    row = await rows(bank, agg, 2)

    async def guarded() -> bool:
        ccl = await bank.read(agg, CCL)
        return ccl is not None and 0 < ccl and 0.6 * ccl <= 50.0 + 0.05

    await eventually(guarded, timeout=10)
    # a was seen carrying 60% of the bank current: its share is 0.6 now (50 A / 0.6 = 83.3 A for a rise), and the
    # 10 A it carries above its limit are taken back at its share as known (capacity: 0.5), not as raised:
    # 100 A - 10 A / 0.5. Had it taken them back at 0.6 (83.3 A), a would carry 51.7 A with a 0.5 share. (Waited
    # for: a tick just after the start can publish the first step of the start ramp, guarded too.)
    await bank.value_is(agg, CCL, 80.0)
    assert await bank.read(agg, f"/Batteries/{row['a']}/Share") >= 0.6 - 1e-4
    for limit in (90.0, 91.0, 92.0):  # recomputes at once, each gone out before the next: logged once
        b.set_value("/Info/MaxDischargeCurrent", limit)
        await bank.barrier(agg, "b")
    assert await bank.read(agg, CCL) <= 83.4
    marker = "its share is corrected"
    log = processes.output(proc)
    assert log.count(marker) == 1, log
    line = next(li for li in log.splitlines() if marker in li)
    assert bank.name("a") in line and "60%" in line and "charge" in line
    # The episode clears, and a new one is logged again.
    share = f"/Batteries/{row['a']}/Share"
    corrected = await bank.read(agg, share)
    a.set_value("/Dc/0/Current", 45.0)
    b.set_value("/Dc/0/Current", 55.0)

    async def observed() -> bool:  # a learns from this sample in the computation that also runs the guard
        return await bank.read(agg, share) != corrected

    await eventually(observed, timeout=10)
    assert processes.output(proc).count(marker) == 1
    a.set_value("/Dc/0/Current", 60.0)
    b.set_value("/Dc/0/Current", 40.0)
    await eventually(lambda: processes.output(proc).count(marker) == 2, timeout=5)
    assert await bank.read(agg, CCL) <= 83.4
    bank.close()


# ---- 7. learned shares survive a restart ------------------------------------------------------------------------

def _expected_shares(state: dict[str, Any], names: list[str]) -> dict[str, float]:
    """The charge shares the service would use from a saved state: marginal once enough change was seen,
    else the ratio, renormalised over the members."""
    shares = state["shares"]
    marginal = shares["marginal"]
    part = marginal if marginal["den"].get("charge", 0.0) >= 50.0 else shares["ratio"]
    den = part["den"]["charge"]
    raw = {n: max(0.0, v / den) for n, d, v in part["num"] if d == "charge" and n in names}
    total = sum(raw.values())
    return {n: s / total for n, s in raw.items()}


async def test_learned_shares_are_saved_and_used_at_once_after_a_restart(
        processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=300.0, Io__AllowToCharge=1, Dc__0__Current=0.0)
    b = await bank.add("b", Info__MaxChargeCurrent=300.0, Io__AllowToCharge=1, Dc__0__Current=0.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="share", limits=FAST)
    row = await rows(bank, agg, 2)
    assert await bank.read(agg, f"/Batteries/{row['a']}/Share") == 0.5  # nothing learned: capacity, equal
    # a takes 70% of every change of the bank current, b 30%: a few samples tell it (0.7 / 0.3, not the 0.5 of the
    # capacity fallback).
    for step in range(8):
        bank_current = 20.0 + 60.0 * (step % 5) / 4  # 20, 35, 50, 65, 80, 20, ...
        a.set_values({"/Dc/0/Current": round(0.7 * bank_current, 2), "/Dc/0/Voltage": 53.0 + step / 1000})
        b.set_values({"/Dc/0/Current": round(0.3 * bank_current, 2), "/Dc/0/Voltage": 53.0 + step / 1000})
        await asyncio.sleep(0.6)  # paces the samples: at most one is learned per second

    async def learned() -> tuple[float, float] | None:
        share_a = await bank.read(agg, f"/Batteries/{row['a']}/Share")
        share_b = await bank.read(agg, f"/Batteries/{row['b']}/Share")
        good = share_a == pytest.approx(0.7, abs=0.05) and share_b == pytest.approx(0.3, abs=0.05)
        return (share_a, share_b) if good else None

    learned_a, learned_b = await eventually(learned, timeout=10)
    proc.terminate()
    assert proc.wait(timeout=10) == 0

    path = tmp_path / "state" / f"batteryaggregator_{agg.rsplit('.', 1)[-1]}.json"
    assert path.exists(), list((tmp_path / "state").iterdir()) if (tmp_path / "state").exists() else None
    state = json.loads(path.read_text())
    assert isinstance(state, dict) and "shares" in state
    expected = _expected_shares(state, [bank.name("a"), bank.name("b")])
    assert expected[bank.name("a")] == pytest.approx(learned_a, abs=1e-3)
    assert expected[bank.name("b")] == pytest.approx(learned_b, abs=1e-3)

    # The bank at rest while the service is down: the restarted one has no current to learn the split from
    # again, so a share of 0.7 can only be the saved one.
    a.set_value("/Dc/0/Current", 0.0)
    b.set_value("/Dc/0/Current", 0.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="share", limits=FAST)
    row = await rows(bank, agg, 2)
    first: dict[str, Any] = {}

    async def shares_shown() -> bool:
        for suffix in ("a", "b"):
            first.setdefault(suffix, await bank.read(agg, f"/Batteries/{row[suffix]}/Share"))
            if first[suffix] is None:
                del first[suffix]
        return len(first) == 2

    await eventually(shares_shown, timeout=5)
    # The first share published is the learned one, not the capacity fallback of 0.5.
    assert first["a"] == pytest.approx(expected[bank.name("a")], abs=1e-4)
    assert first["b"] == pytest.approx(expected[bank.name("b")], abs=1e-4)
    assert "learned shares and IR estimates loaded" in processes.output(proc)
    bank.close()


# ---- 8. bad writes from other processes ---------------------------------------------------------------------------

async def test_bad_setvalue_on_every_path_is_refused_and_the_service_keeps_answering(
        processes: Processes, tmp_path: Path, busctl: Busctl) -> None:
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1)
    agg, proc = run(processes, tmp_path, bank, limits=FAST)
    await bank.value_is(agg, CCL, 100.0)
    await rows(bank, agg, 1)
    items = client.parse_items((await client.call(await connect(), agg, "/", "GetItems")).body[0])
    before = await bank.read(agg, "/LogLevel")
    name_before = await bank.read(agg, "/CustomName")

    # busctl: another process, the way a GX tool writes.
    async def code(path: str, *sig_and_args: str) -> int:
        return (await busctl.acall_json(agg, path, "SetValue", "v", *sig_and_args))["data"][0]

    assert await code("/CustomName", "as", "2", "x", "y") == 1
    assert await code("/CustomName", "b", "true") == 1
    assert await code("/LogLevel", "s", "LOUD") == 2
    assert await code("/LogLevel", "s", "debug") == 2
    assert await code("/LogLevel", "s", "") == 2
    assert await code("/LogLevel", "i", "10") == 2  # taken as the text '10', which is no level
    assert await code("/Info/MaxChargeCurrent", "d", "500") == 1
    assert await code("/Info/MaxChargeCurrent", "s", "lots") == 1
    assert await code("/Batteries/0/Share", "d", "1") == 1
    assert await code("/Aggregator/Status", "s", "ok") == 1
    wrong = await busctl.arun("call", agg, "/LogLevel", "com.victronenergy.BusItem", "SetValue", "s", "INFO",
                              check=False)
    assert wrong.returncode != 0  # not a variant: an error reply, not a crash
    missing = await busctl.arun("call", agg, "/No/Such/Path", "com.victronenergy.BusItem", "SetValue", "v", "i",
                                "1", check=False)
    assert missing.returncode != 0 and "no such path" in missing.stderr.lower()

    # Every other path of the aggregate is read-only, whatever the value.
    writer = await connect()
    writeable = {"/CustomName", "/LogLevel"}
    for path in items:
        if path in writeable:
            continue
        for variant in (Variant("i", 7), Variant("s", "x"), Variant("d", math.nan)):
            reply = await client.call(writer, agg, path, "SetValue", "v", [variant])
            assert reply.body[0] == 1, (path, variant)
    writer.disconnect()

    assert await bank.read(agg, "/LogLevel") == before
    assert await bank.read(agg, "/CustomName") == name_before
    assert await bank.read(agg, CCL) == 100.0
    assert await bank.read(agg, "/Connected") == 1
    assert proc.poll() is None
    # Good writes still work after all that.
    assert await code("/LogLevel", "s", "INFO") == 0
    await bank.value_is(agg, "/LogLevel", "INFO")
    assert await code("/CustomName", "s", "Shed bank") == 0
    await bank.value_is(agg, "/CustomName", "Shed bank")
    bank.close()


# ---- 7. an unknown limit never raises the bank's -----------------------------------------------------------------

HELD = "/Alarms/BmsCable"


@pytest.mark.parametrize("how", ["invalid", "stale", "vanished"])
async def test_an_unknown_member_limit_holds_the_bank_limit(processes: Processes, tmp_path: Path, how: str,
                                                            bus_address: str) -> None:
    """A member that sets the bank limit and then loses it (CCL invalid, no updates, gone from the bus) is still in
    parallel and still takes its share. Counted as carrying nothing, the other's share went back to 100% and the
    bank CCL rose from 20 to 100 A. Now the limit is held (it may only fall) until the member is known again."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=10.0, InstalledCapacity=100.0)
    b = await bank.add("b", Info__MaxChargeCurrent=100.0, InstalledCapacity=100.0, Info__MaxDischargeCurrent=100.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="capacity", reconnectTimeout=2,
                    limits={**FAST, "staleAfter": 1})
    await bank.value_is(agg, CCL, 20.0)  # a: 10 A at a half share
    assert await bank.read(agg, HELD) in (None, 0)
    if how == "invalid":
        a.set_value("/Info/MaxChargeCurrent", None)
    elif how == "stale":
        a.answering = False
    else:
        bank.members.pop("a").close()
    await bank.value_is(agg, HELD, 2)
    status = await bank.read(agg, "/Aggregator/Status")
    assert "charge limit held at 20 A" in status and "Pack a" in status, status
    if how == "vanished":  # gone from the bus for longer than the reconnect timeout
        await eventually(lambda: f"member {bank.name('a')} did not come back" in processes.output(proc))
    elif how == "stale":  # silent past staleAfter again: asked again, and still no answer
        async with CallWatch(bus_address, bank.name("a")) as probes:
            await eventually(lambda: probes.count >= 1, timeout=10)
    await recomputed(bank, agg, "b")
    assert await bank.read(agg, CCL) == 20.0
    assert "Pack a" in await bank.read(agg, "/Aggregator/Status")
    # The others may still lower it, and it stays there: held limits only fall.
    b.set_value("/Info/MaxChargeCurrent", 8.0)
    await bank.value_is(agg, CCL, 8.0)
    b.set_value("/Info/MaxChargeCurrent", 100.0)
    await recomputed(bank, agg, "b")
    assert await bank.read(agg, CCL) == 8.0
    log = processes.output(proc)
    assert "charge limit of Pack a is unknown" in log, log
    # Known again: the hold ends, the alarm clears and the limit goes back up.
    if how == "invalid":
        a.set_value("/Info/MaxChargeCurrent", 10.0)
    else:
        if how == "vanished":
            await bank.add("a", Info__MaxChargeCurrent=10.0, InstalledCapacity=100.0)
        a.answering = True
    await bank.value_is(agg, CCL, 20.0)
    await bank.value_is(agg, HELD, 0)
    assert "held" not in await bank.read(agg, "/Aggregator/Status")
    bank.close()


async def test_a_single_member_with_an_invalid_ccl_gives_0_and_ramps_back(processes: Processes,
                                                                          tmp_path: Path) -> None:
    """One member whose CCL goes invalid: the bank's CCL is 0, not invalid (an invalid CCL lets DVCC charge at the
    chargers' own maximum). When it is back the CCL ramps up from 0 rather than jumping."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=40.0)
    agg, _ = run(processes, tmp_path, bank, limits={"rampUpRate": 1000, "hysteresis": 0})
    await bank.value_is(agg, CCL, 40.0)
    a.set_value("/Info/MaxChargeCurrent", None)
    await bank.value_is(agg, CCL, 0.0)
    assert "unknown" in await bank.read(agg, "/Info/ChargeLimitation")
    bank.close()

    slow = Bank()
    b = await slow.add("b", Info__MaxChargeCurrent=None)
    agg, _ = run(processes, tmp_path, slow, suffix="slow", limits={"rampUpRate": 4}, excludedServices=[agg])
    await slow.value_is(agg, "/System/NrOfBatteries", 1)
    await slow.value_is(agg, CCL, 0.0)
    b.set_value("/Info/MaxChargeCurrent", 100.0)
    seen = await sample(slow, agg, CCL, 100.0, timeout=3, interval=0.25)
    values = [v for _, v in seen]
    assert values == sorted(values) and 0 < max(values) <= 20.0, seen  # ~4 A/s, not a jump to 100 A
    slow.close()


async def test_the_ccl_ramps_up_from_0_after_start_and_goes_on_across_a_reload(processes: Processes,
                                                                                tmp_path: Path) -> None:
    """A restart or a config reload (even touching the file) jumped straight to the target. (A change of the file
    and SIGHUP reload alike; SIGHUP does it without waiting for the file check.)"""
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=200.0)
    agg, proc = run(processes, tmp_path, bank, limits={"rampUpRate": 25})
    await bank.value_is(agg, "/System/NrOfBatteries", 1)
    first = await bank.read(agg, CCL)
    assert first is not None and first < 100.0, first  # from 0 at 25 A/s, not 200 A at once
    await eventually(lambda: _above(bank, agg, 40.0), timeout=10)
    config_path = tmp_path / "agg.json"
    config = json.loads(config_path.read_text())
    config["limits"]["hysteresis"] = 2.0  # a real change, applied in place
    config_path.write_text(json.dumps(config))
    proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "configuration reloaded" in processes.output(proc), timeout=10)
    assert await bank.read(agg, CCL) < 175.0  # still ramping: no jump to 200 A
    await bank.value_is(agg, CCL, 200.0, timeout=10)
    bank.close()


async def _above(bank: Bank, agg: str, level: float) -> float | None:
    """The CCL once it is above `level`, else None."""
    ccl = await bank.read(agg, CCL) or 0.0
    return ccl if ccl > level else None


async def test_of_one_pack_under_two_services_the_lower_limit_counts(processes: Processes, tmp_path: Path) -> None:
    """The service seen second was ignored even when its limit was lower."""
    bank = Bank()
    await bank.add("can", Serial="SN-TWO", Info__MaxChargeCurrent=50.0, Info__MaxDischargeCurrent=80.0)
    ser = await bank.add("ser", Serial="SN-TWO", Info__MaxChargeCurrent=20.0, Info__MaxDischargeCurrent=90.0,
                         Io__AllowToCharge=1)
    agg, _ = run(processes, tmp_path, bank, limits=FAST)
    await bank.value_is(agg, "/System/NrOfBatteries", 1)
    await bank.value_is(agg, CCL, 20.0)
    await bank.value_is(agg, DCL, 80.0)
    ser.set_value("/Io/AllowToCharge", 0)
    await bank.value_is(agg, CCL, 0.0)
    bank.close()


async def test_a_sign_inverted_member_current_does_not_blind_the_guard(processes: Processes,
                                                                       tmp_path: Path) -> None:
    """b really carries 40 of the bank's 60 A (twice its capacity share) but its driver publishes -40 A. Taken as
    is, the guard never saw b above its 30 A and the CCL was 90 A (b at 60 A, 200% of its limit). Its power says
    the sign is wrong: the shares fall back to capacity without the operating point, the guard sees 40 A, and
    the CCL keeps b within its limit."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=100.0, InstalledCapacity=200.0, Dc__0__Current=20.0,
                       Dc__0__Power=1060.0)
    b = await bank.add("b", Info__MaxChargeCurrent=30.0, InstalledCapacity=100.0, Dc__0__Current=-40.0,
                       Dc__0__Power=2120.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="capacity", limits=FAST)
    await bank.value_is(agg, "/System/NrOfBatteries", 2)

    async def measure() -> None:
        """Packs carrying current read it anew now and then (the check wants several readings that agree)."""
        step = 0
        while True:
            step += 1
            wobble = 0.1 if step % 2 else 0.0
            a.set_values({"/Dc/0/Current": 20.0 + wobble, "/Dc/0/Power": round(53.0 * (20.0 + wobble), 1)})
            b.set_values({"/Dc/0/Current": -40.0 - wobble, "/Dc/0/Power": round(53.0 * (40.0 + wobble), 1)})
            await asyncio.sleep(0.6)

    readings = asyncio.get_running_loop().create_task(measure())
    try:
        await bank.value_is(agg, CCL, 45.0)  # b: 30 A at the 2/3 share it was seen taking
        status = await bank.read(agg, "/Aggregator/Status")
        assert "current sign looks inverted" in status and "Pack b" in status, status
        assert "looks sign-inverted" in processes.output(proc)
    finally:
        readings.cancel()
    bank.close()


async def test_quiet_members_teach_the_split_and_a_rising_limit_says_so(processes: Processes, tmp_path: Path) -> None:
    """Shares are learned from complete samples: every member's current read anew since the last one. Victron
    services signal only changes, so a member whose current stays put sends nothing: it never counted, and a bank
    at a steady current never learned its split (the shares stayed at the capacity fallback). A current unchanged
    for a few seconds is its current. And while the CCL rises, /Info/ChargeLimitation says so in words."""
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Dc__0__Current=30.0)
    await bank.add("b", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Dc__0__Current=10.0)
    agg, _ = run(processes, tmp_path, bank, currentRatioMethod="share", limits={"rampUpRate": 2, "rampUpTime": 600})
    row = await rows(bank, agg, 2)
    await bank.value_is(agg, f"/Batteries/{row['a']}/Share", 0.75)  # 30 of 40 A, not the 0.5 of capacity
    await bank.value_is(agg, f"/Batteries/{row['b']}/Share", 0.25)
    limitation = await bank.read(agg, CCL.replace("MaxChargeCurrent", "ChargeLimitation"))
    assert limitation.startswith("rising to ") and " A at 2.0 A/s" in limitation, limitation
    bank.close()
