"""The charge limits of the bank on the aggregate: the members' values into limits.controller.ChargeControl, its
CCL/DCL/CVL, alarms and flags of holds and row keys out; the DVCC settings it follows; what it learned saved.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Callable

from ..bus.settings import SETTINGS_SERVICE
from ..limits.controller import LIMIT_INPUTS, ChargeControl, MemberInput, Note, one_pack
from ..limits.formulas import DvccLimits
from .publish import unique_id
from .rows import LOST, ONLINE, write_limit_keys

if TYPE_CHECKING:
    from ..bus.service import VeService
    from ..config import Config
    from ..state import StateStore
    from .members import Members

_LOG = logging.getLogger("aggregator")

SYSTEM_SERVICE = "com.victronenergy.system"
DVCC_PATHS = ((SETTINGS_SERVICE, "/Settings/SystemSetup/MaxChargeCurrent"),
              (SETTINGS_SERVICE, "/Settings/SystemSetup/MaxChargeVoltage"),
              (SYSTEM_SERVICE, "/Control/Dvcc"))
MEASUREMENTS = frozenset({"/Dc/0/Current", "/Dc/0/Voltage"})
# Seconds: how often current/voltage changes alone recompute the limits. Victron's system calculator reads them
# once a second, so a second computation within its second would never be seen by DVCC.
MEASUREMENT_LIMIT_INTERVAL = 1.0
# Seconds after which a member's current that has not changed counts as read anew for a complete sample: Victron
# services signal only changes, and drivers read their BMS at least this often, so it is still its current.
STEADY_CURRENT = 5.0


class ChargeLimits:
    """`dirty`: the next flush computes the limits; `due`: measurements changed since, the next tick recomputes.
    `reported`: members whose current arrived since the last complete sample (or that stayed steady)."""

    def __init__(self, config: Config, table: Members, schedule_flush: Callable[[], None]) -> None:
        self.table = table
        self.schedule_flush = schedule_flush
        self.control = ChargeControl(config)
        self.dvcc = DvccLimits()
        self.dirty = True
        self.due = False
        self.at = -1e9  # when the limits were last computed
        self.reported: set[str] = set()
        self.notes: tuple[Note, ...] = ()
        self.alarms: dict[str, int] = {}  # ours, at least what is published (path -> level)
        self.flags: dict[str, int] = {}  # ours, at most what is published (path -> 0)
        self.rows: dict[str, dict[str, Any]] = {}
        self.rows_changed: set[str] = set()
        self._store: StateStore | None = None

    def reconfigure(self, config: Config) -> None:
        old_control, self.control = self.control, ChargeControl(config)
        self.control.adopt(old_control)  # learned shares, held limits and the ramps go on: no jump on reload
        self.dirty = True

    def leave(self, name: str) -> None:
        self.control.leave(name)

    def note_inputs(self, clean: dict[str, Any]) -> None:
        """A change of a limit, a flag or a mode recomputes the limits in this flush; a change of current or
        voltage alone (every update of every member) at most every MEASUREMENT_LIMIT_INTERVAL: the limits
        follow them within a second, and the CPU of a small GX is spared a recompute per update."""
        if self.dirty or LIMIT_INPUTS.isdisjoint(clean):
            return
        if not MEASUREMENTS.issuperset(clean.keys() & LIMIT_INPUTS):
            self.dirty = True
        elif self.table.clock() - self.at >= MEASUREMENT_LIMIT_INTERVAL:
            self.dirty = True
        else:
            self.due = True

    def update(self, values: dict[str, Any], awaiting: set[str]) -> bool:
        """The limits into `values`; True when the controller's notes changed (the status follows them)."""
        table = self.table
        now = table.clock()
        self.at = now
        self.due = False
        reported = self.reported
        duplicates = table.duplicates
        steady = now - STEADY_CURRENT
        members = table.members
        inputs = [MemberInput(name, m.label, m.values, members[name].state == ONLINE,
                              name in reported or members[name].current_at <= steady)
                  for name, m in table.merge.members.items() if name in members and name not in duplicates]
        if duplicates:
            self._lowest_of_duplicates(inputs)
        samples = self.control.samples
        self.control.observe(inputs, now)
        if self.control.samples != samples or all(i.updated for i in inputs):
            reported.clear()  # a complete sample was taken: wait for every member again
        waiting = f"waiting for {', '.join(sorted(awaiting))} to answer" if awaiting else None
        out = self.control.update(inputs, self.dvcc, now, charge_wait=waiting)
        values["/Info/MaxChargeCurrent"] = out.ccl
        values["/Info/MaxDischargeCurrent"] = out.dcl
        values["/Info/MaxChargeVoltage"] = out.cvl
        values["/Info/ChargeLimitation"] = out.charge_limitation
        alarms = {path: level for path, level in out.alarms.items() if level or path in self.alarms}
        changed = {p for p in alarms.keys() | self.alarms.keys() if alarms.get(p) != self.alarms.get(p)}
        changed |= out.flags.keys() ^ self.flags.keys()
        self.alarms, self.flags = alarms, out.flags
        for path in changed:
            values[path] = self.limited_value(path)
        notes_changed = out.notes != self.notes
        self.notes = out.notes
        for name, row in out.members.items():
            if self.rows.get(name) != row:
                self.rows[name] = row
                self.rows_changed.add(name)  # only these keys: the rest of the row is unchanged
        return notes_changed

    def _lowest_of_duplicates(self, inputs: list[MemberInput]) -> None:
        """The service standing for a pack seen through two drivers takes the lowest of their limits, and a limit
        either has unknown is unknown (see one_pack)."""
        table = self.table
        by_name = {i.name: n for n, i in enumerate(inputs)}
        for duplicate in table.packs.duplicates.values():
            index = by_name.get(duplicate.chosen)
            if index is None:
                continue
            chosen = inputs[index]
            # The pack's other services still in the bank (a dropped one is no longer the pack's).
            others = [(table.merge.members[s].values, table.members[s].state == ONLINE) for s in duplicate.services
                      if s != duplicate.chosen and s in table.merge.members and s in table.members]
            if others and (chosen.fresh or any(fresh for _, fresh in others)):
                values = one_pack([(chosen.values, chosen.fresh), *others])
                inputs[index] = MemberInput(chosen.name, chosen.label, values, True, chosen.updated)

    def limited_value(self, path: str) -> Any:
        """A path the limits have a say in: 0 while they clear the flag, at least their alarm once raised."""
        if path in self.flags:
            return 0
        merged = self.table.merge.compute_path(path)
        if path in self.alarms:
            return max(merged or 0, self.alarms[path])  # once raised, back to 0 (ok) rather than invalid
        return merged

    def write_keys(self, service: VeService, name: str) -> None:
        """The controller's keys of a member row, after a limit computation changed them."""
        state = self.table.members.get(name)
        if state is not None and state.state != LOST:
            write_limit_keys(service, state.slot, self.rows.get(name, {}))

    def on_dvcc(self, path: str, value: Any) -> None:
        """A DVCC setting of the GX changed (one of DVCC_PATHS)."""
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if path == "/Control/Dvcc":
            self.dvcc = dataclasses.replace(self.dvcc, enabled=bool(number))
        elif path.endswith("MaxChargeCurrent"):
            self.dvcc = dataclasses.replace(self.dvcc, max_charge_current=number)
        else:
            self.dvcc = dataclasses.replace(self.dvcc, max_charge_voltage=number)
        _LOG.info("DVCC %s, user limits %s A, %s V", "on" if self.dvcc.enabled else "off",
                  self.dvcc.max_charge_current, self.dvcc.max_charge_voltage)
        self.dirty = True
        self.schedule_flush()

    def load_state(self, state_dir: str, service_name: str) -> None:
        from ..state import StateStore

        path = os.path.join(state_dir, unique_id(service_name) + ".json")
        self._store = StateStore(path)
        state = self._store.load()
        if state:
            self.control.load_state(state)
            _LOG.info("learned shares and IR estimates loaded from %s", path)

    def save_state(self) -> None:
        if self._store is not None:
            self._store.save(self.control.to_state())
