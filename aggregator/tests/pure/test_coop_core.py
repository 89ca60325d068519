"""The cooperative's pure core: peer checks, the fleet average, targets, curtailment, the ledger."""
from __future__ import annotations

import io
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.features.coop.core import (ADD_UP_SHARE, ADD_UP_SLACK, CAPACITY_TOLERANCE, LEVEL_JUMP_SLACK,
                                           MAX_LEVEL_RATE_PER_H, Curtailment, FleetView, PeerBooks, PeerPolicy,
                                           PeerState, PublishGate, Rejected, SiteSettings, admit, book, check_peer,
                                           does_not_add_up, fleet_average, fleet_transfers, json_depth, raw_transfer,
                                           site_target, wanted_transfer)
from aggregator.features.coop.ledger import Ledger
from aggregator.features.coop.settings import CoopSettingsError, parse_coop

NOW = 1_000_000.0
LOOSE = SiteSettings(max_charge_w=1e9, max_discharge_w=1e9, grid_limit_w=1e9, full_percent=100.0,
                     reserve_percent=0.0)


def peer(site: str, level: float, capacity: float = 10.0, production: float = 0.0, consumption: float = 0.0,
         age: float = 0.0) -> PeerState:
    return PeerState(site, level, capacity * level / 100, capacity, production, consumption, 0.0, NOW - age)


site_states = st.builds(
    lambda i, level, cap, prod, cons: peer(f"s{i}", level, cap, prod, cons),
    st.integers(0, 10**6), st.floats(0, 100), st.floats(0.5, 100), st.floats(0, 20000), st.floats(0, 20000))
fleets = st.lists(site_states, min_size=2, max_size=20, unique_by=lambda p: p.site_id)


# --- peer checks ---------------------------------------------------------------------------------------

def test_a_sane_state_passes_and_round_trips() -> None:
    p = peer("rivendell", 55.0, 13.5, 3000, 800)
    assert check_peer(p.to_wire(), NOW, "rivendell") == p


@pytest.mark.parametrize("change, reason", [
    ({"level": 250}, "level 250 % outside 0..100"),
    ({"level": -1}, "outside 0..100"),
    ({"capacityKwh": 0}, "capacity 0 kWh outside"),
    ({"capacityKwh": 5000}, "capacity 5000 kWh outside"),
    ({"storedKwh": 50}, "stored 50 kWh outside"),
    ({"level": 90}, "disagrees with stored/capacity"),
    ({"productionW": -5}, "production -5 W"),
    ({"consumptionW": 1e9}, "consumption"),
    ({"gridW": -1e7}, "grid"),
    ({"level": float("nan")}, "level is not finite"),
    ({"level": "50"}, "level is not a number"),
    ({"level": True}, "level is not a number"),
    ({"timestamp": NOW + 3600}, "in the future"),
    ({"siteId": "lothlorien"}, "in the topic of 'rivendell'"),
    ({"siteId": "../x"}, "bad siteId"),
])
def test_nonsense_is_rejected_with_a_reason(change: dict[str, object], reason: str) -> None:
    data = dict(peer("rivendell", 50.0).to_wire(), **change)
    result = check_peer(data, NOW, "rivendell")
    assert isinstance(result, Rejected) and reason in result.reason


def test_missing_keys_and_non_objects_are_rejected() -> None:
    data = peer("rivendell", 50.0).to_wire()
    del data["gridW"]
    assert check_peer(data, NOW) == Rejected("rivendell", "missing gridW")
    assert check_peer([1, 2], NOW, "x") == Rejected("x", "not a JSON object")


# Text from a small alphabet: plain st.text() makes Hypothesis build its table of all of Unicode on the first
# draw, which takes over a second on a cold cache (FailedHealthCheck too_slow). These characters cover valid
# site ids and numbers as text and what must be refused ("/", " ", "."), which is all check_peer looks at.
_TEXT = st.text(alphabet="aZ09_-/ .é", max_size=5)


@given(st.dictionaries(st.sampled_from(["siteId", "level", "storedKwh", "capacityKwh", "productionW",
                                        "consumptionW", "gridW", "timestamp", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _TEXT)))
def test_check_peer_never_raises_and_what_passes_is_sane(data: dict[str, object]) -> None:
    result = check_peer(data, NOW)
    if isinstance(result, PeerState):
        assert 0 <= result.level <= 100 and 0 < result.capacity_kwh and 0 <= result.stored_kwh <= result.capacity_kwh
        assert all(math.isfinite(v) for v in (result.production_w, result.consumption_w, result.grid_w))


# --- deep JSON -----------------------------------------------------------------------------------------

def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_JSON_TEXT = st.text(alphabet='ab[]{}"\\:, é', max_size=6)  # brackets and quotes inside strings must not count
json_values = st.recursive(st.none() | st.booleans() | st.integers() | _JSON_TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_JSON_TEXT, inner, max_size=3),
                           max_leaves=20)


@given(json_values, st.booleans())
def test_json_depth_is_the_nesting_of_arrays_and_objects(value: object, ascii_only: bool) -> None:
    assert json_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == _depth(value)


@given(st.binary(max_size=300))
def test_json_depth_takes_any_bytes(data: bytes) -> None:
    assert json_depth(data) >= 0


def test_json_depth_of_what_crashes_the_parser() -> None:
    assert json_depth(b"[" * 100_000) == 100_000 and json_depth('{"a":' * 2000) == 2000
    assert json_depth(json.dumps(peer("a", 50).to_wire())) == 1


# --- what a peer may claim (admit) ---------------------------------------------------------------------

REGISTRY = PeerPolicy(registered={"a": 10.0, "b": 13.5, "liar": 10.0})


def test_a_claim_beyond_the_registered_capacity_or_of_an_unknown_site_is_not_believed() -> None:
    assert admit(peer("a", 50, 10.9), None, REGISTRY, NOW) == peer("a", 50, 10.9)  # Ah x V moves with the voltage
    assert admit(peer("a", 50, 4.0), None, REGISTRY, NOW) == peer("a", 50, 4.0)  # less: a pack offline
    result = admit(peer("liar", 0, 1000), None, REGISTRY, NOW)
    assert result == Rejected("liar", "capacity 1000 kWh beyond its registered 10 kWh")
    assert admit(peer("stranger", 50), None, REGISTRY, NOW) == Rejected("stranger", "not a registered member of "
                                                                                    "the cooperative")
    open_fleet = PeerPolicy(max_capacity_kwh=100.0)
    assert admit(peer("x", 0, 100), None, open_fleet, NOW) == peer("x", 0, 100)
    result = admit(peer("x", 0, 1000), None, open_fleet, NOW)
    assert isinstance(result, Rejected) and "beyond the bound of 100 kWh" in result.reason


def test_a_level_that_jumps_is_not_believed_until_physics_allows_it() -> None:
    before = peer("a", 60)  # arrived at NOW
    assert admit(peer("a", 55, age=-30), before, REGISTRY, NOW + 30, NOW) == peer("a", 55, age=-30)
    result = admit(peer("a", 0, age=-30), before, REGISTRY, NOW + 30, NOW)
    assert isinstance(result, Rejected) and "level jumped from 60.0 to 0.0 % in 30 s" in result.reason
    # An hour later any level is reachable: a peer that was refused comes back by itself.
    assert admit(peer("a", 0, age=-3600), before, REGISTRY, NOW + 3600, NOW) == peer("a", 0, age=-3600)
    # Without a registry a capacity that more than doubles at once is not believed either.
    open_fleet = PeerPolicy(max_capacity_kwh=100.0, timeout_s=120)
    result = admit(peer("a", 60, 90, age=-30), peer("a", 60, 10), open_fleet, NOW + 30, NOW)
    assert isinstance(result, Rejected) and "capacity jumped from 10 to 90 kWh" in result.reason
    assert admit(peer("a", 60, 15, age=-30), peer("a", 60, 10), open_fleet, NOW + 30, NOW) == peer("a", 60, 15,
                                                                                                    age=-30)


@given(st.lists(st.tuples(st.floats(1, 3600), st.floats(-1, 1)), max_size=50), st.floats(0, 100))
def test_a_real_battery_is_always_believed(steps: list[tuple[float, float]], start: float) -> None:
    """Levels that move no faster than 1 C (any direction, any timing) are never refused."""
    believed = peer("a", start)
    for dt, fraction in steps:
        level = min(100.0, max(0.0, believed.level + fraction * MAX_LEVEL_RATE_PER_H * dt / 3600))
        state = PeerState("a", level, 10 * level / 100, 10, 0, 0, 0, believed.timestamp + dt)
        assert admit(state, believed, REGISTRY, state.timestamp, believed.timestamp) == state
        believed = state


@given(st.floats(0, 1000, exclude_min=True), st.floats(0, 100), st.floats(0, 3600), st.floats(0, 100))
def test_a_jump_beyond_the_allowance_is_refused(capacity: float, level: float, dt: float, before: float) -> None:
    state = PeerState("a", level, capacity * level / 100, capacity, 0, 0, 0, NOW + dt)
    result = admit(state, peer("a", before), PeerPolicy(max_capacity_kwh=1000), NOW + dt, NOW)
    if abs(level - before) > LEVEL_JUMP_SLACK + MAX_LEVEL_RATE_PER_H * dt / 3600:
        assert isinstance(result, Rejected)


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.5, 13.5)), min_size=1, max_size=10),
       st.floats(0, 1000, exclude_min=True), st.floats(0, 100), st.sampled_from([None, 80.0]))
def test_a_liar_pulls_the_average_no_more_than_an_empty_site_of_its_registered_size(
        honest: list[tuple[float, float]], claimed_kwh: float, claimed_level: float, earlier: float | None) -> None:
    sites = [peer(f"s{i}", level, capacity) for i, (level, capacity) in enumerate(honest)]
    registered = {s.site_id: 13.5 for s in sites} | {"liar": 10.0}
    policy = PeerPolicy(registered=registered)
    believed = None if earlier is None else peer("liar", earlier, 10.0, age=30)
    claim = admit(peer("liar", claimed_level, claimed_kwh), believed, policy, NOW, NOW - 30)
    counted = sites + ([claim] if isinstance(claim, PeerState) else [] if believed is None else [believed])
    fleet = fleet_average(counted, NOW, 120)
    assert fleet is not None
    stored = math.fsum(s.stored_kwh for s in sites)
    capacity = math.fsum(s.capacity_kwh for s in sites)
    floor = 100 * stored / (capacity + 10.0 * (1 + CAPACITY_TOLERANCE))
    assert fleet.level >= floor - 1e-9


def test_rates_are_judged_by_arrival_and_old_or_future_stamps_are_refused() -> None:
    """Back-dating: 90 % stamped two hours ago, then 0 % stamped now, made the jump look two hours slow."""
    policy = PeerPolicy(registered={"a": 10.0}, timeout_s=7200)  # a long timeout: the stamps alone pass
    believed = PeerState("a", 90, 9, 10, 0, 0, 0, NOW - 7000)  # stamped long ago, arrived at NOW
    assert admit(believed, None, policy, NOW) == believed
    result = admit(peer("a", 0), believed, policy, NOW + 1, NOW)  # stamped now, arrived a second later
    assert isinstance(result, Rejected) and "level jumped from 90.0 to 0.0 % in 1 s" in result.reason
    # Stamps outside the window are refused whatever the level: older than the peer timeout on arrival, or
    # further ahead of our clock than the skew allows.
    old = admit(PeerState("a", 50, 5, 10, 0, 0, 0, NOW - 7300), None, policy, NOW)
    assert isinstance(old, Rejected) and "stamped 7300 s before it arrived" in old.reason and old.stale
    future = check_peer(dict(peer("a", 50).to_wire(), timestamp=NOW + 600), NOW, "a")
    assert isinstance(future, Rejected) and "600 s in the future" in future.reason


def test_back_dating_through_the_fleet_view_leaves_the_average_alone() -> None:
    view = FleetView("b", LOOSE, PeerPolicy(registered={"a": 10.0, "b": 10.0}), day_of=lambda t: 0)
    assert isinstance(view.receive("a", peer("a", 90).to_wire(), NOW), PeerState)
    view.step(peer("b", 60), NOW)
    stale = PeerState("a", 90, 9, 10, 0, 0, 0, NOW + 10 - 7200).to_wire()
    result = view.receive("a", stale, NOW + 10)
    assert isinstance(result, Rejected) and result.stale and "a" not in view.ignored  # dropped, 90 % stays
    lie = PeerState("a", 0, 0, 10, 0, 0, 0, NOW + 11).to_wire()
    assert isinstance(view.receive("a", lie, NOW + 11), Rejected)
    fleet = view.fleet(NOW + 11)
    assert fleet is not None and fleet.level == pytest.approx(75.0)
    assert "level jumped from 90.0 to 0.0 %" in view.ignored["a"]


# --- a peer's books: its claims must add up ------------------------------------------------------------

def test_energy_sent_must_show_as_a_rise_or_as_use() -> None:
    start = peer("a", 20)  # 10 kWh at 20 %
    books = book(None, start, 0.0, 0.0, day=1)
    assert books == PeerBooks(1, 20.0, 10.0)
    books = book(books, start, 3000.0, 3600, day=1)  # the fleet delivered 3 kWh for it
    assert books.sent_kwh == pytest.approx(3.0) and books.used_kwh == 0
    why = does_not_add_up(books, start)  # and its level did not move: 1.5 kWh unexplained > 1 kWh slack
    assert why == "its claims do not add up: the fleet sent it 3.0 kWh today, its level rose 0.0 kWh and it used " \
                  "0.0 kWh"
    assert does_not_add_up(books, peer("a", 25)) is None  # 0.5 kWh of the 1.5 shows: within the slack
    assert does_not_add_up(books, peer("a", 35)) is None  # 1.5 kWh stored
    # A load beyond its production explains it as well.
    busy = peer("a", 20, consumption=2000)
    assert does_not_add_up(book(books, busy, 0.0, 3600, day=1), busy) is None
    # A pack going offline lowers the capacity, not the level: no rise is lost.
    smaller = PeerState("a", 35, 2.45, 7.0, 0, 0, 0, NOW)
    assert books.rise_kwh(smaller) == pytest.approx(1.05)
    # A new day opens new books.
    assert book(books, start, 0.0, 60, day=2) == PeerBooks(2, 20.0, 10.0)


@given(st.lists(st.tuples(st.floats(0, 5000), st.floats(0, 900), st.floats(ADD_UP_SHARE, 1.0), st.floats(0, 1)),
                max_size=40), st.floats(2, 50))
def test_a_peer_that_takes_what_it_is_sent_is_always_believed(
        steps: list[tuple[float, float, float, float]], capacity: float) -> None:
    """A real battery: of every kWh sent it stores a part (at least the share; losses, its own limits) and its
    load uses some of it. Its claims always add up."""
    stored, consumption = 0.0, 0.0
    state = PeerState("a", 0.0, 0.0, capacity, 0.0, 0.0, 0.0, NOW)
    books = book(None, state, 0.0, 0.0, day=1)
    for transfer, seconds, taken, share_used in steps:
        books = book(books, state, transfer, seconds, day=1)  # the interval at the last claimed load
        stored += (taken * transfer - consumption) * seconds / 3_600_000
        stored = min(stored, capacity)
        if stored >= capacity:  # a full battery is not sent more: it is above any average
            break
        consumption = share_used * taken * transfer  # its load takes part of what comes in
        state = PeerState("a", 100 * stored / capacity, stored, capacity, 0.0, consumption, 0.0, NOW)
        assert does_not_add_up(books, state) is None


@given(st.lists(st.tuples(st.floats(0, 10000), st.floats(0, 900)), max_size=40), st.floats(2, 50),
       st.floats(0, 100))
def test_a_peer_whose_level_stays_put_is_refused_once_it_took_twice_the_slack(
        steps: list[tuple[float, float]], capacity: float, level: float) -> None:
    state = PeerState("liar", level, capacity * level / 100, capacity, 0.0, 0.0, 0.0, NOW)
    books = book(None, state, 0.0, 0.0, day=1)
    for transfer, seconds in steps:
        books = book(books, state, transfer, seconds, day=1)
        refused = does_not_add_up(books, state) is not None
        assert refused == (ADD_UP_SHARE * books.sent_kwh > ADD_UP_SLACK / 100 * capacity)


@given(fleets, st.floats(0, 10), st.data())
def test_capped_sites_import_nothing_and_transfers_still_sum_to_zero(sites: list[PeerState], deadband: float,
                                                                     data: st.DataObject) -> None:
    fleet = fleet_average(sites, NOW, 60)
    assert fleet is not None
    capped = frozenset(data.draw(st.sets(st.sampled_from([s.site_id for s in sites]))))
    transfers = fleet_transfers(fleet, SiteSettings(deadband_percent=deadband), capped)
    scale = sum(abs(t) for t in transfers.values()) + 1.0
    assert abs(math.fsum(transfers.values())) <= 1e-9 * scale
    assert all(transfers[site] <= 0 for site in capped)


def _night(liar_load: bool, hours: float = 6.0) -> tuple[dict[str, float], float, FleetView]:
    """The issue's case on the pure core: two honest 10 kWh sites at 80 and 70 % on a quiet night and a
    registered member that always claims 0 % (and, with liar_load, a load that takes exactly what it is
    sent). Every site sees the others' states of the last minute. Returns the honest levels at the end,
    what they delivered, and site a's view."""
    rules = SiteSettings(max_charge_w=4000, max_discharge_w=4000)
    registry = PeerPolicy(registered={"a": 10.0, "b": 10.0, "liar": 10.0})
    views = {site: FleetView(site, rules, registry, day_of=lambda t: 0) for site in ("a", "b")}
    stored = {"a": 8.0, "b": 7.0}
    delivered, liar_took = 0.0, 0.0
    for minute in range(int(hours * 60)):
        now = NOW + 60 * minute
        states = {site: PeerState(site, 10 * kwh, kwh, 10.0, 0.0, 0.0, 0.0, now) for site, kwh in stored.items()}
        states["liar"] = PeerState("liar", 0.0, 0.0, 10.0, 0.0, liar_took, liar_took, now)
        for site, view in views.items():
            for other, state in states.items():
                if other != site:
                    view.receive(other, state.to_wire(), now)
        for site, view in views.items():
            target, _ = view.step(states[site], now)
            power = max(-4000.0, min(4000.0, target.battery_w))
            stored[site] = max(0.0, min(10.0, stored[site] + power / 60_000))
            delivered += max(0.0, -target.transfer_w) / 60_000
        liar_took = max(0.0, views["a"]._transfers.get("liar", 0.0)) if liar_load else 0.0
    return {site: 10 * kwh for site, kwh in stored.items()}, delivered, views["a"]


def test_a_peer_that_always_claims_empty_does_not_drain_the_fleet() -> None:
    """Before: in 6 hours the honest sites went 80 -> 10 % and 70 -> 10 %, 13 kWh into the liar."""
    levels, delivered, view = _night(liar_load=False)
    assert delivered <= ADD_UP_SLACK / 100 * 10 / ADD_UP_SHARE + 0.1  # refused once its claims do not add up
    assert levels["a"] > 65 and levels["b"] > 60  # and the two balance between themselves
    assert abs(levels["a"] - levels["b"]) < 5
    assert "its claims do not add up" in view.ignored["liar"] and "liar" not in view.peers


def test_what_one_peer_draws_in_a_day_is_bounded() -> None:
    """A liar whose claims add up (it says a load takes what it is sent) draws no more than the day's bound."""
    levels, delivered, view = _night(liar_load=True)
    bound = SiteSettings().daily_draw_percent / 100 * 10
    assert delivered <= bound + 0.1
    assert "liar" in view.capped(NOW + 6 * 3600) and "liar" not in view.ignored
    target = site_target(view.peers["liar"], view.fleet(view.peers["liar"].timestamp), view.settings,
                         view.capped(NOW))
    assert target.transfer_w == 0 and target.reason == "drew the day's bound from the fleet"


# --- the fleet average ---------------------------------------------------------------------------------

def test_the_average_is_capacity_weighted_from_fresh_peers_only() -> None:
    peers = [peer("a", 20, 5), peer("b", 80, 15), peer("stale", 0, 100, age=301), peer("b", 10, 15, age=50)]
    fleet = fleet_average(peers, NOW, timeout=300)
    assert fleet is not None
    assert [s.site_id for s in fleet.sites] == ["a", "b"]  # the newest state of b, the stale site dropped
    assert fleet.level == pytest.approx((1 + 12) / 20 * 100)
    assert fleet.capacity_kwh == 20
    assert fleet_average([peer("a", 20, age=301)], NOW, 300) is None


# --- targets ---------------------------------------------------------------------------------------------

@given(fleets)
def test_raw_transfers_sum_to_zero(sites: list[PeerState]) -> None:
    fleet = fleet_average(sites, NOW, 60)
    assert fleet is not None
    total = math.fsum(raw_transfer(s, fleet, 5.0) for s in sites)
    scale = sum(abs(raw_transfer(s, fleet, 5.0)) for s in sites) + 1.0
    assert abs(total) <= 1e-9 * scale


@given(fleets, st.floats(0, 10), st.floats(0.1, 50))
def test_transfers_after_deadband_gate_and_pairing_sum_to_zero(sites: list[PeerState], deadband: float,
                                                               gain: float) -> None:
    fleet = fleet_average(sites, NOW, 60)
    assert fleet is not None
    rules = SiteSettings(gain_w_per_percent_kwh=gain, deadband_percent=deadband)
    transfers = fleet_transfers(fleet, rules)
    scale = sum(abs(t) for t in transfers.values()) + 1.0
    assert abs(math.fsum(transfers.values())) <= 1e-9 * scale
    for s in sites:  # nobody imports above the average or delivers below it; pairing only scales down
        wanted = wanted_transfer(s, fleet, rules)
        assert transfers[s.site_id] * (fleet.level - s.fill) >= 0
        assert abs(transfers[s.site_id]) <= abs(wanted) + 1e-9


@given(fleets, st.floats(0, 10))
def test_symmetric_mirror_sites_get_mirror_transfers(sites: list[PeerState], deadband: float) -> None:
    """Mirror every site (level -> 100 - level, surplus -> deficit): every transfer changes sign, no more."""
    mirror = [PeerState(s.site_id, 100 - s.level, s.capacity_kwh - s.stored_kwh, s.capacity_kwh, s.consumption_w,
                        s.production_w, 0.0, s.timestamp) for s in sites]
    rules = SiteSettings(deadband_percent=deadband)
    a, b = fleet_average(sites, NOW, 60), fleet_average(mirror, NOW, 60)
    assert a is not None and b is not None
    ta, tb = fleet_transfers(a, rules), fleet_transfers(b, rules)
    for site in ta:
        assert ta[site] == pytest.approx(-tb[site], abs=1e-6 * (1 + abs(ta[site])))


def test_the_rule_of_the_issue() -> None:
    rules = SiteSettings(deadband_percent=2.0)
    # Below the average and producing less (per kWh) than the fleet: charges from the grid.
    low, high = peer("low", 30, production=0, consumption=300), peer("high", 70, production=0, consumption=100)
    fleet = fleet_average([low, high], NOW, 60)
    assert fleet is not None and fleet.level == 50
    t = fleet_transfers(fleet, rules)
    assert t["low"] == pytest.approx(20.0 * 10 * (20 - 2)) and t["high"] == pytest.approx(-t["low"])
    target = site_target(low, fleet, rules)
    assert target.transfer_w == t["low"] and target.battery_w == pytest.approx(-300 + t["low"])
    assert target.grid_w == pytest.approx(t["low"])
    # Below the average but producing more than the fleet: it catches up by itself, no exchange at all
    # (the site above is coming down by itself: its mirror image).
    sunny = peer("low", 30, production=3000, consumption=0)
    fleet = fleet_average([sunny, high], NOW, 60)
    assert fleet is not None
    assert fleet_transfers(fleet, rules) == {"high": 0.0, "low": 0.0}
    assert site_target(sunny, fleet, rules).battery_w == 3000  # plain self-consumption


def test_deadband_no_transfer_near_the_average_and_continuous_at_its_edge() -> None:
    rules = SiteSettings(deadband_percent=2.0)
    for distance, expected in ((1.9, 0.0), (2.0, 0.0), (2.1, 20.0 * 10 * 0.1)):
        fleet = fleet_average([peer("a", 50 - distance), peer("b", 50 + distance)], NOW, 60)
        assert fleet is not None
        assert fleet_transfers(fleet, rules)["a"] == pytest.approx(expected)


def test_pairing_scales_the_larger_side() -> None:
    # Two sites want to import, one offers delivery, one above the average is draining by itself.
    sites = [peer("a", 20, consumption=1500), peer("b", 30, consumption=1500), peer("c", 90, consumption=0),
             peer("d", 80, consumption=2000)]
    fleet = fleet_average(sites, NOW, 60)
    assert fleet is not None
    rules = SiteSettings(deadband_percent=0)
    wanted = {s.site_id: wanted_transfer(s, fleet, rules) for s in sites}
    assert wanted["d"] == 0 and wanted["c"] < 0 and wanted["a"] > 0 and wanted["b"] > 0
    t = fleet_transfers(fleet, rules)
    assert t["c"] == pytest.approx(wanted["c"])  # the smaller side is served in full
    share = -wanted["c"] / (wanted["a"] + wanted["b"])
    assert t["a"] == pytest.approx(wanted["a"] * share) and t["b"] == pytest.approx(wanted["b"] * share)


def test_site_limits_clip_the_transfer() -> None:
    low, high = peer("low", 10, 40, production=0, consumption=0), peer("high", 90, 40)
    fleet = fleet_average([low, high], NOW, 60)
    assert fleet is not None
    raw = fleet_transfers(fleet, SiteSettings(deadband_percent=0))["low"]
    assert raw == pytest.approx(20 * 40 * 40)  # 32 kW
    assert site_target(low, fleet, SiteSettings(deadband_percent=0, max_charge_w=3000)).battery_w == 3000
    target = site_target(low, fleet, SiteSettings(deadband_percent=0, grid_limit_w=2000))
    assert target.transfer_w == 2000 and target.grid_w == 2000 and "limited" in target.reason
    # The grid connection already carries the load: only the rest is left for the transfer.
    busy = peer("low", 10, 40, production=0, consumption=9000)
    fleet = fleet_average([busy, high], NOW, 60)
    assert fleet is not None
    target = site_target(busy, fleet, SiteSettings(deadband_percent=0, max_discharge_w=5000, grid_limit_w=5750))
    assert target.battery_w == pytest.approx(-5000 + 1750) and target.grid_w == pytest.approx(5750)
    # Full: no import; at the reserve: no delivery.
    full = peer("full", 99.5)
    fleet = fleet_average([full, peer("x", 100, 100)], NOW, 60)
    assert fleet is not None and site_target(full, fleet, SiteSettings(deadband_percent=0)).transfer_w == 0
    empty, other = peer("e", 9), peer("o", 0, 100)
    fleet = fleet_average([empty, other], NOW, 60)
    assert fleet is not None and site_target(empty, fleet, SiteSettings(deadband_percent=0)).transfer_w == 0


@given(fleets, st.floats(0, 20000), st.floats(0, 20000), st.floats(100, 20000))
@settings(max_examples=200)
def test_targets_stay_within_the_sites_limits(sites: list[PeerState], charge: float, discharge: float,
                                              grid: float) -> None:
    rules = SiteSettings(max_charge_w=charge, max_discharge_w=discharge, grid_limit_w=grid)
    fleet = fleet_average(sites, NOW, 60)
    for s in sites:
        t = site_target(s, fleet, rules)
        assert -discharge - 1e-6 <= t.battery_w <= charge + 1e-6
        assert t.grid_w == pytest.approx(s.consumption_w - s.production_w + t.battery_w, abs=1e-6)
        if t.transfer_w:  # a transfer never pushes the meter beyond the connection
            assert abs(t.grid_w) <= grid + 1e-6


def test_alone_or_without_a_fleet_the_site_does_self_consumption() -> None:
    own = peer("a", 50, production=4000, consumption=1000)
    rules = SiteSettings(max_charge_w=2500)
    for fleet in (None, fleet_average([own], NOW, 60), fleet_average([peer("b", 10)], NOW, 60)):
        t = site_target(own, fleet, rules)
        assert (t.battery_w, t.transfer_w, t.grid_w) == (2500, 0, -500)


# --- curtailment ---------------------------------------------------------------------------------------

def test_curtailment_stops_at_full_and_runs_again_as_soon_as_the_battery_is_used() -> None:
    c = Curtailment(full_percent=99, release_percent=97, discharge_release_w=100, min_hold_s=300)
    assert not c.update(98.9, 2000, 0)
    assert c.update(99.0, 2000, 10)  # full: stop production
    assert c.update(98.0, 0, 20)  # between the two levels and not used: stays stopped
    assert c.update(98.0, -50, 30)  # a trickle within the threshold: stays stopped
    assert not c.update(98.5, -800, 40)  # used: production at once (30 s after it stopped, not 300)
    assert not c.update(99.2, 500, 60)  # full again, but production just restarted: it runs for the hold
    assert not c.update(99.2, 500, 339)
    assert c.update(99.2, 500, 340)  # the hold is over: stop
    assert not c.update(96.9, 0, 341)  # below the release level: at once
    assert not c.update(99.5, -500, 700)  # full but in use: production runs
    with pytest.raises(ValueError):
        Curtailment(full_percent=97, release_percent=97)


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(-5000, 5000)), max_size=200))
def test_curtailment_runs_when_used_and_stops_no_sooner_than_the_hold(steps: list[tuple[float, float]]) -> None:
    c = Curtailment(99, 97, 100, 300)
    started: float | None = None  # when production last started again
    for i, (level, power) in enumerate(steps):
        now, was = i * 60.0, c.curtailed
        curtailed = c.update(level, power, now)
        if level < 97 or power < -100:
            assert not curtailed  # used, or below the release level: production runs, whatever the hold
        if curtailed and not was:
            assert level >= 99 and (started is None or now - started >= 300)
        if not curtailed and level >= 99 and power >= -100:  # full and unused: it runs only during the hold
            assert started is not None and now - started < 300
        if was and not curtailed:
            started = now


# --- the ledger ------------------------------------------------------------------------------------------

def test_ledger_balances_and_exports_csv() -> None:
    ledger = Ledger()
    # An hour importing 1 kW for the fleet while the house uses 500 W from the sun.
    ledger.record("a", 3600, production_w=500, load_w=500, battery_w=1000, grid_w=1000, transfer_w=1000)
    # An hour delivering 2 kW for the others, the house drawing 300 W.
    ledger.record("b", 3600, production_w=0, load_w=300, battery_w=-2300, grid_w=-2000, transfer_w=-2000)
    # A commanded transfer the meter does not show (the surplus exported anyway) is not a transfer import.
    ledger.record("a", 1800, production_w=3000, load_w=0, battery_w=2000, grid_w=-1000, transfer_w=500)
    a, b = ledger.accounts["a"], ledger.accounts["b"]
    assert (a.transfer_import, a.transfer_export, a.grid_import, a.grid_export) == (1.0, 0.0, 1.0, 0.5)
    assert (b.transfer_export, b.net_transfer) == (2.0, 2.0)
    assert a.balance_error == pytest.approx(0) and b.balance_error == pytest.approx(0)
    assert a.use == pytest.approx(a.production + a.grid_import - a.grid_export)  # V = P + L - T
    total = ledger.totals()
    assert total.transfer_export == 2.0 and total.load == pytest.approx(0.8)
    out = io.StringIO()
    ledger.write_csv(out)
    lines = out.getvalue().splitlines()
    assert lines[0].split(",") == list(Ledger.FIELDS)
    assert lines[1].startswith("a,2.0000,0.5000,2.0000,2.5000,1.0000,0.5000,1.0000,0.0000,-1.0000,")
    assert len(lines) == 3


def test_publish_on_change() -> None:
    gate = PublishGate(level_step=1.0, power_step=200.0)
    first = peer("a", 50, production=1000)
    assert gate.changed(first)
    gate.last = first
    assert not gate.changed(peer("a", 50.5, production=1100))
    assert gate.changed(peer("a", 51.0, production=1100))
    assert gate.changed(peer("a", 50, production=1250))


# --- settings ------------------------------------------------------------------------------------------

def test_settings_defaults_and_clear_messages() -> None:
    s = parse_coop({"enabled": True, "siteId": "rivendell", "broker": {"host": "mqtt.coop.example"}})
    assert s.broker is not None and s.broker.tls and s.broker.port == 8883 and s.username == "rivendell"
    assert s.site_settings().full_percent == 99.0 and s.site_settings().daily_draw_percent == 100.0
    assert not parse_coop({}).enabled
    assert s.peer_policy().registered is None and s.peer_policy().max_capacity_kwh == 100.0
    listed = parse_coop({"siteId": "a", "peers": {"a": {"capacityKwh": 10}, "b": {"capacityKwh": 13.5}}})
    assert listed.peer_policy().registered == {"a": 10.0, "b": 13.5}
    cases = [
        ({"enabled": True}, "siteId is required"),
        ({"enabled": True, "siteId": "a"}, "broker is required"),
        ({"siteId": "a b"}, "siteId: String should match pattern"),
        ({"siteID": "a"}, "siteID: unknown key"),
        ({"siteId": "a", "broker": {"host": "h", "username": "b"}}, "must equal siteId"),
        ({"publishSeconds": 60, "peerTimeoutSeconds": 100}, "more than twice publishSeconds"),
        ({"curtail": {"fullPercent": 95, "releasePercent": 96}}, "releasePercent (96.0) must be below"),
        ({"curtail": {"adapter": "dbus"}}, "needs service and path"),
        ({"topicPrefix": "coop/#"}, "topicPrefix"),
        ({"peers": {"a b": {"capacityKwh": 10}}}, "peers.\"a b\": String should match pattern"),
        ({"peers": {"a": {"capacityKwh": 5000}}}, "peers.a.capacityKwh"),
        ({"siteId": "c", "peers": {"a": {"capacityKwh": 10}}}, "siteId 'c' is not in peers"),
        ({"maxPeerCapacityKwh": 0}, "maxPeerCapacityKwh"),
        ({"maxDailyDrawPercent": 0}, "maxDailyDrawPercent"),
    ]
    for data, message in cases:
        with pytest.raises(CoopSettingsError) as err:
            parse_coop(data)
        assert message in str(err.value), str(err.value)
