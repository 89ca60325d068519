"""Member values checked before they are merged: wrong types and absurd values become "no value".

Pure. A BMS that publishes NaN, a string for a current, a negative capacity or SoC 150 must not move the
aggregate: such a value is treated as missing, never as zero, and reported so the caller can log it. A text or
list beyond the size limits is refused too: republished, it would make our messages too large for the bus.
"""
from __future__ import annotations

import math
from typing import Any

from ..bounded import oversize

# Plausible ranges of numeric battery paths. Beyond them a value is a fault, not a measurement.
NUMERIC_BOUNDS: dict[str, tuple[float, float]] = {
    "/Dc/0/Voltage": (0.0, 1000.0),
    "/Dc/0/Current": (-10000.0, 10000.0),
    "/Dc/0/Power": (-1e7, 1e7),
    "/Dc/0/Temperature": (-60.0, 150.0),
    "/Soc": (0.0, 100.0),
    "/Soh": (0.0, 100.0),
    "/TimeToGo": (0.0, 1e8),
    "/Capacity": (0.0, 1e6),
    "/InstalledCapacity": (0.0, 1e6),
    "/ConsumedAmphours": (-1e6, 1e6),
    "/Info/MaxChargeCurrent": (0.0, 10000.0),
    "/Info/MaxDischargeCurrent": (0.0, 10000.0),
    "/Info/MaxChargeVoltage": (0.0, 1000.0),
    "/Info/BatteryLowVoltage": (0.0, 1000.0),
    "/System/MinCellVoltage": (0.0, 10.0),
    "/System/MaxCellVoltage": (0.0, 10.0),
    "/System/MinCellTemperature": (-60.0, 150.0),
    "/System/MaxCellTemperature": (-60.0, 150.0),
    "/System/NrOfModulesOnline": (0, 10000),
    "/System/NrOfModulesOffline": (0, 10000),
    "/System/NrOfModulesBlockingCharge": (0, 10000),
    "/System/NrOfModulesBlockingDischarge": (0, 10000),
    "/System/NrOfCellsPerBattery": (1, 1000),
    "/History/ChargedEnergy": (0.0, 1e9),
    "/History/DischargedEnergy": (0.0, 1e9),
    "/History/TotalAhDrawn": (0.0, 1e9),
    "/History/ChargeCycles": (0.0, 1e7),
    "/Io/AllowToCharge": (0, 1),
    "/Io/AllowToDischarge": (0, 1),
    "/Io/AllowToBalance": (0, 1),
    "/Balancing": (0, 1),
}
ALARM_PREFIX = "/Alarms/"
TEXT_PATHS = frozenset({
    "/Info/ChargeMode", "/Info/ChargeLimitation", "/System/MinVoltageCellId", "/System/MaxVoltageCellId",
    "/System/MinTemperatureCellId", "/System/MaxTemperatureCellId", "/Serial", "/CustomName", "/ProductName",
})


def check_value(path: str, value: Any) -> tuple[Any, str | None]:
    """(value to use, reason it was refused or None). None is a valid "no value" and passes silently."""
    if value is None:
        return None, None
    kind = type(value)
    if kind is float:  # a measurement, most of every update: in its range, decided here (NaN fails the comparison)
        bounds = NUMERIC_BOUNDS.get(path)
        if bounds is not None and bounds[0] <= value <= bounds[1]:
            return value, None
    if kind is not float and kind is not int:  # numbers, the common case, have no size to check
        too_large = oversize(value)
        if too_large is not None:
            return None, f"too large: {too_large}"
    bounds = NUMERIC_BOUNDS.get(path)
    if bounds is None and path.startswith(ALARM_PREFIX):
        bounds = (0, 2)
    if bounds is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"not a number: {_short(value)}"
        if not math.isfinite(value):
            return None, f"not finite: {value!r}"
        lo, hi = bounds
        if not lo <= value <= hi:
            return None, f"{value!r} is outside {lo:g}..{hi:g}"
        return value, None
    if path in TEXT_PATHS and not isinstance(value, str):
        return None, f"not text: {_short(value)}"
    return value, None


def _short(value: Any) -> str:
    """A value as a log line may show it: never longer than a line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "\u2026"


def check_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """All of a member's changed values checked: (clean values, {path: reason} for the refused ones)."""
    clean: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for path, value in values.items():
        good, reason = check_value(path, value)
        clean[path] = good
        if reason is not None:
            refused[path] = reason
    return clean, refused
