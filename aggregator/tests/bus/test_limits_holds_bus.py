"""Holds of the charge limits over a real bus: `battery-aggregator run` as its own process, member batteries built
by the tests on a private bus, the limits read by another client as the GX would.

The members signal a value only when it changes, as Victron's services do: nothing keeps them alive but that, so
every test is shorter than `limits.staleAfter` or sets it long."""
from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import Processes
from ..helpers import CallWatch, eventually
from .test_aggregate import Bank, bus_address  # noqa: F401
from .test_limits_bus import CCL, CVL, DCL, FAST, recomputed, run, sample

QUIET = {**FAST, "staleAfter": 600}  # no liveness probes during the test: fewer calls to reason about
HELD = "/Alarms/BmsCable"
HIGH_CHARGE = "/Alarms/HighChargeCurrent"
HIGH_DISCHARGE = "/Alarms/HighDischargeCurrent"


# ---- a pack that forbids a direction but is still connected ---------------------------------------------------

async def test_a_pack_that_forbids_charging_but_still_takes_current_holds_the_bank_at_0(
        processes: Processes, tmp_path: Path) -> None:
    """Many CAN BMSes ask for 0 (AllowToCharge 0, CCL 0) when cold or full and keep their contactor closed: the pack
    still takes its share. Left out of the sum, it took 30 A against its 0 while the bank's CCL was a's 100 A. Now
    the bank is held at 0 A (for packs in parallel, what keeps its current at 0) and says so."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Dc__0__Current=30.0)
    b = await bank.add("b", Info__MaxChargeCurrent=80.0, Io__AllowToCharge=1, Dc__0__Current=30.0,
                       Info__MaxDischargeCurrent=100.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="count", limits={**QUIET, "testCurrentInterval": 600})
    await bank.value_is(agg, CCL, 160.0)  # b's 80 A at a half share
    b.set_values({"/Io/AllowToCharge": 0, "/Info/MaxChargeCurrent": 0.0})  # its contactor stays closed
    await bank.value_is(agg, CCL, 0.0)
    assert await bank.read(agg, "/Io/AllowToCharge") == 0
    await bank.value_is(agg, HIGH_CHARGE, 2)
    status = await bank.read(agg, "/Aggregator/Status")
    assert "charge limit held at 0 A: Pack b forbids charging and still takes charge current" in status, status
    assert await bank.read(agg, "/Info/ChargeLimitation") == \
        "held at 0 A: Pack b forbids charging and still takes charge current"
    assert await bank.read(agg, HELD) in (None, 0)  # its limit is known: 0

    # The chargers obey and nothing flows: no current tells whether b is still connected, the hold stays.
    a.set_value("/Dc/0/Current", 0.0)
    b.set_value("/Dc/0/Current", 0.0)
    await bank.barrier(agg, "a")
    await recomputed(bank, agg, "b")
    assert await bank.read(agg, CCL) == 0.0
    assert await bank.read(agg, HIGH_CHARGE) == 2
    log = processes.output(proc)
    assert log.count("Pack b forbids charging but still takes 30.0 A of charge current") == 1, log

    b.set_values({"/Io/AllowToCharge": 1, "/Info/MaxChargeCurrent": 80.0})
    await bank.value_is(agg, CCL, 160.0)
    await bank.value_is(agg, HIGH_CHARGE, 0)
    assert await bank.read(agg, "/Io/AllowToCharge") == 1
    assert "held" not in await bank.read(agg, "/Aggregator/Status")
    assert "Pack b allows charging again" in processes.output(proc)
    bank.close()


async def test_a_test_current_tells_whether_a_pack_that_forbids_charging_is_still_connected(
        processes: Processes, tmp_path: Path) -> None:
    """Held at 0 A, no current tells anything. After `testCurrentInterval` a small current is allowed: the one at which
    b, if connected, would take 3 A. b still takes its share: held again. Next time it takes none while a does:
    its switch is open, it leaves the sum, and a charges up to its own limit (one full pack does not stop the
    others)."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Dc__0__Current=30.0)
    b = await bank.add("b", Info__MaxChargeCurrent=80.0, Io__AllowToCharge=1, Dc__0__Current=30.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="count", limits={**QUIET, "testCurrentInterval": 1})
    await bank.value_is(agg, CCL, 160.0)
    b.set_values({"/Io/AllowToCharge": 0, "/Info/MaxChargeCurrent": 0.0})
    await bank.value_is(agg, CCL, 0.0)
    a.set_value("/Dc/0/Current", 0.0)
    b.set_value("/Dc/0/Current", 0.0)

    await bank.value_is(agg, CCL, 6.0, timeout=6)  # 3 x 1 A over b's half share
    assert "probing whether Pack b" in await bank.read(agg, "/Aggregator/Status")
    assert await bank.read(agg, "/Io/AllowToCharge") == 1  # the test current may flow
    a.set_value("/Dc/0/Current", 3.0)
    b.set_value("/Dc/0/Current", 3.0)  # still connected
    await bank.value_is(agg, CCL, 0.0)
    assert await bank.read(agg, HIGH_CHARGE) == 2
    a.set_value("/Dc/0/Current", 0.0)
    b.set_value("/Dc/0/Current", 0.0)

    await bank.value_is(agg, CCL, 6.0, timeout=6)  # the next test current
    a.set_value("/Dc/0/Current", 6.0)  # b's BMS has opened its switch meanwhile: a takes it all
    seen = await sample(bank, agg, CCL, 100.0, timeout=10)
    assert seen[-1][1] == 100.0, seen  # a's own limit
    assert seen[-1][0] - seen[0][0] >= 2.0, seen  # not on one sample: the evidence has to last
    await bank.value_is(agg, HIGH_CHARGE, 0)
    status = await bank.read(agg, "/Aggregator/Status")
    assert "held" not in status and "probing" not in status, status
    assert "Pack b forbids charging and takes no charge current while the others do" in processes.output(proc)
    bank.close()


async def test_a_pack_that_forbids_discharging_but_still_takes_current_holds_the_dcl_at_0(
        processes: Processes, tmp_path: Path) -> None:
    """A DCL of 0 switches the inverter off: only because b forbids discharging and still takes discharge current
    (its contactor closed), and the status and the log say so. (One that carries nothing leaves the sum: see
    test_limits_bus.py::test_a_member_forbidding_a_direction_leaves_the_sum.)"""
    bank = Bank()
    await bank.add("a", Info__MaxDischargeCurrent=150.0, Io__AllowToDischarge=1, Dc__0__Current=-30.0)
    b = await bank.add("b", Info__MaxDischargeCurrent=120.0, Io__AllowToDischarge=1, Dc__0__Current=-30.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="count", limits={**QUIET, "testCurrentInterval": 600})
    await bank.value_is(agg, DCL, 240.0)  # b's 120 A at a half share
    b.set_value("/Io/AllowToDischarge", 0)
    await bank.value_is(agg, DCL, 0.0)
    assert await bank.read(agg, "/Io/AllowToDischarge") == 0
    await bank.value_is(agg, HIGH_DISCHARGE, 2)
    status = await bank.read(agg, "/Aggregator/Status")
    assert ("discharge limit held at 0 A (which switches the inverter off): Pack b forbids discharging and still "
            "takes discharge current") in status, status
    line = next(li for li in processes.output(proc).splitlines() if "forbids discharging but still takes" in li)
    assert "Pack b" in line and "30.0 A" in line and "switches the inverter off" in line, line
    b.set_value("/Io/AllowToDischarge", 1)
    await bank.value_is(agg, DCL, 240.0)
    await bank.value_is(agg, HIGH_DISCHARGE, 0)
    assert await bank.read(agg, "/Io/AllowToDischarge") == 1
    bank.close()


async def test_a_single_pack_that_forbids_charging_but_takes_current_says_so(processes: Processes,
                                                                            tmp_path: Path) -> None:
    """Alone in the bank its CCL of 0 was already the bank's; now the alarm and the status say why as well."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=50.0, Io__AllowToCharge=1, Dc__0__Current=10.0)
    agg, _ = run(processes, tmp_path, bank, limits=QUIET)
    await bank.value_is(agg, CCL, 50.0)
    a.set_values({"/Io/AllowToCharge": 0, "/Info/MaxChargeCurrent": 0.0})
    await bank.value_is(agg, CCL, 0.0)
    await bank.value_is(agg, HIGH_CHARGE, 2)
    assert "Pack a forbids charging and still takes charge current" in await bank.read(agg, "/Aggregator/Status")
    a.set_value("/Dc/0/Current", 0.0)
    a.set_values({"/Io/AllowToCharge": 1, "/Info/MaxChargeCurrent": 50.0})
    await bank.value_is(agg, CCL, 50.0)
    await bank.value_is(agg, HIGH_CHARGE, 0)
    bank.close()


async def test_a_pack_that_forbids_charging_during_the_start_ramp_stops_it(processes: Processes,
                                                                          tmp_path: Path) -> None:
    """The same fault while the CCL ramps up from 0 after start: 0 at once; when b allows again the CCL ramps up
    from 0 again rather than jumping back to where the ramp was."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Dc__0__Current=2.0)
    b = await bank.add("b", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Dc__0__Current=2.0)
    agg, _ = run(processes, tmp_path, bank, currentRatioMethod="count",
                 limits={"rampUpRate": 8, "staleAfter": 600, "testCurrentInterval": 600})
    await bank.value_is(agg, "/System/NrOfBatteries", 2)
    await eventually(lambda: _above(bank, agg, 12.0), timeout=10)
    b.set_values({"/Io/AllowToCharge": 0, "/Info/MaxChargeCurrent": 0.0})  # still 2 A: more than the noise
    await bank.value_is(agg, CCL, 0.0, timeout=2)
    a.set_value("/Dc/0/Current", 0.0)
    b.set_values({"/Dc/0/Current": 0.0, "/Io/AllowToCharge": 1, "/Info/MaxChargeCurrent": 100.0})
    seen = await sample(bank, agg, CCL, None, timeout=3.5, interval=0.25)
    values = [v for _, v in seen]
    assert values == sorted(values) and 12.0 <= values[-1] < 60.0, seen  # ~8 A/s, not a jump to 200 A
    # From 0: a first step of about a tick's 8 A, not back to where the ramp was (above 12 A).
    assert any(0.0 < v < 12.0 for v in values), seen
    bank.close()


async def test_a_pack_that_forbids_charging_during_an_unknown_limit_hold(processes: Processes,
                                                                        tmp_path: Path) -> None:
    """a's limit is unknown (held at 20 A), then b forbids charging and still takes current: 0 A, both alarms. When
    b allows again the unknown-limit hold is where the bank was meanwhile (a held limit only falls) until a's
    limit is known again."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=10.0, Io__AllowToCharge=1)
    b = await bank.add("b", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Info__MaxDischargeCurrent=100.0)
    agg, _ = run(processes, tmp_path, bank, currentRatioMethod="count", limits={**QUIET, "testCurrentInterval": 600})
    await bank.value_is(agg, CCL, 20.0)
    a.set_value("/Info/MaxChargeCurrent", None)
    await bank.value_is(agg, HELD, 2)
    assert await bank.read(agg, CCL) == 20.0
    a.set_value("/Dc/0/Current", 5.0)
    b.set_values({"/Io/AllowToCharge": 0, "/Info/MaxChargeCurrent": 0.0, "/Dc/0/Current": 5.0})
    await bank.value_is(agg, CCL, 0.0)
    await bank.value_is(agg, HIGH_CHARGE, 2)
    status = await bank.read(agg, "/Aggregator/Status")
    assert "limit of Pack a unknown" in status and "Pack b forbids charging" in status, status
    assert await bank.read(agg, HELD) == 2
    a.set_value("/Dc/0/Current", 0.0)
    b.set_values({"/Dc/0/Current": 0.0, "/Io/AllowToCharge": 1, "/Info/MaxChargeCurrent": 100.0})
    await bank.value_is(agg, HIGH_CHARGE, 0)
    await bank.barrier(agg, "a")
    await recomputed(bank, agg, "b")
    assert await bank.read(agg, CCL) == 0.0
    a.set_value("/Info/MaxChargeCurrent", 10.0)
    await bank.value_is(agg, CCL, 20.0)
    await bank.value_is(agg, HELD, 0)
    bank.close()


async def _above(bank: Bank, agg: str, level: float) -> bool:
    return (await bank.read(agg, CCL) or 0.0) > level


async def _status_has(bank: Bank, agg: str, text: str) -> bool:
    return text in await bank.read(agg, "/Aggregator/Status")


# ---- the CVL ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["invalid", "stale", "vanished"])
async def test_an_unknown_member_cvl_holds_the_bank_cvl(processes: Processes, tmp_path: Path, how: str,
                                                        bus_address: str) -> None:
    """The member with the lowest CVL publishes an invalid one, stops answering or leaves the bus: the bank's CVL
    rose to the other's 56.8 V. It is held (it may only fall) until the member's CVL is known again, as the CCL
    is."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeVoltage=55.2, Balancing=0)
    b = await bank.add("b", Info__MaxChargeVoltage=56.8, Balancing=0, Info__MaxDischargeCurrent=100.0)
    agg, proc = run(processes, tmp_path, bank, reconnectTimeout=2,
                    limits={**QUIET, "voltageRampUpRate": 10, "voltageHysteresis": 0,
                            "staleAfter": 1 if how == "stale" else QUIET["staleAfter"]})
    await bank.value_is(agg, CVL, 55.2)  # the lowest while nobody balances
    if how == "invalid":
        a.set_value("/Info/MaxChargeVoltage", None)
    elif how == "stale":
        a.answering = False  # silent, and it no longer answers when asked
    else:
        bank.members.pop("a").close()
    await bank.value_is(agg, HELD, 2)
    status = await bank.read(agg, "/Aggregator/Status")
    assert "charge voltage limit held at 55.2 V: limit of Pack a unknown" in status, status
    if how == "vanished":  # gone for longer than the reconnect timeout
        await eventually(lambda: f"member {bank.name('a')} did not come back" in processes.output(proc))
    elif how == "stale":  # silent past staleAfter again: asked again, and still no answer
        async with CallWatch(bus_address, bank.name("a")) as probes:
            await eventually(lambda: probes.count >= 1, timeout=10)
    await recomputed(bank, agg, "b")
    assert await bank.read(agg, CVL) == 55.2
    b.set_value("/Info/MaxChargeVoltage", 55.0)  # the others may still lower it...
    await bank.value_is(agg, CVL, 55.0)
    b.set_value("/Info/MaxChargeVoltage", 56.8)  # ...and it stays there
    await recomputed(bank, agg, "b")
    assert await bank.read(agg, CVL) == 55.0
    assert "charge voltage limit of Pack a is unknown" in processes.output(proc)
    if how == "invalid":
        a.set_value("/Info/MaxChargeVoltage", 55.2)
    elif how == "stale":
        a.answering = True
    else:
        await bank.add("a", Info__MaxChargeVoltage=55.2, Balancing=0)
    await bank.value_is(agg, CVL, 55.2)
    await bank.value_is(agg, HELD, 0)
    assert "held" not in await bank.read(agg, "/Aggregator/Status")
    bank.close()


# ---- holds that must not rise -------------------------------------------------------------------------------------

async def test_a_hold_that_starts_during_the_start_ramp_holds_the_published_value(processes: Processes,
                                                                                 tmp_path: Path) -> None:
    """The CCL ramps up from 0 after start; a's limit becomes unknown on the way. The hold held the target: the
    CCL went on rising while the status said "held at 200 A". It holds what was published."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=100.0)
    await bank.add("b", Info__MaxChargeCurrent=100.0)
    agg, _ = run(processes, tmp_path, bank, currentRatioMethod="count", limits={"rampUpRate": 8, "staleAfter": 600})
    await bank.value_is(agg, "/System/NrOfBatteries", 2)
    await eventually(lambda: _above(bank, agg, 12.0), timeout=10)
    a.set_value("/Info/MaxChargeCurrent", None)
    await bank.value_is(agg, HELD, 2)
    first = await bank.read(agg, CCL)
    # Rising on at 8 A/s, it would be 16 A higher within these 2 s.
    seen = await sample(bank, agg, CCL, None, timeout=2.0, interval=0.25)
    assert max(v for _, v in seen) <= first + 8.0 * 0.5, (first, seen)  # at most a tick's step after the hold
    held = seen[-1][1]
    assert held < 40.0, seen
    assert f"charge limit held at {held:g} A" in await bank.read(agg, "/Aggregator/Status")
    bank.close()


@pytest.mark.parametrize("cautious,how", [("first", "invalid"), ("second", "invalid"), ("first", "vanished"),
                                          ("second", "vanished")])
async def test_an_unknown_limit_of_either_service_of_one_pack_holds(processes: Processes, tmp_path: Path,
                                                                    cautious: str, how: str) -> None:
    """One pack under two services (same /Serial), the cautious one at 50 A: when its CCL became invalid or its
    service left, the other's 100 A counted and the bank's CCL rose from 100 to 200 A with no alarm. Whichever
    service stands for the pack, an unknown limit of either holds the bank's."""
    bank = Bank()
    first, second = ("careful", "bold") if cautious == "first" else ("bold", "careful")
    pack = {"Serial": "SN-TWO", "Io__AllowToCharge": 1}

    def limit(name: str) -> float:
        return 50.0 if name == "careful" else 100.0

    await bank.add(first, Info__MaxChargeCurrent=limit(first), **pack)
    await bank.add("other", Info__MaxChargeCurrent=100.0, Info__MaxDischargeCurrent=100.0)
    agg, _ = run(processes, tmp_path, bank, currentRatioMethod="count", reconnectTimeout=30, limits=QUIET)
    await bank.value_is(agg, "/System/NrOfBatteries", 2)
    await bank.add(second, Info__MaxChargeCurrent=limit(second), **pack)  # the aggregate stands for the pack
    # through the service it saw first
    await eventually(lambda: _status_has(bank, agg, f"{bank.name(second)} (same battery as {bank.name(first)})"))
    await bank.value_is(agg, CCL, 100.0)  # the pack's 50 A at a half share
    if how == "invalid":
        bank.members["careful"].set_value("/Info/MaxChargeCurrent", None)
    else:
        bank.members.pop("careful").close()
    await bank.value_is(agg, HELD, 2)
    await recomputed(bank, agg, "other")
    assert await bank.read(agg, CCL) == 100.0
    assert "unknown" in await bank.read(agg, "/Aggregator/Status")
    if how == "invalid":
        bank.members["careful"].set_value("/Info/MaxChargeCurrent", 50.0)
    else:
        await bank.add("careful", Info__MaxChargeCurrent=50.0, **pack)
    await bank.value_is(agg, HELD, 0)
    assert await bank.read(agg, CCL) == 100.0
    bank.close()


# ---- logs ---------------------------------------------------------------------------------------------------------

async def test_a_held_limit_that_falls_is_logged_once(processes: Processes, tmp_path: Path) -> None:
    """The held value was part of the logged status: each change of it logged a `status:` warning again. The
    status shows the value; the log says when the hold starts and when it ends."""
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=10.0)
    b = await bank.add("b", Info__MaxChargeCurrent=100.0, Info__MaxDischargeCurrent=100.0)
    agg, proc = run(processes, tmp_path, bank, currentRatioMethod="count", limits=QUIET)
    await bank.value_is(agg, CCL, 20.0)
    a.set_value("/Info/MaxChargeCurrent", None)
    await bank.value_is(agg, HELD, 2)
    await eventually(lambda: "status: " in processes.output(proc) and "held" in processes.output(proc))
    before = processes.output(proc).count("status: ")
    for limit in (19.0, 17.0, 15.0, 13.0, 11.0):  # b alone: its own limit, below the held 20 A
        b.set_value("/Info/MaxChargeCurrent", limit)
        await bank.value_is(agg, CCL, limit)
        assert f"charge limit held at {limit:g} A" in await bank.read(agg, "/Aggregator/Status")
    log = processes.output(proc)
    assert log.count("status: ") == before, log
    assert log.count("charge limit of Pack a is unknown") == 1, log
    a.set_value("/Info/MaxChargeCurrent", 10.0)
    await bank.value_is(agg, HELD, 0)
    await eventually(lambda: processes.output(proc).count("status: ") == before + 1)
    log = processes.output(proc)
    assert log.count("limit is known again") == 1, log
    await recomputed(bank, agg, "b")
    assert processes.output(proc).count("status: ") == before + 1
    bank.close()
