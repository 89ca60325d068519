"""The service reads its config as checked data (config_data.py), checked by the model in a child interpreter: it
must read exactly what the model holds, and each feature's section must become its model again unchanged."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from aggregator.config import Config, parse_config
from aggregator.config_data import ConfigData, as_model, config_data, with_log_level
from aggregator.features.coop.settings import CoopSettings
from aggregator.features.dispatcher.settings import DispatcherConfig
from aggregator.features.energy.runtime import NO_MEMBER_OPTIONS
from aggregator.features.energy.settings import MemberEnergyOptions
from aggregator.features.grid_battery.settings import GridBatterySettings
from aggregator.host.config_check import check_in_child

from .test_config import USER_CONFIG

CONTROLLABLE = "com.batteryaggregator.controllable.one"
RICH = {
    **USER_CONFIG,
    "limits": {"staleAfter": 90, "rampUpTime": 45},
    "energy": {"members": {"serial:ABC": {"id": "home", "capacityKwh": 5}}, "httpPort": 8088},
    "gridBatteries": [{"meter": "com.victronenergy.grid.meter", "startDate": "2024-03-01", "capacityKwh": 10,
                       "resetDate": "01-01"}],
    "dispatcher": {"enabled": True, "batteries": [{
        "name": "one", "setpoint": {"dbus": {"service": CONTROLLABLE, "path": "/Setpoint"}},
        "measured": {"dbus": {"service": CONTROLLABLE, "path": "/Dc/0/Power"}}, "maxChargeW": 1000,
        "maxDischargeW": 1000, "capacityWh": 5000}]},
    "coop": {"enabled": True, "siteId": "home", "broker": {"host": "127.0.0.1", "tls": False}},
}


def same(model: Any, data: Any, where: str = "config") -> None:
    """Every value the model holds reads the same from the data, at every depth."""
    if isinstance(model, BaseModel):
        assert isinstance(data, ConfigData), where
        for name in type(model).model_fields:
            same(getattr(model, name), getattr(data, name), f"{where}.{name}")
    elif isinstance(model, (list, tuple)):
        assert len(model) == len(data), where
        for i, (m, d) in enumerate(zip(model, data)):
            same(m, d, f"{where}[{i}]")
    elif isinstance(model, dict):
        assert set(model) == set(data), where
        for key in model:
            same(model[key], data[key], f"{where}[{key!r}]")
    elif hasattr(model, "isoformat"):  # a date travels as its ISO text
        assert data == model.isoformat(), where
    else:
        assert data == model and type(data) is type(model), where


@pytest.mark.parametrize("document", [{}, USER_CONFIG, RICH], ids=["defaults", "user", "rich"])
def test_checked_data_reads_as_the_model(document: dict[str, Any]) -> None:
    model = parse_config(json.loads(json.dumps(document)))
    data = config_data(json.loads(json.dumps(model.model_dump(mode="json"))))
    same(model, data)
    assert as_model(Config, data) == model
    for section, settings in (("dispatcher", DispatcherConfig), ("coop", CoopSettings)):
        assert as_model(settings, getattr(data, section)) == getattr(model, section)
    assert [as_model(GridBatterySettings, g) for g in data.gridBatteries] == model.gridBatteries


def test_the_child_check_answers_what_the_model_says(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**RICH, "stateDir": str(tmp_path / "state")}))
    result = check_in_child(str(path))
    assert result.errors == [], result.errors
    same(parse_config(json.loads(path.read_text())), result.config)
    assert result.document == json.loads(path.read_text())  # what the file set, for .last-good

    path.write_text(json.dumps({"limits": {"staleAfter": -1}}))
    bad = check_in_child(str(path))
    assert bad.config is None and any("staleAfter" in e for e in bad.errors)
    missing = check_in_child(str(tmp_path / "nothing.json"))
    assert missing.config is None and missing.errors


def test_checked_data_is_read_only_and_takes_the_command_lines_log_level() -> None:
    data = config_data(Config().model_dump(mode="json"))
    with pytest.raises(AttributeError):
        data.logLevel = "DEBUG"
    with pytest.raises(AttributeError):
        _ = data.noSuchKey
    assert with_log_level(data, "DEBUG").logLevel == "DEBUG" and data.logLevel == "INFO"
    assert with_log_level(Config(), "DEBUG").logLevel == "DEBUG"


def test_a_member_without_options_has_the_models_defaults() -> None:
    assert NO_MEMBER_OPTIONS == MemberEnergyOptions().model_dump()
