"""The dispatcher's target through a transient and along a ramp (pure; `now` is passed in).

Through a fast (lead-compensated) transient the target is held at its value right after the jump: while the
batteries move, their meters and the grid meter sample at different moments and a target built from them swings by
up to the whole step. A target ramping along a line (solar under a passing cloud) is led by the fleet's delay.
"""
from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .controller import DispatcherSettings


class TargetShaping:
    def __init__(self, settings: DispatcherSettings) -> None:
        self.settings = settings
        self.held: tuple[float, float] | None = None  # the target held through a transient: (target, until)
        self._held_sign = 0.0                          # ... and the direction it jumped
        self._last_target: float | None = None
        self._targets: deque[tuple[float, float]] = deque()  # (now, target) over ramp_window_s
        self._jitter: deque[float] = deque(maxlen=max(1, settings.jitter_cycles))  # |change| of the target

    def reset(self) -> None:
        """The dispatcher stopped: no hold, no ramp."""
        self.held = None
        self._targets.clear()

    def hold(self, now: float, target: float, quiet: Callable[[], bool], settle_s: Callable[[], float | None]
             ) -> bool:
        """Hold the target through a transient. A jump seen while every battery is `quiet` (its latest
        measurement taken after it settled where it is asked to be) is sound; the hold ends once they are quiet
        again (or after `settle_s`: their longest dead time and lags, None without batteries). Returns True on a
        jump."""
        s = self.settings
        last, self._last_target = self._last_target, target
        if last is not None:
            self._jitter.append(abs(target - last))
        jump_min = self._jump_min()
        if self.held is not None:
            held, until = self.held
            if now > until or quiet() or target * held <= 0.0:
                self.held = None  # (a target of the other sign, or 0, is never held against: safety first)
            elif (target - held) * self._held_sign > max(jump_min, 0.1 * abs(held)):
                # The target keeps going the way it jumped: the jump was not over when it was caught (something
                # the dispatcher does not see moved: a silent battery, the household). Follow it. (The meters'
                # disagreement through a transient pulls the other way: a ramping battery's meter lags.)
                self.held = (target, until)
                return False
            else:
                return False
        if last is None or s.lead_tau_s <= 0.0 or s.max_lead <= 1.0:
            return False
        if abs(target - last) < jump_min or not quiet():
            return False
        span = settle_s()
        if span is None:
            return False
        self.held = (target, now + span)
        self._held_sign = 1.0 if target > last else -1.0
        return True

    def _jump_min(self) -> float:
        """The smallest change of the target taken for a jump: lead_min_w, or well above the target's own noise
        (noisy meters make a grid-zero target jitter; leading each jitter as a jump would amplify it)."""
        s = self.settings
        if len(self._jitter) < 5:
            return s.lead_min_w
        ordered = sorted(self._jitter)
        median = ordered[len(ordered) // 2]
        return max(s.lead_min_w, s.jitter_factor * median)

    def ramp_lead(self, now: float, target: float, active: bool, delay_s: Callable[[], float]) -> float:
        """A target ramping along a line is followed late by the fleet's delay (`delay_s`: its meters' age, a
        grid-zero target built from them lags by it, dead time and lag). The slope times that delay is added
        while the last ramp_window_s of targets lie on a line; 0 otherwise (a step or noise does not fit a line),
        so a steady or jumping target is left alone. `active`: whether any battery is used."""
        s = self.settings
        self._targets.append((now, target))
        while self._targets and self._targets[0][0] < now - s.ramp_window_s:
            self._targets.popleft()
        if s.ramp_window_s <= 0.0 or not active or len(self._targets) < 6:
            return 0.0
        if self._targets[0][0] > now - 0.8 * s.ramp_window_s:
            return 0.0
        n = len(self._targets)
        mt = sum(t for t, _ in self._targets) / n
        mv = sum(v for _, v in self._targets) / n
        var = sum((t - mt) ** 2 for t, _ in self._targets)
        if var <= 0.0:
            return 0.0
        slope = sum((t - mt) * (v - mv) for t, v in self._targets) / var
        span = abs(slope) * (self._targets[-1][0] - self._targets[0][0])
        if span < s.ramp_min_w:
            return 0.0
        rms = math.sqrt(sum((v - (mv + slope * (t - mt))) ** 2 for t, v in self._targets) / n)
        if rms > s.ramp_fit * span:
            return 0.0
        values = [v for _, v in self._targets]
        if max(abs(b - a) for a, b in zip(values, values[1:])) > 0.5 * span:
            return 0.0  # one jump (a step, a battery leaving) is not a ramp, however it lies on the window
        lead = slope * delay_s()
        if target * (target + lead) < 0.0 or target == 0.0:
            return 0.0  # never led across 0: a direction change waits for the target itself
        return lead
