"""The battery paths of Victron's D-Bus contract with the text format of each (units matter in dbus-spy).

A fixed-point format is also the path's resolution: our battery services publish a float rounded to the
decimals it shows, so a change nobody can see is not signalled again and again."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..bus.values import TextFormat


def time_to_go_text(seconds: Any) -> str:
    """Seconds -> '3h 20m', as people read a remaining time."""
    minutes = int(seconds) // 60
    return f"{minutes // 60}h {minutes % 60:02d}m"


_VOLT = "{:.2f}V".format
_CELL_VOLT = "{:.3f}V".format
_AMP = "{:.1f}A".format
_WATT = "{:.0f}W".format
_DEGC = "{:.1f}°C".format
_PCT = "{:.1f}%".format
_AH = "{:.1f}Ah".format
_KWH = "{:.2f}kWh".format

TEXT_FORMATS: dict[str, TextFormat] = {
    "/Dc/0/Voltage": _VOLT,
    "/Dc/0/Current": _AMP,
    "/Dc/0/Power": _WATT,
    "/Dc/0/Temperature": _DEGC,
    "/Soc": _PCT,
    "/Soh": _PCT,
    "/TimeToGo": time_to_go_text,
    "/Capacity": _AH,
    "/InstalledCapacity": _AH,
    "/ConsumedAmphours": _AH,
    "/Info/MaxChargeCurrent": _AMP,
    "/Info/MaxDischargeCurrent": _AMP,
    "/Info/MaxChargeVoltage": _VOLT,
    "/Info/BatteryLowVoltage": _VOLT,
    "/System/MinCellVoltage": _CELL_VOLT,
    "/System/MaxCellVoltage": _CELL_VOLT,
    "/System/MinCellTemperature": _DEGC,
    "/System/MaxCellTemperature": _DEGC,
    "/History/ChargedEnergy": _KWH,
    "/History/DischargedEnergy": _KWH,
    "/History/TotalAhDrawn": _AH,
    "/History/ChargeCycles": "{:.0f}".format,
}


def text_format(path: str) -> TextFormat | None:
    return TEXT_FORMATS.get(path)


def resolution(path: str) -> int | None:
    """The decimals a float of this path is published with: those its text format shows; None (as given)
    for a path without a fixed-point format."""
    return format_digits(TEXT_FORMATS.get(path))


_FIXED_POINT = re.compile(r"^[^{]*\{:[^{}]*\.(\d+)f\}[^{]*$")


def format_digits(text: TextFormat | str | None) -> int | None:
    """The decimals a fixed-point text format shows ('{:.2f}V' -> 2), from the string or its bound .format;
    None for anything else."""
    template = text if isinstance(text, str) else getattr(text, "__self__", None)
    if not isinstance(template, str):
        return None
    match = _FIXED_POINT.match(template)
    return int(match.group(1)) if match else None
