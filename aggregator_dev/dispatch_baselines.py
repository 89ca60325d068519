"""The dispatchers the bench compares: the learned one (the service's) and three baselines, (1) a proportional
split without feedback, (2) a proportional split with a PI loop on the total and redistribution after a timeout,
(3) a saturation-score heuristic (pure Python; no I/O, no wall clock)."""
from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

from aggregator.features.dispatcher.core.controller import (BatteryReading, Dispatcher, DispatcherSettings,
                                                            water_fill)

STALE_AFTER_S = 5.0


class Controller(Protocol):
    name: str

    def step(self, now: float, target_w: float, readings: Mapping[str, BatteryReading]) -> dict[str, float]: ...


def fresh_readings(readings: Mapping[str, BatteryReading]) -> dict[str, BatteryReading]:
    return {n: r for n, r in readings.items()
            if r.available and r.measured_w is not None and r.measured_age_s <= STALE_AFTER_S}


def _signed_limits(r: BatteryReading, sign: float) -> float:
    return r.max_charge_w if sign > 0 else r.max_discharge_w


class LearnedController:
    """The dispatcher under test (aggregator.dispatch.controller)."""

    name = "learned"

    def __init__(self, names: Sequence[str], settings: DispatcherSettings | None = None) -> None:
        self.dispatcher = Dispatcher(settings or DispatcherSettings(stale_after_s=STALE_AFTER_S), names)
        self.last = None

    def step(self, now: float, target_w: float, readings: Mapping[str, BatteryReading]) -> dict[str, float]:
        self.last = self.dispatcher.step(now, target_w, readings)
        return {n: c.setpoint_w for n, c in self.last.commands.items()}


class ProportionalController:
    """Baseline 1: split the target by capacity, no feedback."""

    name = "proportional"

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def step(self, now: float, target_w: float, readings: Mapping[str, BatteryReading]) -> dict[str, float]:
        fresh = fresh_readings(readings)
        sign = 1.0 if target_w >= 0 else -1.0
        caps = {n: _signed_limits(r, sign) for n, r in fresh.items()}
        weights = {n: r.capacity_wh or 1.0 for n, r in fresh.items()}
        total = sum(weights.values()) or 1.0
        return {n: sign * min(caps[n], abs(target_w) * weights[n] / total) if n in fresh else 0.0
                for n in self.names}


class PIController:
    """Baseline 2: proportional split with a PI loop on the total and redistribution after a timeout: a
    battery that misses its setpoint for `timeout_s` is held at what it delivers (retried after
    `retry_s`) and the rest goes to the others. What users build first."""

    name = "pi+timeout"

    def __init__(self, names: Sequence[str], kp: float = 0.3, ki: float = 0.2, timeout_s: float = 10.0,
                 retry_s: float = 120.0) -> None:
        self.names = list(names)
        self.kp, self.ki, self.timeout_s, self.retry_s = kp, ki, timeout_s, retry_s
        self.integral = 0.0
        self.last_t: float | None = None
        self.missing_since: dict[str, float] = {}
        self.stuck: dict[str, tuple[float, float]] = {}  # name -> (cap, since)
        self.setpoints = {n: 0.0 for n in names}

    def _pi(self, now: float, target_w: float, fresh: Mapping[str, BatteryReading], cap_total: float) -> float:
        dt = 0.5 if self.last_t is None else max(0.0, now - self.last_t)
        self.last_t = now
        measured = sum(r.measured_w for r in fresh.values())  # type: ignore[misc]
        error = target_w - measured
        u = target_w + self.kp * error + self.integral
        if abs(u) < cap_total or u * error < 0:  # anti-windup: integrate only while not saturated
            self.integral += self.ki * error * dt
            self.integral = _clamp(self.integral, -cap_total, cap_total)
        return target_w + self.kp * error + self.integral

    def _caps(self, now: float, sign: float, fresh: Mapping[str, BatteryReading]) -> dict[str, float]:
        caps: dict[str, float] = {}
        for n, r in fresh.items():
            sp = self.setpoints.get(n, 0.0)
            m = r.measured_w or 0.0
            missing = abs(sp) > 50 and abs(m) < abs(sp) - max(50.0, 0.1 * abs(sp))
            if missing:
                self.missing_since.setdefault(n, now)
            else:
                self.missing_since.pop(n, None)
            if n in self.stuck and now - self.stuck[n][1] > self.retry_s:
                del self.stuck[n]
            if n not in self.stuck and missing and now - self.missing_since[n] >= self.timeout_s:
                self.stuck[n] = (abs(m), now)
            cap = _signed_limits(r, sign)
            caps[n] = min(cap, self.stuck[n][0]) if n in self.stuck else cap
        return caps

    def step(self, now: float, target_w: float, readings: Mapping[str, BatteryReading]) -> dict[str, float]:
        fresh = fresh_readings(readings)
        sign = 1.0 if target_w >= 0 else -1.0
        caps = self._caps(now, sign, fresh)
        u = self._pi(now, target_w, fresh, sum(caps.values()) or 1.0)
        if u * sign < 0:
            u = 0.0
        weights = {n: r.capacity_wh or 1.0 for n, r in fresh.items()}
        alloc = water_fill(abs(u), caps, weights)
        self.setpoints = {n: sign * alloc.get(n, 0.0) for n in self.names}
        return dict(self.setpoints)


class SaturationController(PIController):
    """Baseline 3: a saturation-score heuristic: a battery either follows its setpoint or is saturated (held at
    what it delivers, the rest to the followers; re-probed every `retry_s`), with the same PI on the total."""

    name = "saturation"

    def __init__(self, names: Sequence[str], flip_s: float = 2.0, retry_s: float = 30.0) -> None:
        super().__init__(names, retry_s=retry_s)
        self.flip_s = flip_s
        self.score = {n: 0.0 for n in names}
        self.saturated_since: dict[str, float] = {}

    def _caps(self, now: float, sign: float, fresh: Mapping[str, BatteryReading]) -> dict[str, float]:
        dt = 0.5
        caps: dict[str, float] = {}
        for n, r in fresh.items():
            sp = self.setpoints.get(n, 0.0)
            m = r.measured_w or 0.0
            short = abs(sp) > 50 and abs(m) < abs(sp) - max(30.0, 0.1 * abs(sp))
            self.score[n] = _clamp(self.score[n] + (dt if short else -dt) / self.flip_s, 0.0, 1.0)
            if self.score[n] > 0.5:
                since = self.saturated_since.setdefault(n, now)
                if now - since > self.retry_s:  # re-probe: maybe it recovered
                    self.score[n] = 0.0
                    self.saturated_since.pop(n, None)
            else:
                self.saturated_since.pop(n, None)
            cap = _signed_limits(r, sign)
            caps[n] = min(cap, abs(m)) if self.score[n] > 0.5 else cap
        return caps


CONTROLLERS: dict[str, Callable[[Sequence[str]], Controller]] = {
    "learned": LearnedController,
    "proportional": ProportionalController,
    "pi+timeout": PIController,
    "saturation": SaturationController,
}


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x
