"""Pure tests of the virtual battery hooks (aggregator/hooks.py)."""
from __future__ import annotations

import pytest

from aggregator.battery.hooks import (CustomChargingHook, CustomNameHook, FixedValueHook, HookConfigError,
                                      TemperatureChargingHook, build_hook, hook_class, look_up, parse_table)

CCLS = {"46": 128, "51": 64, "52": 32, "52.5": 0}
DCLS = {"44": 0, "46": 100, "48": 200}
CLASSES = {"hooks.CustomChargingHook#b1": {"ccls": CCLS, "dcls": DCLS},
           "hooks.TemperatureChargingHook": {"ccls": {"0": 10, "5": 50, "45": 0}},
           "hooks.FixedValueHook#soc": {"path": "/Soc", "value": 50},
           "hooks.CustomNameHook": {"customName": "Bank"}}

CCL, DCL = "/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent"


@pytest.mark.parametrize("voltage,ccl,dcl", [
    (46.0, 128, 100), (50.99, 128, 200), (51.0, 64, 200), (52.2, 32, 200), (52.5, 0, 200), (60.0, 0, 200),
    (45.0, None, 0),
])
def test_voltage_table(voltage, ccl, dcl):
    hook = build_hook("hooks.CustomChargingHook#b1", CLASSES)
    assert isinstance(hook, CustomChargingHook)
    out = hook.outputs({"/Dc/0/Voltage": voltage, "/Dc/0/Temperature": 100})
    assert out.get(CCL) == ccl
    assert out.get(DCL) == dcl


def test_below_the_lowest_threshold_nothing_is_set():
    hook = build_hook("hooks.CustomChargingHook#b1", CLASSES)
    assert hook.outputs({"/Dc/0/Voltage": 40.0}) == {}
    assert hook.outputs({}) == {}
    assert hook.outputs({"/Dc/0/Voltage": None}) == {}


def test_unsorted_keys_are_read_in_file_order_last_match_wins():
    table = parse_table("e", "ccls", {"52": 32, "46": 128})
    assert table == [(52.0, 32.0), (46.0, 128.0)]
    assert look_up(table, 53) == 128.0  # both reached: the later entry in the file wins
    assert look_up(table, 50) == 128.0
    assert look_up(table, 45) is None
    assert look_up(table, "53") is None and look_up(table, True) is None


def test_temperature_table_uses_the_temperature():
    hook = build_hook("hooks.TemperatureChargingHook", CLASSES)
    assert isinstance(hook, TemperatureChargingHook)
    assert hook.outputs({"/Dc/0/Temperature": 20.0, "/Dc/0/Voltage": 0.0}) == {CCL: 50.0}
    assert hook.outputs({"/Dc/0/Temperature": 50.0}) == {CCL: 0.0}
    assert hook.outputs({"/Dc/0/Temperature": -5.0, "/Dc/0/Voltage": 99.0}) == {}


def test_fixed_value_hook_always_wins():
    hook = build_hook("hooks.FixedValueHook#soc", CLASSES)
    assert isinstance(hook, FixedValueHook) and hook.always_wins
    assert hook.outputs({"/Soc": 80}) == {"/Soc": 50}
    assert FixedValueHook("x", "/Info/Location").outputs({}) == {"/Info/Location": None}
    assert not CustomChargingHook.always_wins


def test_custom_name_hook():
    assert build_hook("hooks.CustomNameHook", CLASSES).outputs({}) == {"/CustomName": "Bank"}
    assert isinstance(build_hook("hooks.CustomNameHook", CLASSES), CustomNameHook)


@pytest.mark.parametrize("entry", ["CustomChargingHook", "aggregator.hooks.CustomChargingHook#x",
                                   "hooks.CustomChargingHook"])
def test_class_names_users_write(entry):
    assert hook_class(entry) is CustomChargingHook


@pytest.mark.parametrize("entry,classes,words", [
    ("hooks.NoSuchHook", {}, ["hooks.NoSuchHook", "unknown", "hooks.CustomChargingHook"]),
    ("os.system", {}, ["os.system", "unknown"]),
    ("hooks.CustomChargingHook#b2", CLASSES, ["hooks.CustomChargingHook#b2", "no entry"]),
    ("hooks.CustomChargingHook#z", {"hooks.CustomChargingHook#z": {}}, ["classes.hooks.CustomChargingHook#z",
                                                                        "ccls"]),
    ("hooks.CustomChargingHook#z", {"hooks.CustomChargingHook#z": {"ccls": {"high": 5}}},
     ["classes.hooks.CustomChargingHook#z.ccls", "'high'", "not a number"]),
    ("hooks.CustomChargingHook#z", {"hooks.CustomChargingHook#z": {"ccls": {"nan": 5}}},
     ["classes.hooks.CustomChargingHook#z.ccls", "'nan'", "not a number"]),
    ("hooks.CustomChargingHook#z", {"hooks.CustomChargingHook#z": {"ccls": {"46": 5, "Infinity": 0}}},
     ["classes.hooks.CustomChargingHook#z.ccls", "'Infinity'", "not a number"]),
    ("hooks.CustomChargingHook#z", {"hooks.CustomChargingHook#z": {"dcls": {"48": -1}}},
     ["classes.hooks.CustomChargingHook#z.dcls.48", "-1"]),
    ("hooks.CustomChargingHook#z", {"hooks.CustomChargingHook#z": {"dcls": {"48": "10"}}},
     ["dcls.48", "'10'"]),
    ("hooks.CustomChargingHook#z", {"hooks.CustomChargingHook#z": {"dcls": [1, 2]}}, ["dcls", "[1, 2]"]),
    ("hooks.CustomChargingHook#z", {"hooks.CustomChargingHook#z": {"ccls": CCLS, "cls": {}}},
     ["classes.hooks.CustomChargingHook#z", "cls"]),
    ("hooks.FixedValueHook", {"hooks.FixedValueHook": {"path": "Soc", "value": 1}},
     ["classes.hooks.FixedValueHook.path", "'Soc'"]),
    ("hooks.FixedValueHook", {"hooks.FixedValueHook": {"value": 1}}, ["classes.hooks.FixedValueHook", "path"]),
])
def test_errors_name_the_key(entry, classes, words):
    with pytest.raises(HookConfigError) as info:
        build_hook(entry, classes)
    for word in words:
        assert word in str(info.value)
