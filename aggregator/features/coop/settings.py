"""The `coop` config section: one household's membership of a cooperative.

camelCase keys like the rest of config.json; unknown keys are errors. Example (setup/coop/README.md):

    "coop": {"enabled": true, "siteId": "rivendell",
             "broker": {"host": "mqtt.coop.example", "caFile": "/data/coop/ca.crt", "password": "..."},
             "maxChargeW": 5000, "maxDischargeW": 5000}
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from ...mqtt.settings import BrokerConnection
from ...validation import format_validation_error, is_loopback
from .core import MAX_CAPACITY_KWH, SITE_ID_PATTERN, PeerPolicy, SiteSettings

SiteId = Annotated[str, StringConstraints(pattern=SITE_ID_PATTERN)]

TOPIC_PREFIX_PATTERN = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"  # no wildcards, no empty levels


class BrokerSettings(BrokerConnection):
    """The cooperative's broker: over the internet, so TLS by default; our user name is the siteId."""

    username_implied: ClassVar[bool] = True

    host: str = Field(min_length=1, description="the cooperative's MQTT broker")
    port: int = Field(8883, ge=1, le=65535, description="8883 is MQTT over TLS")
    tls: bool = Field(True, description="TLS to the broker; off only on loopback (passwords would travel in "
                      "clear text over home internet connections)")
    username: str | None = Field(None, min_length=1, description="defaults to siteId; the broker's ACL lets a "
                                 "site write only under <topicPrefix>/<username>/")
    password: str | None = Field(None, min_length=1, description="this site's password on the broker")

    @model_validator(mode="after")
    def _tls_off_only_on_loopback(self) -> BrokerSettings:
        if not self.tls and not is_loopback(self.host):
            raise ValueError(f"tls may be off only for a broker on this machine (host is {self.host!r}); "
                             "the password and the cooperative's data would travel in clear text")
        return self


class CurtailSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: Literal["none", "mqtt", "dbus"] = Field("mqtt", description="how the stop/start command reaches "
                                                     "the inverter: an MQTT topic, a D-Bus path, or not at all")
    topic: str | None = Field(None, min_length=1, description="mqtt: the command topic (default "
                              "<topicPrefix>/<siteId>/curtail); payload 1 = stop production, 0 = run")
    service: str | None = Field(None, pattern=r"^com\.victronenergy\.[A-Za-z0-9_.]+$", description="dbus: the "
                                "service, e.g. com.victronenergy.solarcharger.ttyS1")
    path: str | None = Field(None, pattern=r"^(/[A-Za-z0-9_]+)+$", description="dbus: the path, e.g. /Mode")
    curtailedValue: int = Field(4, description="dbus: the value that stops production (a solar charger's "
                                "/Mode: 4 = off)")
    releasedValue: int = Field(1, description="dbus: the value that runs production (/Mode: 1 = on)")
    fullPercent: float = Field(99.0, gt=0, le=100, description="stop production at or above this level")
    releasePercent: float = Field(97.0, ge=0, lt=100, description="run again below this level")
    dischargeReleaseW: float = Field(100.0, ge=0, le=100_000, description="or as soon as the battery "
                                     "discharges by more than this (W)")
    minHoldSeconds: float = Field(300.0, ge=0, le=86400, description="once running again, production is not "
                                  "stopped for this long (a full battery and a small load would switch it "
                                  "every control step)")

    @model_validator(mode="after")
    def _consistent(self) -> CurtailSettings:
        if self.releasePercent >= self.fullPercent:
            raise ValueError(f"releasePercent ({self.releasePercent}) must be below fullPercent "
                             f"({self.fullPercent}), or production would switch on and off at one level")
        if self.adapter == "dbus" and (self.service is None or self.path is None):
            raise ValueError("adapter 'dbus' needs service and path (e.g. com.victronenergy.solarcharger.ttyS1 "
                             "and /Mode)")
        return self


class HomeAssistantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="publish Home Assistant MQTT discovery sensors for the fleet view")
    discoveryPrefix: str = Field("homeassistant", pattern=TOPIC_PREFIX_PATTERN,
                                 description="Home Assistant's discovery prefix")


class PeerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    capacityKwh: float = Field(gt=0, le=MAX_CAPACITY_KWH, description="the site's registered battery capacity "
                               "(kWh); a claim more than 10 % above it is not believed")


class CoopSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="take part in the cooperative")
    siteId: str | None = Field(None, pattern=SITE_ID_PATTERN, description="this household's id (letters, "
                               "digits, _ and -); also its MQTT username")
    broker: BrokerSettings | None = Field(None, description="the cooperative's broker")
    topicPrefix: str = Field("coop", pattern=TOPIC_PREFIX_PATTERN, description="topics are "
                             "<topicPrefix>/<siteId>/state and /status")
    publishSeconds: float = Field(30.0, gt=0, le=3600, description="publish our state at least this often")
    peerTimeoutSeconds: float = Field(120.0, gt=0, le=86400, description="a peer not heard from for this long "
                                      "leaves the average")
    deadbandPercent: float = Field(2.0, ge=0, le=50, description="no transfer within this distance (percentage "
                                   "points) of the fleet's average; same value at every site")
    gainWPerPercentKwh: float = Field(20.0, gt=0, le=1000, description="transfer per percentage point of "
                                      "distance per kWh of capacity (20: a site 10 points behind with 10 kWh "
                                      "takes 2 kW, closing the gap with a time constant of 10/20 h = 30 min); "
                                      "same value at every site")
    maxChargeW: float = Field(5000.0, ge=0, le=500_000, description="the battery's charge power limit")
    maxDischargeW: float = Field(5000.0, ge=0, le=500_000, description="the battery's discharge power limit")
    gridLimitW: float = Field(5750.0, gt=0, le=500_000, description="the grid connection's limit (W, each "
                              "direction; 25 A at 230 V = 5750)")
    reservePercent: float = Field(10.0, ge=0, le=100, description="never deliver to the fleet at or below "
                                  "this level")
    peers: dict[SiteId, PeerEntry] = Field(default_factory=dict, description="the cooperative's members (siteId "
                                           "-> registered capacity), the same list at every site: a site not "
                                           "listed is ignored, and so is a claim above its registered capacity; "
                                           "empty = any site may take part, up to maxPeerCapacityKwh")
    maxPeerCapacityKwh: float = Field(100.0, gt=0, le=MAX_CAPACITY_KWH, description="without a peers list: the "
                                      "largest capacity (kWh) a peer may claim; a larger claim is ignored, or "
                                      "one peer could pull the fleet's average to its own level")
    maxDailyDrawPercent: float = Field(100.0, gt=0, le=1000, description="the most the fleet delivers for one "
                                       "site in a calendar day, in % of that site's capacity (a site whose "
                                       "claims add up can still invent a load); same value at every site")
    curtail: CurtailSettings = Field(default_factory=CurtailSettings, description="stopping the solar "
                                     "production while the battery is full")
    homeAssistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings, description="Home "
                                                 "Assistant MQTT discovery of the fleet view")

    @model_validator(mode="after")
    def _complete(self) -> CoopSettings:
        if self.enabled:
            if self.siteId is None:
                raise ValueError("siteId is required when the coop is enabled")
            if self.broker is None:
                raise ValueError("broker is required when the coop is enabled (at least its host)")
        if self.broker is not None and self.siteId is not None and self.broker.username not in (None, self.siteId):
            raise ValueError(f"broker.username {self.broker.username!r} must equal siteId {self.siteId!r}: the "
                             "broker's ACL lets a site write only under <topicPrefix>/<its username>/")
        if self.peers and self.siteId is not None and self.siteId not in self.peers:
            raise ValueError(f"siteId {self.siteId!r} is not in peers: the list is the cooperative's members, the "
                             "same at every site, this one included")
        if self.peerTimeoutSeconds <= 2 * self.publishSeconds:
            raise ValueError(f"peerTimeoutSeconds ({self.peerTimeoutSeconds:g}) must be more than twice "
                             f"publishSeconds ({self.publishSeconds:g}), or a peer goes stale between its updates")
        if self.reservePercent >= self.curtail.fullPercent:
            raise ValueError(f"reservePercent ({self.reservePercent:g}) must be below curtail.fullPercent "
                             f"({self.curtail.fullPercent:g})")
        return self

    @property
    def username(self) -> str:
        assert self.broker is not None and self.siteId is not None
        return self.broker.username or self.siteId

    def site_settings(self) -> SiteSettings:
        return SiteSettings(gain_w_per_percent_kwh=self.gainWPerPercentKwh, deadband_percent=self.deadbandPercent,
                            max_charge_w=self.maxChargeW, max_discharge_w=self.maxDischargeW,
                            grid_limit_w=self.gridLimitW, full_percent=self.curtail.fullPercent,
                            reserve_percent=self.reservePercent, daily_draw_percent=self.maxDailyDrawPercent)

    def peer_policy(self) -> PeerPolicy:
        registered = {site: entry.capacityKwh for site, entry in self.peers.items()} if self.peers else None
        return PeerPolicy(registered=registered, max_capacity_kwh=self.maxPeerCapacityKwh,
                          timeout_s=self.peerTimeoutSeconds)


class CoopSettingsError(ValueError):
    """The coop section cannot be used; the message names the key, the value and what is allowed."""


def parse_coop(data: Any, source: str = "coop settings") -> CoopSettings:
    try:
        return CoopSettings.model_validate(data)
    except ValidationError as err:
        raise CoopSettingsError(format_validation_error(err, source)) from None
