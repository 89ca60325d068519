"""The cooperative's pure core: peer states, the fleet average, a site's target power, curtailment, the ledger.

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
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field, fields
from typing import IO, Any, Iterable, Mapping

SITE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_SITE_ID = re.compile(SITE_ID_PATTERN)

# Sanity bounds of a household: a peer beyond them sends nonsense and is ignored.
MAX_CAPACITY_KWH = 1000.0
MAX_POWER_W = 500_000.0
LEVEL_TOLERANCE = 5.0  # percentage points allowed between the reported level and stored/capacity
MAX_CLOCK_SKEW_S = 120.0  # a timestamp further in the future than this is a broken clock
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


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} is not a number ({value!r})")
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
    if not isinstance(site, str) or not _SITE_ID.match(site):
        return Rejected(expected_site, f"bad siteId {site!r}")
    if expected_site is not None and site != expected_site:
        return Rejected(expected_site, f"siteId {site!r} in the topic of {expected_site!r}")
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
    timeout_s: float = 120.0  # a believed state older than this is no reference for a capacity step


def admit(state: PeerState, believed: PeerState | None, policy: PeerPolicy) -> PeerState | Rejected:
    """A sane peer state (from check_peer) -> itself if it may count, else why not. `believed`: the last
    state of this site that was admitted (None at first)."""
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
    if believed is None:
        return state
    dt = max(0.0, state.timestamp - believed.timestamp)  # reordered messages: measured as simultaneous
    allowed = LEVEL_JUMP_SLACK + MAX_LEVEL_RATE_PER_H * dt / 3600.0
    if abs(state.level - believed.level) > allowed:
        return Rejected(site, f"level jumped from {believed.level:.1f} to {state.level:.1f} % in {dt:.0f} s "
                        f"(at most {allowed:.1f} points)")
    if (policy.registered is None and dt <= policy.timeout_s
            and capacity > believed.capacity_kwh * MAX_CAPACITY_STEP):
        return Rejected(site, f"capacity jumped from {believed.capacity_kwh:g} to {capacity:g} kWh")
    return state


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


def fleet_transfers(fleet: Fleet, settings: SiteSettings) -> dict[str, float]:
    """Every site's transfer after pairing (step 3): imports and deliveries scaled to match, sum zero."""
    wanted = {s.site_id: wanted_transfer(s, fleet, settings) for s in fleet.sites}
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


def site_target(own: PeerState, fleet: Fleet | None, settings: SiteSettings) -> SiteTarget:
    """The battery's target power: self-consumption plus the site's share of the fleet's transfers, within
    the site's own limits."""
    surplus = own.production_w - own.consumption_w
    base = _clip(surplus, -settings.max_discharge_w, settings.max_charge_w)  # self-consumption
    grid0 = -surplus + base  # what the battery cannot take or give goes to the grid
    if fleet is None or fleet.site(own.site_id) is None or len(fleet.sites) < 2:
        return SiteTarget(base, 0.0, grid0, "alone: self-consumption")
    transfer = fleet_transfers(fleet, settings)[own.site_id]
    reason = "balanced" if transfer == 0 else ("below the average: import" if transfer > 0
                                               else "above the average: deliver")
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


class Curtailment:
    """Stop local production when the battery is full; start it again when the level drops below
    `release_percent`, or as soon as the battery is used (discharging by more than `discharge_release_w`) but
    not sooner than `min_hold_s` after stopping: without the hold a full battery and a small load would
    switch the panels every control step."""

    def __init__(self, full_percent: float = 99.0, release_percent: float = 97.0,
                 discharge_release_w: float = 100.0, min_hold_s: float = 300.0) -> None:
        if not release_percent < full_percent:
            raise ValueError(f"release_percent {release_percent} must be below full_percent {full_percent}")
        self.full_percent = full_percent
        self.release_percent = release_percent
        self.discharge_release_w = discharge_release_w
        self.min_hold_s = min_hold_s
        self.curtailed = False
        self.since: float | None = None

    def update(self, level: float, battery_w: float, now: float) -> bool:
        if not self.curtailed:
            if level >= self.full_percent:
                self.curtailed, self.since = True, now
        elif level < self.release_percent or (
                battery_w < -self.discharge_release_w and now - (self.since or now) >= self.min_hold_s):
            self.curtailed, self.since = False, now
        return self.curtailed


@dataclass(slots=True)
class Account:
    """One household's meters over the settlement period, kWh."""

    production: float = 0.0  # P
    load: float = 0.0
    stored: float = 0.0  # net into the battery
    grid_import: float = 0.0  # L
    grid_export: float = 0.0  # T
    transfer_import: float = 0.0  # the part of L taken to charge for the fleet's balance
    transfer_export: float = 0.0  # the part of T delivered for the others

    @property
    def use(self) -> float:
        """V: the household's own use, its load plus what it stored."""
        return self.load + self.stored

    @property
    def balance_error(self) -> float:
        """V - (P + L - T): zero when the meters agree (losses, missed samples otherwise)."""
        return self.use - (self.production + self.grid_import - self.grid_export)

    @property
    def net_transfer(self) -> float:
        """What the cooperative owes the household (+) for balancing: delivered minus taken."""
        return self.transfer_export - self.transfer_import


class Ledger:
    """Metering per site, so the cooperative can settle. Per household, over a period,

        V = P + L - T

    V use: its load plus the energy it stored (net, into its battery);
    P production: what its panels delivered (curtailed production is not produced);
    L import ("levering"): energy taken from the grid;
    T export ("teruglevering"): energy delivered to the grid.

    The transfer is the cooperative's part of L and T: the energy a site imported because the fleet asked it
    to charge (transfer import) and the energy it delivered for the others (transfer export). The metered
    transfer is the commanded transfer as far as the grid meter shows it flowing that way:
    transfer import = min(T+, grid import), transfer export = min(T-, grid export)."""

    FIELDS = ("site", "production_kwh", "load_kwh", "stored_kwh", "use_kwh", "import_kwh", "export_kwh",
              "transfer_import_kwh", "transfer_export_kwh", "net_transfer_kwh", "balance_error_kwh")

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}

    def record(self, site_id: str, seconds: float, *, production_w: float, load_w: float, battery_w: float,
               grid_w: float, transfer_w: float = 0.0) -> Account:
        """Add `seconds` at these (average) powers."""
        a = self.accounts.setdefault(site_id, Account())
        h = seconds / 3_600_000.0  # W*s -> kWh
        a.production += production_w * h
        a.load += load_w * h
        a.stored += battery_w * h
        a.grid_import += max(grid_w, 0.0) * h
        a.grid_export += max(-grid_w, 0.0) * h
        a.transfer_import += min(max(transfer_w, 0.0), max(grid_w, 0.0)) * h
        a.transfer_export += min(max(-transfer_w, 0.0), max(-grid_w, 0.0)) * h
        return a

    def merge(self, site_id: str, account: Account) -> None:
        """Add an account metered elsewhere (a site's own ledger) under `site_id`."""
        mine = self.accounts.setdefault(site_id, Account())
        for f in fields(Account):
            setattr(mine, f.name, getattr(mine, f.name) + getattr(account, f.name))

    def totals(self) -> Account:
        total = Account()
        for a in self.accounts.values():
            for f in fields(Account):
                setattr(total, f.name, getattr(total, f.name) + getattr(a, f.name))
        return total

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for site in sorted(self.accounts):
            a = self.accounts[site]
            out.append({"site": site, "production_kwh": a.production, "load_kwh": a.load, "stored_kwh": a.stored,
                        "use_kwh": a.use, "import_kwh": a.grid_import, "export_kwh": a.grid_export,
                        "transfer_import_kwh": a.transfer_import, "transfer_export_kwh": a.transfer_export,
                        "net_transfer_kwh": a.net_transfer, "balance_error_kwh": a.balance_error})
        return out

    def write_csv(self, out: IO[str]) -> None:
        writer = csv.DictWriter(out, fieldnames=self.FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


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
