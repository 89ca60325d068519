"""What a battery's measurements teach (pure): a steady window (the request constant long enough for the lag to
have settled, the measurements in it agreeing), what two steady windows at different requests tell (a limit: the
same delivery; a gain: the same fraction), and where three measurements are heading (a plateau: a ceiling seen
before a steady window). The model (model.py) decides what to learn from them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from .model import ModelSettings


@dataclass(frozen=True, slots=True)
class Window:
    """A steady window: the mean request and the mean delivered power while both were steady."""

    t: float
    request_w: float
    delivered_w: float
    band: int
    varied: bool = False  # the request moved during the window (request_w is then its smallest magnitude)


def steady_window(s: ModelSettings, samples: Sequence[tuple[float, float]], t: float, band: int,
                  request_range: Callable[[float, float], tuple[float, float]], dead_time_s: float, lag_s: float,
                  gain: float) -> Window | None:
    """The window of `samples` (t measured, measured) ending at `t`, if steady; `request_range(t0, t1)`: the
    smallest and largest request in force between t0 and t1."""
    start = t - s.window_s
    window = [(tm, m) for tm, m in samples if tm >= start]
    if len(window) < 3 or window[0][0] > start + 0.4 * s.window_s:
        return None
    points = [m for _, m in window]
    mean = sum(points) / len(points)
    if max(points) - min(points) > max(s.noise_w, s.noise_frac * abs(mean)):
        return None
    # No trend: the tail of a lag is not steady, however small its spread.
    if abs(slope(window)) * s.window_s > max(s.trend_w, s.trend_frac * abs(mean)):
        return None
    # The request must have been steady since the lag (mostly) settled before the window began.
    lo, hi = request_range(start - dead_time_s - 2.0 * lag_s, t - dead_time_s)
    request = 0.5 * (lo + hi)
    if hi - lo > max(s.request_spread_w, s.request_spread_frac * abs(request)):
        if lo * hi <= 0.0:
            return None
        # The request moved within the window but the delivery did not: a limit, if every request asked
        # for more. (Moves before the window only settle into it: they show nothing.)
        in_lo, in_hi = request_range(start - dead_time_s, t - dead_time_s)
        if gain * (in_hi - in_lo) < 2.0 * max(s.noise_w, s.noise_frac * abs(mean)):
            return None  # too small a move for a following battery to show beyond the noise
        smallest = lo if lo > 0 else hi
        return Window(t, smallest, mean, band, varied=True)
    return Window(t, request, mean, band)


def compare(s: ModelSettings, previous: Window | None, w: Window, sign: float, tol: float) -> str | None:
    """Two steady windows at different requests: 'limit' (same delivery), 'gain' (same fraction), None
    (`sign`: that of the direction, +1 charging)."""
    if previous is None or w.t - previous.t > s.pair_max_age_s or abs(previous.band - w.band) > 1:
        return None
    a0, a1 = abs(previous.request_w), abs(w.request_w)
    p0 = max(0.0, sign * previous.delivered_w)
    p1 = max(0.0, sign * w.delivered_w)
    if a0 <= 0.0 or a1 <= 0.0:
        return None
    # The two hypotheses predict, for the new request: the same delivery (a limit) or the same fraction of
    # the request (a gain). They can be told apart only when those predictions differ beyond the noise.
    as_limit, as_gain = p0, p0 * a1 / a0
    if abs(as_gain - as_limit) >= 1.5 * tol:
        if abs(p1 - as_limit) <= tol and abs(p1 - as_limit) < abs(p1 - as_gain):
            return "limit"
        if abs(p1 - as_gain) <= max(tol, 0.03 * p1) and abs(p1 - as_gain) < abs(p1 - as_limit):
            return "gain"
    # requests apart by 8 % or more: the same delivery is a limit, the same fraction a gain
    if abs(a1 - a0) < max(tol, 0.08 * max(a0, a1)):
        return None
    if abs(p1 - p0) <= tol:
        return "limit"
    r0, r1 = p0 / a0, p1 / a1
    if abs(r1 - r0) <= 0.05 * max(r0, r1):
        return "gain"
    return None


def evenly_spaced(samples: Sequence[tuple[float, float]]) -> bool:
    """Whether the last three measurements are roughly one meter period apart (the extrapolation assumes equal
    steps)."""
    (t0, _), (t1, _), (t2, _) = samples[-3:]
    h0, h1 = t1 - t0, t2 - t1
    return not (h0 <= 0.2 or h1 <= 0.2 or abs(h1 - h0) > 0.35 * max(h0, h1) or t2 - t0 > 5.0)


def heading(samples: Sequence[tuple[float, float]], sign: float, tolerance_w: float,
            fitted_lag_s: float | None) -> tuple[float, bool] | None:
    """Where the last three (evenly spaced) measurements are heading, as a magnitude in the direction of `sign`,
    and whether they are already flat; None when they are not settling (a first-order approach, extrapolated by
    Aitken's delta-squared and, with a fitted lag, by that lag too: a ceiling is where both say it stops short)."""
    (_, y0), (t1, y1), (t2, y2) = samples[-3:]
    g0, g1, g2 = sign * y0, sign * y1, sign * y2
    d1, d2 = g1 - g0, g2 - g1
    flat = max(g0, g1, g2) - min(g0, g1, g2) <= max(tolerance_w, 0.02 * abs(g2))
    if flat:
        return (g0 + g1 + g2) / 3.0, True
    if d1 > max(tolerance_w, 0.02 * abs(g2)) and 0.0 < d2 < 0.75 * d1:
        final = g2 + d2 * d2 / (d1 - d2)  # where a first-order approach is heading
        if fitted_lag_s is not None:
            # (a move that starts slowly, a minimum output or a direction change, fools Aitken's)
            r = math.exp(-(t2 - t1) / max(0.05, fitted_lag_s))
            final = max(final, g2 + d2 * r / (1.0 - r))
        return final, False
    return None


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) points."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if var <= 0 else sum((t - mt) * (v - mv) for t, v in points) / var
