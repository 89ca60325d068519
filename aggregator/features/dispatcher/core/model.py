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

The second window must come at a clearly different request: after an undecided window the battery is asked
1.3x what that window asked (the probe, its limit plus a little, would be about the same request for a weak gain,
and windows there would only lower the "limit"), and the dispatcher gives it its provisional limit first so the
request stays put until the window forms. At the configured limit no larger request exists: a window there
leaves the limit standing (both hypotheses predict the same there).

A ceiling shows before a steady window does: three measurements heading (Aitken's extrapolation, checked
against the fitted lag) or sitting clearly short of every request make a provisional limit at once (the plateau).
Its request is kept until a steady window there confirms the delivery, then 1.3x is asked: the same delivery is a
limit, the same fraction a gain. A later plateau corrects an unconfirmed one.

A battery held at its learned limit is asked a little more than the limit (the probe), and the limit creeps
up while it delivers close to it, so a battery that recovers is seen and used again. Lag and dead time are
fitted (least squares over a grid, free scale and offset) to the measured response to any sizeable change of
the steady prediction that follows a quiet spell, whatever the shape of the requests (overdriven ones too).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from . import dynamics
from .windows import Window, compare, evenly_spaced, heading, steady_window

Direction = Literal["charge", "discharge"]
CHARGE: Direction = "charge"
DISCHARGE: Direction = "discharge"
GLOBAL_BAND = -1  # limits learned while the SoC is unknown
# With a temperature, a band is its SoC band plus TEMP_BAND_STRIDE x (1 + temperature band): cold or hot cells
# get BMS limits of their own, and SoC neighbours stay +-1 apart within one temperature band.
TEMP_BAND_STRIDE = 1000
TEMP_BAND_FLOOR_C = -20.0
TEMP_BANDS = 9  # -20..70 degC in 10 degC steps; colder or hotter fall in the end bands
# An undecided shortfall (limit or gain?) is asked this much more than the window that showed it: far enough
# apart for two windows to tell the same delivery from the same fraction beyond the noise.
DECIDING_STEP = 1.3


def direction_of(power_w: float) -> Direction:
    return CHARGE if power_w >= 0 else DISCHARGE


def sign_of(direction: Direction) -> float:
    return 1.0 if direction == CHARGE else -1.0


@dataclass(frozen=True, slots=True)
class ModelSettings:
    band_pct: float = 10.0            # learned limits are kept per SoC band of this width
    temp_band_c: float = 10.0         # ... and, when the battery reports its temperature, per band of this width
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
    step_min_w: float = 150.0         # unused since the lag fit (kept: saved settings may name it)
    fit_change_w: float = 100.0       # a change of the steady prediction this large (after a quiet spell) ...
    fit_after_s: float = 8.0          # ... is fitted (lag and dead time) this long after it
    fit_span_s: float = 16.0          # ... over at most this long a window
    plateau_limits: bool = True       # learn a provisional ceiling from three measurements (before a window)
    fit_quiet_w: float = 60.0         # quiet: the steady prediction varied less than this (or 10 %) for 3 s


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
        self.temperature_c: float | None = None  # the battery's latest, set by the dispatcher with each reading
        self._temperature_band = 0  # of the samples in _samples (0: temperature unknown)
        self.pending: dict[Direction, bool] = {CHARGE: False, DISCHARGE: False}  # provisional limit, undecided
        self.windows = 0
        self._requests: deque[tuple[float, float]] = deque([(-math.inf, 0.0)])  # (t, request) at each change
        self._samples: deque[tuple[float, float]] = deque()                     # (t measured, measured)
        self._last_window: dict[Direction, Window] = {}
        self._window_end = -math.inf
        self._predicted: deque[tuple[float, float, float]] = deque()            # (t, dynamic, steady)
        self._dynamic = 0.0
        self._steady: deque[tuple[float, float]] = deque([(-math.inf, 0.0)])    # (t, steady prediction)
        self._dynamic_t = -math.inf
        self.lag_fits = 0                                                       # lag/dead time fits so far
        self._hist: deque[tuple[float, float]] = deque()                        # (t, steady prediction), 40 s
        self._fit_samples: deque[tuple[float, float]] = deque()                 # (t measured, measured), 40 s
        self._change_t: float | None = None                                     # a change to fit, pending
        self._from_plateau: dict[Direction, bool] = {CHARGE: False, DISCHARGE: False}  # pending since a plateau
        self._plateau_request: dict[Direction, float] = {CHARGE: 0.0, DISCHARGE: 0.0}  # ... asked when it was seen
        self._plateau_t: dict[Direction, float] = {CHARGE: -math.inf, DISCHARGE: -math.inf}  # ... and when
        self.fleet_short = False  # set by the dispatcher: the fleet cannot deliver its target (creep allowed)

    # ---- the model -------------------------------------------------------------------------------------

    def band(self, soc: float | None) -> int:
        if soc is None or not math.isfinite(soc):
            return GLOBAL_BAND
        top = max(0, int(math.ceil(100.0 / self.settings.band_pct)) - 1)
        band = int(_clamp(soc // self.settings.band_pct, 0, top))
        t = self.temperature_c
        if t is None or not math.isfinite(t):
            return band
        temp_band = int(_clamp((t - TEMP_BAND_FLOOR_C) // self.settings.temp_band_c, 0, TEMP_BANDS - 1))
        return band + TEMP_BAND_STRIDE * (1 + temp_band)

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
        if band >= TEMP_BAND_STRIDE and band % TEMP_BAND_STRIDE in table:
            return table[band % TEMP_BAND_STRIDE]  # learned at this SoC before the temperature was known
        return table.get(GLOBAL_BAND)

    def limit(self, direction: Direction, soc: float | None, configured_w: float) -> float:
        learned = self.learned_limit(direction, soc)
        configured = max(0.0, configured_w)
        return configured if learned is None else _clamp(learned, 0.0, configured)

    def available(self, direction: Direction, soc: float | None, configured_w: float) -> float:
        """The most it is predicted to deliver in this direction: its limit, or its gain times the largest
        request it may be sent (a battery that gives 60 % of what it is asked gives 60 % of the configured
        limit at most)."""
        configured = max(0.0, configured_w)
        return min(self.limit(direction, soc, configured), self.gain * configured)

    def deciding(self, direction: Direction, soc: float | None, configured_w: float) -> bool:
        """A provisional limit at this SoC, undecided after a steady window at it: the next window, at a clearly
        larger request, tells a limit from a gain."""
        last = self._last_window.get(direction)
        return (self.pending[direction] and last is not None
                and not (self._from_plateau[direction] and last.t < self._plateau_t[direction])
                and self.limited(direction, soc, configured_w))

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
            last = self._last_window.get(d)
            if self.deciding(d, soc, cap):
                # After an undecided window, clearly more than it asked, so the next one tells a limit (the same
                # delivery) from a gain (the same fraction). The probe alone asks the limit plus a little, which
                # for a weak gain is about what the window asked: every window there would deliver the same
                # fraction of the same request, and none would ever decide.
                assert last is not None
                request = max(request, DECIDING_STEP * abs(last.request_w),
                              DECIDING_STEP * self._plateau_request[d] if self._from_plateau[d] else 0.0)
            elif self.pending[d] and self._from_plateau[d]:
                # a plateau is only provisional (limit or gain?): the request it was seen at is kept until a
                # steady window there confirms what it delivers (the others get the rest meanwhile)
                request = max(request, self._plateau_request[d])
        else:
            request = amount / self.gain
        return sign_of(d) * min(request, cap)

    # ---- requests, predictions, measurements -------------------------------------------------------------

    def record_request(self, t: float, request_w: float, steady_prediction_w: float, dt: float) -> None:
        """The request sent at `t`, and the dynamic prediction: the steady prediction through the dead time
        and the lag."""
        last_t, last_r = self._requests[-1]
        if abs(request_w - last_r) > 0.5:
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
        self._dynamic_t = t
        self._predicted.append((t, self._dynamic, steady_prediction_w))
        self._note_change(t, steady_prediction_w)
        while len(self._predicted) > 2 and self._predicted[1][0] < t - 60.0:
            self._predicted.popleft()

    def ahead(self, t: float) -> float:
        """The modelled power (the lag's state) when a request sent at `t` starts acting, one dead time on:
        the requests already sent keep moving it until then."""
        x = self._dynamic
        start = self._dynamic_t
        if not math.isfinite(start):
            return x
        end = t + self.dead_time_s
        current = self._steady[0][1]
        pending: list[tuple[float, float]] = []
        for ts, p in self._steady:
            if ts + self.dead_time_s <= start:
                current = p
            else:
                pending.append((ts + self.dead_time_s, p))
        tau = max(0.05, self.lag_s)
        now = start
        for act, p in pending:
            if act >= end:
                break
            if act > now:
                x += (current - x) * (1.0 - math.exp(-(act - now) / tau))
                now = act
            current = p
        if end > now:
            x += (current - x) * (1.0 - math.exp(-(end - now) / tau))
        return x

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
        temperature_band = self.band(soc) // TEMP_BAND_STRIDE
        if temperature_band != self._temperature_band:
            # Samples from another temperature band say nothing about this one's limit: start afresh.
            self._temperature_band = temperature_band
            self._samples.clear()
        self._samples.append((t, measured_w))
        while self._samples and self._samples[0][0] < t - 4.0 * self.settings.window_s:
            self._samples.popleft()
        self._fit_samples.append((t, measured_w))
        while self._fit_samples and self._fit_samples[0][0] < t - 40.0:
            self._fit_samples.popleft()
        learned = self._fit_dynamics(t)
        plateau = self._plateau(t, soc, configured)
        if plateau is not None:
            return plateau
        window = self._steady_window(t, soc)
        if window is not None:
            self.windows += 1
            self._window_end = t
            learned = self._learn(window, configured) or learned
        return learned

    # ---- steady windows ------------------------------------------------------------------------------------

    def _steady_window(self, t: float, soc: float | None) -> Window | None:
        if t - self.settings.window_s < self._window_end:
            return None  # windows do not overlap: each teaches once
        return steady_window(self.settings, self._samples, t, self.band(soc), self._request_range, self.dead_time_s,
                             self.lag_s, self.gain)

    def _plateau(self, t: float, soc: float | None, configured: Mapping[Direction, float]) -> str | None:
        """A limit seen before a steady window: the last three measurements, roughly one meter period apart,
        head (first-order approach, extrapolated by Aitken's delta-squared) or already sit clearly short of
        what every request of the last dead time and lag asks for. That is a ceiling, learned at once (as a
        provisional limit: a later steady window at another request tells it from a gain, as usual); the
        missing power then goes to the others from the model instead of through the observer's slow
        correction. The converse (a battery at its learned limit sitting clearly above it) raises the limit."""
        s = self.settings
        if len(self._samples) < 3 or not evenly_spaced(list(self._samples)[-3:]):
            return None
        t0 = self._samples[-3][0]
        lo, hi = self._request_range(t0 - self.dead_time_s - 0.5, t - self.dead_time_s)
        if lo * hi <= 0.0:
            return None
        d = direction_of(hi)
        smallest, largest = min(abs(lo), abs(hi)), max(abs(lo), abs(hi))
        if smallest < s.min_learn_w:
            return None  # deadbands and minimum outputs are not limits
        headed = heading(list(self._samples)[-3:], sign_of(d), s.tolerance_w,
                         self.lag_s if self.lag_fits >= 1 else None)
        if headed is None:
            return None
        final, flat = headed
        cap = max(0.0, configured[d])
        limit = self.limit(d, soc, cap)
        gap = max(2.0 * s.tolerance_w, 0.1 * abs(final))
        band = self.band(soc)
        if final < s.min_learn_w:
            return None
        if (s.plateau_limits and min(self.gain * smallest, limit) > final + max(gap, 0.2 * final)
                and not self.pending[d]):
            # (a clear margin: a slow ramp still closing in on its request is not a ceiling)
            # (once a provisional limit is pending, the steady windows decide: they compare two requests)
            # every request asked clearly more than it is heading for: a ceiling
            self._set_limit(d, band, final, cap)
            self.pending[d] = True
            self._from_plateau[d] = True
            self._plateau_request[d] = abs(self.request_at(t - self.dead_time_s))
            self._plateau_t[d] = t
            return "limit"
        last = self._last_window.get(d)
        if (self.pending[d] and self._from_plateau[d] and (last is None or last.t < self._plateau_t[d])
                and self.limited(d, soc, cap)
                and (final < limit - gap
                     or (flat and abs(final - limit) > 0.5 * s.tolerance_w))):
            # a provisional ceiling not yet confirmed by a steady window: a later plateau clearly below it (the
            # extrapolation overshot), or one already flat, corrects it. At the request it was seen at, a limit
            # and a gain deliver the same: the steady windows still decide which it is.
            self._set_limit(d, band, final, cap)
            return "limit"
        if (self.limited(d, soc, cap) and not (self.pending[d] and self._from_plateau[d])
                and not self.deciding(d, soc, cap)  # (its next steady window decides: limit or gain)
                and flat
                and final > limit + gap and min(self.gain * smallest, cap) > limit + gap):
            # at a probe, settled clearly above the learned limit: it recovered (at least this far)
            self._set_limit(d, band, final if final < self.gain * largest - gap else math.inf, cap)
            return "limit"
        return None

    def _learn(self, w: Window, configured: Mapping[Direction, float]) -> str | None:
        s = self.settings
        asked = abs(w.request_w)
        if asked < s.min_learn_w:
            return None
        d = direction_of(w.request_w)
        cap = max(0.0, configured[d])
        got = max(0.0, sign_of(d) * w.delivered_w)
        if not (self.pending[d] and abs(got - self.limit(d, None if w.band == GLOBAL_BAND else w.band * s.band_pct,
                                                          cap)) <= max(s.tolerance_w, 0.03 * got)):
            self._from_plateau[d] = False
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
        if abs(got - expected) <= tol and self.pending[d] and limit_bound:
            return self._confirm(previous, w, d, cap, tol)
        if abs(got - expected) <= tol:
            if limit_bound and learned is not None and learned < cap and self.fleet_short:
                # Delivering at the learned limit while the fleet is short of its target: let it creep up (a
                # recovering battery gets asked more). Not otherwise: every creep predicts power the battery
                # does not deliver, a sawtooth of steady error; the probe shows a recovery anyway.
                self._set_limit(d, w.band, limit * (1.0 + s.creep_frac), cap)
                self.pending[d] = False
                return None
            if not limit_bound and got < limit - tol:
                self.gain = _clamp(self.gain + 0.3 * (got / asked - self.gain), s.gain_min, s.gain_max)
            return None
        verdict = self._compare(previous, w, d, tol)
        if verdict == "gain":
            # The same fraction of two different requests: a gain, whichever side of the prediction.
            return self._gain_found(d, w.band, got / asked, decided=False)
        if got < expected - tol:
            self._set_limit(d, w.band, got, cap)
            self.pending[d] = verdict is None
            return "limit"
        return self._delivered_more(previous, w, d, cap, tol, limit_bound or (learned is not None and learned < cap))

    def _confirm(self, previous: Window | None, w: Window, d: Direction, cap: float, tol: float) -> str | None:
        """At a provisional limit (a plateau's, or one steady window's), delivering it again: a second request
        tells a limit (the same delivery) from a gain (the same fraction); meanwhile the window measures the limit
        better than the plateau's extrapolation did."""
        asked, got = abs(w.request_w), max(0.0, sign_of(d) * w.delivered_w)
        verdict = self._compare(previous, w, d, tol)
        if verdict == "gain":
            return self._gain_found(d, w.band, got / asked, decided=True)
        self._set_limit(d, w.band, got, cap)
        if verdict == "limit" or asked >= cap - tol:
            # (at the configured limit no request further up can tell them apart, and there a limit and a
            # gain predict the same: the limit stands; a shortfall at a smaller request reopens it)
            self.pending[d] = False
            self._from_plateau[d] = False
        return None

    def _delivered_more(self, previous: Window | None, w: Window, d: Direction, cap: float, tol: float,
                        limited: bool) -> str:
        """It delivered more than expected (`limited`: asked beyond its limit, or a limit is learned there)."""
        s = self.settings
        asked, got = abs(w.request_w), max(0.0, sign_of(d) * w.delivered_w)
        if (self.pending[d] and previous is not None and w.t - previous.t <= s.pair_max_age_s
                and abs(previous.band - w.band) <= 1 and asked > abs(previous.request_w)
                and got < self.gain * asked - tol):
            # Undecided, and a little more asked gave more, in the same proportion: a gain (a limit does not
            # deliver more when asked more; requests too close for _compare to tell the two apart by size)
            p0 = max(0.0, sign_of(d) * previous.delivered_w)
            r0, r1 = p0 / abs(previous.request_w), got / asked
            if abs(r1 - r0) <= 0.05 * max(r0, r1):
                return self._gain_found(d, w.band, r1, decided=True)
        if limited:
            if got >= self.gain * asked - tol:
                # It delivered all of the probe: assume it recovered; the next window finds any new limit.
                self.limits[d][w.band] = math.inf
            else:
                self._set_limit(d, w.band, got, cap)
            self.pending[d] = False
            return "limit"
        self.gain = _clamp(self.gain + 0.5 * (got / asked - self.gain), s.gain_min, s.gain_max)
        return "gain"

    def _gain_found(self, d: Direction, band: int, gain: float, decided: bool) -> str:
        """A gain, not a limit: none learned in this band (`decided`: a provisional limit's question, plateau's
        included, is answered)."""
        s = self.settings
        self.gain = _clamp(gain, s.gain_min, s.gain_max)
        self.limits[d][band] = math.inf
        self.pending[d] = False
        if decided:
            self._from_plateau[d] = False
        return "gain"

    def _nearest(self, d: Direction, band: int) -> float | None:
        table = self.limits[d]
        near = [table[b] for b in (band - 1, band + 1) if b in table and band != GLOBAL_BAND]
        return min(near) if near else table.get(GLOBAL_BAND)

    def _compare(self, previous: Window | None, w: Window, d: Direction, tol: float) -> str | None:
        return compare(self.settings, previous, w, sign_of(d), tol)

    def _set_limit(self, d: Direction, band: int, value: float, cap: float) -> None:
        # At or above the configured limit: none learned here (inf, so a neighbour's does not stand in).
        self.limits[d][band] = math.inf if value >= cap else max(0.0, value)

    # ---- lag and dead time: fitted to the response to any sizeable change ------------------------------------

    def _note_change(self, t: float, steady_w: float) -> None:
        s = self.settings
        self._hist.append((t, steady_w))
        while len(self._hist) > 2 and self._hist[1][0] < t - 40.0:
            self._hist.popleft()
        if self._change_t is None and dynamics.change_to_fit(s, self._hist, t, steady_w):
            self._change_t = t

    def _fit_dynamics(self, t: float) -> str | None:
        """A change was asked after a quiet spell: once its response is in, the lag and dead time that best
        explain the measurements (dynamics.py), blended into what was learned."""
        s = self.settings
        tc = self._change_t
        if tc is None or t < tc + s.fit_after_s:
            return None
        self._change_t = None
        fitted = dynamics.fit(s, list(self._hist), self._fit_samples, tc - 1.0, min(t, tc + s.fit_span_s))
        if fitted is None:
            return None
        lag, dead = fitted
        w = 0.6 if self.lag_fits == 0 else 0.3
        self.lag_s = _clamp(math.exp((1 - w) * math.log(self.lag_s) + w * math.log(lag)), 0.05, 20.0)
        self.dead_time_s = _clamp((1 - w) * self.dead_time_s + w * dead, 0.0, 10.0)
        self.lag_fits += 1
        return "lag"

    # ---- persistence -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"gain": self.gain, "lag_s": self.lag_s, "dead_time_s": self.dead_time_s, "lag_fits": self.lag_fits,
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
        self.lag_fits = int(_clamp(_number(data.get("lag_fits"), self.lag_fits), 0, 1e6))
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
                known = GLOBAL_BAND <= b <= 100 or TEMP_BAND_STRIDE <= b < TEMP_BAND_STRIDE * (TEMP_BANDS + 1) + 100
                if not math.isnan(v) and v >= 0 and known:
                    self.limits[d][b] = v


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)
