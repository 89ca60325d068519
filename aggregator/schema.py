"""config.schema.json, generated from the pydantic model (the one source of truth).

    battery-aggregator schema            print it
    battery-aggregator schema --write    write config.schema.json at the repo root
    battery-aggregator schema --check    exit 1 when the committed file differs from the model
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from .config import Config

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "config.schema.json"


@functools.lru_cache(maxsize=1)
def _generated() -> dict[str, Any]:
    return Config.model_json_schema()


def config_schema() -> dict[str, Any]:
    schema = copy.deepcopy(_generated())
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "battery-aggregator config.json",
        "description": "Configuration of battery-aggregator (and of the BatteryAggregator it replaces). "
                       "Generated from aggregator/config.py: do not edit by hand.",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def schema_text() -> str:
    return json.dumps(config_schema(), indent=2) + "\n"
