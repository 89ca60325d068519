"""The charge-limit controller of one aggregate: learned shares, IR estimates, the over-current guard and
the smoothing between computed and published limits.

No D-Bus, no files: the caller feeds members' values and the DVCC settings, and publishes what `update()`
returns; `to_state()`/`load_state()` carry what is learned across restarts.
"""
from __future__ import annotations

import dataclasses
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


_LIMIT_PATH = {CHARGE: "/Info/MaxChargeCurrent", DISCHARGE: "/Info/MaxDischargeCurrent"}
# The current-vs-power sign check: only currents this large vote (a few W of noise around 0 A say nothing),
# and a member is suspected after this many net votes (and cleared when they are back to 0).
SIGN_CHECK_MIN_CURRENT = 2.0
SIGN_CHECK_VOTES = 3
# A learned marginal share below this says the member's current falls when the bank's rises: impossible for a
# pack in parallel, so its sign is wrong.
NEGATIVE_SHARE = -0.1
# The bank current sits at a published limit within this much of it (A, and a fraction of it): what a
# charger's regulation misses by.
AT_LIMIT_A = 1.0
AT_LIMIT = 0.03


@dataclass(slots=True)
class LimitOutputs:
    ccl: float | None
    dcl: float | None
    cvl: float | None
    charge_limitation: str
    # per member: Share, InternalResistance, OpenCircuitVoltage, ChargeLimit, DischargeLimit
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Why the limits are not what the members' values alone would give (for /Aggregator/Status), and the
    # alarm that goes with it (/Alarms/BmsCable: 2 while a member's limit is unknown).
    notes: tuple[str, ...] = ()
    alarm: int = 0


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
        # The CCL ramps up from 0 after start: a restart must not jump to a limit that was not ramped to. The
        # DCL does not (a DCL of 0 switches the inverter off and drops the loads); both ramp up from 0 after
        # an unknown limit made them 0. Their ramps scale with the bank (rampUpTime); the CVL's does not.
        self.ccl_smoother = LimitSmoother(opts.rampUpRate, opts.hysteresis, 0.05, from_zero=True,
                                          rise_time=opts.rampUpTime)
        self.dcl_smoother = LimitSmoother(opts.rampUpRate, opts.hysteresis, 0.05, rise_time=opts.rampUpTime)
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
        # Members that publish a current limit, by direction (name -> label): once one has, its limit being
        # unknown (invalid, stale, vanished) holds the bank's limit, since the pack is still in parallel.
        self.publishers: dict[str, dict[str, str]] = {CHARGE: {}, DISCHARGE: {}}
        self._held: dict[str, float | None] = {CHARGE: None, DISCHARGE: None}
        self._battery_limit: dict[str, float | None] = {CHARGE: None, DISCHARGE: None}  # last, before DVCC
        self._tracking = {CHARGE: False, DISCHARGE: False}  # whether the last limit tracked the currents
        # Per direction and member: what it carried beyond its marginal share at the last complete sample (its
        # circulating current), and how much that rose since the one before.
        self._offsets: dict[str, dict[str, float]] = {CHARGE: {}, DISCHARGE: {}}
        self.drift: dict[str, dict[str, float]] = {CHARGE: {}, DISCHARGE: {}}
        self._sign_votes: dict[str, int] = {}  # net votes of the current-vs-power check, per member
        self._by_power: set[str] = set()  # suspected by that check: kept until its votes are back to 0
        self.inverted: dict[str, str] = {}  # member -> why its current's sign looks wrong

    def adopt(self, old: "ChargeControl") -> None:
        """Carry on from the controller a config reload replaces: what is learned, what is held, and the
        published limits (a reload must not make them jump)."""
        self.load_state(old.to_state())
        self.ir, self._ir_state = (old.ir, old._ir_state) if self._ir_factory is not None else ({}, {})
        for new, prev in ((self.ccl_smoother, old.ccl_smoother), (self.dcl_smoother, old.dcl_smoother),
                          (self.cvl_smoother, old.cvl_smoother)):
            new.adopt(prev)
        self.floors, self._floor_at, self._guarded = old.floors, old._floor_at, old._guarded
        self.publishers, self._held, self._battery_limit = old.publishers, old._held, old._battery_limit
        self._sign_votes, self._by_power, self.inverted = old._sign_votes, old._by_power, old.inverted
        self._tracking, self._offsets, self.drift = old._tracking, old._offsets, old.drift
        self.samples = old.samples

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
        self._check_signs(members)
        if not members or any(c is None for c in currents.values()):
            return
        bank = sum(currents.values())  # type: ignore[arg-type]
        direction = CHARGE if bank > 0 else DISCHARGE
        flag = "/Io/AllowToCharge" if direction == CHARGE else "/Io/AllowToDischarge"
        # Learn only from complete samples (every member has reported since the last one: members update
        # at their own pace) and while every member takes part (a pack with open FETs carries nothing, and
        # learning that would starve its share when it comes back).
        complete = all(m.updated for m in members)
        if complete:
            self._follow_drift(currents, bank)  # type: ignore[arg-type]
        if complete and all(m.fresh and m.values.get(flag) != 0 for m in members):
            at_limit = self._at_limit(bank)  # type: ignore[arg-type]
            self.learner.update(currents, now, at_limit, self._tracking[direction])  # type: ignore[arg-type]
            self.samples += 1
        if self.inverted:
            # The guard sees a member whose sign looks wrong with the sign turned: it cannot carry "negative"
            # current while the bank charges, and left as is it would blind the guard to that member.
            currents = {n: -c if n in self.inverted else c for n, c in currents.items()}  # type: ignore[operator]
            bank = sum(currents.values())  # type: ignore[arg-type]
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

    def _follow_drift(self, currents: dict[str, float], bank: float) -> None:
        """How much each member's circulating current (what it carries beyond its marginal share of the bank
        current) rose since the last complete sample: it moves as the packs' voltages move apart or together,
        fast near full or empty, and the limit expects as much again before it takes effect."""
        for d, sign in ((CHARGE, 1.0), (DISCHARGE, -1.0)):
            offsets: dict[str, float] = {}
            drift: dict[str, float] = {}
            if self.learner.settled(d):
                for name, current in currents.items():
                    share = self.learner.marginal_share(name, d)
                    if share is None:
                        continue
                    offsets[name] = sign * (current - share * bank)
                    before = self._offsets[d].get(name)
                    if before is not None and offsets[name] > before:
                        drift[name] = offsets[name] - before
            self._offsets[d], self.drift[d] = offsets, drift

    def _at_limit(self, bank: float) -> bool:
        """Whether the bank current sits at the limit published for its direction: its changes are then the
        limit's doing."""
        published = (self.ccl_smoother if bank > 0 else self.dcl_smoother).value
        if published is None:
            return False
        return abs(bank) >= published - max(AT_LIMIT_A, AT_LIMIT * published)

    def _check_signs(self, members: list[MemberInput]) -> None:
        """Members whose current's sign looks inverted (a driver that counts the other way): its power has
        the other sign, or its learned marginal share is clearly negative. Their current is not trusted: the
        shares fall back to the plain ratio (capacity), with no operating point, until it looks right again."""
        inverted: dict[str, str] = {}
        for m in members:
            name, values = m.name, m.values
            current, power = values.get("/Dc/0/Current"), values.get("/Dc/0/Power")
            votes = self._sign_votes.get(name, 0)
            if m.fresh and current is not None and power is not None and abs(current) >= SIGN_CHECK_MIN_CURRENT:
                voltage = values.get("/Dc/0/Voltage")
                # A power far below V x I is stale or from elsewhere: no vote.
                if voltage is None or abs(power) >= 0.25 * abs(voltage * current):
                    if (power > 0) != (current > 0):
                        votes = min(votes + 1, 2 * SIGN_CHECK_VOTES)
                    else:
                        votes = max(votes - 1, 0)
                    self._sign_votes[name] = votes
            if votes >= SIGN_CHECK_VOTES or (votes > 0 and name in self._by_power):
                self._by_power.add(name)
                inverted[name] = f"its current ({current:g} A) and its power ({power:g} W) have opposite signs" \
                    if current is not None and power is not None else "its current and its power had opposite signs"
                continue
            self._by_power.discard(name)
            for d in (CHARGE, DISCHARGE):
                share = self.learner.marginal_share(name, d)
                if share is not None and share < NEGATIVE_SHARE:
                    inverted[name] = f"its current falls when the bank's {d} current rises (share {share:.2f})"
                    break
        for name in inverted.keys() - self.inverted.keys():
            label = next((m.label for m in members if m.name == name), name)
            _LOG.warning("the current of %s looks sign-inverted: %s; charge limits fall back to the %s ratio and "
                         "the over-current guard counts its current the other way", label, inverted[name],
                         _plain(self.method))
        for name in self.inverted.keys() - inverted.keys():
            _LOG.info("the current of %s looks right again", name)
        self.inverted = inverted

    def _fade_floors(self, now: float) -> None:
        decay = math.exp(-max(0.0, now - self._floor_at) / self.tau) if self._floor_at else 1.0
        self._floor_at = now
        for floors in self.floors.values():
            for name in list(floors):
                floors[name] *= decay
                if floors[name] < 1e-3:
                    del floors[name]

    def leave(self, name: str) -> None:
        """A member left the bank on purpose (config): its unknown limit no longer holds the bank's."""
        for publishers in self.publishers.values():
            publishers.pop(name, None)
        self._sign_votes.pop(name, None)
        self._by_power.discard(name)
        self.inverted.pop(name, None)

    def forget(self, name: str) -> None:
        self.learner.forget(name)
        self.ir.pop(name, None)
        for per_member in (*self.floors.values(), *self._offsets.values(), *self.drift.values()):
            per_member.pop(name, None)

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
            settled=frozenset(d for d in (CHARGE, DISCHARGE)
                              if self.learner.settled(d) and self.learner.marginal_share(m.name, d) is not None),
            fresh=m.fresh, current=v.get("/Dc/0/Current"),
            drift={d: lead for d in (CHARGE, DISCHARGE) if (lead := self.drift[d].get(m.name))})

    def update(self, members: list[MemberInput], dvcc: DvccLimits, now: float) -> LimitOutputs:
        """The limits to publish now (smoothed), with the reason and the per-member figures."""
        limits = [self.member_limits(m) for m in members]
        notes: list[str] = []
        if self.inverted:
            notes.append("current sign looks inverted: " + "; ".join(
                f"{_label(members, n)}: {why}" for n, why in sorted(self.inverted.items())))
        ccl = self._bank_limit(members, limits, CHARGE, notes)
        dcl = self._bank_limit(members, limits, DISCHARGE, notes)
        self._tracking = {CHARGE: ccl.tracking, DISCHARGE: dcl.tracking}
        self.ccl_target, ccl_reason = apply_ccl_mode(ccl, self.ccl_mode, dvcc)
        self.dcl_target = dcl.value
        cvl_value, cvl_reason = charge_voltage_limit(limits, self.cvl_mode)
        self.cvl_target, cvl_reason = apply_cvl_mode(cvl_value, cvl_reason, self.cvl_mode, dvcc)
        out = LimitOutputs(
            ccl=_round(self.ccl_smoother.update(self.ccl_target, now), 1),
            dcl=_round(self.dcl_smoother.update(self.dcl_target, now), 1),
            cvl=_round(self.cvl_smoother.update(self.cvl_target, now), 3),
            charge_limitation=ccl_reason,
            notes=tuple(notes),
            alarm=2 if self._held[CHARGE] is not None or self._held[DISCHARGE] is not None else 0,
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
        return self._shares_limit([self.member_limits(m) for m in members], direction)

    def _shares_limit(self, limits: list[MemberLimits], direction: str) -> BankLimit:
        """The limit the members' values and shares give (before any hold); with a current not trusted, by the
        plain ratio and without the operating point."""
        untrusted = bool(self.inverted)
        method = _plain(self.method) if untrusted else self.method
        return bank_current_limit(limits, direction, method, self.floors[direction],  # type: ignore[arg-type]
                                  operating_point=not untrusted)

    def _bank_limit(self, members: list[MemberInput], limits: list[MemberLimits], direction: str,
                    notes: list[str]) -> BankLimit:
        """The bank's limit in one direction, held while a member that publishes one has an unknown limit.

        Such a member (limit invalid, stale, or gone from the bus) is still in parallel and still takes its
        share; counting it as carrying nothing would scale the others back up to the whole bank and raise
        the limit past what it may take. So until it is known again the bank's limit may only fall (from
        what it was when the member became unknown), and with no member's limit known it is 0."""
        bank = self._shares_limit(limits, direction)
        path = _LIMIT_PATH[direction]
        publishers = self.publishers[direction]
        unknown: list[str] = []
        present = set()
        for m, lim in zip(members, limits):
            present.add(m.name)
            if path in m.values or lim.limit(direction) is not None:  # an invalid value still says it has one
                publishers[m.name] = m.label
            if m.name in publishers and (not m.fresh or (lim.limit(direction) is None
                                                         and lim.allowed(direction) != 0)):
                unknown.append(m.label)
        unknown += [label for name, label in publishers.items() if name not in present]
        word = "charge" if direction == CHARGE else "discharge"
        if not unknown:
            if self._held[direction] is not None:
                _LOG.info("every member's %s limit is known again: the bank's limit is no longer held", word)
            self._held[direction] = None
            self._battery_limit[direction] = bank.value
            return bank
        held = self._held[direction]
        if held is None:
            held = self._battery_limit[direction] or 0.0
            _LOG.warning("the %s limit of %s is unknown: the bank's %s limit is held at %g A and may only fall "
                         "until it is known again", word, ", ".join(unknown), word, held)
        value = 0.0 if bank.value is None else min(held, bank.value)
        self._held[direction] = self._battery_limit[direction] = value
        notes.append(f"{word} limit held at {value:g} A: limit of {', '.join(unknown)} unknown")
        reason = f"held at {value:g} A while the {word} limit of {', '.join(unknown)} is unknown"
        if bank.value is not None and bank.value <= value:
            reason = f"{bank.reason}; {reason}"
        return dataclasses.replace(bank, value=value, reason=reason)

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


def _plain(method: str) -> str:
    """The plain ratio a learned or estimated method falls back to when the members' currents are not trusted."""
    return "capacity" if method in ("share", "ir") else method


def _label(members: list[MemberInput], name: str) -> str:
    return next((m.label for m in members if m.name == name), name)


def _learned_or_none(learner: ShareLearner, name: str) -> float | None:
    return learner.share(name, CHARGE)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
