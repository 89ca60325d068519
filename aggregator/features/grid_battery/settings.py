"""The `gridBatteries` entries of the config: one grid battery each."""
from __future__ import annotations

from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...validation import format_validation_error
from .core import GRID_PREFIX, GridBatteryConfig, parse_month_day



class GridBatterySettingsError(ValueError):
    """The settings cannot be used; the message names the key, the value and what is allowed."""


class GridBatterySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter: str | int = Field(..., description="the grid meter: a com.victronenergy.grid.* service name, "
                             "name:<CustomName or ProductName>, or its device instance")
    capacityKwh: float = Field(0.0, ge=0, lt=1e6, description="kWh the grid battery holds; 0 = unlimited")
    startDate: date = Field(..., description="the day counting starts (YYYY-MM-DD)")
    startImportKwh: float | None = Field(None, ge=0, lt=1e9, description="the meter's /Ac/Energy/Forward at "
                                         "00:00 on startDate (with startExportKwh): the energy since then counts "
                                         "even when the service starts later")
    startExportKwh: float | None = Field(None, ge=0, lt=1e9, description="the meter's /Ac/Energy/Reverse at "
                                         "00:00 on startDate (with startImportKwh)")
    startLevelKwh: float | None = Field(None, ge=0, lt=1e6, description="the level counting starts from: at "
                                        "00:00 on startDate with startImportKwh/startExportKwh, else at the "
                                        "first sample (e.g. what smart-me shows then); null = 0")
    resetDate: str | None = Field(None, description="MM-DD: every year on that day the level returns to 0; "
                                  "null = never")
    resetOnce: date | None = Field(None, description="YYYY-MM-DD: on that day the level returns to 0, once; "
                                   "null = never")
    serviceName: str = Field("com.victronenergy.battery.grid", pattern=r"^com\.victronenergy\.battery\.[A-Za-z0-9_]+$",
                             description="D-Bus name of the grid battery")
    nominalVoltage: float = Field(51.2, gt=0, le=1000, description="V for the Ah values and the current")
    deviceInstance: int | None = Field(None, ge=0, le=65535, description="the device instance asked of "
                                       "localsettings (which gives another when it is taken); null = one "
                                       "derived from serviceName")
    maxPowerKw: float = Field(100.0, gt=0, le=100000, description="the grid connection's largest power: meter "
                              "counters moving faster are rejected as impossible")

    @field_validator("meter")
    @classmethod
    def _meter(cls, value: str | int) -> str | int:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("a device instance must be >= 0")
            return value
        text = value.strip()
        if text.isdigit():
            return int(text)
        if text.startswith(GRID_PREFIX) and len(text) > len(GRID_PREFIX):
            return text
        if text.startswith("name:") and text[5:].strip():
            return text
        raise ValueError(f"{value!r} is not a meter reference; allowed: a {GRID_PREFIX}* service name, "
                         f"name:<CustomName or ProductName>, or a device instance number")

    @field_validator("resetDate")
    @classmethod
    def _reset_date(cls, value: str | None) -> str | None:
        if value is not None:
            parse_month_day(value)
        return value

    @model_validator(mode="after")
    def _start(self) -> "GridBatterySettings":
        if (self.startImportKwh is None) != (self.startExportKwh is None):
            raise ValueError("startImportKwh and startExportKwh go together: the meter's import and export "
                             "counters at 00:00 on startDate (or neither)")
        if self.startLevelKwh is not None and 0 < self.capacityKwh < self.startLevelKwh:
            raise ValueError(f"startLevelKwh {self.startLevelKwh:g} is more than capacityKwh {self.capacityKwh:g}")
        return self

    def battery_config(self) -> GridBatteryConfig:
        reading = None if self.startImportKwh is None or self.startExportKwh is None else \
            (self.startImportKwh, self.startExportKwh)
        return GridBatteryConfig(
            capacity_kwh=self.capacityKwh, start_date=self.startDate,
            reset_day=parse_month_day(self.resetDate) if self.resetDate else None, reset_once=self.resetOnce,
            start_reading=reading, start_level_kwh=self.startLevelKwh,
            nominal_voltage=self.nominalVoltage, max_power_kw=self.maxPowerKw,
        )


def parse_settings(data: Any, source: str = "grid battery settings") -> GridBatterySettings:
    try:
        return GridBatterySettings.model_validate(data)
    except ValidationError as err:
        raise GridBatterySettingsError(format_validation_error(err, source)) from None


# ---- the meter -------------------------------------------------------------------------------------------
