"""What a bench run of a dispatcher scored: settle time, overshoot, steady error and swing, direction changes,
avoidable grid energy, imbalance, learning and fault-detection times (pure Python + numpy)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

SIM_DT_S = 0.1  # the simulation's step: a trace's samples are this far apart
SETTLE_HOLD_S = 10.0
STEADY_AFTER_S = 20.0   # samples this long after an event count as steady state


@dataclass
class Trace:
    times: np.ndarray
    demand: np.ndarray
    total: np.ndarray             # true battery total (+ charging)
    achievable: np.ndarray        # the battery total the grid-zero target asks, within the true limits
    power: dict[str, np.ndarray]  # true power per battery
    ideal: dict[str, np.ndarray]  # capacity-proportional water-filled split of `achievable`
    setpoints: dict[str, np.ndarray]  # per control cycle
    control_times: np.ndarray
    events: list[float]
    learned_at: list[float]       # per learn target: seconds to learn, nan if never
    detected_at: list[float] = field(default_factory=list)  # per fault: seconds until the battery was held
    held_power: list[float] = field(default_factory=list)  # per fault: the battery's true power at the end (W)


@dataclass(frozen=True, slots=True)
class Metrics:
    settle_s: float        # mean over events; an event that never settles counts its whole interval
    unsettled: int         # events that did not settle
    overshoot_w: float     # mean over events of the excursion beyond the new target
    rms_w: float           # steady-state RMS error (samples STEADY_AFTER_S after any event)
    crossings_per_h: float  # direction changes of battery setpoints (through the deadband), per hour
    avoidable_wh: float    # grid import + export the batteries could have covered
    imbalance_pct: float   # distance from the capacity-proportional split, steady state
    learn_s: float         # mean learning time (nan: nothing to learn or not the learned dispatcher)
    learn_missed: int      # learn targets never reached
    swing_w: float = math.nan  # steady state: 99th minus 1st percentile of the error (an oscillation's size)
    detect_s: float = math.nan  # mean seconds from a meter fault to its battery being held (nan: none, or missed)
    detect_missed: int = 0      # faults never detected (the learned dispatcher only)


def metrics(trace: Trace, min_command_w: float = 25.0) -> Metrics:
    t = trace.times
    error = trace.total - trace.achievable
    tol = np.maximum(25.0, 0.02 * np.abs(trace.achievable))
    inside = np.abs(error) <= tol
    bounds = list(trace.events) + [float(t[-1]) + SIM_DT_S]
    settles: list[float] = []
    overshoots: list[float] = []
    unsettled = 0
    hold = int(round(SETTLE_HOLD_S / SIM_DT_S))
    for e0, e1 in zip(bounds[:-1], bounds[1:]):
        lo, hi = int(np.searchsorted(t, e0)), int(np.searchsorted(t, e1))
        seg = inside[lo:hi]
        settled = _first_run(seg, hold)
        if settled is None:
            settles.append(e1 - e0)
            unsettled += 1
        else:
            settles.append(settled * SIM_DT_S)
        before = trace.achievable[max(lo - 1, 0)]
        after = trace.achievable[min(hi - 1, len(t) - 1)]
        direction = 1.0 if after >= before else -1.0
        overshoots.append(max(0.0, float(np.max(direction * error[lo:hi], initial=0.0))))
    since = _time_since_event(t, trace.events)
    steady = since >= STEADY_AFTER_S
    rms = float(np.sqrt(np.mean(error[steady] ** 2))) if steady.any() else math.nan
    avoidable = float(np.sum(np.abs(error)) * SIM_DT_S / 3600.0)
    hours = (t[-1] - t[0] + SIM_DT_S) / 3600.0
    crossings = sum(_direction_changes(sp, min_command_w) for sp in trace.setpoints.values()) / hours
    imbalance = _imbalance(trace, steady)
    learn = [x for x in trace.learned_at if not math.isnan(x)]
    swing = float(np.percentile(error[steady], 99) - np.percentile(error[steady], 1)) if steady.any() else math.nan
    detected = [x for x in trace.detected_at if not math.isnan(x)]
    return Metrics(float(np.mean(settles)) if settles else math.nan, unsettled,
                   float(np.mean(overshoots)) if overshoots else 0.0, rms, crossings, avoidable, imbalance,
                   float(np.mean(learn)) if learn else math.nan, len(trace.learned_at) - len(learn), swing,
                   float(np.mean(detected)) if detected else math.nan, len(trace.detected_at) - len(detected))


def _first_run(mask: np.ndarray, length: int) -> int | None:
    """Index where `mask` first stays true for `length` samples (or to its end, if shorter and true)."""
    run = 0
    for i, ok in enumerate(mask):
        run = run + 1 if ok else 0
        if run >= length:
            return i - length + 1
    return None


def _time_since_event(t: np.ndarray, events: Sequence[float]) -> np.ndarray:
    since = t - t[0] + 0.0
    for e in events:
        after = t >= e
        since = np.where(after, np.minimum(since, t - e), since)
    return since


def _direction_changes(setpoints: np.ndarray, deadband_w: float) -> int:
    signs = np.sign(setpoints[np.abs(setpoints) >= deadband_w])
    return int(np.count_nonzero(np.diff(signs) != 0)) if len(signs) > 1 else 0


def _imbalance(trace: Trace, steady: np.ndarray) -> float:
    """Half the summed |P_k - ideal_k| over the ideal total, in %, over steady samples with >= 200 W to split."""
    mask = steady & (np.abs(trace.achievable) >= 200.0)
    if not mask.any():
        return math.nan
    dist = sum(np.abs(trace.power[k][mask] - trace.ideal[k][mask]) for k in trace.power)
    return float(100.0 * np.mean(0.5 * dist / np.abs(trace.achievable[mask])))


