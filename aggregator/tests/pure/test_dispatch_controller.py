"""Power dispatcher (pure): water-filling, safety properties, direction, learning gain vs limit, persistence,
grid zeroing, and the user's example on the simulator against the PI baseline."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.features.dispatcher.core.controller import (BatteryReading, Dispatcher, DispatcherSettings,
                                                            grid_zero_target, water_fill)
from aggregator.features.dispatcher.core.model import CHARGE, DISCHARGE, BatteryModel

from ..helpers import load_script



def reading(name: str, measured: float | None = 0.0, age: float = 0.5, **kw: object) -> BatteryReading:
    kw.setdefault("capacity_wh", 5000.0)
    kw.setdefault("max_charge_w", 3000.0)
    kw.setdefault("max_discharge_w", 3000.0)
    kw.setdefault("soc", 50.0)
    return BatteryReading(name, measured, age, **kw)  # type: ignore[arg-type]


class Plant:
    """A minimal battery for closed-loop unit tests: gain, limit, first-order lag, meter every second."""

    def __init__(self, gain: float = 1.0, discharge_limit: float = 3000.0, lag_s: float = 1.0) -> None:
        self.gain, self.discharge_limit, self.lag_s = gain, discharge_limit, lag_s
        self.power = 0.0
        self.setpoint = 0.0
        self.temperature: float | None = None  # reported to the dispatcher when set

    def advance(self, dt: float) -> None:
        target = max(self.gain * self.setpoint, -self.discharge_limit)
        self.power += (target - self.power) * (1 - math.exp(-dt / self.lag_s))


def run_closed_loop(plants: dict[str, Plant], target: float, seconds: float,
                    dispatcher: Dispatcher | None = None, t0: float = 0.0) -> Dispatcher:
    d = dispatcher or Dispatcher(DispatcherSettings(stale_after_s=5.0), list(plants))
    t = t0
    while t < t0 + seconds:
        readings = {n: reading(n, round(p.power, 1), 0.2, temperature_c=p.temperature) for n, p in plants.items()}
        result = d.step(t, target, readings)
        for n, p in plants.items():
            p.setpoint = result.commands[n].setpoint_w
        for _ in range(5):
            for p in plants.values():
                p.advance(0.1)
        t += 0.5
    return d


# ---- water-filling ---------------------------------------------------------------------------------------

def test_water_fill_splits_by_weight_and_moves_the_excess_of_a_capped_one() -> None:
    assert water_fill(1000.0, {"a": 3000.0, "b": 3000.0}, {"a": 1.0, "b": 1.0}) == {"a": 500.0, "b": 500.0}
    alloc = water_fill(1000.0, {"a": 300.0, "b": 3000.0}, {"a": 1.0, "b": 1.0})
    assert alloc == {"a": 300.0, "b": 700.0}
    assert water_fill(5000.0, {"a": 300.0, "b": 1000.0}, {"a": 1.0, "b": 1.0}) == {"a": 300.0, "b": 1000.0}


@given(amount=st.floats(0, 20000), caps=st.lists(st.floats(0, 5000), min_size=1, max_size=6),
       weights=st.lists(st.floats(0.1, 100), min_size=6, max_size=6))
@settings(max_examples=200, deadline=None)
def test_water_fill_properties(amount: float, caps: list[float], weights: list[float]) -> None:
    names = [f"b{i}" for i in range(len(caps))]
    cap = dict(zip(names, caps))
    alloc = water_fill(amount, cap, dict(zip(names, weights)))
    assert sum(alloc.values()) == pytest.approx(min(amount, sum(caps)), abs=1e-6)
    for n in names:
        assert -1e-9 <= alloc[n] <= cap[n] + 1e-9


# ---- safety ------------------------------------------------------------------------------------------------

battery = st.builds(
    lambda name, measured, age, charge, discharge, available, soc: reading(
        name, measured, age, max_charge_w=charge, max_discharge_w=discharge, available=available, soc=soc),
    name=st.sampled_from(["a", "b", "c"]),
    measured=st.one_of(st.none(), st.floats(-5000, 5000)),
    age=st.floats(0, 60),
    charge=st.floats(0, 5000), discharge=st.floats(0, 5000),
    available=st.booleans(), soc=st.one_of(st.none(), st.floats(0, 100)))


@given(steps=st.lists(st.tuples(st.floats(-10000, 10000), st.lists(battery, max_size=3)), min_size=1,
                      max_size=12))
@settings(max_examples=120, deadline=None)
def test_setpoints_stay_within_limits_share_the_target_sign_and_skip_stale(
        steps: list[tuple[float, list[BatteryReading]]]) -> None:
    s = DispatcherSettings()
    d = Dispatcher(s, ["a", "b", "c"])
    for i, (target, batteries) in enumerate(steps):
        readings = {r.name: r for r in batteries}
        result = d.step(float(i), target, readings)
        assert set(result.commands) == {"a", "b", "c"}
        for name, c in result.commands.items():
            r = readings.get(name)
            sp = c.setpoint_w
            assert math.isfinite(sp)
            assert sp == 0.0 or abs(sp) >= s.min_command_w
            if r is None or not r.available or r.measured_w is None or r.measured_age_s > s.stale_after_s:
                assert sp == 0.0 and c.status in ("stale", "unavailable")
                continue
            assert -r.max_discharge_w - 1e-9 <= sp <= r.max_charge_w + 1e-9
            assert sp * target >= 0.0  # never against the target: one battery never charges another
        assert json.dumps(d.state())


def test_disable_zeroes_every_setpoint_once() -> None:
    d = Dispatcher(DispatcherSettings(), ["a", "b"])
    d.step(0.0, -1000.0, {"a": reading("a"), "b": reading("b")})
    assert d.disable() == {"a": 0.0, "b": 0.0}
    assert d.disable() == {}
    result = d.step(1.0, -1000.0, {"a": reading("a"), "b": reading("b")})
    assert all(c.setpoint_w != 0.0 for c in result.commands.values())
    assert d.disable() == {"a": 0.0, "b": 0.0}


def test_rate_limit_and_direction_hysteresis() -> None:
    s = DispatcherSettings(max_step_w_per_s=1000.0, direction_hysteresis_w=100.0)
    d = Dispatcher(s, ["a"])
    first = d.step(0.0, -3000.0, {"a": reading("a")}).commands["a"].setpoint_w
    assert first == pytest.approx(-1000.0)  # the first cycle counts as cycle_s = 1 s
    second = d.step(0.5, -3000.0, {"a": reading("a", -900.0)}).commands["a"].setpoint_w
    assert second == pytest.approx(-1500.0)
    held = d.step(1.0, 60.0, {"a": reading("a", -1400.0)})  # a small opposite target: toward 0, not flipped
    assert held.commands["a"].setpoint_w == pytest.approx(-1000.0) and held.status == "holding"
    flipped = d.step(1.5, 500.0, {"a": reading("a", 0.0)})
    assert 0.0 < flipped.commands["a"].setpoint_w <= 500.0 + 1e-9


def test_small_targets_go_to_fewer_batteries_instead_of_nothing() -> None:
    d = Dispatcher(DispatcherSettings(), ["a", "b", "c"])
    result = d.step(0.0, -60.0, {n: reading(n) for n in "abc"})
    sent = [c.setpoint_w for c in result.commands.values() if c.setpoint_w != 0.0]
    assert sent and sum(sent) == pytest.approx(-60.0) and all(abs(x) >= 25.0 for x in sent)


# ---- learning --------------------------------------------------------------------------------------------

def test_a_limit_moves_the_missing_power_to_the_other_battery() -> None:
    plants = {"a": Plant(discharge_limit=300.0), "b": Plant()}
    d = run_closed_loop(plants, -1000.0, 40.0)
    assert plants["a"].power + plants["b"].power == pytest.approx(-1000.0, abs=25.0)
    assert d.model("a").limit(DISCHARGE, 50.0, 3000.0) == pytest.approx(300.0, abs=50.0)
    assert d.model("a").gain == pytest.approx(1.0, abs=0.05)
    # demand rises by 400 W: it goes to the battery that delivers, at once from the model
    run_closed_loop(plants, -1400.0, 15.0, d, t0=40.0)
    assert plants["b"].power == pytest.approx(-1100.0, abs=30.0)


def test_a_gain_shortfall_is_told_from_a_limit() -> None:
    plants = {"a": Plant(gain=0.6), "b": Plant()}
    d = run_closed_loop(plants, -1000.0, 60.0)
    assert d.model("a").gain == pytest.approx(0.6, abs=0.03)
    assert not d.model("a").limited(DISCHARGE, 50.0, 3000.0)
    assert plants["a"].power + plants["b"].power == pytest.approx(-1000.0, abs=25.0)


def test_a_weak_gain_seen_first_at_a_small_request_is_not_taken_for_a_limit() -> None:
    # 60 % of what it is asked, up to 1500 W. At 400 W over two, a ~200 W request delivers ~120 W: one window
    # cannot tell that from a limit; the next, at a clearly larger request, must (not the probe's limit + 150 W,
    # which for this gain is about the same request again, each window lowering the "limit" to ~225 W for good).
    plants = {"a": Plant(gain=0.6, discharge_limit=1500.0), "b": Plant()}
    d = run_closed_loop(plants, -400.0, 60.0)
    assert d.model("a").gain == pytest.approx(0.6, abs=0.03)
    assert not d.model("a").limited(DISCHARGE, 50.0, 3000.0)
    assert plants["a"].power + plants["b"].power == pytest.approx(-400.0, abs=25.0)
    # 3500 W needs all of A's 1500 W: its real limit is found and decided there (not left "learning")
    d = run_closed_loop(plants, -3500.0, 120.0, d, t0=60.0)
    assert plants["a"].power == pytest.approx(-1500.0, abs=30.0)
    assert plants["a"].power + plants["b"].power == pytest.approx(-3500.0, abs=30.0)
    assert d.model("a").limit(DISCHARGE, 50.0, 3000.0) == pytest.approx(1500.0, abs=30.0)
    result = d.step(180.0, -3500.0, {n: reading(n, p.power, 0.2) for n, p in plants.items()})
    assert result.commands["a"].status == "limited" and not result.saturated


def test_a_weak_gain_caps_what_the_fleet_expects_of_a_battery() -> None:
    # A gives 60 % of its request, and at most 2500 W may be asked of it: it can give 1500 W, and the other
    # battery must be asked the rest of 3500 W, not an equal share that leaves 250 W undelivered.
    d = Dispatcher(DispatcherSettings(max_step_w_per_s=10000.0), ["a", "b"])
    d.restore({"version": 1, "batteries": {"a": {"gain": 0.6}}})
    readings = {"a": reading("a", 0.0, max_discharge_w=2500.0), "b": reading("b", 0.0)}
    result = d.step(0.0, -3500.0, readings)
    assert result.commands["a"].setpoint_w == pytest.approx(-2500.0)
    assert result.commands["a"].predicted_w == pytest.approx(-1500.0)
    assert result.commands["b"].setpoint_w == pytest.approx(-2000.0, abs=1.0)
    assert result.predicted_total_w == pytest.approx(-3500.0, abs=1.0) and not result.saturated
    # beyond what both can give, it says so
    result = d.step(1.0, -4600.0, readings)
    assert result.saturated and result.predicted_total_w == pytest.approx(-4500.0, abs=1.0)


def test_a_recovered_battery_is_used_again() -> None:
    plants = {"a": Plant(discharge_limit=300.0), "b": Plant()}
    d = run_closed_loop(plants, -1000.0, 40.0)
    plants["a"].discharge_limit = 3000.0
    run_closed_loop(plants, -1000.0, 60.0, d, t0=40.0)
    assert not d.model("a").limited(DISCHARGE, 50.0, 3000.0)
    assert plants["a"].power == pytest.approx(-500.0, abs=40.0)


def test_limits_are_kept_per_temperature_band() -> None:
    # Cold, A's BMS allows 300 W: learned for the cold band only.
    plants = {"a": Plant(discharge_limit=300.0), "b": Plant()}
    plants["a"].temperature = plants["b"].temperature = 2.0
    d = run_closed_loop(plants, -1000.0, 40.0)
    a = d.model("a")
    assert a.limited(DISCHARGE, 50.0, 3000.0)
    # Warm, it allows everything: no limit is carried over, so A takes its half at once.
    plants["a"].discharge_limit = 3000.0
    plants["a"].temperature = plants["b"].temperature = 25.0
    run_closed_loop(plants, -1000.0, 8.0, d, t0=40.0)
    assert not a.limited(DISCHARGE, 50.0, 3000.0)
    assert plants["a"].power == pytest.approx(-500.0, abs=40.0)
    # Cold again: the cold band's limit is still known before anything new is learned.
    a.temperature_c = 2.0
    assert a.limit(DISCHARGE, 50.0, 3000.0) == pytest.approx(300.0, abs=50.0)
    # ... and survives a restart of the service.
    fresh = Dispatcher(DispatcherSettings(), ["a", "b"])
    fresh.restore(json.loads(json.dumps(d.state())))
    fresh.model("a").temperature_c = 2.0
    assert fresh.model("a").limit(DISCHARGE, 50.0, 3000.0) == pytest.approx(300.0, abs=50.0)
    fresh.model("a").temperature_c = 25.0
    assert not fresh.model("a").limited(DISCHARGE, 50.0, 3000.0)


def test_limits_are_kept_per_soc_band() -> None:
    m = BatteryModel()
    m.limits[CHARGE][9] = 400.0
    assert m.limit(CHARGE, 95.0, 3000.0) == 400.0
    assert m.limit(CHARGE, 85.0, 3000.0) == 400.0  # a neighbour's stands in
    assert m.limit(CHARGE, 50.0, 3000.0) == 3000.0
    assert m.limit(DISCHARGE, 95.0, 3000.0) == 3000.0


# ---- persistence ------------------------------------------------------------------------------------------

def test_state_round_trips_and_restore_tolerates_garbage() -> None:
    plants = {"a": Plant(discharge_limit=300.0), "b": Plant()}
    d = run_closed_loop(plants, -1000.0, 40.0)
    state = json.loads(json.dumps(d.state()))
    fresh = Dispatcher(DispatcherSettings(), ["a", "b"])
    fresh.restore(state)
    assert fresh.model("a").limit(DISCHARGE, 50.0, 3000.0) == pytest.approx(300.0, abs=50.0)
    for garbage in (None, 3, "x", {}, {"version": 1}, {"version": 1, "batteries": {"a": {"gain": "x",
                    "limits": {"charge": {"zz": 1, "3": -5, "4": "nan"}}}}}, {"version": 99, "batteries": {}}):
        other = Dispatcher(DispatcherSettings(), ["a"])
        other.restore(garbage)  # type: ignore[arg-type]
        assert other.model("a").gain == 1.0
        assert other.model("a").limit(CHARGE, 50.0, 3000.0) == 3000.0


def test_unknown_weight_is_refused() -> None:
    with pytest.raises(ValueError):
        Dispatcher(DispatcherSettings(weight="bogus"), ["a"])


# ---- grid zeroing -----------------------------------------------------------------------------------------

def test_grid_zero_target() -> None:
    assert grid_zero_target(500.0, -200.0) == pytest.approx(-700.0)  # importing: discharge more
    assert grid_zero_target(-300.0, 0.0) == pytest.approx(300.0)     # exporting: charge
    assert grid_zero_target(5.0, -200.0, deadband_w=10.0) == -200.0  # inside the deadband: hold
    assert grid_zero_target(120.0, -200.0, setpoint_w=100.0, deadband_w=10.0) == pytest.approx(-220.0)
    assert grid_zero_target(float("nan"), -200.0) == -200.0


# ---- the user's example on the simulator -------------------------------------------------------------------

def _bench():  # type: ignore[no-untyped-def]
    return load_script("bench/dispatch.py")


@pytest.fixture(scope="module")
def user_example() -> dict:
    bench = _bench()
    return bench.run_matrix(["user_example"], [1], ["learned", "pi+timeout"])


@pytest.mark.timeout(30)
def test_user_example_learned_settles_faster_and_tighter_than_the_pi_baseline(user_example: dict) -> None:
    learned = user_example[("user_example", "learned")][0]
    pi = user_example[("user_example", "pi+timeout")][0]
    assert learned.unsettled == 0
    assert learned.rms_w < pi.rms_w / 3
    assert learned.overshoot_w < pi.overshoot_w / 3
    assert _bench().settle_ratio(user_example) >= 1.5


@pytest.fixture(scope="module")
def user_example_seeds() -> dict:
    bench = _bench()
    return bench.run_matrix(["user_example"], list(range(1, bench.DEFAULT_SEEDS + 1)), ["learned", "pi+timeout"])


@pytest.mark.timeout(120)
def test_user_example_settles_three_times_faster_than_the_pi_baseline(user_example_seeds: dict) -> None:
    # the dispatcher's acceptance, as the bench measures it: mean settle time over its seeds (one seed alone is noisy:
    # 2.7x to 3.5x); measured 3.04x (learned 6.4 s, pi+timeout 19.4 s)
    assert _bench().settle_ratio(user_example_seeds) >= 3.0


def test_a_ramping_target_is_led_and_a_step_is_not() -> None:
    """A target moving along a line is followed late by the batteries' delay: it is led by slope x delay. A step
    is not a ramp."""
    def total_after(targets: list[float], window_s: float) -> float:
        d = Dispatcher(DispatcherSettings(stale_after_s=5.0, ramp_window_s=window_s), ["a", "b"])
        result = None
        for i, target in enumerate(targets):
            result = d.step(0.5 * i, target, {n: reading(n, target / 2, 0.5) for n in "ab"})
        assert result is not None
        return sum(c.setpoint_w for c in result.commands.values())

    ramp = [-1000.0 - 100.0 * i for i in range(14)]  # 200 W/s
    assert total_after(ramp, 5.0) < total_after(ramp, 0.0) - 200.0
    step = [-1000.0] * 8 + [-2000.0] * 6
    assert total_after(step, 5.0) == pytest.approx(total_after(step, 0.0))


def test_the_bench_weak_gain_scenario_learns_the_gain_and_beats_the_pi_baseline() -> None:
    """bench/dispatch.py's weak_gain on two seeds: A (60 % of what it is asked, 1500 W at most) is learned as a
    gain, and the fleet reaches 3500 W (before: a ~225 W "limit" in one seed, 250 W short in the other)."""
    bench = _bench()
    results = bench.run_matrix(["weak_gain"], [1, 3], ["learned", "pi+timeout"])
    assert bench.acceptance(results) == []
    for m in results[("weak_gain", "learned")]:
        assert m.unsettled == 0 and m.rms_w < 20.0
