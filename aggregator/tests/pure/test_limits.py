"""Charge limits (pure): ratio methods, safety rules, CVL/CCL modes, smoothing, the share learner, the guard."""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from aggregator.limits.controller import ChargeControl, MemberInput, one_pack
from aggregator.config import parse_config
from aggregator.limits.formulas import (CARRYING, CHARGE, DISCHARGE, DISCONNECTED, NOISE_CURRENT, DvccLimits,
                                        LimitSmoother, MemberLimits, apply_ccl_mode, apply_cvl_mode, bank_current_limit,
                                        charge_voltage_limit, connection_evidence, over_current)
from aggregator.limits.shares import ShareLearner
from aggregator.battery.sanitize import check_values
from aggregator_dev.simulator.physics import Bank, Pack, PackParams


def m(name: str, **kw: object) -> MemberLimits:
    kw.setdefault("allow_charge", 1)
    kw.setdefault("allow_discharge", 1)
    return MemberLimits(name, name.upper(), **kw)  # type: ignore[arg-type]


# ---- ratio methods -------------------------------------------------------------------------------------

def test_count_capacity_and_ir_shares() -> None:
    bank = [m("a", ccl=140.0, capacity=280.0, resistance=0.006), m("b", ccl=100.0, capacity=200.0,
                                                                   resistance=0.009)]
    # count: equal shares, b binds: 100 / 0.5
    assert bank_current_limit(bank, CHARGE, "count").value == pytest.approx(200.0)
    # capacity: a has 280/480 -> 140 / 0.5833 = 240; b 100 / 0.4167 = 240
    assert bank_current_limit(bank, CHARGE, "capacity").value == pytest.approx(240.0)
    # ir: shares 1/R: a 0.6, b 0.4 -> a: 233.3, b: 250
    result = bank_current_limit(bank, CHARGE, "ir")
    assert result.value == pytest.approx(140 / 0.6)
    assert result.limiting == "a" and result.method == "ir"
    assert "A: 140 A at a 60% share (ir)" in result.reason


def test_methods_fall_back_when_a_member_lacks_data() -> None:
    bank = [m("a", ccl=100.0, capacity=100.0, resistance=0.01), m("b", ccl=100.0, capacity=300.0)]
    assert bank_current_limit(bank, CHARGE, "ir").method == "capacity"  # b has no usable IR
    assert bank_current_limit(bank, CHARGE, "share").method == "capacity"
    no_capacity = [m("a", ccl=100.0), m("b", ccl=50.0, capacity=10.0)]
    assert bank_current_limit(no_capacity, CHARGE, "capacity").method == "count"


def test_a_member_with_open_fets_leaves_only_itself() -> None:
    bank = [m("a", ccl=100.0, capacity=100.0), m("b", ccl=100.0, capacity=100.0, allow_charge=0),
            m("c", ccl=100.0, capacity=100.0)]
    result = bank_current_limit(bank, CHARGE, "capacity")
    # a and c take all the current: 50% each -> 200 A, not 0 and not 300
    assert result.value == pytest.approx(200.0)
    assert set(result.shares) == {"a", "c"}


def test_nobody_allowed_is_zero_and_no_data_is_invalid() -> None:
    assert bank_current_limit([m("a", ccl=100.0, allow_charge=0)], CHARGE, "count").value == 0.0
    assert bank_current_limit([MemberLimits("a", "A")], CHARGE, "count").value is None
    assert bank_current_limit([], CHARGE, "count").value is None


def test_stale_or_limitless_members_lower_the_limit_without_zeroing_it() -> None:
    fresh = [m("a", ccl=100.0), m("b", ccl=100.0)]
    assert bank_current_limit(fresh, CHARGE, "count").value == pytest.approx(200.0)
    stale = [m("a", ccl=100.0), m("b", ccl=100.0, fresh=False)]
    result = bank_current_limit(stale, CHARGE, "count")
    assert result.value == pytest.approx(100.0)  # b's capacity is not counted
    assert "counted as carrying nothing: B" in result.reason
    no_limit = [m("a", ccl=100.0), m("b")]
    assert bank_current_limit(no_limit, CHARGE, "count").value == pytest.approx(100.0)
    all_stale = [m("a", ccl=100.0, fresh=False)]
    assert bank_current_limit(all_stale, CHARGE, "count").value == 0.0  # never "no limit"


def test_share_floor_from_the_guard_lowers_the_limit() -> None:
    bank = [m("a", ccl=100.0), m("b", ccl=100.0)]
    assert bank_current_limit(bank, CHARGE, "count", {"a": 0.8}).value == pytest.approx(125.0)


# ---- properties ---------------------------------------------------------------------------------------

bank_st = st.lists(
    st.tuples(st.floats(0.001, 0.05), st.floats(5.0, 400.0), st.floats(10.0, 500.0), st.sampled_from([0, 1, 1, 1])),
    min_size=2, max_size=16)


@settings(max_examples=300, deadline=None)
@given(bank_st, st.sampled_from(["share", "ir"]))
def test_at_the_published_ccl_no_member_exceeds_its_own_once_converged(rows, method) -> None:
    """The bank takes the published CCL and splits it by the true 1/R_k among the members allowed to charge:
    nobody exceeds its own CCL by more than the tolerance (the estimators have converged)."""
    members = []
    conducting = {f"m{i}": 1.0 / r for i, (r, _, _, allow) in enumerate(rows) if allow}
    total = sum(conducting.values())
    learner = ShareLearner(tau=1e9)
    if total:
        for step in range(30):  # converged: samples of the true split
            current = 20.0 + 7.0 * step
            learner.update({name: current * g / total for name, g in conducting.items()}, float(step))
    for i, (r, ccl, cap, allow) in enumerate(rows):
        name = f"m{i}"
        share = learner.share(name, CHARGE)
        members.append(MemberLimits(name, name, ccl=ccl, capacity=cap, allow_charge=allow, resistance=r,
                                    learned_share={CHARGE: share} if share else {}))
    result = bank_current_limit(members, CHARGE, method)
    if not conducting:
        assert result.value == 0.0
        return
    assert result.value is not None and result.value >= 0
    for name, g in conducting.items():
        carried = result.value * g / total
        own = next(x.ccl for x in members if x.name == name)
        assert carried <= own * 1.001 + 1e-6, (name, carried, own)


@settings(max_examples=300, deadline=None)
@given(bank_st, st.sampled_from(["share", "ir", "capacity", "count"]), st.sampled_from([CHARGE, DISCHARGE]))
def test_limit_never_above_the_sum_of_member_limits_nor_negative(rows, method, direction) -> None:
    members = [MemberLimits(f"m{i}", "x", ccl=ccl, dcl=ccl, capacity=cap, allow_charge=allow,
                            allow_discharge=allow, resistance=r) for i, (r, ccl, cap, allow) in enumerate(rows)]
    value = bank_current_limit(members, direction, method).value
    assert value is not None and value >= 0
    assert value <= sum(x.ccl for x in members if x.allowed(direction)) * (1 + 1e-9) + 1e-9


def parallel_bank(rows: list[tuple[float, float, float]], amount: float, direction: str
                  ) -> tuple[list[MemberLimits], Callable[[float], list[float]], float]:
    """Packs in parallel, rows of (R ohm, open-circuit voltage offset V, own limit A), carrying `amount` A of
    bank current in `direction`, their marginal shares settled: (members, the split of any bank amount into
    member amounts, the true bank limit). Offsets set them at different states of charge: the fuller take
    less than their share, the emptier more (circulating current)."""
    sign = 1.0 if direction == CHARGE else -1.0
    g = [1.0 / r for r, _, _ in rows]
    total = sum(g)
    shares = [x / total for x in g]
    mean = sum(x * e for x, (_, e, _) in zip(g, rows)) / total
    offsets = [x * (mean - e) for x, (_, e, _) in zip(g, rows)]  # what each carries at 0 A bank current

    def split(bank: float) -> list[float]:
        return [a * bank + c for a, c in zip(shares, offsets)]

    truth = min((limit - c) / a for a, c, (_, _, limit) in zip(shares, offsets, rows))
    members = [MemberLimits(f"m{i}", f"M{i}", ccl=limit, dcl=limit, allow_charge=1, allow_discharge=1,
                            learned_share={direction: a}, settled=frozenset({direction}), current=sign * now)
               for i, (a, now, (_, _, limit)) in enumerate(zip(shares, split(amount), rows))]
    return members, split, truth


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.002, 0.03), st.floats(-0.05, 0.05), st.floats(2.0, 300.0)), min_size=1,
                max_size=12),
       st.floats(0.0, 1.5), st.sampled_from([CHARGE, DISCHARGE]))
def test_with_settled_shares_the_most_loaded_member_is_brought_to_90_to_100_percent_of_its_limit(
        rows, where, direction) -> None:
    """Packs in parallel at different states of charge, the bank current anywhere from 0 to 150% of its true
    limit: the next limit keeps every member within its own, and from near the limit (or above it) puts the
    most loaded one at 90% of it or more. The lower of the plain ratio and the extrapolation let the fuller
    packs, which take less than their share, sit far below their limits."""
    _, split, truth = parallel_bank(rows, 0.0, direction)
    assume(truth > 1.0)  # else a member is above its limit at 0 A bank current: no bank limit helps
    members, split, truth = parallel_bank(rows, where * truth, direction)
    result = bank_current_limit(members, direction, "share")
    assert result.value is not None and result.tracking
    carried = split(result.value)
    loads = [amount / limit for amount, (_, _, limit) in zip(carried, rows)]
    assert max(loads) <= 1.0 + 1e-9, (loads, result.value, truth)
    if where >= 0.95:
        assert max(loads) >= 0.9, (loads, result.value, truth)


# ---- CVL and DVCC --------------------------------------------------------------------------------------

def cvl_bank(balancing: int = 0, modes: tuple[str, str] = ("Bulk", "Bulk")) -> list[MemberLimits]:
    return [m("a", cvl=55.2, charge_mode=modes[0], balancing=balancing), m("b", cvl=56.0, charge_mode=modes[1])]


@pytest.mark.parametrize("mode,bank,expected", [
    ("min_when_balancing", cvl_bank(balancing=1), 55.2),
    ("max_when_balancing", cvl_bank(), 55.2),
    ("max_when_balancing", cvl_bank(balancing=1), 56.0),
    ("max_always", cvl_bank(), 56.0),
    ("max_when_floating", cvl_bank(modes=("Float", "Bulk")), 56.0),  # the floating one is left out
    ("max_when_floating", cvl_bank(modes=("Float", "Float")), 56.0),
    ("max_when_floating", cvl_bank(modes=("Bulk", "Absorption")), 55.2),
    ("min_when_balancing", cvl_bank(modes=("Float", "Bulk")), 56.0),  # only b still charges
])
def test_cvl_modes(mode, bank, expected) -> None:
    assert charge_voltage_limit(bank, mode)[0] == pytest.approx(expected)


def test_dvcc_user_limits() -> None:
    battery = bank_current_limit([m("a", ccl=100.0)], CHARGE, "count")
    on = DvccLimits(True, 60.0, 54.0)
    off = DvccLimits(False, 60.0, 54.0)
    assert apply_ccl_mode(battery, "battery+dvcc", on)[0] == 60.0
    assert apply_ccl_mode(battery, "battery+dvcc", off)[0] == 100.0
    assert apply_ccl_mode(battery, "battery", on)[0] == 100.0
    assert apply_ccl_mode(battery, "dvcc", on)[0] == 60.0
    assert apply_ccl_mode(battery, "dvcc", DvccLimits(True, -1.0, 0.0))[0] == 100.0  # -1 = no user limit
    assert apply_cvl_mode(55.2, "", "min_when_balancing", on)[0] == 54.0  # the user voltage caps every mode
    assert apply_cvl_mode(53.0, "", "min_when_balancing", on)[0] == 53.0
    assert apply_cvl_mode(53.0, "", "dvcc", on)[0] == 54.0  # dvcc mode tracks the user voltage
    assert apply_cvl_mode(55.2, "", "dvcc", DvccLimits(True, -1, 0))[0] == 55.2  # 0 = none


# ---- smoothing -----------------------------------------------------------------------------------------

def test_limits_drop_at_once_and_rise_slowly_with_hysteresis() -> None:
    smoother = LimitSmoother(rise_rate=2.0, hysteresis=1.0)
    assert smoother.update(100.0, 0.0) == 100.0
    assert smoother.update(40.0, 1.0) == 40.0  # at once
    assert smoother.update(100.0, 2.0) == 40.0 and smoother.ramping  # the ramp starts here...
    assert smoother.update(100.0, 3.0) == 42.0  # ...at 2 A/s
    assert smoother.update(100.0, 6.0) == 48.0
    assert smoother.update(47.9, 7.0) == 47.9 and not smoother.ramping  # any drop goes out at once
    assert smoother.update(48.5, 8.0) == 47.9 and not smoother.ramping  # a rise below the hysteresis
    assert smoother.update(None, 9.0) is None


def test_a_ramp_after_a_quiet_time_starts_then_and_reaches_its_target() -> None:
    smoother = LimitSmoother(rise_rate=2.0, hysteresis=5.0)
    smoother.update(50.0, 0.0)
    assert smoother.update(60.0, 100.0) == 50.0  # quiet for 100 s: no jump to 60
    values = [smoother.update(60.0, 100.0 + t) for t in range(1, 8)]
    assert values[:4] == [52.0, 54.0, 56.0, 58.0]
    assert values[-1] == 60.0 and not smoother.ramping  # the last 4 A are not held back by the hysteresis


def test_a_ramp_that_reads_as_its_target_has_ended() -> None:
    """Published at 0.1 A, 149.96 A reads as 150 A: the ramp ends there, and a rise of the target by less than
    the hysteresis in that moment is held like any other (it was carried to 150.6 A by the ramp before)."""
    smoother = LimitSmoother(rise_rate=5.0, hysteresis=1.0, resolution=0.05)
    smoother.update(50.0, 0.0)
    smoother.update(150.0, 1.0)  # the ramp starts
    smoother.update(150.0, 20.992)  # 50 + 5 x 19.992 = 149.96
    assert smoother.value == 150.0 and not smoother.ramping
    assert smoother.update(150.6, 21.5) == 150.0  # below the hysteresis: held


def test_a_large_bank_ramps_up_within_the_rise_time_and_a_small_one_at_the_rise_rate() -> None:
    """At 2 A/s alone, 2824 A took 23.5 minutes from 0; with a rise time of 30 s it takes 30 s, and a 20 A bank
    still rises at 2 A/s (10 s), not at 20 A / 30 s."""
    big = LimitSmoother(rise_rate=2.0, hysteresis=1.0, resolution=0.05, from_zero=True, rise_time=30.0)
    assert big.update(2824.0, 0.0) == 0.0 and big.ramping
    values = [big.update(2824.0, float(t)) for t in range(1, 31)]
    assert values[0] == pytest.approx(2824.0 / 30)
    assert values[-1] == 2824.0 and not big.ramping
    small = LimitSmoother(rise_rate=2.0, hysteresis=1.0, resolution=0.05, from_zero=True, rise_time=30.0)
    small.update(20.0, 0.0)
    assert [small.update(20.0, float(t)) for t in (1, 5, 10)] == [2.0, 10.0, 20.0]
    assert not small.ramping


def test_by_default_a_current_limit_rises_at_2_a_per_s_or_within_30_s() -> None:
    """The defaults the bus tests shorten (they set limits.rampUpTime / rampUpRate to take seconds, not half a
    minute): the CCL and DCL ramps of the controller use them."""
    control = ChargeControl(parse_config({}))
    for smoother in (control.ccl_smoother, control.dcl_smoother):
        assert (smoother.rise_rate, smoother.rise_time, smoother.hysteresis) == (2.0, 30.0, 1.0)
    assert control.ccl_smoother.from_zero and not control.dcl_smoother.from_zero


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 5.0), st.one_of(st.none(), st.floats(0.0, 5000.0))), min_size=1,
                max_size=40),
       st.floats(0.1, 50.0), st.floats(0.0, 20.0), st.floats(1.0, 120.0), st.booleans())
@example(steps=[(1.0, 1.0), (1.0, 1.0)], rise_rate=0.96875, hysteresis=0.0, rise_time=2.0, from_zero=True)
def test_a_smoothed_limit_never_exceeds_its_target_drops_at_once_and_rises_monotonically(
        steps, rise_rate, hysteresis, rise_time, from_zero) -> None:
    """Whatever the targets: never above the target, a drop (or None) at once, a rise never faster than the
    larger of the rise rate and target / rise time (but for the last published step), never a fall while the
    target does not fall."""
    smoother = LimitSmoother(rise_rate, hysteresis, 0.05, from_zero=from_zero, rise_time=rise_time)
    now, last, last_target = 0.0, None, None
    for dt, target in steps:
        now += dt
        value = smoother.update(target, now)
        if target is None:
            assert value is None
        elif value is not None:
            assert value <= target + 1e-9
            if last is not None:
                if target <= last:
                    assert value == target  # a drop goes out at once
                else:
                    # a ramp that comes within one published step (0.05) of its target ends there
                    assert last <= value <= last + max(rise_rate, target / rise_time) * dt + 0.05 + 1e-6
            if last_target is not None and target >= last_target and last is not None:
                assert value >= last - 1e-9
        last, last_target = value, target


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 10000.0), st.floats(0.0, 10000.0), st.floats(0.1, 50.0), st.floats(1.0, 120.0),
       st.floats(0.2, 2.0))
def test_a_ramp_reaches_a_steady_target_within_the_rise_time(start, target, rise_rate, rise_time, tick) -> None:
    smoother = LimitSmoother(rise_rate, 1.0, 0.05, rise_time=rise_time)
    smoother.update(start, 0.0)
    expected = start if start < target < start + 1.0 else target  # a rise below the hysteresis is not made
    now = 0.0
    while now < rise_time + 2 * tick + 1e-9:
        now += tick
        if smoother.update(target, now) == expected:
            break
    assert smoother.value == expected, (smoother.value, now)


# ---- against the physics -------------------------------------------------------------------------------

PHYSICS_PACKS = [  # those of bench/limits_day.py
    PackParams(name="A", service="a", capacity_ah=280, r_mohm=6, max_charge_current=140),
    PackParams(name="B", service="b", capacity_ah=200, soh=85, r_mohm=11, max_charge_current=100),
    PackParams(name="C", service="c", capacity_ah=100, r_mohm=8, max_charge_current=50),
    PackParams(name="D", service="d", capacity_ah=150, r_mohm=16, max_charge_current=75),
]


@pytest.mark.parametrize("socs", [(60, 55, 70, 50), (85, 80, 90, 75)], ids=["bulk", "taper"])
def test_on_the_physics_the_most_loaded_pack_sits_at_90_to_100_percent_at_the_bank_limit(socs) -> None:
    """Four packs in parallel at different states of charge, the controller fed with their values every 5 s.
    For 15 minutes the house's loads switch on and off (the bank's own changes teach the split); then the sun
    offers more than the bank takes. At the bank's limit the most loaded pack (C, the fullest, which takes
    less than its share) sits at 90% of its own limit or more, and never above it. The lower of the plain
    ratio and the extrapolation held it at 66% (bulk) and 38% (taper)."""
    control = ChargeControl(parse_config({"currentRatioMethod": "share"}))
    packs = [Pack(dataclasses.replace(p, soc=soc), seed=1) for p, soc in zip(PHYSICS_PACKS, socs)]
    bank = Bank(packs)
    loads = []
    for tick in range(420):
        t = 5.0 * tick
        inputs = [MemberInput(p.service, p.name, check_values(p.values())[0], True) for p in packs]
        control.observe(inputs, t)
        published = control.update(inputs, DvccLimits(), t).ccl
        assert published is not None
        offered = 400.0 if t >= 900 else 60.0 - 30.0 * (int(t // 60) % 3 == 0) - 15.0 * (int(t // 60) % 2)
        own = [p.limits().ccl for p in packs]
        state = bank.step(min(offered, published), 5.0)
        if t >= 900:
            assert published < offered  # the bank is at its limit
            assert all(i <= limit for i, limit in zip(state.currents, own)), (t, state.currents, own)
            loads.append(max(i / limit for i, limit in zip(state.currents, own)))
    assert statistics.median(loads[24:]) >= 0.9, loads  # after two minutes at the limit
    assert control.learner.settled(CHARGE)


# ---- the learner and the guard -------------------------------------------------------------------------

def test_share_learner_follows_a_change_and_reports_its_error() -> None:
    learner = ShareLearner(tau=60.0)
    for t in range(300):
        current = 50.0 + (t % 7) * 10
        learner.update({"a": 0.7 * current, "b": 0.3 * current}, float(t))
    assert learner.share("a", CHARGE) == pytest.approx(0.7, abs=0.01)
    for t in range(300, 900):  # b warms up and takes more
        current = 50.0 + (t % 7) * 10
        learner.update({"a": 0.5 * current, "b": 0.5 * current}, float(t))
    assert learner.share("a", CHARGE) == pytest.approx(0.5, abs=0.02)
    assert learner.prediction_error("a", CHARGE) is not None
    assert learner.predict(100.0)["b"] == pytest.approx(50.0, abs=2)
    assert learner.share("a", DISCHARGE) is None  # learned per direction


def test_the_split_settles_on_the_banks_own_changes_not_on_those_of_a_limit_that_tracks_the_currents() -> None:
    """A limit that tracks the members' currents moves the bank with the drift of the member at its aim, whose
    current then stays put whatever its share: learned, its share would shrink to nothing here (and to half of
    it in a steady drift). Changes at a limit that does not track (plain ratios) teach the split but do not
    settle it; the bank's own changes do."""
    learner = ShareLearner(tau=1e9)
    for t in range(40):
        bank = 100.0 + 5.0 * (t % 2)
        learner.update({"a": 30.0, "b": bank - 30.0}, float(t), at_limit=True, tracking=True)
    assert learner.marginal_share("a", CHARGE) is None and not learner.settled(CHARGE)
    for t in range(40, 80):
        bank = 100.0 + 20.0 * (t % 2)
        learner.update({"a": 0.4 * bank - 10.0, "b": 0.6 * bank + 10.0}, float(t), at_limit=True)
    assert learner.marginal_share("a", CHARGE) == pytest.approx(0.4) and not learner.settled(CHARGE)
    for t in range(80, 90):
        bank = 50.0 + 20.0 * (t % 2)
        learner.update({"a": 0.4 * bank - 10.0, "b": 0.6 * bank + 10.0}, float(t))
    assert learner.settled(CHARGE) and learner.share("a", CHARGE) == pytest.approx(0.4)
    restored = ShareLearner(tau=1e9)
    restored.load_state(learner.to_state())
    assert restored.settled(CHARGE) and not restored.settled(DISCHARGE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(-200, 200, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=30),
       st.lists(st.sampled_from(["a", "b", "c"]), max_size=3), st.floats(0.0, 1.0))
def test_the_learners_view_is_what_it_says_member_by_member(samples: list[list[float]], raised: list[str],
                                                            share: float) -> None:
    """The limits read every member's share at once (view()): the same as asking share(), settled() and
    marginal_share() member by member, whichever table (ratio or marginal) stands and whatever was raised."""
    learner = ShareLearner(tau=30.0, enough_change=40.0)
    for t, currents in enumerate(samples):
        learner.update(dict(zip("abc", currents)), float(t), at_limit=t % 5 == 0)
        for name in raised:
            learner.raise_share(name, CHARGE if t % 2 else DISCHARGE, share)
    for direction in (CHARGE, DISCHARGE):
        shares, settled = learner.view(direction)
        for name in "abcd":
            assert shares.get(name) == learner.share(name, direction)
            assert (name in settled) == (learner.settled(direction)
                                         and learner.marginal_share(name, direction) is not None)


def test_a_member_carrying_more_than_the_bank_counts_as_carrying_it_all() -> None:
    """Near 0 A bank current a pack behind the others takes their circulating current: 60 A of a 1 A bank is
    not a share of 60 (as a floor, it held the CCL near 0 for an hour while it faded)."""
    rows = [("c", 60.0, 50.0, 100.0), ("a", -59.0, 140.0, 200.0)]
    assert over_current(rows, 1.0, 0.02) == [("c", CHARGE, 1.0)]
    learner = ShareLearner()
    learner.update({"a": 70.0, "b": 30.0}, 0.0)
    learner.update({"a": 25.0, "b": 15.0}, 1.0)  # the marginal split: 0.75 / 0.25
    learner.raise_share("b", CHARGE, 0.5)
    assert learner.marginal_share("b", CHARGE) == pytest.approx(0.25)  # the guard's ratio is not a slope


def config(**kw: object):
    return parse_config({"currentRatioMethod": "count", **kw})


def test_guard_corrects_an_underestimated_share_at_once(caplog: pytest.LogCaptureFixture) -> None:
    control = ChargeControl(config())
    members = [MemberInput("a", "A", {"/Info/MaxChargeCurrent": 100.0, "/Dc/0/Current": 120.0}, True),
               MemberInput("b", "B", {"/Info/MaxChargeCurrent": 100.0, "/Dc/0/Current": 40.0}, True)]
    # Without an operating point the limit rests on the shares alone: the guard's correction shows there.
    limits_only = [MemberInput(x.name, x.label, {"/Info/MaxChargeCurrent": 100.0}, True) for x in members]
    assert control.bank_limit(limits_only, CHARGE).value == pytest.approx(200.0)  # count: 50% each
    # With the operating point, a's excess is already taken back: 160 A - 20 A / 0.5.
    assert control.bank_limit(members, CHARGE).value == pytest.approx(120.0)
    control.observe(members, 1.0)
    # a carries 75%: the next limit keeps it within its 100 A, whichever way it is computed.
    assert control.bank_limit(limits_only, CHARGE).value == pytest.approx(100.0 / 0.75)
    assert control.bank_limit(members, CHARGE).value * 0.75 <= 100.0 + 1e-6
    control.observe(members, 2.0)
    assert sum("more than its own limit" in r.message for r in caplog.records) == 1  # logged once


def test_control_publishes_smoothed_limits_and_member_rows() -> None:
    control = ChargeControl(config(cclMode="battery+dvcc"))
    # b forbids charging and carries nothing while a charges: its switch is open, it leaves the sum.
    members = [MemberInput("a", "A", {"/Info/MaxChargeCurrent": 100.0, "/Info/MaxDischargeCurrent": 150.0,
                                      "/Info/MaxChargeVoltage": 55.2, "/Io/AllowToCharge": 1,
                                      "/Dc/0/Current": 20.0}, True),
               MemberInput("b", "B", {"/Info/MaxChargeCurrent": 50.0, "/Info/MaxDischargeCurrent": 80.0,
                                      "/Info/MaxChargeVoltage": 55.6, "/Io/AllowToCharge": 0,
                                      "/Dc/0/Current": 0.0}, True)]
    out = control.update(members, DvccLimits(True, 80.0, 0.0), 0.0)
    # After start the CCL ramps up from 0 (80 A in the default 30 s: faster than the 2 A/s floor); the DCL
    # starts at its target.
    assert out.ccl == 0.0 and control.ramping and "DVCC user limit" in out.charge_limitation
    assert control.update(members, DvccLimits(True, 80.0, 0.0), 10.0).ccl == pytest.approx(26.7)
    out = control.update(members, DvccLimits(True, 80.0, 0.0), 100.0)
    assert out.ccl == 80.0 and not control.ramping
    assert out.dcl == pytest.approx(140.0)  # count, from the operating point: -20 A + 80 A / 0.5
    assert out.cvl == pytest.approx(55.2)
    assert out.members["b"]["ChargeLimit"] == 0.0
    assert out.members["a"]["Share"] == 1.0


def test_learning_waits_for_complete_samples() -> None:
    """Members report at their own pace: a sample where one member's current is old would teach a wrong split."""
    control = ChargeControl(config(currentRatioMethod="share"))

    def members(ia: float, ib: float, updated_b: bool) -> list[MemberInput]:
        return [MemberInput("a", "A", {"/Dc/0/Current": ia, "/Info/MaxChargeCurrent": 100.0}, True, True),
                MemberInput("b", "B", {"/Dc/0/Current": ib, "/Info/MaxChargeCurrent": 100.0}, True, updated_b)]

    control.observe(members(30.0, 10.0, updated_b=False), 1.0)
    assert control.samples == 0 and control.learner.share("a", CHARGE) is None
    control.observe(members(30.0, 10.0, updated_b=True), 2.0)
    assert control.samples == 1
    assert control.learner.share("a", CHARGE) == pytest.approx(0.75)


# ---- an unknown limit holds the bank's ------------------------------------------------------------------------

_MEMBER_STATES = st.lists(st.tuples(st.one_of(st.none(), st.floats(0, 300)), st.booleans(), st.booleans()),
                          min_size=3, max_size=3)


@given(start=st.lists(st.floats(1, 300), min_size=3, max_size=3), steps=st.lists(_MEMBER_STATES, max_size=12))
@settings(max_examples=150, deadline=None)
def test_while_a_member_limit_is_unknown_the_bank_limit_never_rises(start: list[float],
                                                                   steps: list[list[tuple]]) -> None:
    """Whatever the members do (limits change or go invalid, updates stop, a member leaves the bus), while a member
    that published a limit has none known, the bank's battery limit only falls; with none known at all it is 0."""
    control = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0}))
    names = ("a", "b", "c")

    def inputs(state: list[tuple]) -> list[MemberInput]:
        return [MemberInput(n, n.upper(), {"/Info/MaxChargeCurrent": ccl}, fresh)
                for n, (ccl, fresh, present) in zip(names, state) if present]

    control.update(inputs([(c, True, True) for c in start]), DvccLimits(), 0.0)
    before = control.ccl_target  # the battery limit (what is published ramps up to it)
    assert before is not None
    for t, state in enumerate(steps, start=1):
        unknown = any(ccl is None or not fresh or not present for ccl, fresh, present in state)
        out = control.update(inputs(state), DvccLimits(), float(t))
        assert out.ccl is not None and control.ccl_target is not None
        assert out.ccl <= control.ccl_target + 0.05  # published at 0.1 A
        if unknown:
            assert control.ccl_target <= before + 1e-9, (state, before, control.ccl_target)
            assert out.alarm == 2 and any("held" in n.text for n in out.notes)
        else:
            assert out.alarm == 0
        if all(ccl is None or not fresh or not present for ccl, fresh, present in state):
            assert out.ccl == 0.0
        before = control.ccl_target


def test_a_member_that_leaves_on_purpose_no_longer_holds_the_limit() -> None:
    control = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0}))
    both = [MemberInput("a", "A", {"/Info/MaxChargeCurrent": 10.0}, True),
            MemberInput("b", "B", {"/Info/MaxChargeCurrent": 100.0}, True)]
    control.update(both, DvccLimits(), 0.0)  # after start the CCL ramps up from 0: at 1000 A/s, in one step
    assert control.update(both, DvccLimits(), 0.5).ccl == 20.0  # count: 10 A at a half share
    assert control.update(both[1:], DvccLimits(), 1.0).ccl == 20.0  # a vanished: held
    control.leave("a")  # excluded by the config
    control.update(both[1:], DvccLimits(), 2.0)  # a rise: its ramp starts
    assert control.update(both[1:], DvccLimits(), 3.0).ccl == 100.0


def test_a_shunt_without_limits_holds_nothing() -> None:
    """A member that never published a limit (a shunt) being stale says nothing about the limits."""
    control = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0}))
    members = [MemberInput("bms", "BMS", {"/Info/MaxChargeCurrent": 50.0}, True),
               MemberInput("shunt", "Shunt", {"/Dc/0/Current": 3.0}, False)]
    control.update(members, DvccLimits(), 0.0)
    out = control.update(members, DvccLimits(), 1.0)
    assert out.ccl == 50.0 and out.alarm == 0 and not out.notes


def test_a_reload_carries_the_ramp_and_the_hold_on() -> None:
    old = ChargeControl(config(limits={"rampUpRate": 10}))
    member = [MemberInput("a", "A", {"/Info/MaxChargeCurrent": 100.0}, True)]
    assert old.update(member, DvccLimits(), 0.0).ccl == 0.0  # from 0 after start
    assert old.update(member, DvccLimits(), 3.0).ccl == 30.0
    new = ChargeControl(config(limits={"rampUpRate": 10, "hysteresis": 2}))
    new.adopt(old)
    assert new.update(member, DvccLimits(), 4.0).ccl == 40.0  # goes on, no jump to 100 A


def test_a_negative_learned_share_says_the_current_sign_is_wrong(caplog: pytest.LogCaptureFixture) -> None:
    """No power to compare with: b's current falls whenever the bank's rises, which no pack in parallel does."""
    control = ChargeControl(config(currentRatioMethod="share"))
    for t in range(40):
        bank = 20.0 + 10.0 * (t % 5)
        members = [MemberInput(n, n.upper(), {"/Dc/0/Current": share * bank, "/Info/MaxChargeCurrent": 100.0,
                                              "/InstalledCapacity": 100.0}, True)
                   for n, share in (("a", 0.6), ("b", -0.4))]
        control.observe(members, float(t))
    assert "b" in control.inverted and "a" not in control.inverted
    assert control.bank_limit(members, CHARGE).method == "capacity"
    assert "looks sign-inverted" in caplog.text


def test_power_and_current_of_opposite_signs_mark_a_member_until_they_agree() -> None:
    control = ChargeControl(config(currentRatioMethod="capacity"))

    def members(sign: float) -> list[MemberInput]:
        return [MemberInput("a", "A", {"/Dc/0/Current": 20.0, "/Dc/0/Power": 1000.0, "/Dc/0/Voltage": 50.0}, True),
                MemberInput("b", "B", {"/Dc/0/Current": sign * 20.0, "/Dc/0/Power": 1000.0,
                                       "/Dc/0/Voltage": 50.0}, True)]

    for t in range(2):
        control.observe(members(-1.0), float(t))
    assert not control.inverted  # one or two odd samples are not enough
    control.observe(members(-1.0), 2.0)
    assert set(control.inverted) == {"b"}
    for t in range(3, 10):
        control.observe(members(1.0), float(t))
    assert not control.inverted


# ---- a member that forbids a direction --------------------------------------------------------------------------

@given(own=st.one_of(st.none(), st.floats(-50, 50)), others=st.floats(-200, 200), share=st.floats(0.01, 1.0))
def test_connection_evidence(own: float | None, others: float, share: float) -> None:
    """Current above the noise: still connected. None within it while the others carry enough that, connected, it
    would carry twice the noise: disconnected. Anything else tells nothing; alone in the bank, never disconnected."""
    evidence = connection_evidence(own, others, share)
    if own is None:
        assert evidence is None
    elif own > NOISE_CURRENT:
        assert evidence == CARRYING
    elif share < 1 and share / (1 - share) * others >= 2 * NOISE_CURRENT:
        assert evidence == DISCONNECTED
    else:
        assert evidence is None
    assert connection_evidence(0.0, others, 1.0) is None


def _pair(b_current: float, a_current: float, allow_b: int = 0, ccl_b: float = 0.0) -> list[MemberInput]:
    return [MemberInput("a", "A", {"/Info/MaxChargeCurrent": 100.0, "/Io/AllowToCharge": 1,
                                   "/Dc/0/Current": a_current}, True),
            MemberInput("b", "B", {"/Info/MaxChargeCurrent": ccl_b, "/Io/AllowToCharge": allow_b,
                                   "/Dc/0/Current": b_current}, True)]


def test_a_forbidding_member_is_held_then_tested_then_left_out() -> None:
    control = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0, "testCurrentInterval": 10}))
    control.update(_pair(30.0, 30.0, allow_b=1, ccl_b=80.0), DvccLimits(), 0.0)
    assert control.update(_pair(30.0, 30.0, allow_b=1, ccl_b=80.0), DvccLimits(), 0.5).ccl == 160.0
    out = control.update(_pair(30.0, 30.0), DvccLimits(), 1.0)  # b forbids and still takes 30 A
    assert out.ccl == 0.0 and out.alarms["/Alarms/HighChargeCurrent"] == 2 and out.flags == {"/Io/AllowToCharge": 0}
    assert out.charge_limitation == "held at 0 A: B forbids charging and still takes charge current"
    assert control.update(_pair(0.0, 0.0), DvccLimits(), 10.5).ccl == 0.0  # nothing tells: held
    assert control.ticking  # the test current is due with time alone
    out = control.update(_pair(0.0, 0.0), DvccLimits(), 11.5)  # 10 s after the last current it took: a test current
    assert "probing" in out.charge_limitation and out.flags == {} and out.alarms["/Alarms/HighChargeCurrent"] == 2
    assert control.update(_pair(0.0, 0.0), DvccLimits(), 11.6).ccl == 6.0  # (ramped from 0)
    out = control.update(_pair(0.0, 6.0), DvccLimits(), 12.0)  # a takes it all: b's switch is open...
    assert out.ccl == 6.0  # ...if that lasts
    assert control.update(_pair(0.0, 6.0), DvccLimits(), 14.0).ccl == 6.0
    out = control.update(_pair(0.0, 6.0), DvccLimits(), 15.5)
    assert out.alarms["/Alarms/HighChargeCurrent"] == 0 and not out.notes
    assert control.update(_pair(0.0, 6.0), DvccLimits(), 15.6).ccl == 100.0  # a's own (ramped)
    assert control.update(_pair(2.0, 40.0), DvccLimits(), 16.0).ccl == 0.0  # it takes current again: held


def test_a_member_that_forbids_with_nothing_flowing_gets_a_test_current_and_one_seen_disconnected_leaves_at_once(
        ) -> None:
    control = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0}))
    control.update(_pair(0.0, 0.0, allow_b=1, ccl_b=80.0), DvccLimits(), 0.0)
    out = control.update(_pair(0.0, 0.0), DvccLimits(), 1.0)
    assert out.ccl == 6.0 and out.alarms["/Alarms/HighChargeCurrent"] == 0  # nothing seen taking current yet
    other = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0}))
    other.update(_pair(0.0, 20.0, allow_b=1, ccl_b=80.0), DvccLimits(), 0.0)
    assert other.update(_pair(0.0, 20.0), DvccLimits(), 1.0).ccl == 100.0  # its FETs opened: a alone


def test_a_forbidding_member_discharging_holds_the_dcl_and_says_the_inverter_goes_off() -> None:
    control = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0}))
    members = [MemberInput("a", "A", {"/Info/MaxDischargeCurrent": 100.0, "/Dc/0/Current": -20.0}, True),
               MemberInput("b", "B", {"/Info/MaxDischargeCurrent": 100.0, "/Io/AllowToDischarge": 0,
                                      "/Dc/0/Current": -20.0}, True)]
    out = control.update(members, DvccLimits(), 0.0)
    assert out.dcl == 0.0 and out.alarms["/Alarms/HighDischargeCurrent"] == 2
    assert out.flags == {"/Io/AllowToDischarge": 0}
    assert "switches the inverter off" in out.notes[0].text


_STEPS = st.lists(st.tuples(st.sampled_from([0, 1]), st.floats(-5, 40), st.floats(-5, 60), st.floats(0, 3)),
                  min_size=1, max_size=25)


@given(steps=_STEPS, interval=st.floats(0.5, 20))
@settings(max_examples=200, deadline=None)
def test_a_member_that_forbids_charging_and_takes_current_gets_0_at_once(steps: list[tuple], interval: float) -> None:
    """Whatever the currents and flags do: in any update where a member that forbids charging is seen taking more
    than the noise, the published CCL is 0 A, with the alarm; while a test current runs it is at most its cap."""
    control = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0, "testCurrentInterval": interval}))
    now = 0.0
    for allow, b_current, a_current, dt in steps:
        now += dt
        out = control.update(_pair(b_current, a_current, allow_b=allow, ccl_b=80.0), DvccLimits(), now)
        assert out.ccl is not None and 0.0 <= out.ccl <= 200.0
        if not allow and b_current > NOISE_CURRENT:
            assert out.ccl == 0.0 and out.alarms["/Alarms/HighChargeCurrent"] == 2
        if not allow and any("probing" in n.text for n in out.notes):
            assert out.ccl <= 6.0 + 1e-9
        if allow:
            assert out.alarms["/Alarms/HighChargeCurrent"] == 0 and out.flags == {}


# ---- the CVL hold, a hold during a ramp, the status keys ---------------------------------------------------------

@given(start=st.lists(st.floats(50, 60), min_size=3, max_size=3), steps=st.lists(_MEMBER_STATES, max_size=12))
@settings(max_examples=150, deadline=None)
def test_while_a_member_cvl_is_unknown_the_bank_cvl_never_rises(start: list[float], steps: list[list[tuple]]) -> None:
    control = ChargeControl(config(limits={"voltageRampUpRate": 10, "voltageHysteresis": 0}))
    names = ("a", "b", "c")

    def inputs(state: list[tuple]) -> list[MemberInput]:
        return [MemberInput(n, n.upper(), {"/Info/MaxChargeVoltage": None if cvl is None else 50 + cvl / 30}, fresh)
                for n, (cvl, fresh, present) in zip(names, state) if present]

    control.update([MemberInput(n, n.upper(), {"/Info/MaxChargeVoltage": v}, True) for n, v in zip(names, start)],
                   DvccLimits(), 0.0)
    before = control.cvl_target
    assert before is not None
    for t, state in enumerate(steps, start=1):
        unknown = any(cvl is None or not fresh or not present for cvl, fresh, present in state)
        out = control.update(inputs(state), DvccLimits(), float(t))
        if unknown:
            assert control.cvl_target is not None and control.cvl_target <= before + 1e-9, (state, before)
            assert out.alarm == 2 and any("charge voltage limit held" in n.text for n in out.notes)
        else:
            assert out.alarm == 0
        before = control.cvl_target


def test_a_hold_during_the_start_ramp_holds_the_published_value() -> None:
    control = ChargeControl(config(limits={"rampUpRate": 10}))
    both = [MemberInput("a", "A", {"/Info/MaxChargeCurrent": 100.0}, True),
            MemberInput("b", "B", {"/Info/MaxChargeCurrent": 100.0}, True)]
    control.update(both, DvccLimits(), 0.0)
    control.update(both, DvccLimits(), 1.0)  # the ramp starts
    assert control.update(both, DvccLimits(), 3.0).ccl == 30.0  # on the way to 200 A
    unknown = [MemberInput("a", "A", {"/Info/MaxChargeCurrent": None}, True), both[1]]
    for t in (4.0, 5.0, 10.0):
        out = control.update(unknown, DvccLimits(), t)
        assert out.ccl == 30.0 and control.ccl_target == 30.0
    assert "charge limit held at 30 A" in out.notes[0].text


def test_a_cvl_hold_during_a_voltage_ramp_holds_the_published_value() -> None:
    control = ChargeControl(config(limits={"voltageRampUpRate": 0.1, "voltageHysteresis": 0}))
    members = [MemberInput("a", "A", {"/Info/MaxChargeVoltage": 54.0}, True),
               MemberInput("b", "B", {"/Info/MaxChargeVoltage": 56.0}, True)]
    control.update(members, DvccLimits(), 0.0)
    members[0] = MemberInput("a", "A", {"/Info/MaxChargeVoltage": 55.0}, True)
    control.update(members, DvccLimits(), 1.0)  # a rise of 1 V: ramped at 0.1 V/s
    assert control.update(members, DvccLimits(), 3.0).cvl == pytest.approx(54.2)
    members[0] = MemberInput("a", "A", {"/Info/MaxChargeVoltage": None}, True)
    assert control.update(members, DvccLimits(), 4.0).cvl == pytest.approx(54.2)
    assert control.update(members, DvccLimits(), 9.0).cvl == pytest.approx(54.2)


def test_a_single_member_with_an_invalid_cvl_keeps_its_last_one() -> None:
    """Alone in the bank: the CVL stays what it was (invalid, DVCC would charge at the chargers' own voltage)."""
    control = ChargeControl(config())
    control.update([MemberInput("a", "A", {"/Info/MaxChargeVoltage": 55.2}, True)], DvccLimits(), 0.0)
    out = control.update([MemberInput("a", "A", {"/Info/MaxChargeVoltage": None}, True)], DvccLimits(), 1.0)
    assert out.cvl == 55.2 and out.alarm == 2
    assert out.notes[0].text == "charge voltage limit held at 55.2 V: limit of A unknown"
    out = control.update([MemberInput("a", "A", {"/Info/MaxChargeVoltage": 55.2}, True)], DvccLimits(), 2.0)
    assert out.cvl == 55.2 and out.alarm == 0 and not out.notes


def test_status_keys_stay_while_a_held_value_falls() -> None:
    control = ChargeControl(config(limits={"rampUpRate": 1000, "hysteresis": 0}))
    for t in (0.0, 0.5):  # from 0 after start, at 1000 A/s
        control.update([MemberInput("a", "A", {"/Info/MaxChargeCurrent": 10.0}, True),
                        MemberInput("b", "B", {"/Info/MaxChargeCurrent": 100.0}, True)], DvccLimits(), t)
    seen = set()
    for t, limit in enumerate((19.0, 15.0, 11.0), start=1):
        out = control.update([MemberInput("a", "A", {"/Info/MaxChargeCurrent": None}, True),
                              MemberInput("b", "B", {"/Info/MaxChargeCurrent": limit}, True)], DvccLimits(), float(t))
        assert out.notes[0].text == f"charge limit held at {limit:g} A: limit of A unknown"
        seen.add(out.notes[0].key)
    assert seen == {"charge limit held: limit of A unknown"}


# ---- one pack under two services ----------------------------------------------------------------------------------

_LIMIT = st.one_of(st.none(), st.floats(0, 300))
_SERVICE = st.tuples(st.fixed_dictionaries({}, optional={
    "/Info/MaxChargeCurrent": _LIMIT, "/Info/MaxDischargeCurrent": _LIMIT, "/Info/MaxChargeVoltage": _LIMIT,
    "/Io/AllowToCharge": st.sampled_from([0, 1, None])}), st.booleans())


@given(st.lists(_SERVICE, min_size=2, max_size=3),
       st.sampled_from(["/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent", "/Info/MaxChargeVoltage"]))
def test_one_pack_takes_the_lowest_limit_and_an_unknown_one_of_either_service(services: list[tuple],
                                                                              path: str) -> None:
    values = one_pack(services)
    publishing = [(v, fresh) for v, fresh in services if path in v]
    known = [v[path] for v, fresh in publishing if fresh and v[path] is not None]
    if any(not fresh or v[path] is None for v, fresh in publishing):
        assert values[path] is None  # unknown for the pack: the bank's limit is held
    elif known:
        assert values[path] == min(known)
    flags = [v["/Io/AllowToCharge"] for v, fresh in services if fresh and v.get("/Io/AllowToCharge") is not None]
    if flags:
        assert values["/Io/AllowToCharge"] == min(flags)  # a 0 of either forbids
