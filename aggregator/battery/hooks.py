"""Virtual battery hooks, in the config format BatteryAggregator users have.

A virtual battery's member list may hold `class:<module.Class>[#suffix]` entries; each is configured under
`classes` by the text after `class:` (suffix included). Pure: a hook maps the virtual battery's merged
values to values of its own.

Where a hook stands in the list matters, as it did: like a member, a hook listed before the members wins
over them and one listed after only fills paths they leave empty. FixedValueHook always wins.

Bundled hooks (also reachable as `hooks.<Name>`, the module name users have in their files):
- FixedValueHook: `path`, `value` — publish a fixed value (null blanks the path).
- CustomChargingHook: `ccls`, `dcls` — {threshold V: A} tables for /Info/MaxChargeCurrent and
  /Info/MaxDischargeCurrent by the merged /Dc/0/Voltage.
- TemperatureChargingHook: the same tables by the merged /Dc/0/Temperature.
- CustomNameHook: `customName` — a fixed /CustomName.
Tables are read in file order and every entry whose threshold the value reaches (>=) sets the result, so with
ascending keys the highest threshold not above the value wins; below the lowest threshold the hook sets
nothing and the members' own value shows.
"""
from __future__ import annotations

import math
from typing import Any, Mapping


class HookConfigError(ValueError):
    """A hook entry cannot be built; the message names the entry, the key and what is allowed."""


class Hook:
    always_wins = False

    def __init__(self, entry: str) -> None:
        self.entry = entry

    def outputs(self, merged: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class FixedValueHook(Hook):
    always_wins = True

    def __init__(self, entry: str, path: str, value: Any = None) -> None:
        super().__init__(entry)
        if not isinstance(path, str) or not path.startswith("/"):
            raise HookConfigError(f"classes.{entry}.path: {path!r} is not a D-Bus path (it starts with /)")
        self.path = path
        self.value = value

    def outputs(self, merged: Mapping[str, Any]) -> dict[str, Any]:
        return {self.path: self.value}


def parse_table(entry: str, key: str, table: Any) -> list[tuple[float, float]]:
    """{threshold: amps} in file order -> [(threshold, amps)]; every key and value must be a number."""
    if not isinstance(table, dict):
        raise HookConfigError(f"classes.{entry}.{key}: {table!r} is not a table of threshold -> amps")
    rows = []
    for threshold, amps in table.items():
        try:
            t = float(threshold)
        except (TypeError, ValueError):
            t = math.nan
        if not math.isfinite(t):  # "nan" and "inf" parse as floats but no value ever reaches them
            raise HookConfigError(f"classes.{entry}.{key}: threshold {threshold!r} is not a number")
        if isinstance(amps, bool) or not isinstance(amps, (int, float)) or not math.isfinite(amps) or amps < 0:
            raise HookConfigError(f"classes.{entry}.{key}.{threshold}: {amps!r} is not a current >= 0 A")
        rows.append((t, float(amps)))
    return rows


def look_up(table: list[tuple[float, float]], value: Any) -> float | None:
    if value is None or isinstance(value, (bool, str)):
        return None
    result = None
    for threshold, amps in table:
        if value >= threshold:
            result = amps
    return result


class CustomChargingHook(Hook):
    trigger = "/Dc/0/Voltage"

    def __init__(self, entry: str, ccls: Any = None, dcls: Any = None) -> None:
        super().__init__(entry)
        if ccls is None and dcls is None:
            raise HookConfigError(f"classes.{entry}: needs `ccls` and/or `dcls` tables")
        self.ccls = parse_table(entry, "ccls", ccls) if ccls is not None else []
        self.dcls = parse_table(entry, "dcls", dcls) if dcls is not None else []

    def outputs(self, merged: Mapping[str, Any]) -> dict[str, Any]:
        value = merged.get(self.trigger)
        out = {}
        for path, table in (("/Info/MaxChargeCurrent", self.ccls), ("/Info/MaxDischargeCurrent", self.dcls)):
            limit = look_up(table, value)
            if limit is not None:
                out[path] = limit
        return out


class TemperatureChargingHook(CustomChargingHook):
    trigger = "/Dc/0/Temperature"


class CustomNameHook(Hook):
    def __init__(self, entry: str, customName: str = "") -> None:  # noqa: N803 (the users' key)
        super().__init__(entry)
        self.custom_name = customName

    def outputs(self, merged: Mapping[str, Any]) -> dict[str, Any]:
        return {"/CustomName": self.custom_name}


HOOK_CLASSES: dict[str, type[Hook]] = {
    cls.__name__: cls for cls in (FixedValueHook, CustomChargingHook, TemperatureChargingHook, CustomNameHook)
}


def hook_class(entry: str) -> type[Hook]:
    """'hooks.CustomChargingHook#batt1' -> the class; only bundled hooks are loaded (no arbitrary imports)."""
    dotted = entry.rsplit("#", 1)[0]
    module, _, name = dotted.rpartition(".")
    cls = HOOK_CLASSES.get(name)
    if cls is None or module not in ("", "hooks", "aggregator.hooks"):
        raise HookConfigError(f"class:{entry}: unknown hook class {dotted!r}; allowed: "
                              + ", ".join(f"hooks.{n}" for n in HOOK_CLASSES))
    return cls


def build_hook(entry: str, classes: Mapping[str, Mapping[str, Any]]) -> Hook:
    cls = hook_class(entry)
    options = classes.get(entry)
    if options is None:
        raise HookConfigError(f"classes: no entry {entry!r} configures the hook class:{entry}")
    try:
        return cls(entry, **options)
    except TypeError as exc:
        raise HookConfigError(f"classes.{entry}: {exc}") from None
