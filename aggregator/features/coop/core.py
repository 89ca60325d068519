"""The cooperative's pure core: peer states, the fleet average, a site's target power, curtailment (the ledger:
ledger.py).

Pure: values in, values out; the time is passed in. Powers in W, energies in kWh, levels in % of capacity.
Signs: battery + charging, grid + import.

The rule (communicating vessels). Each site i knows every fresh site's state, itself included, and computes

    fleet level   L  = 100 * sum stored_j / sum capacity_j          (capacity-weighted)
    fleet drift   n  = sum (production_j - consumption_j) / sum capacity_j      (W per kWh)
    distance      d_i = L - fill_i, fill_i = 100 * stored_i / capacity_i        (+ below the average)
    own drift     n_i = (production_i - consumption_i) / capacity_i

A site's own surplus (or deficit) always goes to (or comes from) its own battery first: that is plain
self-consumption. On top of it the site exchanges a transfer T_i with the grid (+ import for charging, -
delivery for the others):

    raw_i = gain * capacity_i * d_i                      sum_i raw_i = 0 exactly (definition of L)

Before use, three things, each symmetric between "below" and "above" so that no site is treated
differently from its mirror image and no coordinator is needed:

1. deadband: |d_i| <= deadband -> 0; beyond it the deadband is subtracted (continuous at the edge, so a site
   hovering at the edge does not switch its transfer on and off);
2. the drift gate (the issue's "below the average AND producing less than average"): a site below the average
   whose own drift is above the fleet's (n_i > n) is catching up by itself and imports nothing; a site above
   the average whose drift is below the fleet's (n_i < n) is coming down by itself and delivers nothing.
   Production is compared per kWh of storage, and net of consumption, because that is what moves a battery's
   level: a large site is not "producing more" just by being large;
3. pairing: every site computes the gated wishes of all sites (they all see the same states) and scales the
   larger side down to the smaller: if imports wanted exceed deliveries offered, each importer gets the
   fraction deliveries/imports, and vice versa. So the fleet's transfers sum to zero before clipping: energy
   moves from site to site and the cooperative as a whole buys nothing from the utility to balance itself.

Last come the site's own limits, which only this site knows (they may break the zero sum by what they cut):
no import at or above the full level, no delivery at or below the reserve, the battery's charge and
discharge power, and the grid connection's limit. The result is the battery's target power
(self-consumption + transfer), the input of the power dispatcher.

`gain` and `deadband` are fleet parameters: every site must use the same values, or the sums are not zero.

What a site believes (FleetView): a peer's state counts when it is sane (check_peer), within what the
cooperative knows of the peer and what a battery can do (admit: rates judged by when states arrive), and
when its claims add up with the energy the fleet sent it (PeerBooks, per calendar day). What the fleet
delivers for one site in a day is bounded (`daily_draw_percent`, a fleet parameter like gain).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Iterable, Mapping

from ...bounded import bounded_repr

SITE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_SITE_ID = re.compile(SITE_ID_PATTERN)

# Sanity bounds of a household: a peer beyond them sends nonsense and is ignored.
MAX_CAPACITY_KWH = 1000.0
MAX_POWER_W = 500_000.0
LEVEL_TOLERANCE = 5.0  # percentage points allowed between the reported level and stored/capacity
MAX_CLOCK_SKEW_S = 120.0  # a timestamp further ahead of our clock than this is a broken clock (or a lie)
WIRE_KEYS = ("siteId", "level", "storedKwh", "capacityKwh", "productionW", "consumptionW", "gridW", "timestamp")
MAX_JSON_DEPTH = 4  # a state is one flat object; deeper JSON is not one (and deep enough crashes the parser)


@dataclass(frozen=True, slots=True)
class PeerState:
    """One site's shared state (also our own)."""

    site_id: str
    level: float  # % (the BMS's state of charge)
    stored_kwh: float
    capacity_kwh: float
    production_w: float  # what the panels deliver now (after curtailment)
    consumption_w: float  # the household's load
    grid_w: float  # + import
    timestamp: float  # s (the site's clock, when these values were measured)

    @property
    def fill(self) -> float:
        """The level from stored/capacity: the one the fleet average is made of (so the sums are exact)."""
        return 100.0 * self.stored_kwh / self.capacity_kwh

    @property
    def drift_w_per_kwh(self) -> float:
        return (self.production_w - self.consumption_w) / self.capacity_kwh

    def to_wire(self) -> dict[str, Any]:
        return {"siteId": self.site_id, "level": round(self.level, 3), "storedKwh": round(self.stored_kwh, 4),
                "capacityKwh": self.capacity_kwh, "productionW": round(self.production_w, 1),
                "consumptionW": round(self.consumption_w, 1), "gridW": round(self.grid_w, 1),
                "timestamp": round(self.timestamp, 3)}


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a peer's message was ignored (for the log)."""

    site_id: str | None
    reason: str
    stale: bool = False  # only too old when it arrived: no lie, it could not count anyway


def is_site_id(text: str) -> bool:
    return _SITE_ID.fullmatch(text) is not None


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} is not a number ({bounded_repr(value)})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{key} is not finite ({value!r})")
    return value


def check_peer(data: Any, now: float, expected_site: str | None = None) -> PeerState | Rejected:
    """A peer's decoded message -> its state, or the reason it is nonsense. `expected_site`: the site id in the
    topic, which the payload must repeat (a site may only speak for itself)."""
    if not isinstance(data, Mapping):
        return Rejected(expected_site, "not a JSON object")
    site = data.get("siteId")
    if not isinstance(site, str) or not is_site_id(site):
        return Rejected(expected_site, f"bad siteId {bounded_repr(site)}")
    if expected_site is not None and site != expected_site:
        return Rejected(expected_site, f"siteId {bounded_repr(site)} in the topic of {expected_site!r}")
    missing = [k for k in WIRE_KEYS if k not in data]
    if missing:
        return Rejected(site, f"missing {', '.join(missing)}")
    try:
        level, stored, capacity = _number(data, "level"), _number(data, "storedKwh"), _number(data, "capacityKwh")
        production, consumption = _number(data, "productionW"), _number(data, "consumptionW")
        grid, timestamp = _number(data, "gridW"), _number(data, "timestamp")
    except ValueError as err:
        return Rejected(site, str(err))
    problems = []
    if not 0.0 <= level <= 100.0:
        problems.append(f"level {level:g} % outside 0..100")
    if not 0.0 < capacity <= MAX_CAPACITY_KWH:
        problems.append(f"capacity {capacity:g} kWh outside (0, {MAX_CAPACITY_KWH:g}]")
    elif not 0.0 <= stored <= capacity * 1.01:
        problems.append(f"stored {stored:g} kWh outside 0..capacity {capacity:g}")
    elif not problems and abs(100.0 * stored / capacity - level) > LEVEL_TOLERANCE:
        problems.append(f"level {level:g} % disagrees with stored/capacity {100.0 * stored / capacity:.1f} %")
    if not 0.0 <= production <= MAX_POWER_W:
        problems.append(f"production {production:g} W outside 0..{MAX_POWER_W:g}")
    if not 0.0 <= consumption <= MAX_POWER_W:
        problems.append(f"consumption {consumption:g} W outside 0..{MAX_POWER_W:g}")
    if abs(grid) > MAX_POWER_W:
        problems.append(f"grid {grid:g} W beyond +-{MAX_POWER_W:g}")
    if timestamp > now + MAX_CLOCK_SKEW_S:
        problems.append(f"timestamp {timestamp - now:.0f} s in the future")
    if problems:
        return Rejected(site, "; ".join(problems))
    return PeerState(site, level, min(stored, capacity), capacity, production, consumption, grid, timestamp)


def json_depth(text: bytes | str) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count). Cheap and
    safe on any input, so it can screen a payload before json.loads, whose recursion a deep one exhausts."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth = max(0, depth - 1)
    return deepest


# What a peer may claim, beyond being sane (check_peer). The fleet's average weighs each site by the capacity
# it claims, so one site claiming 1000 kWh at 0 % would pull the average to the floor and make every other
# site deliver to it. A mature cooperative knows its members: a registry of site -> capacity, the same at
# every site (like gain and deadband), and a claim above its registered capacity is not believed; less is
# (a pack offline only lowers its weight). Without a registry a household-sized bound applies. Beyond that,
# physics: a battery's level moves no faster than its C-rate, so a level that jumps is not believed either.
CAPACITY_TOLERANCE = 0.1  # capacity = Ah x V moves with the bank's voltage: 10 % over the registered is fine
MAX_LEVEL_RATE_PER_H = 100.0  # % per hour: 1 C, more than a household's inverter moves its battery
LEVEL_JUMP_SLACK = 10.0  # points at any moment: a BMS resynchronising its SoC at the top of a charge
MAX_CAPACITY_STEP = 2.0  # without a registry: a capacity more than doubling at once is not believed


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    registered: Mapping[str, float] | None = None  # site -> capacity kWh; None: any site may take part
    max_capacity_kwh: float = 100.0  # without a registry: the most any one site may claim
    timeout_s: float = 120.0  # a state older than this is stale, and no reference for a capacity step


def admit(state: PeerState, believed: PeerState | None, policy: PeerPolicy, now: float,
          believed_at: float | None = None) -> PeerState | Rejected:
    """A sane peer state (from check_peer) that arrived at `now` (our clock) -> itself if it may count, else
    why not. `believed`: the last state of this site that was admitted, which arrived at `believed_at` (None:
    unknown, taken as now). Rates are judged by when states arrive, not by their timestamps, which the sender
    chooses: a state stamped hours ago would otherwise make any jump after it look slow."""
    site, capacity = state.site_id, state.capacity_kwh
    if policy.registered is not None:
        registered = policy.registered.get(site)
        if registered is None:
            return Rejected(site, "not a registered member of the cooperative")
        if capacity > registered * (1.0 + CAPACITY_TOLERANCE):
            return Rejected(site, f"capacity {capacity:g} kWh beyond its registered {registered:g} kWh")
    elif capacity > policy.max_capacity_kwh:
        return Rejected(site, f"capacity {capacity:g} kWh beyond the bound of {policy.max_capacity_kwh:g} kWh "
                        "(no registry of members)")
    age = now - state.timestamp
    if age > policy.timeout_s:
        return Rejected(site, f"stamped {age:.0f} s before it arrived (older than the peer timeout of "
                        f"{policy.timeout_s:g} s)", stale=True)
    if believed is None:
        return state
    dt = max(0.0, now - (now if believed_at is None else believed_at))
    allowed = LEVEL_JUMP_SLACK + MAX_LEVEL_RATE_PER_H * dt / 3600.0
    if abs(state.level - believed.level) > allowed:
        return Rejected(site, f"level jumped from {believed.level:.1f} to {state.level:.1f} % in {dt:.0f} s "
                        f"(at most {allowed:.1f} points)")
    if (policy.registered is None and dt <= policy.timeout_s
            and capacity > believed.capacity_kwh * MAX_CAPACITY_STEP):
        return Rejected(site, f"capacity jumped from {believed.capacity_kwh:g} to {capacity:g} kWh")
    return state


# A peer's claims must add up. Every site computes every site's transfer from the same states, so each knows
# what the fleet delivers for a peer that imports. That energy has to show in the peer's claims: as a rise of
# its level, or as its own use (load beyond its production). A peer that is sent energy while its level stays
# put and it uses nothing (one that always claims 0 % would drain the others) is not believed. Only a part
# must show: the peer's own limits (charge power, grid connection) may let it take less than the fleet
# computed for it, the others compute it from states that lag (a peer whose link dropped counts until it is
# stale, while it takes nothing), and batteries and inverters lose some. The books are kept per calendar day, and
# what the fleet delivers for one site in a day is bounded as well: claims that add up can still be invented (a load
# that takes exactly what it is sent), and the bound limits what such a peer costs the others.
ADD_UP_SHARE = 0.4  # of the energy sent, at least this much must show as its rise or its use
ADD_UP_SLACK = 10.0  # % of its capacity: a BMS resynchronising its SoC, a late state


@dataclass(frozen=True, slots=True)
class PeerBooks:
    """What the fleet sent one site on one day and what its claims show of it."""

    day: Hashable
    opening_fill: float  # its level (stored/capacity, %) when the books opened
    capacity_kwh: float  # as it last claimed
    sent_kwh: float = 0.0  # the fleet's deliveries for it: its share of the imports, as this site computed them
    used_kwh: float = 0.0  # its claimed load beyond its production

    def rise_kwh(self, state: PeerState) -> float:
        """Its level's rise since the books opened, in kWh of its present capacity (a pack going offline
        lowers its capacity, not its level)."""
        return (state.fill - self.opening_fill) * state.capacity_kwh / 100.0

    def unexplained_kwh(self, state: PeerState) -> float:
        """The part of the energy it had to show that its claims do not show (<= 0: they add up)."""
        return ADD_UP_SHARE * self.sent_kwh - max(0.0, self.rise_kwh(state) + self.used_kwh)


def book(books: PeerBooks | None, state: PeerState, transfer_w: float, seconds: float, day: Hashable) -> PeerBooks:
    """Add `seconds` during which the fleet computed `transfer_w` for the site (+ import) and the site claimed
    `state`. A new day opens new books."""
    if books is None or books.day != day:
        books = PeerBooks(day, state.fill, state.capacity_kwh)
    h = seconds / 3_600_000.0  # W*s -> kWh
    return replace(books, capacity_kwh=state.capacity_kwh, sent_kwh=books.sent_kwh + max(transfer_w, 0.0) * h,
                   used_kwh=books.used_kwh + max(state.consumption_w - state.production_w, 0.0) * h)


def does_not_add_up(books: PeerBooks, state: PeerState) -> str | None:
    """Why the site's claims are not believed, or None."""
    if books.unexplained_kwh(state) <= ADD_UP_SLACK / 100.0 * state.capacity_kwh:
        return None
    return (f"its claims do not add up: the fleet sent it {books.sent_kwh:.1f} kWh today, its level rose "
            f"{books.rise_kwh(state):.1f} kWh and it used {books.used_kwh:.1f} kWh")


def daily_draw_kwh(books: PeerBooks, settings: SiteSettings) -> float:
    """The most the fleet delivers for this site in a day."""
    return settings.daily_draw_percent / 100.0 * books.capacity_kwh


@dataclass(frozen=True, slots=True)
class Fleet:
    """The fresh sites and their capacity-weighted figures."""

    level: float  # %
    drift_w_per_kwh: float
    capacity_kwh: float
    sites: tuple[PeerState, ...]  # sorted by site id

    def site(self, site_id: str) -> PeerState | None:
        return next((s for s in self.sites if s.site_id == site_id), None)


def is_fresh(state: PeerState, now: float, timeout: float) -> bool:
    return now - timeout <= state.timestamp <= now + MAX_CLOCK_SKEW_S


def fleet_average(peers: Iterable[PeerState], now: float, timeout: float) -> Fleet | None:
    """Sum stored / sum capacity over the peers heard from within `timeout` s (the newest state per site);
    None when there is none."""
    newest: dict[str, PeerState] = {}
    for p in peers:
        if is_fresh(p, now, timeout) and (p.site_id not in newest or p.timestamp > newest[p.site_id].timestamp):
            newest[p.site_id] = p
    if not newest:
        return None
    sites = tuple(newest[k] for k in sorted(newest))
    capacity = math.fsum(s.capacity_kwh for s in sites)
    stored = math.fsum(s.stored_kwh for s in sites)
    net = math.fsum(s.production_w - s.consumption_w for s in sites)
    return Fleet(100.0 * stored / capacity, net / capacity, capacity, sites)


@dataclass(frozen=True, slots=True)
class SiteSettings:
    gain_w_per_percent_kwh: float = 20.0  # W per point of distance per kWh: time constant 10 / gain h
    deadband_percent: float = 2.0
    max_charge_w: float = 5000.0
    max_discharge_w: float = 5000.0
    grid_limit_w: float = 5750.0  # the connection (25 A at 230 V)
    full_percent: float = 99.0  # no import for the fleet at or above this level
    reserve_percent: float = 10.0  # no delivery to the fleet at or below this level
    daily_draw_percent: float = 100.0  # of a site's capacity: the most the fleet delivers for it in a day


def raw_transfer(site: PeerState, fleet: Fleet, gain: float) -> float:
    """gain * capacity * distance: over the fleet these sum to zero."""
    return gain * site.capacity_kwh * (fleet.level - site.fill)


def wanted_transfer(site: PeerState, fleet: Fleet, settings: SiteSettings) -> float:
    """The raw transfer after the deadband and the drift gate (module docstring, steps 1 and 2)."""
    distance = fleet.level - site.fill
    if abs(distance) <= settings.deadband_percent:
        return 0.0
    drift = site.drift_w_per_kwh - fleet.drift_w_per_kwh
    if (distance > 0 and drift > 0) or (distance < 0 and drift < 0):
        return 0.0  # moving toward the average by itself
    beyond = distance - math.copysign(settings.deadband_percent, distance)
    return settings.gain_w_per_percent_kwh * site.capacity_kwh * beyond


def fleet_transfers(fleet: Fleet, settings: SiteSettings, capped: frozenset[str] = frozenset()) -> dict[str, float]:
    """Every site's transfer after pairing (step 3): imports and deliveries scaled to match, sum zero. A site
    in `capped` has drawn its day's bound: it imports nothing more (it may still deliver)."""
    wanted = {s.site_id: wanted_transfer(s, fleet, settings) for s in fleet.sites}
    for site in capped & wanted.keys():
        wanted[site] = min(wanted[site], 0.0)
    imports = math.fsum(w for w in wanted.values() if w > 0)
    exports = -math.fsum(w for w in wanted.values() if w < 0)
    if imports <= 0 or exports <= 0:
        return {k: 0.0 for k in wanted}
    scale_in, scale_out = min(1.0, exports / imports), min(1.0, imports / exports)
    return {k: w * (scale_in if w > 0 else scale_out) for k, w in wanted.items()}


@dataclass(frozen=True, slots=True)
class SiteTarget:
    battery_w: float  # the dispatcher's input: + charge, - discharge
    transfer_w: float  # the part exchanged with the fleet: + import for charging, - delivery
    grid_w: float  # expected at the meter, + import
    reason: str


def _clip(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def site_target(own: PeerState, fleet: Fleet | None, settings: SiteSettings,
                capped: frozenset[str] = frozenset()) -> SiteTarget:
    """The battery's target power: self-consumption plus the site's share of the fleet's transfers, within
    the site's own limits."""
    surplus = own.production_w - own.consumption_w
    base = _clip(surplus, -settings.max_discharge_w, settings.max_charge_w)  # self-consumption
    grid0 = -surplus + base  # what the battery cannot take or give goes to the grid
    if fleet is None or fleet.site(own.site_id) is None or len(fleet.sites) < 2:
        return SiteTarget(base, 0.0, grid0, "alone: self-consumption")
    transfer = fleet_transfers(fleet, settings, capped)[own.site_id]
    reason = "balanced" if transfer == 0 else ("below the average: import" if transfer > 0
                                               else "above the average: deliver")
    if own.site_id in capped and transfer == 0 and wanted_transfer(own, fleet, settings) > 0:
        reason = "drew the day's bound from the fleet"
    if transfer > 0 and own.level >= settings.full_percent:
        transfer, reason = 0.0, "full"
    if transfer < 0 and own.level <= settings.reserve_percent:
        transfer, reason = 0.0, "at the reserve"
    # The battery's window and the grid connection bound the transfer; it never flips sign.
    low = max(-settings.max_discharge_w - base, -settings.grid_limit_w - grid0)
    high = min(settings.max_charge_w - base, settings.grid_limit_w - grid0)
    limited = _clip(transfer, min(0.0, low), max(0.0, high))
    if limited != transfer:
        reason += " (limited)"
    return SiteTarget(base + limited, limited, grid0 + limited, reason)


class FleetView:
    """What one site believes of the cooperative: the peers' states it admitted and when they arrived, why
    the others are not believed, and every site's books for the day (its own too: the day's bound applies to
    it as every other site computes it). Feed it the peers' messages with `receive()` and the own state with
    `step()` each control cycle; the clock is passed in."""

    def __init__(self, site_id: str, settings: SiteSettings, policy: PeerPolicy,
                 day_of: Callable[[float], Hashable]) -> None:
        self.site_id = site_id
        self.settings = settings
        self.policy = policy
        self.day_of = day_of  # our clock -> the calendar day the books belong to
        self.peers: dict[str, PeerState] = {}  # believed
        self.heard_at: dict[str, float] = {}  # when each believed state arrived (our clock)
        self.offline: set[str] = set()
        self.ignored: dict[str, str] = {}  # site -> why its latest state is not believed (until one is)
        self.books: dict[str, PeerBooks] = {}
        self.own: PeerState | None = None
        self._transfers: dict[str, float] = {}  # computed at the last step, in force until the next
        self._booked_at: float | None = None

    def receive(self, site: str, data: Any, now: float) -> PeerState | Rejected:
        """A peer's decoded state, arrived at `now`: believed (and counted) or not, and why."""
        result = check_peer(data, now, site)
        if isinstance(result, PeerState):
            result = admit(result, self.peers.get(site), self.policy, now, self.heard_at.get(site))
        if isinstance(result, PeerState) and site in self.books:
            why = does_not_add_up(self.books[site], result)
            if why is not None:
                self.peers.pop(site, None)  # its last believed claim is the one that does not add up
                result = Rejected(site, why)
        if isinstance(result, Rejected):
            if not result.stale:  # a stale state is dropped: the believed one stays, and so does its reason
                self.ignored[site] = result.reason
        else:
            self.peers[site] = result
            self.heard_at[site] = now
            self.ignored.pop(site, None)
        return result

    def leave(self, site: str) -> None:
        """The site's retained state was cleared: it left the cooperative (its books stay for the day)."""
        self.peers.pop(site, None)
        self.heard_at.pop(site, None)
        self.ignored.pop(site, None)

    def fleet(self, now: float) -> Fleet | None:
        states = [p for site, p in self.peers.items() if site not in self.offline]
        if self.own is not None:
            states.append(self.own)
        return fleet_average(states, now, self.policy.timeout_s)

    def peers_online(self, now: float) -> list[str]:
        """Other sites that count now: online and fresh."""
        return sorted(site for site, p in self.peers.items() if site not in self.offline
                      and is_fresh(p, now, self.policy.timeout_s))

    def capped(self, now: float) -> frozenset[str]:
        """The sites that drew the day's bound from the fleet."""
        day = self.day_of(now)
        return frozenset(site for site, b in self.books.items()
                         if b.day == day and b.sent_kwh >= daily_draw_kwh(b, self.settings))

    def step(self, own: PeerState, now: float) -> tuple[SiteTarget, list[Rejected]]:
        """Book the time since the last step at the transfers then in force, drop the peers whose claims no
        longer add up, and compute our target. Returns the target and the peers dropped now."""
        self.own = own
        day = self.day_of(now)
        fleet = self.fleet(now)
        if fleet is not None and self._booked_at is not None:
            seconds = min(max(0.0, now - self._booked_at), self.policy.timeout_s)  # no energy for a long gap
            for state in fleet.sites:
                site = state.site_id
                self.books[site] = book(self.books.get(site), state, self._transfers.get(site, 0.0), seconds, day)
        self._booked_at = now
        dropped = []
        for site, state in list(self.peers.items()):
            why = does_not_add_up(self.books[site], state) if site in self.books else None
            if why is not None:
                del self.peers[site]
                self.ignored[site] = why
                dropped.append(Rejected(site, why))
        if dropped:
            fleet = self.fleet(now)
        capped = self.capped(now)
        together = fleet is not None and len(fleet.sites) >= 2 and fleet.site(own.site_id) is not None
        self._transfers = fleet_transfers(fleet, self.settings, capped) if together and fleet else {}
        return site_target(own, fleet, self.settings, capped), dropped


class Curtailment:
    """Stop local production when the battery is full; run it again as soon as the battery is used
    (discharging by more than `discharge_release_w`) or its level drops below `release_percent`. Once running
    again it is not stopped for `min_hold_s`: without the hold a full battery and a small load would switch
    the panels every control step."""

    def __init__(self, full_percent: float = 99.0, release_percent: float = 97.0,
                 discharge_release_w: float = 100.0, min_hold_s: float = 300.0) -> None:
        if not release_percent < full_percent:
            raise ValueError(f"release_percent {release_percent} must be below full_percent {full_percent}")
        self.full_percent = full_percent
        self.release_percent = release_percent
        self.discharge_release_w = discharge_release_w
        self.min_hold_s = min_hold_s
        self.curtailed = False
        self.since: float | None = None  # of the last change

    def update(self, level: float, battery_w: float, now: float) -> bool:
        if self.curtailed:
            if level < self.release_percent or battery_w < -self.discharge_release_w:
                self.curtailed, self.since = False, now
        elif (level >= self.full_percent and battery_w >= -self.discharge_release_w
              and (self.since is None or now - self.since >= self.min_hold_s)):
            self.curtailed, self.since = True, now
        return self.curtailed


@dataclass(slots=True)
class PublishGate:
    """Publish "on change": when the level moved by `level_step` % or a power by `power_step` W since the
    last published state (the periodic publish covers the rest)."""

    level_step: float = 1.0
    power_step: float = 200.0
    last: PeerState | None = field(default=None)

    def changed(self, state: PeerState) -> bool:
        last = self.last
        if last is None:
            return True
        return (abs(state.level - last.level) >= self.level_step
                or abs(state.production_w - last.production_w) >= self.power_step
                or abs(state.consumption_w - last.consumption_w) >= self.power_step
                or abs(state.grid_w - last.grid_w) >= self.power_step)
