"""Meters that cannot be trusted, found from what they report against what the battery was asked
(pure: values in, verdicts out; time is passed in).

A battery's measured power has to follow its setpoint: after the dead time and the lag it moves the way the
setpoint moved (less when the battery is at a limit, not at all when it refuses, but never the other way). Over
a window with enough change of the setpoint:

- frozen: the measurement did not move at all (every value the same, within `frozen_w`) while the setpoint
  went `min_change_w` or more below it (toward 0 or past it): a meter that repeats its last value, fresh each
  time. Only below: a battery at its limit delivers the same whatever more is asked, but any battery can deliver
  less. A meter that repeats itself while more is asked makes the battery a suspect: it is asked
  `test_below_w` less than its meter shows for `max_delay_s`, which tells the two apart (costing a saturated
  battery that much for a few seconds). (A refusing battery's meter shows its noise; one that reads exactly 0 while
  refusing is held too, which costs nothing: it was not delivering.)
- inverted: the measurement moved against the setpoint (a clearly negative regression slope, strongly
  correlated) and mostly shows the other direction than asked: a meter or a measuredSign that counts the other
  way round. (A battery whose limit tapers while more is asked also moves against its setpoint, but in the
  direction asked; no battery delivers the opposite of its setpoint for long.)

A battery found so is held at 0 for `hold_s` (`inverted_hold_s` for a wrong sign; doubling at each repeat, up
to `max_hold_s`), then tried again on
probation: asked at most `probation_w` (enough to be checked, too little to matter if the meter is still wrong)
until a window with enough change shows the meter following.

The reference of a measurement is the setpoint in force some delay before it; the delay is not taken from the
battery's model (a wrong meter teaches the model wrong dynamics too) but is the one, within `max_delay_s`, that
best explains the measurements (the highest correlation): an honest meter follows at some delay, an inverted
one at none. A frozen meter is judged against the setpoints in force `max_delay_s` before.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

FROZEN = "frozen meter"
INVERTED = "measured sign inverted (check measuredSign)"


@dataclass(frozen=True, slots=True)
class FaultSettings:
    window_s: float = 30.0        # the measurements compared with the setpoint
    max_delay_s: float = 6.0      # dead time + lag + meter delay of any battery: the reference's delay is fitted
    delay_step_s: float = 0.5     # ... in steps of this
    min_change_w: float = 200.0   # the setpoint (its reference) must have moved this much within the window
    min_samples: int = 6
    frozen_w: float = 1.0         # a measurement moving less than this is frozen
    inverted_slope: float = -0.3  # measured vs reference: a slope below this ...
    inverted_corr: float = -0.6   # ... with a correlation below this is inverted, when ...
    opposite_frac: float = 0.7    # ... this share of the clearly asked measurements show the other direction
    hold_s: float = 120.0         # a frozen meter may thaw: tried again after this ...
    inverted_hold_s: float = 900.0  # ... a wrong sign is a configuration error that does not mend itself
    max_hold_s: float = 3600.0
    probation_w: float = 300.0    # the most a battery back from a hold is asked until its meter is seen to follow
    suspect_change_w: float = 100.0  # a meter repeating itself while its setpoint moved this much is suspect ...
    test_below_w: float = 300.0   # ... and asked this much less than its meter shows (> min_change_w)


class MeterCheck:
    """One battery's meter against its setpoints."""

    def __init__(self, settings: FaultSettings | None = None) -> None:
        self.settings = settings or FaultSettings()
        self._samples: deque[tuple[float, float]] = deque()   # (t measured, measured)
        self._requests: deque[tuple[float, float]] = deque([(-math.inf, 0.0)])  # (t, setpoint) at each change
        self.fault: str | None = None
        self.until = -math.inf
        self.probation = False
        self.suspect: float | None = None  # the repeated value, while the test below it runs
        self._suspect_until = -math.inf
        self._holds = 0

    def request(self, t: float, setpoint_w: float) -> None:
        """The setpoint sent at `t` (our sign: + charge)."""
        if setpoint_w != self._requests[-1][1]:
            self._requests.append((t, setpoint_w))
        keep = t - self.settings.window_s - self.settings.max_delay_s
        while len(self._requests) > 1 and self._requests[1][0] <= keep:
            self._requests.popleft()

    def add(self, t: float, measured_w: float) -> None:
        """A measurement taken at `t` (our sign)."""
        self._samples.append((t, measured_w))
        while self._samples and self._samples[0][0] < t - self.settings.window_s:
            self._samples.popleft()

    def cap(self, sign: float) -> float:
        """The most a suspect may be allocated in the direction of `sign` (inf when not a suspect or the other
        way), so the others are asked the rest at once."""
        if self.suspect is None or self.suspect * sign < 0.0:
            return math.inf
        return max(0.0, abs(self.suspect) - self.settings.test_below_w)

    def limit_request(self, request_w: float) -> float:
        """A suspect's request: test_below_w less than its meter shows (toward 0), never more."""
        if self.suspect is None:
            return request_w
        bound = max(0.0, abs(self.suspect) - self.settings.test_below_w)
        if request_w * self.suspect <= 0.0:
            return request_w if self.suspect != 0.0 else 0.0
        return math.copysign(min(abs(request_w), bound), request_w)

    def _below(self, value: float, t0: float, t1: float) -> float:
        """How far below `value` (toward 0, or past it) every setpoint in force from t0 to t1 was."""
        requests = [self._at(t0)] + [r for tr, r in self._requests if t0 < tr <= t1]
        if value == 0.0:
            return min(abs(r) for r in requests)
        return min((value - r) * math.copysign(1.0, value) for r in requests)

    def _at(self, t: float) -> float:
        value = self._requests[0][1]
        for tr, r in self._requests:
            if tr > t:
                break
            value = r
        return value

    def _in_force(self, times: list[float]) -> list[float]:
        """`_at` of each of these ascending times, in one pass over the setpoints (the meter check's hot loop)."""
        if any(later < earlier for earlier, later in zip(times, times[1:])):
            return [self._at(t) for t in times]  # measurements that came out of order
        requests = list(self._requests)
        values = []
        i, value = 0, requests[0][1]
        for t in times:
            while i < len(requests) and requests[i][0] <= t:
                value = requests[i][1]
                i += 1
            values.append(value)
        return values

    def held(self, now: float) -> str | None:
        """The fault the battery is held for now, if any; past its hold it is released (and watched afresh)."""
        if self.fault is not None and now >= self.until:
            self.fault = None
            self.probation = True
            self._samples.clear()
        return self.fault

    def check(self, now: float) -> str | None:
        """A new fault found in the window (the battery is held from now on), or None."""
        s = self.settings
        if self.fault is not None or len(self._samples) < s.min_samples:
            return None
        measured = [m for _, m in self._samples]
        fault = None
        fitted: list[float] = []  # the reference at the best-fitting delay, one per measurement
        value = measured[-1]
        run = 0  # the latest measurements that all repeat the last value
        while run < len(measured) and abs(measured[-1 - run] - value) <= s.frozen_w:
            run += 1
        if self.suspect is not None and (run < s.min_samples or now > self._suspect_until):
            self.suspect = None  # the meter moved (or the test is over): not frozen
        if run >= s.min_samples:
            # while it repeated itself: how far below the repeated value (toward 0, or past it) the setpoints had
            # all been for max_delay_s before a measurement (any battery has moved by then)
            times = [t for t, _ in list(self._samples)[-run:]]
            below = max(self._below(value, t - s.max_delay_s, t) for t in times)
            reference = [self._at(t) for t in times] + [r for tr, r in self._requests if times[0] < tr <= times[-1]]
            if below >= s.min_change_w:
                fault = FROZEN
            elif self.suspect is None and max(reference) - min(reference) >= s.suspect_change_w:
                # more asked and nothing moved: at a limit, or frozen? asked less, the answer shows
                self.suspect = value
                self._suspect_until = now + 2.0 * s.max_delay_s + 2.0
        if fault is None and max(measured) - min(measured) > s.frozen_w:
            best = self._best_fit(measured)
            if best is None:
                return None
            slope, corr, fitted = best
            if slope < s.inverted_slope and corr < s.inverted_corr and self._opposite(fitted, measured):
                fault = INVERTED
        if fault is not None:
            self.suspect = None
            self.fault = fault
            hold = s.inverted_hold_s if fault == INVERTED else s.hold_s
            self.until = now + min(s.max_hold_s, hold * 2 ** self._holds)
            self._holds += 1
            self._samples.clear()
        elif self.probation and fitted and self._followed(fitted, measured):
            self.probation = False  # it follows again: trusted in full
        return fault

    def _best_fit(self, measured: list[float]) -> tuple[float, float, list[float]] | None:
        """(slope, correlation, reference) at the delay whose correlation is the highest: an honest meter has
        one delay at which it follows (at others the dispatcher's own reaction to the meter can look like the
        opposite); an inverted one has none. None without enough change of the setpoint."""
        s = self.settings
        n = len(measured)
        mm = sum(measured) / n
        var_m = sum((m - mm) ** 2 for m in measured)
        best: tuple[float, float, list[float]] | None = None
        steps = int(s.max_delay_s / s.delay_step_s) + 1
        times = [t for t, _ in self._samples]
        for k in range(steps):
            delay = k * s.delay_step_s
            reference = self._in_force([t - delay for t in times])
            if max(reference) - min(reference) < s.min_change_w:
                continue
            mr = sum(reference) / n
            var_r = sum((r - mr) ** 2 for r in reference)
            cov = sum((r - mr) * (m - mm) for r, m in zip(reference, measured))
            corr = cov / math.sqrt(var_r * var_m) if var_r > 0.0 and var_m > 0.0 else 0.0
            if best is None or corr > best[1]:
                best = (cov / var_r if var_r > 0.0 else 0.0, corr, reference)
        return best

    def _opposite(self, reference: list[float], measured: list[float]) -> bool:
        """Most measurements taken while clearly asked something show the other direction."""
        asked = [(r, m) for r, m in zip(reference, measured) if abs(r) >= self.settings.min_change_w]
        if not asked:
            return False
        opposite = sum(1 for r, m in asked if r * m < 0.0 and abs(m) >= 0.1 * abs(r))
        return opposite >= self.settings.opposite_frac * len(asked)

    def _followed(self, reference: list[float], measured: list[float]) -> bool:
        """The measurement moved with the setpoint by at least a third of its change."""
        lo = reference.index(min(reference))
        hi = reference.index(max(reference))
        return (measured[hi] - measured[lo]) >= (reference[hi] - reference[lo]) / 3.0
