"""The charge-limit controller of one aggregate: learned shares, IR estimates, the over-current guard and
the smoothing between computed and published limits.

No D-Bus, no files: the caller feeds members' values and the DVCC settings, and publishes what `update()`
returns; `to_state()`/`load_state()` carry what is learned across restarts.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import Config
from .limits import (CHARGE, DISCHARGE, BankLimit, DvccLimits, LimitSmoother, MemberLimits, ShareLearner,
                     apply_ccl_mode, apply_cvl_mode, bank_current_limit, charge_voltage_limit, over_current)

_LOG = logging.getLogger("aggregator.limits")

# Member paths the limits read: a change of any of these recomputes them.
LIMIT_INPUTS = frozenset({
    "/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent", "/Info/MaxChargeVoltage", "/Io/AllowToCharge",
    "/Io/AllowToDischarge", "/Info/ChargeMode", "/Balancing", "/InstalledCapacity", "/Dc/0/Current",
    "/Dc/0/Voltage",
})


@dataclass(slots=True)
class MemberInput:
    name: str
    label: str
    values: Mapping[str, Any]
    fresh: bool
    updated: bool = True  # its current was reported since the last complete sample


@dataclass(slots=True)
class LimitOutputs:
    ccl: float | None
    dcl: float | None
    cvl: float | None
    charge_limitation: str
    # per member: Share, InternalResistance, OpenCircuitVoltage, ChargeLimit, DischargeLimit
    members: dict[str, dict[str, Any]] = field(default_factory=dict)


class ChargeControl:
    def __init__(self, config: Config) -> None:
        self.method = config.currentRatioMethod
        self.ccl_mode = config.cclMode
        self.cvl_mode = config.cvlMode
        opts = config.limits
        self.tolerance = opts.overCurrentTolerance
        self.tau = opts.shareTimeConstant
        self.learner = ShareLearner(tau=opts.shareTimeConstant)
        # Resolutions: half the step of the published values (0.1 A, 1 mV), see _round below.
        self.ccl_smoother = LimitSmoother(opts.rampUpRate, opts.hysteresis, 0.05)
        self.dcl_smoother = LimitSmoother(opts.rampUpRate, opts.hysteresis, 0.05)
        self.cvl_smoother = LimitSmoother(opts.voltageRampUpRate, opts.voltageHysteresis, 0.0005)
        self.floors: dict[str, dict[str, float]] = {CHARGE: {}, DISCHARGE: {}}
        self._floor_at = 0.0
        self._guarded: set[tuple[str, str]] = set()
        self.ir: dict[str, Any] = {}
        self._ir_state: dict[str, Any] = {}
        self._ir_factory = None
        if self.method == "ir":
            self._ir_factory = _ir_factory(config)
        self.samples = 0  # complete samples learned from (the caller resets its members' `updated` flags)
        self.ccl_target: float | None = None
        self.dcl_target: float | None = None
        self.cvl_target: float | None = None

    # ---- learning ----------------------------------------------------------------------------------

    def observe(self, members: list[MemberInput], now: float) -> None:
        """Learn from one simultaneous view of the members (called once per flush)."""
        self._fade_floors(now)
        currents = {m.name: m.values.get("/Dc/0/Current") for m in members}
        if self._ir_factory is not None:
            for m in members:
                voltage, current = m.values.get("/Dc/0/Voltage"), currents[m.name]
                if voltage is not None and current is not None and m.fresh:
                    estimator = self.ir.get(m.name)
                    if estimator is None:
                        estimator = self._ir_factory(self._ir_state.pop(m.name, None))
                        self.ir[m.name] = estimator
                    estimator.update(voltage, current)
        if not members or any(c is None for c in currents.values()):
            return
        bank = sum(currents.values())  # type: ignore[arg-type]
        direction = CHARGE if bank > 0 else DISCHARGE
        flag = "/Io/AllowToCharge" if direction == CHARGE else "/Io/AllowToDischarge"
        # Learn only from complete samples (every member has reported since the last one: members update
        # at their own pace) and while every member takes part (a pack with open FETs carries nothing, and
        # learning that would starve its share when it comes back).
        if all(m.updated for m in members) and all(m.fresh and m.values.get(flag) != 0 for m in members):
            self.learner.update(currents, now)  # type: ignore[arg-type]
            self.samples += 1
        rows = [(m.name, currents[m.name], m.values.get("/Info/MaxChargeCurrent"),
                 m.values.get("/Info/MaxDischargeCurrent")) for m in members]
        seen = set()
        for name, d, share in over_current(rows, bank, self.tolerance):
            seen.add((name, d))
            self.floors[d][name] = max(self.floors[d].get(name, 0.0), share)
            self.learner.raise_share(name, d, share)
            if (name, d) not in self._guarded:
                _LOG.warning("%s carries %.0f%% of the bank's %s current, more than its own limit allows: "
                             "its share is corrected", name, 100 * share, d)
        self._guarded = seen  # logged once per episode: again only after it has cleared

    def _fade_floors(self, now: float) -> None:
        decay = math.exp(-max(0.0, now - self._floor_at) / self.tau) if self._floor_at else 1.0
        self._floor_at = now
        for floors in self.floors.values():
            for name in list(floors):
                floors[name] *= decay
                if floors[name] < 1e-3:
                    del floors[name]

    def forget(self, name: str) -> None:
        self.learner.forget(name)
        self.ir.pop(name, None)
        for floors in self.floors.values():
            floors.pop(name, None)

    # ---- limits ------------------------------------------------------------------------------------

    def member_limits(self, m: MemberInput) -> MemberLimits:
        v = m.values
        resistance = None
        estimator = self.ir.get(m.name)
        if estimator is not None:
            estimate = estimator.estimate()
            if estimate is not None and estimate.usable:
                resistance = estimate.resistance
        return MemberLimits(
            m.name, m.label, ccl=v.get("/Info/MaxChargeCurrent"), dcl=v.get("/Info/MaxDischargeCurrent"),
            cvl=v.get("/Info/MaxChargeVoltage"), allow_charge=v.get("/Io/AllowToCharge"),
            allow_discharge=v.get("/Io/AllowToDischarge"), charge_mode=v.get("/Info/ChargeMode"),
            balancing=v.get("/Balancing"), capacity=v.get("/InstalledCapacity"), resistance=resistance,
            learned_share={d: s for d in (CHARGE, DISCHARGE)
                           if (s := self.learner.share(m.name, d)) is not None and s > 0},
            fresh=m.fresh, current=v.get("/Dc/0/Current"))

    def update(self, members: list[MemberInput], dvcc: DvccLimits, now: float) -> LimitOutputs:
        """The limits to publish now (smoothed), with the reason and the per-member figures."""
        limits = [self.member_limits(m) for m in members]
        ccl = bank_current_limit(limits, CHARGE, self.method, self.floors[CHARGE])
        dcl = bank_current_limit(limits, DISCHARGE, self.method, self.floors[DISCHARGE])
        self.ccl_target, ccl_reason = apply_ccl_mode(ccl, self.ccl_mode, dvcc)
        self.dcl_target = dcl.value
        cvl_value, cvl_reason = charge_voltage_limit(limits, self.cvl_mode)
        self.cvl_target, cvl_reason = apply_cvl_mode(cvl_value, cvl_reason, self.cvl_mode, dvcc)
        out = LimitOutputs(
            ccl=_round(self.ccl_smoother.update(self.ccl_target, now), 1),
            dcl=_round(self.dcl_smoother.update(self.dcl_target, now), 1),
            cvl=_round(self.cvl_smoother.update(self.cvl_target, now), 3),
            charge_limitation=ccl_reason,
        )
        for m, lim in zip(members, limits):
            estimate = self.ir[m.name].estimate() if m.name in self.ir else None
            out.members[m.name] = {
                "Share": _round(ccl.shares.get(m.name, _learned_or_none(self.learner, m.name)), 4),
                "InternalResistance": estimate.resistance if estimate is not None and estimate.usable else None,
                "OpenCircuitVoltage": estimate.ocv if estimate is not None and estimate.usable else None,
                "ChargeLimit": _member_limit(lim.ccl, lim.allow_charge),
                "DischargeLimit": _member_limit(lim.dcl, lim.allow_discharge),
            }
        return out

    @property
    def ramping(self) -> bool:
        """Whether a published limit is still rising toward its target (the caller ticks until it is not)."""
        return self.ccl_smoother.ramping or self.dcl_smoother.ramping or self.cvl_smoother.ramping

    def bank_limit(self, members: list[MemberInput], direction: str) -> BankLimit:
        return bank_current_limit([self.member_limits(m) for m in members], direction,  # type: ignore[arg-type]
                                  self.method, self.floors[direction])

    # ---- state -------------------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        ir = {name: est.to_state() for name, est in self.ir.items()}
        ir.update({k: v for k, v in self._ir_state.items() if k not in ir})
        return {"shares": self.learner.to_state(), "ir": ir}

    def load_state(self, state: Mapping[str, Any]) -> None:
        shares = state.get("shares")
        if isinstance(shares, dict):
            self.learner.load_state(shares)
        ir = state.get("ir")
        if isinstance(ir, dict):
            self._ir_state = dict(ir)


def _ir_factory(config: Config) -> Any:
    """A maker of IR estimators, or None (with the reason logged) where numpy is missing."""
    try:
        from .ir import IrEstimator, numpy_available
    except ImportError:  # pragma: no cover - the module itself imports numpy lazily
        return None
    if not numpy_available():
        _LOG.warning("numpy is not installed: the IR estimator is off, shares fall back to capacity")
        return None
    opts = config.ir

    def make(state: Any) -> Any:
        kwargs = {"max_relative_error": opts.maxPercentageError, "min_voltage_change": opts.minVoltageChange}
        return IrEstimator.from_state(state, **kwargs) if isinstance(state, dict) else IrEstimator(**kwargs)

    return make


def _member_limit(limit: float | None, allowed: int | None) -> float | None:
    return 0.0 if allowed == 0 else limit


def _learned_or_none(learner: ShareLearner, name: str) -> float | None:
    return learner.share(name, CHARGE)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
