"""The configuration: every key of the BatteryAggregator config.json users already have, plus ours.

The pydantic model is the one source of truth (issue #5 generates config.schema.json from it). Key names
are the users' camelCase names, so existing files load unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .validation import JsonFileError, format_validation_error, read_json

DEFAULT_CONFIG_PATH = "/data/setupOptions/BatteryAggregator/config.json"
DEFAULT_SERVICE_NAME = "com.victronenergy.battery.aggregator"

# A list of services, or service -> list of paths (an empty list means all paths).
ServiceList = Union[list[str], dict[str, list[str]]]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key, the value and what is allowed."""


class IrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    maxPercentageError: float = Field(0.1, gt=0, le=1, description="largest relative error of an IR estimate "
                                      "that is still used (0.1 = 10%)")
    minVoltageChange: float = Field(0.02, ge=0, le=5, description="smallest voltage change (V) between samples "
                                    "for an IR fit")


class LimitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rampUpRate: float = Field(2.0, gt=0, le=1000, description="A/s a current limit may rise by (drops are "
                              "immediate), so DVCC does not hunt")
    hysteresis: float = Field(1.0, ge=0, le=100, description="A: a current limit rises only by at least this")
    voltageRampUpRate: float = Field(0.05, gt=0, le=10, description="V/s the charge voltage limit may rise by")
    voltageHysteresis: float = Field(0.02, ge=0, le=5, description="V: the charge voltage limit rises only by "
                                     "at least this")
    overCurrentTolerance: float = Field(0.02, ge=0, le=0.5, description="a member above its own limit by more "
                                        "than this fraction has its share corrected at once")
    shareTimeConstant: float = Field(600.0, gt=0, le=2592000, description="seconds over which learned shares "
                                     "and over-current corrections fade")
    staleAfter: float = Field(60.0, gt=0, le=3600, description="seconds without an update before a member is "
                              "stale (counted as carrying nothing in the limits)")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serviceName: str = Field(DEFAULT_SERVICE_NAME, pattern=r"^com\.victronenergy\.battery\.[A-Za-z0-9_]+$",
                             description="D-Bus name of the aggregated battery")
    excludedServices: list[str] = Field(default_factory=list, description="services never aggregated (e.g. a shunt)")
    primaryServices: ServiceList = Field(default_factory=list, description="after merging, these paths come "
                                         "from the first such service with a valid value")
    auxiliaryServices: ServiceList = Field(default_factory=list, description="used for a path only when no "
                                           "member has a value for it")
    capacity: float | None = Field(None, gt=0, description="installed capacity in Ah when members do not publish it")
    virtualBatteries: dict[str, ServiceList] = Field(default_factory=dict, description="new service name -> its "
                                                     "members (or member -> paths)")
    classes: dict[str, dict[str, Any]] = Field(default_factory=dict, description="configuration of hook classes")
    currentRatioMethod: Literal["share", "ir", "capacity", "count"] = Field(
        "share", description="how the bank current is assumed to split between members: learned from their "
        "measured currents (share), by internal resistance (ir), by capacity, or equally (count)")
    ir: IrOptions = Field(default_factory=IrOptions, description="when an internal-resistance estimate is used "
                          "(currentRatioMethod ir)")
    cclMode: Literal["battery+dvcc", "battery", "dvcc"] = Field(
        "battery+dvcc", description="charge current limit: the batteries' (battery), also capped by the DVCC user "
        "limit while DVCC is on (battery+dvcc), or the DVCC user limit alone (dvcc)")
    cvlMode: Literal["max_when_balancing", "min_when_balancing", "max_always", "max_when_floating", "dvcc"] = Field(
        "max_when_balancing", description="charge voltage limit: lowest member CVL, highest while any balances "
        "(max_when_balancing); always the lowest (min_when_balancing); always the highest (max_always); highest "
        "when all float (max_when_floating); the DVCC user voltage (dvcc)")
    # NOTSET is in the old tool's schema: users' files may have it
    logLevel: Literal["NOTSET", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="logging level (per-change detail only at DEBUG); /LogLevel changes it at run time")
    reconnectTimeout: float = Field(60.0, ge=0, le=86400, description="seconds a vanished member is kept")
    startupBatteryWait: float = Field(30.0, ge=0, le=3600, description="seconds to wait at start for a member "
                                      "with a voltage")
    expectedBatteries: int | None = Field(None, ge=1, le=256, description="how many members should be online")
    limits: LimitOptions = Field(default_factory=LimitOptions, description="stability and safety settings of "
                                 "the charge limits")
    stateDir: str = Field("/data/battery-aggregator", min_length=1, description="where learned shares and IR "
                          "estimates are kept across restarts")


REFERENCE_FORMS = "a full service name (com.victronenergy.battery.<name>), name:<CustomName> or serial:<Serial>"


def _is_reference(ref: str) -> bool:
    return (ref.startswith("com.victronenergy.battery.") and len(ref) > 26) or \
        (ref.startswith(("name:", "serial:")) and ref.split(":", 1)[1] != "")


def _refs(spec: Any) -> list[str]:
    return list(spec) if isinstance(spec, (list, dict)) else []


def semantic_errors(config: Config) -> list[str]:
    """Mistakes the types alone cannot catch: a service in two roles, malformed references, bad hooks."""
    from .hooks import HookConfigError, build_hook

    errors: list[str] = []
    claimed: dict[str, str] = {}

    def claim(ref: str, role: str, where: str) -> None:
        if ref in claimed and claimed[ref] != role:
            errors.append(f"{where}: {ref!r} is also listed in {claimed[ref]}; a service has one role "
                          "(excluded, primary, auxiliary or member of one virtual battery)")
        claimed.setdefault(ref, role)

    for key in ("excludedServices", "primaryServices", "auxiliaryServices"):
        for i, ref in enumerate(_refs(getattr(config, key))):
            where = f"{key}[{i}]" if isinstance(getattr(config, key), list) else f'{key}."{ref}"'
            if not _is_reference(ref):
                errors.append(f"{where}: {ref!r} is not {REFERENCE_FORMS}")
            claim(ref, key, where)
    for name, spec in config.virtualBatteries.items():
        vb = f'virtualBatteries."{name}"'
        if not name.startswith("com.victronenergy.battery.") or len(name) <= 26:
            errors.append(f"{vb}: the name {name!r} must be com.victronenergy.battery.<name>")
        if name == config.serviceName:
            errors.append(f"{vb}: {name!r} is the aggregate's own serviceName")
        for i, ref in enumerate(_refs(spec)):
            where = f"{vb}[{i}]" if isinstance(spec, list) else f'{vb}."{ref}"'
            if ref.startswith("class:"):
                try:
                    build_hook(ref[len("class:"):], config.classes)
                except HookConfigError as exc:
                    errors.append(f"{where}: {exc}")
                continue
            if not _is_reference(ref):
                errors.append(f"{where}: {ref!r} is not {REFERENCE_FORMS} or class:<hooks.Class>[#suffix]")
            if ref == name or ref in config.virtualBatteries:
                errors.append(f"{where}: a virtual battery cannot contain {'itself' if ref == name else 'another virtual battery'} ({ref!r})")
            if ref == config.serviceName:
                errors.append(f"{where}: {ref!r} is the aggregate itself")
            claim(ref, vb, where)
    return errors


def parse_config(data: Any, source: str = "config") -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    errors = semantic_errors(config)
    if errors:
        head = f"invalid {source}: " if len(errors) == 1 else f"invalid {source} ({len(errors)} errors):\n  "
        raise ConfigError(head + "\n  ".join(errors))
    return config


def load_config(path: str | Path | None) -> Config:
    """Load and validate a config file; a missing file at the default path means all defaults."""
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if not Path(path).exists():
            return Config()
    try:
        data = read_json(path)
    except JsonFileError as err:
        raise ConfigError(str(err)) from None
    return parse_config(data, f"config {path}")
