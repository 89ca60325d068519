"""Online internal-resistance estimator, one per member pack.

Model: terminal voltage ``V = OCV + R * I`` (I > 0 = charging). The estimator is
a 2-parameter linear regression of V on I over exponentially weighted samples,
kept as centred weighted sums (weight W, means of I and V, scatter Cxx, Cxy,
Cyy, updated Welford-style so 53 V offsets do not cancel digits away). It is the
same fit as recursive least squares with forgetting on x=[1, I], without a
covariance matrix that can wind up.

Guards against the failure modes of a plain straight-line fit:

* **No excitation.** A sample enters the regression (and triggers forgetting)
  only if its current differs from the weighted mean current by at least
  ``min_current_change`` A and by half the current's standard deviation.
  Otherwise it carries no information about R: it only nudges the OCV level
  (OCV drifts with SoC). So a long constant-current period freezes R and its
  uncertainty instead of forgetting all excitation and dividing noise by noise.
* **Outliers / BMS cut-off.** Once established, a sample whose residual exceeds
  6 sigma of the prediction is skipped (counted). ``CHANGE_RUN`` consecutive
  outliers mean the regime changed: if they agree on a common offset the OCV
  level is re-anchored (R untouched); otherwise the old data is discounted to
  ``CHANGE_DISCOUNT`` of its weight and the run is replayed, so a real change
  of R is followed within a few hundred samples.
* **Bounds.** A fit outside ``[r_min, r_max]`` (negative, huge, NaN) is never
  returned as the value: :meth:`estimate` then reports the last in-bounds fit,
  not usable, with the reason.
* **Honest uncertainty.** ``stderr = sigma / sqrt(Cxx)`` with sigma the
  weighted residual standard deviation, never below ``NOISE_FLOOR_V``. This
  treats the weight sum as the sample count, which is conservative for
  exponential weights.

numpy is optional for the service as a whole; this module imports it lazily and
refuses to construct an estimator without it (:class:`EstimatorUnavailable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..numbers import finite

try:  # GX devices on 32-bit ARM may not have numpy
    import numpy as np
except ImportError:  # pragma: no cover - exercised by monkeypatching np
    np = None  # type: ignore[assignment]  # the optional-import idiom: callers check `np is None`

__all__ = [
    "EstimatorUnavailable",
    "IrEstimate",
    "IrEstimator",
    "numpy_available",
]

NOISE_FLOOR_V = 1e-3  # never assume less voltage noise than this (D-Bus resolution is 10 mV)
OUTLIER_SIGMAS = 6.0
CHANGE_RUN = 10  # consecutive outliers that mean "the regime changed"
CHANGE_DISCOUNT = 0.0  # weight kept by the old data after a change of regime (0: start over)
EXCITATION_STD_FRACTION = 0.5
STATE_VERSION = 1.0
_STAT_KEYS = ("w", "mx", "my", "cxx", "cxy", "cyy", "n_admitted", "outliers", "level_updates")
_LAST_KEYS = ("last_r", "last_stderr", "last_ocv")


def numpy_available() -> bool:
    return np is not None


class EstimatorUnavailable(RuntimeError):
    """The estimator cannot run here (numpy missing)."""


@dataclass(frozen=True)
class IrEstimate:
    resistance: float  # ohm
    stderr: float  # ohm, standard error of the resistance
    ocv: float  # V
    samples: int  # effective number of samples (weight sum)
    voltage_span: float  # V, spread of voltages (due to current) the estimate rests on
    usable: bool
    reason: str  # "" when usable


def _fmt_ohm(x: float) -> str:
    if abs(x) < 1.0:
        return f"{x * 1000:.3g} mOhm"
    return f"{x:.3g} Ohm"



class IrEstimator:
    def __init__(
        self,
        max_relative_error: float = 0.1,
        min_voltage_change: float = 0.02,
        forgetting: float = 0.998,
        r_min: float = 1e-4,
        r_max: float = 1.0,
        *,
        min_samples: int = 5,
        min_current_change: float = 0.5,
    ) -> None:
        if np is None:
            raise EstimatorUnavailable(
                "internal-resistance estimation needs numpy, which is not installed on this device; "
                "the aggregator runs without resistance estimates"
            )
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
        if not 0.0 < r_min < r_max:
            raise ValueError(f"need 0 < r_min < r_max, got {r_min!r}, {r_max!r}")
        self.max_relative_error = float(max_relative_error)
        self.min_voltage_change = float(min_voltage_change)
        self.forgetting = float(forgetting)
        self.r_min = float(r_min)
        self.r_max = float(r_max)
        self.min_samples = int(min_samples)
        self.min_current_change = float(min_current_change)
        self._reset()

    def _reset(self) -> None:
        self._w = 0.0  # sum of weights
        self._mx = 0.0  # weighted mean current
        self._my = 0.0  # weighted mean voltage
        self._cxx = 0.0  # centred weighted scatter
        self._cxy = 0.0
        self._cyy = 0.0
        self._n_admitted = 0.0  # samples that entered the regression (not decayed)
        self._outliers = 0.0  # samples skipped as outliers (total)
        self._level_updates = 0.0  # non-exciting samples that only moved the OCV level
        self._run: list[tuple[float, float, float]] = []  # current outlier run: (v, i, residual)
        self._last: tuple[float, float, float] | None = None  # last in-bounds (r, stderr, ocv)

    # -- public -----------------------------------------------------------------

    @property
    def outliers(self) -> int:
        return int(self._outliers)

    def update(self, voltage: float | None, current: float | None) -> None:
        """Feed one simultaneous (terminal voltage V, current A) sample; bad values are ignored."""
        if not (finite(voltage) and finite(current)):
            return
        v = float(voltage)
        i = float(current)
        if self._established():
            e, sd = self._residual(v, i)
            if abs(e) > OUTLIER_SIGMAS * sd:
                self._outliers += 1
                self._run.append((v, i, e))
                if len(self._run) >= CHANGE_RUN:
                    self._change_of_regime(sd)
                return
            self._run.clear()
        self._feed(v, i)
        self._remember()

    def estimate(self) -> IrEstimate | None:
        """The current estimate, or None before any in-bounds fit exists."""
        fit = self._fit()
        if fit is not None:
            r, se, ocv, span = fit
            if self.r_min <= r <= self.r_max:
                return self._judge(r, se, ocv, span)
            reason = f"fit R={_fmt_ohm(r)} outside {_fmt_ohm(self.r_min)}..{_fmt_ohm(self.r_max)}"
        else:
            reason = "no current excitation yet"
        if self._last is None:
            return None
        r, se, ocv = self._last
        return IrEstimate(r, se, ocv, int(round(self._w)), self._span(r), False, reason)

    def to_state(self) -> dict[str, float]:
        d = {"version": STATE_VERSION}
        for k in _STAT_KEYS:
            d[k] = float(getattr(self, "_" + k))
        if self._last is not None:
            d.update(zip(_LAST_KEYS, (float(x) for x in self._last)))
        return d

    @classmethod
    def from_state(cls, d: Any, **kwargs: Any) -> "IrEstimator":
        """Resume from :meth:`to_state`; anything malformed gives a fresh estimator."""
        est = cls(**kwargs)
        try:
            if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
                return est
            vals = {k: d[k] for k in _STAT_KEYS}
            if not all(finite(x) for x in vals.values()):
                return est
            w, cxx, cyy, cxy = vals["w"], vals["cxx"], vals["cyy"], vals["cxy"]
            if w < 0 or cxx < 0 or cyy < 0 or cxy * cxy > cxx * cyy * (1 + 1e-9) + 1e-300:
                return est
            if any(vals[k] < 0 for k in ("n_admitted", "outliers", "level_updates")):
                return est
            last = None
            if all(k in d for k in _LAST_KEYS):
                lr, ls, lo = (d[k] for k in _LAST_KEYS)
                if not all(finite(x) for x in (lr, ls, lo)) or not est.r_min <= lr <= est.r_max or ls < 0:
                    return est
                last = (float(lr), float(ls), float(lo))
            for k, x in vals.items():
                setattr(est, "_" + k, float(x))
            est._last = last
        except Exception:  # never raise on a bad state file
            fresh = cls(**kwargs)
            return fresh
        return est

    # -- internals ----------------------------------------------------------------

    def _established(self) -> bool:
        return self._w >= 2 * self.min_samples and self._cxx > 0.0

    def _sigma(self) -> float:
        if self._cxx <= 0.0:
            return NOISE_FLOOR_V
        ssr = max(0.0, self._cyy - self._cxy * self._cxy / self._cxx)
        dof = max(self._w - 2.0, 1.0)
        return max(math.sqrt(ssr / dof), NOISE_FLOOR_V)

    def _residual(self, v: float, i: float) -> tuple[float, float]:
        """A-priori residual of (v, i) and its standard deviation."""
        r = self._cxy / self._cxx
        dx = i - self._mx
        e = v - (self._my + r * dx)
        sd = self._sigma() * math.sqrt(1.0 + 1.0 / self._w + dx * dx / self._cxx)
        return e, sd

    def _exciting(self, i: float) -> bool:
        if self._w <= 0.0:
            return True
        dx = abs(i - self._mx)
        std = math.sqrt(max(self._cxx, 0.0) / self._w)
        return dx >= self.min_current_change and dx >= EXCITATION_STD_FRACTION * std

    def _feed(self, v: float, i: float) -> None:
        if self._exciting(i):
            self._admit(v, i)
        else:
            self._level(v, i)

    def _admit(self, v: float, i: float) -> None:
        lam = self.forgetting
        self._w = lam * self._w + 1.0
        dx = i - self._mx
        dy = v - self._my
        self._mx += dx / self._w
        self._my += dy / self._w
        self._cxx = lam * self._cxx + dx * (i - self._mx)
        self._cxy = lam * self._cxy + dx * (v - self._my)
        self._cyy = lam * self._cyy + dy * (v - self._my)
        self._n_admitted += 1

    def _level(self, v: float, i: float) -> None:
        """A sample without excitation: only lets the OCV level follow (SoC drift)."""
        r = self._cxy / self._cxx if self._cxx > 0.0 else 0.0
        e = v - (self._my + r * (i - self._mx))
        self._my += e / max(self._w, 1.0)
        self._level_updates += 1

    def _change_of_regime(self, sd: float) -> None:
        run, self._run = self._run, []
        mean_e = sum(e for _, _, e in run) / len(run)
        if all(abs(e - mean_e) <= OUTLIER_SIGMAS * sd for _, _, e in run):
            # Same offset throughout: the level moved (OCV jump, cut-off), R did not.
            self._my += mean_e
        else:
            k = CHANGE_DISCOUNT
            self._w *= k
            self._cxx *= k
            self._cxy *= k
            self._cyy *= k
            for v, i, _ in run:
                self._feed(v, i)
        self._remember()

    def _span(self, r: float) -> float:
        if self._w <= 0.0 or self._cxx <= 0.0:
            return 0.0
        return 2.0 * abs(r) * math.sqrt(self._cxx / self._w)

    def _fit(self) -> tuple[float, float, float, float] | None:
        if self._w < 2.0 or not self._cxx > 0.0:
            return None
        r = self._cxy / self._cxx
        if not math.isfinite(r):
            return None
        se = self._sigma() / math.sqrt(self._cxx)
        ocv = self._my - r * self._mx
        return r, se, ocv, self._span(r)

    def _remember(self) -> None:
        fit = self._fit()
        if fit is not None and self.r_min <= fit[0] <= self.r_max and math.isfinite(fit[1]):
            self._last = (fit[0], fit[1], fit[2])

    def _judge(self, r: float, se: float, ocv: float, span: float) -> IrEstimate:
        n = int(round(self._w))
        reason = ""
        if self._w < self.min_samples:
            reason = f"only {self._w:.1f} effective samples < {self.min_samples}"
        elif span < self.min_voltage_change:
            reason = f"voltage change {span:.3f} V < {self.min_voltage_change:g} V"
        elif se > self.max_relative_error * r:
            reason = f"relative error {100 * se / r:.0f}% > {100 * self.max_relative_error:.0f}%"
        return IrEstimate(r, se, ocv, n, span, reason == "", reason)
