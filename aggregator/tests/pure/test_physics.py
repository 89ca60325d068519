"""Tests of the simulator physics and scenario files."""

from __future__ import annotations

import json
import math



import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


from aggregator_dev.simulator.physics import (CELL_OCV_SOC, Bank, Pack, PackParams, cell_ocv, cell_soc_from_ocv, daily,
                                              make_profile, steps)
from aggregator_dev.simulator.scenario import (SCENARIO_DIR, ScenarioError, available_scenarios, load_scenario,
                                               parse_scenario)


def mkpack(service: str, cap: float = 100.0, r: float = 10.0, soc: float = 50.0, **kw) -> Pack:
    return Pack(PackParams(name=service, service=service, capacity_ah=cap, r_mohm=r, soc=soc, **kw))


def ah(p: Pack) -> float:
    return p.soc / 100.0 * p.capacity_eff_ah


# --------------------------------------------------------------------------- OCV


def test_ocv_curve_strictly_increasing_and_shape():
    socs = [i / 10 for i in range(0, 1001)]
    v = [cell_ocv(s) for s in socs]
    assert all(b > a for a, b in zip(v, v[1:]))
    assert 2.5 <= cell_ocv(0) <= 2.8
    assert 3.55 <= cell_ocv(100) <= 3.6
    assert all(3.24 <= cell_ocv(s) <= 3.34 for s in range(20, 91))
    for s in (0.0, 3.3, 42.0, 77.7, 99.2, 100.0):
        assert cell_soc_from_ocv(cell_ocv(s)) == pytest.approx(s, abs=1e-9)
    assert list(CELL_OCV_SOC) == sorted(CELL_OCV_SOC)
    p = mkpack("x", soc=50)
    assert p.ocv() == pytest.approx(16 * cell_ocv(50))


def test_resistance_rises_at_low_soc_and_temperature():
    p = mkpack("x", r=10, soc=50, temperature_c=25)
    base = p.resistance()
    assert base == pytest.approx(0.010)
    p.soc = 5
    assert p.resistance() > base
    p.soc = 50
    p.temperature_c = 0
    assert p.resistance() == pytest.approx(0.020, rel=1e-6)
    p.temperature_c = 45
    assert p.resistance() == pytest.approx(base)


# --------------------------------------------------------------------------- bank split


def test_split_follows_inverse_resistance_when_ocv_equal():
    packs = [mkpack("a", r=5), mkpack("b", r=10), mkpack("c", r=20)]
    bank = Bank(packs)
    st_ = bank.solve(70.0)
    assert sum(st_.currents) == pytest.approx(70.0)
    assert st_.i_actual == pytest.approx(70.0)
    ia, ib, ic = st_.currents
    assert ia / ib == pytest.approx(10 / 5)
    assert ib / ic == pytest.approx(20 / 10)
    assert ia == pytest.approx(40.0)


def test_bus_voltage_consistent_with_each_pack():
    packs = [mkpack("a", cap=280, r=6, soc=60), mkpack("b", cap=200, r=9, soc=30, soh=85),
             mkpack("c", cap=100, r=12, soc=95)]
    bank = Bank(packs)
    for i_total in (-150.0, -10.0, 0.0, 25.0, 120.0):
        s = bank.solve(i_total)
        assert sum(s.currents) == pytest.approx(i_total, abs=1e-9)
        for p, i in zip(packs, s.currents):
            assert s.voltage == pytest.approx(p.ocv() + i * p.resistance(), abs=1e-9)


def test_charge_conservation_over_many_steps():
    packs = [mkpack("a", cap=280, r=6, soc=60), mkpack("b", cap=200, r=9, soc=40, soh=85),
             mkpack("c", cap=100, r=12, soc=70)]
    bank = Bank(packs)
    prof = steps([[0, 60], [100, -90], [250, 30], [400, -20]], period=500)
    before = sum(ah(p) for p in packs)
    integral = 0.0
    dt = 1.0
    for k in range(2000):
        i = prof(k * dt)
        s = bank.step(i, dt)
        assert s.i_actual == pytest.approx(i, abs=1e-9)
        integral += s.i_actual * dt / 3600.0
    after = sum(ah(p) for p in packs)
    assert after - before == pytest.approx(integral, abs=1e-6)
    assert all(math.isfinite(p.voltage) for p in packs)


def test_long_steps_are_substepped_and_conserve_charge():
    packs = [mkpack("a", cap=280, r=6, soc=96), mkpack("b", cap=100, r=12, soc=20)]
    bank = Bank(packs)
    before = sum(ah(p) for p in packs)
    s = bank.step(10.0, 600.0)
    after = sum(ah(p) for p in packs)
    assert after - before == pytest.approx(s.i_actual * 600 / 3600, abs=1e-6)
    assert s.i_actual == pytest.approx(10.0)
    # equalisation current flows from the fuller pack into the emptier one
    assert s.currents[0] < 0 < s.currents[1]


@settings(max_examples=40, deadline=None)
@given(
    packs=st.lists(
        st.tuples(
            st.floats(20, 400),
            st.floats(1, 50),
            st.floats(0, 100),
        ),
        min_size=2,
        max_size=8,
    ),
    currents=st.lists(st.floats(-500, 500), min_size=1, max_size=15),
    dt=st.floats(0.1, 60),
)
def test_random_banks_stay_in_bounds(packs, currents, dt):
    bank = Bank([mkpack(f"p{k}", cap=c, r=r, soc=s) for k, (c, r, s) in enumerate(packs)])
    for i in currents:
        s = bank.step(i, dt)
        assert math.isfinite(s.voltage) and math.isfinite(s.i_actual)
        assert all(math.isfinite(x) for x in s.currents)
        for p in bank.packs:
            assert 0.0 <= p.soc <= 100.0
            assert math.isfinite(p.voltage) and math.isfinite(p.temperature_c)
            assert p.consumed_ah <= 0.0
            v = p.values()
            assert all(not (isinstance(x, float) and math.isnan(x)) for x in v.values())


# --------------------------------------------------------------------------- limits


def test_ccl_tapers_to_zero_at_full_and_dcl_at_empty():
    p = mkpack("x", cap=100, max_charge_current=50, max_discharge_current=100)
    p.soc = 50
    lim = p.limits()
    assert (lim.ccl, lim.dcl) == (50, 100)
    assert lim.cvl == pytest.approx(16 * 3.45)
    assert lim.charge_mode == "Bulk"
    ccls = []
    for s in (90, 93, 96, 99, 99.9):
        p.soc = s
        ccls.append(p.limits().ccl)
    assert all(b < a for a, b in zip(ccls, ccls[1:]))
    assert 0 < ccls[-1] <= 0.1 * 50
    p.soc = 97
    assert p.limits().charge_mode == "Absorption"
    p.soc = 100
    lim = p.limits()
    assert lim.ccl == 0 and lim.allow_to_charge == 0 and lim.allow_to_discharge == 1
    assert lim.charge_mode == "Float"
    p.soc = 10
    assert 0 < p.limits().dcl < 100
    p.soc = 0
    lim = p.limits()
    assert lim.dcl == 0 and lim.allow_to_discharge == 0 and lim.allow_to_charge == 1


def test_ccl_zero_at_freezing_and_derated_hot():
    p = mkpack("x", max_charge_current=50, temperature_c=0)
    assert p.limits().ccl == 0
    assert p.limits().allow_to_charge == 0
    p.temperature_c = 2.5
    assert 0 < p.limits().ccl < 50
    p.temperature_c = 50
    assert 0 < p.limits().ccl < 50
    assert p.limits().dcl < p.params.max_discharge_current


def test_forced_fets_open_pack_carries_nothing():
    a, b, c = mkpack("a", r=5, soc=50), mkpack("b", r=10, soc=60), mkpack("c", r=10, soc=40)
    c.forced_fets_open = True
    bank = Bank([a, b, c])
    for i_total in (80.0, -80.0):
        s = bank.solve(i_total)
        assert s.currents[2] == 0.0
        assert s.currents[0] + s.currents[1] == pytest.approx(i_total)
    s = bank.step(80.0, 10.0)
    assert c.current == 0.0 and c.voltage == pytest.approx(c.ocv())
    v = c.values()
    assert v["/Io/AllowToCharge"] == 0 and v["/Io/AllowToDischarge"] == 0
    assert v["/Alarms/InternalFailure"] == 2


def test_full_pack_blocks_charge_but_discharges():
    full = mkpack("full", r=5, soc=100)
    other = mkpack("other", r=10, soc=50)
    bank = Bank([full, other])
    assert full.limits().allow_to_charge == 0
    # bus pushed above the full pack's OCV: it would take charge but its FET blocks it
    s = bank.solve(500.0)
    assert s.voltage > full.ocv()
    assert s.currents[0] == 0.0
    assert s.currents[1] == pytest.approx(500.0)
    assert s.voltage == pytest.approx(other.ocv() + 500 * other.resistance())
    # with a small charge current the full pack never charges (it may equalise into the other)
    s = bank.solve(50.0)
    assert s.currents[0] <= 0.0
    assert sum(s.currents) == pytest.approx(50.0)
    s = bank.solve(-50.0)
    assert s.currents[0] < 0
    assert sum(s.currents) == pytest.approx(-50.0)


def test_nobody_can_take_current():
    a, b = mkpack("a", soc=100), mkpack("b", soc=100)
    s = Bank([a, b]).solve(30.0)
    assert s.i_actual == 0.0 and s.currents == [0.0, 0.0]
    assert s.voltage == pytest.approx((a.ocv() + b.ocv()) / 2)


# --------------------------------------------------------------------------- counters and values


def test_step_counters():
    p = mkpack("x", cap=100, r=10, soc=50, soh=80)
    p.step(-40.0, 900.0)  # 10 Ah out of 80 Ah effective
    assert p.soc == pytest.approx(50 - 12.5)
    assert p.consumed_ah == pytest.approx(-(100 - p.soc) / 100 * 80)
    assert p.total_ah_drawn == pytest.approx(10.0)
    assert p.charge_cycles == pytest.approx(0.1)
    assert p.discharged_energy_kwh == pytest.approx(10 * 52.5 / 1000, rel=0.05)
    assert p.charged_energy_kwh == 0
    assert p.temperature_c > 25.0  # I^2 R heating
    p.step(20.0, 900.0)
    assert p.charged_energy_kwh > 0
    p.step(0.0, 36000.0)
    assert p.temperature_c == pytest.approx(25.0, abs=0.01)
    p.step(5000.0, 3600.0)
    assert p.soc == 100.0


def test_values_shape_and_types():
    p = mkpack("x", cap=280, r=6, soc=98)
    p.step(20.0, 1.0)
    v = p.values()
    required = """/Dc/0/Voltage /Dc/0/Current /Dc/0/Power /Dc/0/Temperature /Soc /Soh /Capacity
    /InstalledCapacity /ConsumedAmphours /TimeToGo /Info/MaxChargeCurrent /Info/MaxDischargeCurrent
    /Info/MaxChargeVoltage /Info/BatteryLowVoltage /Info/ChargeMode /Io/AllowToCharge /Io/AllowToDischarge
    /Io/AllowToBalance /Balancing /System/MinCellVoltage /System/MaxCellVoltage /System/MinVoltageCellId
    /System/MaxVoltageCellId /System/MinCellTemperature /System/MaxCellTemperature
    /System/MinTemperatureCellId /System/MaxTemperatureCellId /System/NrOfModulesOnline
    /System/NrOfModulesOffline /System/NrOfModulesBlockingCharge /System/NrOfModulesBlockingDischarge
    /System/NrOfCellsPerBattery /Alarms/LowVoltage /Alarms/HighVoltage /Alarms/LowSoc
    /Alarms/HighChargeCurrent /Alarms/HighDischargeCurrent /Alarms/CellImbalance /Alarms/LowCellVoltage
    /Alarms/HighCellVoltage /Alarms/LowTemperature /Alarms/HighTemperature /Alarms/InternalFailure
    /History/ChargedEnergy /History/DischargedEnergy /History/TotalAhDrawn /History/ChargeCycles
    /Serial /CustomName /ProductName""".split()
    assert set(required) <= set(v)
    assert v["/Balancing"] == 1
    assert v["/TimeToGo"] is None
    assert isinstance(v["/Io/AllowToCharge"], int) and isinstance(v["/Dc/0/Voltage"], float)
    assert v["/System/MinCellVoltage"] < v["/System/MaxCellVoltage"]
    assert v["/System/MinVoltageCellId"] != v["/System/MaxVoltageCellId"]
    assert v["/Dc/0/Power"] == pytest.approx(v["/Dc/0/Voltage"] * v["/Dc/0/Current"], rel=0.01)
    for key, val in v.items():
        if key.startswith("/Alarms/"):
            assert val in (0, 1, 2) and isinstance(val, int)
    p.step(-56.0, 1.0)
    v = p.values()
    assert v["/TimeToGo"] == pytest.approx(p.remaining_ah / 56 * 3600, abs=1)
    # deterministic per pack
    assert mkpack("x").values() == mkpack("x").values()


# --------------------------------------------------------------------------- profiles


def test_profiles():
    assert make_profile({"kind": "constant", "current": 7})(123.0) == 7
    f = steps([[0, 50], [60, -80]])
    assert (f(0), f(59.9), f(60), f(1e6)) == (50, 50, -80, -80)
    g = steps([[0, 1], [10, 2]], period=20)
    assert (g(5), g(15), g(25)) == (1, 2, 1)
    d = daily(100, 10, day_seconds=86400, start_hour=0)
    assert d(3 * 3600) == pytest.approx(-10, abs=0.5)  # night: only load
    assert d(12 * 3600) == pytest.approx(100 - 10, abs=2)  # noon: peak solar
    assert d(19.5 * 3600) < -20  # evening bump
    dd = daily(100, 10, day_seconds=144, start_hour=6)
    assert dd(36) == pytest.approx(d(12 * 3600))


# --------------------------------------------------------------------------- scenarios


def test_repo_scenarios_load_and_run():
    names = available_scenarios()
    assert {"default", "solar_day", "faults"} <= set(names)
    for name in names:
        sc = load_scenario(name)
        assert sc == load_scenario(SCENARIO_DIR / f"{name}.json")
        bank = sc.build_bank()
        prof = sc.build_profile()
        for k in range(5):
            bank.step(prof(k * sc.tick_seconds), sc.tick_seconds)
        assert all(0 <= p.soc <= 100 for p in bank.packs)
    d = load_scenario("default")
    assert [p.capacity_ah for p in d.packs] == [280, 200, 100]
    assert load_scenario("solar_day").time_scale == 600
    kinds = {f.kind for f in load_scenario("faults").faults}
    assert {"freeze", "vanish", "invalid", "fets_open"} <= kinds


def _base() -> dict:
    return json.loads((SCENARIO_DIR / "default.json").read_text())


def test_bad_soc_names_path_and_value():
    data = _base()
    data["packs"][1]["soc"] = 150
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(data)
    msg = str(ei.value)
    assert "packs[1].soc" in msg and "150" in msg and "100" in msg


def test_duplicate_service_rejected():
    data = _base()
    data["packs"][2]["service"] = "sim_a"
    with pytest.raises(ScenarioError, match=r"packs\[2\]\.service.*'sim_a'"):
        parse_scenario(data)


def test_unknown_key_rejected(tmp_path):
    data = _base()
    data["packs"][0]["colour"] = "red"
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(ScenarioError) as ei:
        load_scenario(f)
    msg = str(ei.value)
    assert "packs[0].colour" in msg and "'red'" in msg
    assert isinstance(ei.value, ValueError)


def test_other_bad_scenarios(tmp_path):
    data = _base()
    data["faults"] = [{"at": 1, "pack": "sim_z", "kind": "freeze"}]
    with pytest.raises(ScenarioError, match=r"faults\[0\]\.pack.*'sim_z'.*sim_a"):
        parse_scenario(data)
    data = _base()
    data["packs"][0]["service"] = "sim-a"
    with pytest.raises(ScenarioError, match=r"packs\[0\]\.service.*'sim-a'"):
        parse_scenario(data)
    data = _base()
    data["profile"] = {"kind": "ramp"}
    with pytest.raises(ScenarioError, match=r"profile.*'ramp'"):
        parse_scenario(data)
    data = _base()
    data["faults"] = [{"at": 1, "pack": "sim_a", "kind": "freeze", "delay": 3}]
    with pytest.raises(ScenarioError, match="slow"):
        parse_scenario(data)
    data["faults"] = [{"at": 1, "pack": "sim_a", "kind": "slow"}]
    assert parse_scenario(data).faults[0].delay == 5.0
    with pytest.raises(ScenarioError, match="unknown scenario"):
        load_scenario("no_such_scenario")
    f = tmp_path / "broken.json"
    f.write_text("{not json")
    with pytest.raises(ScenarioError, match="line 1"):
        load_scenario(f)
