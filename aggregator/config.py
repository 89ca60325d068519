"""The configuration: every key of the BatteryAggregator config.json users already have, plus ours.

The pydantic model is the one source of truth (config.schema.json is generated from it). Key names
are the users' camelCase names, so existing files load unchanged.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config_data import (DEFAULT_CONFIG_PATH, DEFAULT_SERVICE_NAME, DEFAULT_STATE_DIR,  # noqa: F401 (theirs too)
                          STATE_ROOT_ENV, CheckResult)
from .features.coop.settings import CoopSettings
from .features.dispatcher.settings import DispatcherConfig
from .features.energy.settings import EnergyOptions
from .features.grid_battery.settings import GridBatterySettings
from .limits.settings import IrOptions, LimitOptions
from .validation import (JsonFileError, at, format_messages, integers_as_ints, json_positions, key_path,
                         parse_json_text, read_text, validation_messages)

# A list of services, or service -> list of paths (an empty list means all paths).
ServiceList = Union[list[str], dict[str, list[str]]]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key, the value and what is allowed."""


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
    stateDir: str = Field(DEFAULT_STATE_DIR, min_length=1, description="where the "
                          "learned state (shares, IR estimates, energy totals, grid batteries) is kept across "
                          "restarts and reinstalls, outside the app directory")
    energy: EnergyOptions = Field(default_factory=EnergyOptions, description="energy totals per battery and "
                                  "external batteries")
    gridBatteries: list[GridBatterySettings] = Field(default_factory=list, description="virtual batteries fed by "
                                                     "a grid meter (exported energy charges them)")
    dispatcher: DispatcherConfig = Field(default_factory=DispatcherConfig, description="splits one power target "
                                         "over independently controlled batteries, learning how each responds "
                                         "(runs when batteries are configured)")
    coop: CoopSettings = Field(default_factory=CoopSettings, description="balance the battery level with other "
                               "sites over MQTT (communicating vessels)")

    def model_post_init(self, _context: Any) -> None:
        root = os.environ.get(STATE_ROOT_ENV)
        if root and "stateDir" not in self.model_fields_set:
            self.stateDir = os.path.join(root, "state")
            self.model_fields_set.discard("stateDir")  # still the default: not written into .last-good


REFERENCE_FORMS = "a full service name (com.victronenergy.battery.<name>), name:<CustomName> or serial:<Serial>"


def _is_reference(ref: str) -> bool:
    return (ref.startswith("com.victronenergy.battery.") and len(ref) > 26) or \
        (ref.startswith(("name:", "serial:")) and ref.split(":", 1)[1] != "")


def _refs(spec: Any) -> list[str]:
    return list(spec) if isinstance(spec, (list, dict)) else []


@dataclass(frozen=True, slots=True)
class Issue:
    """A mistake found in a config: where (key path), what, and whether it stops the config (error) or not."""

    loc: tuple[Any, ...]
    message: str
    severity: str = "error"

    def text(self, positions: dict[tuple[Any, ...], tuple[int, int]] | None = None) -> str:
        return f"{key_path(self.loc)}: {self.message}{at(positions, self.loc)}"


def known_paths() -> frozenset[str]:
    """Battery paths of Victron's contract and of our aggregate: what a path in a config should be."""
    from .battery.paths import TEXT_FORMATS
    from .battery.merge import RULES
    from .battery.sanitize import NUMERIC_BOUNDS, TEXT_PATHS

    extra = {"/Dc/1/Voltage", "/Dc/0/MidVoltage", "/Dc/0/MidVoltageDeviation", "/Info/ChargeRequest",
             "/Info/ChargeLimitation", "/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent",
             "/Info/MaxChargeVoltage", "/Capabilities/ChargeVoltageControl", "/Connected", "/DeviceInstance",
             "/ProductId", "/ProductName", "/FirmwareVersion", "/HardwareVersion", "/Mgmt/Connection",
             "/Mgmt/ProcessName", "/Mgmt/ProcessVersion", "/State", "/ErrorCode", "/Relay/0/State",
             "/History/ChargeCycles", "/History/DeepestDischarge", "/History/LastDischarge",
             "/History/AverageDischarge", "/History/FullDischarges", "/History/MinimumVoltage",
             "/History/MaximumVoltage", "/History/TimeSinceLastFullCharge", "/History/AutomaticSyncs",
             "/System/Temperature1", "/System/Temperature2", "/System/Temperature3", "/System/Temperature4"}
    return frozenset(set(RULES) | set(TEXT_FORMATS) | set(NUMERIC_BOUNDS) | set(TEXT_PATHS) | extra)


def path_issue(path: Any, loc: tuple[Any, ...], known: frozenset[str]) -> Issue | None:
    """A path that is close to a known one (other case, a small typo in one word) is an error with a
    suggestion; a path far from every known one only a warning (vendors publish their own paths)."""
    if not isinstance(path, str) or not path.startswith("/") or path.endswith("/") or "//" in path:
        return Issue(loc, f"{path!r} is not a D-Bus path (like /Soc or /Dc/0/Voltage)")
    if path in known:
        return None
    lowered = {k.lower(): k for k in known}
    if path.lower() in lowered:
        return Issue(loc, f"{path!r} is not a battery path: did you mean {lowered[path.lower()]}? (paths are "
                          "case-sensitive)")
    parts = path.split("/")
    for candidate in sorted(known):
        other = candidate.split("/")
        if len(other) != len(parts):
            continue
        differing = [(a, b) for a, b in zip(parts, other) if a != b]
        if len(differing) == 1:
            mine, theirs = differing[0]
            if not mine.isdigit() and not theirs.isdigit() and \
                    difflib.SequenceMatcher(None, mine.lower(), theirs.lower()).ratio() >= 0.7:
                return Issue(loc, f"{path!r} is not a battery path: did you mean {candidate}?")
    return Issue(loc, f"{path!r} is not a known battery path (fine if the service publishes it; check the "
                      "spelling)", "warning")


def semantic_issues(config: Config) -> list[Issue]:
    """Mistakes the types alone cannot catch: a service in two roles, malformed references, bad hooks, paths
    that are typos of battery paths."""
    issues: list[Issue] = []
    claimed: dict[str, str] = {}
    known = known_paths()

    def claim(ref: str, role: str, loc: tuple[Any, ...]) -> None:
        if ref in claimed and claimed[ref] != role:
            issues.append(Issue(loc, f"{ref!r} is also listed in {claimed[ref]}; a service has one role "
                                     "(excluded, primary, auxiliary or member of one virtual battery)"))
        claimed.setdefault(ref, role)

    def paths_of(spec: Any, ref: str, loc: tuple[Any, ...]) -> None:
        if isinstance(spec, dict):
            for j, path in enumerate(spec.get(ref) or []):
                issue = path_issue(path, loc + (j,), known)
                if issue is not None:
                    issues.append(issue)

    for key in ("excludedServices", "primaryServices", "auxiliaryServices"):
        spec = getattr(config, key)
        for i, ref in enumerate(_refs(spec)):
            loc = (key, i) if isinstance(spec, list) else (key, ref)
            if not _is_reference(ref):
                issues.append(Issue(loc, f"{ref!r} is not {REFERENCE_FORMS}"))
            claim(ref, key, loc)
            paths_of(spec, ref, loc)
    for name, spec in config.virtualBatteries.items():
        vb = ("virtualBatteries", name)
        if not name.startswith("com.victronenergy.battery.") or len(name) <= 26:
            issues.append(Issue(vb, f"the name {name!r} must be com.victronenergy.battery.<name>"))
        if name == config.serviceName:
            issues.append(Issue(vb, f"{name!r} is the aggregate's own serviceName"))
        for i, ref in enumerate(_refs(spec)):
            loc = vb + ((i,) if isinstance(spec, list) else (ref,))
            if ref.startswith("class:"):
                issues += _hook_issues(ref[len("class:"):], loc, config, known)
                continue
            if not _is_reference(ref):
                issues.append(Issue(loc, f"{ref!r} is not {REFERENCE_FORMS} or class:<hooks.Class>[#suffix]"))
            if ref == name or ref in config.virtualBatteries:
                what = "itself" if ref == name else "another virtual battery"
                issues.append(Issue(loc, f"a virtual battery cannot contain {what} ({ref!r})"))
            if ref == config.serviceName:
                issues.append(Issue(loc, f"{ref!r} is the aggregate itself"))
            claim(ref, f'virtualBatteries."{name}"', loc)
            paths_of(spec, ref, loc)
    issues += _grid_battery_issues(config)
    used = {ref[len("class:"):] for spec in config.virtualBatteries.values() for ref in _refs(spec)
            if ref.startswith("class:")}
    for entry in config.classes:
        if entry not in used:
            issues.append(Issue(("classes", entry), "configures a hook that no virtual battery uses", "warning"))
    return issues


def _hook_issues(spec: str, loc: tuple[Any, ...], config: Config, known: frozenset[str]) -> list[Issue]:
    """A virtual battery's `class:<spec>` member: a hook that cannot be built, or whose fixed path is a typo."""
    from .battery.hooks import HookConfigError, build_hook

    try:
        hook = build_hook(spec, config.classes)
    except HookConfigError as exc:
        return [Issue(loc, str(exc))]
    fixed_path = getattr(hook, "path", None)
    if fixed_path is not None:
        issue = path_issue(fixed_path, ("classes", spec, "path"), known)
        if issue is not None:
            return [issue]
    return []


def _grid_battery_issues(config: Config) -> list[Issue]:
    """Grid batteries are services of ours: their names must not collide. Their device instances are given
    by localsettings, which moves a taken one on: asking twice for one is worth a warning only."""
    issues: list[Issue] = []
    names = {config.serviceName: "serviceName"}
    for name in config.virtualBatteries:
        names.setdefault(name, f'virtualBatteries."{name}"')
    instances: dict[int, int] = {}
    for i, grid in enumerate(config.gridBatteries):
        if grid.serviceName in names:
            issues.append(Issue(("gridBatteries", i, "serviceName"), f"{grid.serviceName!r} is already used by "
                                f"{names[grid.serviceName]}; each grid battery needs a service name of its own"))
        names.setdefault(grid.serviceName, f"gridBatteries.{i}")
        if grid.deviceInstance is None:
            continue
        if grid.deviceInstance in instances:
            issues.append(Issue(("gridBatteries", i, "deviceInstance"), f"{grid.deviceInstance} is also the "
                                f"deviceInstance of gridBatteries.{instances[grid.deviceInstance]}; "
                                "localsettings gives one of them another instance", "warning"))
        instances.setdefault(grid.deviceInstance, i)
    return issues


def semantic_errors(config: Config) -> list[str]:
    return [i.text() for i in semantic_issues(config) if i.severity == "error"]


def validate_document(data: Any) -> Config:
    """The model from decoded JSON, judged as JSON and as config.schema.json says: strictly, so a number
    written as a string ("60") or a flag as 1 is an error, not silently converted (the config page and
    editors that read the schema refuse them too). Raises ValidationError."""
    from .schema import config_schema

    return Config.model_validate_json(json.dumps(integers_as_ints(config_schema(), data), allow_nan=False),
                                      strict=True)


def schema_messages(err: ValidationError, data: Any,
                    positions: dict[tuple[Any, ...], tuple[int, int]] | None = None) -> list[str]:
    """The model's errors, their key paths read through the JSON schema (as the config page reads them)."""
    from .schema import config_schema

    return validation_messages(err, positions=positions, schema=config_schema(), data=data)


def parse_config(data: Any, source: str = "config",
                 positions: dict[tuple[Any, ...], tuple[int, int]] | None = None) -> Config:
    """Validate decoded JSON; ConfigError lists every error with its key path (and line/column if known)."""
    try:
        config = validate_document(data)
    except ValidationError as err:
        raise ConfigError(format_messages(source, schema_messages(err, data, positions))) from None
    except ValueError as err:  # NaN or Infinity: not JSON
        raise ConfigError(f"invalid {source}: {err}") from None
    errors = [i.text(positions) for i in semantic_issues(config) if i.severity == "error"]
    if errors:
        raise ConfigError(format_messages(source, errors))
    return config


def check_config_file(path: str | Path) -> CheckResult:
    """Everything the checker and the daemon want to know of a config file, never raising."""
    try:
        text = read_text(path)
        data = parse_json_text(text)
    except JsonFileError as exc:
        return CheckResult(None, [str(exc) if str(exc).startswith("cannot read") else f"{path}: {exc}"], [])
    positions = json_positions(text)
    try:
        config = validate_document(data)
    except ValidationError as err:
        return CheckResult(None, schema_messages(err, data, positions), [])
    issues = semantic_issues(config)
    errors = [i.text(positions) for i in issues if i.severity == "error"]
    warnings = [i.text(positions) for i in issues if i.severity == "warning"]
    document = None if errors else config.model_dump(mode="json", exclude_unset=True)
    return CheckResult(None if errors else config, errors, warnings, document)


def load_config(path: str | Path | None) -> Config:
    """Load and validate a config file; a missing file at the default path means all defaults."""
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if not Path(path).exists():
            return Config()
    result = check_config_file(path)
    if result.config is None:
        raise ConfigError(format_messages(f"config {path}", result.errors))
    return result.config
