"""Online internal-resistance estimator (pure, no bus)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aggregator.limits.ir as ir
from aggregator.limits.ir import EstimatorUnavailable, IrEstimate, IrEstimator, numpy_available
from aggregator_dev.simulator.physics import Bank, Pack, PackParams

OCV = 53.2
R = 0.008


def step_currents(rng: np.random.Generator, n: int, amp: float = 80.0, max_hold: int = 20) -> np.ndarray:
    """Piecewise-constant currents in [-amp, amp], each level held 1..max_hold samples."""
    out: list[float] = []
    while len(out) < n:
        out += [float(rng.uniform(-amp, amp))] * int(rng.integers(1, max_hold + 1))
    return np.array(out[:n])


def feed(est: IrEstimator, rng: np.random.Generator, currents, r=R, ocv=OCV, noise=0.001, check=None) -> None:
    for i in currents:
        est.update(ocv + r * i + rng.normal(0.0, noise), i)
        if check is not None:
            check(est.estimate())


def assert_sane(e: IrEstimate | None, est: IrEstimator) -> None:
    if e is None:
        return
    for x in (e.resistance, e.stderr, e.ocv, e.voltage_span):
        assert math.isfinite(x)
    assert est.r_min <= e.resistance <= est.r_max
    assert e.stderr >= 0
    assert e.usable == (e.reason == "")


def trained(seed: int = 0, n: int = 2000, r: float = R) -> tuple[IrEstimator, np.random.Generator]:
    rng = np.random.default_rng(seed)
    est = IrEstimator()
    feed(est, rng, step_currents(rng, n), r=r)
    return est, rng


# -- convergence ----------------------------------------------------------------------------------


def test_converges_on_synthetic_steps():
    est, _ = trained()
    e = est.estimate()
    assert e is not None and e.usable, e
    assert e.resistance == pytest.approx(R, rel=0.05)
    assert abs(e.ocv - OCV) < 0.010
    assert e.samples >= 5
    assert e.voltage_span >= 0.02
    assert e.reason == ""


def test_converges_with_simulator_physics_and_dbus_rounding():
    rng = np.random.default_rng(3)
    packs = [
        Pack(PackParams("a", "a", capacity_ah=280, r_mohm=8.0, soc=50)),
        Pack(PackParams("b", "b", capacity_ah=200, r_mohm=12.0, soc=60)),
    ]
    bank = Bank(packs)
    ests = [IrEstimator() for _ in packs]
    i_total = 0.0
    for k in range(3000):
        if k % 10 == 0:
            i_total = float(rng.uniform(-80, 80))
        state = bank.step(i_total, 1.0)
        for p, est, i in zip(packs, ests, state.currents):
            est.update(round(p.voltage, 2), round(i, 1))  # D-Bus resolution: 10 mV, 0.1 A
    for p, est in zip(packs, ests):
        e = est.estimate()
        assert e is not None and e.usable, e
        assert e.resistance == pytest.approx(p.resistance(), rel=0.05)
        assert abs(e.ocv - p.ocv()) < 0.010


def test_stderr_shrinks_as_samples_grow():
    rng = np.random.default_rng(5)
    est = IrEstimator()
    currents = step_currents(rng, 400)
    errs = []
    start = 0
    for n in (30, 100, 400):
        feed(est, rng, currents[start:n])
        start = n
        errs.append(est.estimate().stderr)
    assert errs[0] > errs[1] > errs[2] > 0


def test_nothing_before_data():
    est = IrEstimator()
    assert est.estimate() is None
    est.update(53.0, 10.0)
    assert est.estimate() is None


# -- no excitation ------------------------------------------------------------------------------


def test_constant_current_from_scratch_is_never_usable():
    rng = np.random.default_rng(1)
    est = IrEstimator()
    for k in range(10000):
        # 20 A with 50 mA measurement noise, OCV creeping up as the pack charges
        est.update(OCV + R * 20 + 1e-5 * k + rng.normal(0, 0.001), 20 + rng.normal(0, 0.05))
        e = est.estimate()
        assert_sane(e, est)
        assert e is None or not e.usable


def test_long_constant_current_after_a_good_fit_keeps_the_estimate():
    est, rng = trained()
    before = est.estimate()
    for k in range(10000):
        est.update(OCV + R * 50 + 5e-5 * k + rng.normal(0, 0.001), 50 + rng.normal(0, 0.05))
    e = est.estimate()
    assert_sane(e, est)
    assert e.resistance == pytest.approx(R, rel=0.05)
    assert before.stderr <= e.stderr < 0.1 * R  # OCV drift shows up as extra residual, not as a wild R


def test_small_current_changes_are_not_usable_voltage_change():
    rng = np.random.default_rng(2)
    est = IrEstimator()
    feed(est, rng, step_currents(rng, 2000, amp=1.0), noise=0.0005)
    e = est.estimate()
    assert e is None or (not e.usable and e.reason.startswith("voltage change")), e


def test_noisy_data_is_not_usable_relative_error():
    rng = np.random.default_rng(4)
    est = IrEstimator()
    feed(est, rng, step_currents(rng, 40, amp=10.0), noise=0.05)
    e = est.estimate()
    assert e is not None and not e.usable
    assert e.reason.startswith("relative error"), e


def test_fits_outside_bounds_are_never_returned():
    rng = np.random.default_rng(6)
    est = IrEstimator()
    feed(est, rng, step_currents(rng, 500), r=-0.008)  # wired backwards: negative slope
    assert est.estimate() is None
    est, rng = trained()
    feed(est, rng, step_currents(rng, 500), r=-0.008, check=lambda e: assert_sane(e, est))
    e = est.estimate()
    assert not e.usable and "outside 0.1 mOhm..1 Ohm" in e.reason, e
    assert e.resistance == pytest.approx(R, rel=0.05)  # the last in-bounds fit, flagged


# -- outliers, cut-off, tracking ------------------------------------------------------------------


def test_bms_cutoff_voltage_jump_stays_bounded_and_recovers():
    est, rng = trained()
    for _ in range(300):  # BMS opens: current 0, voltage jumps 0.5 V
        est.update(OCV + 0.5 + rng.normal(0, 0.001), 0.0)
        assert_sane(est.estimate(), est)
        assert est.estimate().resistance == pytest.approx(R, rel=0.05)
    assert est.outliers >= 1
    feed(est, rng, step_currents(rng, 1000), check=lambda e: assert_sane(e, est))
    e = est.estimate()
    assert e.usable and e.resistance == pytest.approx(R, rel=0.05)
    assert abs(e.ocv - OCV) < 0.010


def test_disconnected_pack_bus_voltage_wanders_with_zero_current():
    """The old tool's 3.9e14 ohm: current stuck at 0 while the voltage moves with the bus."""
    est, rng = trained()
    v = OCV
    for _ in range(3000):
        v += rng.normal(0, 0.02)
        est.update(v, 0.0)
        e = est.estimate()
        assert e is not None
        assert_sane(e, est)
    feed(est, rng, step_currents(rng, 1000), check=lambda e: assert_sane(e, est))
    e = est.estimate()
    assert e.usable and e.resistance == pytest.approx(R, rel=0.05)


def test_single_spikes_are_skipped_and_counted():
    est, rng = trained()
    est.update(OCV + 3.0, 10.0)
    est.update(OCV - 3.0, -10.0)
    assert est.outliers == 2
    assert est.estimate().resistance == pytest.approx(R, rel=0.01)


def test_tracks_a_change_of_resistance():
    est, rng = trained(r=0.008)
    currents = step_currents(rng, 2000)
    followed_at = None
    for k, i in enumerate(currents):
        est.update(OCV + 0.012 * i + rng.normal(0, 0.001), i)
        e = est.estimate()
        assert_sane(e, est)
        if e.usable and abs(e.resistance - 0.012) > 0.05 * 0.012:
            followed_at = None  # a usable estimate must not be wrong
        if followed_at is None and e.usable and abs(e.resistance - 0.012) <= 0.05 * 0.012:
            followed_at = k
    assert followed_at is not None and followed_at < 200, followed_at
    e = est.estimate()
    assert e.usable and e.resistance == pytest.approx(0.012, rel=0.02)


def test_usable_estimates_are_never_badly_wrong_while_tracking():
    est, rng = trained(r=0.008)
    for i in step_currents(rng, 2000):
        est.update(OCV + 0.012 * i + rng.normal(0, 0.001), i)
        e = est.estimate()
        if e.usable:
            assert 0.008 * 0.95 <= e.resistance <= 0.012 * 1.05


# -- input hygiene ------------------------------------------------------------------------------


def test_bad_inputs_are_ignored():
    est, _ = trained()
    state = est.to_state()
    for v, i in [(None, 1.0), (53.0, None), (math.nan, 1.0), (53.0, math.inf), (-math.inf, 0.0), ("53", 1.0)]:
        est.update(v, i)
    assert est.to_state() == state


@settings(max_examples=60, deadline=None)
@given(
    r=st.floats(1e-3, 0.05),
    ocv=st.floats(48.0, 56.0),
    amp=st.floats(5.0, 80.0),
    max_hold=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_bounded_finite_and_right_when_usable(r, ocv, amp, max_hold, seed):
    rng = np.random.default_rng(seed)
    est = IrEstimator()
    for k, i in enumerate(step_currents(rng, 400, amp=amp, max_hold=max_hold)):
        est.update(ocv + r * i + rng.normal(0, 0.001), i)
        e = est.estimate()
        assert_sane(e, est)
        if e is not None and e.usable:
            assert abs(e.resistance - r) <= 0.2 * r, (k, e)


# -- persistence ----------------------------------------------------------------------------------


def test_state_round_trip_resumes_with_uncertainty():
    est, rng = trained()
    d = est.to_state()
    assert all(isinstance(x, float) for x in d.values())
    d2 = json.loads(json.dumps(d))
    back = IrEstimator.from_state(d2)
    assert back.estimate() == est.estimate()
    assert back.estimate().usable
    currents = step_currents(rng, 50)
    noise = rng.normal(0, 0.001, size=len(currents))
    for est_ in (est, back):
        for i, n in zip(currents, noise):
            est_.update(OCV + R * i + n, i)
    assert back.estimate() == est.estimate()


def test_state_round_trip_keeps_kwargs():
    est, _ = trained()
    back = IrEstimator.from_state(est.to_state(), max_relative_error=1e-9)
    assert back.max_relative_error == 1e-9
    assert not back.estimate().usable
    assert back.estimate().reason.startswith("relative error")


def test_restart_after_ocv_moved_keeps_resistance():
    est, rng = trained()
    back = IrEstimator.from_state(est.to_state())
    feed(back, rng, step_currents(rng, 300), ocv=OCV + 0.3, check=lambda e: assert_sane(e, back))
    e = back.estimate()
    assert e.usable and e.resistance == pytest.approx(R, rel=0.05)
    assert abs(e.ocv - (OCV + 0.3)) < 0.010


def _good_state() -> dict:
    return trained()[0].to_state()


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        "junk",
        {},
        {"version": 99.0},
        {**_good_state(), "w": "x"},
        {**_good_state(), "cxx": math.nan},
        {**_good_state(), "cxx": -1.0},
        {**_good_state(), "cxy": 1e9},
        {**_good_state(), "last_r": 1e14},
        {**_good_state(), "last_r": None},
        {k: v for k, v in _good_state().items() if k != "my"},
    ],
)
def test_malformed_state_gives_a_fresh_estimator(bad):
    est = IrEstimator.from_state(bad)
    assert est.estimate() is None
    assert est.to_state() == IrEstimator().to_state()


# -- numpy optional --------------------------------------------------------------------------------


def test_without_numpy_construction_fails_clearly(monkeypatch):
    assert numpy_available()
    monkeypatch.setattr(ir, "np", None)
    assert not ir.numpy_available()
    with pytest.raises(EstimatorUnavailable, match="numpy"):
        IrEstimator()
    assert issubclass(EstimatorUnavailable, RuntimeError)
