"""A battery's lag and dead time (pure, numpy): fitted to the measured response to a change of the steady
prediction that follows a quiet spell, whatever the shape of the requests (overdriven ones too). Least squares
over a grid of dead times and lags, with a free scale and offset per candidate, so a gain or limit the model has
not learned yet does not bias them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from .model import ModelSettings

STEP_S = 0.1  # the grid's time step
DEAD_TIMES = np.arange(0, 31)  # 0 .. 3 s, in steps of STEP_S
LAGS = np.geomspace(0.2, 8.0, 17)
BACK = 40  # up to 4 s of dead time before the window


def change_to_fit(s: ModelSettings, hist: Sequence[tuple[float, float]], t: float, steady_w: float) -> bool:
    """Whether the steady prediction `steady_w` at `t` is a change worth fitting: sizeable, after a quiet spell
    (`hist`: the steady predictions, (t, value))."""
    recent = [p for tp, p in hist if tp >= t - 3.0 and tp < t]
    if len(recent) < 3:
        return False
    lo, hi = min(recent), max(recent)
    mid = 0.5 * (lo + hi)
    if hi - lo > max(s.fit_quiet_w, 0.1 * abs(mid)):
        return False
    return abs(steady_w - mid) >= max(s.fit_change_w, 0.2 * abs(mid))


def fit(s: ModelSettings, hist: Sequence[tuple[float, float]], samples: Sequence[tuple[float, float]],
        t0: float, t1: float) -> tuple[float, float] | None:
    """The lag and the dead time (s) that best explain `samples` (t measured, measured) between t0 and t1 as the
    response to `hist` (t, steady prediction); None when too little or too poor a fit."""
    samples = [(tm, m) for tm, m in samples if t0 <= tm <= t1]
    if len(samples) < 6 or not hist or hist[0][0] > t0 - 4.0:
        return None
    measured = np.array([m for _, m in samples])
    preds = _responses(hist, samples, t0, t1)
    # free scale and offset per candidate
    pm = preds.mean(axis=0)
    mm = measured.mean()
    dp = preds - pm
    var = (dp ** 2).sum(axis=0)
    cov = (dp * (measured - mm)[:, None, None]).sum(axis=0)
    scale = np.where(var > 1e-6, cov / np.maximum(var, 1e-6), 0.0)
    sse = ((measured - mm)[:, None, None] - scale * dp) ** 2
    sse = sse.sum(axis=0)
    sse = np.where(scale > 0.2, sse, np.inf)
    best = np.unravel_index(int(np.argmin(sse)), sse.shape)
    spread = float(np.ptp(measured))
    if not math.isfinite(float(sse[best])) or spread < s.fit_change_w * 0.7:
        return None
    rms = math.sqrt(float(sse[best]) / len(samples))
    if rms > max(s.noise_w, 0.1 * spread):
        return None
    return float(LAGS[best[1]]), float(DEAD_TIMES[best[0]]) * STEP_S


def _responses(hist: Sequence[tuple[float, float]], samples: Sequence[tuple[float, float]], t0: float,
               t1: float) -> np.ndarray:
    """Each candidate's (dead time x lag) response to the input `hist` at each sample's time: (samples, D, T)."""
    dt = STEP_S
    n = int(math.ceil((t1 - t0) / dt)) + 1
    grid_t = t0 + dt * (np.arange(n + BACK) - BACK)
    times = np.array([h[0] for h in hist])
    values = np.array([h[1] for h in hist])
    idx = np.searchsorted(times, grid_t, side="right") - 1
    u = values[np.clip(idx, 0, len(values) - 1)]                         # the input on the grid
    a = 1.0 - np.exp(-dt / LAGS)                                         # (T,)
    # the state starts where the first sample says (the change came after a quiet spell)
    x = np.full((len(DEAD_TIMES), len(LAGS)), samples[0][1])
    sample_idx = np.clip(np.round((np.array([tm for tm, _ in samples]) - t0) / dt).astype(int), 0, n - 1)
    preds = np.empty((len(samples), len(DEAD_TIMES), len(LAGS)))
    order = np.argsort(sample_idx)
    k = 0
    for j in range(n):
        while k < len(order) and sample_idx[order[k]] == j:
            preds[order[k]] = x
            k += 1
        inp = u[BACK + j - DEAD_TIMES]                                   # (D,)
        x = x + (inp[:, None] - x) * a[None, :]
    return preds
