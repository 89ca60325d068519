"""The dispatcher section of the config: what is accepted, and messages that name the key, the value and the rule."""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from aggregator.features.dispatcher.settings import (AdapterSpec, DispatcherConfig, DispatcherConfigError,
                                                     dispatcher_settings, parse_dispatcher_config)


def _battery(name: str = "A", **overrides: Any) -> dict[str, Any]:
    battery = {
        "name": name,
        "setpoint": {"dbus": {"service": "com.victronenergy.acsystem.a", "path": "/Setpoint"}},
        "measured": {"dbus": {"service": "com.victronenergy.acsystem.a", "path": "/Dc/0/Power"}},
        "maxChargeW": 2000,
        "maxDischargeW": 1500,
    }
    battery.update(overrides)
    return battery


def _error(data: Any) -> str:
    with pytest.raises(DispatcherConfigError) as info:
        parse_dispatcher_config(data)
    return str(info.value)


def test_defaults_and_a_full_section() -> None:
    config = parse_dispatcher_config({})
    assert (config.enabled, config.cycleSeconds, config.mode, config.mqtt, config.batteries) == (False, 1.0, "target",
                                                                                                 None, [])
    full = {
        "enabled": True, "cycleSeconds": 0.5, "mode": "gridZero", "gridMeter": "com.victronenergy.grid.cgwacs_mb1",
        "gridSetpointW": 30, "gridDeadbandW": 15, "weight": "energy",
        "mqtt": {"host": "broker.lan", "port": 8883, "tls": True, "caFile": "/data/ca.crt", "username": "u",
                 "password": "p", "topicPrefix": "home/dispatcher", "homeAssistant": True,
                 "discoveryPrefix": "ha"},
        "batteries": [
            _battery("A", soc={"dbus": {"service": "com.victronenergy.acsystem.a", "path": "/Soc"}},
                     capacityWh=5000, setpointSign=-1, minCommandW=50),
            _battery("B", setpoint={"mqtt": {"topic": "b/set"}},
                     measured={"mqtt": {"topic": "b/state", "jsonKey": "battery.power"}, "scale": 1000},
                     capacity={"mqtt": {"topic": "b/state", "jsonKey": "wh"}},
                     maxDischargeW={"mqtt": {"topic": "b/state", "jsonKey": "dcl"}}, measuredSign=-1),
        ],
    }
    config = parse_dispatcher_config({"dispatcher": full, "serviceName": "ignored here"})  # a whole config.json
    b = config.batteries[1]
    assert isinstance(b.maxDischargeW, AdapterSpec) and b.maxDischargeW.mqtt is not None
    assert b.measured.scale == 1000 and b.measuredSign == -1 and config.batteries[0].maxDischargeW == 1500.0
    assert set(b.adapters()) == {"setpoint", "measured", "capacity", "maxDischargeW"}
    # the schema generator can describe it
    json.dumps(DispatcherConfig.model_json_schema())


def test_controller_settings_come_from_the_section() -> None:
    config = parse_dispatcher_config({"staleAfterS": 12, "minCommandW": 40, "maxStepWPerS": 500,
                                      "directionHysteresisW": 80, "weight": "equal", "cycleSeconds": 2})
    settings = dispatcher_settings(config)
    assert (settings.stale_after_s, settings.min_command_w, settings.max_step_w_per_s,
            settings.direction_hysteresis_w, settings.weight) == (12, 40, 500, 80, "equal")
    assert getattr(settings, "cycle_s", 2) == 2


@pytest.mark.parametrize("data, expected", [
    ({"enabled": True}, "enabled, but no batteries are configured"),
    ({"mode": "gridZero"}, 'mode "gridZero" needs gridMeter'),
    ({"mode": "zero"}, "mode: Input should be 'target' or 'gridZero' (got 'zero')"),
    ({"cycleSeconds": 0}, "cycleSeconds: Input should be greater than or equal to 0.1 (got 0)"),
    ({"gridMeter": "grid meter"}, "gridMeter: not a D-Bus service name"),
    ({"weight": "soc"}, "weight: Input should be 'capacity', 'energy' or 'equal'"),
    ({"batteries": [_battery(maxChargeW="lots")]},
     'batteries[0].maxChargeW: a number of watts (>= 0) or an adapter ({"dbus": ...} or {"mqtt": ...}) (got \'lots\')'),
    ({"batteries": [_battery(maxChargeW=-5)]}, "batteries[0].maxChargeW: Input should be greater than or equal to 0"),
    ({"batteries": [_battery(maxDischargeW={"dbus": {"service": "a.b", "path": "/x"}, "mqtt": {"topic": "t"}})]},
     'batteries[0].maxDischargeW: give exactly one of "dbus"'),
    ({"batteries": [_battery(measured={})]}, 'batteries[0].measured: give exactly one of "dbus"'),
    ({"batteries": [_battery(measured={"dbus": {"service": "com.victronenergy.x", "path": "Dc/0/Power"}})]},
     "batteries[0].measured.dbus.path: not a D-Bus path (like /Dc/0/Power) (got 'Dc/0/Power')"),
    ({"batteries": [_battery(setpoint={"dbus": {"service": "victron", "path": "/S"}})]},
     "batteries[0].setpoint.dbus.service: not a D-Bus service name"),
    ({"batteries": [_battery(measured={"mqtt": {"topic": "devices/+/power"}})],
      "mqtt": {}}, "batteries[0].measured.mqtt.topic: a topic of one device, without the wildcards + and #"),
    ({"batteries": [_battery(measured={"mqtt": {"topic": "a/b"}})]},
     "batteries[0].measured uses MQTT, but there is no mqtt section"),
    ({"batteries": [_battery(setpointSign=2)]}, "batteries[0].setpointSign: Input should be 1 or -1 (got 2)"),
    ({"batteries": [_battery(capacityWh=5000, capacity={"mqtt": {"topic": "a"}})], "mqtt": {}},
     "batteries[0]: give capacityWh (a number) or capacity (an adapter), not both"),
    ({"batteries": [_battery("A"), _battery("A")]}, "batteries[1].name: 'A' is used twice"),
    ({"batteries": [_battery("Pack 1"), _battery("pack_1")]},
     "batteries[1].name: 'pack_1' and 'Pack 1' would share the MQTT topics .../batteries/pack_1"),
    ({"batteries": [_battery(name=" A")]}, "batteries[0].name: printable text without leading or trailing spaces"),
    ({"batteries": [_battery(colour="red")]}, "batteries[0].colour: unknown key (extra keys are not allowed)"),
    ({"batteries": [_battery(measured={"dbus": {"service": "a.b", "path": "/x"}, "scale": 0})]},
     "batteries[0].measured.scale: a finite number other than 0"),
    ({"mqtt": {"password": "x"}}, "mqtt: a password needs a username"),
    ({"mqtt": {"caFile": "/ca.crt"}}, 'mqtt: caFile is only used with "tls": true'),
    ({"mqtt": {"port": 70000}}, "mqtt.port: Input should be less than or equal to 65535"),
    ({"mqtt": {"topicPrefix": "a/#"}}, "mqtt.topicPrefix: a topic prefix without wildcards"),
    ({"mqtt": {"nodeId": "my node"}}, "mqtt.nodeId: letters, digits, _ and - only"),
    ({"cycleSecond": 1}, "cycleSecond: unknown key"),
])
def test_messages_name_the_key_the_value_and_the_rule(data: dict[str, Any], expected: str) -> None:
    message = _error(data)
    assert expected in message, message
    assert "number[W]" not in message and "adapter[" not in message  # union tags stay out of key paths


def test_every_error_is_listed() -> None:
    data = {"cycleSeconds": -1,
            "batteries": [_battery(maxChargeW="x"), copy.deepcopy(_battery("B", maxDischargeW=None))]}
    message = _error(data)
    assert message.startswith("invalid dispatcher config (3 errors):")
    assert "batteries[1].maxDischargeW" in message


def test_mqtt_commands_need_credentials_off_this_machine() -> None:
    """A broker elsewhere without credentials would take anyone's target; the error names the key."""
    message = _error({"mqtt": {"host": "192.0.2.10"}})
    assert "mqtt: acceptCommands:" in message and "username" in message
    assert "192.0.2.10" in message
    assert "acceptCommands" in _error({"mqtt": {"host": "broker.lan", "acceptCommands": "loopback"}})
    for ok in ({"host": "192.0.2.10", "acceptCommands": "never"},
               {"host": "192.0.2.10", "username": "u", "password": "p"},
               {"host": "broker.lan", "tls": True, "certFile": "/data/c.pem", "keyFile": "/data/c.key"},
               {"host": "127.0.0.1"}, {"host": "localhost", "acceptCommands": "loopback"}):
        parse_dispatcher_config({"mqtt": ok})
    assert "keyFile" in _error({"mqtt": {"host": "broker.lan", "tls": True, "certFile": "/data/c.pem"}})
    assert "tls" in _error({"mqtt": {"certFile": "/data/c.pem", "keyFile": "/data/c.key"}})
    # what the runtime does with them
    loop = parse_dispatcher_config({"mqtt": {}}).mqtt
    assert loop is not None and "mqtt.username" in (loop.commands_refused() or "")
    assert parse_dispatcher_config({"mqtt": {"acceptCommands": "loopback"}}).mqtt.commands_refused() is None  # type: ignore[union-attr]
    assert parse_dispatcher_config({"mqtt": {"username": "u"}}).mqtt.commands_refused() is None  # type: ignore[union-attr]


def test_a_setpoint_timeout_must_outlast_three_cycles() -> None:
    message = _error({"cycleSeconds": 1.0, "batteries": [_battery(setpointTimeoutS=2)]})
    assert "batteries[0].setpointTimeoutS" in message
    config = parse_dispatcher_config({"cycleSeconds": 0.5, "batteries": [_battery(setpointTimeoutS=2)]})
    assert config.batteries[0].setpointTimeoutS == 2.0 and config.batteries[0].zeroWill
