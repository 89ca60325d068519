"""The browser config generator (config_generator/index.html) in a real headless Chromium.

Needs the pip package `selenium` and Debian's `chromium` and `chromium-driver`; without them the browser tests
are skipped (the test that index.html is up to date always runs).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from aggregator.config import parse_config

from .helpers import load_script
from .test_config import USER_CONFIG

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "config_generator"
PAGE = GENERATOR / "index.html"
B = "com.victronenergy.battery."
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def load_build():  # type: ignore[no-untyped-def]
    return load_script("config_generator/build.py")


def test_committed_page_is_what_build_py_makes_from_the_schema() -> None:
    assert PAGE.read_text(encoding="utf-8") == load_build().render(), \
        "config_generator/index.html is out of date: run .venv/bin/python config_generator/build.py"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("the pip package selenium is not installed (pip install selenium)")
    binary = next((p for p in CHROMIUM if Path(p).exists()), shutil.which("chromium"))
    driver_path = next((p for p in DRIVER if Path(p).exists()), shutil.which("chromedriver"))
    if binary is None or driver_path is None:
        pytest.skip("no browser: install the Debian packages chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="cfg-gen-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except Exception as exc:  # noqa: BLE001 (any failure to start means: no usable browser here)
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"chromium could not be started via {driver_path}: {str(exc).splitlines()[0]}")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Any:
    browser.get(PAGE.as_uri())
    browser.find_element("id", "export")  # loaded
    return browser


def by_loc(driver: Any, loc: list[Any]) -> Any:
    return driver.find_element("css selector", f"[data-loc='{json.dumps(loc, separators=(',', ':'))}']")


def click(driver: Any, text: str, nth: int = 0) -> None:
    buttons = [b for b in driver.find_elements("css selector", "button") if b.text == text]
    assert buttons, f"no button {text!r}"
    buttons[nth].click()


def type_into(element: Any, text: str) -> None:
    element.clear()
    element.send_keys(text)


def exported(driver: Any) -> Any:
    return json.loads(driver.find_element("id", "export").get_property("value"))


def problems(driver: Any) -> str:
    return driver.find_element("id", "problems").text


def import_json(driver: Any, text: str) -> None:
    area = driver.find_element("id", "import-text")
    driver.execute_script("arguments[0].value = arguments[1];", area, text)
    driver.find_element("id", "import-btn").click()
    assert "imported" in driver.find_element("id", "import-status").text


def js_errors(driver: Any) -> list[str]:
    try:
        logs = driver.get_log("browser")
    except Exception:  # noqa: BLE001 (not every driver keeps a log)
        return []
    return [entry["message"] for entry in logs if entry.get("level") == "SEVERE"]


def test_a_config_built_in_the_form_is_accepted_by_the_python_model(page: Any) -> None:
    from selenium.webdriver.support.ui import Select

    assert exported(page) == {}
    assert "OK" in page.find_element("id", "problems-summary").text
    type_into(by_loc(page, ["serviceName"]), B + "bank")
    click(page, "Add excluded service")
    page.switch_to.active_element.send_keys("name:Shunt")
    Select(by_loc(page, ["currentRatioMethod"])).select_by_value("capacity")
    click(page, "Add virtual battery")
    type_into(page.find_element("id", "vbname0"), B + "pack_a")
    click(page, "Add member")
    page.switch_to.active_element.send_keys("serial:A1")
    click(page, "Add member")
    page.switch_to.active_element.send_keys("name:BMS A")
    hook_kind = page.find_element("css selector", ".vb select")
    Select(hook_kind).select_by_value("CustomChargingHook")
    page.find_element("css selector", ".vb input.short").send_keys("a")
    click(page, "Add hook")
    entry = "hooks.CustomChargingHook#a"
    for threshold, amps in (("0", "40"), ("54.4", "20"), ("55.2", "5")):
        click(page, "Add ccls row")
        row = page.switch_to.active_element
        type_into(row, threshold)
        loc = json.dumps(["classes", entry, "ccls", threshold], separators=(",", ":"))
        type_into(page.find_element("css selector", f"input[type=number][data-loc='{loc}']"), amps)
    # the hook first: it overrides the members
    page.find_element("css selector", "[aria-label='move member 3 up']").click()
    page.find_element("css selector", "[aria-label='move member 2 up']").click()
    expected = {
        "serviceName": B + "bank",
        "excludedServices": ["name:Shunt"],
        "currentRatioMethod": "capacity",
        "virtualBatteries": {B + "pack_a": ["class:" + entry, "serial:A1", "name:BMS A"]},
        "classes": {entry: {"ccls": {"0": 40, "54.4": 20, "55.2": 5}}},
    }
    data = exported(page)
    assert data == expected
    assert list(data["classes"][entry]["ccls"]) == ["0", "54.4", "55.2"]  # table order kept
    config = parse_config(data)
    assert config.serviceName == B + "bank" and config.excludedServices == ["name:Shunt"]
    assert config.currentRatioMethod == "capacity"
    assert config.virtualBatteries == expected["virtualBatteries"] and config.classes == expected["classes"]
    assert "OK" in page.find_element("id", "problems-summary").text, problems(page)
    assert not js_errors(page)


def readme_examples() -> list[dict[str, Any]]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```json\n(.*?)```", readme, re.S):
        text = block.strip()
        out.append(json.loads(text if text.startswith("{") else "{" + text + "}"))
    assert out, "README.md has no json example"
    return out


ODD_BUT_KEPT = {  # what a user's file may hold: defaults spelled out, odd table order, unknown keys, bad values
    "serviceName": "com.victronenergy.battery.aggregator", "ir": {"minVoltageChange": 0.02},
    "limits": {"rampUpRate": 3, "staleAfter": 60}, "capacity": None, "primaryServices": [],
    "classes": {"hooks.TemperatureChargingHook#t": {"ccls": {"45": 0, "5": 100, "0": 10}, "dcls": {}}},
    "virtualBatteries": {B + "v": {"class:hooks.TemperatureChargingHook#t": [], "name:A": ["/Soc", "/Dc/0/Voltage"]}},
    "someOldKey": {"x": [1, 2]}, "cvlMode": "maximal",
}


@pytest.mark.parametrize("config", readme_examples() + [USER_CONFIG, ODD_BUT_KEPT],
                         ids=lambda c: ",".join(list(c)[:3]))
def test_import_then_export_gives_the_same_json(page: Any, config: dict[str, Any]) -> None:
    import_json(page, json.dumps(config, indent=2))
    data = exported(page)
    assert data == config
    for key in ("classes",):  # the order of every table is kept (hooks read them in file order)
        for name, options in config.get(key, {}).items():
            for table in ("ccls", "dcls"):
                if table in options:
                    assert list(data[key][name][table]) == list(options[table])
    if config is not ODD_BUT_KEPT:
        assert "OK" in page.find_element("id", "problems-summary").text, problems(page)
    assert not js_errors(page)


def test_live_validation_names_key_value_and_what_is_allowed(page: Any) -> None:
    import_json(page, json.dumps({"currentRatioMethod": "magic",
                                  "primaryServices": {B + "x": ["/SOC"]},
                                  "excludedServices": [B + "x"]}))
    text = problems(page)
    assert "currentRatioMethod" in text and "'magic'" in text and "'share'" in text
    assert "did you mean /Soc" in text
    assert f'primaryServices."{B}x": \'{B}x\' is also listed in excludedServices' in text
    assert "error" in page.find_element("id", "problems-summary").text
    # the select shows the bad value and is marked; choosing an allowed one clears the error
    select = by_loc(page, ["currentRatioMethod"])
    assert select.get_attribute("aria-invalid") == "true"
    from selenium.webdriver.support.ui import Select
    Select(select).select_by_value("count")
    assert "magic" not in problems(page)
    # more of the Python checker's semantic checks
    import_json(page, json.dumps({
        "virtualBatteries": {"virtual1": ["ttyS1", "class:hooks.Nope"],
                             B + "v": ["class:hooks.CustomChargingHook#b", "name:B"]},
        "classes": {"hooks.CustomChargingHook#b": {"ccls": {"fifty": 10}}, "hooks.FixedValueHook": {"path": "/Dc/0/Volt"}}}))
    text = problems(page)
    assert "'virtual1' must be com.victronenergy.battery.<name>" in text
    assert 'virtualBatteries.virtual1[0]: \'ttyS1\' is not a full service name' in text
    assert "unknown hook class 'hooks.Nope'; allowed: hooks.FixedValueHook" in text
    assert "classes.hooks.CustomChargingHook#b.ccls: threshold 'fifty' is not a number" in text
    assert "configures a hook that no virtual battery uses" in text
    assert not js_errors(page)


def test_screenshot_of_a_filled_config(page: Any) -> None:
    import_json(page, json.dumps(USER_CONFIG))
    page.set_window_size(1300, 4200)
    path = Path(tempfile.gettempdir()) / "config_generator.png"
    page.save_screenshot(str(path))
    assert path.stat().st_size > 10000


SEMANTIC_CASES = [
    {"gridBatteries": [{"meter": 31, "startDate": "2024-01-01", "serviceName": B + "g2", "deviceInstance": 7},
                       {"meter": 32, "startDate": "2024-01-01", "serviceName": B + "g3", "deviceInstance": 7},
                       {"meter": 33, "startDate": "2024-01-01", "serviceName": B + "g2"}]},
    {"excludedServices": [B + "x"], "primaryServices": [B + "x"]},
    {"auxiliaryServices": {B + "x": []}, "virtualBatteries": {B + "v": [B + "x"]}},
    {"virtualBatteries": {B + "v1": [B + "x"], B + "v2": [B + "x"]}},
    {"virtualBatteries": {B + "v": [B + "v"]}},
    {"virtualBatteries": {B + "v": [B + "w"], B + "w": [B + "a"]}},
    {"virtualBatteries": {B + "v": ["com.victronenergy.battery.aggregator"]}},
    {"excludedServices": ["ttyS1"], "primaryServices": {"name:": ["/Soc"]}, "auxiliaryServices": [B]},
    {"virtualBatteries": {B + "v": ["serial:", "class:hooks.Nope", "class:hooks.CustomChargingHook#b9"]}},
    {"virtualBatteries": {B + "v": {"class:hooks.FixedValueHook": [], "name:A": ["/SOC", "/Dc/0/Volt", "/Vendor/X",
                                                                                    "Soc", "/Dc/1/Current"]}},
     "classes": {"hooks.FixedValueHook": {"path": "/info/maxchargecurrent"}, "hooks.CustomNameHook": {}}},
]


@pytest.mark.parametrize("data", SEMANTIC_CASES)
def test_semantic_messages_are_the_python_checkers(page: Any, data: dict[str, Any]) -> None:
    from aggregator.config import Config, semantic_issues

    expected = [i.text() for i in semantic_issues(Config.model_validate(data))]
    assert expected
    import_json(page, json.dumps(data))
    shown = [line.split(": ", 1)[1] for line in problems(page).splitlines()]
    assert sorted(shown) == sorted(expected)


# The coop and dispatcher sections: the pydantic validators a JSON schema cannot express (coop/settings.py,
# dispatch/settings.py) have mirrors in the page. One bad config per rule; the page must show what the checker says.
DBUS = {"dbus": {"service": "com.victronenergy.acsystem.socketcan_can0_sys0", "path": "/Ess/InverterPowerSetpoint"}}
MQTT = {"mqtt": {"topic": "home/battery/set"}}


def battery(**changes: Any) -> dict[str, Any]:
    out = {"name": "a", "setpoint": DBUS, "measured": {"dbus": {"service": "com.victronenergy.battery.socketcan_can0",
                                                              "path": "/Dc/0/Power"}},
           "maxChargeW": 3000, "maxDischargeW": 3000}
    out.update(changes)
    return out


def dispatcher(**section: Any) -> dict[str, Any]:
    return {"dispatcher": section}


def coop(**section: Any) -> dict[str, Any]:
    return {"coop": section}


MODEL_CASES = {
    # CoopSettings._complete
    "coop needs siteId": coop(enabled=True, broker={"host": "mqtt.example"}),
    "coop needs broker": coop(enabled=True, siteId="s1"),
    "username is siteId": coop(siteId="s1", broker={"host": "mqtt.example", "username": "s2"}),
    "peer timeout > 2 x publish": coop(publishSeconds=60, peerTimeoutSeconds=120),
    "peer timeout, %g rounds ties to even": coop(publishSeconds=1000.125, peerTimeoutSeconds=2000.25),
    "reserve < curtail.fullPercent": coop(reservePercent=99.5, curtail={"fullPercent": 99.5, "releasePercent": 90}),
    "reserve < default fullPercent": coop(reservePercent=99.5),
    # BrokerSettings, CurtailSettings
    "tls off on the internet": coop(broker={"host": "mqtt.example", "tls": False}),
    "tls off: a mapped 127.0.0.1 is not loopback": coop(broker={"host": "::ffff:127.0.0.1", "tls": False}),
    "release < full": coop(curtail={"releasePercent": 98, "fullPercent": 97.5}),
    "dbus curtail needs service and path": coop(curtail={"adapter": "dbus",
                                                         "service": "com.victronenergy.solarcharger.ttyS1"}),
    # MqttSettings, DispatcherConfig (issue #14: who may command, the device's watchdog)
    "commands from a remote broker need credentials": dispatcher(mqtt={"host": "mqtt.example"}),
    "a client certificate needs its key": dispatcher(mqtt={"host": "127.0.0.1", "tls": True, "certFile": "/c.pem"}),
    "a client certificate needs tls": dispatcher(mqtt={"host": "127.0.0.1", "certFile": "/c.pem", "keyFile": "/k.pem"}),
    "a watchdog shorter than three cycles": dispatcher(cycleSeconds=2, batteries=[battery(setpointTimeoutS=5)]),
    "this site is in peers": coop(siteId="s1", peers={"s2": {"capacityKwh": 10}}),
    # EnergyOptions
    "a report endpoint beyond loopback needs a token": {"energy": {"httpPort": 8088, "httpBind": "0.0.0.0"}},
    # GridBatterySettings
    "start readings go together": {"gridBatteries": [{"meter": 30, "startDate": "2024-01-01", "startImportKwh": 5}]},
    "start level within the capacity": {"gridBatteries": [
        {"meter": 30, "startDate": "2024-01-01", "capacityKwh": 5, "startLevelKwh": 6.5}]},
    "a bad field hides the model's rule": coop(enabled=True, broker={"host": "x", "tls": False}, siteId="bad id"),
    # AdapterSpec, DbusRef, MqttRef
    "adapter: neither": dispatcher(batteries=[battery(measured={})]),
    "adapter: both": dispatcher(batteries=[battery(setpoint={**DBUS, **MQTT})]),
    "topic without wildcards": dispatcher(mqtt={}, batteries=[battery(setpoint={"mqtt": {"topic": "a/#"}})]),
    "topic without empty levels": dispatcher(mqtt={}, batteries=[battery(soc={"mqtt": {"topic": "a//b"}})]),
    "dbus service and path": dispatcher(batteries=[battery(setpoint={"dbus": {"service": "acsystem", "path": "Ac"}})]),
    "dbus ref needs both": dispatcher(batteries=[battery(setpoint={"dbus": {"service": "com.a.b"}})]),
    "scale is not 0": dispatcher(batteries=[battery(soc={**DBUS, "scale": 0})]),
    # BatterySettings
    "capacityWh or capacity": dispatcher(batteries=[battery(capacityWh=5000, capacity=DBUS)]),
    "name printable": dispatcher(batteries=[battery(name=" a"), battery(name="b\tc\u00a0d\u200be\U0001f50b")]),
    "name at most 64": dispatcher(batteries=[battery(name="x" * 65)]),
    "required keys": dispatcher(batteries=[{"name": "a"}]),
    "limit: number or adapter": dispatcher(batteries=[battery(maxChargeW="5 kW", maxDischargeW=-1)]),
    "limit adapter": dispatcher(batteries=[battery(maxChargeW={"dbus": {"service": "com.a.b", "path": "/P"},
                                                               "mqtt": {"topic": "t"}})]),
    # MqttSettings
    "mqtt prefixes and node id": dispatcher(mqtt={"topicPrefix": "a/+", "discoveryPrefix": "ha/", "nodeId": "a b",
                                                  "clientId": "c" * 65}),
    "password needs username": dispatcher(mqtt={"password": ""}),
    "caFile needs tls": dispatcher(mqtt={"caFile": "/data/ca.crt"}),
    # DispatcherConfig
    "service names": dispatcher(gridMeter="grid", serviceName="dispatcher"),
    "gridZero needs gridMeter": dispatcher(mode="gridZero", enabled=True),
    "enabled needs batteries": dispatcher(enabled=True, batteries=[]),
    "unique names": dispatcher(batteries=[battery(), battery()]),
    "names with the same topic": dispatcher(batteries=[battery(name="Pack A"), battery(name="pack-a"),
                                                       battery(name="pack a")]),
    "mqtt adapters need the mqtt section": dispatcher(batteries=[battery(), battery(name="b", maxDischargeW=MQTT)]),
}


def python_check(tmp_path: Path, data: Any) -> tuple[list[str], list[str]]:
    """What check_config.sh says of the config: errors and warnings without their line and column."""
    from aggregator.config import check_config_file

    path = tmp_path / "config.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    result = check_config_file(path)
    plain = [[re.sub(r" \(line \d+, column \d+\)$", "", line) for line in lines]
             for lines in (result.errors, result.warnings)]
    return sorted(plain[0]), sorted(plain[1])


def shown(driver: Any, severity: str) -> list[str]:
    return sorted(line.split(": ", 1)[1] for line in problems(driver).splitlines() if line.startswith(severity + ": "))


@pytest.mark.parametrize("data", list(MODEL_CASES.values()), ids=list(MODEL_CASES))
def test_coop_and_dispatcher_rules_read_as_the_python_checker(page: Any, tmp_path: Path, data: dict[str, Any]) -> None:
    errors, warnings = python_check(tmp_path, data)
    assert errors, "the case should break a rule"
    import_json(page, json.dumps(data))
    assert (shown(page, "error"), shown(page, "warning")) == (errors, warnings)
    assert "error" in page.find_element("id", "problems-summary").text
    assert exported(page) == data
    assert not js_errors(page)


GOOD_COOP_AND_DISPATCHER = {
    "coop": {"enabled": True, "siteId": "rivendell",
             "broker": {"host": "::1", "tls": False, "username": "rivendell", "password": "secret"},
             "publishSeconds": 30.5, "peerTimeoutSeconds": 61.5, "reservePercent": 20,
             "curtail": {"adapter": "dbus", "service": "com.victronenergy.solarcharger.ttyS1", "path": "/Mode",
                         "fullPercent": 98, "releasePercent": 95.5}},
    "dispatcher": {"enabled": True, "mode": "gridZero", "gridMeter": "com.victronenergy.grid.cgwacs_ttyUSB0_mb1",
                   "mqtt": {"host": "mqtt.local", "tls": True, "caFile": "/data/ca.crt", "username": "u",
                            "password": "p", "topicPrefix": "home/dispatcher", "nodeId": "disp-1"},
                   "batteries": [battery(name="Pack A", capacityWh=10000, soc={**DBUS, "scale": 0.5}),
                                 battery(name="Pack B", setpoint=MQTT, measured={"mqtt": {"topic": "home/b/power",
                                                                                          "jsonKey": "battery.power"}},
                                         capacity={"mqtt": {"topic": "home/b/capacity"}, "scale": 1000},
                                         maxChargeW={"mqtt": {"topic": "home/b/max_charge"}}, setpointSign=-1)]},
}


def test_a_good_coop_and_dispatcher_config_is_ok_and_round_trips(page: Any, tmp_path: Path) -> None:
    assert python_check(tmp_path, GOOD_COOP_AND_DISPATCHER) == ([], [])
    import_json(page, json.dumps(GOOD_COOP_AND_DISPATCHER, indent=2))
    assert "OK" in page.find_element("id", "problems-summary").text, problems(page)
    assert exported(page) == GOOD_COOP_AND_DISPATCHER
    # editing in the form: the rule's message is shown at the field it names, which is marked
    field = by_loc(page, ["coop", "peerTimeoutSeconds"])
    type_into(field, "61")
    assert "coop: peerTimeoutSeconds (61) must be more than twice publishSeconds (30.5)" in problems(page)
    assert field.get_attribute("aria-invalid") == "true"
    box = page.find_element("css selector", "[data-msgs='[\"coop\",\"peerTimeoutSeconds\"]']")
    assert "must be more than twice publishSeconds" in box.text
    type_into(field, "61.5")
    assert "OK" in page.find_element("id", "problems-summary").text, problems(page)
    assert exported(page) == GOOD_COOP_AND_DISPATCHER
    assert not js_errors(page)


@pytest.mark.parametrize("value", [0.1, 1.0, 2.5, 30.0, 98.0, 99.5, 1000.125, 1000.375, 10.03125, 123456.5,
                                   1234567.0, 1e16, 1.5e-5, 0.0001, 86400.0, 1 / 3])
def test_the_page_formats_floats_as_python(page: Any, value: float) -> None:
    assert page.execute_script("return [floatRepr(arguments[0]), gFormat(arguments[0])]", value) == \
        [repr(value), format(value, "g")]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.255.0.9", "::1", "0:0:0:0:0:0:0:1", "0000::0001",
                                  "::0.0.0.1", "::1%lo", "::1%", "127.0.0.01", "127.1", "128.0.0.1", "::", "::2",
                                  "::ffff:127.0.0.1", "1::1", ":::1", "0:0:0:0:0:0:0:0:1", "[::1]", "LOCALHOST",
                                  "mqtt.example"])
def test_the_page_knows_loopback_hosts_as_python(page: Any, host: str) -> None:
    from aggregator.coop.settings import is_loopback

    assert page.execute_script("return isLoopback(arguments[0])", host) is is_loopback(host)
