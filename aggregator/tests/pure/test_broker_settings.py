"""One broker-connection model (mqtt/settings.py) under the coop's `broker` and the dispatcher's `mqtt`: the same
keys and credential rules in both sections, each section with its own defaults and its own extra rules."""
from __future__ import annotations

from typing import Any

import pytest

from aggregator.features.coop.settings import CoopSettingsError, parse_coop
from aggregator.features.dispatcher.settings import DispatcherConfigError, parse_dispatcher_config
from aggregator.mqtt.link import client_tls


def coop_error(broker: dict[str, Any]) -> str:
    with pytest.raises(CoopSettingsError) as err:
        parse_coop({"enabled": True, "siteId": "s1", "broker": broker})
    return str(err.value)


def dispatcher_error(mqtt: dict[str, Any]) -> str:
    with pytest.raises(DispatcherConfigError) as err:
        parse_dispatcher_config({"mqtt": {"acceptCommands": "never", **mqtt}})
    return str(err.value)


# (the broker keys, what the error says after the section's key); hosts on loopback, so tls may be off in the coop
SHARED_RULES = [
    ({"host": "127.0.0.1", "tls": False, "caFile": "/ca.crt"}, ': caFile is only used with "tls": true'),
    ({"host": "127.0.0.1", "tls": True, "certFile": "/c.pem"},
     ": certFile and keyFile go together (a client certificate and its key)"),
    ({"host": "127.0.0.1", "tls": True, "keyFile": "/k.pem"},
     ": certFile and keyFile go together (a client certificate and its key)"),
    ({"host": "127.0.0.1", "tls": False, "certFile": "/c.pem", "keyFile": "/k.pem"},
     ': certFile (a TLS client certificate) is only used with "tls": true'),
    ({"host": "127.0.0.1", "keepaliveSeconds": 4}, ".keepaliveSeconds: Input should be greater than or equal to 5"),
]


@pytest.mark.parametrize("broker, rule", SHARED_RULES, ids=[r for _, r in SHARED_RULES])
def test_the_credential_rules_hold_in_both_sections_and_name_the_key(broker: dict[str, Any], rule: str) -> None:
    assert f"broker{rule}" in (message := coop_error(broker)), message
    assert f"mqtt{rule}" in (message := dispatcher_error(broker)), message


def test_a_password_needs_a_username_except_in_the_coop_where_it_is_the_site_id() -> None:
    assert "mqtt: a password needs a username" in dispatcher_error({"password": "pw"})
    coop = parse_coop({"enabled": True, "siteId": "s1", "broker": {"host": "mqtt.example", "password": "pw"}})
    assert coop.broker is not None and coop.broker.username is None and coop.username == "s1"


def test_each_section_keeps_its_defaults_and_its_own_rules() -> None:
    coop = parse_coop({"enabled": True, "siteId": "s1", "broker": {"host": "mqtt.example"}}).broker
    assert coop is not None and (coop.port, coop.tls, coop.keepaliveSeconds) == (8883, True, 30)
    assert "broker.host: Field required" in coop_error({})
    assert "clear text" in coop_error({"host": "mqtt.example", "tls": False})
    mqtt = parse_dispatcher_config({"mqtt": {}}).mqtt
    assert mqtt is not None and (mqtt.host, mqtt.port, mqtt.tls, mqtt.keepaliveSeconds) == ("127.0.0.1", 1883, False,
                                                                                            30)
    assert "acceptCommands" in dispatcher_error({"host": "mqtt.example", "acceptCommands": "authenticated"})
    # The new keys are optional and valid where the other section had them.
    both = {"host": "mqtt.example", "tls": True, "certFile": "/c.pem", "keyFile": "/k.pem", "keepaliveSeconds": 60}
    assert parse_coop({"enabled": True, "siteId": "s1", "broker": both}).broker.certFile == "/c.pem"  # type: ignore
    assert parse_dispatcher_config({"mqtt": both}).mqtt.keepaliveSeconds == 60  # type: ignore[union-attr]


def test_the_link_loads_the_coops_client_certificate(tmp_path: Any) -> None:
    """The coop's certFile/keyFile reach the TLS context (a missing file is reported, not ignored)."""
    broker = parse_coop({"enabled": True, "siteId": "s1", "broker": {
        "host": "mqtt.example", "certFile": str(tmp_path / "c.pem"), "keyFile": str(tmp_path / "k.pem")}}).broker
    assert broker is not None
    with pytest.raises(FileNotFoundError):
        client_tls(broker)
