"""The dispatcher: one total power target split across batteries (pure: values in, values out; `now` is
passed in, nothing is read from a clock or a bus).

Each cycle:
1. readings: a battery that is unavailable or whose measurement is stale gets 0 and leaves the allocation, and
   so does one whose meter was found frozen or inverted (aggregator.dispatch.faults); the others' new
   measurements teach their models (aggregator.dispatch.model);
2. a disturbance observer: per battery, the measured power minus the model's dynamic prediction, low-passed.
   Only this unpredicted error is corrected (the models already account for gains and limits), so the loop
   cannot wind up; it is frozen while the fleet is saturated;
3. water-filling of the needed delivery over the batteries' predicted available power in the target's
   direction, by weight: what one cannot deliver goes to the others at once, from the model, not after a
   timeout. Every allocation has the sign of the target (one battery never charges another);
4. request = allocation / gain (plus a probe at a learned limit), capped at the configured limits; commands
   below min_command_w are 0; setpoint changes are rate-limited and a direction change passes through 0.

The target is held through a transient after a jump (the meters then disagree), and a target ramping along a
line is led by the fleet's delay (meter age + dead time + lag): see target.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Mapping, Sequence

from .faults import FaultSettings, MeterCheck
from .model import CHARGE, DISCHARGE, BatteryModel, Direction, ModelSettings
from .target import TargetShaping

STATE_VERSION = 1
DECIDING_WEIGHT = 1e6  # water-filling weight factor of a battery whose provisional limit is being decided
WEIGHTS = ("capacity", "energy", "equal")


@dataclass(frozen=True, slots=True)
class BatteryReading:
    name: str
    measured_w: float | None      # actual power, + = charging, - = discharging; None = unknown
    measured_age_s: float         # seconds since the measurement was taken (stale when > stale_after_s)
    soc: float | None = None      # percent
    capacity_wh: float | None = None
    max_charge_w: float = 0.0     # configured/read hard limits, >= 0
    max_discharge_w: float = 0.0  # >= 0 (magnitude)
    available: bool = True        # False: adapter down / disabled
    temperature_c: float | None = None  # learned limits are kept per temperature band too, when known


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    stale_after_s: float = 30.0
    min_command_w: float = 25.0        # commands with |w| below this are sent as 0 (firmware deadband)
    max_step_w_per_s: float = 2000.0   # rate limit on each setpoint
    direction_hysteresis_w: float = 50.0
    weight: str = "capacity"           # "capacity" | "energy" (usable energy in the requested direction) | "equal"
    observer_tau_s: float = 1.0        # time constant of the disturbance observer
    cycle_s: float = 1.0               # the interval assumed before the first step
    lead_tau_s: float = 0.5            # lead compensation: the response time asked of a battery whose lag is known
    max_lead: float = 3.0              # ... overdriving the modelled gap by at most this factor
    lead_min_w: float = 150.0          # ... after a jump of its share at least this large
    ramp_window_s: float = 5.0         # a target moving along a line over this long ... (0: off)
    ramp_min_w: float = 300.0          # ... by at least this much ...
    ramp_fit: float = 0.15             # ... within this fraction of its move (rms), is led by the fleet's delay
    jitter_cycles: int = 40            # the target's noise: the median cycle-to-cycle change over this many cycles;
    jitter_factor: float = 10.0        # ... a jump is this many times that (or lead_min_w) before it is led
    model: ModelSettings = field(default_factory=ModelSettings)
    faults: FaultSettings | None = field(default_factory=FaultSettings)  # frozen/inverted meters (None: off)


@dataclass(frozen=True, slots=True)
class BatteryCommand:
    name: str
    setpoint_w: float        # what to send (0 for excluded), sign = target's sign
    predicted_w: float       # what the model expects it to deliver
    gain: float              # learned
    charge_limit_w: float    # learned (<= configured)
    discharge_limit_w: float
    status: str              # "ok", "stale", "unavailable", "limited", "learning", "idle", or a meter fault
    #                          (faults.FROZEN, faults.INVERTED)


@dataclass(frozen=True, slots=True)
class DispatchResult:
    commands: dict[str, BatteryCommand]
    target_w: float
    predicted_total_w: float
    correction_w: float      # the disturbance observer's correction
    saturated: bool
    status: str


def grid_zero_target(grid_power_w: float, current_total_w: float, setpoint_w: float = 0.0,
                     deadband_w: float = 10.0) -> float:
    """The batteries' total target that moves the grid power (+ = import) to `setpoint_w`: the batteries
    take over the grid's error. Inside the deadband it holds the batteries where they are."""
    error = grid_power_w - setpoint_w
    if not math.isfinite(error) or not math.isfinite(current_total_w):
        return current_total_w if math.isfinite(current_total_w) else 0.0
    if abs(error) <= deadband_w:
        return current_total_w
    return current_total_w - error


def water_fill(amount: float, caps: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """Split `amount` (>= 0) as x_k = min(cap_k, level * weight_k) with sum x_k = amount; every cap when the
    amount is more than they hold."""
    alloc = {k: 0.0 for k in caps}
    pool = [k for k in caps if caps[k] > 0.0 and weights.get(k, 0.0) > 0.0]
    remaining = max(0.0, amount)
    weight_left = sum(weights[k] for k in pool)
    for k in sorted(pool, key=lambda k: caps[k] / weights[k]):
        if weight_left <= 0.0 or remaining <= 0.0:
            break
        level = remaining / weight_left
        share = min(caps[k], level * weights[k])
        alloc[k] = share
        remaining -= share
        weight_left -= weights[k]
    return alloc


def _finite(x: float | None, default: float = 0.0) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else default


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class Dispatcher:
    """Splits a total power target across batteries; learns each battery online. Not thread-safe."""

    def __init__(self, settings: DispatcherSettings, names: Sequence[str]) -> None:
        if settings.weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {', '.join(WEIGHTS)}, not {settings.weight!r}")
        self.settings = settings
        self.names = list(dict.fromkeys(names))
        self._models = {n: BatteryModel(settings.model) for n in self.names}
        self._checks = {n: MeterCheck(settings.faults) for n in self.names} if settings.faults is not None else {}
        self._setpoints = {n: 0.0 for n in self.names}
        self._seen: dict[str, float] = {}         # time of the last measurement used, per battery
        self._residual: dict[str, float] = {}     # latest measured - predicted, per battery
        self._correction: dict[str, float] = {}   # the observer's low-passed residual, per battery
        self._allocation: dict[str, float] = {}   # last cycle's allocation (magnitude), per battery
        self._direction = 0                       # +1 charging, -1 discharging, 0 idle
        self._shares: dict[str, float] = {}       # last cycle's share (magnitude) as asked, per battery
        self._kicks: dict[str, tuple[float, float]] = {}  # lead after a jump: (share aimed at, until), per battery
        self._target = TargetShaping(settings)
        self._last_now: float | None = None
        self._saturated = False
        self._disabled = False

    # ---- the cycle -----------------------------------------------------------------------------------------

    def step(self, now: float, target_w: float, readings: Mapping[str, BatteryReading]) -> DispatchResult:
        s = self.settings
        dt = s.cycle_s if self._last_now is None else _clamp(now - self._last_now, 0.0, 10.0)
        self._last_now = now
        self._disabled = False
        target = _finite(target_w)
        excluded: dict[str, str] = {}
        active: dict[str, BatteryReading] = {}
        for name in self.names:
            reading = readings.get(name)
            why = self._exclusion(reading) or self._fault(name, now)
            if not why:
                assert reading is not None
                if self._observe(name, reading, now):
                    why = self._check_meter(name, now)
            if why:
                excluded[name] = why
                self._residual.pop(name, None)
                self._correction.pop(name, None)
            else:
                assert reading is not None
                active[name] = reading
                check = self._checks.get(name)
                if check is not None and (check.suspect is not None or check.probation):
                    # its meter is under test: what it says corrects nothing (usable_total uses the model too)
                    self._residual[name] = 0.0
                    self._correction[name] = 0.0
        if not self._saturated:
            self._update_observer(dt, active)
        correction = sum(self._correction.get(n, 0.0) for n in active)
        jumped = self._target.hold(now, target, lambda: self._quiet(active), lambda: self._settle_s(active))
        if self._target.held is not None:
            target = self._target.held[0]
        else:
            target += self._target.ramp_lead(now, target, bool(active), lambda: self._delay_s(active))
        effective, holding = self._apply_hysteresis(target)
        need = self._need(effective, correction)
        direction: Direction = CHARGE if self._direction >= 0 else DISCHARGE
        allocation, saturated = self._allocate(abs(need), direction, active, self._short(direction, active))
        self._allocation = allocation
        self._saturated = saturated and need != 0.0
        for name in self.names:
            self._models[name].fleet_short = self._saturated
        probing = self._probing(direction, allocation, active) if need != 0.0 else set()
        commands = self._commands(now, dt, direction, allocation, active, excluded, probing, jumped)
        predicted = sum(c.predicted_w for c in commands.values())
        status = ("no batteries" if not active else "saturated" if self._saturated
                  else "holding" if holding else "ok")
        faults = [f"{n}: {why}" for n, why in excluded.items() if why not in ("stale", "unavailable")]
        if faults:
            status += "; " + ", ".join(faults)
        return DispatchResult(commands, target, predicted, correction, self._saturated, status)

    def disable(self) -> dict[str, float]:
        """Every setpoint 0, once: the first call after running returns them; later calls return {}."""
        if self._disabled:
            return {}
        self._disabled = True
        self._setpoints = {n: 0.0 for n in self.names}
        self._correction.clear()
        self._allocation.clear()
        self._direction = 0
        self._saturated = False
        self._shares.clear()
        self._kicks.clear()
        self._target.reset()
        return dict(self._setpoints)

    # ---- readings and the observer --------------------------------------------------------------------------

    def _exclusion(self, reading: BatteryReading | None) -> str:
        if reading is None or not reading.available:
            return "unavailable"
        if reading.measured_w is None or not math.isfinite(reading.measured_w):
            return "stale"
        age = _finite(reading.measured_age_s, math.inf)
        if age > self.settings.stale_after_s or age < 0:
            return "stale"
        return ""

    def _fault(self, name: str, now: float) -> str:
        check = self._checks.get(name)
        return (check.held(now) or "") if check is not None else ""

    def _check_meter(self, name: str, now: float) -> str:
        """A meter found frozen or inverted: the battery is held at 0 from now on (its model keeps what it had)."""
        check = self._checks.get(name)
        if check is None:
            return ""
        why = check.check(now)
        if why:
            self._setpoints[name] = 0.0
            self._allocation.pop(name, None)
            self._kicks.pop(name, None)
        return why or ""

    def usable_total(self, readings: Mapping[str, BatteryReading]) -> float:
        """The measured power of the batteries the dispatcher uses (fresh, meter not held for a fault): what a
        grid-zero target is built from, since a held battery's meter says nothing true."""
        total = 0.0
        for name in self.names:
            r = readings.get(name)
            check = self._checks.get(name)
            if r is None or r.measured_w is None or self._exclusion(r) or (
                    check is not None and check.fault is not None):
                continue
            if check is not None and (check.suspect is not None or check.probation):
                # not trusted yet (tested for a frozen meter, or back from a hold): what it was asked to do
                total += self._models[name].predicted_at(math.inf)[0]
                continue
            total += float(r.measured_w)
        return total

    def _observe(self, name: str, reading: BatteryReading, now: float) -> bool:
        """Teach the model a new measurement; False when there was none."""
        model = self._models[name]
        model.temperature_c = reading.temperature_c
        taken = now - reading.measured_age_s
        if taken <= self._seen.get(name, -math.inf) + 1e-9:
            return False  # no new measurement
        self._seen[name] = taken
        if reading.measured_w is None:  # excluded before it gets here: without a measurement there is nothing to learn
            return False
        measured = float(reading.measured_w)
        check = self._checks.get(name)
        if check is not None:
            check.add(taken, measured)
        learned = model.observe(taken, measured, reading.soc, self._configured(reading))
        if learned in ("gain", "limit"):
            # The model now explains what the observer was correcting: hand it over, do not count it twice.
            model.reset_prediction(measured)
            self._residual[name] = 0.0
            self._correction[name] = 0.0
        else:
            self._residual[name] = model.residual(taken, measured)
        return True

    def _update_observer(self, dt: float, active: Mapping[str, BatteryReading]) -> None:
        alpha = 1.0 - math.exp(-dt / max(1e-3, self.settings.observer_tau_s))
        for name in active:
            old = self._correction.get(name, 0.0)
            self._correction[name] = old + alpha * (self._residual.get(name, 0.0) - old)

    def _quiet(self, active: Mapping[str, BatteryReading]) -> bool:
        """Every battery's latest measurement was taken after the model says it had settled where it is asked
        to be now: the meters (the batteries' and the grid's) then agree, and a target built from them is
        sound."""
        tol = self.settings.model.tolerance_w
        for name in active:
            model = self._models[name]
            taken = self._seen.get(name)
            if taken is None:
                return False
            then, _ = model.predicted_at(taken)
            now_dyn, steady = model.predicted_at(math.inf)
            limit = max(tol, 0.03 * abs(steady))
            if abs(then - steady) > limit or abs(now_dyn - steady) > limit:
                return False
        return True

    def _settle_s(self, active: Mapping[str, BatteryReading]) -> float | None:
        """How long the batteries take to settle after a jump: the longest dead time and lags (with the prior
        lag and dead time until they are fitted: the meters disagree all the same); None without batteries."""
        models = [self._models[n] for n in active]
        if not models:
            return None
        return max(m.dead_time_s + 3.0 * m.lag_s for m in models) + 2.0

    def _delay_s(self, active: Mapping[str, BatteryReading]) -> float:
        """The fleet's mean delay: its meters' age, dead time and lag."""
        return sum(self._models[n].dead_time_s + self._models[n].lag_s + _finite(r.measured_age_s)
                   for n, r in active.items()) / len(active)

    # ---- direction, need, allocation ------------------------------------------------------------------------

    def _apply_hysteresis(self, target: float) -> tuple[float, bool]:
        """The target after direction hysteresis, and whether it is being held at 0 for it."""
        s = self.settings
        sign = 1 if target > 0 else -1 if target < 0 else 0
        if self._direction == 0:
            if abs(target) >= s.min_command_w:
                self._direction = sign
            return (target if self._direction else 0.0), False
        if sign == -self._direction:
            if abs(target) < s.direction_hysteresis_w:
                return 0.0, True
            self._direction = sign
            self._correction.clear()  # the residuals belong to the other direction's operating point
            self._allocation.clear()
        return target, False

    def _need(self, target: float, correction: float) -> float:
        """The delivery to ask of the models: the target minus the unpredicted part, never of the other sign."""
        need = target - correction
        if target == 0.0 or need * target < 0:
            return 0.0
        return need

    def _caps_and_weights(self, direction: Direction,
                          active: Mapping[str, BatteryReading]) -> tuple[dict[str, float], dict[str, float]]:
        caps: dict[str, float] = {}
        weights: dict[str, float] = {}
        for name, r in active.items():
            configured = self._configured(r)[direction]
            caps[name] = self._models[name].available(direction, r.soc, configured)
            check = self._checks.get(name)
            if check is not None and check.probation:
                caps[name] = min(caps[name], check.settings.probation_w)  # back from a meter fault: on trial
            if check is not None:
                caps[name] = min(caps[name], check.cap(1.0 if direction == CHARGE else -1.0))  # a suspect: tested
            weights[name] = self._weight(r, direction)
        return caps, weights

    def _weight(self, r: BatteryReading, direction: Direction) -> float:
        mode = self.settings.weight
        capacity = _finite(r.capacity_wh)
        if mode == "equal" or capacity <= 0.0:
            return 1.0
        if mode == "energy" and r.soc is not None and math.isfinite(r.soc):
            room = (100.0 - r.soc) if direction == CHARGE else r.soc
            return max(capacity * _clamp(room, 0.0, 100.0) / 100.0, 1e-6)
        return capacity

    def _short(self, direction: Direction, active: Mapping[str, BatteryReading]) -> set[str]:
        """Batteries delivering clearly less than their model predicts: until their model has learned why
        (a steady window), they keep their allocation and the observer's correction goes to the others."""
        sign = 1.0 if direction == CHARGE else -1.0
        tol = self.settings.model.tolerance_w
        # Only at a share large enough to teach the model: below it a shortfall is a deadband or a minimum
        # output, never learned, and holding the battery there would keep it at that share for good.
        floor = self.settings.model.min_learn_w
        return {n for n in active
                if self._allocation.get(n, 0.0) >= floor
                and -sign * self._correction.get(n, 0.0) > max(tol, 0.05 * self._allocation.get(n, 0.0))}

    def _allocate(self, amount: float, direction: Direction, active: Mapping[str, BatteryReading],
                  held: AbstractSet[str] = frozenset()) -> tuple[dict[str, float], bool]:
        """Water-filling; a battery whose share would fall under min_command_w is left out and its share goes
        to the others (rather than sending nothing at all for small targets). `held` batteries get no more
        than last cycle."""
        caps, weights = self._caps_and_weights(direction, active)
        saturated = amount > sum(caps.values()) + 1.0
        self._pin_deciding(amount, direction, active, caps, weights)
        held_caps = {n: (min(c, self._allocation.get(n, 0.0)) if n in held else c) for n, c in caps.items()}
        if sum(held_caps.values()) >= amount:  # holding only while the others can take the rest
            caps = held_caps
        while True:
            alloc = water_fill(amount, caps, weights)
            small = [k for k, x in alloc.items() if 0.0 < x < self.settings.min_command_w]
            if not small:
                return alloc, saturated
            caps[min(small, key=lambda k: alloc[k])] = 0.0

    def _pin_deciding(self, amount: float, direction: Direction, active: Mapping[str, BatteryReading],
                      caps: Mapping[str, float], weights: dict[str, float]) -> None:
        """A battery at a provisional limit, undecided between a limit and a gain, is asked clearly more than
        that limit to tell them apart (BatteryModel.request_for). A gain then delivers more than predicted, the
        observer takes that surplus off the need, its share falls below the limit, the request falls with it,
        and no steady window ever forms. So while its share (with its own surplus) reaches the limit, it gets
        the limit first and the surplus is corrected on the others."""
        sign = 1.0 if direction == CHARGE else -1.0
        deciding = [n for n, r in active.items()
                    if self._models[n].deciding(direction, r.soc, self._configured(r)[direction])]
        if not deciding:
            return
        shares = water_fill(amount, caps, weights)
        tol = self.settings.model.tolerance_w
        for name in deciding:
            surplus = max(0.0, sign * self._correction.get(name, 0.0))
            if shares[name] + surplus >= caps[name] - tol:
                weights[name] *= DECIDING_WEIGHT

    def _probing(self, direction: Direction, allocation: Mapping[str, float],
                 active: Mapping[str, BatteryReading]) -> set[str]:
        """Batteries held at a learned limit (even a learned 0: a refusing battery) while power is wanted: they
        get the probe, so a recovery shows."""
        out: set[str] = set()
        for name, r in active.items():
            model = self._models[name]
            configured = self._configured(r)[direction]
            if model.limited(direction, r.soc, configured):
                limit = model.limit(direction, r.soc, configured)
                if allocation.get(name, 0.0) >= limit - self.settings.model.tolerance_w:
                    out.add(name)
        return out

    # ---- commands ---------------------------------------------------------------------------------------------

    def _commands(self, now: float, dt: float, direction: Direction, allocation: Mapping[str, float],
                  active: Mapping[str, BatteryReading], excluded: Mapping[str, str],
                  probing: set[str], jumped: bool = False) -> dict[str, BatteryCommand]:
        s = self.settings
        sign = 1.0 if direction == CHARGE else -1.0
        commands: dict[str, BatteryCommand] = {}
        for name in self.names:
            model = self._models[name]
            if name in excluded:
                self._setpoints[name] = 0.0  # safety first: no rate limit on going to 0
                check = self._checks.get(name)
                if check is not None:
                    check.request(now, 0.0)
                commands[name] = BatteryCommand(name, 0.0, 0.0, model.gain, 0.0, 0.0, excluded[name])
                continue
            r = active[name]
            configured = self._configured(r)
            share = allocation.get(name, 0.0)
            if name in probing:
                share = max(share, 1e-6)  # at its learned limit: request_for adds the probe
                request = model.request_for(sign * share, r.soc, configured)
            else:
                delivery = self._lead(model, name, now, sign, share, r, configured, jumped)
                request = model.request_for(sign * delivery, r.soc, configured) if delivery > 0.0 else 0.0
            check = self._checks.get(name)
            if check is not None:
                request = check.limit_request(request)  # a suspected frozen meter: asked less, to tell
            setpoint = self._rate_limited(self._setpoints[name], request, dt)
            setpoint = _clamp(setpoint, -configured[DISCHARGE], configured[CHARGE])
            if abs(setpoint) < s.min_command_w:
                setpoint = 0.0
            self._setpoints[name] = setpoint
            predicted = model.predict(setpoint, r.soc, configured)
            model.record_request(now, setpoint, predicted, dt)
            check = self._checks.get(name)
            if check is not None:
                check.request(now, setpoint)
            commands[name] = BatteryCommand(
                name, setpoint, predicted, model.gain,
                model.limit(CHARGE, r.soc, configured[CHARGE]),
                model.limit(DISCHARGE, r.soc, configured[DISCHARGE]),
                self._status(model, direction, r, configured, share))
        return commands

    def _lead(self, model: BatteryModel, name: str, now: float, sign: float, share: float, r: BatteryReading,
              configured: Mapping[Direction, float], jumped: bool) -> float:
        """The delivery to ask: the share, plus a lead after a jump of the share. A jump starts a kick toward
        the new share; while the model says the battery (one dead time on, when this request acts) has not got
        there, the gap is overdriven by (learned lag / lead_tau_s - 1), at most max_lead - 1: the inverse of
        the learned first-order lag. Only the modelled gap of the jump is amplified, never the cycle-to-cycle
        jitter of the target (that would close a fast loop through the meters' delays). Only once the lag was
        fitted; bounded by the battery's limit, never of the other sign."""
        s = self.settings
        previous = self._shares.get(name, 0.0)
        self._shares[name] = share
        d: Direction = CHARGE if sign > 0 else DISCHARGE
        if model.lag_fits < 1 or s.lead_tau_s <= 0.0 or s.max_lead <= 1.0:
            self._kicks.pop(name, None)
            return share
        y = sign * model.ahead(now)
        jump = share - previous
        if jumped and abs(jump) >= s.lead_min_w and abs(y - previous) < 0.25 * abs(jump):
            self._kicks[name] = (share, now + model.dead_time_s + 3.0 * model.lag_s)
        kick = self._kicks.get(name)
        if kick is None:
            return share
        ref, until = kick
        gap = ref - y
        if now > until or abs(gap) < 0.05 * abs(ref - previous) or abs(gap) < s.model.tolerance_w:
            self._kicks.pop(name, None)
            return share
        k = _clamp(model.lag_s / s.lead_tau_s, 1.0, s.max_lead)
        delivery = share + (k - 1.0) * gap
        return _clamp(delivery, 0.0, model.limit(d, r.soc, configured[d]))

    def _rate_limited(self, previous: float, request: float, dt: float) -> float:
        if previous * request < 0.0:
            previous = 0.0  # a direction change passes through 0 at once: never one battery against another
        step = self.settings.max_step_w_per_s * dt
        return previous + _clamp(request - previous, -step, step)

    @staticmethod
    def _status(model: BatteryModel, direction: Direction, r: BatteryReading,
                configured: Mapping[Direction, float], share: float) -> str:
        if model.pending[direction]:
            return "learning"
        if share > 0.0 and model.limited(direction, r.soc, configured[direction]):
            return "limited"
        return "ok" if share > 0.0 else "idle"

    @staticmethod
    def _configured(r: BatteryReading) -> dict[Direction, float]:
        return {CHARGE: max(0.0, _finite(r.max_charge_w)), DISCHARGE: max(0.0, _finite(r.max_discharge_w))}

    # ---- learned state ------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON-serialisable learned state: per battery gain, lag, dead time and limits per SoC band."""
        return {"version": STATE_VERSION, "batteries": {n: m.to_dict() for n, m in self._models.items()}}

    def restore(self, data: Any) -> None:
        """Learned state from `state()`; unknown batteries, missing keys and garbage are ignored."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return
        batteries = data.get("batteries")
        if not isinstance(batteries, dict):
            return
        for name, model in self._models.items():
            model.load(batteries.get(name))

    def model(self, name: str) -> BatteryModel:
        """The learned model of one battery (read-only use: diagnostics, the bench)."""
        return self._models[name]
