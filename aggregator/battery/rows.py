"""The rows of the aggregate: /Batteries/<n>/<key>, one per member, with its own values, its state and what the
charge-limit controller says of it.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

from ..bus.service import VeService
from .paths import resolution, text_format

# /Batteries/<n>/<key>: the member path each column shows (None: filled by the aggregator).
BREAKDOWN: dict[str, str | None] = {
    "Service": None, "Name": None, "State": None, "Serial": "/Serial", "Soc": "/Soc", "Voltage": "/Dc/0/Voltage",
    "Current": "/Dc/0/Current", "Power": "/Dc/0/Power", "Capacity": "/Capacity",
    "MaxChargeCurrent": "/Info/MaxChargeCurrent", "MaxDischargeCurrent": "/Info/MaxDischargeCurrent",
    # Filled from the charge-limit controller:
    "Share": None, "InternalResistance": None, "OpenCircuitVoltage": None, "ChargeLimit": None,
    "DischargeLimit": None,
}
_ROW_DIGITS = {"InternalResistance": 5}  # ohms: 10 micro-ohms (the others follow their text formats)
_BREAKDOWN_TEXT = {"Soc": "/Soc", "Voltage": "/Dc/0/Voltage", "Current": "/Dc/0/Current", "Power": "/Dc/0/Power",
                   "Capacity": "/Capacity", "MaxChargeCurrent": "/Info/MaxChargeCurrent",
                   "MaxDischargeCurrent": "/Info/MaxDischargeCurrent", "ChargeLimit": "/Info/MaxChargeCurrent",
                   "DischargeLimit": "/Info/MaxDischargeCurrent", "OpenCircuitVoltage": "/Dc/0/Voltage"}
ONLINE, STALE, LOST = "online", "stale", "lost"
DUPLICATE = "duplicate"  # a row's State: the battery is counted through another member (see the aggregate's duplicates)


_ROW_IDENTITY = frozenset({"Service", "Name", "State"})  # the row keys that are not the controller's


@functools.lru_cache(maxsize=256)
def _row_paths(slot: int) -> tuple[tuple[str, str, str | None], ...]:
    """(path, key, member path or None) of a member row: built once per slot, not per refresh."""
    return tuple((f"/Batteries/{slot}/{key}", key, source) for key, source in BREAKDOWN.items())


def write_row(service: VeService, slot: int, name: str, label: str, state: str, values: Mapping[str, Any] | None,
              limit_row: Mapping[str, Any]) -> None:
    """A member's whole row; `values` None for a member that is gone (its values and limits then invalid)."""
    with service.batch():
        for path, key, source in _row_paths(slot):
            if source is not None:
                value = values.get(source) if values is not None else None
            elif key == "Service":
                value = name
            elif key == "Name":
                value = label
            elif key == "State":
                value = state
            else:
                value = limit_row.get(key) if values is not None else None
            if not service.set_value_if_present(path, value):
                service.add_path(path, value, text=text_format(_BREAKDOWN_TEXT.get(key, "")),
                                 digits=_ROW_DIGITS.get(key, resolution(_BREAKDOWN_TEXT.get(key, ""))))


@functools.lru_cache(maxsize=256)
def _measurement_paths(slot: int) -> tuple[tuple[str, str], ...]:
    """(path, member path) of the keys of a member row that show the member's own values."""
    return tuple((path, source) for path, _key, source in _row_paths(slot) if source is not None)


def write_measurement_keys(service: VeService, slot: int, values: Mapping[str, Any]) -> bool:
    """The keys of a member row that show the member's own values, after new measurements (its identity, state and
    limit keys change by other events, which refresh them). False when the row is not published yet."""
    return not service.update_values({path: values.get(source) for path, source in _measurement_paths(slot)})


def write_limit_keys(service: VeService, slot: int, limit_row: Mapping[str, Any]) -> None:
    """The controller's keys of a member row, after a limit computation changed them."""
    for path, key, source in _row_paths(slot):
        if source is None and key not in _ROW_IDENTITY:
            service.set_value_if_present(path, limit_row.get(key))
