"""The `dispatcher` section of config.json: batteries we command, where their values come from, MQTT.

camelCase keys like the rest of config.py; unknown keys are refused. `dispatcher_settings()` turns the
section into the pure controller's DispatcherSettings, so the controller never sees config concerns.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from ...mqtt.settings import BrokerConnection
from ...validation import format_validation_error, is_loopback

DEFAULT_SERVICE_NAME = "org.batteryaggregator.dispatcher"

_SERVICE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)+$")
_PATH = re.compile(r"^(/[A-Za-z0-9_]+)+$")
_SLUG = re.compile(r"^[A-Za-z0-9_-]+$")

# Tags of the number-or-adapter union. The brackets make validation.key_path() leave them out of messages.
NUMBER_TAG = "number[W]"
ADAPTER_TAG = "adapter[dbus|mqtt]"
UNION_TAGS = {NUMBER_TAG, ADAPTER_TAG}


class DbusRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = Field(description="D-Bus service name, e.g. com.victronenergy.acsystem.socketcan_can0_sys0")
    path: str = Field(description="BusItem path, e.g. /Ess/InverterPowerSetpoint")

    @field_validator("service")
    @classmethod
    def _service(cls, value: str) -> str:
        if not _SERVICE.match(value):
            raise ValueError("not a D-Bus service name (like com.victronenergy.acsystem.socketcan_can0_sys0)")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not _PATH.match(value):
            raise ValueError("not a D-Bus path (like /Dc/0/Power)")
        return value


class MqttRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topic: str = Field(min_length=1, description="state topic for a reading, command topic for a setpoint")
    jsonKey: str | None = Field(None, min_length=1, description="the payload is JSON and the value is at this key "
                                "(dots for nested keys: 'battery.power'); without it the payload is a plain number")

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if "+" in value or "#" in value:
            raise ValueError("a topic of one device, without the wildcards + and #")
        if value.startswith("/") or value.endswith("/") or "//" in value:
            raise ValueError("a topic has no empty levels (no leading, trailing or double '/')")
        return value


class AdapterSpec(BaseModel):
    """Where one value lives: a D-Bus path or an MQTT topic (exactly one)."""

    model_config = ConfigDict(extra="forbid")
    dbus: DbusRef | None = Field(None, description="a path on a D-Bus service")
    mqtt: MqttRef | None = Field(None, description="a topic on the broker of dispatcher.mqtt")
    scale: float = Field(1.0, description="device unit -> W (or Wh, %): a reading is multiplied by it, a setpoint "
                         "divided (1000 for a device in kW)")

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: float) -> float:
        if not math.isfinite(value) or value == 0:
            raise ValueError("a finite number other than 0")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> AdapterSpec:
        if (self.dbus is None) == (self.mqtt is None):
            raise ValueError('give exactly one of "dbus": {"service", "path"} or "mqtt": {"topic", "jsonKey"}')
        return self


def _number_or_adapter(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return NUMBER_TAG
    if isinstance(value, (dict, AdapterSpec)):
        return ADAPTER_TAG
    return None


Watts = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# A limit: a fixed number of watts, or read from the device.
LimitSpec = Annotated[
    Union[Annotated[Watts, Tag(NUMBER_TAG)], Annotated[AdapterSpec, Tag(ADAPTER_TAG)]],
    Discriminator(_number_or_adapter, custom_error_type="number_or_adapter",
                  custom_error_message='a number of watts (>= 0) or an adapter ({"dbus": ...} or {"mqtt": ...})'),
]
Sign = Literal[1, -1]


class BatterySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="shown on D-Bus and MQTT; unique")
    setpoint: AdapterSpec = Field(description="where the power setpoint (W) is written")
    measured: AdapterSpec = Field(description="where the measured power (W) is read")
    soc: AdapterSpec | None = Field(None, description="state of charge (%)")
    temperature: AdapterSpec | None = Field(None, description="battery temperature (degC): learned limits are "
                                            "kept per temperature band too")
    capacityWh: float | None = Field(None, gt=0, allow_inf_nan=False, description="usable energy (Wh)")
    capacity: AdapterSpec | None = Field(None, description="usable energy read from the device (Wh after scale)")
    maxChargeW: LimitSpec = Field(description="largest charge power (W): a number or an adapter")
    maxDischargeW: LimitSpec = Field(description="largest discharge power (W, positive): a number or an adapter")
    setpointSign: Sign = Field(1, description="+1 when the device's setpoint is + for charging, -1 when + means "
                               "discharging")
    measuredSign: Sign = Field(1, description="+1 when the device reports charging as +, -1 when as -")
    minCommandW: float | None = Field(None, ge=0, allow_inf_nan=False, description="setpoints smaller than this "
                                      "(in magnitude) are written as 0: the device cannot do less")
    setpointTimeoutS: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False, description="the device's own "
                                           "setpoint watchdog (s): it falls back to 0 when no setpoint came for this "
                                           "long; the setpoint is then written at least every third of it, so the "
                                           "device stops within this time after the dispatcher dies")
    zeroWill: bool = Field(True, description="MQTT setpoints: a broker connection whose last will publishes setpoint "
                           "0 (not retained) on the command topic when the dispatcher dies without a clean disconnect")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value != value.strip() or any(not c.isprintable() for c in value):
            raise ValueError("printable text without leading or trailing spaces")
        return value

    @model_validator(mode="after")
    def _one_capacity(self) -> BatterySettings:
        if self.capacityWh is not None and self.capacity is not None:
            raise ValueError("give capacityWh (a number) or capacity (an adapter), not both")
        return self

    def adapters(self) -> dict[str, AdapterSpec]:
        """Every adapter of this battery by role."""
        out = {"setpoint": self.setpoint, "measured": self.measured}
        for role in ("soc", "temperature", "capacity", "maxChargeW", "maxDischargeW"):
            spec = getattr(self, role)
            if isinstance(spec, AdapterSpec):
                out[role] = spec
        return out


class MqttSettings(BrokerConnection):
    """The dispatcher's broker: by default one on this machine."""

    host: str = Field("127.0.0.1", min_length=1, description="broker host")
    username: str | None = Field(None, min_length=1, description="our user name on the broker (MQTT commands "
                                 "are taken only with credentials: see acceptCommands)")
    acceptCommands: Literal["authenticated", "loopback", "never"] = Field(
        "authenticated", description="who may set the target and enabled over MQTT: authenticated: only when we "
        "log in to the broker (username and password, or a TLS client certificate), so the broker can keep "
        "anonymous clients out; loopback: also without credentials, for a broker on this machine that listens on "
        "loopback only; never: no MQTT commands")
    clientId: str | None = Field(None, min_length=1, max_length=64, description="MQTT client id (default: "
                                 "battery-aggregator-dispatcher-<pid>)")
    topicPrefix: str = Field("battery-aggregator/dispatcher", min_length=1, description="our state and command "
                             "topics live below it")
    homeAssistant: bool = Field(False, description="publish Home Assistant MQTT discovery")
    discoveryPrefix: str = Field("homeassistant", min_length=1, description="Home Assistant's discovery prefix")
    nodeId: str = Field("battery_dispatcher", min_length=1, description="Home Assistant node id and device "
                        "identifier (letters, digits, _ and -)")

    @field_validator("topicPrefix", "discoveryPrefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if "+" in value or "#" in value or value.startswith("/") or value.endswith("/") or "//" in value:
            raise ValueError("a topic prefix without wildcards and without empty levels")
        return value

    @field_validator("nodeId")
    @classmethod
    def _node(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("letters, digits, _ and - only (Home Assistant's rule for node ids)")
        return value

    @model_validator(mode="after")
    def _commands_need_credentials(self) -> MqttSettings:
        if self.acceptCommands != "never" and not self.authenticated and not is_loopback(self.host):
            # Anyone who can publish to that broker could set the batteries' power.
            raise ValueError(f"acceptCommands: the broker {self.host} is not on this machine and no credentials are "
                             "configured, so anyone who can reach it could command the batteries; set username and "
                             'password (or certFile and keyFile with "tls": true), or "acceptCommands": "never"')
        return self

    @property
    def authenticated(self) -> bool:
        """We log in to the broker (so it can tell us from anonymous clients)."""
        return self.username is not None or self.certFile is not None

    def commands_refused(self) -> str | None:
        """Why MQTT commands are not taken, or None when they are."""
        if self.acceptCommands == "never":
            return 'mqtt.acceptCommands is "never"'
        if self.authenticated:
            return None
        if self.acceptCommands == "loopback" and is_loopback(self.host):
            return None
        return ("no MQTT credentials (mqtt.username/password or certFile/keyFile): anyone who can publish to the "
                'broker could command the batteries; configure them, or set mqtt.acceptCommands to "loopback" for a '
                "broker that listens on loopback only")


class DispatcherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="command the batteries (when false the values are still shown)")
    serviceName: str = Field(DEFAULT_SERVICE_NAME, description="D-Bus name when the dispatcher runs on its own")
    cycleSeconds: float = Field(1.0, ge=0.1, le=60, description="seconds between two dispatch cycles")
    mode: Literal["target", "gridZero"] = Field("target", description="target: the total power written to "
                                                "/Dispatcher/TargetPower or MQTT; gridZero: keep the grid meter at "
                                                "gridSetpointW")
    gridMeter: str | None = Field(None, description="grid meter service for gridZero (its /Ac/Power, + = import), "
                                  "e.g. com.victronenergy.grid.cgwacs_ttyUSB0_mb1")
    gridSetpointW: float = Field(0.0, ge=-100000, le=100000, description="grid power gridZero aims for (W, + = "
                                 "import)")
    gridDeadbandW: float = Field(25.0, ge=0, le=10000, description="grid deviation (W) gridZero leaves alone")
    staleAfterS: float = Field(30.0, gt=0, le=3600, description="seconds without a measurement before a battery is "
                               "stale (and gets setpoint 0)")
    minCommandW: float = Field(25.0, ge=0, le=100000, description="smaller setpoints are sent as 0")
    maxStepWPerS: float = Field(2000.0, gt=0, le=1000000, description="W/s a setpoint may change by")
    directionHysteresisW: float = Field(50.0, ge=0, le=100000, description="W a battery's setpoint must pass 0 by "
                                        "before it changes direction")
    weight: Literal["capacity", "energy", "equal"] = Field(
        "capacity", description="how the target is split: by capacity, by usable energy in the direction asked "
        "(energy), or equally")
    setpointKeepAliveS: float = Field(30.0, ge=0, le=3600, description="an unchanged setpoint is written again "
                                      "after this many seconds (0: only when it changes)")
    readRefreshS: float = Field(5.0, gt=0, le=3600, description="a D-Bus service that signalled nothing for this "
                                "long is asked for one value, so its unchanging values are not taken for stale ones "
                                "(any signal of the service confirms them all)")
    stateSaveS: float = Field(300.0, gt=0, le=86400, description="seconds between two saves of the learned state")
    mqtt: MqttSettings | None = Field(None, description="the MQTT broker (for MQTT adapters, MQTT control, Home "
                                      "Assistant)")
    batteries: list[BatterySettings] = Field(default_factory=list, description="the batteries to command")

    @field_validator("gridMeter")
    @classmethod
    def _grid_meter(cls, value: str | None) -> str | None:
        if value is not None and not _SERVICE.match(value):
            raise ValueError("not a D-Bus service name (like com.victronenergy.grid.cgwacs_ttyUSB0_mb1)")
        return value

    @field_validator("serviceName")
    @classmethod
    def _service_name(cls, value: str) -> str:
        if not _SERVICE.match(value):
            raise ValueError(f"not a D-Bus service name (like {DEFAULT_SERVICE_NAME})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DispatcherConfig:
        if self.mode == "gridZero" and self.gridMeter is None:
            raise ValueError('mode "gridZero" needs gridMeter (the grid meter\'s service name)')
        if self.enabled and not self.batteries:
            raise ValueError("enabled, but no batteries are configured")
        seen: dict[str, str] = {}
        for i, battery in enumerate(self.batteries):
            key = _topic_level(battery.name)
            if key in seen:
                other = seen[key]
                raise ValueError(f"batteries[{i}].name: {battery.name!r} is used twice; names are unique" if
                                 other == battery.name else f"batteries[{i}].name: {battery.name!r} and {other!r} "
                                 f"would share the MQTT topics .../batteries/{key}; choose names that differ in "
                                 "letters or digits")
            seen[key] = battery.name
            if battery.setpointTimeoutS is not None and battery.setpointTimeoutS < 3 * self.cycleSeconds:
                raise ValueError(f"batteries[{i}].setpointTimeoutS: {battery.setpointTimeoutS:g} s is less than three "
                                 f"cycles ({3 * self.cycleSeconds:g} s): the device would stop between two writes")
            if self.mqtt is None:
                for role, spec in battery.adapters().items():
                    if spec.mqtt is not None:
                        raise ValueError(f"batteries[{i}].{role} uses MQTT, but there is no mqtt section (broker)")
        return self


def _topic_level(name: str) -> str:
    from ...mqtt.hass import slug

    return slug(name)


class DispatcherConfigError(ValueError):
    """The dispatcher section cannot be used; the message names the key, the value and what is allowed."""


def parse_dispatcher_config(data: Any, source: str = "dispatcher config") -> DispatcherConfig:
    """Validate the decoded `dispatcher` section (a whole config.json with a `dispatcher` key is fine too)."""
    if isinstance(data, dict) and "dispatcher" in data:
        data = data["dispatcher"]
    try:
        return DispatcherConfig.model_validate(data)
    except ValidationError as err:
        raise DispatcherConfigError(format_validation_error(err, source, union_tags=UNION_TAGS)) from None


# Our key -> the controller's field.
_CONTROLLER_FIELDS = {
    "staleAfterS": "stale_after_s",
    "minCommandW": "min_command_w",
    "maxStepWPerS": "max_step_w_per_s",
    "directionHysteresisW": "direction_hysteresis_w",
    "weight": "weight",
    "cycleSeconds": "cycle_s",
}


def dispatcher_settings(config: DispatcherConfig) -> Any:
    """The controller's DispatcherSettings for this section (fields it does not know are left at defaults)."""
    from .core.controller import DispatcherSettings

    known = {f.name for f in dataclasses.fields(DispatcherSettings)}
    values = {field: getattr(config, key) for key, field in _CONTROLLER_FIELDS.items() if field in known}
    return DispatcherSettings(**values)
