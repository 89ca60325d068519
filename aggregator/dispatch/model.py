"""Per-battery online model of a controllable battery (pure: values in, values out; time is passed in).

The battery delivers, after a dead time and a first-order lag,

    delivered = sign(request) * min(gain * |request|, limit[direction, SoC band])

The model learns only from steady windows: the request has been constant long enough for the lag to have
settled (dead time + 3 lags) and the measurements in the window agree. A transient teaches nothing: during a
ramp, a lag looks like a low gain. One steady window cannot tell a gain shortfall from a limit (both deliver
300 W for 500 W asked), so a shortfall first becomes a provisional limit (at this operating point both
hypotheses predict the same power, and the limit is the safe one: the rest goes to the other batteries) and a
second window at a different request decides: the same delivery whatever was asked is a limit, the same
fraction of any request is a gain.

A battery held at its learned limit is asked a little more than the limit (the probe), and the limit creeps
up while it delivers close to it, so a battery that recovers is seen and used again. Lag and dead time come
from the step responses to large request changes.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Mapping

Direction = Literal["charge", "discharge"]
CHARGE: Direction = "charge"
DISCHARGE: Direction = "discharge"
GLOBAL_BAND = -1  # limits learned while the SoC is unknown


def direction_of(power_w: float) -> Direction:
    return CHARGE if power_w >= 0 else DISCHARGE


def sign_of(direction: Direction) -> float:
    return 1.0 if direction == CHARGE else -1.0


@dataclass(frozen=True, slots=True)
class ModelSettings:
    band_pct: float = 10.0            # learned limits are kept per SoC band of this width
    window_s: float = 4.0             # length of a steady window
    min_learn_w: float = 120.0        # smaller requests teach nothing (deadbands, minimum outputs)
    tolerance_w: float = 20.0         # a delivery this close to the prediction agrees with it ...
    tolerance_frac: float = 0.03      # ... or this fraction of it
    request_spread_w: float = 30.0    # a request varying less than this (or request_spread_frac) is steady
    request_spread_frac: float = 0.05
    noise_w: float = 40.0             # measurements spread less than this (or noise_frac) in a steady window
    noise_frac: float = 0.05
    trend_w: float = 15.0             # the drift across a steady window is less than this (or trend_frac)
    trend_frac: float = 0.015
    probe_frac: float = 0.15          # a battery at its learned limit is asked this much more ...
    probe_w: float = 150.0            # ... or at least this much more, to see it recover
    creep_frac: float = 0.01          # raise of a learned limit per steady window delivered at it
    pair_max_age_s: float = 600.0     # two windows further apart than this are not compared
    gain_min: float = 0.2
    gain_max: float = 1.5
    lag_s: float = 2.0                # prior first-order lag
    dead_time_s: float = 1.0          # prior dead time
    step_min_w: float = 150.0         # request changes at least this large are tracked as step responses


@dataclass(frozen=True, slots=True)
class Window:
    """A steady window: the mean request and the mean delivered power while both were steady."""

    t: float
    request_w: float
    delivered_w: float
    band: int
    varied: bool = False  # the request moved during the window (request_w is then its smallest magnitude)


@dataclass(slots=True)
class _StepTrack:
    t0: float
    from_w: float     # measured when the step was asked
    to_w: float       # the steady prediction for the new request
    dead_s: float | None = None
    last: tuple[float, float] | None = None  # previous (t, progress), for interpolation


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class BatteryModel:
    """What one battery delivers for a request; learns online from its measurements."""

    def __init__(self, settings: ModelSettings | None = None) -> None:
        self.settings = settings or ModelSettings()
        self.gain = 1.0
        self.lag_s = self.settings.lag_s
        self.dead_time_s = self.settings.dead_time_s
        self.limits: dict[Direction, dict[int, float]] = {CHARGE: {}, DISCHARGE: {}}
        self.pending: dict[Direction, bool] = {CHARGE: False, DISCHARGE: False}  # provisional limit, undecided
        self.windows = 0
        self._requests: deque[tuple[float, float]] = deque([(-math.inf, 0.0)])  # (t, request) at each change
        self._samples: deque[tuple[float, float]] = deque()                     # (t measured, measured)
        self._last_window: dict[Direction, Window] = {}
        self._window_end = -math.inf
        self._step: _StepTrack | None = None
        self._predicted: deque[tuple[float, float, float]] = deque()            # (t, dynamic, steady)
        self._dynamic = 0.0
        self._steady: deque[tuple[float, float]] = deque([(-math.inf, 0.0)])    # (t, steady prediction)

    # ---- the model -------------------------------------------------------------------------------------

    def band(self, soc: float | None) -> int:
        if soc is None or not math.isfinite(soc):
            return GLOBAL_BAND
        top = max(0, int(math.ceil(100.0 / self.settings.band_pct)) - 1)
        return int(_clamp(soc // self.settings.band_pct, 0, top))

    def learned_limit(self, direction: Direction, soc: float | None) -> float | None:
        """The learned limit for this SoC: its own band's, else the lower neighbour's (limits move smoothly
        with SoC, so a neighbour's is the best guess), else the one learned without SoC."""
        table = self.limits[direction]
        band = self.band(soc)
        if band in table:
            return table[band]
        near = [table[b] for b in (band - 1, band + 1) if b in table and band != GLOBAL_BAND]
        if near:
            return min(near)
        return table.get(GLOBAL_BAND)

    def limit(self, direction: Direction, soc: float | None, configured_w: float) -> float:
        learned = self.learned_limit(direction, soc)
        configured = max(0.0, configured_w)
        return configured if learned is None else _clamp(learned, 0.0, configured)

    def limited(self, direction: Direction, soc: float | None, configured_w: float) -> bool:
        """True when a learned limit below the configured one applies."""
        learned = self.learned_limit(direction, soc)
        return learned is not None and learned < configured_w

    def predict(self, request_w: float, soc: float | None, configured: Mapping[Direction, float]) -> float:
        """Steady delivered power for a request."""
        d = direction_of(request_w)
        return sign_of(d) * min(self.gain * abs(request_w), self.limit(d, soc, configured[d]))

    def request_for(self, delivery_w: float, soc: float | None, configured: Mapping[Direction, float]) -> float:
        """The request that delivers `delivery_w`, capped at the configured limit. At the learned limit the
        probe is added: a limited battery delivers its limit whatever is asked above it, and a recovered one
        shows it."""
        d = direction_of(delivery_w)
        cap = max(0.0, configured[d])
        amount = abs(delivery_w)
        limit = self.limit(d, soc, cap)
        if amount <= 0.0:
            return 0.0
        tol = max(self.settings.tolerance_w, self.settings.tolerance_frac * limit)
        if self.limited(d, soc, cap) and amount >= limit - tol:
            probe = max(self.settings.probe_frac * limit, self.settings.probe_w)
            request = max(limit / self.gain, limit + probe)
        else:
            request = amount / self.gain
        return sign_of(d) * min(request, cap)

    # ---- requests, predictions, measurements -------------------------------------------------------------

    def record_request(self, t: float, request_w: float, steady_prediction_w: float, dt: float) -> None:
        """The request sent at `t`, and the dynamic prediction: the steady prediction through the dead time
        and the lag."""
        last_t, last_r = self._requests[-1]
        if abs(request_w - last_r) > 0.5:
            self._maybe_track_step(t, last_t, last_r, request_w, steady_prediction_w)
            self._requests.append((t, request_w))
        while len(self._requests) > 2 and self._requests[1][0] < t - 120.0:
            self._requests.popleft()
        alpha = 1.0 - math.exp(-max(0.0, dt) / max(0.05, self.lag_s))
        self._steady.append((t, steady_prediction_w))
        while len(self._steady) > 2 and self._steady[1][0] <= t - self.dead_time_s - 1.0:
            self._steady.popleft()
        delayed = self._steady[0][1]
        for ts, p in self._steady:  # the steady prediction as of one dead time ago
            if ts > t - self.dead_time_s:
                break
            delayed = p
        self._dynamic += (delayed - self._dynamic) * alpha
        self._predicted.append((t, self._dynamic, steady_prediction_w))
        while len(self._predicted) > 2 and self._predicted[1][0] < t - 60.0:
            self._predicted.popleft()

    def predicted_at(self, t: float) -> tuple[float, float]:
        """The dynamic prediction and the steady one in force at time `t` (for a measurement taken then)."""
        value = self._predicted[0][1:] if self._predicted else (self._dynamic, self._dynamic)
        for tp, dynamic, steady in self._predicted:
            if tp > t:
                break
            value = (dynamic, steady)
        return value

    def residual(self, t: float, measured_w: float) -> float:
        """What the model did not predict of a measurement taken at `t`: nothing while the battery is between
        the dynamic prediction and where it is heading (it only moves faster than modelled: correcting that
        would undo it a moment later), else the distance to the nearer of the two."""
        dynamic, steady = self.predicted_at(t)
        lo, hi = min(dynamic, steady), max(dynamic, steady)
        return measured_w - lo if measured_w < lo else measured_w - hi if measured_w > hi else 0.0

    def reset_prediction(self, measured_w: float) -> None:
        """After the model changed: the prediction restarts from what the battery does, so the observer does
        not count the change twice."""
        self._dynamic = measured_w
        self._predicted.clear()
        self._steady = deque([(-math.inf, measured_w)])

    def request_at(self, t: float) -> float:
        value = 0.0
        for tr, r in self._requests:
            if tr > t:
                break
            value = r
        return value

    def _request_range(self, t0: float, t1: float) -> tuple[float, float]:
        values = [self.request_at(t0)] + [r for tr, r in self._requests if t0 < tr <= t1]
        return min(values), max(values)

    def observe(self, t: float, measured_w: float, soc: float | None,
                configured: Mapping[Direction, float]) -> str | None:
        """A measurement taken at `t`. Returns what was learned ('gain', 'limit', 'lag'), if anything."""
        if self._samples and t <= self._samples[-1][0] + 1e-9:
            return None  # the same measurement again (meters update slower than the dispatcher runs)
        self._samples.append((t, measured_w))
        while self._samples and self._samples[0][0] < t - 4.0 * self.settings.window_s:
            self._samples.popleft()
        learned = self._track_step(t, measured_w)
        window = self._steady_window(t, soc)
        if window is not None:
            self.windows += 1
            self._window_end = t
            learned = self._learn(window, configured) or learned
        return learned

    # ---- steady windows ------------------------------------------------------------------------------------

    def _steady_window(self, t: float, soc: float | None) -> Window | None:
        s = self.settings
        start = t - s.window_s
        if start < self._window_end:
            return None  # windows do not overlap: each teaches once
        window = [(tm, m) for tm, m in self._samples if tm >= start]
        if len(window) < 3 or window[0][0] > start + 0.4 * s.window_s:
            return None
        points = [m for _, m in window]
        mean = sum(points) / len(points)
        if max(points) - min(points) > max(s.noise_w, s.noise_frac * abs(mean)):
            return None
        # No trend: the tail of a lag is not steady, however small its spread.
        if abs(_slope(window)) * s.window_s > max(s.trend_w, s.trend_frac * abs(mean)):
            return None
        # The request must have been steady since the lag (mostly) settled before the window began.
        lo, hi = self._request_range(start - self.dead_time_s - 2.0 * self.lag_s, t - self.dead_time_s)
        request = 0.5 * (lo + hi)
        if hi - lo > max(s.request_spread_w, s.request_spread_frac * abs(request)):
            if lo * hi <= 0.0:
                return None
            # The request moved within the window but the delivery did not: a limit, if every request asked
            # for more. (Moves before the window only settle into it: they show nothing.)
            in_lo, in_hi = self._request_range(start - self.dead_time_s, t - self.dead_time_s)
            if self.gain * (in_hi - in_lo) < 2.0 * max(s.noise_w, s.noise_frac * abs(mean)):
                return None  # too small a move for a following battery to show beyond the noise
            smallest = lo if lo > 0 else hi
            return Window(t, smallest, mean, self.band(soc), varied=True)
        return Window(t, request, mean, self.band(soc))

    def _learn(self, w: Window, configured: Mapping[Direction, float]) -> str | None:
        s = self.settings
        asked = abs(w.request_w)
        if asked < s.min_learn_w:
            return None
        d = direction_of(w.request_w)
        cap = max(0.0, configured[d])
        got = max(0.0, sign_of(d) * w.delivered_w)
        learned = self.limits[d].get(w.band)
        if learned is None:
            learned = self._nearest(d, w.band)
        limit = cap if learned is None else min(learned, cap)
        expected = min(self.gain * asked, limit)
        tol = max(s.tolerance_w, s.tolerance_frac * max(got, expected))
        limit_bound = self.gain * asked > limit + tol
        if w.varied:
            # Delivering the same whatever was asked: a limit, decided by one window.
            if self.gain * asked > got + tol and got < limit - tol:
                self._set_limit(d, w.band, got, cap)
                self.pending[d] = False
                return "limit"
            return None
        previous = self._last_window.get(d)
        self._last_window[d] = w
        if abs(got - expected) <= tol:
            if limit_bound and learned is not None and learned < cap:
                # Delivering at the learned limit: let it creep up (a recovering battery gets asked more).
                self._set_limit(d, w.band, limit * (1.0 + s.creep_frac), cap)
                self.pending[d] = False
                return None
            if not limit_bound and got < limit - tol:
                self.gain = _clamp(self.gain + 0.3 * (got / asked - self.gain), s.gain_min, s.gain_max)
            return None
        verdict = self._compare(previous, w, d, tol)
        if verdict == "gain":
            # The same fraction of two different requests: a gain, whichever side of the prediction.
            self.gain = _clamp(got / asked, s.gain_min, s.gain_max)
            self.limits[d][w.band] = math.inf
            self.pending[d] = False
            return "gain"
        if got < expected - tol:
            if verdict == "gain":
                self.gain = _clamp(got / asked, s.gain_min, s.gain_max)
                self.limits[d][w.band] = math.inf
                self.pending[d] = False
                return "gain"
            self._set_limit(d, w.band, got, cap)
            self.pending[d] = verdict is None
            return "limit"
        # It delivered more than expected.
        if limit_bound or (learned is not None and learned < cap):
            if got >= self.gain * asked - tol:
                # It delivered all of the probe: assume it recovered; the next window finds any new limit.
                self.limits[d][w.band] = math.inf
            else:
                self._set_limit(d, w.band, got, cap)
            self.pending[d] = False
            return "limit"
        self.gain = _clamp(self.gain + 0.5 * (got / asked - self.gain), s.gain_min, s.gain_max)
        return "gain"

    def _nearest(self, d: Direction, band: int) -> float | None:
        table = self.limits[d]
        near = [table[b] for b in (band - 1, band + 1) if b in table and band != GLOBAL_BAND]
        return min(near) if near else table.get(GLOBAL_BAND)

    def _compare(self, previous: Window | None, w: Window, d: Direction, tol: float) -> str | None:
        """Two steady windows at different requests: 'limit' (same delivery), 'gain' (same fraction), None."""
        s = self.settings
        if previous is None or w.t - previous.t > s.pair_max_age_s or abs(previous.band - w.band) > 1:
            return None
        a0, a1 = abs(previous.request_w), abs(w.request_w)
        p0 = max(0.0, sign_of(d) * previous.delivered_w)
        p1 = max(0.0, sign_of(d) * w.delivered_w)
        if abs(a1 - a0) < max(tol, 0.08 * max(a0, a1)):
            return None  # asked the same: cannot tell
        if abs(p1 - p0) <= tol:
            return "limit"
        r0, r1 = p0 / a0, p1 / a1
        if abs(r1 - r0) <= 0.05 * max(r0, r1):
            return "gain"
        return None

    def _set_limit(self, d: Direction, band: int, value: float, cap: float) -> None:
        # At or above the configured limit: none learned here (inf, so a neighbour's does not stand in).
        self.limits[d][band] = math.inf if value >= cap else max(0.0, value)

    # ---- step responses: dead time and lag ---------------------------------------------------------------

    def _maybe_track_step(self, t: float, last_t: float, last_r: float, request_w: float,
                          steady_prediction_w: float) -> None:
        s = self.settings
        change = abs(request_w - last_r)
        settled = t - last_t >= self.dead_time_s + 3.0 * self.lag_s
        if change < max(s.step_min_w, 0.25 * abs(last_r)):
            return
        if not settled or not self._samples:
            self._step = None  # a step on top of a transient: its response cannot be read
            return
        start = self._samples[-1][1]
        if abs(steady_prediction_w - start) >= s.step_min_w * 0.7:
            self._step = _StepTrack(t, start, steady_prediction_w)

    def _track_step(self, t: float, measured_w: float) -> str | None:
        step = self._step
        if step is None:
            return None
        if t - step.t0 > 30.0:
            self._step = None
            return None
        if t < step.t0:
            return None
        progress = (measured_w - step.from_w) / (step.to_w - step.from_w)
        dead_at = _crossing(step, t, progress, 0.1)
        lag_at = _crossing(step, t, progress, 0.63)
        step.last = (t, progress)
        if step.dead_s is None and dead_at is not None:
            step.dead_s = max(0.0, dead_at - step.t0)
        if step.dead_s is not None and lag_at is not None:
            lag = max(0.05, lag_at - step.t0 - step.dead_s)
            self.dead_time_s = _clamp(0.7 * self.dead_time_s + 0.3 * step.dead_s, 0.0, 10.0)
            self.lag_s = _clamp(0.7 * self.lag_s + 0.3 * lag, 0.05, 20.0)
            self._step = None
            return "lag"
        return None

    # ---- persistence -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"gain": self.gain, "lag_s": self.lag_s, "dead_time_s": self.dead_time_s,
                "limits": {d: {str(b): (v if math.isfinite(v) else None) for b, v in sorted(table.items())}
                           for d, table in self.limits.items()}}

    def load(self, data: Any) -> None:
        """Learned state from `to_dict`; anything missing or malformed keeps the current value."""
        if not isinstance(data, dict):
            return
        s = self.settings
        self.gain = _clamp(_number(data.get("gain"), self.gain), s.gain_min, s.gain_max)
        self.lag_s = _clamp(_number(data.get("lag_s"), self.lag_s), 0.05, 20.0)
        self.dead_time_s = _clamp(_number(data.get("dead_time_s"), self.dead_time_s), 0.0, 10.0)
        limits = data.get("limits")
        if not isinstance(limits, dict):
            return
        for d in (CHARGE, DISCHARGE):
            table = limits.get(d)
            if not isinstance(table, dict):
                continue
            for band, value in table.items():
                try:
                    b = int(band)
                except (TypeError, ValueError):
                    continue
                v = math.inf if value is None else _number(value, math.nan)  # None: none learned (inf)
                if not math.isnan(v) and v >= 0 and GLOBAL_BAND <= b <= 100:
                    self.limits[d][b] = v


def _crossing(step: _StepTrack, t: float, progress: float, level: float) -> float | None:
    """The time the step response crossed `level` (interpolated between samples), None if it has not yet."""
    if progress < level:
        return None
    if step.last is None or step.last[1] >= level:
        return t
    t0, p0 = step.last
    return t0 + (t - t0) * (level - p0) / (progress - p0)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) points."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if var <= 0 else sum((t - mt) * (v - mv) for t, v in points) / var


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)
