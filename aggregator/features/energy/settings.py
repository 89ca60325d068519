"""The `energy` section of the config: identities and counter kinds of the members, external batteries and the
HTTP endpoint for their reports."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...validation import is_loopback


class MemberEnergyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="the battery's identity when "
                           "it publishes no /Serial (its energy totals are kept under it)")
    counterKind: Literal["total", "daily"] = Field("total", description="its /History/ChargedEnergy and "
                                                   "/History/DischargedEnergy run for its lifetime (total) or "
                                                   "restart every day at midnight (daily)")
    capacityKwh: float | None = Field(None, gt=0, lt=1e6, description="a reported battery's capacity in kWh: a "
                                      "report whose increase cannot fit in it is refused; null = not checked")
    maxPowerKw: float | None = Field(None, gt=0, le=100000, description="a reported battery's largest charge or "
                                     "discharge power in kW: a report with more energy than that in the time "
                                     "since the last one is refused; null = energy.externalMaxPowerKw")


class EnergyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    members: dict[str, MemberEnergyOptions] = Field(default_factory=dict, description="per battery, keyed by a "
                                                    "service reference, its /Serial or a reported id: its id, its "
                                                    "counter kind and the bounds of its reports")
    httpPort: int | None = Field(None, ge=1, le=65535, description="port of the HTTP endpoint for external "
                                 "reports (POST /report); null = off")
    httpBind: str = Field("127.0.0.1", min_length=1, description="address the HTTP endpoint listens on")
    httpToken: str | None = Field(None, min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$",
                                  description="requests to the HTTP endpoint need the header Authorization: "
                                  "Bearer <httpToken>; required when httpBind is not a loopback address")
    externalStaleAfter: float = Field(2250.0, gt=0, le=604800, description="seconds without a report before an "
                                      "external battery is stale (it leaves the levels); the default is two and a "
                                      "half 15-minute report intervals, so one late or missed report does not "
                                      "make it stale")
    externalMaxPowerKw: float = Field(10.0, gt=0, le=100000, description="the largest power in kW of a reported "
                                      "battery without its own members.<id>.maxPowerKw: a report with more "
                                      "energy than that in the time since the last one is refused")
    maxExternal: int = Field(32, ge=1, le=1000, description="most external battery ids kept; a report of a new "
                             "id beyond it is refused (remove ids with battery-aggregator report --remove ID)")

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> "EnergyOptions":
        # Reports change the energy totals: beyond this machine nobody may send them without the token.
        if self.httpPort is not None and self.httpToken is None and not is_loopback(self.httpBind):
            raise ValueError(f"httpToken is required: httpBind {self.httpBind!r} is not a loopback address "
                             "(127.0.0.1, ::1, localhost), so reports need a token (16 to 256 printable "
                             "characters, sent as Authorization: Bearer <token>)")
        return self
