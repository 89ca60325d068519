"""Pure tests of the configuration (aggregator/config.py): users' files load, mistakes are explained."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aggregator.config import (DEFAULT_SERVICE_NAME, Config, ConfigError, load_config, parse_config,
                               semantic_errors)

B = "com.victronenergy.battery."

USER_CONFIG: dict[str, Any] = {
    "serviceName": B + "bank",
    "excludedServices": [B + "ttyS1"],
    "primaryServices": {B + "ttyS5": ["/Soc"], B + "leastPrecedence": ["/Dc/0/Current"]},
    "auxiliaryServices": [B + "defaultMetadata", "name:Metadata"],
    "capacity": 200,
    "virtualBatteries": {
        B + "virtual1": [B + "ttyS6", B + "ttyUSB0", "class:hooks.CustomChargingHook#b1",
                         "class:hooks.FixedValueHook"],
        B + "virtual2": {B + "ttyS7": ["/Soc"], "serial:1234": [], "class:hooks.TemperatureChargingHook": [],
                         "class:hooks.CustomNameHook": []},
    },
    "classes": {
        "hooks.CustomChargingHook#b1": {"ccls": {"46": 128, "51": 64, "52": 32, "52.5": 0},
                                        "dcls": {"44": 0, "46": 200}},
        "hooks.TemperatureChargingHook": {"ccls": {"0": 10, "5": 100, "45": 0}},
        "hooks.FixedValueHook": {"path": "/Info/Location", "value": "shed"},
        "hooks.CustomNameHook": {"customName": "Left rack"},
    },
    "currentRatioMethod": "capacity",
    "ir": {"maxPercentageError": 0.2, "minVoltageChange": 0.05},
    "cclMode": "battery",
    "cvlMode": "max_when_floating",
    "logLevel": "DEBUG",
    "reconnectTimeout": 120,
    "startupBatteryWait": 10,
    "expectedBatteries": 3,
}


def test_a_full_user_config_loads():
    config = parse_config(json.loads(json.dumps(USER_CONFIG)))
    assert config.serviceName == B + "bank"
    assert config.primaryServices == {B + "ttyS5": ["/Soc"], B + "leastPrecedence": ["/Dc/0/Current"]}
    assert config.auxiliaryServices == [B + "defaultMetadata", "name:Metadata"]
    assert config.capacity == 200
    assert isinstance(config.virtualBatteries[B + "virtual1"], list)
    assert config.virtualBatteries[B + "virtual2"][B + "ttyS7"] == ["/Soc"]
    assert config.ir.maxPercentageError == 0.2 and config.ir.minVoltageChange == 0.05
    assert (config.cclMode, config.cvlMode, config.logLevel) == ("battery", "max_when_floating", "DEBUG")
    assert (config.reconnectTimeout, config.startupBatteryWait, config.expectedBatteries) == (120, 10, 3)
    assert config.model_dump(exclude_unset=True).keys() == USER_CONFIG.keys()


@pytest.mark.parametrize("extra", [
    {"logLevel": "NOTSET"}, {"cvlMode": "dvcc"}, {"cvlMode": "min_when_balancing"}, {"cvlMode": "max_always"},
    {"currentRatioMethod": "count"}, {"currentRatioMethod": "ir"}, {"cclMode": "dvcc"},
    {"cclMode": "battery+dvcc"}, {"primaryServices": [B + "a"]}, {"auxiliaryServices": {B + "a": []}},
    {"excludedServices": ["name:Shunt", "serial:XYZ"]}, {"capacity": 280.5},
])
def test_each_value_users_have_loads(extra):
    config = parse_config(extra)
    for key, value in extra.items():
        assert getattr(config, key) == value


def test_defaults():
    for config in (parse_config({}), Config()):
        assert config.serviceName == DEFAULT_SERVICE_NAME == "com.victronenergy.battery.aggregator"
        assert config.excludedServices == [] and config.primaryServices == [] and config.auxiliaryServices == []
        assert config.capacity is None and config.virtualBatteries == {} and config.classes == {}
        assert config.currentRatioMethod == "share"  # the learned shares: see the simulated day in docs/charge-limits.md
        assert config.ir.maxPercentageError == 0.1 and config.ir.minVoltageChange == 0.02
        assert config.cclMode == "battery+dvcc" and config.cvlMode == "max_when_balancing"
        assert config.logLevel == "INFO" and config.reconnectTimeout == 60 and config.startupBatteryWait == 30
        assert config.expectedBatteries is None


def error_of(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


@pytest.mark.parametrize("data,words", [
    ({"cclMode": "bms"}, ["cclMode", "'bms'", "'battery+dvcc'", "'battery'", "'dvcc'"]),
    ({"cvlMode": "max"}, ["cvlMode", "'max'", "max_when_balancing"]),
    ({"currentRatioMethod": "IR"}, ["currentRatioMethod", "'IR'", "'capacity'"]),
    ({"logLevel": "verbose"}, ["logLevel", "'verbose'", "'DEBUG'"]),
    ({"capacity": -5}, ["capacity", "-5", "greater than 0"]),
    ({"capacity": "lots"}, ["capacity", "'lots'"]),
    ({"ir": {"maxPercentageError": 2}}, ["ir.maxPercentageError", "2", "less than or equal to 1"]),
    ({"ir": {"minVoltage": 1}}, ["ir.minVoltage", "unknown key"]),
    ({"reconnectTimeout": -1}, ["reconnectTimeout", "-1"]),
    ({"startupBatteryWait": 1e9}, ["startupBatteryWait"]),
    ({"expectedBatteries": 0}, ["expectedBatteries", "0"]),
    ({"serviceName": "com.victronenergy.solarcharger.x"}, ["serviceName", "com.victronenergy.solarcharger.x",
                                                          "pattern"]),
    ({"excludedServices": "com.victronenergy.battery.x"}, ["excludedServices", "valid array"]),
    ({"primaryServices": 5}, ["primaryServices", "array", "object", "5"]),
    ({"virtualBatteries": {B + "v": {B + "a": "/Soc"}}}, ['virtualBatteries."com.victronenergy.battery.v"',
                                                         "'/Soc'"]),
    ({"exludedServices": []}, ["exludedServices", "unknown key"]),
])
def test_type_errors_name_key_value_and_what_is_allowed(data, words):
    message = error_of(data)
    assert message.startswith("invalid config")
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("data,words", [
    ({"excludedServices": [B + "x"], "primaryServices": [B + "x"]},
     ["primaryServices[0]", B + "x", "also listed in excludedServices", "one role"]),
    ({"auxiliaryServices": {B + "x": []}, "virtualBatteries": {B + "v": [B + "x"]}},
     ['virtualBatteries."com.victronenergy.battery.v"[0]', "auxiliaryServices"]),
    ({"virtualBatteries": {B + "v1": [B + "x"], B + "v2": [B + "x"]}}, ["v2", "also listed", "v1"]),
    ({"virtualBatteries": {B + "v": [B + "v"]}}, ["cannot contain itself"]),
    ({"virtualBatteries": {B + "v": [B + "w"], B + "w": [B + "a"]}}, ["cannot contain another virtual battery",
                                                                      B + "w"]),
    ({"virtualBatteries": {B + "v": [DEFAULT_SERVICE_NAME]}}, ["is the aggregate itself"]),
    ({"virtualBatteries": {DEFAULT_SERVICE_NAME: [B + "a"]}}, ["own serviceName"]),
    ({"virtualBatteries": {"virtual1": [B + "a"]}}, ["'virtual1'", "must be com.victronenergy.battery.<name>"]),
    ({"excludedServices": ["ttyS1"]}, ["excludedServices[0]", "'ttyS1'", "name:<CustomName>", "serial:<Serial>"]),
    ({"primaryServices": {"name:": ["/Soc"]}}, ['primaryServices."name:"', "is not"]),
    ({"auxiliaryServices": [B]}, ["auxiliaryServices[0]", "is not"]),
    ({"virtualBatteries": {B + "v": ["serial:"]}}, ["'serial:'", "class:<hooks.Class>"]),
    ({"virtualBatteries": {B + "v": ["class:hooks.Nope"]}}, ["[0]", "unknown hook class", "hooks.Nope"]),
    ({"virtualBatteries": {B + "v": ["class:hooks.CustomChargingHook#b9"]}}, ["no entry", "#b9"]),
    ({"virtualBatteries": {B + "v": ["class:hooks.CustomChargingHook"]},
      "classes": {"hooks.CustomChargingHook": {"ccls": {"fifty": 10}}}},
     ["classes.hooks.CustomChargingHook.ccls", "'fifty'", "not a number"]),
])
def test_semantic_errors(data, words):
    message = error_of(data)
    for word in words:
        assert word in message, message
    assert semantic_errors(Config.model_validate(data))


def test_several_errors_are_all_reported():
    message = error_of({"excludedServices": ["a", "b"], "primaryServices": ["c"]})
    assert "(3 errors)" in message
    assert all(f"'{ref}'" in message for ref in "abc")


def test_load_config_file(tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(USER_CONFIG), encoding="utf-8")
    assert load_config(path).serviceName == B + "bank"
    assert load_config(str(path)).capacity == 200


def test_duplicate_json_keys_are_an_error(tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text('{"capacity": 100,\n "excludedServices": [],\n "capacity": 200}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "duplicate key 'capacity'" in str(info.value) and str(path) in str(info.value)
    nested = tmp_path / "nested.json"
    nested.write_text('{"ir": {"minVoltageChange": 0.1, "minVoltageChange": 0.2}}', encoding="utf-8")
    with pytest.raises(ConfigError, match="duplicate key 'minVoltageChange'"):
        load_config(nested)


def test_bad_json_and_missing_file(tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text('{"capacity": 100,\n}', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"cclMode": "x"}', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"invalid config {bad}: cclMode"):
        load_config(bad)


def test_committed_schema_is_generated_from_the_model_and_valid() -> None:
    import json
    from pathlib import Path

    import jsonschema

    from aggregator.schema import SCHEMA_FILE, config_schema, schema_text

    assert SCHEMA_FILE.read_text() == schema_text(), "run `battery-aggregator schema --write`"
    schema = json.loads(Path(SCHEMA_FILE).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(config_schema())
    assert not list(validator.iter_errors({"currentRatioMethod": "ir", "virtualBatteries": {
        "com.victronenergy.battery.v": ["com.victronenergy.battery.a", "class:hooks.FixedValueHook"]}}))
    assert list(validator.iter_errors({"currentRatioMethod": "magic"}))
    assert list(validator.iter_errors({"reconectTimeout": 5}))  # unknown key (a typo)
    for key, spec in schema["properties"].items():
        assert "description" in spec, f"{key} has no description"


def test_every_key_of_every_section_has_a_meaning() -> None:
    from aggregator.schema import config_schema

    schema = config_schema()
    missing = [f"{name}.{key}" for name, section in [("", schema), *schema["$defs"].items()]
               for key, spec in section.get("properties", {}).items() if not spec.get("description")]
    assert not missing, f"keys without a description in the model: {missing}"


def test_committed_configuration_reference_is_generated_from_the_model() -> None:
    from aggregator.schema import DOCS_FILE, config_reference

    assert DOCS_FILE.read_text() == config_reference(), "run `battery-aggregator schema --write`"


def test_the_configuration_reference_gives_every_key_its_type_default_and_meaning() -> None:
    from aggregator.schema import config_reference

    text = config_reference()
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    assert rows["reconnectTimeout"] == ("| `reconnectTimeout` | number, >= 0, <= 86400 | `60.0` | seconds a vanished "
                                        "member is kept |")
    assert "| `limits` | object: [`limits`](#limits) | see [`limits`](#limits) |" in rows["limits"]
    assert "| `meter` | text or integer | required |" in rows["meter"]
    assert "object: [`adapter`](#adapter) or `null` | `null` | state of charge (%) |" in rows["soc"]
    assert "`[]`" in rows["primaryServices"] and "`{}`" in rows["virtualBatteries"]
    assert "&lt;topicPrefix&gt;/&lt;siteId&gt;/state" in rows["topicPrefix"]  # not an HTML tag on GitHub
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert "`dispatcher.batteries[]`" in headings and "`adapter`" in headings and "`coop.peers.<key>`" in headings


def test_path_typos_are_errors_with_a_suggestion_and_unknown_paths_warnings(tmp_path) -> None:
    from aggregator.config import check_config_file

    path = tmp_path / "config.json"
    path.write_text('{\n  "primaryServices": {"com.victronenergy.battery.shunt":\n'
                    '    ["/SOC", "/Dc/0/Volt", "/Dc/1/Voltage", "/Vendor/Thing", "Soc"]},\n'
                    '  "auxiliaryServices": ["com.victronenergy.battery.shunt"]\n}\n')
    result = check_config_file(path)
    assert result.config is None
    text = "\n".join(result.errors)
    assert "'/SOC' is not a battery path: did you mean /Soc?" in text
    assert "'/Dc/0/Volt' is not a battery path: did you mean /Dc/0/Voltage?" in text
    assert "'Soc' is not a D-Bus path" in text
    assert '[0]' in text and "(line 3, column 6)" in text  # where /SOC stands
    assert "also listed in primaryServices" in text and "auxiliaryServices[0]" in text
    assert "/Dc/1/Voltage" not in text  # a real second-input path, not a typo of /Dc/0/Voltage
    assert len(result.warnings) == 1 and "'/Vendor/Thing' is not a known battery path" in result.warnings[0]


def test_errors_carry_line_and_column(tmp_path) -> None:
    from aggregator.config import ConfigError, load_config

    path = tmp_path / "config.json"
    path.write_text('{\n  "serviceName": "com.victronenergy.battery.aggregator",\n  "cvlMode": "maximal"\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "cvlMode" in str(info.value) and "'maximal'" in str(info.value) and "line 3, column 14" in str(info.value)


def check_text(tmp_path: Path, text: str) -> list[str]:
    from aggregator.config import check_config_file

    path = tmp_path / "config.json"
    path.write_text(text)
    return check_config_file(path).errors


@pytest.mark.parametrize("text,expected", [
    # judged as the schema says: a string is no number, 1 is no flag; 3.0 is an integer in JSON Schema
    ('{"reconnectTimeout": "60"}', ["reconnectTimeout: Input should be a valid number (got '60')"]),
    ('{"coop": {"enabled": 1}}', ["coop.enabled: Input should be a valid boolean (got 1)"]),
    ('{"capacity": true}', ["capacity: Input should be a valid number (got True)"]),
    ('{"expectedBatteries": 3.5}', ["expectedBatteries: Input should be a valid integer (got 3.5)"]),
    ('{"expectedBatteries": 3.0, "energy": {"httpPort": 8080.0}}', []),
    # a failed union shows the choice the value's type picks: the list form names the bad member only
    ('{"virtualBatteries": {"com.victronenergy.battery.v": ["com.victronenergy.battery.a", 1]}}',
     ['virtualBatteries."com.victronenergy.battery.v"[1]: Input should be a valid string (got 1)']),
    ('{"primaryServices": {"serial:A": "/Soc"}}', ['primaryServices."serial:A": Input should be a valid array']),
    ('{"gridBatteries": [{"meter": [30], "startDate": "2024-01-01"}]}',
     ["gridBatteries[0].meter: Input should be a valid string", "gridBatteries[0].meter: Input should be a valid "
      "integer"]),
])
def test_values_are_judged_as_the_schema_says(tmp_path: Path, text: str, expected: list[str]) -> None:
    errors = [e.rsplit(" (line ", 1)[0] for e in check_text(tmp_path, text)]
    assert [e.split(" (got ")[0] for e in errors] == [e.split(" (got ")[0] for e in expected]
    assert errors == expected or all(" (got " not in e for e in expected)


@pytest.mark.parametrize("text,expected", [
    ('{"reconectTimeout": 5}', "reconectTimeout: unknown key: did you mean reconnectTimeout? (got 5)"),
    ('{"ServiceName": "x"}', "ServiceName: unknown key: did you mean serviceName? (keys are case-sensitive)"),
    ('{"limits": {"rampUprate": 1}}', "limits.rampUprate: unknown key: did you mean rampUpRate? (keys are"),
    ('{"coop": {"broker": {"hots": "x"}}}', "coop.broker.hots: unknown key: did you mean host?"),
    ('{"energy": {"members": {"serial:A": {"counterkind": "daily"}}}}',
     'energy.members."serial:A".counterkind: unknown key: did you mean counterKind?'),
    ('{"dispatcher": {"batteries": [{"nme": "a"}]}}', "dispatcher.batteries[0].nme: unknown key: did you mean name?"),
    ('{"frobnicate": 1}', "frobnicate: unknown key (extra keys are not allowed) (got 1)"),
])
def test_unknown_keys_get_the_closest_allowed_key(tmp_path: Path, text: str, expected: str) -> None:
    errors = check_text(tmp_path, text)
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize("text,expected", [
    ('{"logLevel": "INFO",}', "line 1 column 21: Expecting property name enclosed in double quotes (hint: JSON "
                              "allows no comma before }: remove the comma at line 1 column 20)"),
    ('{\n  "excludedServices": [\n    "serial:A",\n  ]\n}',
     "line 4 column 3: Expecting value (hint: JSON allows no comma before ]: remove the comma at line 3 column 15)"),
    ('{\n  // the bank\n  "capacity": 100\n}', "line 2 column 3: Expecting property name enclosed in double "
                                              "quotes (hint: JSON has no comments: remove the comment)"),
    ('{"capacity": 100 /* Ah */}', "(hint: JSON has no comments: remove the comment)"),
    ('{"capacity": NaN}', "line 1 column 14: NaN is not a JSON number"),
    ('{"capacity": 100 100}', "line 1 column 18: Expecting ',' delimiter"),
    # what a browser cannot read either, and what would exhaust the decoder: errors, never a crash
    ('{"classes": {"x": {"v": -1e999}}}', "line 1 column 25: -1e999 is out of the range of a number"),
    ('{"capacity": 1' + "0" * 5000 + "}", "line 1 column 14: 10000000000000000000... is out of the range"),
    ("[" * 100000, "line 1 column 65: nested more than 64 levels deep"),
    ('{"a": 1,}' + "[" * 100, "line 1 column 9: Expecting property name enclosed in double quotes (hint:"),
])
def test_json_mistakes_get_a_hint(tmp_path: Path, text: str, expected: str) -> None:
    errors = check_text(tmp_path, text)
    assert len(errors) == 1 and expected in errors[0], errors
    assert "(hint:" not in errors[0] or "(hint:" in expected
