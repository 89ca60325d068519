"""Pure tests of the energy ledger (aggregator/energy.py): counters that misbehave, days, persistence."""
from __future__ import annotations

import json
import math
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.features.energy.core import (DEFAULT_MAX_GAP, HISTORY_DAYS, EnergyLedger, ReportError, average_level,
                                             capacity_weighted_level, energy_csv, split_by_day, total_energy,
                                             trapezoid_split)
from aggregator.battery.identity import Duplicate, find_duplicates, identity_of
from aggregator.features.energy.report import parse_report

UTC = timezone.utc
T0 = datetime(2024, 6, 1, 10, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0


def ledger(kind: str = "total", **options) -> EnergyLedger:
    return EnergyLedger("pack-1", kind, UTC, **options)  # type: ignore[arg-type]


def at(day: int, hour: float, month: int = 6) -> float:
    return datetime(2024, month, day, tzinfo=UTC).timestamp() + hour * HOUR


# ---- identity ---------------------------------------------------------------------------------------------

def test_identity_prefers_serial_then_configured_id_then_service_name():
    assert identity_of("SN123", "garage", "com.victronenergy.battery.ttyUSB0") == "SN123"
    assert identity_of("", "garage", "com.victronenergy.battery.ttyUSB0") == "garage"
    assert identity_of("  ", None, "com.victronenergy.battery.ttyUSB0") == "com.victronenergy.battery.ttyUSB0"
    assert identity_of(None, " shed ", "x") == "shed"


# ---- total counters ---------------------------------------------------------------------------------------

def test_running_totals_count_their_increase_only():
    led = ledger()
    assert led.add(T0, 1000.0, 800.0) == []  # the first sample only anchors: lifetime energy is not ours
    assert led.add(T0 + HOUR, 1002.5, 801.0) == []
    assert led.add(T0 + 2 * HOUR, 1004.0, 803.0) == []
    assert (led.charged_kwh, led.discharged_kwh) == pytest.approx((4.0, 3.0))


def test_a_counter_reset_continues_the_totals_without_a_drop():
    led = ledger()
    led.add(T0, 1000.0, 800.0)
    led.add(T0 + HOUR, 1002.0, 800.0)
    messages = led.add(T0 + 2 * HOUR, 0.5, 800.0)  # BMS reset: 0.5 kWh since the reset
    assert any("went back from 1002 to 0.5" in m for m in messages)
    assert led.charged_kwh == pytest.approx(2.5)
    led.add(T0 + 3 * HOUR, 1.5, 800.0)
    assert led.charged_kwh == pytest.approx(3.5)
    assert led.restarts == 1


def test_a_replaced_pack_with_its_own_lifetime_total_adds_nothing():
    led = ledger()
    led.add(T0, 1000.0, 800.0, voltage=53.0, max_current_a=100)
    led.add(T0 + 60, 1000.1, 800.0, voltage=53.0, max_current_a=100)
    # The new pack says 300 kWh: far more than 100 A could have moved in a minute.
    messages = led.add(T0 + 120, 300.0, 250.0, voltage=53.0, max_current_a=100)
    assert any("replaced pack" in m for m in messages)
    assert led.charged_kwh == pytest.approx(0.1)
    led.add(T0 + 180, 300.05, 250.0, voltage=53.0, max_current_a=100)
    assert led.charged_kwh == pytest.approx(0.15)


def test_absurd_values_are_rejected_and_the_baseline_kept():
    led = ledger()
    led.add(T0, 10.0, 5.0)
    messages = led.add(T0 + 60, 4e12, 5.0)  # 4e15 Wh, as a broken BMS published
    assert messages and "not a plausible value" in messages[0]
    for bad in (math.nan, math.inf, -3.0, "12", True):
        assert led.add(T0 + 61, bad, 5.0)
    led.add(T0 + 120, 10.2, 5.0)
    assert led.charged_kwh == pytest.approx(0.2)


def test_an_impossible_jump_is_rejected_and_the_next_sample_counts_only_real_energy():
    led = ledger()
    led.add(T0, 5.0, 1.0, voltage=52.0, max_current_a=50)
    led.add(T0 + 10, 5.0, 1.0, voltage=52.0, max_current_a=50)
    # 1200 kWh in 10 s at 50 A x 52 V is impossible (a total published after a daily value, say).
    messages = led.add(T0 + 20, 1205.0, 1.0, voltage=52.0, max_current_a=50)
    assert messages and "rejected" in messages[0] and "1200" in messages[0]
    assert led.charged_kwh == 0.0
    led.add(T0 + 20 + HOUR, 1206.0, 1.0, voltage=52.0, max_current_a=50)
    assert led.charged_kwh == pytest.approx(1.0)


def test_a_daily_value_published_instead_of_the_total_for_one_sample_costs_nothing():
    led = ledger()
    led.add(T0, 1200.0, 900.0)
    led.add(T0 + 1, 3.2, 900.0)  # back to a small value for one sample, impossible as a restart
    led.add(T0 + 2, 1200.0, 900.0)  # and back up: an impossible jump, rejected
    led.add(T0 + 2 + HOUR, 1201.0, 900.0)
    assert led.charged_kwh == pytest.approx(1.0)


def test_jitter_backwards_is_not_a_reset_and_is_not_counted_twice():
    led = ledger()
    led.add(T0, 500.0, 0.0)
    assert led.add(T0 + 60, 499.9, 0.0) == []  # rounding of a 0.1 kWh counter
    led.add(T0 + 120, 500.3, 0.0)
    assert led.charged_kwh == pytest.approx(0.3)
    assert led.restarts == 0


def test_a_missing_counter_loses_nothing():
    led = ledger()
    led.add(T0, 10.0, 4.0)
    led.add(T0 + HOUR, None, None)
    led.add(T0 + 2 * HOUR, 12.0, 5.0)
    assert (led.charged_kwh, led.discharged_kwh) == pytest.approx((2.0, 1.0))


def test_the_energy_of_a_long_gap_is_shared_over_the_days_it_spans():
    led = ledger()
    led.add(at(1, 12), 100.0, 0.0)
    led.add(at(3, 12), 148.0, 0.0)  # 48 h later
    assert led.days == {"2024-06-01": [12.0, 0.0], "2024-06-02": [24.0, 0.0], "2024-06-03": [12.0, 0.0]}


# ---- daily counters ---------------------------------------------------------------------------------------

def test_daily_counters_restart_at_midnight_without_losing_or_double_counting():
    led = ledger("daily")
    led.add(at(1, 8), 0.0, 0.5)
    led.add(at(1, 23.9), 12.0, 3.0)
    assert led.add(at(2, 0.1), 0.1, 0.0) == []  # restarted: 0.1 since midnight
    led.add(at(2, 12), 6.0, 1.0)
    assert led.charged_kwh == pytest.approx(12.0 + 0.1 + 5.9)
    assert led.discharged_kwh == pytest.approx(2.5 + 1.0)
    assert led.days["2024-06-02"][0] == pytest.approx(6.0, abs=0.01)


def test_a_daily_counter_that_restarts_late_is_not_counted_twice():
    led = ledger("daily")
    led.add(at(1, 23.95), 12.0, 0.0)
    led.add(at(2, 0.05), 12.0, 0.0)  # our midnight has passed, the BMS's not yet
    led.add(at(2, 0.2), 0.05, 0.0)  # now it restarts
    led.add(at(2, 1), 0.5, 0.0)
    assert led.charged_kwh == pytest.approx(0.5)


def test_a_daily_counter_that_restarts_early_is_not_counted_twice():
    led = ledger("daily")
    led.add(at(1, 23.0), 12.0, 0.0)
    led.add(at(1, 23.8), 0.1, 0.0)  # the BMS's clock is ahead
    led.add(at(2, 0.5), 0.6, 0.0)
    assert led.charged_kwh == pytest.approx(0.6)


def test_a_daily_counter_read_again_after_a_gap_over_midnight_counts_the_new_day():
    led = ledger("daily")
    led.add(at(1, 18), 10.0, 2.0)
    # Down from 18:00 to 14:00 next day: today's counter (11 kWh) is higher than last night's, but it is
    # a new day's value, not a delta.
    assert led.add(at(2, 14), 11.0, 1.0) == []
    assert (led.charged_kwh, led.discharged_kwh) == pytest.approx((11.0, 1.0))
    assert led.days["2024-06-02"] == pytest.approx([11.0, 1.0])


def test_an_impossible_daily_value_after_a_gap_is_rejected():
    led = ledger("daily")
    led.add(at(1, 18), 10.0, 2.0, voltage=50, max_current_a=10)
    messages = led.add(at(2, 2), 900.0, 1.0, voltage=50, max_current_a=10)
    assert any("since midnight" in m for m in messages)
    assert led.charged_kwh == 0.0
    assert led.discharged_kwh == pytest.approx(1.0)


def test_an_unknown_counter_kind_is_refused():
    with pytest.raises(ValueError, match="daily"):
        EnergyLedger("x", "hourly")  # type: ignore[arg-type]


# ---- V x I integration ------------------------------------------------------------------------------------

def test_power_is_integrated_for_members_without_counters():
    led = ledger()
    for i in range(61):
        led.add(T0 + 60 * i, voltage=50.0, current=20.0)  # 1 kW for an hour
    assert led.charged_kwh == pytest.approx(1.0)
    assert led.discharged_kwh == 0.0


def test_a_zero_crossing_splits_charge_and_discharge():
    assert trapezoid_split(1.0, -1.0, 3600) == pytest.approx((0.25, 0.25))
    assert trapezoid_split(-2.0, 2.0, 3600) == pytest.approx((0.5, 0.5))
    assert trapezoid_split(2.0, 0.0, 3600) == pytest.approx((1.0, 0.0))
    led = ledger(max_gap=7200)
    led.add(T0, voltage=50.0, current=40.0)
    led.add(T0 + 3600, voltage=50.0, current=-40.0)
    assert (led.charged_kwh, led.discharged_kwh) == pytest.approx((0.5, 0.5))


def test_a_gap_in_power_samples_is_bridged_without_inventing_energy():
    led = ledger()
    led.add(T0, voltage=50.0, current=20.0)
    led.add(T0 + 60, voltage=50.0, current=20.0)
    led.add(T0 + 60 + DEFAULT_MAX_GAP + 1, voltage=50.0, current=20.0)  # nobody measured in between
    led.add(T0 + 120 + DEFAULT_MAX_GAP + 1, voltage=50.0, current=20.0)
    assert led.charged_kwh == pytest.approx(2 / 60)


def test_implausible_power_is_ignored():
    led = ledger()
    led.add(T0, voltage=50.0, current=10.0)
    assert led.add(T0 + 10, voltage=50.0, current=1e7)
    led.add(T0 + 20, voltage=50.0, current=10.0)
    assert led.charged_kwh == pytest.approx(0.5 * 20 / 3600)


def test_once_a_member_has_counters_power_is_no_longer_integrated():
    led = ledger()
    led.add(T0, None, None, voltage=50.0, current=20.0)
    led.add(T0 + 60, 100.0, 50.0, voltage=50.0, current=20.0)
    led.add(T0 + 120, 100.0, 50.0, voltage=50.0, current=20.0)
    assert led.charged_kwh == 0.0  # counters say nothing moved; the 1 kW is not added on top
    assert led.uses_counters


# ---- days -------------------------------------------------------------------------------------------------

def test_split_by_day_follows_local_days_including_dst():
    amsterdam = ZoneInfo("Europe/Amsterdam")
    t0 = datetime(2024, 3, 30, 12, tzinfo=amsterdam).timestamp()
    t1 = datetime(2024, 4, 1, 12, tzinfo=amsterdam).timestamp()
    parts = split_by_day(t0, t1, 47.0, amsterdam)  # 31 March has 23 hours
    assert parts == [(date(2024, 3, 30), pytest.approx(12.0)), (date(2024, 3, 31), pytest.approx(23.0)),
                     (date(2024, 4, 1), pytest.approx(12.0))]


def test_daily_buckets_are_bounded():
    led = ledger(history_days=30)
    led.add(at(1, 12, month=1), 0.0, 0.0)
    for day in range(2, 32):
        led.add(at(day, 12, month=1), float(day), 0.0)
    for day in range(1, 30):
        led.add(at(day, 12, month=2), 31.0 + day, 0.0)
    assert len(led.days) == 30
    assert min(led.days) == "2024-01-31"
    assert HISTORY_DAYS >= 3 * 365


def test_csv_has_one_row_per_identity_and_day():
    a, b = EnergyLedger("b,2", tz=UTC), EnergyLedger("a1", tz=UTC)
    a.add(at(1, 10), 0.0, 0.0)
    a.add(at(1, 11), 1.25, 0.5)
    b.add(at(2, 10), 5.0, 5.0)
    b.add(at(2, 11), 5.0, 6.0)
    assert energy_csv([a, b]) == ("identity,date,charged_kwh,discharged_kwh\n"
                                  "a1,2024-06-02,0.000,1.000\n"
                                  '"b,2",2024-06-01,1.250,0.500\n')


# ---- persistence ------------------------------------------------------------------------------------------

def test_to_dict_round_trip_through_json_continues_where_it_was():
    led = ledger()
    led.add(T0, 100.0, 50.0)
    led.add(T0 + HOUR, 102.0, 51.0)
    data = json.loads(json.dumps(led.to_dict()))
    again, reason = EnergyLedger.from_dict(data, "pack-1", "total", UTC)
    assert reason is None
    assert (again.charged_kwh, again.discharged_kwh, again.days) == (led.charged_kwh, led.discharged_kwh, led.days)
    again.add(T0 + 2 * HOUR, 103.0, 51.0)  # the anchor survived: only the new kWh counts
    assert again.charged_kwh == pytest.approx(3.0)


@pytest.mark.parametrize("garbage", [
    "nonsense", [1, 2], {"version": 99}, {"version": 1, "kind": "total"},
    {"version": 1, "kind": "total", "charged": -5, "discharged": 0, "anchors": {}, "power": [None, 0]},
    {"version": 1, "kind": "total", "charged": float("nan"), "discharged": 0,
     "anchors": {"charged": [None, None], "discharged": [None, None]}, "power": [None, 0]},
    {"version": 1, "kind": "total", "charged": 1, "discharged": 0,
     "anchors": {"charged": [5, None], "discharged": [None, None]}, "power": [None, 0]},
    {"version": 1, "kind": "total", "charged": 1, "discharged": 0,
     "anchors": {"charged": [None, None], "discharged": [None, None]}, "power": [None, 0], "days": {"x": [1, 2]}},
    {"version": 1, "kind": "daily", "charged": 1, "discharged": 0,
     "anchors": {"charged": [None, None], "discharged": [None, None]}, "power": [None, 0]},
])
def test_garbage_state_gives_a_fresh_ledger_and_a_reason(garbage):
    led, reason = EnergyLedger.from_dict(garbage, "pack-1", "total", UTC)
    assert reason and "pack-1" in reason
    assert (led.charged_kwh, led.discharged_kwh, led.days) == (0.0, 0.0, {})


def test_no_state_is_a_fresh_ledger_without_a_reason():
    assert EnergyLedger.from_dict({}, "p")[1] is None
    assert EnergyLedger.from_dict(None, "p")[1] is None


# ---- the aggregate ----------------------------------------------------------------------------------------

def test_sums_and_levels():
    a, b = EnergyLedger("a", charged_kwh=2.0, discharged_kwh=1.0), EnergyLedger("b", charged_kwh=3.0)
    assert total_energy([a, b]) == (5.0, 1.0)
    pairs = [(60.0, 280.0), (70.0, 100.0), (None, 50.0), (150.0, 10.0)]
    assert average_level(pairs) == pytest.approx(65.0)
    assert capacity_weighted_level(pairs) == pytest.approx((60 * 280 + 70 * 100) / 380)
    assert capacity_weighted_level([(50.0, None), (40.0, -1)]) is None
    assert average_level([]) is None


def test_duplicates_choose_the_first_seen_else_the_lowest_name():
    services = {"com.victronenergy.battery.ttyUSB1": "SN1", "com.victronenergy.battery.can0": "SN1",
                "com.victronenergy.battery.ttyUSB2": "SN2"}
    assert find_duplicates(services) == {
        "SN1": Duplicate("SN1", ("com.victronenergy.battery.can0", "com.victronenergy.battery.ttyUSB1"),
                         "com.victronenergy.battery.can0")}
    seen = {"com.victronenergy.battery.ttyUSB1": 10.0, "com.victronenergy.battery.can0": 20.0}
    assert find_duplicates(services, seen)["SN1"].chosen == "com.victronenergy.battery.ttyUSB1"


# ---- external reports -------------------------------------------------------------------------------------

def test_a_good_report_is_accepted():
    report = parse_report(id="shed.pack:1", charged="12.5", discharged=3, soc=55, capacity=280)
    assert (report.id, report.charged, report.discharged, report.soc, report.capacity) == \
        ("shed.pack:1", 12.5, 3.0, 55.0, 280.0)
    assert parse_report(id="x", charged=0, discharged=0, soc=100).capacity is None


@pytest.mark.parametrize("field,value,expected", [
    ("id", "", "1 to 64 characters"), ("id", "a b", "1 to 64 characters"), ("id", "x" * 65, "1 to 64"),
    ("charged", -1, ">= 0 and < 10000000 kWh"), ("charged", 1e7, "< 10000000"), ("charged", "lots", "not a number"),
    ("discharged", math.nan, "not allowed"), ("soc", 101, "from 0 to 100"), ("soc", -0.1, "out of range"),
    ("capacity", 0, "> 0 and < 1000000 Ah"), ("capacity", 2e6, "< 1000000 Ah"),
])
def test_a_bad_report_names_field_value_and_what_is_allowed(field, value, expected):
    fields = {"id": "pack", "charged": 1.0, "discharged": 1.0, "soc": 50.0, "capacity": 100.0, field: value}
    with pytest.raises(ReportError) as err:
        parse_report(**fields)
    assert len(err.value.messages) == 1
    message = err.value.messages[0]
    assert message.startswith(f"{field}:") and expected in message
    assert "(got " in message


# ---- properties -------------------------------------------------------------------------------------------

counter_values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2e4),
                           st.just(4e12), st.just(0.0))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3 * 86400), counter_values, counter_values,
                          st.one_of(st.none(), st.floats(0, 500))), max_size=40),
       st.sampled_from(["total", "daily"]))
def test_totals_never_decrease_nor_exceed_what_the_limits_allow(samples, kind):
    led = EnergyLedger("p", kind, UTC)  # type: ignore[arg-type]
    now = T0
    budget = 0.0  # the most each direction can have moved: limits' energy over the time, plus slack
    last = (0.0, 0.0)
    for dt, charged, discharged, max_current in samples:
        now += dt
        led.add(now, charged, discharged, max_current_a=max_current)
        budget += 60.0 * 2 * dt / 3600 + 0.2  # at most 60 kW (no limit, or 500 A at 60 V), twice, plus slack
        current = (led.charged_kwh, led.discharged_kwh)
        assert all(math.isfinite(x) for x in current)
        assert current[0] >= last[0] and current[1] >= last[1]
        assert current[0] <= budget and current[1] <= budget
        last = current
    assert sum(day[0] for day in led.days.values()) == pytest.approx(led.charged_kwh)
    assert sum(day[1] for day in led.days.values()) == pytest.approx(led.discharged_kwh)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(1, 3600), st.floats(0, 5), st.booleans()), min_size=1, max_size=60))
def test_a_well_behaved_total_counter_with_resets_is_counted_exactly(steps):
    led = ledger()
    now, counter, true_energy = T0, 100.0, 0.0
    led.add(now, counter, 0.0)
    for dt, energy, reset in steps:
        energy = min(energy, 50.0 * dt / 3600)  # within 50 kW: physically possible
        now += dt
        if reset and counter > energy + 1.0:
            counter = energy  # restarted somewhere in the interval, then counted `energy`
        else:
            counter += energy
        true_energy += energy
        led.add(now, counter, 0.0)
    assert led.charged_kwh == pytest.approx(true_energy, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([None, timezone.utc, ZoneInfo("Europe/Amsterdam"), ZoneInfo("America/Santiago"),
                        ZoneInfo("Australia/Lord_Howe")]),
       st.floats(1_600_000_000, 1_800_000_000),
       st.lists(st.tuples(st.floats(0.1, 7200.0), st.floats(-50.0, 50.0)), min_size=2, max_size=60))
def test_integrated_energy_lands_on_the_days_split_by_day_gives(tz, start, samples) -> None:
    """The ledger works out a sample's local day once per day, not per sample: the days it credits are those
    split_by_day gives for every interval, across midnights and daylight-saving changes."""
    ledger = EnergyLedger("x", tz=tz, max_gap=10_000.0)
    expected: dict[str, list[float]] = {}
    now, last = start, None
    for dt, current in samples:
        now += dt
        ledger.add(now, voltage=52.0, current=current, max_current_a=100.0)
        if last is not None:
            charged, discharged = trapezoid_split(last[1], 52.0 * current / 1000.0, now - last[0])
            for index, energy in ((0, charged), (1, discharged)):
                for day, part in (split_by_day(last[0], now, energy, tz) if energy else []):
                    if part > 0:
                        expected.setdefault(day.isoformat(), [0.0, 0.0])[index] += part
        last = (now, 52.0 * current / 1000.0)
    assert ledger.days.keys() == expected.keys()
    for day, (charged, discharged) in expected.items():
        assert ledger.days[day] == pytest.approx([charged, discharged], rel=1e-9, abs=1e-12)
