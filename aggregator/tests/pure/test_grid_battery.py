"""Pure tests of the grid battery (aggregator/grid_battery.py) and of its settings model."""
from __future__ import annotations

import json
import math
from datetime import date, datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.bus.monitor import WatchedService
from aggregator.features.grid_battery.core import (PROFILE_HEADER, GridBattery, GridBatteryConfig, ProfileSlot,
                                                   history_rows_csv, parse_month_day, profile_csv_line, resolution_of)
from aggregator.features.grid_battery.settings import GridBatterySettingsError, parse_settings
from aggregator.features.grid_battery.runtime import resolve_meter
from aggregator_dev.simulator.grid_meter import HouseholdProfile, MeterModel

UTC = timezone.utc
HOUR = 3600.0


def at(month: int, day: int, hour: float = 12.0, year: int = 2024) -> float:
    return datetime(year, month, day, tzinfo=UTC).timestamp() + hour * HOUR


def battery(capacity: float = 10.0, start: date = date(2024, 1, 1), reset: tuple[int, int] | None = None,
            **options) -> GridBattery:
    return GridBattery(GridBatteryConfig(capacity_kwh=capacity, start_date=start, reset_day=reset, tz=UTC, **options))


def conserved(b: GridBattery) -> float:
    return b.charged_kwh - b.discharged_kwh - b.overflow_kwh + b.beyond_kwh - b.forfeited_kwh


# ---- level -------------------------------------------------------------------------------------------------

def test_export_charges_and_import_discharges():
    b = battery()
    assert b.update(at(6, 1, 10), 100.0, 50.0) == []  # the first sample anchors
    b.update(at(6, 1, 11), 100.5, 54.0)
    assert b.level_kwh == pytest.approx(3.5)
    assert (b.charged_kwh, b.discharged_kwh) == pytest.approx((4.0, 0.5))
    assert b.soc == pytest.approx(35.0)
    assert b.level_ah == pytest.approx(3500 / 51.2)
    assert b.installed_ah == pytest.approx(10000 / 51.2)


def test_a_full_battery_loses_export_and_an_empty_one_imports_beyond():
    b = battery(capacity=10.0)
    b.update(at(6, 1, 8), 0.0, 0.0)
    b.update(at(6, 1, 14), 0.0, 14.0)
    assert b.level_kwh == 10.0 and b.overflow_kwh == pytest.approx(4.0)
    b.update(at(6, 1, 23), 13.0, 14.0)
    assert b.level_kwh == 0.0 and b.beyond_kwh == pytest.approx(3.0)
    assert conserved(b) == pytest.approx(b.level_kwh)


def test_unlimited_capacity_never_overflows_and_has_no_soc():
    b = battery(capacity=0.0)
    b.update(at(6, 1, 8), 0.0, 0.0)
    b.update(at(6, 1, 16), 0.0, 500.0)
    assert b.level_kwh == 500.0 and b.overflow_kwh == 0.0
    assert b.soc is None and b.installed_ah is None


def test_nothing_counts_before_the_start_date():
    b = battery(start=date(2024, 6, 2))
    b.update(at(6, 1, 10), 0.0, 0.0)
    b.update(at(6, 1, 20), 0.0, 5.0)
    assert b.level_kwh == 0.0 and b.charged_kwh == 0.0
    b.update(at(6, 2, 10), 0.0, 7.0)  # of the 2 kWh since the last sample before the start, the part after it
    assert b.level_kwh == pytest.approx(2.0 * 10 / 14)
    assert b.exact and "the meter's counters at 2024-06-01 20:00, before the start date" in b.origin


def test_battery_power_is_zero_when_full_or_empty():
    b = battery(capacity=10.0)
    assert b.battery_power_w(-2000.0) == 2000.0  # exporting charges
    assert b.battery_power_w(1500.0) == 0.0  # empty: import is beyond the battery
    b.level_kwh = 10.0
    assert b.battery_power_w(-2000.0) == 0.0
    assert b.battery_power_w(1500.0) == -1500.0
    assert b.battery_power_w(None) is None and b.battery_power_w(math.nan) is None


# ---- yearly reset ----------------------------------------------------------------------------------------

def test_the_level_returns_to_zero_on_the_reset_day_once_a_year():
    b = battery(capacity=100.0, reset=(7, 1))
    b.update(at(6, 30, 10), 0.0, 0.0)
    b.update(at(6, 30, 14), 0.0, 40.0)
    b.update(at(7, 1, 0.5), 0.0, 40.0)
    assert b.level_kwh == 0.0 and b.forfeited_kwh == pytest.approx(40.0)
    assert b.last_reset == date(2024, 7, 1)
    b.update(at(7, 1, 14), 0.0, 45.0)
    b.update(at(7, 2, 14), 0.0, 50.0)
    assert b.level_kwh == pytest.approx(10.0)  # no second reset in the same year
    b.update(at(7, 5, 14, year=2025), 0.0, 60.0)  # down for a year: the 2025 reset happened in the gap
    assert b.last_reset == date(2025, 7, 1)
    assert conserved(b) == pytest.approx(b.level_kwh)


def test_no_reset_on_or_before_the_start_date():
    b = battery(start=date(2024, 7, 1), reset=(7, 1))
    b.update(at(7, 1, 8), 0.0, 0.0)
    b.update(at(7, 1, 12), 0.0, 5.0)
    assert b.level_kwh == pytest.approx(5.0) and b.last_reset is None


def test_february_29_resets_on_the_28th_in_other_years():
    b = battery(start=date(2023, 1, 1), reset=(2, 29))
    b.update(at(2, 27, 12, year=2023), 0.0, 0.0)
    b.update(at(2, 27, 13, year=2023), 0.0, 3.0)
    b.update(at(2, 28, 1, year=2023), 0.0, 3.0)
    assert b.level_kwh == 0.0 and b.last_reset == date(2023, 2, 28)


@pytest.mark.parametrize("text", ["13-01", "02-30", "1-1", "0101", "ab-cd", "", "12-32"])
def test_bad_reset_dates_name_what_is_allowed(text):
    with pytest.raises(ValueError, match="MM-DD"):
        parse_month_day(text)


# ---- counters that misbehave ---------------------------------------------------------------------------

def test_a_meter_counter_reset_re_anchors_without_moving_the_level():
    b = battery(capacity=100.0)
    b.update(at(6, 1, 10), 1000.0, 2000.0)
    b.update(at(6, 1, 11), 1001.0, 2005.0)
    level = b.level_kwh
    messages = b.update(at(6, 1, 12), 0.0, 0.0)  # meter replaced
    assert len(messages) == 2 and all("level is unchanged" in m for m in messages)
    assert b.level_kwh == level and b.counter_resets == 2
    b.update(at(6, 1, 13), 0.5, 2.0)
    assert b.level_kwh == pytest.approx(level + 1.5)


def test_missing_samples_are_bridged_by_the_counters():
    b = battery(capacity=100.0)
    b.update(at(6, 1, 10), 10.0, 10.0)
    b.update(at(6, 1, 11), None, None)
    b.update(at(6, 1, 12), 10.0, None)
    b.update(at(6, 1, 14), 11.0, 16.0)
    assert b.level_kwh == pytest.approx(5.0)
    assert (b.charged_kwh, b.discharged_kwh) == pytest.approx((6.0, 1.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 1e12, "12", True])
def test_garbage_values_are_ignored(bad):
    b = battery()
    b.update(at(6, 1, 10), 10.0, 10.0)
    messages = b.update(at(6, 1, 11), bad, 11.0)
    assert messages and "not a plausible value" in messages[0]
    b.update(at(6, 1, 12), 10.5, 12.0)
    assert b.level_kwh == pytest.approx(1.5)


def test_an_impossible_jump_is_rejected_and_the_counter_re_anchored():
    b = battery(capacity=0.0, max_power_kw=20.0)
    b.update(at(6, 1, 10), 10.0, 10.0)
    messages = b.update(at(6, 1, 10.01), 10.0, 4010.0)  # 4 MWh in 36 s
    assert messages and "more than 20 kW allows" in messages[0]
    assert b.level_kwh == 0.0
    b.update(at(6, 1, 11), 10.0, 4015.0)
    assert b.level_kwh == pytest.approx(5.0)


def _quantised_export(b: GridBattery, resolution: float, power_kw: float, seconds: int, start: float) -> float:
    """Feed `b` a meter read every second whose export counter moves in `resolution` steps (a real meter
    truncates); returns the export the meter shows at the end."""
    exact = 1234.0
    shown = exact
    for second in range(seconds + 1):
        shown = math.floor(round(exact / resolution, 9)) * resolution
        b.update(start + second, 500.0, round(shown, 3))
        exact += power_kw / 3600.0
    return shown - 1234.0


@pytest.mark.parametrize("resolution", [0.1, 1.0])
def test_a_meter_counting_in_steps_is_counted(resolution):
    """Read every second, a 0.1 kWh step looked like 360 kW on a 100 kW connection: every step was
    rejected and nothing counted. Steps are weighed against the time since the counter last moved."""
    b = battery(capacity=0.0)
    shown = _quantised_export(b, resolution, power_kw=4.0, seconds=2 * 3600, start=at(6, 1, 10))
    assert shown == pytest.approx(8.0, abs=resolution)
    assert b.charged_kwh == pytest.approx(shown, abs=1e-9)
    assert b.level_kwh == pytest.approx(shown, abs=1e-9)


@pytest.mark.parametrize("resolution", [0.1, 1.0])
def test_an_impossible_jump_of_a_counter_in_steps_is_still_rejected(resolution):
    b = battery(capacity=0.0, max_power_kw=20.0)
    b.update(at(6, 1, 10), 500.0, 1000.0)
    b.update(at(6, 1, 10) + 1, 500.0, 1000.0)
    messages = b.update(at(6, 1, 10) + 2, 500.0, 1000.0 + 2 * resolution + 1.0)  # 20 kW moves 0.011 kWh in 2 s
    assert messages and "more than 20 kW allows" in messages[0]
    assert b.charged_kwh == 0.0
    assert b.update(at(6, 1, 10) + 3, 500.0, 1000.0 + 3 * resolution + 1.0) == []  # one step: possible
    assert b.charged_kwh == pytest.approx(resolution)


def test_resolution_of_meter_values():
    assert [resolution_of(v) for v in (12.0, 12.3, 12.34, 12.345, 0.0)] == [1.0, 0.1, 0.01, 0.0, 1.0]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([0.01, 0.1, 1.0]), st.floats(0.5, 60.0), st.integers(1, 5))
def test_quantised_counters_count_everything_they_show(resolution, power_kw, every):
    """Whatever the resolution, the power (within the connection) and the read interval, what is counted is
    what the counter moved by."""
    b = battery(capacity=0.0)
    exact, start = 50.0, at(6, 1, 10)
    first = shown = None
    for second in range(0, 1800, every):
        shown = round(math.floor(round(exact / resolution, 9)) * resolution, 3)
        first = shown if first is None else first
        assert b.update(start + second, 500.0, shown) == []
        exact += power_kw * every / 3600.0
    assert b.charged_kwh == pytest.approx(shown - first, abs=1e-6)


def test_rounding_jitter_backwards_is_not_a_reset():
    b = battery()
    b.update(at(6, 1, 10), 10.0, 10.0)
    assert b.update(at(6, 1, 10.1), 10.0, 9.99) == []
    b.update(at(6, 1, 10.2), 10.0, 10.5)
    assert b.level_kwh == pytest.approx(0.5) and b.counter_resets == 0


# ---- history and persistence ------------------------------------------------------------------------------

def test_daily_history_rows_and_csv():
    b = battery(capacity=10.0)
    b.update(at(6, 1, 6), 0.0, 0.0)
    b.update(at(6, 1, 14), 1.0, 13.0)
    b.update(at(6, 2, 3), 4.0, 13.0)
    rows = b.rows()
    assert [r.day for r in rows] == [date(2024, 6, 1), date(2024, 6, 2)]
    assert (rows[0].level_kwh, rows[0].charged_kwh, rows[0].discharged_kwh, rows[0].overflow_kwh) == \
        pytest.approx((10.0, 13.0, 1.0, 2.0))
    assert (rows[1].level_kwh, rows[1].discharged_kwh) == pytest.approx((7.0, 3.0))
    csv = history_rows_csv(rows, UTC)
    assert csv.splitlines() == [
        "timestamp,level_kwh,charged_kwh,discharged_kwh,overflow_kwh,import_beyond_kwh",
        "2024-06-01T14:00:00+00:00,10.000,13.000,1.000,2.000,0.000",
        "2024-06-02T03:00:00+00:00,7.000,0.000,3.000,0.000,0.000",
    ]


def test_history_is_bounded():
    b = battery(capacity=0.0, history_days=10)
    for day in range(1, 31):
        b.update(at(6, day), 0.0, float(day))
    assert len(b.history) == 10 and min(b.history) == date(2024, 6, 21)


def test_state_round_trip_continues_from_the_anchors():
    b = battery(capacity=50.0, reset=(1, 1))
    b.update(at(6, 1, 10), 5.0, 5.0)
    b.update(at(6, 1, 12), 6.0, 15.0)
    data = json.loads(json.dumps(b.to_dict()))
    again, reason = GridBattery.from_dict(data, b.config)
    assert reason is None
    assert again.to_dict() == b.to_dict()
    again.update(at(6, 1, 20), 6.0, 20.0)  # energy while the service was down is counted once
    assert again.level_kwh == pytest.approx(14.0)
    assert GridBattery.rows_from_dict(data) == b.rows()


@pytest.mark.parametrize("garbage", [
    "x", [1], {"version": 2}, {"version": 1, "startDate": "2024-01-01"},
    {"version": 1, "startDate": "2024-01-01", "level": -1, "charged": 0, "discharged": 0, "overflow": 0,
     "beyond": 0, "forfeited": 0, "import": [None, None], "export": [None, None]},
    {"version": 1, "startDate": "2024-01-01", "level": 1, "charged": 1, "discharged": 0, "overflow": 0,
     "beyond": 0, "forfeited": 0, "import": [3.0, None], "export": [None, None]},
    {"version": 1, "startDate": "2024-01-01", "level": 1, "charged": 1, "discharged": 0, "overflow": 0,
     "beyond": 0, "forfeited": 0, "import": [None, None], "export": [None, None], "history": [["2024-13-01"]]},
])
def test_garbage_state_gives_an_empty_battery_and_a_reason(garbage):
    b, reason = GridBattery.from_dict(garbage, battery().config)
    assert reason and "starting empty" in reason
    assert b.level_kwh == 0.0 and not b.history
    assert GridBattery.rows_from_dict(garbage) == [] or isinstance(garbage, dict)


def test_state_of_another_start_date_is_not_used():
    b = battery()
    b.update(at(6, 1, 10), 0.0, 0.0)
    b.update(at(6, 1, 11), 0.0, 3.0)
    again, reason = GridBattery.from_dict(b.to_dict(), battery(start=date(2024, 5, 1)).config)
    assert reason and "start date" in reason and again.level_kwh == 0.0


def test_a_lowered_capacity_clips_the_saved_level():
    b = battery(capacity=50.0)
    b.update(at(6, 1, 10), 0.0, 0.0)
    b.update(at(6, 1, 16), 0.0, 30.0)
    again, reason = GridBattery.from_dict(b.to_dict(), battery(capacity=20.0).config)
    assert reason is None and again.level_kwh == 20.0
    assert conserved(again) == pytest.approx(again.level_kwh)


# ---- settings ---------------------------------------------------------------------------------------------

def test_settings_defaults_and_meter_references():
    s = parse_settings({"meter": "name:House meter", "startDate": "2024-01-01"})
    assert (s.capacityKwh, s.nominalVoltage, s.resetDate, s.serviceName) == \
        (0.0, 51.2, None, "com.victronenergy.battery.grid")
    assert parse_settings({"meter": "31", "startDate": "2024-01-01"}).meter == 31
    assert parse_settings({"meter": 30, "startDate": "2024-01-01"}).meter == 30
    config = parse_settings({"meter": "com.victronenergy.grid.cgwacs_ttyUSB0", "startDate": "2024-01-01",
                             "resetDate": "04-01", "capacityKwh": 500}).battery_config()
    assert (config.reset_day, config.capacity_kwh, config.start_date) == ((4, 1), 500.0, date(2024, 1, 1))


@pytest.mark.parametrize("data,expected", [
    ({"meter": "com.victronenergy.battery.x", "startDate": "2024-01-01"}, "meter: "),
    ({"meter": "name:", "startDate": "2024-01-01"}, "name:<CustomName or ProductName>"),
    ({"meter": -1, "startDate": "2024-01-01"}, ">= 0"),
    ({"meter": 30, "startDate": "2024-02-30"}, "startDate"),
    ({"meter": 30}, "startDate: Field required"),
    ({"meter": 30, "startDate": "2024-01-01", "resetDate": "13-01"}, "resetDate: '13-01' is not a day"),
    ({"meter": 30, "startDate": "2024-01-01", "capacityKwh": -5}, "capacityKwh"),
    ({"meter": 30, "startDate": "2024-01-01", "nominalVoltage": 0}, "nominalVoltage"),
    ({"meter": 30, "startDate": "2024-01-01", "serviceName": "com.victronenergy.grid.x"}, "serviceName"),
    ({"meter": 30, "startDate": "2024-01-01", "capacity": 5}, "capacity: unknown key"),
])
def test_bad_settings_name_the_key_and_the_value(data, expected):
    with pytest.raises(GridBatterySettingsError) as err:
        parse_settings(data)
    assert expected in str(err.value)


def test_meter_references_resolve_by_name_custom_name_product_name_or_instance():
    grid = "com.victronenergy.grid."
    services = [
        WatchedService(grid + "b", ":1.2", 31, {"/CustomName": "House", "/ProductName": "ET340"}),
        WatchedService(grid + "a", ":1.3", 30, {"/CustomName": "", "/ProductName": "ET340"}),
    ]
    assert resolve_meter(grid + "b", services) is services[0]
    assert resolve_meter("name:House", services) is services[0]
    assert resolve_meter("name:ET340", services) is services[1]  # two match: the lowest name
    assert resolve_meter(30, services) is services[1]
    assert resolve_meter(32, services) is None and resolve_meter("name:Shed", services) is None


# ---- the simulated meter's profile ------------------------------------------------------------------------

def _local(month: int, day: int, hour: float) -> float:
    """Seconds since 1970-01-01 00:00 local (the profile's clock) of a day in 2023 at an hour."""
    return (date(2023, month, day) - date(1970, 1, 1)).days * 86400.0 + hour * HOUR


def test_the_household_exports_at_summer_noon_and_imports_at_night_and_in_winter_evenings():
    profile = HouseholdProfile(noise=0.0)
    assert profile.grid_power_w(_local(6, 21, 13)) < -3000
    assert profile.grid_power_w(_local(6, 21, 2)) == pytest.approx(profile.base_load_w, rel=0.01)
    assert profile.grid_power_w(_local(12, 21, 19)) > 1500
    assert profile.solar_w(13, 172) > profile.solar_w(13, 355) > 0
    noisy = HouseholdProfile(seed=7)
    assert noisy.grid_power_w(_local(3, 1, 9)) == HouseholdProfile(seed=7).grid_power_w(_local(3, 1, 9))
    assert noisy.grid_power_w(_local(3, 1, 9)) != HouseholdProfile(seed=8).grid_power_w(_local(3, 1, 9))


def test_the_meter_model_integrates_a_day_and_resets_its_counters():
    start = datetime(2023, 6, 21, tzinfo=UTC).timestamp()
    one_step, many_steps = MeterModel(HouseholdProfile(), start), MeterModel(HouseholdProfile(), start)
    one_step.advance(86400)
    for _ in range(288):
        many_steps.advance(300)
    assert one_step.reverse_kwh > 15 and one_step.forward_kwh > 5  # summer: more export than import
    assert one_step.reverse_kwh == pytest.approx(many_steps.reverse_kwh, rel=0.01)  # step size barely matters
    assert one_step.sim_time == start + 86400
    one_step.reset_counters()
    assert (one_step.forward_kwh, one_step.reverse_kwh) == (0.0, 0.0)
    assert one_step.values()["/Ac/Power"] == one_step.values()["/Ac/L1/Power"]


# ---- properties -------------------------------------------------------------------------------------------

# One sample: seconds since the last, kWh imported and exported in between, and what happens to the meter.
step = st.tuples(st.floats(1, 3 * 86400), st.floats(0, 50), st.floats(0, 50),
                 st.sampled_from(["ok", "ok", "ok", "reset", "missing", "garbage", "jump"]))


def _run(b: GridBattery, steps: list, check=None) -> None:
    now = at(1, 1, 0)
    forward = reverse = 100.0
    b.update(now, forward, reverse)
    for dt, imported, exported, event in steps:
        now += dt
        before = b.level_kwh
        if event == "reset":
            forward, reverse = 0.0, 0.0  # a new meter
            b.update(now, forward, reverse)
            assert b.level_kwh == before  # counter resets never change the level...
            continue
        forward += imported
        reverse += exported
        if event == "missing":
            b.update(now, None, reverse)
        elif event == "garbage":
            b.update(now, math.nan, 4e15)
        elif event == "jump":
            forward += 1e6
            b.update(now, forward, reverse)
        else:
            b.update(now, forward, reverse)
        if check:
            check(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=60), st.sampled_from([0.0, 5.0, 40.0, 1000.0]),
       st.sampled_from([None, (1, 1), (3, 15), (2, 29)]))
def test_level_in_range_and_energy_conserved(steps, capacity, reset):
    b = battery(capacity=capacity, reset=reset, start=date(2023, 12, 1))

    def check(b: GridBattery) -> None:
        assert b.level_kwh >= 0
        if capacity > 0:
            assert b.level_kwh <= capacity
        assert conserved(b) == pytest.approx(b.level_kwh, abs=1e-6)
        for total in (b.charged_kwh, b.discharged_kwh, b.overflow_kwh, b.beyond_kwh, b.forfeited_kwh):
            assert total >= 0 and math.isfinite(total)

    _run(b, steps, check)
    again, reason = GridBattery.from_dict(json.loads(json.dumps(b.to_dict())), b.config)
    assert reason is None and again.level_kwh == b.level_kwh


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(3600, 86400), st.floats(0, 20), st.floats(0, 20)), max_size=40))
def test_without_limits_the_level_is_export_minus_import(steps):
    b = battery(capacity=0.0)
    now, forward, reverse = at(1, 1, 0), 0.0, 0.0
    b.update(now, forward, reverse)
    level = 0.0
    for dt, imported, exported in steps:
        now += dt
        forward += imported
        reverse += exported
        level = max(0.0, level + exported - imported)
        b.update(now, forward, reverse)
    assert b.level_kwh == pytest.approx(level, abs=1e-6)


# ---- where counting starts, the one-time reset, the load profile ---------------------------------

def test_a_start_today_after_export_says_what_is_not_counted():
    """startDate today with 1.2 kWh already exported: the level started at 0 with status ok."""
    b = battery(capacity=0.0, start=date(2024, 6, 1))
    b.update(at(6, 1, 10), 50.0, 101.2)
    assert b.level_kwh == 0.0 and not b.exact
    assert b.origin == ("the first sample, 2024-06-01 10:00: the energy from 2024-06-01 to then is not counted "
                        "(configure startImportKwh and startExportKwh, or startLevelKwh)")


def test_the_meter_reading_at_the_start_counts_the_energy_before_the_first_sample():
    b = battery(capacity=0.0, start=date(2024, 6, 1), start_reading=(49.5, 100.0))
    b.update(at(6, 1, 10), 50.0, 101.2)
    assert b.level_kwh == pytest.approx(0.7) and b.exact
    assert (b.charged_kwh, b.discharged_kwh) == pytest.approx((1.2, 0.5))
    assert b.origin == "the meter's counters on 2024-06-01 00:00 (startImportKwh 49.5, startExportKwh 100)"
    b.update(at(6, 1, 11), 50.0, 102.0)
    assert b.level_kwh == pytest.approx(1.5)


def test_a_start_date_in_the_past_is_counted_from_the_reading_or_said():
    """A startDate months ago was accepted and ignored: the level started at the first sample, status ok."""
    late = battery(capacity=0.0, start=date(2024, 1, 1))
    late.update(at(6, 1, 10), 3000.0, 4000.0)
    assert not late.exact and "the energy from 2024-01-01 to then is not counted" in late.origin
    known = battery(capacity=0.0, start=date(2024, 1, 1), start_reading=(2500.0, 3000.0), start_level_kwh=12.0)
    known.update(at(6, 1, 10), 3000.0, 4000.0)
    assert known.exact and known.level_kwh == pytest.approx(12.0 + 1000.0 - 500.0)
    assert known.origin.endswith(", level 12 kWh (startLevelKwh)")


def test_a_configured_start_level_is_the_level_at_the_first_sample():
    b = battery(capacity=10.0, start=date(2024, 1, 1), start_level_kwh=4.5)
    b.update(at(6, 1, 10), 3000.0, 4000.0)
    assert b.exact and b.level_kwh == 4.5 and b.origin == "the first sample, 2024-06-01 10:00, level 4.5 kWh " \
        "(startLevelKwh)"
    b.update(at(6, 1, 11), 3000.0, 4001.0)
    assert b.level_kwh == pytest.approx(5.5)
    small = battery(capacity=3.0, start_level_kwh=4.5)
    small.update(at(6, 1, 10), 0.0, 0.0)
    assert small.level_kwh == 3.0


def test_a_first_sample_just_after_midnight_misses_nothing_worth_saying():
    b = battery(start=date(2024, 6, 1))
    b.update(at(6, 1, 0.1), 10.0, 10.0)
    assert b.exact and b.origin == "the first sample, 2024-06-01 00:06"


def test_a_late_start_is_forgotten_at_the_next_reset():
    b = battery(capacity=0.0, start=date(2024, 1, 1), reset=(7, 1))
    b.update(at(6, 1, 10), 0.0, 0.0)
    assert not b.exact
    b.update(at(7, 1, 1), 0.0, 5.0)  # the reset, then this sample's energy
    assert b.exact and b.origin == "the reset on 2024-07-01" and b.level_kwh == 5.0


def test_a_reset_between_the_start_and_the_first_sample():
    b = battery(capacity=0.0, start=date(2024, 1, 1), reset=(3, 1), start_reading=(0.0, 0.0))
    b.update(at(6, 1, 10), 100.0, 300.0)
    assert b.level_kwh == 0.0 and b.last_reset == date(2024, 3, 1) and not b.exact
    assert "after the reset on 2024-03-01: the energy from 2024-03-01 to then is not counted" in b.origin


def test_the_one_time_reset_empties_the_battery_once():
    b = battery(capacity=100.0, start=date(2024, 1, 1), reset_once=date(2024, 6, 2))
    b.update(at(6, 1, 0), 0.0, 0.0)
    b.update(at(6, 1, 14), 0.0, 30.0)
    assert b.level_kwh == pytest.approx(30.0)
    b.update(at(6, 2, 9), 0.0, 31.0)
    assert b.level_kwh == pytest.approx(1.0) and b.forfeited_kwh == pytest.approx(30.0)
    assert b.last_reset == date(2024, 6, 2)
    again, reason = GridBattery.from_dict(json.loads(json.dumps(b.to_dict())), b.config)
    assert reason is None
    again.update(at(6, 3, 9), 0.0, 35.0)  # after a restart: not again
    assert again.level_kwh == pytest.approx(5.0) and conserved(again) == pytest.approx(again.level_kwh)


def test_the_one_time_reset_with_a_yearly_one():
    b = battery(capacity=0.0, start=date(2024, 1, 1), reset=(1, 1), reset_once=date(2024, 6, 2))
    b.update(at(6, 1, 0), 0.0, 0.0)
    b.update(at(6, 3, 0), 0.0, 10.0)
    assert b.last_reset == date(2024, 6, 2)
    b.update(at(12, 31, 12), 0.0, 20.0)
    assert b.level_kwh == pytest.approx(20.0)
    b.update(at(1, 1, 12, year=2025), 0.0, 21.0)
    assert b.last_reset == date(2025, 1, 1) and b.level_kwh == pytest.approx(1.0)
    old = battery(capacity=0.0, start=date(2024, 7, 1), reset_once=date(2024, 6, 2))
    old.update(at(7, 2, 0), 0.0, 0.0)
    old.update(at(7, 2, 5), 0.0, 3.0)
    assert old.last_reset is None and old.level_kwh == 3.0  # a one-time reset before the start date: nothing


def test_a_changed_start_is_a_new_start():
    b = battery(capacity=0.0, start=date(2024, 6, 1))
    b.update(at(6, 1, 10), 0.0, 0.0)
    b.update(at(6, 1, 12), 0.0, 3.0)
    same, reason = GridBattery.from_dict(b.to_dict(), b.config)
    assert reason is None and same.started and same.origin == b.origin and not same.exact
    moved, reason = GridBattery.from_dict(b.to_dict(), battery(capacity=0.0, start=date(2024, 6, 1),
                                                               start_level_kwh=2.0).config)
    assert reason and "saved for the start" in reason and moved.level_kwh == 0.0 and not moved.started


def test_the_load_profile_has_a_slot_per_quarter_hour():
    b = battery(capacity=0.0, start=date(2024, 6, 1))
    b.update(at(6, 1, 0), 10.0, 10.0)
    for minute in range(5, 50, 5):  # 0.1 kWh exported and 0.02 imported every 5 minutes
        b.update(at(6, 1, minute / 60), 10.0 + 0.02 * minute / 5, 10.0 + 0.1 * minute / 5)
    slots = b.take_closed_slots()
    assert [s.start for s in slots] == [at(6, 1, 0), at(6, 1, 0.25), at(6, 1, 0.5)]
    assert [round(s.export_kwh, 6) for s in slots] == [0.2, 0.3, 0.3]
    assert [round(s.import_kwh, 6) for s in slots] == [0.04, 0.06, 0.06]
    assert slots[-1].level_kwh == pytest.approx(0.8 - 0.16)  # at its last sample, 00:40
    assert b.take_closed_slots() == []
    # The energy of a sample's interval lands in the slot the sample arrives in (meters send every second).
    assert b.slot.start == at(6, 1, 0.75) and b.slot.export_kwh == pytest.approx(0.1)
    assert profile_csv_line(slots[1], UTC) == "2024-06-01T00:15+00:00,0.060,0.300,0.400"
    assert PROFILE_HEADER == "start,import_kwh,export_kwh,level_kwh"


def test_the_slot_in_progress_survives_a_restart_and_the_pending_slots_are_bounded():
    b = battery(capacity=0.0, start=date(2024, 6, 1))
    b.update(at(6, 1, 0), 10.0, 10.0)
    b.update(at(6, 1, 0.1), 10.0, 10.5)
    again, _ = GridBattery.from_dict(json.loads(json.dumps(b.to_dict())), b.config)
    assert again.slot == ProfileSlot(at(6, 1, 0), 0.0, 0.5, 0.5)
    again.update(at(6, 1, 0.2), 10.0, 10.7)
    assert again.slot.export_kwh == pytest.approx(0.7)
    for quarter in range(1, 1000):
        again.update(at(6, 1, quarter / 4), 10.0, 10.7 + quarter * 0.01)
    assert len(again.closed_slots) == 2 * 96


def test_the_profile_file_is_bounded_and_never_writes_a_slot_twice(tmp_path):
    from aggregator.features.grid_battery.runtime import PROFILE_FILE, ProfileFile, profile_csv

    path = tmp_path / PROFILE_FILE
    writer = ProfileFile(path, max_bytes=2000)
    slots = [ProfileSlot(at(6, 1, 0) + 900 * i, 0.1, 0.2, 1.0) for i in range(200)]
    for i in range(0, 200, 10):
        writer.append(slots[i:i + 10], UTC)
    rotated = path.with_name(PROFILE_FILE + ".1")
    assert path.stat().st_size < 2000 + 500 and rotated.stat().st_size < 2000 + 500
    again = ProfileFile(path, max_bytes=2000)  # a restart whose state is older than the file
    again.append(slots[195:], UTC)
    rows = profile_csv(tmp_path).splitlines()
    assert rows[0] == PROFILE_HEADER and rows[-1].startswith("2024-06-03T01:45+00:00,0.100,0.200,1.000")
    starts = [row.split(",")[0] for row in rows[1:]]
    assert len(starts) == len(set(starts)) and starts == sorted(starts)
    assert len(rows) - 1 < 200  # the oldest rows went with the rotation


def test_two_grid_batteries_need_no_device_instances_of_their_own():
    from aggregator.config import parse_config

    two = {"gridBatteries": [{"meter": 30, "startDate": "2024-01-01"},
                             {"meter": 31, "startDate": "2024-01-01", "serviceName": "com.victronenergy.battery.g2"}]}
    assert [g.deviceInstance for g in parse_config(two).gridBatteries] == [None, None]
    two["gridBatteries"][0]["deviceInstance"] = two["gridBatteries"][1]["deviceInstance"] = 7
    assert len(parse_config(two).gridBatteries) == 2  # asked for twice: localsettings moves one on, a warning


@pytest.mark.parametrize("data,expected", [
    ({"startImportKwh": 5}, "startImportKwh and startExportKwh go together"),
    ({"startExportKwh": 5}, "startImportKwh and startExportKwh go together"),
    ({"capacityKwh": 5, "startLevelKwh": 6}, "startLevelKwh 6 is more than capacityKwh 5"),
    ({"startLevelKwh": -1}, "startLevelKwh"),
    ({"resetOnce": "2024-02-30"}, "resetOnce"),
])
def test_bad_start_settings_name_the_keys(data, expected):
    with pytest.raises(GridBatterySettingsError, match=expected):
        parse_settings({"meter": 30, "startDate": "2024-01-01", **data})


def test_start_settings_reach_the_battery():
    config = parse_settings({"meter": 30, "startDate": "2024-01-01", "startImportKwh": 1, "startExportKwh": 2.5,
                             "startLevelKwh": 3, "resetOnce": "2024-06-01"}).battery_config()
    assert (config.start_reading, config.start_level_kwh, config.reset_once) == ((1.0, 2.5), 3.0, date(2024, 6, 1))
