"""Charge limits of the bank: CCL/DCL from the members' limits and their shares of the bank current, CVL by
mode, DVCC user limits, and a smoother that lets limits drop at once but rise slowly.

Pure: values in, values out. Members in parallel share the bank current; member k carries a share s_k of it.
The bank current may rise until the first member reaches its own limit:

    limit_bank = min over members able to take current of  limit_k / s_k

where the shares are renormalised over those members. A member whose BMS forbids the direction leaves the
sum here, as one whose switch is open carries nothing (whether it is, its current tells: see
connection_evidence, and forbidding.py for what follows); one whose data is stale, or that publishes no
limit, is counted as able to carry nothing (its capacity is not added), which lowers the bank limit instead of
zeroing it. Nobody allowed -> 0; no data at all -> None (invalid).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

Direction = Literal["charge", "discharge"]
CHARGE: Direction = "charge"
DISCHARGE: Direction = "discharge"
METHODS = ("share", "ir", "capacity", "count")
# Tracking the members' currents (see bank_current_limit): how far above the present bank current the
# extrapolation is trusted (a fraction of it), and the margin each member is left below its own limit for what
# the bank current does not decide (a fraction of that limit, plus a current's resolution in A).
TRUSTED_STEP = 0.1
AIM_MARGIN = 0.05
AIM_RESOLUTION = 0.1


@dataclass(frozen=True, slots=True)
class MemberLimits:
    """What the limits need of one member (already checked values; None = unknown)."""

    name: str
    label: str
    ccl: float | None = None
    dcl: float | None = None
    cvl: float | None = None
    allow_charge: int | None = None
    allow_discharge: int | None = None
    charge_mode: str | None = None
    balancing: int | None = None
    capacity: float | None = None  # installed Ah
    resistance: float | None = None  # usable IR estimate (ohm), None when not usable
    learned_share: Mapping[str, float] = field(default_factory=dict)  # direction -> learned share
    settled: frozenset[str] = frozenset()  # directions whose learned share is a settled marginal share
    fresh: bool = True  # online and updating
    current: float | None = None  # the member's present current (A, + charging), the operating point
    drift: Mapping[str, float] = field(default_factory=dict)  # direction -> rise of its circulating current

    def limit(self, direction: Direction) -> float | None:
        return self.ccl if direction == CHARGE else self.dcl

    def allowed(self, direction: Direction) -> int | None:
        return self.allow_charge if direction == CHARGE else self.allow_discharge


@dataclass(frozen=True, slots=True)
class BankLimit:
    value: float | None
    limiting: str | None  # the member whose limit binds, if any
    reason: str  # for /Info/ChargeLimitation and the log
    shares: dict[str, float]  # the shares used, by member (renormalised over the members that take current)
    method: str  # the method the shares came from (after fallbacks)
    tracking: bool = False  # it tracks the members' measured currents to their aims (see bank_current_limit)


def share_weights(members: Sequence[MemberLimits], method: str, direction: Direction) -> tuple[dict[str, float], str]:
    """Unnormalised share weights by `method`, falling back ir/share -> capacity -> count when any member lacks
    what the method needs (mixing methods across members would make the shares meaningless)."""
    order = {"share": ("share", "capacity", "count"), "ir": ("ir", "capacity", "count"),
             "capacity": ("capacity", "count"), "count": ("count",)}[method]
    for candidate in order:
        weights: dict[str, float] = {}
        for m in members:
            if candidate == "share":
                w = m.learned_share.get(direction)
            elif candidate == "ir":
                w = 1.0 / m.resistance if m.resistance else None
            elif candidate == "capacity":
                w = m.capacity
            else:
                w = 1.0
            if w is None or not math.isfinite(w) or w <= 0:
                break
            weights[m.name] = w
        else:
            return weights, candidate
    return {m.name: 1.0 for m in members}, "count"


def bank_current_limit(members: Sequence[MemberLimits], direction: Direction, method: str,
                       share_floor: Mapping[str, float] | None = None, operating_point: bool = True) -> BankLimit:
    """The bank's CCL (direction 'charge') or DCL ('discharge'). `share_floor`: per member, the least share
    to assume (the over-current guard raises it when a member was seen carrying more than its limit).

    Without an operating point (a member's current unknown, or `operating_point` False: not to be trusted) it
    is min_k limit_k / s_k. With one, it is also extrapolated from the present currents with the shares taken
    as marginal shares a_k (how a change of the bank current splits): I_now + (limit_k - I_k) / a_k.

    Tracking, once the marginal shares are settled (or 1/R_k): for packs in parallel the extrapolation is
    exact even when they sit at different states of charge, where the fullest takes less than its share and
    one behind takes more by circulating currents; and at the bank's limit it is short, so the most loaded
    member converges on its aim whatever small error its share has. Each member is aimed a margin below its
    limit for what the bank current does not decide (AIM_MARGIN of it and AIM_RESOLUTION, times 1 - a_k: none
    for a member alone), and the rise its circulating current made since the last sample (`drift`) is
    expected again before the limit takes effect. Far from the operating point a share's error would carry
    the extrapolation astray: more than TRUSTED_STEP above the present bank current it goes no higher than
    min_k limit_k / a_k. A member above its aim is brought back with its share as learned, not as raised by
    the guard (a larger share would bring it back by less).

    Otherwise (shares that are plain ratios, capacity or count) the lower of the two: each covers the
    other's blind spot (a wrong slope far from the operating point; circulating currents for the ratio)."""
    word = "charging" if direction == CHARGE else "discharging"
    known = [m for m in members if m.limit(direction) is not None or m.allowed(direction) is not None]
    if not known:
        return BankLimit(None, None, f"no member publishes a {word} limit", {}, method)
    if all(m.allowed(direction) == 0 for m in known):  # an unknown flag with a limit counts as allowed
        return BankLimit(0.0, None, f"no member allows {word}", {}, method)
    takers = [m for m in members if m.allowed(direction) != 0 and m.fresh and m.limit(direction) is not None]
    if not takers:
        return BankLimit(0.0, None, f"no member with a fresh {word} limit", {}, method)
    weights, used = share_weights(takers, method, direction)
    total = sum(weights.values())
    learned = shares = {name: w / total for name, w in weights.items()}
    if share_floor:
        # Conservative: a raised share is not taken away from the others.
        shares = {name: max(s, share_floor.get(name, 0.0)) for name, s in shares.items()}
    sign = 1.0 if direction == CHARGE else -1.0
    # The operating point, in the direction's own sign (discharge currents as positive amounts). A member
    # that forbids the direction is left out of it: its current is about to stop (its BMS opened its FETs), and
    # the others' currents at the bank current without it are the point on their lines once it has.
    currents = [m.current for m in members if m.allowed(direction) != 0]
    operating = operating_point and all(m.current is not None for m in members)
    bank_now = sign * sum(c for c in currents if c is not None) if operating else 0.0
    tracking = operating and (used == "ir" or (used == "share" and all(direction in m.settled for m in takers)))
    best: tuple[float, MemberLimits] | None = None
    for m in takers:
        bank = _bank_at_limit(m, direction, shares[m.name], learned[m.name], bank_now if operating else None,
                              tracking)
        if best is None or bank < best[0]:
            best = (bank, m)
    assert best is not None
    value, member = max(0.0, best[0]), best[1]
    taking = {m.name for m in takers}  # by name: comparing the dataclasses field by field is O(n^2) slow
    left_out = [m.label for m in members if m.name not in taking and m.allowed(direction) != 0]
    reason = (f"{member.label}: {member.limit(direction):g} A at a {100 * shares[member.name]:.0f}% share "
              f"({used})")
    if left_out:
        reason += "; counted as carrying nothing: " + ", ".join(left_out)
    return BankLimit(value, member.name, reason, shares, used, tracking=tracking)


def _bank_at_limit(m: MemberLimits, direction: Direction, share: float, learned: float, bank_now: float | None,
                   tracking: bool) -> float:
    """The bank current at which member `m` reaches its limit (see bank_current_limit): limit / share, and with an
    operating point (`bank_now`, in the direction's sign) also extrapolated from its present current."""
    limit = m.limit(direction)
    assert limit is not None
    bank = limit / share
    if bank_now is None:
        return bank
    assert m.current is not None  # an operating point is taken only when every member's current is known
    sign = 1.0 if direction == CHARGE else -1.0
    aim, expected = limit, sign * m.current
    if tracking:
        aim -= max(0.0, 1.0 - share) * (AIM_MARGIN * limit + AIM_RESOLUTION)
        expected += m.drift.get(direction, 0.0)
    headroom = aim - expected
    extrapolated = bank_now + headroom / (share if headroom >= 0 else min(share, learned))
    if tracking:
        return min(extrapolated, max(bank, bank_now * (1.0 + TRUSTED_STEP)))
    return min(bank, extrapolated)


# A member's current within this of 0 A says nothing: the offset of a BMS at rest (CAN resolution 0.1 A, cheap
# shunts within about 1 A). A pack whose switch is open reads within it whatever the bank carries, so it is an
# absolute figure, not a share of the bank current.
NOISE_CURRENT = 1.0
# A test current allows the bank the current at which a pack that forbids the direction, if it is still connected,
# would carry this many times the noise: enough to tell, little for the pack.
TEST_CURRENT_MULTIPLE = 3.0
CARRYING, DISCONNECTED = "carrying", "disconnected"


def forbids(member: MemberLimits, direction: Direction) -> bool:
    """The member's BMS forbids the direction: its flag is 0 or its limit is 0."""
    limit = member.limit(direction)
    return member.allowed(direction) == 0 or (limit is not None and limit <= 0)


def connection_evidence(own: float | None, others: float, share: float | None,
                        noise: float = NOISE_CURRENT) -> str | None:
    """What the currents say of a member that forbids a direction, all currents in that direction (positive =
    flowing that way): CARRYING it still takes current that way; DISCONNECTED it takes none while the others
    take enough that, connected at its `share` of the bank, it would carry twice the noise; None: nothing tells
    (the bank carries too little, or its current is unknown)."""
    if own is None:
        return None
    if own > noise:
        return CARRYING
    if share is not None and 0 < share < 1 and share / (1 - share) * others >= 2 * noise:
        return DISCONNECTED
    return None


def test_current_limit(share: float | None, noise: float = NOISE_CURRENT) -> float:
    """The bank current a test current allows: the member, connected at its share, would carry
    TEST_CURRENT_MULTIPLE x noise."""
    return TEST_CURRENT_MULTIPLE * noise / share if share and share > 0 else TEST_CURRENT_MULTIPLE * noise


def charge_voltage_limit(members: Sequence[MemberLimits], mode: str) -> tuple[float | None, str]:
    """The bank's CVL by `cvlMode` (before any DVCC cap). Members in float are left out while others still
    charge."""
    with_cvl = [m for m in members if m.cvl is not None]
    if not with_cvl:
        return None, "no member publishes a charge voltage"
    floating = [m for m in with_cvl if m.charge_mode and "float" in m.charge_mode.lower()]
    charging = [m for m in with_cvl if m not in floating]
    pool = [m.cvl for m in (charging or with_cvl) if m.cvl is not None]
    low, high = min(pool), max(pool)
    note = f" (floating left out: {', '.join(m.label for m in floating)})" if charging and floating else ""
    if mode == "max_always":
        return high, "highest member CVL" + note
    if mode == "max_when_balancing":
        if any(m.balancing for m in members):
            return high, "highest member CVL while balancing" + note
        return low, "lowest member CVL" + note
    if mode == "max_when_floating":
        if with_cvl and not charging:
            return high, "highest member CVL: all members float"
        return low, "lowest member CVL" + note
    return low, "lowest member CVL" + note  # min_when_balancing, and dvcc before its override


@dataclass(frozen=True, slots=True)
class DvccLimits:
    """The GX's user limits: /Settings/SystemSetup/MaxChargeCurrent (-1 = none) and MaxChargeVoltage
    (0 = none) of localsettings, and whether DVCC is on (com.victronenergy.system /Control/Dvcc)."""

    enabled: bool = False
    max_charge_current: float | None = None
    max_charge_voltage: float | None = None

    @property
    def current(self) -> float | None:
        c = self.max_charge_current
        return c if self.enabled and c is not None and c >= 0 else None

    @property
    def voltage(self) -> float | None:
        v = self.max_charge_voltage
        return v if self.enabled and v is not None and v > 0 else None


def apply_ccl_mode(battery: BankLimit, mode: str, dvcc: DvccLimits) -> tuple[float | None, str]:
    """`cclMode`: battery (the batteries' limit), battery+dvcc (also capped by the DVCC user limit), dvcc
    (the user limit alone; the batteries' limit while there is none)."""
    user = dvcc.current
    if mode == "battery" or user is None:
        if mode == "dvcc":
            return battery.value, battery.reason + "; no DVCC user limit is set, so the batteries' limit applies"
        return battery.value, battery.reason
    if mode == "dvcc":
        return user, f"DVCC user limit {user:g} A"
    if battery.value is None or user < battery.value:
        return user, f"DVCC user limit {user:g} A"
    return battery.value, battery.reason


def apply_cvl_mode(value: float | None, reason: str, mode: str, dvcc: DvccLimits) -> tuple[float | None, str]:
    """`cvlMode` dvcc tracks the user's voltage; in every mode the DVCC user voltage caps the result."""
    user = dvcc.voltage
    if user is None:
        return value, reason
    if mode == "dvcc" or value is None or user < value:
        return user, f"DVCC user voltage {user:g} V"
    return value, reason


class LimitSmoother:
    """Publish a limit that drops at once but rises gradually, and ignores rises smaller than `hysteresis`,
    so DVCC does not hunt. Drops are never held back: that would be unsafe.

    A rise goes at `rise_rate` per second or, with `rise_time`, at target / `rise_time` per second when that
    is faster: whatever the size of the bank, a rise (even from 0) reaches its target within `rise_time`
    seconds and the next update; a small one sooner, at `rise_rate`.

    A ramp starts when a rise is first seen (however long the limit was quiet before) and, once started,
    goes all the way to its target: the hysteresis only decides whether a rise starts. The caller keeps
    calling (once a second) while `ramping`. `resolution` is the step of the published value: a ramp within
    it of its target ends there, since the target is what readers already see (otherwise a small rise of the
    target in that moment would be carried by the ramp past the hysteresis)."""

    def __init__(self, rise_rate: float, hysteresis: float, resolution: float = 0.0,
                 from_zero: bool = False, rise_time: float | None = None) -> None:
        self.rise_rate = rise_rate
        self.rise_time = rise_time
        self.hysteresis = hysteresis
        self.resolution = resolution
        # from_zero: the first value after start or after None (invalid) ramps up from 0 instead of jumping
        # to the target (a charge limit that jumps to 200 A at start-up is the unsafe side).
        self.from_zero = from_zero
        self.value: float | None = None
        self.ramping = False
        self._at = 0.0

    def adopt(self, other: "LimitSmoother") -> None:
        """Carry on from another smoother (a config reload makes a new one): no jump to the new target."""
        self.value, self.ramping, self._at = other.value, other.ramping, other._at

    def rate(self, target: float) -> float:
        """How fast a ramp to `target` rises (per second)."""
        return self.rise_rate if self.rise_time is None else max(self.rise_rate, target / self.rise_time)

    def update(self, target: float | None, now: float) -> float | None:
        last, self._at = self._at, now
        if self.from_zero and self.value is None and target is not None and target > 0:
            self.value = 0.0
            self.ramping = True  # whatever the hysteresis: the ramp starts now
            return self.value
        if target is None or self.value is None or target <= self.value:
            self.value = target
            self.ramping = False
        elif self.ramping:
            self.value = min(target, self.value + self.rate(target) * max(0.0, now - last))
            if target - self.value <= self.resolution:
                self.value = target
            self.ramping = self.value < target
        elif target - self.value >= self.hysteresis:
            self.ramping = True  # the ramp starts now: the first step comes with the next update
        return self.value


def over_current(members: Iterable[tuple[str, float | None, float | None, float | None]], bank_current: float,
                 tolerance: float) -> list[tuple[str, Direction, float]]:
    """(member, direction, observed share) of members carrying more than their own limit (+tolerance):
    their share was underestimated. Input rows: (name, current, ccl, dcl). A member carrying more than the
    bank (circulating current from the others, near 0 A bank current) counts as carrying it all: a share above
    1 would not say how the bank splits, and as a floor it would hold the limit near 0 until it faded."""
    found: list[tuple[str, Direction, float]] = []
    if abs(bank_current) < 1e-6:
        return found
    for name, current, ccl, dcl in members:
        if current is None:
            continue
        if current > 0 and ccl is not None and current > ccl * (1 + tolerance) + 0.1:
            found.append((name, CHARGE, min(1.0, current / bank_current) if bank_current > 0 else 1.0))
        elif current < 0 and dcl is not None and -current > dcl * (1 + tolerance) + 0.1:
            found.append((name, DISCHARGE, min(1.0, current / bank_current) if bank_current < 0 else 1.0))
    return found
