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
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from .forbidding import ForbiddingMembers, as_forbidding
from .formulas import (CHARGE, DISCHARGE, BankLimit, Direction, DvccLimits, LimitSmoother, MemberLimits,
                       apply_ccl_mode, apply_cvl_mode, bank_current_limit, charge_voltage_limit, over_current,
                       share_weights)
from .shares import ShareLearner
from .signs import SignCheck, plain

if TYPE_CHECKING:
    from ..config import Config

_LOG = logging.getLogger("aggregator.limits")

# Member paths the limits read: a change of any of these recomputes them.
LIMIT_INPUTS = frozenset({
    "/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent", "/Info/MaxChargeVoltage", "/Io/AllowToCharge",
    "/Io/AllowToDischarge", "/Info/ChargeMode", "/Balancing", "/InstalledCapacity", "/Dc/0/Current",
    "/Dc/0/Voltage",
})


_Views = tuple[tuple[dict[str, float], frozenset[str]], tuple[dict[str, float], frozenset[str]]]
# MemberLimits.settled by (charge settled, discharge settled): four frozensets, not one per member and second.
_SETTLED = {(c, d): frozenset(x for x, on in ((CHARGE, c), (DISCHARGE, d)) if on)
            for c in (False, True) for d in (False, True)}


@dataclass(slots=True)
class MemberInput:
    name: str
    label: str
    values: Mapping[str, Any]
    fresh: bool
    updated: bool = True  # its current was reported since the last complete sample


LimitKey = Literal["charge", "discharge", "voltage"]  # a direction, or the charge voltage limit
VOLTAGE: LimitKey = "voltage"  # the charge voltage limit's key next to CHARGE and DISCHARGE
_LIMIT_PATH = {CHARGE: "/Info/MaxChargeCurrent", DISCHARGE: "/Info/MaxDischargeCurrent",
               VOLTAGE: "/Info/MaxChargeVoltage"}
_FLAG_PATH = {CHARGE: "/Io/AllowToCharge", DISCHARGE: "/Io/AllowToDischarge"}
# Our alarms: a member's limit unknown (the BMS link is the usual cause), and a member that forbids a direction
# still taking current in it.
UNKNOWN_LIMIT_ALARM = "/Alarms/BmsCable"
FORBIDDEN_CURRENT_ALARM = {CHARGE: "/Alarms/HighChargeCurrent", DISCHARGE: "/Alarms/HighDischargeCurrent"}
ALARM = 2
# The bank current sits at a published limit within this much of it (A, and a fraction of it): what a
# charger's regulation misses by.
AT_LIMIT_A = 1.0
AT_LIMIT = 0.03


@dataclass(frozen=True, slots=True)
class Note:
    """A line of /Aggregator/Status: `text` as shown, with the live values; `key` what it is about, without them
    (the status is logged when the keys change, not at every value)."""

    text: str
    key: str


@dataclass(slots=True)
class LimitOutputs:
    ccl: float | None
    dcl: float | None
    cvl: float | None
    charge_limitation: str
    # per member: Share, InternalResistance, OpenCircuitVoltage, ChargeLimit, DischargeLimit
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Why the limits are not what the members' values alone would give (for /Aggregator/Status), the alarms that
    # go with it (path -> level; at least this is published), and the flags it clears (path -> 0 while a member
    # that forbids the direction still takes current in it).
    notes: tuple[Note, ...] = ()
    alarms: dict[str, int] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)

    @property
    def alarm(self) -> int:
        """The unknown-limit alarm."""
        return self.alarms.get(UNKNOWN_LIMIT_ALARM, 0)


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
        self._guarded: set[tuple[str, Direction]] = set()
        self.ir: dict[str, Any] = {}
        self._ir_state: dict[str, Any] = {}
        self._ir_factory = None
        if self.method == "ir":
            self._ir_factory = _ir_factory(config)
        self.samples = 0  # complete samples learned from (the caller resets its members' `updated` flags)
        self.ccl_target: float | None = None
        self.dcl_target: float | None = None
        self.cvl_target: float | None = None
        # Members that publish a limit, by limit (name -> label): once one has, its limit being unknown (invalid,
        # stale, vanished) holds the bank's limit, since the pack is still in parallel.
        self.publishers: dict[str, dict[str, str]] = {CHARGE: {}, DISCHARGE: {}, VOLTAGE: {}}
        self._held: dict[str, float | None] = {CHARGE: None, DISCHARGE: None, VOLTAGE: None}
        self._battery_limit: dict[str, float | None] = {CHARGE: None, DISCHARGE: None, VOLTAGE: None}  # before DVCC
        self._holding: set[str] = set()  # the limits held meanwhile
        self.forbidding = ForbiddingMembers(opts.testCurrentInterval)  # members that forbid a direction
        self._tracking = {CHARGE: False, DISCHARGE: False}  # whether the last limit tracked the currents
        # Per direction and member: what it carried beyond its marginal share at the last complete sample (its
        # circulating current), and how much that rose since the one before.
        self._offsets: dict[str, dict[str, float]] = {CHARGE: {}, DISCHARGE: {}}
        self.drift: dict[str, dict[str, float]] = {CHARGE: {}, DISCHARGE: {}}
        self.signs = SignCheck()

    @property
    def inverted(self) -> dict[str, str]:
        """Members whose current's sign looks wrong, with why: their current is not trusted."""
        return self.signs.inverted

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
        self.forbidding.episodes, self._holding = old.forbidding.episodes, old._holding
        self.signs = old.signs
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
        self.signs.check(members, self.learner, self.method)
        known = {name: c for name, c in currents.items() if c is not None}
        if not members or len(known) < len(currents):
            return
        bank = sum(known.values())
        direction = CHARGE if bank > 0 else DISCHARGE
        flag = "/Io/AllowToCharge" if direction == CHARGE else "/Io/AllowToDischarge"
        # Learn only from complete samples (every member has reported since the last one: members update
        # at their own pace) and while every member takes part (a pack with open FETs carries nothing, and
        # learning that would starve its share when it comes back).
        complete = all(m.updated for m in members)
        if complete:
            self._follow_drift(known, bank)
        if complete and all(m.fresh and m.values.get(flag) != 0 for m in members):
            at_limit = self._at_limit(bank)
            self.learner.update(known, now, at_limit, self._tracking[direction])
            self.samples += 1
        if self.inverted:
            # The guard sees a member whose sign looks wrong with the sign turned: it cannot carry "negative"
            # current while the bank charges, and left as is it would blind the guard to that member.
            known = {n: -c if n in self.inverted else c for n, c in known.items()}
            bank = sum(known.values())
        # A member that forbids a direction and still takes current in it is not underestimated: the bank is held
        # for it (see forbidding.py); its share when it takes part again is what it was.
        rows = [(m.name, known[m.name], _guarded_limit(m.values, CHARGE), _guarded_limit(m.values, DISCHARGE))
                for m in members]
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
        self.forbidding.leave(name)
        self.signs.leave(name)

    def forget(self, name: str) -> None:
        self.learner.forget(name)
        self.ir.pop(name, None)
        for per_member in (*self.floors.values(), *self._offsets.values(), *self.drift.values()):
            per_member.pop(name, None)

    # ---- limits ------------------------------------------------------------------------------------

    def member_limits(self, m: MemberInput, views: _Views | None = None) -> MemberLimits:
        """What the limits need of member `m`; `views`: the learner's shares, read once for every member."""
        v = m.values
        name = m.name
        resistance = None
        estimator = self.ir.get(name)
        if estimator is not None:
            estimate = estimator.estimate()
            if estimate is not None and estimate.usable:
                resistance = estimate.resistance
        (charge_shares, charge_settled), (discharge_shares, discharge_settled) = views or self._views()
        learned: dict[str, float] = {}
        if (share := charge_shares.get(name)) is not None and share > 0:
            learned[CHARGE] = share
        if (share := discharge_shares.get(name)) is not None and share > 0:
            learned[DISCHARGE] = share
        settled = _SETTLED[name in charge_settled, name in discharge_settled]
        drift: dict[str, float] = {}
        if lead := self.drift[CHARGE].get(name):
            drift[CHARGE] = lead
        if lead := self.drift[DISCHARGE].get(name):
            drift[DISCHARGE] = lead
        return MemberLimits(
            name, m.label, ccl=v.get("/Info/MaxChargeCurrent"), dcl=v.get("/Info/MaxDischargeCurrent"),
            cvl=v.get("/Info/MaxChargeVoltage"), allow_charge=v.get("/Io/AllowToCharge"),
            allow_discharge=v.get("/Io/AllowToDischarge"), charge_mode=v.get("/Info/ChargeMode"),
            balancing=v.get("/Balancing"), capacity=v.get("/InstalledCapacity"), resistance=resistance,
            learned_share=learned, settled=settled, fresh=m.fresh, current=v.get("/Dc/0/Current"), drift=drift)

    def _views(self) -> _Views:
        return self.learner.view(CHARGE), self.learner.view(DISCHARGE)

    def update(self, members: list[MemberInput], dvcc: DvccLimits, now: float,
               charge_wait: str | None = None) -> LimitOutputs:
        """The limits to publish now (smoothed), with the reason and the per-member figures. `charge_wait`: why
        charging must wait (batteries whose limits are not known yet at start): the CCL is 0 meanwhile."""
        views = self._views()
        limits = [self.member_limits(m, views) for m in members]
        notes: list[Note] = []
        if self.inverted:
            names = sorted(self.inverted.items())
            notes.append(Note("current sign looks inverted: " + "; ".join(
                f"{_label(members, n)}: {why}" for n, why in names),
                "current sign looks inverted: " + ", ".join(_label(members, n) for n, _ in names)))
        ccl = self._bank_limit(members, limits, CHARGE, notes, now)
        dcl = self._bank_limit(members, limits, DISCHARGE, notes, now)
        self._tracking = {CHARGE: ccl.tracking, DISCHARGE: dcl.tracking}
        self.ccl_target, ccl_reason = apply_ccl_mode(ccl, self.ccl_mode, dvcc)
        if charge_wait is not None:
            self.ccl_target, ccl_reason = 0.0, charge_wait
        self.dcl_target = dcl.value
        cvl_value, cvl_reason = charge_voltage_limit(limits, self.cvl_mode)
        cvl_value, cvl_reason = self._hold_unknown(members, limits, VOLTAGE, cvl_value, cvl_reason, notes)
        self.cvl_target, cvl_reason = apply_cvl_mode(cvl_value, cvl_reason, self.cvl_mode, dvcc)
        alarms = {UNKNOWN_LIMIT_ALARM: ALARM if self._holding else 0}
        flags = {}
        for direction in (CHARGE, DISCHARGE):
            alarms[FORBIDDEN_CURRENT_ALARM[direction]] = ALARM if self.forbidding.alarmed(direction) else 0
            if self.forbidding.holding_flag(direction):
                flags[_FLAG_PATH[direction]] = 0
        ccl_published = _round(self.ccl_smoother.update(self.ccl_target, now), 1)
        if self.ccl_smoother.ramping and self.ccl_target is not None:
            # Say what a reader sees: a CCL below the limit named after it is on its way up, not held there.
            ccl_reason = (f"rising to {self.ccl_target:.1f} A at {self.ccl_smoother.rate(self.ccl_target):.1f} A/s "
                          f"(a limit rises gradually so the chargers follow smoothly); limit: {ccl_reason}")
        out = LimitOutputs(
            ccl=ccl_published,
            dcl=_round(self.dcl_smoother.update(self.dcl_target, now), 1),
            cvl=_round(self.cvl_smoother.update(self.cvl_target, now), 3),
            charge_limitation=ccl_reason,
            notes=tuple(notes),
            alarms=alarms,
            flags=flags,
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

    @property
    def ticking(self) -> bool:
        """Whether the limits change with time alone: a ramp, a test current that is due, a test current's evidence
        being confirmed. The caller recomputes once a second while this holds."""
        return self.ramping or self.forbidding.ticking

    def bank_limit(self, members: list[MemberInput], direction: Direction) -> BankLimit:
        views = self._views()
        return self._shares_limit([self.member_limits(m, views) for m in members], direction)

    def _shares_limit(self, limits: list[MemberLimits], direction: Direction) -> BankLimit:
        """The limit the members' values and shares give (before any hold); with a current not trusted, by the
        plain ratio and without the operating point."""
        untrusted = bool(self.inverted)
        method = plain(self.method) if untrusted else self.method
        return bank_current_limit(limits, direction, method, self.floors[direction],
                                  operating_point=not untrusted)

    def _bank_limit(self, members: list[MemberInput], limits: list[MemberLimits], direction: Direction,
                    notes: list[Note], now: float) -> BankLimit:
        """The bank's limit in one direction: from the members that take part, held while a member's limit is
        unknown, and held at 0 A while a member that forbids the direction still takes current in it."""
        episodes = self.forbidding.follow(members, limits, direction, now, self.inverted,
                                          lambda: self._full_shares(limits, direction))
        if episodes:  # whatever they are, they leave the shares; the holds below decide what they mean
            limits = [as_forbidding(lim, direction) if lim.name in episodes else lim for lim in limits]
        bank = self._shares_limit(limits, direction)
        value, reason = self._hold_unknown(members, limits, direction, bank.value, bank.reason, notes)
        if value != bank.value or reason != bank.reason:
            bank = dataclasses.replace(bank, value=value, reason=reason)
        bank, line = self.forbidding.hold(bank, direction)
        if line is not None:
            notes.append(Note(*line))
        return bank

    def _hold_unknown(self, members: list[MemberInput], limits: list[MemberLimits], key: LimitKey,
                      value: float | None, reason: str, notes: list[Note]) -> tuple[float | None, str]:
        """A limit (`key`: a direction, or VOLTAGE), held while a member that publishes one has it unknown.

        Such a member (limit invalid, stale, or gone from the bus) is still in parallel and still takes its
        share; counting it as carrying nothing would scale the others back up to the whole bank and raise
        the current limit past what it may take, and leaving its voltage out raises the bank's CVL to the
        others'. So until it is known again the bank's limit may only fall, from the lower of what was computed
        and what was published when the member became unknown (a hold during a ramp holds what readers see,
        not the target). With no member's current limit known it is 0."""
        path = _LIMIT_PATH[key]
        publishers = self.publishers[key]
        unknown: list[str] = []
        present = set()
        for m, lim in zip(members, limits):
            present.add(m.name)
            own = lim.cvl if key == "voltage" else lim.limit(key)
            if path in m.values or own is not None:  # an invalid value still says it has one
                publishers[m.name] = m.label
            if m.name in publishers and (not m.fresh or (
                    own is None and (key == "voltage" or lim.allowed(key) != 0))):
                unknown.append(m.label)
        unknown += [label for name, label in publishers.items() if name not in present]
        word, unit = (("charge voltage", "V") if key == VOLTAGE else
                      ("charge" if key == CHARGE else "discharge", "A"))
        if not unknown:
            if key in self._holding:
                _LOG.info("every member's %s limit is known again: the bank's limit is no longer held", word)
                self._holding.discard(key)
            self._held[key] = None
            self._battery_limit[key] = value
            return value, reason
        held = self._held[key]
        if key not in self._holding:
            published = self._smoother(key).value
            known = [v for v in (self._battery_limit[key], published) if v is not None]
            held = min(known) if known else (None if key == VOLTAGE else 0.0)
            self._holding.add(key)
            _LOG.warning("the %s limit of %s is unknown: the bank's %s limit is held at %s %s and may only fall "
                         "until it is known again", word, ", ".join(unknown), word, _shown(held, key), unit)
        if key == VOLTAGE:
            # No voltage to fall from yet: the lowest known from now on.
            held = value if held is None else held if value is None else min(held, value)
        else:
            held = 0.0 if value is None or held is None else min(held, value)
        self._held[key] = self._battery_limit[key] = held
        shown = "" if held is None else f" at {_shown(held, key)} {unit}"
        names = ", ".join(unknown)
        notes.append(Note(f"{word} limit held{shown}: limit of {names} unknown",
                          f"{word} limit held: limit of {names} unknown"))
        why = f"held{shown} while the {word} limit of {names} is unknown"
        return held, (f"{reason}; {why}" if value is not None and held is not None and value <= held else why)

    def _smoother(self, key: LimitKey) -> LimitSmoother:
        return {CHARGE: self.ccl_smoother, DISCHARGE: self.dcl_smoother, VOLTAGE: self.cvl_smoother}[key]

    def _full_shares(self, limits: list[MemberLimits], direction: Direction) -> dict[str, float]:
        """Each fresh member's share of the bank current if every one of them took part."""
        fresh = [lim for lim in limits if lim.fresh]
        if not fresh:
            return {}
        method = plain(self.method) if self.inverted else self.method
        weights, _ = share_weights(fresh, method, direction)
        total = sum(weights.values())
        return {name: w / total for name, w in weights.items()} if total > 0 else {}

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


# Paths where, of one pack seen through two drivers, the lowest value counts (limits; 0 = forbidden).
LOWEST_OF_DUPLICATES = ("/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent", "/Info/MaxChargeVoltage",
                        "/Io/AllowToCharge", "/Io/AllowToDischarge")


def one_pack(services: Sequence[tuple[Mapping[str, Any], bool]]) -> dict[str, Any]:
    """The values of one pack that several services publish (its values, and whether the service is fresh),
    the service standing for it first: that one's values (the first fresh one's while it is stale), with the
    lowest of each limit and flag: the driver that reads the BMS more cautiously is the one to believe. A limit
    one of them publishes (the path exists) but has unknown (invalid, or that service stale) is unknown for
    the pack, since the other's alone could be the higher: the bank's limit is then held as for any member."""
    base = next((values for values, fresh in services if fresh), services[0][0])
    out = dict(base)
    for path in LOWEST_OF_DUPLICATES:
        numbers = [v[path] for v, fresh in services if fresh and v.get(path) is not None]
        if path in _LIMIT_PATH.values() and any(path in v and (not fresh or v.get(path) is None)
                                                for v, fresh in services):
            out[path] = None
        elif numbers:
            out[path] = min(numbers)
    return out


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
        kwargs: dict[str, Any] = {"max_relative_error": opts.maxPercentageError,
                                  "min_voltage_change": opts.minVoltageChange}
        return IrEstimator.from_state(state, **kwargs) if isinstance(state, dict) else IrEstimator(**kwargs)

    return make


def _member_limit(limit: float | None, allowed: int | None) -> float | None:
    return 0.0 if allowed == 0 else limit


def _label(members: list[MemberInput], name: str) -> str:
    return next((m.label for m in members if m.name == name), name)


def _shown(value: float | None, key: LimitKey) -> str:
    """A limit as readers see it published (0.1 A, 1 mV)."""
    return "?" if value is None else f"{round(value, 3 if key == VOLTAGE else 1):g}"


def _guarded_limit(values: Mapping[str, Any], direction: Direction) -> float | None:
    """A member's limit as the over-current guard sees it: none where it forbids the direction."""
    limit = values.get(_LIMIT_PATH[direction])
    return None if values.get(_FLAG_PATH[direction]) == 0 or (limit is not None and limit <= 0) else limit


def _learned_or_none(learner: ShareLearner, name: str) -> float | None:
    return learner.share(name, CHARGE)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
