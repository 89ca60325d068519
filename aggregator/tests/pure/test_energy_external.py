"""External batteries in the EnergyTracker: lifetime totals, refused reports that leave no trace,
two batteries under one id, persistence, removal and the cap. The tracker's clocks are passed in; its state
file is a real file under tmp_path."""
from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.config import ConfigError, parse_config
from aggregator.features.energy.settings import EnergyOptions
from aggregator.features.energy.core import EnergyLedger, ReportConflict, ReportError, beyond_capacity
from aggregator.features.energy.report import parse_report
from aggregator.features.energy.runtime import CHARGED, DISCHARGED, EnergyTracker
from aggregator.local_time import zone_named

T0 = datetime(2024, 6, 1, 10, 0, tzinfo=timezone.utc).timestamp()


class Clocks:
    """The wall clock (epoch s) and the monotonic clock the tracker is given, moved by the test."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def tracker(tmp_path: Path, clocks: Clocks, **options) -> EnergyTracker:
    t = EnergyTracker(EnergyOptions(**options), tmp_path, wall=lambda: clocks.wall, clock=lambda: clocks.mono)
    t.load()
    return t


def report(t: EnergyTracker, ident: str, charged: float, discharged: float, soc: float = 50.0, **extra) -> str:
    return t.report({"id": ident, "charged": charged, "discharged": discharged, "soc": soc, **extra})


def values(t: EnergyTracker) -> dict:
    return t.values([], lambda _name: {})


# ---- item 2: lifetime totals ------------------------------------------------------------------------------

def test_a_first_report_counts_as_the_lifetime_totals(tmp_path):
    """A first report of 2010.66 / 1678.79 kWh left the aggregate at 0."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    assert "2010.660 kWh charged, 1678.790 kWh discharged" in report(t, "homey-1", 2010.66, 1678.79)
    out = values(t)
    assert (out[CHARGED], out[DISCHARGED]) == (2010.66, 1678.79)
    assert (out["/Energy/External/0/ChargedEnergy"], out["/Energy/External/0/DischargedEnergy"]) == (2010.66, 1678.79)
    clocks.advance(600)
    report(t, "homey-1", 2011.0, 1679.0)
    report(t, "homey-2", 10.0, 4.0)
    out = values(t)
    assert (out[CHARGED], out[DISCHARGED]) == (2021.0, 1683.0)  # summed over the ids
    assert out["/Energy/External/1/ChargedEnergy"] == 10.0


def test_a_daily_external_counter_counts_its_first_value_as_today(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks, members={"shed": {"counterKind": "daily"}})
    report(t, "shed", 3.5, 1.0)
    assert t.ledgers["shed"].days == {"2024-06-01": [3.5, 1.0]}


# ---- item 3: a refused report changes nothing; two batteries under one id -----------------------------

def test_a_typo_is_refused_and_the_next_correct_report_is_taken(tmp_path):
    """9011.2 after 901.1 re-anchored the id at 9011.2, so 901.3 was refused as 'a delta'."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "shed", 901.1, 500.0, soc=40)
    clocks.advance(300)
    with pytest.raises(ReportError) as err:
        report(t, "shed", 9011.2, 500.0, soc=99)
    assert "shed: charged +8110.1 kWh in 300 s" in str(err.value) and "the last taken totals stay" in str(err.value)
    assert values(t)["/Energy/External/0/Soc"] == 40  # nothing of the refused report was taken
    clocks.advance(300)
    report(t, "shed", 901.3, 500.1, soc=41)
    out = values(t)
    assert (out[CHARGED], out[DISCHARGED]) == (901.3, 500.1)
    assert out["/Energy/Status"] == "ok"


def test_a_refused_delta_changes_nothing(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "shed", 100.0, 50.0)
    clocks.advance(60)
    before = json.dumps(t.ledgers["shed"].to_dict())
    with pytest.raises(ReportError, match="below the last reported total 100 kWh; report running totals"):
        report(t, "shed", 0.2, 50.0)
    assert json.dumps(t.ledgers["shed"].to_dict()) == before


def test_two_batteries_under_one_id_are_a_conflict_naming_the_id(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "garage", 100.0, 80.0)
    errors = []
    for i in range(4):  # the other battery's running totals, in turn with the first one's
        clocks.advance(300)
        try:
            report(t, "garage", 500.0 + i, 400.0 + i)
        except ReportError as exc:
            errors.append(exc)
        clocks.advance(300)
        report(t, "garage", 100.5 + i, 80.5 + i)
    assert len(errors) == 4
    assert not isinstance(errors[0], ReportConflict)  # once could be a typo
    for exc in errors[1:]:
        assert isinstance(exc, ReportConflict)
        assert "'garage' gets the totals of two batteries" in str(exc) and "report running totals" not in str(exc)
    assert values(t)["/Energy/Status"] == "two batteries report under one id: garage"
    assert values(t)[CHARGED] == 103.5  # the series that was taken first, not a mix
    clocks.advance(2251)
    assert "two batteries" not in values(t)["/Energy/Status"]  # no conflicting report for externalStaleAfter


def test_two_series_where_the_second_was_taken_by_a_long_gap_are_a_conflict(tmp_path):
    """Hours apart, the other battery's total looks like a plausible jump and is taken; the first series then
    rolls it back once (it could have been a typo), and the next time the two series alternate it is named a
    conflict, not 'report running totals'."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks, externalMaxPowerKw=60)
    report(t, "garage", 100.0, 80.0)
    clocks.advance(5 * 3600)
    report(t, "garage", 500.0, 400.0)
    clocks.advance(3600)
    assert "was rolled back" in report(t, "garage", 101.0, 81.0)
    messages = []
    for i in range(2):
        clocks.advance(3600)
        with pytest.raises(ReportError) as err:
            report(t, "garage", 501.0 + i, 401.0 + i)
        messages.append(str(err.value))
        clocks.advance(3600)
        report(t, "garage", 102.0 + i, 82.0 + i)
    assert "more than 60 kW allows" in messages[0]
    assert "gets the totals of two batteries" in messages[1] and "report running totals" not in messages[1]
    assert values(t)[CHARGED] == 103.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 0.8), min_size=1, max_size=20), st.lists(st.booleans(), min_size=20, max_size=20),
       st.floats(1e3, 1e5))
def test_typos_never_cost_a_correct_report(increments, typo_at, typo_factor):
    """Between correct running totals (each within the default 10 kW in the 300 s since the last), any typo (a
    digit too many) is refused and every correct report is taken: the totals end as the last correct report."""
    clocks = Clocks()
    t = tracker(Path(tempfile.mkdtemp()), clocks)  # not tmp_path: hypothesis runs the body many times
    charged = 901.1
    report(t, "shed", charged, 0.0)
    for step, typo in zip(increments, typo_at):
        clocks.advance(300)
        if typo:
            with pytest.raises(ReportError):
                report(t, "shed", charged * typo_factor + 100, 0.0)
            clocks.advance(300)
        charged = round(charged + step, 3)
        report(t, "shed", charged, 0.0)
    assert values(t)[CHARGED] == pytest.approx(charged, abs=1e-3)


# ---- item 4: persistence, removal, the cap, the token ------------------------------------------------------

def test_external_rows_survive_a_restart(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "a", 10.0, 5.0, soc=30, capacity=100)
    report(t, "b", 20.0, 6.0, soc=70)
    t.remove_external("a")
    report(t, "c", 1.0, 1.0, soc=50)  # takes the freed row 0
    t.tick()  # a taken report is saved at the next tick
    saved = json.loads((tmp_path / "energy.json").read_text())
    assert set(saved["externals"]) == {"b", "c"}
    clocks.advance(600)
    again = tracker(tmp_path, clocks)
    out = values(again)
    assert (out["/Energy/External/0/Id"], out["/Energy/External/1/Id"]) == ("c", "b")
    assert (out["/Energy/External/1/Soc"], out["/Energy/External/1/State"]) == (70.0, "online")
    assert (out[CHARGED], out[DISCHARGED]) == (21.0, 7.0)
    clocks.advance(1651)  # stale counts from the report, not from the restart
    assert values(again)["/Energy/External/1/State"] == "stale"
    clocks.advance(60)
    report(again, "b", 20.5, 6.0)  # the anchor survived: only the increase counts
    assert values(again)[CHARGED] == 21.5


def test_garbage_saved_rows_are_dropped_and_the_energy_kept(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "a", 10.0, 5.0)
    t.save()
    data = json.loads((tmp_path / "energy.json").read_text())
    data["externals"]["a"]["soc"] = "lots"
    data["externals"]["ghost"] = {"row": 1, "soc": 5, "reportedAt": T0}
    (tmp_path / "energy.json").write_text(json.dumps(data))
    clocks.advance(60)
    again = tracker(tmp_path, clocks)
    assert again.externals == {} and values(again)[CHARGED] == 10.0
    report(again, "a", 10.5, 5.0)
    assert values(again)[CHARGED] == 10.5


def test_a_removed_id_leaves_the_totals_and_its_row_turns_invalid(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "a", 10.0, 5.0)
    report(t, "b", 2.0, 1.0)
    values(t)
    assert "removed" in t.remove_external("a")
    out = values(t)
    assert out["/Energy/External/0/Id"] is None and out["/Energy/External/0/ChargedEnergy"] is None
    assert (out[CHARGED], out["/Energy/External/1/Id"]) == (2.0, "b")
    with pytest.raises(ReportError, match=r"id: 'a' is not an external battery; allowed: a reported id \(b\)"):
        t.remove_external("a")
    report(t, "a", 3.0, 1.0)  # a new start for the id: its first report counts again
    assert values(t)[CHARGED] == 5.0


def test_new_ids_beyond_max_external_are_refused(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks, maxExternal=2)
    report(t, "a", 1.0, 1.0)
    report(t, "b", 1.0, 1.0)
    with pytest.raises(ReportError, match=r"id: 'c' would be external battery number 3; allowed: at most 2 "
                                          r"\(energy.maxExternal\)"):
        report(t, "c", 1.0, 1.0)
    clocks.advance(60)
    report(t, "a", 1.5, 1.0)  # known ids go on
    t.remove_external("b")
    report(t, "c", 1.0, 1.0)
    assert sorted(t.externals) == ["a", "c"]


def test_max_external_bounds_the_published_paths(tmp_path):
    """7,820 ids made every publication slow: with the cap the rows stay few."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    refused = 0
    for i in range(200):
        try:
            report(t, f"id{i}", 1.0, 1.0)
        except ReportError:
            refused += 1
    assert refused == 200 - 32
    assert len([p for p in values(t) if p.startswith("/Energy/External/")]) == 32 * 7


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.168.1.5", "::", "gx.local"])
def test_binding_beyond_loopback_needs_a_token(bind):
    with pytest.raises(ConfigError) as err:
        parse_config({"energy": {"httpPort": 8088, "httpBind": bind}})
    assert "energy" in str(err.value) and "httpToken is required" in str(err.value) and repr(bind) in str(err.value)
    config = parse_config({"energy": {"httpPort": 8088, "httpBind": bind, "httpToken": "s3cret-token-0123"}})
    assert config.energy.httpToken == "s3cret-token-0123"


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_token(bind):
    assert parse_config({"energy": {"httpPort": 8088, "httpBind": bind}}).energy.httpToken is None


def test_energy_defaults():
    options = EnergyOptions()
    assert (options.maxExternal, options.httpToken) == (32, None)
    with pytest.raises(ConfigError, match="energy.httpToken"):
        parse_config({"energy": {"httpToken": "short"}})
    with pytest.raises(ConfigError, match="energy.maxExternal"):
        parse_config({"energy": {"maxExternal": 0}})


# ---- item 5: the user's time zone ------------------------------------------------------------------------------

def test_zone_named_reads_olson_names_and_refuses_others():
    assert zone_named("Europe/Amsterdam")[0] == ZoneInfo("Europe/Amsterdam")
    for bad in ("Mars/Olympus", "", None, 5, "../etc/passwd"):
        zone, reason = zone_named(bad)
        assert zone is None and "/Settings/System/TimeZone" in reason


def test_the_tracker_dates_in_the_zone_it_is_given(tmp_path):
    clocks = Clocks()
    clocks.wall = datetime(2024, 6, 1, 23, 30, tzinfo=timezone.utc).timestamp()  # June 2 in Amsterdam
    t = tracker(tmp_path, clocks, members={"shed": {"counterKind": "daily"}})
    t.set_zone(ZoneInfo("Europe/Amsterdam"))
    report(t, "shed", 1.0, 0.0)
    assert list(t.ledgers["shed"].days) == ["2024-06-02"]
    t.set_zone(None)
    assert t.ledgers["shed"].tz is None


def test_a_ledger_copy_is_independent():
    ledger = EnergyLedger("x", "total", ZoneInfo("Europe/Amsterdam"))
    ledger.add(T0, 1.0, 1.0)
    twin = ledger.copy()
    twin.add(T0 + 60, 1.5, 1.0)
    assert (ledger.charged_kwh, twin.charged_kwh) == (0.0, 0.5) and ledger.counters() == (1.0, 1.0)


# ---- reports bounded by the battery, outliers rolled back, twins, decimal commas ------------------

QUARTER = 900.0  # a Homey flow reports every 15 minutes


def test_a_typo_beyond_the_power_of_the_battery_is_refused_and_the_next_report_taken(tmp_path):
    """2019.12 kWh for 2011.12 a quarter later was taken (the bound was 60 kW x 2 whatever the battery); then
    every correct report was refused as 'below the last reported total' and the ledger stayed 8 kWh high."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "sessy", 2011.12, 1678.79)
    clocks.advance(QUARTER)
    with pytest.raises(ReportError, match=r"charged \+8 kWh in 900 s .* more than 10 kW allows; refused"):
        report(t, "sessy", 2019.12, 1678.79)
    for charged in (2011.35, 2011.6, 2011.9):
        clocks.advance(QUARTER)
        report(t, "sessy", charged, 1678.79)
    assert values(t)[CHARGED] == pytest.approx(2011.9)
    assert values(t)["/Energy/Status"] == "ok"


def test_a_typo_that_cannot_fit_in_the_battery_is_refused_however_long_since_the_last_report(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks, members={"sessy": {"capacityKwh": 5}})
    report(t, "sessy", 2011.12, 1678.79)
    clocks.advance(3 * 3600)  # three hours: 10 kW would allow 60 kWh
    with pytest.raises(ReportError, match=r"cannot fit in a battery of 5 kWh \(energy.members.sessy.capacityKwh\)"):
        report(t, "sessy", 2019.12, 1678.79)
    clocks.advance(QUARTER)
    report(t, "sessy", 2015.0, 1676.0 + 3.5)  # 3.9 in and 0.7 out in 3 h: fits in 5 kWh
    assert values(t)[CHARGED] == pytest.approx(2015.0)


def test_a_per_battery_power_bound_from_the_config(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks, members={"sessy": {"maxPowerKw": 2.2}})
    report(t, "sessy", 100.0, 50.0)
    clocks.advance(QUARTER)
    with pytest.raises(ReportError, match="more than 2.2 kW allows"):
        report(t, "sessy", 101.5, 50.0)  # 6 kW for a quarter
    clocks.advance(QUARTER)
    report(t, "sessy", 100.8, 50.0)


def test_an_outlier_within_the_bounds_is_rolled_back_by_the_next_report(tmp_path):
    """A typo small enough to be possible (2011.92 for 2011.12) is taken; the next report, below it but going
    on from 2011.12, rolls it back: the ledger is as if it never came, and says what happened."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks, members={"sessy": {"counterKind": "total"}})
    report(t, "sessy", 2011.12, 1678.79)
    clocks.advance(QUARTER)
    report(t, "sessy", 2011.3, 1678.79)
    before = t.ledgers["sessy"].to_dict()
    clocks.advance(QUARTER)
    report(t, "sessy", 2011.92, 1678.79)  # the typo
    clocks.advance(QUARTER)
    answer = report(t, "sessy", 2011.5, 1678.9)
    assert "the report of 2024-06-01" in answer and "(charged 2011.92, discharged 1678.79 kWh) was rolled back" \
        in answer
    ledger = t.ledgers["sessy"]
    assert ledger.charged_kwh == pytest.approx(2011.5) and ledger.discharged_kwh == pytest.approx(1678.9)
    assert sum(c for c, _ in ledger.days.values()) == pytest.approx(0.38)  # 2011.12 -> 2011.5, on its day
    assert ledger.counters() == (2011.5, 1678.9)
    assert before["charged"] < ledger.charged_kwh
    out = values(t)
    assert "was rolled back" in out["/Energy/External/0/LastCorrection"]
    assert out["/Energy/Status"] == "reports rolled back or taken on confirmation: sessy"
    clocks.advance(QUARTER)
    report(t, "sessy", 2011.7, 1678.9)  # and on it goes
    assert values(t)[CHARGED] == pytest.approx(2011.7)
    clocks.advance(2251)
    out = values(t)
    assert out["/Energy/Status"] != "ok"  # stale now; but the rollback is no longer news
    assert "rolled back" not in out["/Energy/Status"] and "rolled back" in out["/Energy/External/0/LastCorrection"]


def with_a_possible_typo(tmp_path) -> tuple[EnergyTracker, Clocks]:
    """A tracker that took 2011.12 kWh, then a quarter later the typo 2011.92 (possible in the time)."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "sessy", 2011.12, 1678.79)
    clocks.advance(QUARTER)
    report(t, "sessy", 2011.92, 1678.79)
    return t, clocks


def test_an_outlier_confirmed_by_the_next_report_stays(tmp_path):
    t, clocks = with_a_possible_typo(tmp_path)
    clocks.advance(QUARTER)
    report(t, "sessy", 2012.1, 1678.79)  # goes on from 2011.92: it was real
    with pytest.raises(ReportError, match="below the last reported total 2012.1 kWh"):
        report(t, "sessy", 2011.5, 1678.79)  # only the last report can be rolled back
    assert values(t)[CHARGED] == pytest.approx(2012.1)
    assert values(t)["/Energy/Status"] == "ok"


def test_a_real_jump_beyond_the_bounds_is_taken_when_the_next_report_confirms_it(tmp_path):
    """A reporter that was away (or a battery charged beyond its configured power) is not locked out: the
    second report that agrees with the refused one confirms it."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks, members={"sessy": {"maxPowerKw": 2.2}})
    report(t, "sessy", 100.0, 50.0)
    clocks.advance(QUARTER)
    with pytest.raises(ReportError):
        report(t, "sessy", 103.0, 50.0)
    clocks.advance(QUARTER)
    answer = report(t, "sessy", 103.4, 50.0)
    assert "although beyond the bounds: the report before it said the same" in answer
    assert values(t)[CHARGED] == pytest.approx(103.4)
    assert "taken on confirmation" in values(t)["/Energy/Status"]


def test_two_batteries_that_roll_each_other_back_are_a_conflict(tmp_path):
    """Two batteries with close totals under one id: each report is possible after the other's, so each
    rolls the other back; the second time that happens it is named a conflict."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "garage", 100.0, 80.0)
    clocks.advance(QUARTER)
    report(t, "garage", 100.6, 80.0)  # the other battery
    clocks.advance(QUARTER)
    assert "rolled back" in report(t, "garage", 100.2, 80.1)
    clocks.advance(QUARTER)
    report(t, "garage", 100.9, 80.0)  # the other battery again, going on from its 100.6
    clocks.advance(QUARTER)
    assert "rolled back" in report(t, "garage", 100.4, 80.2)  # twice could still be two typos
    clocks.advance(QUARTER)
    report(t, "garage", 101.1, 80.0)
    clocks.advance(QUARTER)
    with pytest.raises(ReportConflict, match="'garage' gets the totals of two batteries"):
        report(t, "garage", 100.5, 80.2)
    assert "two batteries report under one id: garage" in values(t)["/Energy/Status"]


def test_typos_a_report_apart_are_each_rolled_back(tmp_path):
    """Typos are not a series (their totals do not go on from each other): each is rolled back, no conflict."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "sessy", 2011.12, 1678.79)
    for typo, good in ((2013.0, 2011.3), (2012.5, 2011.4), (2011.92, 2011.6), (2011.78, 2011.7), (2011.9, 2011.8)):
        clocks.advance(QUARTER)
        report(t, "sessy", typo, 1678.79)
        clocks.advance(QUARTER)
        assert "rolled back" in report(t, "sessy", good, 1678.79)
    assert values(t)[CHARGED] == pytest.approx(2011.8)


def test_the_way_back_survives_a_restart(tmp_path):
    t, clocks = with_a_possible_typo(tmp_path)
    t.save()
    clocks.advance(QUARTER)
    again = tracker(tmp_path, clocks)
    assert "rolled back" in report(again, "sessy", 2011.4, 1678.79)
    assert values(again)[CHARGED] == pytest.approx(2011.4)
    again.save()
    third = tracker(tmp_path, clocks)
    assert "rolled back" in values(third)["/Energy/External/0/LastCorrection"]


def test_a_first_report_is_not_rolled_back_by_a_delta(tmp_path):
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "shed", 100.0, 50.0)
    clocks.advance(60)
    with pytest.raises(ReportError, match="below the last reported total"):
        report(t, "shed", 0.2, 50.0)


def test_one_battery_reported_under_two_ids_is_named(tmp_path):
    """The source document's own troubleshooting case: the same battery in two flows, counted twice."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    report(t, "sessy-1", 2010.66, 1678.79)
    report(t, "other", 10.0, 4.0)
    answer = report(t, "sessy-copy", 2010.66, 1678.79)
    assert "warning: sessy-1 reported the same totals: one battery under two ids is counted twice" in answer
    out = values(t)
    assert out["/Energy/Status"] == "the same totals under two ids (one battery counted twice?): sessy-1, sessy-copy"
    clocks.advance(QUARTER)
    report(t, "sessy-1", 2011.0, 1678.79)
    report(t, "sessy-copy", 2011.0, 1678.79)
    assert "sessy-1, sessy-copy" in values(t)["/Energy/Status"]
    t.remove_external("sessy-copy")
    assert values(t)["/Energy/Status"] == "ok"
    report(t, "zero-a", 0.0, 0.0)
    report(t, "zero-b", 0.0, 0.0)  # two new batteries: nothing to tell them apart yet, no warning
    assert values(t)["/Energy/Status"] == "ok"


def test_a_battery_reporting_every_quarter_does_not_flap_to_stale(tmp_path):
    """externalStaleAfter was 900 s, the usual report interval: a report a few seconds late made it stale."""
    clocks = Clocks()
    t = tracker(tmp_path, clocks)
    charged = 100.0
    report(t, "sessy", charged, 50.0)
    for late in (5, 60, 300, 0, 120):
        clocks.advance(QUARTER + late)
        assert values(t)["/Energy/External/0/State"] == "online"
        charged += 0.3
        report(t, "sessy", charged, 50.0)
    clocks.advance(2 * QUARTER)  # one report missed: still there
    assert values(t)["/Energy/External/0/State"] == "online"
    clocks.advance(QUARTER)  # two missed: stale
    assert values(t)["/Energy/External/0/State"] == "stale"


@pytest.mark.parametrize("text,number", [("2010,66", 2010.66), (" 2010,66 ", 2010.66), ("2010.66", 2010.66),
                                         ("0,5", 0.5), ("1,234", 1.234), ("12", 12.0)])
def test_a_decimal_comma_is_read(tmp_path, text, number):
    assert parse_report(id="x", charged=text, discharged="1,5", soc="61,5").charged == number
    assert parse_report(id="x", charged=text, discharged="1,5", soc="61,5").soc == 61.5


@pytest.mark.parametrize("text", ["1,234.5", "1.234,5", "1,2,3", "2 010,66", "1_000", ",", ""])
def test_thousands_separators_are_refused_naming_the_rule(text):
    with pytest.raises(ReportError, match=r"charged: .* is not a number; allowed: a number >= 0 and < 10000000 "
                                          r"kWh, written with a decimal point \(2010.66\) or a decimal comma"):
        parse_report(id="x", charged=text, discharged=0, soc=50)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.floats(0, 3), st.floats(60, 90000)), min_size=1, max_size=8))
def test_undo_sets_a_ledger_back_exactly(steps):
    ledger = EnergyLedger("x", "total", timezone.utc)
    now, charged, discharged = T0, 10.0, 5.0
    ledger.add(now, charged, discharged)
    for up, down, seconds in steps:
        before = ledger.copy()
        now, charged, discharged = now + seconds, charged + up, discharged + down
        ledger.add(now, charged, discharged, max_power_kw=1e9)
        record = json.loads(json.dumps(ledger.undo_record(before)))  # as saved
        assert ledger.undo(record).to_dict() == before.to_dict()


def test_beyond_capacity_allows_what_a_battery_can_do():
    ledger = EnergyLedger("b", "total")
    ledger.add(T0, 100.0, 100.0)
    fits = [(106.2, 100.0), (100.0, 105.1), (130.0, 120.0), (100.0, 100.0)]
    beyond = [(106.8, 100.0), (100.0, 105.3), (108.0, 100.5)]
    for charged, discharged in fits:
        assert beyond_capacity(ledger, parse_report(id="b", charged=charged, discharged=discharged, soc=5), 5) is None
    for charged, discharged in beyond:
        assert "cannot fit in a battery of 5 kWh" in beyond_capacity(
            ledger, parse_report(id="b", charged=charged, discharged=discharged, soc=5), 5)
    assert beyond_capacity(ledger, parse_report(id="b", charged=200, discharged=100, soc=5), None) is None
