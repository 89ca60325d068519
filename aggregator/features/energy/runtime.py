"""Energy per battery identity on the aggregate: the thin layer around core.py.

`EnergyTracker` follows the members (fed by the energy feature only when an energy path changes), takes reports
of external batteries, computes the `/History/*` and `/Energy/*` values and keeps the ledgers in
`<stateDir>/energy.json`. The reports arrive through endpoint.py (D-Bus methods, the optional HTTP endpoint);
feature.py mounts it all on the aggregate's service.

A ledger is saved when a new identity appears (so its counter anchor survives a kill -9: the member's own
counters then cover the time we were away), after every taken report or removal, every SAVE_INTERVAL and on
stop. The external batteries' rows (level, capacity, when they last reported) are saved with the ledgers.
Dates follow the user's time zone (localsettings' /Settings/System/TimeZone) given to `time_zone.changed`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .core import (REANCHORED, CounterKind, EnergyLedger, ReportConflict, ReportError, ReportSeries, average_level,
                   beyond_capacity, capacity_weighted_level, report_regression, same_totals, total_energy)
from ...local_time import TimeZoneSetting
from ...config_data import ConfigData
from ...state import StateStore

if TYPE_CHECKING:  # the service reads its settings as checked data (config_data.py) and parses reports when one comes
    from ...battery.identity import Duplicate
    from ...config import Config
    from .report import ExternalReport
    from .settings import EnergyOptions, MemberEnergyOptions

# A member without options of its own: MemberEnergyOptions' defaults (a test keeps them the same)
NO_MEMBER_OPTIONS = ConfigData(id=None, counterKind="total", capacityKwh=None, maxPowerKw=None)

_LOG = logging.getLogger("aggregator.energy")


def _options_of(options: EnergyOptions, keys: Iterable[str | None]) -> MemberEnergyOptions | ConfigData:
    for key in keys:
        if key and key in options.members:
            return options.members[key]
    return NO_MEMBER_OPTIONS


def member_options(options: EnergyOptions, name: str, values: Mapping[str, Any]) -> MemberEnergyOptions | ConfigData:
    """A member's entry under energy.members: keyed by its service name, name:<its /CustomName>,
    serial:<its /Serial> or its /Serial (the first that is there), else the defaults."""
    serial = values.get("/Serial")
    serial = serial if isinstance(serial, str) and serial.strip() else None
    custom = values.get("/CustomName")
    return _options_of(options, [name, f"name:{custom}" if isinstance(custom, str) and custom else None,
                                 f"serial:{serial}" if serial else None, serial])


def configured_id(config: Config, name: str, values: Mapping[str, Any]) -> str | None:
    """The id energy.members gives the pack member `name` publishes (its identity when it has no /Serial)."""
    return member_options(config.energy, name, values).id


def _parse_report(fields: Mapping[str, Any]) -> ExternalReport:
    from .report import parse_report  # its model (pydantic) is loaded by the first report, not by the service

    return parse_report(**fields)

ENERGY_INTERFACE = "org.batteryaggregator.Energy"
STATE_FILE = "energy.json"
STATE_VERSION = 1
SAVE_INTERVAL = 180.0
MESSAGE_LOG_INTERVAL = 600.0  # one log line per identity in this time
CHARGED, DISCHARGED = "/History/ChargedEnergy", "/History/DischargedEnergy"
COUNTER_PATHS = frozenset({CHARGED, DISCHARGED})
ENERGY_INPUTS = COUNTER_PATHS | {"/Dc/0/Voltage", "/Dc/0/Current"}  # what feeds a ledger
ONLINE, STALE = "online", "stale"
EXTERNAL_ROW = ("Id", "State", "Soc", "Capacity", "ChargedEnergy", "DischargedEnergy", "LastCorrection")
CONFIRMED_KW = 1e9  # a confirmed jump is taken whatever the power it would take


@dataclass(slots=True)
class _Member:
    identity: str
    kind: CounterKind


@dataclass(slots=True)
class _External:
    row: int
    soc: float
    capacity: float | None
    at: float  # monotonic time of the last report
    wall: float  # epoch seconds of the last report (saved: a restart keeps how stale it is)
    undo: dict[str, Any] | None = None  # how to take the last report back (EnergyLedger.undo_record)
    correction: str = ""  # the last report rolled back or taken on confirmation, and when


def _try_report(base: EnergyLedger, report: ExternalReport, now: float, max_kw: float,
                capacity_kwh: float | None) -> tuple[EnergyLedger, list[str], bool]:
    """`report` tried on a copy of `base`: the copy, why it cannot be taken (empty: it can), and whether that
    is because it goes beyond the battery's power or capacity (rather than below the last report)."""
    trial = base.copy()
    last = trial.counters()
    if last == (None, None):
        trial.seed(now, report.charged, report.discharged)
        return trial, [], False
    problem = report_regression(trial, report)
    if problem:
        return trial, [problem], False
    problem = beyond_capacity(trial, report, capacity_kwh)
    if problem:
        return trial, [problem], True
    messages = trial.add(now, report.charged, report.discharged, max_power_kw=max_kw)
    went_back = any(old is not None and new < old for old, new in zip(last, (report.charged, report.discharged)))
    if report.reset and went_back:
        messages = []  # the restart the reporter announced: counted as a restart, nothing to refuse
    return trial, messages, bool(messages)


def _undone(ledger: EnergyLedger, record: dict[str, Any]) -> EnergyLedger | None:
    try:
        return ledger.undo(record)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError):
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _kwh(value: float) -> float:
    return round(value, 3)


class EnergyTracker:
    def __init__(self, options: EnergyOptions, state_dir: str | Path, *, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.wall = wall  # epoch seconds: ledgers keep local days
        self.clock = clock
        self.store = StateStore(Path(state_dir) / STATE_FILE)
        self.ledgers: dict[str, EnergyLedger] = {}
        self.members: dict[str, _Member] = {}  # service name -> who it is
        self.externals: dict[str, _External] = {}  # reported id -> its last report
        self.series: dict[str, ReportSeries] = {}  # reported id -> what it was refused (typo or two batteries)
        self.conflicts: dict[str, float] = {}  # reported id -> monotonic time of its last conflicting report
        self.corrections: dict[str, float] = {}  # reported id -> monotonic time a report of it was rolled back
        self._twins_logged: list[tuple[str, ...]] = []  # ids with the same totals, as last logged
        self._levels: dict[str, Any] | None = None  # the last published levels, saved for `energy`
        self._rows_shown: set[int] = set()  # /Energy/External/<k> rows published: a removed one turns invalid
        self.tz: tzinfo | None = None  # dates: the user's zone; None = the process's
        self.time_zone = TimeZoneSetting(self.set_zone)  # the caller feeds it the setting's values
        self.duplicates: dict[str, Duplicate] = {}  # as the bank says: packs that more than one member publishes
        self._shadowed: set[str] = set()  # services another service with the same identity stands for
        self._save_due = False
        self._saved_at = clock()
        self._logged: dict[str, float] = {}
        self._loaded = False  # never save before loading: that would overwrite the saved totals with nothing

    # ---- persistence -------------------------------------------------------------------------------------

    def load(self) -> None:
        """Every saved ledger, also of batteries not (yet) present: the totals never drop at a restart."""
        self._loaded = True
        data = self.store.load()
        saved = data.get("ledgers") if data.get("version") == STATE_VERSION else None
        if data and not isinstance(saved, dict):
            _LOG.warning("%s is not a version %d energy state; starting at 0", self.store.path, STATE_VERSION)
            return
        for identity, entry in (saved or {}).items():
            kind = entry.get("kind") if isinstance(entry, dict) else None
            ledger, reason = EnergyLedger.from_dict(entry, identity, kind if kind in ("total", "daily") else "total",
                                                    self.tz)
            if reason:
                _LOG.warning("%s", reason)
            self.ledgers[identity] = ledger
        self._load_externals(data.get("externals"))
        if self.ledgers:
            charged, discharged = total_energy(self.ledgers.values())
            _LOG.info("energy of %d batteries loaded from %s: %.3f kWh charged, %.3f kWh discharged",
                      len(self.ledgers), self.store.path, charged, discharged)

    def _load_externals(self, saved: Any) -> None:
        """The external batteries' rows; one that is not usable is dropped with a log line (its energy stays)."""
        if not isinstance(saved, dict):
            return
        now, wall = self.clock(), self.wall()
        for identity, entry in sorted(saved.items(), key=lambda item: str(item[0])):
            try:
                if identity not in self.ledgers:
                    raise ValueError("no energy ledger saved for it")
                row, soc, capacity, reported = (entry["row"], entry["soc"], entry.get("capacity"), entry["reportedAt"])
                if not (isinstance(row, int) and 0 <= row < 100000 and row not in
                        {e.row for e in self.externals.values()}):
                    row = self._free_row()
                if _number(soc) is None or not 0 <= soc <= 100:
                    raise ValueError(f"soc {soc!r} is not 0 to 100")
                if capacity is not None and (_number(capacity) is None or capacity <= 0):
                    raise ValueError(f"capacity {capacity!r} is not a positive number")
                if _number(reported) is None:
                    raise ValueError(f"reportedAt {reported!r} is not a time")
            except (TypeError, KeyError, ValueError, AttributeError) as exc:
                _LOG.warning("%s: saved external battery %r not usable (%s); it reappears at its next report",
                             self.store.path, identity, exc)
                continue
            # Stale as long after the restart as it was before: the monotonic clock restarted, the wall did not.
            at = now - max(0.0, wall - float(reported))
            undo, correction = entry.get("undo"), entry.get("correction", "")
            if undo is not None and _undone(self.ledgers[identity], undo) is None:
                _LOG.warning("%s: the way back from %r's last report is not usable; it cannot be rolled back",
                             self.store.path, identity)
                undo = None
            self.externals[identity] = _External(row, float(soc), None if capacity is None else float(capacity),
                                                 at, float(reported), undo,
                                                 correction[:500] if isinstance(correction, str) else "")

    def save(self) -> None:
        if not self._loaded:
            return
        self._save_due = False
        self._saved_at = self.clock()
        externals = {i: {"row": e.row, "soc": e.soc, "capacity": e.capacity, "reportedAt": e.wall, "undo": e.undo,
                         "correction": e.correction} for i, e in sorted(self.externals.items())}
        self.store.save({"version": STATE_VERSION,
                         "ledgers": {i: ledger.to_dict() for i, ledger in sorted(self.ledgers.items())},
                         "externals": externals, "levels": self._levels})

    # ---- the user's time zone ----------------------------------------------------------------------------

    def set_zone(self, tz: tzinfo | None, _name: str | None = None) -> None:
        """Dates (daily buckets, daily counters' midnight) from now on in `tz` (None: the process's zone)."""
        self.tz = tz
        for ledger in self.ledgers.values():
            ledger.tz = tz

    def tick(self) -> None:
        """Every second or so: save when a new identity appeared or SAVE_INTERVAL passed."""
        if self._save_due or self.clock() - self._saved_at >= SAVE_INTERVAL:
            self.save()

    # ---- members on D-Bus ----------------------------------------------------------------------------------

    def _ledger(self, identity: str, kind: CounterKind) -> EnergyLedger:
        ledger = self.ledgers.get(identity)
        if ledger is None:
            ledger = self.ledgers[identity] = EnergyLedger(identity, kind, self.tz)
            self._save_due = True  # its first counter value is the anchor a restart must count from
        elif ledger.kind != kind:
            # The config changed the counter kind: the totals and anchors stay, the rules change.
            data = ledger.to_dict()
            data["kind"] = kind
            ledger, _ = EnergyLedger.from_dict(data, identity, kind, self.tz)
            self.ledgers[identity] = ledger
            _LOG.info("%s: counters now read as %s", identity, kind)
        return ledger

    def set_member(self, name: str, identity: str, values: Mapping[str, Any]) -> None:
        """A member joined, or the pack it publishes changed (`identity`, as the bank says): its ledger."""
        kind = member_options(self.options, name, values).counterKind
        old = self.members.get(name)
        if old is not None and (old.identity, old.kind) == (identity, kind):
            return
        self.members[name] = _Member(identity, kind)
        self._ledger(identity, kind)
        self.sample(name, values)

    def remove_member(self, name: str) -> None:
        self.members.pop(name, None)

    def reconfigure(self, options: EnergyOptions, identity_of: Callable[[str], str | None],
                    values_of: Callable[[str], Mapping[str, Any]]) -> None:
        self.options = options
        for name in list(self.members):
            identity = identity_of(name)
            if identity is None:
                self.remove_member(name)
            else:
                self.set_member(name, identity, values_of(name))

    def note_duplicates(self, found: Mapping[str, Duplicate]) -> None:
        """The packs more than one member publishes, as the bank says (and which service stands for each): the
        others are neither sampled nor counted."""
        for identity, dup in found.items():
            if self.duplicates.get(identity) != dup:
                _LOG.warning("battery %s is published by %s: its energy and level are counted once, from %s",
                             identity, " and ".join(dup.services), dup.chosen)
        for identity in self.duplicates.keys() - found.keys():
            _LOG.info("battery %s is published by one service again", identity)
        self.duplicates = dict(found)
        self._shadowed = {s for d in found.values() for s in d.services if s != d.chosen}

    def sample(self, name: str, values: Mapping[str, Any], changes: Iterable[str] | None = None) -> None:
        """A member's energy paths changed (None: take all). Members with counters are not fed V x I."""
        member = self.members.get(name)
        if member is None or name in self._shadowed:
            return
        ledger = self.ledgers[member.identity]
        if changes is not None and ledger.uses_counters and COUNTER_PATHS.isdisjoint(changes):
            return
        limits = [x for x in (_number(values.get("/Info/MaxChargeCurrent")),
                              _number(values.get("/Info/MaxDischargeCurrent"))) if x is not None]
        messages = ledger.add(self.wall(), values.get(CHARGED), values.get(DISCHARGED),
                              voltage=values.get("/Dc/0/Voltage"), current=values.get("/Dc/0/Current"),
                              max_current_a=max(limits) if limits else None)
        if messages:
            self._log(member.identity, f"{name}: " + "; ".join(messages))

    def _log(self, identity: str, text: str) -> None:
        now = self.clock()
        if now - self._logged.get(identity, -MESSAGE_LOG_INTERVAL) >= MESSAGE_LOG_INTERVAL:
            self._logged[identity] = now
            _LOG.warning("%s", text)

    # ---- external batteries ------------------------------------------------------------------------------

    def report(self, fields: Mapping[str, Any]) -> str:
        """Take a report of a battery that is not on D-Bus; ReportError (naming field, value and what is allowed)
        when it cannot be taken, and then nothing changes. The first report's totals are the battery's lifetime
        energy and count; later ones add their increase. The level goes into the levels, not the DC bus."""
        report = _parse_report(fields)
        self._check_id(report.id)
        external = self.externals.get(report.id)
        options = _options_of(self.options, [report.id])
        max_kw = options.maxPowerKw or self.options.externalMaxPowerKw
        # Tried on a copy: a refused report (a typo, a delta, an impossible jump) must leave no trace, or the
        # next correct report would be measured against the mistake.
        base = self._ledger_as(report.id, options.counterKind)
        now = self.wall()
        last = base.counters()
        series = self.series.setdefault(report.id, ReportSeries())
        trial, messages, held = _try_report(base, report, now, max_kw, options.capacityKwh)
        before, note = base, None
        if messages and not held and external is not None and external.undo is not None:
            # Below the last report: when this one continues the report before it, the last was the mistake.
            undone = _undone(base, external.undo)
            retry = _try_report(undone, report, now, max_kw, options.capacityKwh) if undone is not None else None
            if retry is not None and not retry[1]:
                conflict = series.roll_back(report.id, last, external.wall, report.charged, max_kw)
                if conflict:
                    self._conflict(report.id, conflict)
                trial, messages, before = retry[0], [], undone
                note = (f"the report of {self._when(external.wall)} (charged {last[0]:g}, discharged {last[1]:g} "
                        f"kWh) was rolled back: the next one ({report.charged:g}, {report.discharged:g} kWh) "
                        "continues from the one before it")
        if messages:
            verdict, conflict = series.refuse(report.id, report.charged, report.discharged, now, last, max_kw, held)
            if verdict == "conflict":
                self._conflict(report.id, conflict or "")
            if verdict != "confirmed":
                # Nothing of a refused report is kept: the next report is measured against the last taken one.
                raise ReportError([m.replace(REANCHORED, "refused; the last taken totals stay") for m in messages])
            trial = base.copy()
            trial.add(now, report.charged, report.discharged, max_power_kw=CONFIRMED_KW)
            note = (f"charged {report.charged:g}, discharged {report.discharged:g} kWh taken at "
                    f"{self._when(now)} although beyond the bounds: the report before it said the same")
        series.accepted()
        self.ledgers[report.id] = trial
        if external is None:
            external = self.externals[report.id] = _External(self._free_row(), report.soc, report.capacity, 0.0, 0.0)
            _LOG.info("external battery %s reported for the first time: %.3f kWh charged, %.3f kWh discharged",
                      report.id, trial.charged_kwh, trial.discharged_kwh)
        external.soc, external.capacity, external.at, external.wall = report.soc, report.capacity, self.clock(), now
        # A first report has nothing before it that a later one could continue: it is not rolled back (a
        # delta sent next would undo it), `report --remove` starts the id again.
        external.undo = trial.undo_record(before) if before.counters() != (None, None) else None
        if note:
            _LOG.warning("%s: %s", report.id, note)
            external.correction = f"{self._when(now)}: {note}"
            self.corrections[report.id] = self.clock()
        self._save_due = True  # reports are rare: each taken one is on disk within a tick
        return self._answer(report.id, trial, note)

    def _check_id(self, identity: str) -> None:
        """ReportError when `identity` cannot be an external battery's: a battery on D-Bus has it, or a new one
        would be one too many."""
        on_bus = sorted(n for n, m in self.members.items() if m.identity == identity)
        if on_bus:
            raise ReportError([f"id: {identity!r} is the identity of {', '.join(on_bus)} on D-Bus; an external "
                               "battery needs an id of its own"])
        limit = self.options.maxExternal
        if identity not in self.externals and len(self.externals) >= limit:
            raise ReportError([(f"id: {identity!r} would be external battery number {len(self.externals) + 1}; "
                                f"allowed: at most {limit} (energy.maxExternal); remove one that is gone with "
                                "`battery-aggregator report --remove ID`")])

    def _answer(self, identity: str, trial: EnergyLedger, note: str | None) -> str:
        """What the reporter is told of a taken report."""
        answer = f"{identity}: {trial.charged_kwh:.3f} kWh charged, {trial.discharged_kwh:.3f} kWh discharged"
        if note:
            answer += f" ({note})"
        twins = next((g for g in self._same_totals() if identity in g), ())
        if twins:
            others = ", ".join(i for i in twins if i != identity)
            answer += (f"; warning: {others} reported the same totals: one battery under two ids is counted twice "
                       f"(remove one with `battery-aggregator report --remove ID`)")
        return answer

    def _ledger_as(self, identity: str, kind: CounterKind) -> EnergyLedger:
        """A copy of an external battery's ledger with counters of `kind` (a fresh one for a new id)."""
        current = self.ledgers.get(identity)
        if current is None:
            return EnergyLedger(identity, kind, self.tz)
        if current.kind != kind:
            data = current.to_dict()
            data["kind"] = kind
            return EnergyLedger.from_dict(data, identity, kind, self.tz)[0]
        return current.copy()

    def _conflict(self, identity: str, message: str) -> None:
        if identity not in self.conflicts:
            _LOG.warning("%s", message)
        self.conflicts[identity] = self.clock()
        raise ReportConflict([message])

    def _when(self, wall: float) -> str:
        return datetime.fromtimestamp(wall, self.tz).strftime("%Y-%m-%d %H:%M")

    def _same_totals(self) -> list[tuple[str, ...]]:
        """Fresh external ids that reported the same totals (one battery under two ids)."""
        now = self.clock()
        return same_totals({i: self.ledgers[i].counters() for i, e in self.externals.items()
                            if i in self.ledgers and self._external_state(e, now) == ONLINE})

    def remove_external(self, identity: Any) -> str:
        """Forget an external battery: its row, its level and its energy (it leaves the totals). ReportError
        when `identity` is not an external battery."""
        if not isinstance(identity, str) or identity not in self.externals:
            known = ", ".join(sorted(self.externals)) or "none"
            raise ReportError([f"id: {identity!r} is not an external battery; allowed: a reported id ({known})"])
        external = self.externals.pop(identity)
        ledger = self.ledgers.pop(identity, None)
        self.series.pop(identity, None)
        self.conflicts.pop(identity, None)
        self.corrections.pop(identity, None)
        self._save_due = True
        charged = ledger.charged_kwh if ledger is not None else 0.0
        discharged = ledger.discharged_kwh if ledger is not None else 0.0
        _LOG.info("external battery %s removed (row %d): %.3f kWh charged and %.3f kWh discharged leave the "
                  "totals", identity, external.row, charged, discharged)
        return f"{identity}: removed ({charged:.3f} kWh charged, {discharged:.3f} kWh discharged no longer counted)"

    def _free_row(self) -> int:
        """The lowest /Energy/External/<k> row no external battery holds: removed rows are used again, so the
        published paths stay as few as the batteries."""
        taken = {e.row for e in self.externals.values()}
        return next(k for k in range(len(taken) + 1) if k not in taken)

    def _external_state(self, external: _External, now: float) -> str:
        return STALE if now - external.at > self.options.externalStaleAfter else ONLINE

    # ---- what the aggregate publishes ----------------------------------------------------------------------

    def values(self, rows: Iterable[tuple[str, int, bool]], values_of: Callable[[str], Mapping[str, Any]]
               ) -> dict[str, Any]:
        """The energy paths: `rows` are the aggregate's members (service, its /Batteries slot, online)."""
        out: dict[str, Any] = {}
        charged, discharged = total_energy(self.ledgers.values())
        out[CHARGED], out[DISCHARGED] = _kwh(charged), _kwh(discharged)
        levels: list[tuple[Any, Any]] = []
        for name, slot, online in rows:
            member = self.members.get(name)
            ledger = self.ledgers.get(member.identity) if member is not None else None
            counted = ledger is not None and name not in self._shadowed
            prefix = f"/Batteries/{slot}/"
            out[prefix + "Identity"] = member.identity if member is not None else None
            out[prefix + "History/ChargedEnergy"] = _kwh(ledger.charged_kwh) if counted else None
            out[prefix + "History/DischargedEnergy"] = _kwh(ledger.discharged_kwh) if counted else None
            if online and counted:
                values = values_of(name)
                levels.append((values.get("/Soc"), values.get("/InstalledCapacity")))
        now = self.clock()
        stale = self._external_values(out, levels, now)
        average = average_level(levels)
        weighted = capacity_weighted_level(levels)
        out["/Energy/AverageSoc"] = None if average is None else round(average, 2)
        out["/Energy/CapacityWeightedSoc"] = None if weighted is None else round(weighted, 2)
        out["/Energy/Batteries"] = len(levels)
        self._levels = {"average": out["/Energy/AverageSoc"], "capacityWeighted": out["/Energy/CapacityWeightedSoc"],
                        "batteries": len(levels), "at": self.wall()}
        duplicates = "; ".join(f"{d.identity}: {', '.join(d.services)} (counted once, from {d.chosen})"
                               for d in sorted(self.duplicates.values(), key=lambda d: d.identity))
        out["/Energy/Duplicates"] = duplicates
        out["/Energy/Status"] = self._status(duplicates, stale, now)
        return out

    def _external_values(self, out: dict[str, Any], levels: list[tuple[Any, Any]], now: float) -> list[str]:
        """The /Energy/External/<k>/* paths into `out`, the levels of the online ones onto `levels`; the stale
        ones are returned."""
        stale = []
        live_rows = {e.row for e in self.externals.values()}
        for row in sorted(self._rows_shown - live_rows):  # a removed battery's row: invalid until used again
            for key in EXTERNAL_ROW:
                out[f"/Energy/External/{row}/{key}"] = None
        self._rows_shown = self._rows_shown | live_rows
        for identity, external in self.externals.items():
            ledger = self.ledgers[identity]
            state = self._external_state(external, now)
            prefix = f"/Energy/External/{external.row}/"
            out[prefix + "Id"] = identity
            out[prefix + "State"] = state
            out[prefix + "Soc"] = external.soc
            out[prefix + "Capacity"] = external.capacity
            out[prefix + "ChargedEnergy"] = _kwh(ledger.charged_kwh)
            out[prefix + "DischargedEnergy"] = _kwh(ledger.discharged_kwh)
            out[prefix + "LastCorrection"] = external.correction
            if state == ONLINE:
                levels.append((external.soc, external.capacity))
            else:
                stale.append(identity)
        return stale

    def _status(self, duplicates: str, stale: list[str], now: float) -> str:
        """/Energy/Status: why the totals may be off, or ok."""
        reasons = []
        if duplicates:
            reasons.append("duplicate batteries: " + duplicates)
        if stale:
            reasons.append("stale external batteries: " + ", ".join(sorted(stale)))
        twins = self._same_totals()
        if twins != self._twins_logged:
            for group in twins:
                if group not in self._twins_logged:
                    _LOG.warning("external ids %s reported the same totals: one battery under two ids is counted "
                                 "twice; remove one with `battery-aggregator report --remove ID`", ", ".join(group))
            self._twins_logged = twins
        if twins:
            reasons.append("the same totals under two ids (one battery counted twice?): "
                           + "; ".join(", ".join(group) for group in twins))
        for events, what in ((self.conflicts, "two batteries report under one id: "),
                             (self.corrections, "reports rolled back or taken on confirmation: ")):
            for identity, at in list(events.items()):
                if now - at > self.options.externalStaleAfter:
                    del events[identity]  # nothing of the kind for that long: the reporters were sorted out
            if events:
                reasons.append(what + ", ".join(sorted(events)))
        return "; ".join(reasons) or "ok"


ENERGY_TEXT = {"Soc": "/Soc", "AverageSoc": "/Soc", "CapacityWeightedSoc": "/Soc", "Capacity": "/InstalledCapacity",
               "ChargedEnergy": CHARGED, "DischargedEnergy": DISCHARGED}


def text_key(path: str) -> str:
    """The aggregate path whose text format an energy path shares ('{:.2f}kWh' for every energy, ...)."""
    return ENERGY_TEXT.get(path.rsplit("/", 1)[-1], "")


# ---- the commands ------------------------------------------------------------------------------------------

def load_ledgers(state_dir: str | Path) -> list[EnergyLedger]:
    """The ledgers saved under `state_dir` (for `energy --csv`); [] when there are none."""
    return _ledgers_of(StateStore(Path(state_dir) / STATE_FILE).load())


def _ledgers_of(data: dict[str, Any]) -> list[EnergyLedger]:
    saved = data.get("ledgers")
    ledgers = []
    for identity, entry in (saved.items() if isinstance(saved, dict) else ()):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        ledger, reason = EnergyLedger.from_dict(entry, identity, kind if kind in ("total", "daily") else "total")
        if reason is None:
            ledgers.append(ledger)
    return ledgers


def energy_table(state_dir: str | Path, tz: tzinfo | None = None) -> str | None:
    """`energy`: per identity its counter kind, kWh and (external batteries) level; then the totals over all
    batteries and the levels as last published (what the Homey app shows). None when nothing is saved."""
    data = StateStore(Path(state_dir) / STATE_FILE).load()
    ledgers = _ledgers_of(data)
    if not ledgers:
        return None
    externals = data.get("externals") if isinstance(data.get("externals"), dict) else {}
    lines = [f"{'identity':<32} {'kind':<6} {'charged kWh':>12} {'discharged kWh':>15} {'level %':>8}"]
    for ledger in sorted(ledgers, key=lambda item: item.identity):
        entry = externals.get(ledger.identity)
        soc = _number(entry.get("soc")) if isinstance(entry, dict) else None
        level = "-" if soc is None else f"{soc:.1f}"
        lines.append(f"{ledger.identity:<32} {ledger.kind:<6} {ledger.charged_kwh:>12.3f} "
                     f"{ledger.discharged_kwh:>15.3f} {level:>8}")
    charged, discharged = total_energy(ledgers)
    lines.append(f"{f'total ({len(ledgers)} batteries)':<39} {charged:>12.3f} {discharged:>15.3f}")
    levels = data.get("levels") if isinstance(data.get("levels"), dict) else {}
    average, weighted, at = (_number(levels.get(k)) for k in ("average", "capacityWeighted", "at"))
    if average is None or at is None:
        lines.append("average level: not known (no battery with a level was online when the service last saved)")
    else:
        when = datetime.fromtimestamp(at, tz).strftime("%Y-%m-%d %H:%M")
        count = _number(levels.get("batteries"))
        lines.append(f"average level {average:.1f} %" + ("" if weighted is None else
                     f" (weighted by capacity {weighted:.1f} %)") + f" of {count or 0:.0f} batteries, at {when}")
    return "\n".join(lines) + "\n"
