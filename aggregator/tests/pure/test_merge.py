"""Pure tests of the merge rules (aggregator/merge.py) and of the value check before it (sanitize.py)."""
from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator.battery.merge import (IDENTITY_PATHS, LIMIT_PATHS, MODULES_OFFLINE, MODULES_ONLINE, RULES, Merge,
                                      MergeOptions, first_valid)
from aggregator.battery.sanitize import NUMERIC_BOUNDS, check_value, check_values


def merged(*members: dict[str, Any], capacity: float | None = None) -> dict[str, Any]:
    """All aggregate paths for members given as value dicts (labelled A, B, C...)."""
    merge = Merge(MergeOptions(capacity=capacity))
    for i, values in enumerate(members):
        merge.set_member(f"com.victronenergy.battery.m{i}", chr(ord("A") + i), values)
    return merge.compute_all()


# ---- SoC / SoH ----------------------------------------------------------------------------------------

def test_soc_is_weighted_by_capacity_not_a_plain_mean():
    out = merged({"/Soc": 60.0, "/InstalledCapacity": 280.0}, {"/Soc": 70.0, "/InstalledCapacity": 100.0})
    assert out["/Soc"] == pytest.approx(62.6316, abs=1e-3)
    assert out["/Soc"] != pytest.approx(65.0)


def test_soh_is_weighted_like_soc():
    out = merged({"/Soh": 90.0, "/InstalledCapacity": 300.0}, {"/Soh": 100.0, "/InstalledCapacity": 100.0})
    assert out["/Soh"] == pytest.approx(92.5)


def test_equal_weights_when_no_member_has_a_capacity():
    assert merged({"/Soc": 60.0}, {"/Soc": 70.0}, {"/Soc": 80.0})["/Soc"] == pytest.approx(70.0)
    # the config `capacity` is the bank's, not a per-member weight
    assert merged({"/Soc": 60.0}, {"/Soc": 70.0}, capacity=400)["/Soc"] == pytest.approx(65.0)


def test_members_without_capacity_are_left_out_when_others_have_one():
    out = merged({"/Soc": 60.0, "/InstalledCapacity": 280.0}, {"/Soc": 70.0, "/InstalledCapacity": 100.0},
                 {"/Soc": 5.0})
    assert out["/Soc"] == pytest.approx(62.6316, abs=1e-3)


def test_soc_ignores_members_without_soc_and_is_none_without_any():
    out = merged({"/Soc": 50.0, "/InstalledCapacity": 100.0}, {"/InstalledCapacity": 300.0})
    assert out["/Soc"] == pytest.approx(50.0)
    assert merged({"/InstalledCapacity": 100.0})["/Soc"] is None


# ---- TimeToGo -------------------------------------------------------------------------------------------

def test_time_to_go_from_remaining_capacity_and_discharge_current():
    out = merged({"/Capacity": 100.0, "/Dc/0/Current": -30.0}, {"/Capacity": 50.0, "/Dc/0/Current": -20.0})
    assert out["/TimeToGo"] == pytest.approx(150 / 50 * 3600)


def test_time_to_go_falls_back_to_soc_times_installed_capacity():
    out = merged({"/Soc": 50.0, "/InstalledCapacity": 200.0, "/Dc/0/Current": -25.0},
                 {"/Capacity": 60.0, "/Dc/0/Current": -5.0})
    assert out["/TimeToGo"] == pytest.approx((100 + 60) / 30 * 3600)


def test_time_to_go_with_only_soc_uses_the_configured_capacity():
    merge = Merge(MergeOptions(capacity=200.0))
    merge.set_member("a", "A", {"/Soc": 40.0, "/Dc/0/Current": -10.0})
    merge.set_member("b", "B", {"/Soc": 60.0, "/Dc/0/Current": -10.0})
    # 50% of 200 Ah at 20 A: 5 h.
    assert merge.compute()["/TimeToGo"] == 5 * 3600
    assert Merge().compute_all()["/TimeToGo"] is None


@pytest.mark.parametrize("current", [10.0, 0.0, -0.49, 0.3])
def test_time_to_go_invalid_when_charging_or_idle(current):
    assert merged({"/Capacity": 100.0, "/Dc/0/Current": current})["/TimeToGo"] is None


def test_time_to_go_at_the_idle_threshold_and_without_data():
    assert merged({"/Capacity": 100.0, "/Dc/0/Current": -0.5})["/TimeToGo"] == pytest.approx(720000)
    assert merged({"/Dc/0/Current": -10.0})["/TimeToGo"] is None
    assert merged({"/Capacity": 100.0})["/TimeToGo"] is None


def test_time_to_go_is_not_a_mean_of_members_time_to_go():
    out = merged({"/Capacity": 100.0, "/Dc/0/Current": -10.0, "/TimeToGo": 1.0},
                 {"/Capacity": 100.0, "/Dc/0/Current": -10.0, "/TimeToGo": 1.0})
    assert out["/TimeToGo"] == pytest.approx(36000)


# ---- the rule families ----------------------------------------------------------------------------------

SUM_PATHS = ["/Dc/0/Current", "/Dc/0/Power", "/Capacity", "/ConsumedAmphours", "/InstalledCapacity",
             "/History/ChargedEnergy", "/History/DischargedEnergy", "/History/TotalAhDrawn",
             "/System/NrOfModulesOnline", "/System/NrOfModulesOffline", "/System/NrOfModulesBlockingCharge",
             "/System/NrOfModulesBlockingDischarge"]


@pytest.mark.parametrize("path", SUM_PATHS)
def test_sum_rules(path):
    assert merged({path: 3}, {path: 4}, {})[path] == 7
    assert merged({}, {})[path] is None


def test_modules_of_a_member_that_is_not_online_are_offline():
    merge = Merge()
    for name in ("a", "b", "c"):
        merge.set_member(name, name.upper(), {MODULES_ONLINE: 2, MODULES_OFFLINE: 0})
    merge.set_member("d", "D", {MODULES_ONLINE: 1, MODULES_OFFLINE: 1})
    merge.set_member("e", "E", {})  # publishes no counts: it adds to neither
    out = merge.compute_all()
    assert (out[MODULES_ONLINE], out[MODULES_OFFLINE]) == (7, 1)
    merge.set_offline(frozenset({"c", "d", "e"}))
    out = merge.compute()
    # Its last online count is not summed: online + offline stays the bank's 8 modules.
    assert (out[MODULES_ONLINE], out[MODULES_OFFLINE]) == (4, 4)
    merge.set_offline(frozenset({"a", "b", "c", "d"}))
    assert (merge.compute_path(MODULES_ONLINE), merge.compute_path(MODULES_OFFLINE)) == (0, 8)
    merge.set_offline(frozenset())
    assert (merge.compute_path(MODULES_ONLINE), merge.compute_path(MODULES_OFFLINE)) == (7, 1)
    assert merged({}, {})[MODULES_ONLINE] is None  # no counts at all: invalid, never 0


def test_charge_cycles_are_weighted_by_capacity():
    out = merged({"/History/ChargeCycles": 100, "/InstalledCapacity": 100.0},
                 {"/History/ChargeCycles": 300, "/InstalledCapacity": 300.0}, {"/InstalledCapacity": 50.0})
    assert out["/History/ChargeCycles"] == 250.0


def test_sources_never_give_the_aggregate_their_identity():
    merge = Merge()
    merge.set_member("a", "A", {"/Soc": 50.0})
    merge.set_source("auxiliary", "aux", None, {"/Dc/0/Temperature": 20.0, "/Serial": "AUX-1", "/DeviceInstance": 9,
                                                "/CustomName": "Aux", "/ProductName": "Shunt"})
    merge.set_source("primary", "pri", ["/Soc", "/Serial"], {"/Soc": 40.0, "/Serial": "PRI-1"})
    out = merge.compute_all()
    assert out["/Dc/0/Temperature"] == 20.0 and out["/Soc"] == 40.0
    assert IDENTITY_PATHS.isdisjoint(out) and IDENTITY_PATHS.isdisjoint(merge.paths)
    merge.update_member("a", {"/CustomName": "Pack A"})
    merge.update_source("aux", {"/CustomName": "Renamed", "/Dc/0/Temperature": 21.0})
    assert merge.compute() == {"/Dc/0/Temperature": 21.0}


def test_installed_capacity_config_overrides_members():
    assert merged({"/InstalledCapacity": 100.0}, {"/InstalledCapacity": 100.0}, capacity=560)[
        "/InstalledCapacity"] == 560
    assert merged({}, capacity=560)["/InstalledCapacity"] == 560


def test_voltage_mean_temperature_max():
    out = merged({"/Dc/0/Voltage": 52.0, "/Dc/0/Temperature": 20.0},
                 {"/Dc/0/Voltage": 53.0, "/Dc/0/Temperature": 31.0}, {"/Dc/0/Voltage": None})
    assert out["/Dc/0/Voltage"] == pytest.approx(52.5)
    assert out["/Dc/0/Temperature"] == 31.0


def test_cell_extremes_with_member_label_and_cell_id():
    out = merged({"/System/MinCellVoltage": 3.30, "/System/MinVoltageCellId": "C3",
                  "/System/MaxCellVoltage": 3.40, "/System/MaxVoltageCellId": "C7",
                  "/System/MaxCellTemperature": 25.0, "/System/MaxTemperatureCellId": "T1"},
                 {"/System/MinCellVoltage": 3.28, "/System/MinVoltageCellId": "C12",
                  "/System/MaxCellVoltage": 3.35,
                  "/System/MinCellTemperature": 10.0})
    assert out["/System/MinCellVoltage"] == 3.28 and out["/System/MinVoltageCellId"] == "B C12"
    assert out["/System/MaxCellVoltage"] == 3.40 and out["/System/MaxVoltageCellId"] == "A C7"
    assert out["/System/MaxTemperatureCellId"] == "A T1"
    assert out["/System/MinCellTemperature"] == 10.0 and out["/System/MinTemperatureCellId"] == "B"
    assert merged({})["/System/MinVoltageCellId"] is None


def test_alarms_take_the_worst():
    out = merged({"/Alarms/LowVoltage": 0, "/Alarms/HighTemperature": 1}, {"/Alarms/LowVoltage": 2})
    assert out["/Alarms/LowVoltage"] == 2 and out["/Alarms/HighTemperature"] == 1
    assert out["/Alarms/CellImbalance"] is None


@pytest.mark.parametrize("flag", ["/Io/AllowToCharge", "/Io/AllowToDischarge"])
def test_allow_flags(flag):
    assert merged({flag: 0}, {flag: 1})[flag] == 1  # one BMS opening its FETs does not stop the bank
    assert merged({flag: 0}, {flag: 0}, {})[flag] == 0
    assert merged({}, {})[flag] is None


@pytest.mark.parametrize("modes,expected", [
    (["Float", "float"], "Float"),
    (["Float", "Bulk"], "Float Transition"),
    (["Absorption", "ABSORPTION"], "Absorption"),
    (["Absorption", "Bulk"], "Absorption Transition"),
    (["Bulk", "Bulk (balancing)"], "Bulk"),
    (["Bulk", "Custom"], "Bulk Transition"),
    (["Custom", "Other"], "Charging"),
    ([None, None], None),
    (["", None], None),
])
def test_charge_mode(modes, expected):
    assert merged(*({"/Info/ChargeMode": m} for m in modes))["/Info/ChargeMode"] == expected


def test_no_member_value_is_invalid_never_zero():
    out = merged({"/Serial": "x"}, {})
    for path, value in out.items():
        assert value is None, path
    assert set(out) >= set(RULES)


# ---- sanitising -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,value", [
    ("/Dc/0/Voltage", math.nan), ("/Dc/0/Current", math.inf), ("/Dc/0/Current", "12.5"),
    ("/InstalledCapacity", -100.0), ("/Soc", 150), ("/Soc", True), ("/Alarms/LowVoltage", 7),
    ("/Info/ChargeMode", 3), ("/Io/AllowToCharge", 2),
])
def test_bad_values_become_none_with_a_reason(path, value):
    good, reason = check_value(path, value)
    assert good is None and reason


def test_values_too_large_to_publish_are_refused_and_the_reason_stays_short():
    for path, value in [("/CustomName", "x" * 400_000), ("/Serial", "s" * 1025), ("/Aggregator/Chain", ["a"] * 300),
                        ("/Anything", {"k": "v" * 2000})]:
        good, reason = check_value(path, value)
        assert good is None and "too large" in reason and len(reason) < 100, (path, reason)
    assert check_value("/CustomName", "x" * 1024) == ("x" * 1024, None)
    good, reason = check_value("/Soc", ["a" * 500] * 10)
    assert good is None and len(reason) < 100  # a long wrong value is not copied into the log


def test_check_values_keeps_good_values_and_reports_bad_ones():
    clean, refused = check_values({"/Soc": 55.5, "/Dc/0/Voltage": math.nan, "/Capacity": None, "/Custom": "x"})
    assert clean == {"/Soc": 55.5, "/Dc/0/Voltage": None, "/Capacity": None, "/Custom": "x"}
    assert set(refused) == {"/Dc/0/Voltage"}
    out = merged(check_values({"/Dc/0/Voltage": math.nan, "/Soc": 150})[0], {"/Dc/0/Voltage": 52.0, "/Soc": 40})
    assert out["/Dc/0/Voltage"] == 52.0 and out["/Soc"] == 40


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["/Soc", "/Dc/0/Voltage", "/Dc/0/Current", "/Io/AllowToCharge",
                                        "/Alarms/LowVoltage", "/Serial", "/Custom", "/System/MinCellVoltage"]),
                       st.one_of(st.floats(), st.integers(-20000, 20000), st.booleans(), st.none(),
                                 st.text(max_size=3)),
                       max_size=8))
def test_check_values_decides_every_path_as_check_value_does(values: dict[str, Any]) -> None:
    clean, refused = check_values(values)
    for path, value in values.items():
        good, reason = check_value(path, value)
        assert clean[path] is good or clean[path] == good, path
        assert refused.get(path) == reason, path


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(NUMERIC_BOUNDS)), st.floats())
def test_a_measurement_is_taken_exactly_when_it_is_finite_and_in_its_range(path: str, value: float) -> None:
    """Floats are most of every update and are decided first: in range kept as they are, else refused."""
    lo, hi = NUMERIC_BOUNDS[path]
    good, reason = check_value(path, value)
    if math.isfinite(value) and lo <= value <= hi:
        assert good is value and reason is None
    else:
        assert good is None and reason


# ---- dirty tracking ------------------------------------------------------------------------------------

def two_member_merge() -> Merge:
    merge = Merge()
    merge.set_member("a", "A", {"/Soc": 50.0, "/Dc/0/Voltage": 52.0, "/InstalledCapacity": 100.0})
    merge.set_member("b", "B", {"/Soc": 70.0, "/Dc/0/Voltage": 53.0, "/InstalledCapacity": 100.0})
    merge.compute()
    return merge


def test_update_recomputes_only_dependent_paths():
    merge = two_member_merge()
    merge.update_member("a", {"/Soc": 60.0})
    out = merge.compute()
    assert out["/Soc"] == pytest.approx(65.0)
    assert "/Dc/0/Voltage" not in out
    assert set(out) == {"/Soc", "/TimeToGo"}
    assert merge.compute() == {}  # dirty set cleared


def test_installed_capacity_change_recomputes_the_weighted_paths():
    merge = two_member_merge()
    merge.update_member("b", {"/InstalledCapacity": 300.0})
    out = merge.compute()
    assert {"/Soc", "/Soh", "/InstalledCapacity", "/TimeToGo"} <= set(out)
    assert "/Dc/0/Voltage" not in out and "/Dc/0/Current" not in out
    assert out["/Soc"] == pytest.approx(65.0)


def test_update_of_unknown_member_or_unused_path_dirties_nothing():
    merge = two_member_merge()
    merge.update_member("nobody", {"/Soc": 1.0})
    merge.update_member("a", {"/Some/Other/Path": 1})
    assert merge.compute() == {}


def test_member_removal_recomputes():
    merge = two_member_merge()
    merge.remove_member("b")
    out = merge.compute()
    assert out["/Soc"] == 50.0 and out["/Dc/0/Voltage"] == 52.0


# ---- primary and auxiliary sources --------------------------------------------------------------------

def test_auxiliary_fills_only_paths_the_members_leave_empty():
    merge = two_member_merge()
    merge.set_source("auxiliary", "aux", None, {"/Soc": 1.0, "/Info/Location": "shed", "/Dc/0/Temperature": 20})
    out = merge.compute_all()
    assert out["/Soc"] == pytest.approx(60.0)
    assert out["/Info/Location"] == "shed"
    assert out["/Dc/0/Temperature"] == 20


def test_primary_wins_over_the_merge_for_its_paths():
    merge = two_member_merge()
    merge.set_source("primary", "shunt", ["/Soc"], {"/Soc": 42.0, "/Dc/0/Voltage": 1.0})
    out = merge.compute()
    assert out["/Soc"] == 42.0
    assert merge.compute_path("/Dc/0/Voltage") == pytest.approx(52.5)  # not listed: the merge
    merge.update_source("shunt", {"/Soc": None})  # no valid value: back to the merge
    assert merge.compute()["/Soc"] == pytest.approx(60.0)


def test_sources_never_set_the_limit_paths():
    merge = Merge()
    merge.set_member("a", "A", {"/Info/MaxChargeCurrent": 100.0, "/Io/AllowToCharge": 1})
    limits = {"/Info/MaxChargeCurrent": 5.0, "/Info/MaxDischargeCurrent": 6.0, "/Info/MaxChargeVoltage": 7.0}
    merge.set_source("primary", "p", None, limits)
    merge.set_source("auxiliary", "x", None, limits)
    out = merge.compute_all()
    # The limits module computes these from the members alone; the merge leaves them to it.
    assert all(out.get(path) is None for path in limits)
    assert LIMIT_PATHS == set(limits)


def test_several_primaries_follow_config_order():
    merge = two_member_merge()
    merge.set_source("primary", "late", None, {"/Soc": 11.0})
    merge.set_source("primary", "first", None, {"/Soc": 22.0})
    assert merge.compute_all()["/Soc"] == 11.0  # bus order until ordered
    merge.order_sources("primary", ["first", "late"])
    assert merge.compute_all()["/Soc"] == 22.0
    merge.set_source("primary", "first", None, None)  # forgotten
    assert merge.compute()["/Soc"] == 11.0


def test_source_update_marks_only_its_paths():
    merge = two_member_merge()
    merge.set_source("primary", "shunt", ["/Soc"], {"/Soc": 42.0})
    merge.compute()
    merge.update_source("shunt", {"/Soc": 43.0, "/Dc/0/Voltage": 1.0})
    assert merge.compute() == {"/Soc": 43.0}


def test_first_valid_for_virtual_batteries():
    members = [({"/Soc": None, "/Dc/0/Voltage": 1.0}, frozenset({"/Dc/0/Voltage"})), ({"/Soc": 50}, None)]
    assert first_valid(members, "/Soc") == 50
    assert first_valid(members, "/Dc/0/Voltage") == 1.0
    assert first_valid(members, "/Capacity") is None


# ---- properties ---------------------------------------------------------------------------------------------

capacities = st.one_of(st.none(), st.floats(0.1, 2000, allow_nan=False))
socs = st.floats(0, 100, allow_nan=False)


@st.composite
def member(draw: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"/Soc": draw(socs), "/InstalledCapacity": draw(capacities)}
    for path in ("/Dc/0/Current", "/Capacity", "/Info/MaxChargeCurrent", "/Dc/0/Voltage"):
        values[path] = draw(st.one_of(st.none(), st.floats(0, 1000, allow_nan=False)))
    values["/Dc/0/Current"] = draw(st.one_of(st.none(), st.floats(-500, 500, allow_nan=False)))
    values["/Io/AllowToCharge"] = draw(st.sampled_from([None, 0, 1]))
    values["/Info/ChargeMode"] = draw(st.sampled_from([None, "Bulk", "Absorption", "Float", "Other"]))
    values["/System/MinCellVoltage"] = draw(st.one_of(st.none(), st.floats(2.5, 3.65)))
    return values


members_st = st.lists(member(), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(members_st)
@example([{"/Soc": 22.4375, "/InstalledCapacity": 0.1}])
@example([{"/Soc": 0.1, "/InstalledCapacity": None}] * 3)
@example([{"/Soc": 100.0, "/InstalledCapacity": c} for c in (0.1, 0.2, 0.7)])
def test_soc_within_member_range(members):
    soc = merged(*members)["/Soc"]
    values = [m["/Soc"] for m in members]
    assert min(values) <= soc <= max(values)
    assert check_value("/Soc", soc) == (soc, None)  # an aggregate of aggregates accepts it


@settings(max_examples=200, deadline=None)
@given(members_st)
def test_sum_rules_equal_the_sum(members):
    out = merged(*members)
    for path in ("/Dc/0/Current", "/Capacity"):
        values = [m[path] for m in members if m[path] is not None]
        assert (out[path] is None) if not values else out[path] == pytest.approx(sum(values))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_merge_is_invariant_to_member_order(data):
    members = data.draw(members_st)
    order = data.draw(st.permutations(range(len(members))))
    a = merged(*members)
    b = merged(*(members[i] for i in order))
    for path in RULES:
        if path.endswith("CellId"):
            continue
        if isinstance(a[path], float):
            assert b[path] == pytest.approx(a[path], rel=1e-9, abs=1e-9), path
        else:
            assert b[path] == a[path], path


# The merge computes column rules from per-path columns kept up to date on every update; each rule's
# `compute` over all members stays the definition. Any sequence of joins, updates and departures must give
# exactly what the definition gives (same order of summing, same winner among equal cells).
column_value = st.one_of(st.none(), st.sampled_from([0, 1, 2, True, "x"]), st.floats(-100, 400, allow_nan=False))
column_paths = sorted({p for rule in RULES.values() if rule.column is not None for p in rule.inputs}
                      | {"/System/MinVoltageCellId", "/System/MaxVoltageCellId"})
operation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 4), st.dictionaries(st.sampled_from(column_paths), column_value)),
    st.tuples(st.just("update"), st.integers(0, 4), st.dictionaries(st.sampled_from(column_paths), column_value)),
    st.tuples(st.just("remove"), st.integers(0, 4), st.just({})),
    st.tuples(st.just("count"), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("offline"), st.integers(0, 4), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=25), st.sampled_from([None, 500.0]))
# An earlier member gains a value after a later one: equal cells must still name the earlier member.
@example([("set", 0, {}), ("set", 1, {"/System/MinCellVoltage": 1}), ("update", 0, {"/System/MinCellVoltage": 1})],
         None)
def test_column_rules_equal_their_definition(operations, capacity):
    assert column_paths, "no rule reads a column: the test would check nothing"
    merge = Merge(MergeOptions(capacity=capacity))
    uncounted: set[str] = set()  # duplicates: kept, not merged
    for kind, index, values in operations:
        name = f"com.victronenergy.battery.m{index}"
        if kind == "set":
            merge.set_member(name, chr(ord("A") + index), values)
        elif kind == "update":
            merge.update_member(name, values)
        elif kind == "count":
            merge.set_counted(name, values)
            if name in merge.members:  # only members can be left uncounted
                uncounted = uncounted - {name} | (set() if values else {name})
        elif kind == "offline":
            merge.set_offline(merge.options.offline - {name} | ({name} if values else set()))
        else:
            merge.remove_member(name)
        uncounted &= set(merge.members)
        counted = [m for m in merge.members.values() if m.name not in uncounted]
        for path, rule in RULES.items():
            if rule.column is not None:
                expected = rule.compute(counted, merge.options)
                got = merge.compute_path(path)
                assert got == expected and type(got) is type(expected), (path, got, expected)


def test_an_uncounted_member_keeps_its_values_but_adds_nothing():
    merge = Merge()
    merge.set_member("a", "A", {"/Dc/0/Current": 10.0, "/Soc": 50.0, "/InstalledCapacity": 100.0})
    merge.set_member("a2", "A", {"/Dc/0/Current": 10.0, "/Soc": 50.0, "/InstalledCapacity": 100.0})
    assert merge.compute_all()["/Dc/0/Current"] == 20.0
    merge.set_counted("a2", False)  # the same pack through a second driver
    merge.update_member("a2", {"/Dc/0/Current": 12.0})
    out = merge.compute_all()
    assert out["/Dc/0/Current"] == 10.0 and out["/InstalledCapacity"] == 100.0
    assert merge.members["a2"].values["/Dc/0/Current"] == 12.0
    merge.set_counted("a2", True)
    assert merge.compute_all()["/Dc/0/Current"] == 22.0
