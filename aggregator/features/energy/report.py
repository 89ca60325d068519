"""The report of an external battery (one that is not on D-Bus): its fields checked.

`report ID --charged KWH --discharged KWH --soc PCT [--capacity AH]`, the D-Bus methods and the HTTP endpoint all
pass through parse_report; ReportError lists one message per bad field.
"""
from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ...validation import validation_messages
from ...numbers import finite
from .core import KWH_LIMIT, ReportError

_REPORT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


DECIMAL_RULE = "a decimal point (2010.66) or a decimal comma (2010,66), no thousands separators"


def decimal_number(text: str) -> float:
    """A number as typed, also with the decimal comma of a Dutch or German screen: exactly one comma and no
    dot is a decimal comma ('2010,66' -> 2010.66). A comma beside a dot, or several commas, is a thousands
    separator, which cannot be told from a decimal comma in every case ('1,234'): refused. ValueError."""
    cleaned = text.strip()
    if cleaned.count(",") == 1 and "." not in cleaned:
        cleaned = cleaned.replace(",", ".")
    if "," in cleaned or "_" in cleaned:
        raise ValueError(text)
    return float(cleaned)


def _number(value: Any, low: float, high: float, *, low_open: bool, unit: str) -> float:
    allowed = f"a number {'>' if low_open else '>='} {low:g} and < {high:.0f}{unit}"
    if isinstance(value, str):
        try:
            value = decimal_number(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number; allowed: {allowed}, written with {DECIMAL_RULE}") \
                from None
    if not finite(value):
        raise ValueError(f"{value!r} is not allowed; allowed: {allowed}")
    if value < low or (low_open and value == low) or value >= high:
        raise ValueError(f"{value:g} is out of range; allowed: {allowed}")
    return float(value)


class ExternalReport(BaseModel):
    """`report ID --charged KWH --discharged KWH --soc PCT [--capacity AH]`: a battery that is not on D-Bus."""

    model_config = ConfigDict(extra="forbid")

    id: str
    charged: float
    discharged: float
    soc: float
    capacity: float | None = None
    reset: bool = False  # the reporter's counters really restarted: a step back is a restart, not a mistake

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> str:
        if not isinstance(value, str) or not _REPORT_ID.fullmatch(value):
            raise ValueError(f"{value!r} is not allowed; allowed: 1 to 64 characters of A-Z a-z 0-9 _ . : -")
        return value

    @field_validator("charged", "discharged", mode="before")
    @classmethod
    def _energy(cls, value: Any) -> float:
        return _number(value, 0, KWH_LIMIT, low_open=False, unit=" kWh")

    @field_validator("soc", mode="before")
    @classmethod
    def _soc(cls, value: Any) -> float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            number = _number(value, 0, math.inf, low_open=False, unit="")
            if number <= 100:
                return number
            raise ValueError(f"{number:g} is out of range; allowed: a number from 0 to 100 (%)")
        raise ValueError(f"{value!r} is not allowed; allowed: a number from 0 to 100 (%)")

    @field_validator("capacity", mode="before")
    @classmethod
    def _capacity(cls, value: Any) -> float | None:
        if value is None:
            return None
        return _number(value, 0, 1e6, low_open=True, unit=" Ah")


def parse_report(**fields: Any) -> ExternalReport:
    """Check a report's fields; ReportError with one message per bad field ('soc: 150 is out of range;
    allowed: a number from 0 to 100 (%) (got 150)')."""
    try:
        return ExternalReport(**fields)
    except ValidationError as err:
        raise ReportError(validation_messages(err)) from None
