"""Merging member batteries into one: the table of aggregate paths and how each is computed.

Pure: members' (already checked) values in, aggregate values out. Each rule declares the member paths it
reads, so a change of one member path recomputes only the aggregate paths that depend on it. A path no
member has a value for is None (published invalid), never 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeGuard, cast

# The charge limits are computed by the limits module from the members alone: not here, and a primary or
# auxiliary service never sets them.
LIMIT_PATHS = frozenset({"/Info/MaxChargeCurrent", "/Info/MaxDischargeCurrent", "/Info/MaxChargeVoltage"})
# Below this bank current (A) the bank is idle: no time-to-go.
IDLE_CURRENT = 0.5
CHARGE_MODE_ORDER = ("Bulk", "Absorption", "Float")
TRANSITION = "Transition"
MODULES_ONLINE, MODULES_OFFLINE = "/System/NrOfModulesOnline", "/System/NrOfModulesOffline"
# A service's own identity: never taken from an auxiliary or primary service (the aggregate has its own).
IDENTITY_PATHS = frozenset({"/Mgmt/ProcessName", "/Mgmt/ProcessVersion", "/Mgmt/Connection", "/DeviceInstance",
                            "/ProductId", "/ProductName", "/FirmwareVersion", "/HardwareVersion", "/Connected",
                            "/CustomName", "/Serial", "/Aggregator/Chain"})


@dataclass(slots=True)
class MemberView:
    """What the merge knows of one member: its (checked) values and a short label for cell ids."""

    name: str
    label: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MergeOptions:
    capacity: float | None = None  # `capacity` of the config: installed Ah when members do not publish it
    # Members not online now (stale, or gone within reconnectTimeout): their last values still count, but
    # their modules are offline, so that online + offline modules stay the bank's modules.
    offline: frozenset[str] = frozenset()


Compute = Callable[[Sequence[MemberView], MergeOptions], Any]
# A column is one member path's numbers by member name, in member order (see Merge._columns).
Column = dict[str, Any]
ColumnCompute = Callable[[dict[str, Column], dict[str, MemberView], MergeOptions], Any]


@dataclass(frozen=True, slots=True)
class Rule:
    inputs: tuple[str, ...]
    compute: Compute
    description: str
    # The same result from the columns of the inputs: what the merge uses, so that a member's update costs
    # reductions over columns rather than walks over every member's values. `compute` stays the definition
    # (tests hold the two equal).
    column: ColumnCompute | None = None


def _is_number(v: Any) -> TypeGuard[float]:
    """Ints and floats are numbers; a bool, text or list in a numeric path counts as no value."""
    kind = type(v)
    return kind is float or kind is int


def _numbers(members: Iterable[MemberView], path: str) -> list[float]:
    return [v for m in members if _is_number(v := m.values.get(path))]


def _reduce(path: str, reduce: Callable[[Any], Any], description: str) -> Rule:
    """A rule over one path: `reduce` of the members' values, None when no member has one."""
    def compute(members: Sequence[MemberView], _o: MergeOptions) -> Any:
        values = _numbers(members, path)
        return reduce(values) if values else None

    def column(columns: dict[str, Column], _m: dict[str, MemberView], _o: MergeOptions) -> Any:
        values = columns[path]
        return reduce(values.values()) if values else None
    return Rule((path,), compute, description, column)


def _sum(path: str) -> Rule:
    return _reduce(path, sum, "sum of members")


def _mean(path: str) -> Rule:
    return _reduce(path, lambda v: sum(v) / len(v), "mean of members with a value")


def _max(path: str) -> Rule:
    return _reduce(path, max, "highest member value")


def _min(path: str) -> Rule:
    return _reduce(path, min, "lowest member value")


def _any(path: str, description: str = "1 when any member has 1") -> Rule:
    return _reduce(path, lambda v: int(any(v)), description)


def _extreme_cell(value_path: str, id_path: str, pick: Callable[..., Any]) -> tuple[Rule, Rule]:
    """The extreme cell of the bank and its id with the member's label ('Pack B C7')."""
    def winner(members: Sequence[MemberView]) -> MemberView | None:
        candidates = [m for m in members if _is_number(m.values.get(value_path))]
        return pick(candidates, key=lambda m: m.values[value_path]) if candidates else None

    def value(members: Sequence[MemberView], _o: MergeOptions) -> Any:
        m = winner(members)
        return None if m is None else m.values[value_path]

    def label(m: MemberView) -> Any:
        cell = m.values.get(id_path)
        return f"{m.label} {cell}" if cell not in (None, "") else m.label

    def ident(members: Sequence[MemberView], _o: MergeOptions) -> Any:
        m = winner(members)
        return None if m is None else label(m)

    # Of equal cells the first in member order wins, as in the column's order.
    def column_value(columns: dict[str, Column], _m: dict[str, MemberView], _o: MergeOptions) -> Any:
        values = columns[value_path]
        return pick(values.values()) if values else None

    def column_ident(columns: dict[str, Column], members: dict[str, MemberView], _o: MergeOptions) -> Any:
        values = columns[value_path]
        return label(members[pick(values, key=values.__getitem__)]) if values else None

    return (Rule((value_path,), value, f"{pick.__name__} over members", column_value),
            Rule((value_path, id_path), ident, "member label and its cell id", column_ident))


def _weighted_by_capacity(path: str) -> Rule:
    """Capacity-weighted mean: members with both the value and an installed capacity; equal weights only
    when no member publishes a capacity."""
    def compute(members: Sequence[MemberView], _o: MergeOptions) -> Any:
        pairs = []
        for m in members:
            v = m.values.get(path)
            if _is_number(v):
                cap = m.values.get("/InstalledCapacity")
                pairs.append((v, cap if _is_number(cap) else None))
        return _weighted_mean(pairs)

    def column(columns: dict[str, Column], _m: dict[str, MemberView], _o: MergeOptions) -> Any:
        capacities = columns["/InstalledCapacity"]
        return _weighted_mean([(v, capacities.get(name)) for name, v in columns[path].items()])
    return Rule((path, "/InstalledCapacity"), compute, "weighted by installed capacity", column)


def _weighted_mean(pairs: list[tuple[float, float | None]]) -> Any:
    """(value, installed capacity or None) -> the capacity-weighted mean, equal weights when no value has a
    capacity; None without values."""
    total = weight = 0.0
    weighted: list[float] = []
    plain: list[float] = []
    for v, cap in pairs:
        if cap is not None and cap > 0:
            total += v * cap
            weight += cap
            weighted.append(v)
        else:
            plain.append(v)
    # rounding must not leave the members' range (100.00000000000001 % is refused upstream)
    used, mean = (weighted, total / weight) if weight > 0 else (plain, sum(plain) / len(plain) if plain else 0)
    return min(max(mean, min(used)), max(used)) if used else None


def _installed_capacity(members: Sequence[MemberView], options: MergeOptions) -> Any:
    if options.capacity is not None:
        return options.capacity
    values = _numbers(members, "/InstalledCapacity")
    return sum(values) if values else None


def _installed_capacity_column(columns: dict[str, Column], _m: dict[str, MemberView], options: MergeOptions) -> Any:
    if options.capacity is not None:
        return options.capacity
    values = columns["/InstalledCapacity"]
    return sum(values.values()) if values else None


def _remaining_ah(members: Sequence[MemberView]) -> float | None:
    """Remaining Ah of the bank: /Capacity, else SoC x installed capacity."""
    total = 0.0
    known = False
    for m in members:
        remaining = m.values.get("/Capacity")
        if not _is_number(remaining):
            soc, cap = m.values.get("/Soc"), m.values.get("/InstalledCapacity")
            remaining = soc / 100.0 * cap if _is_number(soc) and _is_number(cap) else None
        if remaining is not None:
            total += remaining
            known = True
    return total if known else None


def _remaining_ah_column(columns: dict[str, Column], members: dict[str, MemberView]) -> float | None:
    remaining, socs, capacities = columns["/Capacity"], columns["/Soc"], columns["/InstalledCapacity"]
    total = 0.0
    known = False
    for name in members:  # in member order, so that the sum is the definition's to the last bit
        ah = remaining.get(name)
        if ah is None:
            soc, cap = socs.get(name), capacities.get(name)
            if soc is None or cap is None:
                continue
            ah = soc / 100.0 * cap
        total += ah
        known = True
    return total if known else None


def _time_to_go(members: Sequence[MemberView], options: MergeOptions) -> Any:
    """Seconds until empty at the present discharge current; invalid when charging or idle."""
    return _seconds_to_empty(_numbers(members, "/Dc/0/Current"), lambda: _remaining_ah(members),
                             lambda: _SOC.compute(members, options), options)


def _time_to_go_column(columns: dict[str, Column], members: dict[str, MemberView], options: MergeOptions) -> Any:
    soc_column = _SOC.column
    assert soc_column is not None  # every weighted rule has its column form
    return _seconds_to_empty(columns["/Dc/0/Current"].values(), lambda: _remaining_ah_column(columns, members),
                             lambda: soc_column(columns, members, options), options)


def _seconds_to_empty(currents: Any, remaining_ah: Callable[[], float | None], soc: Callable[[], Any],
                      options: MergeOptions) -> Any:
    """TimeToGo from the members' currents; remaining Ah (and the SoC fallback) only read when discharging."""
    if not currents:
        return None
    current = sum(currents)
    if current > -IDLE_CURRENT:
        return None
    remaining = remaining_ah()
    if remaining is None and options.capacity is not None:
        # Members publish only SoC and the config gives the bank's capacity.
        level = soc()
        remaining = None if level is None else level / 100.0 * options.capacity
    return None if remaining is None else round(remaining / -current * 3600.0)


def _modules(members: Iterable[tuple[str, Any, Any]], offline: frozenset[str]) -> tuple[Any, Any]:
    """(modules online, modules offline) from (member, its online count, its offline count): a member that is
    not online has all its modules offline. None where no member has a count."""
    online = off = None
    for name, on, off_count in members:
        if on is None and off_count is None:
            continue
        if name in offline:
            on, off_count = 0, (on or 0) + (off_count or 0)
        if on is not None:
            online = (online or 0) + on
        if off_count is not None:
            off = (off or 0) + off_count
    return online, off


def _module_rule(index: int) -> Rule:
    def compute(members: Sequence[MemberView], options: MergeOptions) -> Any:
        counts = [(m.name, *(v if _is_number(v := m.values.get(p)) else None for p in (MODULES_ONLINE,
                                                                                      MODULES_OFFLINE)))
                  for m in members]
        return _modules(cast(list[tuple[str, Any, Any]], counts), options.offline)[index]

    def column(columns: dict[str, Column], members: dict[str, MemberView], options: MergeOptions) -> Any:
        on, off = columns[MODULES_ONLINE], columns[MODULES_OFFLINE]
        if not options.offline:  # the common case: plain sums
            values = (on if index == 0 else off).values()
            return sum(values) if values else None
        return _modules(((n, on.get(n), off.get(n)) for n in members if n in on or n in off),
                        options.offline)[index]
    description = ("sum of online members" if index == 0
                   else "sum of members, with every module of a member that is not online")
    return Rule((MODULES_ONLINE, MODULES_OFFLINE), compute, description, column)


def _allowed(flag: str) -> Rule:
    """1 when any member allows (one BMS opening its FETs does not stop the bank), 0 when none does."""
    return _any(flag, "1 when any member allows")


def _charge_mode(members: Sequence[MemberView], _o: MergeOptions) -> Any:
    """'Float' when every member floats, 'Float Transition' when some do; the same for Absorption, then Bulk;
    'Charging' for other modes (as BatteryAggregator users know it; modes match case-insensitively)."""
    modes = [m.values["/Info/ChargeMode"].lower() for m in members
             if isinstance(m.values.get("/Info/ChargeMode"), str) and m.values["/Info/ChargeMode"]]
    if not modes:
        return None
    for stage in ("Float", "Absorption", "Bulk"):
        count = sum(stage.lower() in mode for mode in modes)
        if count == len(modes):
            return stage
        if count:
            return f"{stage} {TRANSITION}"
    return "Charging"


_SOC = _weighted_by_capacity("/Soc")


def _build_rules() -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for path in ("/Dc/0/Current", "/Dc/0/Power", "/Capacity", "/ConsumedAmphours", "/History/ChargedEnergy",
                 "/History/DischargedEnergy", "/History/TotalAhDrawn", "/System/NrOfModulesBlockingCharge",
                 "/System/NrOfModulesBlockingDischarge"):
        rules[path] = _sum(path)
    rules[MODULES_ONLINE] = _module_rule(0)
    rules[MODULES_OFFLINE] = _module_rule(1)
    rules["/InstalledCapacity"] = Rule(("/InstalledCapacity",), _installed_capacity, "sum, or `capacity`",
                                       _installed_capacity_column)
    rules["/Dc/0/Voltage"] = _mean("/Dc/0/Voltage")
    rules["/Dc/0/Temperature"] = _max("/Dc/0/Temperature")
    rules["/Info/BatteryLowVoltage"] = _max("/Info/BatteryLowVoltage")
    rules["/System/NrOfCellsPerBattery"] = _max("/System/NrOfCellsPerBattery")
    rules["/Soc"] = _SOC
    rules["/Soh"] = _weighted_by_capacity("/Soh")
    rules["/History/ChargeCycles"] = _weighted_by_capacity("/History/ChargeCycles")
    rules["/TimeToGo"] = Rule(("/Dc/0/Current", "/Capacity", "/Soc", "/InstalledCapacity"), _time_to_go,
                              "remaining Ah / discharge current", _time_to_go_column)
    rules["/System/MinCellVoltage"], rules["/System/MinVoltageCellId"] = _extreme_cell(
        "/System/MinCellVoltage", "/System/MinVoltageCellId", min)
    rules["/System/MaxCellVoltage"], rules["/System/MaxVoltageCellId"] = _extreme_cell(
        "/System/MaxCellVoltage", "/System/MaxVoltageCellId", max)
    rules["/System/MinCellTemperature"], rules["/System/MinTemperatureCellId"] = _extreme_cell(
        "/System/MinCellTemperature", "/System/MinTemperatureCellId", min)
    rules["/System/MaxCellTemperature"], rules["/System/MaxTemperatureCellId"] = _extreme_cell(
        "/System/MaxCellTemperature", "/System/MaxTemperatureCellId", max)
    rules["/Io/AllowToCharge"] = _allowed("/Io/AllowToCharge")
    rules["/Io/AllowToDischarge"] = _allowed("/Io/AllowToDischarge")
    rules["/Io/AllowToBalance"] = _any("/Io/AllowToBalance")
    rules["/Balancing"] = _any("/Balancing")
    rules["/Info/ChargeMode"] = Rule(("/Info/ChargeMode",), _charge_mode, "common mode, else Transition")
    for alarm in ("LowVoltage", "HighVoltage", "LowSoc", "HighChargeCurrent", "HighDischargeCurrent",
                  "CellImbalance", "LowCellVoltage", "HighCellVoltage", "LowTemperature", "HighTemperature",
                  "LowChargeTemperature", "HighChargeTemperature", "InternalFailure", "BmsCable", "FuseBlown"):
        rules[f"/Alarms/{alarm}"] = _max(f"/Alarms/{alarm}")
    return rules


RULES: dict[str, Rule] = _build_rules()


class Merge:
    """The merge state of one aggregate: members, auxiliary and primary sources, and what is dirty.

    `update_*` record changes and mark the aggregate paths they affect; `compute()` returns the new value
    of every dirty path (so a burst of changes is computed once, when the caller flushes).
    """

    def __init__(self, options: MergeOptions = MergeOptions(), rules: dict[str, Rule] = RULES) -> None:
        self.options = options
        self.rules = rules
        self.members: dict[str, MemberView] = {}
        self._members_list: list[MemberView] = []  # the counted members, in order
        self._uncounted: set[str] = set()  # members whose values are kept but not merged (duplicates)
        self.dependents: dict[str, list[str]] = {}
        for path, rule in rules.items():
            for source in rule.inputs:
                self.dependents.setdefault(source, []).append(path)
        # Column rules read one member path across the bank; keep those paths' numbers ready, in member order.
        self._columns: dict[str, Column] = {path: {} for rule in rules.values() if rule.column is not None
                                            for path in rule.inputs}
        # Auxiliary: used for a path when no member has a value. Primary: wins over the merge.
        self.auxiliary: list[tuple[str, frozenset[str] | None, dict[str, Any]]] = []
        self.primary: list[tuple[str, frozenset[str] | None, dict[str, Any]]] = []
        self.dirty: set[str] = set(rules)

    @property
    def paths(self) -> list[str]:
        """Every aggregate path: the table plus whatever auxiliary and primary sources contribute."""
        extra = {p for _, paths, values in self.auxiliary + self.primary for p in (paths or values)}
        return list(self.rules) + sorted(extra - set(self.rules) - IDENTITY_PATHS)

    # ---- members ---------------------------------------------------------------------------------------

    def set_member(self, name: str, label: str, values: dict[str, Any]) -> None:
        self.members[name] = MemberView(name, label, dict(values))
        self._members_changed()

    def update_member(self, name: str, changes: dict[str, Any]) -> None:
        member = self.members.get(name)
        if member is None:
            return
        member.values.update(changes)
        if name in self._uncounted:
            return
        dependents = self.dependents
        dirty = self.dirty
        columns = self._columns
        for path, value in changes.items():
            column = columns.get(path)
            if column is not None:
                if _is_number(value):
                    if name in column:
                        column[name] = value
                    else:  # a member gained a value: rebuild, to keep member order (sums, ties)
                        self._rebuild_column(path)
                else:
                    column.pop(name, None)
            affected = dependents.get(path)
            if affected:
                dirty.update(affected)
            elif self._sourced(path):
                dirty.add(path)

    def remove_member(self, name: str) -> None:
        if self.members.pop(name, None) is not None:
            self._uncounted.discard(name)
            self._members_changed()

    def set_counted(self, name: str, counted: bool) -> None:
        """Count a member in the merge or not (its values are kept either way): a second service publishing a
        battery that is already a member must not add its current, power and capacity again."""
        if name not in self.members or (name not in self._uncounted) == counted:
            return
        if counted:
            self._uncounted.discard(name)
        else:
            self._uncounted.add(name)
        self._members_changed()

    def _members_changed(self) -> None:
        self._members_list = [m for m in self.members.values() if m.name not in self._uncounted]
        for path in self._columns:
            self._rebuild_column(path)
        self.dirty.update(self.rules)

    def _rebuild_column(self, path: str) -> None:
        self._columns[path] = {m.name: v for m in self._members_list if _is_number(v := m.values.get(path))}

    # ---- auxiliary and primary sources ------------------------------------------------------------------

    def set_offline(self, names: frozenset[str]) -> None:
        """The members that are not online now (see MergeOptions.offline)."""
        if names != self.options.offline:
            self.options = dataclasses.replace(self.options, offline=names)
            self.dirty.update((MODULES_ONLINE, MODULES_OFFLINE))

    def set_label(self, name: str, label: str) -> None:
        """A member was renamed: the cell ids that name it follow."""
        member = self.members.get(name)
        if member is not None and member.label != label:
            member.label = label
            self.dirty.update(p for p, rule in self.rules.items() if p.endswith("CellId"))

    def set_source(self, role: str, name: str, paths: Iterable[str] | None, values: dict[str, Any] | None) -> None:
        """Declare (values not None) or forget (None) an auxiliary or primary source. `paths` None = all but
        the identity paths."""
        if values is not None:
            values = {p: v for p, v in values.items() if p not in IDENTITY_PATHS}
        wanted_paths = frozenset(paths) - IDENTITY_PATHS if paths else None  # empty: nothing wanted
        table = self.auxiliary if role == "auxiliary" else self.primary
        for i, (source, wanted, current) in enumerate(table):
            if source == name:
                self.dirty.update(wanted or current)
                if values is None:
                    del table[i]
                else:
                    table[i] = (source, wanted, dict(values))
                    self.dirty.update(wanted or values)
                return
        if values is not None:
            table.append((name, wanted_paths, dict(values)))
            self.dirty.update(values if wanted_paths is None else wanted_paths)

    def order_sources(self, role: str, names: Sequence[str]) -> None:
        """Sources are consulted in config order, whatever order they appeared on the bus in."""
        table = self.auxiliary if role == "auxiliary" else self.primary
        rank = {n: i for i, n in enumerate(names)}
        table.sort(key=lambda entry: rank.get(entry[0], len(rank)))

    def update_source(self, name: str, changes: dict[str, Any]) -> None:
        if not IDENTITY_PATHS.isdisjoint(changes):
            changes = {p: v for p, v in changes.items() if p not in IDENTITY_PATHS}
        for table in (self.auxiliary, self.primary):
            for source, wanted, values in table:
                if source == name:
                    values.update(changes)
                    self.dirty.update(p for p in changes if wanted is None or p in wanted)

    def _sourced(self, path: str) -> bool:
        return path not in IDENTITY_PATHS and any(wanted is None or path in wanted
                                                  for _, wanted, _ in self.auxiliary + self.primary)

    # ---- computing ----------------------------------------------------------------------------------

    def compute(self) -> dict[str, Any]:
        """New values of every dirty path; clears the dirty set."""
        dirty, self.dirty = self.dirty, set()
        out: dict[str, Any] = {}
        for path in dirty:
            out[path] = self.compute_path(path)
        return out

    def compute_path(self, path: str, members: Sequence[MemberView] | None = None) -> Any:
        """One aggregate path now: the rule, else an auxiliary value; a primary value wins over both."""
        rule = self.rules.get(path)
        if rule is None:
            value = None
        elif members is None and rule.column is not None:
            value = rule.column(self._columns, self.members, self.options)
        else:
            value = rule.compute(self._members_list if members is None else members, self.options)
        if path in LIMIT_PATHS:
            return value
        if value is None and self.auxiliary:
            value = _first_from(self.auxiliary, path)
        primary = _first_from(self.primary, path) if self.primary else None  # most banks have none
        return value if primary is None else primary

    def compute_all(self) -> dict[str, Any]:
        self.dirty.update(self.paths)
        return self.compute()


def _first_from(sources: list[tuple[str, frozenset[str] | None, dict[str, Any]]], path: str) -> Any:
    return first_valid(((values, wanted) for _, wanted, values in sources), path)


def first_valid(members: Iterable[tuple[dict[str, Any], frozenset[str] | None]], path: str) -> Any:
    """The first listed source (that provides this path) with a valid value wins: virtual battery members,
    auxiliary and primary services."""
    for values, wanted in members:
        if wanted is not None and path not in wanted:
            continue
        value = values.get(path)
        if value is not None:
            return value
    return None
