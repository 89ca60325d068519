"""A checked config as the service holds it, without pydantic.

The service never loads pydantic (about 16 MiB of a small GX's memory with our models): a child interpreter checks
the file with the config model (host/config_check.py) and hands over the result as JSON, which the service reads
through `ConfigData`, with the model's key names as attributes. A feature whose settings have methods makes its
section a model again with `as_model`, in the process that runs it (pydantic is then loaded because that feature
is on). Tests and tools that validate in their own process pass the model itself: both read the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .config import Config

DEFAULT_CONFIG_PATH = "/data/setupOptions/BatteryAggregator/config.json"
DEFAULT_STATE_DIR = "/data/setupOptions/BatteryAggregator/state"
# A root of its own for the default stateDir (a test session's, a developer's): the learned state of a GX is never
# touched there. Unset, as on a GX, the default is DEFAULT_STATE_DIR.
STATE_ROOT_ENV = "BATTERY_AGGREGATOR_STATE_ROOT"
DEFAULT_SERVICE_NAME = "com.victronenergy.battery.aggregator"

Model = TypeVar("Model")


class ConfigData(dict):  # type: ignore[type-arg]
    """A section of a checked config: a dict whose keys also read as attributes (`config.limits.staleAfter`).
    Sections that are maps of the user's own keys (virtualBatteries, energy.members) are dicts as in the model."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a checked config is read-only ({name})")

    def replace(self, **changes: Any) -> ConfigData:
        return ConfigData({**self, **changes})


def config_data(value: Any) -> Any:
    """Decoded JSON of a checked config -> ConfigData for every object in it."""
    if isinstance(value, dict):
        return ConfigData({key: config_data(item) for key, item in value.items()})
    if isinstance(value, list):
        return [config_data(item) for item in value]
    return value


def as_model(model: type[Model], section: Any) -> Model:
    """A section as its settings model: itself where it is one already, else validated anew from checked data."""
    if isinstance(section, model):
        return section
    return model.model_validate(dict(section))  # type: ignore[attr-defined, no-any-return]


def with_log_level(config: Config | ConfigData, level: str) -> Any:
    """The config with another logLevel (the command line's), whichever form it has."""
    if isinstance(config, ConfigData):
        return config.replace(logLevel=level)
    return config.model_copy(update={"logLevel": level})


@dataclass(slots=True)
class CheckResult:
    config: Any  # Config, ConfigData, or None when errors
    errors: list[str]
    warnings: list[str]
    document: Any = None  # what the file set (defaults left out): what `.last-good` keeps
