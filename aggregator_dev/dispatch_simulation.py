"""Simulated controllable batteries, meters and household demand at a stepped clock, and the bench scenarios run
against the dispatchers (dispatch_baselines.py), measured by dispatch_metrics.py (pure Python + numpy; no I/O, no
wall clock).

Batteries hide from the dispatcher: a gain, a first-order lag, a dead time, a deadband, a ramp that
accelerates, a minimum output, charge/discharge limits that taper with SoC and change over time, occasional
refusal (delivers nothing for a while), a watchdog (0 W when commands stop). Their meters sample every
`meter_period_s` with noise and publish after `meter_delay_s`; the grid meter likewise. The target is
grid-zeroing: each control cycle, `grid_zero_target` from the grid meter and the batteries' measured total.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from aggregator.features.dispatcher.core.controller import (BatteryReading, DispatcherSettings,
                                                            grid_zero_target, water_fill)
from aggregator.features.dispatcher.core.faults import FROZEN, INVERTED
from aggregator.features.dispatcher.core.model import CHARGE, DISCHARGE

from .dispatch_baselines import CONTROLLERS, Controller, LearnedController, fresh_readings
from .dispatch_metrics import SIM_DT_S, Metrics, Trace, metrics

CONTROL_PERIOD_S = 0.5
GRID_DEADBAND_W = 10.0


# ---- the battery ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SimBatteryParams:
    name: str
    capacity_wh: float = 5000.0
    soc: float = 60.0
    gain: float = 1.0
    lag_s: float = 1.5
    dead_time_s: float = 0.8
    deadband_w: float = 20.0
    min_output_w: float = 50.0
    ramp_w_per_s: float = 800.0          # the ramp starts at this rate ...
    ramp_accel_w_per_s2: float = 1500.0  # ... and accelerates while it lasts
    max_charge_w: float = 3000.0         # true hardware limits (before SoC taper and overrides)
    max_discharge_w: float = 3000.0
    configured_charge_w: float | None = None     # what the dispatcher is told (None: the hardware limit)
    configured_discharge_w: float | None = None
    meter_period_s: float = 1.0
    meter_delay_s: float = 0.5
    noise_w: float = 5.0
    watchdog_s: float = 10.0
    refusals: tuple[tuple[float, float], ...] = ()  # (start, end): delivers nothing whatever is asked
    noise_frac: float = 0.0              # meter noise proportional to the power: uniform within +-this fraction
    meter_sign: float = 1.0              # -1: the meter (or its configuration) counts the other way round
    frozen_from_s: float | None = None   # from then on the meter repeats its last value (fresh, but constant)

    @property
    def told_charge_w(self) -> float:
        return self.max_charge_w if self.configured_charge_w is None else self.configured_charge_w

    @property
    def told_discharge_w(self) -> float:
        return self.max_discharge_w if self.configured_discharge_w is None else self.configured_discharge_w


class SimBattery:
    """One battery with its inverter and meter; `advance` moves it by one clock step."""

    def __init__(self, params: SimBatteryParams, rng: np.random.Generator) -> None:
        self.p = params
        self.rng = rng
        self.power_w = 0.0
        self.soc = params.soc
        self.silent = False
        self.limit_override: dict[str, float | None] = {CHARGE: None, DISCHARGE: None}
        self._commands: deque[tuple[float, float]] = deque()   # (time it takes effect, setpoint)
        self._setpoint = 0.0
        self._last_command_t = 0.0
        self._ramp_since: float | None = None
        self._ramp_sign = 0.0
        self._next_sample_t = float(rng.uniform(0.0, params.meter_period_s))
        self._samples: deque[tuple[float, float, float]] = deque()  # (available at, taken at, value)
        self._published: tuple[float, float, float] | None = None   # (taken at, value, soc)
        self._frozen: float | None = None                           # the value a frozen meter repeats

    def true_limit(self, direction: str) -> float:
        """Hardware limit, overridden (BMS, temperature), tapered near full/empty."""
        if direction == CHARGE:
            base = self.p.max_charge_w
            taper = _clamp((100.0 - self.soc) / 10.0, 0.0, 1.0)     # 90 % -> 100 %: down to 0
        else:
            base = self.p.max_discharge_w
            taper = _clamp((self.soc - 5.0) / 7.0, 0.0, 1.0)       # 12 % -> 5 %: down to 0
        override = self.limit_override[direction]
        if override is not None:
            base = min(base, override)
        return base * taper

    def command(self, t: float, setpoint_w: float) -> None:
        if not self.silent:
            self._commands.append((t + self.p.dead_time_s, setpoint_w))

    def _refusing(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.p.refusals)

    def advance(self, t: float, dt: float) -> None:
        p = self.p
        while self._commands and self._commands[0][0] <= t:
            self._setpoint = self._commands.popleft()[1]
            self._last_command_t = t
        if t - self._last_command_t > p.watchdog_s:
            self._setpoint = 0.0  # commands stopped: the firmware's watchdog falls back to idle
        target = 0.0 if abs(self._setpoint) < p.deadband_w or self._refusing(t) else p.gain * self._setpoint
        if abs(target) < p.min_output_w:
            target = 0.0
        target = _clamp(target, -self.true_limit(DISCHARGE), self.true_limit(CHARGE))
        self._move(t, dt, target)
        self.soc = _clamp(self.soc + self.power_w * dt / 3600.0 / p.capacity_wh * 100.0, 0.0, 100.0)
        self._meter(t)

    def _move(self, t: float, dt: float, target: float) -> None:
        p = self.p
        gap = target - self.power_w
        sign = 1.0 if gap > 0 else -1.0
        if abs(gap) < 5.0 or sign != self._ramp_sign:
            self._ramp_since = t
            self._ramp_sign = sign
        ramping_for = t - (self._ramp_since if self._ramp_since is not None else t)
        rate = p.ramp_w_per_s + p.ramp_accel_w_per_s2 * ramping_for
        step = gap * (1.0 - math.exp(-dt / max(p.lag_s, 1e-3)))
        self.power_w += _clamp(step, -rate * dt, rate * dt)

    def _meter(self, t: float) -> None:
        p = self.p
        if t >= self._next_sample_t:
            self._next_sample_t += p.meter_period_s
            if not self.silent:
                value = self.power_w + float(self.rng.normal(0.0, p.noise_w))
                if p.noise_frac > 0.0:
                    value += self.power_w * float(self.rng.uniform(-p.noise_frac, p.noise_frac))
                value *= p.meter_sign
                if p.frozen_from_s is not None and t >= p.frozen_from_s:
                    if self._frozen is None:
                        self._frozen = self._published[1] if self._published is not None else value
                    value = self._frozen
                self._samples.append((t + p.meter_delay_s, t, value))
        while self._samples and self._samples[0][0] <= t:
            _, taken, value = self._samples.popleft()
            self._published = (taken, value, self.soc)

    def reading(self, t: float) -> BatteryReading:
        pub = self._published
        if pub is None:
            return BatteryReading(self.p.name, None, math.inf, None, self.p.capacity_wh,
                                  self.p.told_charge_w, self.p.told_discharge_w)
        taken, value, soc = pub
        return BatteryReading(self.p.name, value, t - taken, round(soc, 1), self.p.capacity_wh,
                              self.p.told_charge_w, self.p.told_discharge_w)


class GridMeter:
    def __init__(self, rng: np.random.Generator, period_s: float = 1.0, delay_s: float = 0.3,
                 noise_w: float = 3.0) -> None:
        self.rng = rng
        self.period_s, self.delay_s, self.noise_w = period_s, delay_s, noise_w
        self._next = 0.0
        self._samples: deque[tuple[float, float]] = deque()
        self.value = 0.0

    def advance(self, t: float, grid_w: float) -> None:
        if t >= self._next:
            self._next += self.period_s
            self._samples.append((t + self.delay_s, grid_w + float(self.rng.normal(0.0, self.noise_w))))
        while self._samples and self._samples[0][0] <= t:
            self.value = self._samples.popleft()[1]


# ---- household demand (+ = consumption; solar is negative) -------------------------------------------------

def demand_noise(rng: np.random.Generator, times: np.ndarray, sigma_w: float = 6.0,
                 tau_s: float = 5.0) -> np.ndarray:
    """Slowly wandering base-load noise (AR(1))."""
    a = math.exp(-SIM_DT_S / tau_s)
    white = rng.normal(0.0, sigma_w * math.sqrt(1 - a * a), len(times))
    out = np.empty(len(times))
    x = 0.0
    for i, w in enumerate(white):
        x = a * x + w
        out[i] = x
    return out


def steps(times: np.ndarray, changes: Sequence[tuple[float, float]]) -> np.ndarray:
    """Piecewise constant: from each (t, watts) on, add watts."""
    out = np.zeros(len(times))
    for t0, w in changes:
        out[times >= t0] += w
    return out


def ramp(times: np.ndarray, t0: float, t1: float, watts: float) -> np.ndarray:
    return watts * np.clip((times - t0) / max(t1 - t0, 1e-9), 0.0, 1.0)


def washing_machine(rng: np.random.Generator, times: np.ndarray, start: float) -> np.ndarray:
    """Heating ~2 kW for 12 min, washing (motor pulses ~150-350 W) for 20 min, spin ~500 W for 5 min."""
    t = times - start
    heat = np.where((t >= 0) & (t < 720), 2000.0 + rng.uniform(-100, 100), 0.0)
    pulses = 150.0 + 200.0 * (np.sin(2 * np.pi * t / 40.0) > 0)
    wash = np.where((t >= 720) & (t < 1920), pulses, 0.0)
    spin = np.where((t >= 1920) & (t < 2220), 500.0, 0.0)
    return heat + wash + spin


def solar(rng: np.random.Generator, times: np.ndarray, peak_w: float, t_peak: float, width_s: float,
          clouds: int = 3) -> np.ndarray:
    """A bell of solar production (negative demand) with cloud dips (fast ramps of 60-80 % down and up)."""
    pv = peak_w * np.exp(-0.5 * ((times - t_peak) / width_s) ** 2)
    for _ in range(clouds):
        c0 = rng.uniform(times[0], times[-1])
        dur = rng.uniform(60.0, 240.0)
        depth = rng.uniform(0.6, 0.8)
        edge = 15.0
        shade = np.clip(np.minimum(times - c0, c0 + dur - times) / edge, 0.0, 1.0)
        pv = pv * (1.0 - depth * shade)
    return -pv


# ---- scenarios --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LearnTarget:
    """The learned model should reach `value` for `quantity` ('gain', 'charge_limit', 'discharge_limit')."""

    t: float
    battery: str
    quantity: str
    value: float


@dataclass(frozen=True)
class ScenarioSetup:
    batteries: list[SimBatteryParams]
    demand: np.ndarray
    actions: list[tuple[float, Callable[[dict[str, SimBattery]], None]]] = field(default_factory=list)
    events: list[float] = field(default_factory=list)  # besides demand steps: times the metrics restart
    learn: list[LearnTarget] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)  # (from t, battery): a meter gone wrong


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    duration_s: float
    build: Callable[[np.random.Generator, np.ndarray], ScenarioSetup]


def _jitter(rng: np.random.Generator, p: SimBatteryParams) -> SimBatteryParams:
    """Per-seed variation of the hidden dynamics."""
    return replace(p, lag_s=p.lag_s * rng.uniform(0.7, 1.4), dead_time_s=p.dead_time_s * rng.uniform(0.7, 1.4),
                   meter_delay_s=p.meter_delay_s * rng.uniform(0.6, 1.4))


def _user_example(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """Asked 1000 W of discharge over two batteries; A caps at 300 W (not published); then +400 W."""
    a = _jitter(rng, SimBatteryParams("a", max_discharge_w=300.0, configured_discharge_w=2500.0))
    b = _jitter(rng, SimBatteryParams("b", max_discharge_w=2500.0))
    demand = steps(times, [(10.0, 1000.0), (100.0, 400.0)]) + demand_noise(rng, times, 3.0)
    return ScenarioSetup([a, b], demand, learn=[LearnTarget(10.0, "a", "discharge_limit", 300.0)])


def _limit_drop(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """B's discharge limit drops from 3000 to 800 W at 150 s (BMS, temperature) and recovers at 450 s."""
    bats = [_jitter(rng, SimBatteryParams(n, capacity_wh=c)) for n, c in (("a", 5000.0), ("b", 10000.0),
                                                                           ("c", 5000.0))]
    jumps = [(10.0, 2500.0)] + [(t, float(rng.choice([-1000.0, -500.0, 500.0, 1000.0])))
                                for t in (90.0, 240.0, 330.0, 540.0, 630.0)]
    demand = steps(times, jumps) + demand_noise(rng, times)

    def drop(sim: dict[str, SimBattery]) -> None:
        sim["b"].limit_override[DISCHARGE] = 800.0

    def recover(sim: dict[str, SimBattery]) -> None:
        sim["b"].limit_override[DISCHARGE] = None

    return ScenarioSetup(bats, demand, [(150.0, drop), (450.0, recover)], [150.0, 450.0],
                         [LearnTarget(150.0, "b", "discharge_limit", 800.0),
                          LearnTarget(450.0, "b", "discharge_limit", 3000.0)])


def _silent(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """C goes silent at 120 s (no measurements, commands lost; its watchdog idles it) and returns at 300 s."""
    bats = [_jitter(rng, SimBatteryParams(n)) for n in "abc"]
    demand = steps(times, [(10.0, 2000.0), (200.0, float(rng.choice([-600.0, 600.0]))), (380.0, -800.0)])
    demand = demand + demand_noise(rng, times)

    def mute(sim: dict[str, SimBattery]) -> None:
        sim["c"].silent = True

    def unmute(sim: dict[str, SimBattery]) -> None:
        sim["c"].silent = False

    return ScenarioSetup(bats, demand, [(120.0, mute), (300.0, unmute)], [120.0, 300.0])


def _full_empty(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """Solar export fills two small batteries (their charge limits taper near full, unpublished), then an
    evening load runs them empty (discharge limits taper near empty)."""
    a = _jitter(rng, SimBatteryParams("a", capacity_wh=600.0, soc=80.0, max_charge_w=1500.0,
                                      max_discharge_w=1500.0))
    b = _jitter(rng, SimBatteryParams("b", capacity_wh=1200.0, soc=75.0, max_charge_w=2500.0,
                                      max_discharge_w=2500.0, gain=0.93))
    demand = steps(times, [(10.0, -2200.0), (900.0, 2200.0 + 2400.0), (1500.0, -600.0)])
    demand = demand + demand_noise(rng, times)
    return ScenarioSetup([a, b], demand, learn=[LearnTarget(10.0, "b", "gain", 0.93)])


def _mixed(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """A realistic hour: base load, fridge, kettle, washing machine, solar with clouds; three different
    batteries (gains, dynamics, minimum outputs), one refusing now and then, one limited by temperature."""
    refuse_at = float(rng.uniform(600.0, 3000.0))
    bats = [
        _jitter(rng, SimBatteryParams("a", capacity_wh=10000.0, gain=0.92, lag_s=2.5, dead_time_s=1.2,
                                      min_output_w=100.0, max_charge_w=3000.0, max_discharge_w=3000.0)),
        _jitter(rng, SimBatteryParams("b", capacity_wh=5000.0, gain=1.04, lag_s=1.0, dead_time_s=0.5,
                                      meter_period_s=2.0, max_charge_w=2000.0, max_discharge_w=2500.0,
                                      refusals=((refuse_at, refuse_at + 25.0),))),
        _jitter(rng, SimBatteryParams("c", capacity_wh=7000.0, lag_s=1.8, ramp_w_per_s=300.0,
                                      max_charge_w=2500.0, max_discharge_w=2500.0)),
    ]
    kettle = float(rng.uniform(300.0, 1200.0))
    fridge = [(float(t), 120.0 if k % 2 == 0 else -120.0)  # the compressor: on, off, on ...
              for k, t in enumerate(np.arange(50.0, times[-1], float(rng.uniform(500, 700))))]
    demand = (350.0 + steps(times, [(kettle, 2000.0), (kettle + 180.0, -2000.0)] + fridge)
              + washing_machine(rng, times, float(rng.uniform(100.0, 600.0)))
              + solar(rng, times, 4500.0, 2400.0, 900.0)
              + demand_noise(rng, times, 8.0))

    def hot(sim: dict[str, SimBattery]) -> None:
        sim["c"].limit_override[CHARGE] = 1000.0

    return ScenarioSetup(bats, demand, [(2000.0, hot)], [2000.0],
                         [LearnTarget(10.0, "a", "gain", 0.92), LearnTarget(2000.0, "c", "charge_limit", 1000.0)])


def _weak_gain(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """A delivers 60 % of what it is asked (1500 W at its configured 2500 W); first a small demand, where one
    steady window cannot tell its shortfall from a limit, then 3500 W, which needs all of A's 1500 W."""
    a = _jitter(rng, SimBatteryParams("a", gain=0.6, max_discharge_w=1500.0, configured_discharge_w=2500.0))
    b = _jitter(rng, SimBatteryParams("b", max_discharge_w=3000.0))
    demand = steps(times, [(10.0, 400.0), (150.0, 3100.0), (300.0, -1500.0), (400.0, 1500.0)])
    return ScenarioSetup([a, b], demand + demand_noise(rng, times, 3.0),
                         learn=[LearnTarget(10.0, "a", "gain", 0.6)])


def _frozen_meter(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """B's meter freezes at 120 s: its value keeps coming, fresh but constant, whatever B does."""
    bats = [_jitter(rng, SimBatteryParams(n)) for n in "ab"]
    bats[1] = replace(bats[1], frozen_from_s=120.0)
    bats.append(_jitter(rng, SimBatteryParams("c")))
    demand = steps(times, [(10.0, 1500.0), (200.0, 800.0), (320.0, -1300.0), (420.0, 600.0)])
    return ScenarioSetup(bats, demand + demand_noise(rng, times), events=[120.0], faults=[(120.0, "b")])


def _inverted_meter(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """C's meter counts the other way round (a wrong measuredSign): + is discharging there."""
    bats = [_jitter(rng, SimBatteryParams(n)) for n in "abc"]
    bats[2] = replace(bats[2], meter_sign=-1.0)
    demand = steps(times, [(10.0, 1800.0), (150.0, -700.0), (300.0, 900.0)])
    return ScenarioSetup(bats, demand + demand_noise(rng, times), faults=[(10.0, "c")])


def _noisy_meter(rng: np.random.Generator, times: np.ndarray) -> ScenarioSetup:
    """Both batteries' meters are noisy: +-10 % of the power (cheap clamp meters, inverter estimates)."""
    bats = [_jitter(rng, SimBatteryParams(n, noise_frac=0.10)) for n in "ab"]
    demand = steps(times, [(10.0, 2000.0), (200.0, -800.0), (350.0, 1200.0)])
    return ScenarioSetup(bats, demand + demand_noise(rng, times))


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("user_example", "1000 W over two, one caps at 300 W, then +400 W", 200.0, _user_example),
    Scenario("limit_drop", "limit 3000 -> 800 W and back", 720.0, _limit_drop),
    Scenario("silent", "a battery goes silent and returns", 480.0, _silent),
    Scenario("full_empty", "filling up and running empty", 2400.0, _full_empty),
    Scenario("mixed", "an hour of household demand, solar, clouds", 3600.0, _mixed),
    Scenario("weak_gain", "one battery gives 60 % of what it is asked; 400 W, then 3500 W", 480.0, _weak_gain),
    Scenario("frozen_meter", "a meter freezes (fresh but constant)", 540.0, _frozen_meter),
    Scenario("inverted_meter", "a meter counts the other way round", 420.0, _inverted_meter),
    Scenario("noisy_meter", "+-10 % meter noise", 480.0, _noisy_meter),
)}
# The meter faults: their own acceptance (bench/dispatch.py), not the settling one.
FAULT_SCENARIOS = ("frozen_meter", "inverted_meter", "noisy_meter")


# ---- running -----------------------------------------------------------------------------------------------

def simulate(scenario: Scenario, seed: int, controller: str,
             settings: DispatcherSettings | None = None) -> Trace:
    times = np.arange(0.0, scenario.duration_s, SIM_DT_S)
    setup = scenario.build(np.random.default_rng(seed), times)
    sims = {p.name: SimBattery(p, np.random.default_rng([seed, i])) for i, p in enumerate(setup.batteries)}
    names = list(sims)
    if controller == "learned":
        ctrl: Controller = LearnedController(names, settings)
    else:
        ctrl = CONTROLLERS[controller](names)
    grid = GridMeter(np.random.default_rng([seed, 99]))
    actions = sorted(setup.actions, key=lambda a: a[0])
    n = len(times)
    total = np.zeros(n)
    achievable = np.zeros(n)
    power = {k: np.zeros(n) for k in names}
    ideal = {k: np.zeros(n) for k in names}
    control_times: list[float] = []
    setpoints: dict[str, list[float]] = {k: [] for k in names}
    learned_at = [math.nan] * len(setup.learn)
    detected_at = [math.nan] * len(setup.faults)
    weights = {p.name: p.capacity_wh for p in setup.batteries}
    next_control = 0.0
    ai = 0
    for i, t in enumerate(times):
        while ai < len(actions) and actions[ai][0] <= t:
            actions[ai][1](sims)
            ai += 1
        if t >= next_control - 1e-9:
            next_control += CONTROL_PERIOD_S
            readings = {k: b.reading(t) for k, b in sims.items()}
            if isinstance(ctrl, LearnedController):
                current = ctrl.dispatcher.usable_total(readings)
            else:
                current = sum(r.measured_w for r in fresh_readings(readings).values())  # type: ignore[misc]
            target = grid_zero_target(grid.value, current, 0.0, GRID_DEADBAND_W)
            sp = ctrl.step(t, target, readings)
            for k, b in sims.items():
                b.command(t, sp.get(k, 0.0))
                setpoints[k].append(sp.get(k, 0.0))
            control_times.append(t)
            if isinstance(ctrl, LearnedController):
                _check_learning(ctrl, setup.learn, readings, t, learned_at)
                for j, (t0, name) in enumerate(setup.faults):
                    held = ctrl.last is not None and ctrl.last.commands[name].status in (FROZEN, INVERTED)
                    if held and t >= t0 and math.isnan(detected_at[j]):
                        detected_at[j] = t - t0
        for k, b in sims.items():
            b.advance(t, SIM_DT_S)
            power[k][i] = b.power_w
        tot = sum(b.power_w for b in sims.values())
        total[i] = tot
        grid.advance(t, setup.demand[i] + tot)
        _achievable(i, setup.demand[i], sims, weights, achievable, ideal)
    demand_events = _demand_steps(times, setup.demand)
    events = sorted(set(demand_events) | set(setup.events))
    return Trace(times, setup.demand, total, achievable, power, ideal,
                 {k: np.array(v) for k, v in setpoints.items()}, np.array(control_times), events, learned_at,
                 detected_at, [float(sims[name].power_w) for _, name in setup.faults])


def _achievable(i: int, demand: float, sims: Mapping[str, SimBattery], weights: Mapping[str, float],
                achievable: np.ndarray, ideal: Mapping[str, np.ndarray]) -> None:
    want = -demand
    direction = CHARGE if want >= 0 else DISCHARGE
    caps = {k: (0.0 if b.silent else b.true_limit(direction)) for k, b in sims.items()}
    amount = min(abs(want), sum(caps.values()))
    sign = 1.0 if want >= 0 else -1.0
    achievable[i] = sign * amount
    for k, x in water_fill(amount, caps, weights).items():
        ideal[k][i] = sign * x


def _check_learning(ctrl: LearnedController, targets: Sequence[LearnTarget],
                    readings: Mapping[str, BatteryReading], t: float, learned_at: list[float]) -> None:
    for j, lt in enumerate(targets):
        if t < lt.t or not math.isnan(learned_at[j]):
            continue
        if any(o.battery == lt.battery and o.quantity == lt.quantity and lt.t < o.t <= t for o in targets):
            continue  # superseded by a later change of the same quantity
        model = ctrl.dispatcher.model(lt.battery)
        r = readings[lt.battery]
        if lt.quantity == "gain":
            ok = abs(model.gain - lt.value) <= 0.05 * lt.value
        else:
            d = CHARGE if lt.quantity == "charge_limit" else DISCHARGE
            configured = r.max_charge_w if d == CHARGE else r.max_discharge_w
            ok = abs(model.limit(d, r.soc, configured) - min(lt.value, configured)) <= 50.0
        if ok:
            learned_at[j] = t - lt.t


def _demand_steps(times: np.ndarray, demand: np.ndarray, threshold_w: float = 300.0) -> list[float]:
    """Times where the demand jumps by more than `threshold_w` within a second (one event per jump)."""
    lag = int(round(1.0 / SIM_DT_S))
    jump = np.abs(demand[lag:] - demand[:-lag]) > threshold_w
    out: list[float] = []
    for i in np.flatnonzero(jump):
        # the jump is between i and i + lag: its time is the first sample that differs from demand[i]
        moved = np.flatnonzero(np.abs(demand[i + 1:i + lag + 1] - demand[i]) > threshold_w / 2)
        t = float(times[i + 1 + (int(moved[0]) if len(moved) else lag - 1)])
        if not out or t - out[-1] > 5.0:
            out.append(t)
    return out


def run(scenario: str, seed: int, controller: str, settings: DispatcherSettings | None = None) -> Metrics:
    return metrics(simulate(SCENARIOS[scenario], seed, controller, settings))


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x
