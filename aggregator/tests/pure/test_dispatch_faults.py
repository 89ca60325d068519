"""Meters that cannot be trusted (frozen but fresh, counting the other way round), the pure part: they are
found and their battery held at 0 with a status saying why; honest meters never are; noisy meters do not make
the fleet swing more than the PI baseline does (bench/dispatch.py's scenarios)."""
from __future__ import annotations

import math
from collections import deque
from typing import Any

from hypothesis import given, settings, strategies as st

from aggregator.features.dispatcher.core.controller import (BatteryReading, Dispatcher, DispatcherSettings,
                                                            grid_zero_target)
from aggregator.features.dispatcher.core.faults import FROZEN, INVERTED, FaultSettings, MeterCheck

from ..helpers import load_script

DT = 0.5


class Device:
    """A battery as the controller sees it: after a dead time and a first-order lag it delivers gain x setpoint
    within its limit; its meter reports that (or, when broken, something else) every second, a little late."""

    def __init__(self, name: str, *, gain: float = 1.0, lag_s: float = 1.5, dead_s: float = 0.8,
                 limit_w: float = 3000.0, noise_w: float = 5.0, seed: int = 0) -> None:
        self.name, self.gain, self.lag_s, self.dead_s, self.limit_w = name, gain, lag_s, dead_s, limit_w
        self.noise_w = noise_w
        self.power = 0.0
        self.sent: deque[tuple[float, float]] = deque([(-math.inf, 0.0)])
        self.reading: tuple[float, float] | None = None  # (taken at, value)
        self.fault: str | None = None
        self._frozen: float | None = None
        self._seed = seed

    def command(self, t: float, setpoint: float) -> None:
        self.sent.append((t, setpoint))

    def advance(self, t: float, dt: float) -> None:
        setpoint = 0.0
        for ts, sp in self.sent:
            if ts + self.dead_s <= t:
                setpoint = sp
        target = max(-self.limit_w, min(self.limit_w, self.gain * setpoint))
        self.power += (target - self.power) * (1.0 - math.exp(-dt / self.lag_s))
        if abs(t - round(t)) < 1e-6:  # the meter samples once a second
            self._seed = (self._seed * 1103515245 + 12345) % 2 ** 31
            value = self.power + self.noise_w * ((self._seed / 2 ** 31) * 2.0 - 1.0)
            if self.fault == "inverted":
                value = -value
            elif self.fault == "frozen":
                if self._frozen is None:
                    self._frozen = self.reading[1] if self.reading else value
                value = self._frozen
            self.reading = (t, value)

    def read(self, t: float) -> BatteryReading:
        if self.reading is None:
            return BatteryReading(self.name, None, math.inf, 50.0, 5000.0, 3000.0, 3000.0)
        taken, value = self.reading
        return BatteryReading(self.name, value, t - taken + 0.4, 50.0, 5000.0, 3000.0, 3000.0)


def _run(devices: list[Device], targets: list[tuple[float, float]], until: float, grid_zero: bool = False,
         faults: tuple[tuple[float, Device, str], ...] = ()) -> tuple[Dispatcher, list[Any]]:
    """Step the controller every DT against the devices; `targets`: (from t, target W). With grid_zero the
    target is the demand (negative of the W) through a grid meter, built like the runtime does. `faults`:
    (from t, device, "frozen" or "inverted")."""
    d = Dispatcher(DispatcherSettings(stale_after_s=5.0, cycle_s=DT), [x.name for x in devices])
    results = []
    t = 0.0
    while t < until:
        for t0, device, kind in faults:
            if t >= t0:
                device.fault = kind
        target = [w for t0, w in targets if t0 <= t][-1]
        readings = {x.name: x.read(t) for x in devices}
        if grid_zero:
            grid = -target + sum(x.power for x in devices)
            target = grid_zero_target(grid, d.usable_total(readings), 0.0, 10.0)
        result = d.step(t, target, readings)
        results.append((t, result))
        for x in devices:
            x.command(t, result.commands[x.name].setpoint_w)
        for k in range(5):
            for x in devices:
                x.advance(round(t + k * DT / 5, 6), DT / 5)
        t = round(t + DT, 6)
    return d, results


def _first(results: list[Any], name: str, status: str) -> float | None:
    return next((t for t, r in results if r.commands[name].status == status), None)


def test_a_frozen_meter_is_held_at_zero_and_the_others_take_over() -> None:
    a, b = Device("a"), Device("b", seed=7)
    # b's meter freezes at 30 s while b discharges about 500 W; at 60 s less is asked of the fleet
    _, results = _run([a, b], [(0.0, -1000.0), (60.0, -400.0)], 150.0, grid_zero=True,
                      faults=((30.0, b, "frozen"),))
    held = _first(results, "b", FROZEN)
    assert held is not None and 60.0 < held < 80.0, held
    final = results[-1][1]
    assert final.commands["b"].setpoint_w == 0.0 and "b: frozen meter" in final.status
    assert abs(b.power) < 10.0  # b really idles ...
    assert abs(a.power + 400.0) < 40.0  # ... and a delivers the whole target
    # the other way round (asked more than it reads) it may be at a limit: not taken for a frozen meter
    assert all(r.commands["b"].status != FROZEN for t, r in results if t < 60.0)


def test_an_inverted_meter_is_held_at_zero_with_its_reason() -> None:
    a, b = Device("a"), Device("b", seed=3)
    _, results = _run([a, b], [(0.0, 0.0), (5.0, -1200.0)], 60.0, grid_zero=True, faults=((0.0, b, "inverted"),))
    held = _first(results, "b", INVERTED)
    assert held is not None and held < 25.0, held
    final = results[-1][1]
    assert final.commands["b"].setpoint_w == 0.0 and "measuredSign" in final.commands["b"].status
    assert abs(b.power) < 10.0 and abs(a.power + 1200.0) < 40.0


def test_a_held_battery_comes_back_on_probation() -> None:
    check = MeterCheck(FaultSettings(hold_s=10.0, min_samples=3, max_delay_s=1.0))
    # discharging 500 W by its meter, then asked for 300 W less: the meter does not move
    check.request(-5.0, -500.0)
    check.request(1.0, -200.0)
    for t in range(5):
        check.add(float(t), -500.0)
    assert check.check(4.0) == FROZEN and check.held(5.0) == FROZEN
    assert check.held(14.0) is None and check.probation  # released, on trial
    check.request(14.0, 0.0)
    check.request(17.0, -300.0)
    for t, m in ((15.0, 0.0), (16.0, 0.0), (17.0, 0.0), (18.0, -150.0), (19.0, -280.0)):
        check.add(t, m)
    assert check.check(19.0) is None and not check.probation  # it follows again
    check.request(20.0, 0.0)
    for t in range(21, 26):
        check.add(float(t), -280.0)  # frozen again
    assert check.check(25.0) == FROZEN and check.until == 25.0 + 20.0  # a second time: held twice as long


@settings(max_examples=25, deadline=None)
@given(gain=st.floats(0.3, 1.4), lag=st.floats(0.2, 3.0), dead=st.floats(0.0, 1.5), limit=st.floats(150.0, 3000.0),
       noise=st.floats(2.0, 40.0), steps=st.lists(st.tuples(st.floats(4.0, 30.0), st.floats(-3000.0, 3000.0)),
                                                  min_size=2, max_size=8))
def test_an_honest_meter_is_never_held(gain: float, lag: float, dead: float, limit: float, noise: float,
                                       steps: list[tuple[float, float]]) -> None:
    devices = [Device("a", gain=gain, lag_s=lag, dead_s=dead, limit_w=limit, noise_w=noise, seed=1),
               Device("b", noise_w=noise, seed=2)]
    targets, t = [], 0.0
    for hold, watts in steps:
        targets.append((t, watts))
        t += hold
    _, results = _run(devices, targets, t)
    statuses = {r.commands[n].status for _, r in results for n in ("a", "b")}
    assert not statuses & {FROZEN, INVERTED}, statuses


def _bench():  # type: ignore[no-untyped-def]
    return load_script("bench/dispatch.py")


def test_the_bench_fault_scenarios_beat_the_pi_baseline() -> None:
    """bench/dispatch.py's meter-fault scenarios: the learned dispatcher holds a frozen and an inverted meter's
    battery, and noisy meters swing it no more than the PI baseline (a dispatcher that trusts every meter: a
    frozen meter's RMS 36 W against 15 W, an inverted one's 26 W against 10 W, noise swinging 269 W against
    201 W). One seed here (the
    bench runs five: `bench/dispatch.py --scenarios frozen_meter,inverted_meter,noisy_meter`); the baseline only
    where the acceptance compares with it."""
    bench = _bench()
    results = bench.run_matrix(["frozen_meter", "inverted_meter"], [1], ["learned"])
    results |= bench.run_matrix(["noisy_meter"], [1], ["learned", "pi+timeout"])
    assert bench.acceptance(results) == []


def test_a_battery_tapering_while_more_is_asked_is_not_inverted() -> None:
    """Filling up, its charge limit falls while the dispatcher asks more: against the setpoint, but in the
    direction asked. (The bench's full_empty scenario held it for an inverted meter before this rule.)"""
    check = MeterCheck()
    for k in range(60):
        t = k * 0.5
        check.request(t, 1800.0 + 10.0 * k)  # asked more and more ...
        if k % 2 == 0:
            check.add(t, 1900.0 - 8.0 * k)  # ... delivering less and less
        assert check.check(t) is None
    # the same with the meter counting the other way round is inverted
    flipped = MeterCheck()
    for k in range(60):
        t = k * 0.5
        flipped.request(t, 1800.0 + 10.0 * k if k > 10 else 0.0)
        if k % 2 == 0:
            flipped.add(t, -(1800.0 + 10.0 * (k - 4)) if k > 14 else 0.0)
        if flipped.check(t) is not None:
            break
    assert flipped.fault == INVERTED


@settings(max_examples=50, deadline=None)
@given(sent=st.lists(st.tuples(st.floats(0.0, 100.0), st.floats(-3000.0, 3000.0)), max_size=40),
       times=st.lists(st.floats(-10.0, 140.0), max_size=40), ordered=st.booleans())
def test_the_setpoints_in_force_at_many_times_are_those_at_each(sent: list[tuple[float, float]],
                                                                times: list[float], ordered: bool) -> None:
    """The meter check's one-pass lookup gives what the lookup of each time does, in or out of order."""
    check = MeterCheck(FaultSettings(window_s=30.0, max_delay_s=6.0))
    for t, w in sorted(sent):
        check.request(t, w)
    times = sorted(times) if ordered else times
    assert check._in_force(times) == [check._at(t) for t in times]
