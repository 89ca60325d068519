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

from ..helpers import load_script
from ..pure.test_config import USER_CONFIG

REPO = Path(__file__).resolve().parents[3]
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


def open_section(driver: Any, name: str) -> None:
    """Unfold a section of the form (they start folded, but for the general settings)."""
    section = driver.find_element("css selector", f"details[data-section='{name}']")
    if section.get_attribute("open") is None:
        summary = section.find_element("css selector", "summary")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)  # not under a phone's bar
        summary.click()


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
    open_section(page, "virtualBatteries")
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
    open_section(page, "classes")
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
    """The config examples of the README and the docs, each as the page must import and export it."""
    out = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```json\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            text = block.strip()
            out.append(json.loads(text if text.startswith("{") else "{" + text + "}"))
    assert len(out) >= 5, "the README and docs/ lost their json examples"
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
    assert "did you mean /Soc" not in text  # as the checker: the semantic checks need a config the model takes
    assert "error" in page.find_element("id", "problems-summary").text
    # the select shows the bad value and is marked; choosing an allowed one clears the error
    select = by_loc(page, ["currentRatioMethod"])
    assert select.get_attribute("aria-invalid") == "true"
    from selenium.webdriver.support.ui import Select
    Select(select).select_by_value("count")
    text = problems(page)
    assert "magic" not in text
    assert "did you mean /Soc" in text
    assert f'primaryServices."{B}x": \'{B}x\' is also listed in excludedServices' in text
    # more of the Python checker's semantic checks
    import_json(page, json.dumps({
        "virtualBatteries": {"virtual1": ["ttyS1", "class:hooks.Nope"],
                             B + "v": ["class:hooks.CustomChargingHook#b", "name:B"]},
        "classes": {"hooks.CustomChargingHook#b": {"ccls": {"fifty": 10}},
                    "hooks.FixedValueHook": {"path": "/Dc/0/Volt"}}}))
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
    # BrokerConnection's credential rules, in both sections that derive from it
    "coop broker: caFile needs tls": coop(broker={"host": "127.0.0.1", "tls": False, "caFile": "/ca.crt"}),
    "coop broker: a client certificate needs its key": coop(broker={"host": "mqtt.example", "certFile": "/c.pem"}),
    "coop broker: a client certificate needs tls": coop(broker={"host": "::1", "tls": False, "certFile": "/c.pem",
                                                                "keyFile": "/k.pem"}),
    "coop broker: the shared rule before tls on loopback": coop(broker={"host": "mqtt.example", "tls": False,
                                                                        "caFile": "/ca.crt"}),
    # MqttSettings, DispatcherConfig (who may command, the device's watchdog)
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
    open_section(page, "coop")
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
    from aggregator.validation import is_loopback

    assert page.execute_script("return isLoopback(arguments[0])", host) is is_loopback(host)


# ---- One set of configs, judged by the page and by check_config.sh: the same verdict and the same keys named ----
# The rules have one source: config.schema.json (generated from the pydantic model) for types, ranges, patterns and
# keys, which the checker applies strictly as the schema says; the model's validators and semantic_issues() are
# mirrored in the page, which MIRRORED_VALIDATORS lists (test_the_page_mirrors_every_validator_of_the_model).

def _demo_config() -> dict[str, Any]:
    from aggregator_dev.demo import DEMO_CONFIG

    return DEMO_CONFIG


AGREEMENT_CASES: dict[str, Any] = {
    "defaults": {},
    "a user's file": USER_CONFIG,
    "the demo's config": _demo_config(),
    "coop and dispatcher": GOOD_COOP_AND_DISPATCHER,
    "broker connections: a coop password alone, client certificates, keep-alive": {
        "coop": {"enabled": True, "siteId": "s1", "broker": {"host": "mqtt.example", "password": "pw",
                                                             "certFile": "/c.pem", "keyFile": "/k.pem",
                                                             "keepaliveSeconds": 60}},
        "dispatcher": {"mqtt": {"host": "127.0.0.1", "keepaliveSeconds": 5}}},
    "broker connections: keep-alive out of range": {"coop": {"broker": {"host": "x", "keepaliveSeconds": 4}},
                                                    "dispatcher": {"mqtt": {"keepaliveSeconds": 3601}}},
    "3.0 is an integer": {"expectedBatteries": 3.0, "energy": {"httpPort": 8080.0}},
    "a number written as a string": {"reconnectTimeout": "60", "limits": {"staleAfter": "30"}},
    "a flag written as 1 or 'true'": {"coop": {"enabled": 1, "homeAssistant": {"enabled": "true"}}},
    "virtual batteries as a list": {"virtualBatteries": [B + "a", B + "b"]},
    "list form: a member that is no text": {"virtualBatteries": {B + "v": [B + "a", 1]}},
    "dict form: paths that are no list": {"virtualBatteries": {B + "v": {B + "a": "/Soc"}}},
    "list form with a hook": {"virtualBatteries": {B + "v": ["class:hooks.FixedValueHook", B + "a"]},
                              "classes": {"hooks.FixedValueHook": {"path": "/Info/MaxChargeCurrent", "value": 50}}},
    "list form with a missing hook": {"virtualBatteries": {B + "v": ["class:hooks.FixedValueHook", B + "a"]}},
    "unknown key, a typo": {"reconectTimeout": 5},
    "unknown key, the case": {"ServiceName": B + "x", "excludedservices": []},
    "unknown key, nested": {"limits": {"rampUprate": 1}, "coop": {"broker": {"hots": "x"}}},
    "unknown key, far from any": {"frobnicate": 1},
    "unknown key in a list item": {"gridBatteries": [{"meter": 30, "startDate": "2024-01-01", "capacitykwh": 5}]},
    "unknown key in a dict value": {"energy": {"members": {"serial:A": {"counterkind": "daily"}}}},
    "grid battery: meter, dates": {"gridBatteries": [{"meter": "ttyUSB0", "startDate": "2024-02-30",
                                                      "resetDate": "13-01"}]},
    "grid battery: instance as text, leap days": {"gridBatteries": [{"meter": " 30 ", "startDate": "2024-02-29",
                                                                     "resetDate": "02-29"}]},
    "grid battery: a negative instance, a bad day": {"gridBatteries": [{"meter": -1, "startDate": "2023-02-29",
                                                                        "resetDate": "2-1"}]},
    "grid battery: required keys": {"gridBatteries": [{}]},
    "peers: a key that is no site id": {"coop": {"peers": {"bad id!": {"capacityKwh": 5}}}},
    "trailing comma": '{\n  "logLevel": "INFO",\n}\n',
    "trailing comma in a list": '{\n  "excludedServices": [\n    "serial:A",\n  ]\n}\n',
    "a // comment": '{\n  // the bank\n  "capacity": 100\n}\n',
    "a /* comment */ after a value": '{"capacity": 100 /* Ah */}',
    "a missing comma": '{"capacity": 100\n "logLevel": "INFO"}',
    "NaN": '{"capacity": NaN}',
    "-Infinity": '{"startupBatteryWait": -Infinity}',
    "a duplicate key": '{"logLevel": "INFO", "x": {"a": 1}, "logLevel": "DEBUG"}',
    "not an object": "[1, 2]",
    "empty": "",
    "a byte order mark": '\ufeff{"logLevel": "DEBUG"}',
    "a number beyond a float": '{"capacity": 1e400}',
    "a number beyond a float where anything goes": '{"classes": {"hooks.FixedValueHook": {"value": -1e999}}}',
    "an integer beyond a float": '{"expectedBatteries": 1' + "0" * 400 + "}",
    "nested too deep": '{"classes": ' + '{"a": ' * 70 + "1" + "}" * 71,
    "a mistake before the nesting": '{"capacity": 1,}' + "[" * 70,
    **{f"rule: {name}": data for name, data in MODEL_CASES.items()},
    **{f"semantic {n}": data for n, data in enumerate(SEMANTIC_CASES)},
}


def as_text(case: Any) -> str:
    return case if isinstance(case, str) else json.dumps(case, indent=2)


def verdict_key(line: str, empty_loc: bool = False) -> tuple[str, str, str]:
    """What a message names: its key path (or the place of a JSON mistake), the key it suggests, its hint."""
    suggestion = re.search(r"did you mean (\S+)\?", line)
    hint = re.search(r"\(hint: (.*?)\)(?: \(line \d+, column \d+\))?$", line)
    extras = (suggestion.group(1) if suggestion else "", hint.group(1) if hint else "")
    place = re.search(r"invalid JSON at line (\d+) column (\d+)", line)
    if place:
        return (f"JSON at {place.group(1)}:{place.group(2)}", *extras)
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif not quoted and line.startswith(": ", i) and not empty_loc:
            return (line[:i], *extras)
    return ("(document)", *extras)


Verdict = dict[str, list[tuple[str, str, str]]]


def cli_output(path: Path) -> str:
    """What `battery-aggregator check PATH` prints (check_config.sh runs it), run in this process: a subprocess
    per config would take seconds each (test_check_config_sh_prints_what_the_command_prints compares them)."""
    import contextlib
    import io

    from aggregator.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["check", str(path)])
    return out.getvalue()


def cli_verdict(tmp_path: Path, name: str, text: str) -> Verdict:
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    out = cli_output(path).splitlines()
    return {severity: sorted({verdict_key(line.split(": ", 1)[1]) for line in out if line.startswith(severity + ": ")})
            for severity in ("error", "warning")}


@pytest.mark.parametrize("name", ["a user's file", "a number written as a string", "trailing comma", "NaN"])
def test_check_config_sh_prints_what_the_command_prints(tmp_path: Path, name: str) -> None:
    from ..bus.test_check_config import check

    path = tmp_path / "config.json"
    path.write_text(as_text(AGREEMENT_CASES[name]), encoding="utf-8")
    assert check(str(path)).stdout == cli_output(path)


def page_verdict(issues: list[dict[str, Any]]) -> Verdict:
    return {severity: sorted({verdict_key(i["text"], not i["loc"] and "invalid JSON" not in i["text"])
                              for i in issues if i["severity"] == severity}) for severity in ("error", "warning")}


def test_the_page_and_check_config_sh_judge_every_config_alike(page: Any, tmp_path: Path) -> None:
    disagree = []
    for name, case in AGREEMENT_CASES.items():
        text = as_text(case)
        issues, summary = page.execute_script(  # pasted and imported as a user does, in one round trip
            "document.getElementById('import-text').value = arguments[0];"
            "document.getElementById('import-btn').click();"
            "return [lastIssues.map(i => ({loc: i.loc, text: i.text, severity: i.severity})),"
            "        document.getElementById('problems-summary').textContent];", text)
        shown, expected = page_verdict(issues), cli_verdict(tmp_path, name, text)
        if shown != expected:
            disagree.append(f"{name}:\n  page {shown}\n  CLI  {expected}")
        assert ("error" in summary) == bool(expected["error"]), (name, summary, expected)
    assert not disagree, "\n".join(disagree)
    assert not js_errors(page)


def field_cases() -> dict[str, Any]:
    """Configs made from the schema alone: for every key (in sections, list items and dict values), values of the
    wrong type or out of its range, a typo of the first key of every object, and the default. A key added to the
    model is in these cases without a line written here."""
    from aggregator.schema import config_schema

    schema = config_schema()
    cases: dict[str, Any] = {}

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def wrap(path: list[Any], value: Any) -> Any:
        for step in reversed(path):
            value = [value] if step == 0 else {step: value}
        return value

    def bad_values(node: dict[str, Any]) -> list[Any]:
        kind, out = node.get("type"), []
        if "enum" in node:
            return ["not-a-choice", 0 if all(isinstance(e, str) for e in node["enum"]) else "1"]
        if kind in ("number", "integer"):
            out += ["1", True] + ([0.5] if kind == "integer" else [])
            for key, delta in (("minimum", -1), ("exclusiveMinimum", 0), ("maximum", 1), ("exclusiveMaximum", 0)):
                if key in node:
                    out.append(node[key] + delta)
        elif kind == "boolean":
            out += [1, "true"]
        elif kind == "string":
            out += [5, "!"] + ([""] if node.get("minLength", 0) > 0 else [])
            out += ["x" * (node["maxLength"] + 1)] if "maxLength" in node else []
            out += ["2024-02-30", "24-1-1"] if node.get("format") == "date" else []
        elif kind == "array":
            out += ["x", [None]]
        elif kind == "object":
            out += ["x", [1]]
        return out

    def walk(node: dict[str, Any], path: list[Any], depth: int) -> None:
        node = resolve(node)
        name = ".".join(str(p) for p in path) or "(root)"
        choices = [resolve(b) for b in node.get("anyOf") or node.get("oneOf") or []]
        if choices:
            real = [b for b in choices if b.get("type") != "null"]
            cases[f"{name} = [true]"] = wrap(path, [True])  # no choice takes it
            if len(real) > 1:
                for b in real:
                    if b.get("type") in ("object", "array"):
                        walk(b, path, depth)
                return
            node = {**real[0], **{k: v for k, v in node.items() if k in ("default", "description")}}  # X or null
        if path and "default" in node:
            cases[f"{name} = its default"] = wrap(path, node["default"])
        for n, value in enumerate(bad_values(node) if path else []):
            cases[f"{name} bad {n}: {value!r}"[:120]] = wrap(path, value)
        if depth > 6:
            return
        if node.get("type") == "object" and node.get("properties"):
            props = node["properties"]
            first = next(iter(props))
            typo = first[:1] + first[2:] if len(first) > 3 else first + "x"
            cases[f"{name}: a typo of {first}"] = wrap(path, {typo: 1})
            cases[f"{name}: {first} in capitals"] = wrap(path, {first.upper(): 1})
            for key, sub in props.items():
                walk(sub, path + [key], depth + 1)
        elif node.get("type") == "array" and isinstance(node.get("items"), dict):
            walk(node["items"], path + [0], depth + 1)
        elif node.get("type") == "object":
            patterns = list((node.get("patternProperties") or {}).values())
            values = node.get("additionalProperties") or (patterns[0] if patterns else None)
            if isinstance(values, dict):
                walk(values, path + ["site_1" if node.get("patternProperties") else B + "x"], depth + 1)

    walk(schema, [], 0)
    return cases


def test_the_page_and_the_checker_judge_every_key_of_the_schema_alike(page: Any, tmp_path: Path) -> None:
    from aggregator.config import check_config_file

    cases = field_cases()
    assert len(cases) > 300  # every key of the model, several ways wrong
    texts = [json.dumps(case, indent=2) for case in cases.values()]
    results = page.execute_script("""
        return arguments[0].map(text => {
          let data;
          try { data = parseJSON(text); } catch (err) { return [{loc: [], text: err.message, severity: "error"}]; }
          return issuesOf(data).map(i => ({loc: i.loc, text: i.text, severity: i.severity}));
        });""", texts)
    disagree = []
    path = tmp_path / "config.json"
    for (name, case), text, issues in zip(cases.items(), texts, results):
        path.write_text(text, encoding="utf-8")
        result = check_config_file(path)
        expected = {"error": sorted({verdict_key(line) for line in result.errors}),
                    "warning": sorted({verdict_key(line) for line in result.warnings})}
        shown = page_verdict(issues)
        if shown != expected:
            disagree.append(f"{name}: {text}\n  page {shown}\n  checker {expected}")
    assert not disagree, f"{len(disagree)} of {len(cases)} disagree:\n" + "\n".join(disagree[:15])


def model_validators() -> set[str]:
    """Model._validator of every validator of the config model and the models under it (functional validators in
    a field's Annotated metadata too)."""
    import typing

    from pydantic import BaseModel

    from aggregator.config import Config

    found: set[str] = set()
    seen: set[type] = set()

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.add(tp)
            decorators = tp.__pydantic_decorators__
            names = [*decorators.field_validators, *decorators.model_validators]
            found.update(f"{tp.__name__}.{name}" for name in names)
            for name, field in tp.model_fields.items():
                found.update(f"{tp.__name__}.{name}:{type(m).__name__}" for m in field.metadata
                             if type(m).__name__ in ("AfterValidator", "BeforeValidator", "PlainValidator",
                                                     "WrapValidator"))
                visit(field.annotation)
            return
        for arg in typing.get_args(tp):
            visit(arg)

    visit(Config)
    return found


def test_the_page_mirrors_every_validator_of_the_model() -> None:
    template = (GENERATOR / "template.html").read_text(encoding="utf-8")
    listed = re.search(r"const MIRRORED_VALIDATORS = \[(.*?)\];", template, re.S)
    assert listed, "template.html lists the validators it mirrors in MIRRORED_VALIDATORS"
    mirrored = set(json.loads("[" + listed.group(1).strip().rstrip(",") + "]"))
    python = model_validators()
    assert python - mirrored == set(), ("validators the page does not mirror: add their rule to RULES in "
                                        "config_generator/template.html, list them in MIRRORED_VALIDATORS and add a "
                                        "case to MODEL_CASES")
    assert mirrored - python == set(), "MIRRORED_VALIDATORS lists validators the model no longer has"


def open_all(driver: Any) -> None:
    driver.execute_script("document.querySelectorAll('#form details').forEach(d => d.open = true)")


def test_every_key_has_an_editor_and_no_edit_is_dropped(page: Any) -> None:
    from selenium.webdriver.support.ui import Select

    open_all(page)
    values = page.execute_script("return [...document.querySelectorAll('#form input, #form textarea')]"
                                 ".map(e => e.value)")
    assert "undefined" not in values
    # every flag of the schema is a checkbox that shows its default
    for loc, default in ((["dispatcher", "enabled"], False), (["coop", "enabled"], False),
                         (["coop", "homeAssistant", "enabled"], True)):
        box = by_loc(page, loc)
        assert box.get_attribute("type") == "checkbox" and box.is_selected() is default
    by_loc(page, ["dispatcher", "enabled"]).click()
    assert exported(page) == {"dispatcher": {"enabled": True}}
    assert "dispatcher: enabled, but no batteries are configured" in problems(page)
    by_loc(page, ["coop", "homeAssistant", "enabled"]).click()
    # text that may be null: empty is none
    for loc, text in ((["energy", "httpToken"], "0123456789abcdef"), (["coop", "siteId"], "rivendell"),
                      (["dispatcher", "gridMeter"], "com.victronenergy.grid.cgwacs_ttyUSB0_mb1"),
                      (["coop", "curtail", "topic"], "coop/rivendell/curtail")):
        type_into(by_loc(page, loc), text)
    # an object that may be null: a checkbox, then its form
    by_loc(page, ["coop", "broker"]).click()
    type_into(by_loc(page, ["coop", "broker", "host"]), "::1")
    by_loc(page, ["coop", "broker", "tls"]).click()
    by_loc(page, ["dispatcher", "mqtt"]).click()
    # lists of objects: a form per item
    click(page, "Add to gridBatteries")
    type_into(by_loc(page, ["gridBatteries", 0, "meter"]), "30")
    type_into(by_loc(page, ["gridBatteries", 0, "startDate"]), "2024-03-01")
    click(page, "Add to batteries")
    battery_fields = ["dispatcher", "batteries", 0]
    type_into(by_loc(page, battery_fields + ["name"]), "Pack A")
    for role in ("setpoint", "measured"):
        by_loc(page, battery_fields + [role, "mqtt"]).click()
        type_into(by_loc(page, battery_fields + [role, "mqtt", "topic"]), f"home/a/{role}")
    Select(page.find_element("css selector", "[aria-label='kind of maxChargeW']")).select_by_visible_text("number")
    type_into(by_loc(page, battery_fields + ["maxChargeW"]), "3000")
    Select(page.find_element("css selector", "[aria-label='kind of maxDischargeW']")).select_by_index(2)  # adapter
    by_loc(page, battery_fields + ["maxDischargeW", "dbus"]).click()
    type_into(by_loc(page, battery_fields + ["maxDischargeW", "dbus", "service"]), "com.victronenergy.battery.a")
    type_into(by_loc(page, battery_fields + ["maxDischargeW", "dbus", "path"]), "/Info/MaxDischargeCurrent")
    Select(by_loc(page, battery_fields + ["setpointSign"])).select_by_visible_text("-1")
    # maps of objects: a name, then its form
    for key, name in (("members", "serial:A1"), ("peers", "rivendell")):
        field = page.find_element("xpath", f"//label[text()='new entry of {key}:']/following-sibling::input")
        field.send_keys(name)
        click(page, f"Add to {key}")
    Select(by_loc(page, ["energy", "members", "serial:A1", "counterKind"])).select_by_value("daily")
    type_into(by_loc(page, ["coop", "peers", "rivendell", "capacityKwh"]), "13.5")
    expected = {
        "energy": {"members": {"serial:A1": {"counterKind": "daily"}}, "httpToken": "0123456789abcdef"},
        "gridBatteries": [{"meter": 30, "startDate": "2024-03-01"}],
        "dispatcher": {"enabled": True, "gridMeter": "com.victronenergy.grid.cgwacs_ttyUSB0_mb1", "mqtt": {},
                       "batteries": [{"name": "Pack A", "setpoint": {"mqtt": {"topic": "home/a/setpoint"}},
                                      "measured": {"mqtt": {"topic": "home/a/measured"}}, "maxChargeW": 3000,
                                      "maxDischargeW": {"dbus": {"service": "com.victronenergy.battery.a",
                                                                 "path": "/Info/MaxDischargeCurrent"}},
                                      "setpointSign": -1}]},
        "coop": {"siteId": "rivendell", "broker": {"host": "::1", "tls": False},
                 "peers": {"rivendell": {"capacityKwh": 13.5}}, "curtail": {"topic": "coop/rivendell/curtail"},
                 "homeAssistant": {"enabled": False}},
    }
    assert exported(page) == expected
    assert "OK" in page.find_element("id", "problems-summary").text, problems(page)
    assert parse_config(exported(page)).dispatcher.batteries[0].setpointSign == -1
    # a JSON editor (a value that fits no form): text that does not parse is an error until it does
    import_json(page, json.dumps({"classes": {"hooks.CustomNameHook": ["odd"]}}))
    open_section(page, "classes")
    area = page.find_element("css selector", "textarea[aria-label='options of hooks.CustomNameHook']")
    type_into(area, '{"customName": "Left",}')
    assert 'error: classes."hooks.CustomNameHook": not applied: invalid JSON at line 1 column 23' in problems(page)
    assert "(hint: JSON allows no comma before }: remove the comma at line 1 column 22)" in problems(page)
    assert "OK" not in page.find_element("id", "problems-summary").text
    assert exported(page) == {"classes": {"hooks.CustomNameHook": ["odd"]}}  # the last value that parsed
    type_into(area, '{"customName": "Left"}')
    assert "not applied" not in problems(page)
    assert exported(page) == {"classes": {"hooks.CustomNameHook": {"customName": "Left"}}}
    assert not js_errors(page)


def test_a_failed_import_leaves_nothing_of_the_previous_config(page: Any) -> None:
    import_json(page, json.dumps({"currentRatioMethod": "magic", "reconectTimeout": 5, "capacity": 100}))
    assert "magic" in problems(page) and page.find_elements("css selector", "#form .msgs li")
    page.execute_script("arguments[0].value = arguments[1];", page.find_element("id", "import-text"),
                        '{\n  "capacity": 100,\n}')
    page.find_element("id", "import-btn").click()
    assert problems(page).splitlines() == [
        "error: pasted JSON: invalid JSON at line 3 column 1: expecting a key in double quotes (hint: JSON allows no "
        "comma before }: remove the comma at line 2 column 18)"]
    assert "not imported" in page.find_element("id", "import-status").text
    assert "1 error" in page.find_element("id", "problems-summary").text
    assert not page.find_elements("css selector", "#form .msgs li")  # no message of the old config under a field
    assert page.find_element("id", "export").get_property("value") == ""
    assert by_loc(page, ["capacity"]).get_property("value") == ""  # the form shows the defaults
    # the next edit starts from what the form shows
    type_into(by_loc(page, ["capacity"]), "100")
    assert "OK" in page.find_element("id", "problems-summary").text
    assert exported(page) == {"capacity": 100}


def test_an_unknown_key_is_renamed_to_the_key_it_suggests(page: Any) -> None:
    import_json(page, json.dumps({"reconectTimeout": 5, "coop": {"broker": {"hots": "::1", "tls": False}}}))
    assert "reconectTimeout: unknown key: did you mean reconnectTimeout? (got 5)" in problems(page)
    assert "coop.broker.hots: unknown key: did you mean host? (got '::1')" in problems(page)
    click(page, "Rename to reconnectTimeout")
    click(page, "Rename to host")
    assert exported(page) == {"reconnectTimeout": 5, "coop": {"broker": {"host": "::1", "tls": False}}}
    assert "OK" in page.find_element("id", "problems-summary").text, problems(page)


def test_on_a_phone_the_sections_fold_and_export_is_at_hand(page: Any) -> None:
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 3,
                                                                 "mobile": True})
    try:
        page.get(PAGE.as_uri())
        height = page.execute_script("return document.documentElement.scrollHeight")
        assert height < 4000, height  # every key of the defaults was 11,800 px long
        import_json(page, json.dumps({**USER_CONFIG, **GOOD_COOP_AND_DISPATCHER}, indent=2))
        assert "OK" in page.find_element("id", "problems-summary").text, problems(page)
        folded = page.execute_script("return [...document.querySelectorAll('#form details')].map(d => "
                                     "[d.dataset.section, d.open, d.querySelector('.badge').textContent])")
        # folded but for the general settings and a section with something to say (classes: a vendor's path)
        assert [(name, badge) for name, is_open, badge in folded if is_open] == [("general settings", ""),
                                                                                ("classes", "1 warning")], folded
        height = page.execute_script("return document.documentElement.scrollHeight")
        assert height < 7000, height
        viewport = page.execute_script("return window.innerHeight")
        for y in (0, height // 2, height):  # the bar with Export, Copy and Download stays in view
            page.execute_script("window.scrollTo(0, arguments[0])", y)
            top, bottom = page.execute_script("const r = document.getElementById('bar-download')"
                                              ".getBoundingClientRect(); return [r.top, r.bottom]")
            assert 0 <= top and bottom <= viewport, (y, top, bottom)
        page.find_element("css selector", "#bar a[href='#export-h']").click()
        top = page.execute_script("return document.getElementById('export').getBoundingClientRect().top")
        assert 0 <= top < viewport
        assert json.loads(page.find_element("id", "export").get_property("value")) == {**USER_CONFIG,
                                                                                       **GOOD_COOP_AND_DISPATCHER}
        # a section unfolds when asked, and a problem opens the section it is in
        page.execute_script("window.scrollTo(0, 0)")
        open_section(page, "coop")
        type_into(by_loc(page, ["coop", "peerTimeoutSeconds"]), "10")
        summary = page.find_element("css selector", "details[data-section='coop'] > summary")
        page.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)  # not under the bar
        summary.click()  # folded again
        assert "1 error" in page.find_element("css selector", "[data-badge='coop']").text
        page.find_element("css selector", "#problems li.error").click()
        assert by_loc(page, ["coop", "peerTimeoutSeconds"]).is_displayed()
        assert not js_errors(page)
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
