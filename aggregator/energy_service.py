"""Energy per battery identity on the aggregate: the thin layer around energy.py.

`EnergyTracker` follows the members (fed by the Aggregator only when an energy path changes), takes reports of
external batteries, computes the `/History/*` and `/Energy/*` values and keeps the ledgers in
`<stateDir>/energy.json`. `add_report_methods` puts the `org.batteryaggregator.Energy` methods on the
aggregate's service; `ReportHttpServer` is the optional HTTP endpoint (off by default).

A ledger is saved when a new identity appears (so its counter anchor survives a kill -9: the member's own
counters then cover the time we were away), every SAVE_INTERVAL and on stop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .bus.lib import Message
from .bus.service import VeService
from .bus.values import unwrap
from .config import EnergyOptions, MemberEnergyOptions
from .energy import (CounterKind, Duplicate, EnergyLedger, ReportError, average_level, capacity_weighted_level,
                     find_duplicates, identity_of, parse_report, report_regression, total_energy)
from .state import StateStore

_LOG = logging.getLogger("aggregator.energy")

ENERGY_INTERFACE = "org.batteryaggregator.Energy"
REPORT_ERROR = ENERGY_INTERFACE + ".Error.InvalidReport"
STATE_FILE = "energy.json"
STATE_VERSION = 1
SAVE_INTERVAL = 180.0
MESSAGE_LOG_INTERVAL = 600.0  # one log line per identity in this time
CHARGED, DISCHARGED = "/History/ChargedEnergy", "/History/DischargedEnergy"
COUNTER_PATHS = frozenset({CHARGED, DISCHARGED})
ENERGY_INPUTS = COUNTER_PATHS | {"/Dc/0/Voltage", "/Dc/0/Current"}  # what feeds a ledger
ONLINE, STALE = "online", "stale"


@dataclass(slots=True)
class _Member:
    identity: str
    kind: CounterKind
    first_seen: float


@dataclass(slots=True)
class _External:
    row: int
    soc: float
    capacity: float | None
    at: float  # monotonic time of the last report


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
        self.duplicates: dict[str, Duplicate] = {}
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
            ledger, reason = EnergyLedger.from_dict(entry, identity, kind if kind in ("total", "daily") else "total")
            if reason:
                _LOG.warning("%s", reason)
            self.ledgers[identity] = ledger
        if self.ledgers:
            charged, discharged = total_energy(self.ledgers.values())
            _LOG.info("energy of %d batteries loaded from %s: %.3f kWh charged, %.3f kWh discharged",
                      len(self.ledgers), self.store.path, charged, discharged)

    def save(self) -> None:
        if not self._loaded:
            return
        self._save_due = False
        self._saved_at = self.clock()
        self.store.save({"version": STATE_VERSION,
                         "ledgers": {i: ledger.to_dict() for i, ledger in sorted(self.ledgers.items())}})

    def tick(self) -> None:
        """Every second or so: save when a new identity appeared or SAVE_INTERVAL passed."""
        if self._save_due or self.clock() - self._saved_at >= SAVE_INTERVAL:
            self.save()

    # ---- members on D-Bus ----------------------------------------------------------------------------------

    def _options(self, keys: Iterable[str | None]) -> MemberEnergyOptions:
        for key in keys:
            if key and key in self.options.members:
                return self.options.members[key]
        return MemberEnergyOptions()

    def _ledger(self, identity: str, kind: CounterKind) -> EnergyLedger:
        ledger = self.ledgers.get(identity)
        if ledger is None:
            ledger = self.ledgers[identity] = EnergyLedger(identity, kind)
            self._save_due = True  # its first counter value is the anchor a restart must count from
        elif ledger.kind != kind:
            # The config changed the counter kind: the totals and anchors stay, the rules change.
            data = ledger.to_dict()
            data["kind"] = kind
            ledger, _ = EnergyLedger.from_dict(data, identity, kind)
            self.ledgers[identity] = ledger
            _LOG.info("%s: counters now read as %s", identity, kind)
        return ledger

    def set_member(self, name: str, values: Mapping[str, Any]) -> None:
        """A member joined, or its /Serial changed: who it is, and whether another service is the same battery."""
        serial = values.get("/Serial")
        serial = serial if isinstance(serial, str) and serial.strip() else None
        custom = values.get("/CustomName")
        keys = [name, f"name:{custom}" if isinstance(custom, str) and custom else None,
                f"serial:{serial}" if serial else None, serial]
        options = self._options(keys)
        identity = identity_of(serial, options.id, name)
        old = self.members.get(name)
        if old is not None and (old.identity, old.kind) == (identity, options.counterKind):
            return
        self.members[name] = _Member(identity, options.counterKind, old.first_seen if old else self.clock())
        self._ledger(identity, options.counterKind)
        self._find_duplicates()
        self.sample(name, values)

    def remove_member(self, name: str) -> None:
        if self.members.pop(name, None) is not None:
            self._find_duplicates()

    @property
    def shadowed(self) -> frozenset[str]:
        """Services that publish a battery another (earlier) service already stands for: same identity."""
        return frozenset(self._shadowed)

    def reconfigure(self, options: EnergyOptions, values_of: Callable[[str], Mapping[str, Any]]) -> None:
        self.options = options
        for name in list(self.members):
            self.set_member(name, values_of(name))

    def _find_duplicates(self) -> None:
        found = find_duplicates({n: m.identity for n, m in self.members.items()},
                                {n: m.first_seen for n, m in self.members.items()})
        for identity, dup in found.items():
            if self.duplicates.get(identity) != dup:
                _LOG.warning("battery %s is published by %s: its energy and level are counted once, from %s",
                             identity, " and ".join(dup.services), dup.chosen)
        for identity in self.duplicates.keys() - found.keys():
            _LOG.info("battery %s is published by one service again", identity)
        self.duplicates = found
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
        when it cannot be taken. The energy goes into its ledger; the level into the levels, not the DC bus."""
        report = parse_report(**fields)
        on_bus = sorted(n for n, m in self.members.items() if m.identity == report.id)
        if on_bus:
            raise ReportError([f"id: {report.id!r} is the identity of {', '.join(on_bus)} on D-Bus; an external "
                               "battery needs an id of its own"])
        ledger = self._ledger(report.id, self._options([report.id]).counterKind)
        problem = report_regression(ledger, report)
        if problem:
            raise ReportError([problem])
        messages = ledger.add(self.wall(), report.charged, report.discharged)
        external = self.externals.get(report.id)
        if external is None:
            external = self.externals[report.id] = _External(len(self.externals), report.soc, report.capacity, 0.0)
            _LOG.info("external battery %s reported for the first time", report.id)
        external.soc, external.capacity, external.at = report.soc, report.capacity, self.clock()
        if messages and not report.reset:
            raise ReportError(messages)  # taken, but the energy was not: the reporter must hear why
        return f"{report.id}: {ledger.charged_kwh:.3f} kWh charged, {ledger.discharged_kwh:.3f} kWh discharged"

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
        stale = []
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
            if state == ONLINE:
                levels.append((external.soc, external.capacity))
            else:
                stale.append(identity)
        average = average_level(levels)
        weighted = capacity_weighted_level(levels)
        out["/Energy/AverageSoc"] = None if average is None else round(average, 2)
        out["/Energy/CapacityWeightedSoc"] = None if weighted is None else round(weighted, 2)
        out["/Energy/Batteries"] = len(levels)
        duplicates = "; ".join(f"{d.identity}: {', '.join(d.services)} (counted once, from {d.chosen})"
                               for d in sorted(self.duplicates.values(), key=lambda d: d.identity))
        out["/Energy/Duplicates"] = duplicates
        reasons = []
        if duplicates:
            reasons.append("duplicate batteries: " + duplicates)
        if stale:
            reasons.append("stale external batteries: " + ", ".join(sorted(stale)))
        out["/Energy/Status"] = "; ".join(reasons) or "ok"
        return out


ENERGY_TEXT = {"Soc": "/Soc", "AverageSoc": "/Soc", "CapacityWeightedSoc": "/Soc", "Capacity": "/InstalledCapacity",
               "ChargedEnergy": CHARGED, "DischargedEnergy": DISCHARGED}


def text_key(path: str) -> str:
    """The aggregate path whose text format an energy path shares ('{:.2f}kWh' for every energy, ...)."""
    return ENERGY_TEXT.get(path.rsplit("/", 1)[-1], "")


# ---- the report, on D-Bus and over HTTP ---------------------------------------------------------------------

def add_report_methods(service: VeService, take: Callable[[Mapping[str, Any]], str]) -> None:
    """`org.batteryaggregator.Energy.Report(a{sv}) -> s` (keys id, charged, discharged, soc, capacity, reset)
    and `ReportValues(s id, d charged, d discharged, d soc, d capacity) -> s` (capacity < 0: not known) for
    clients such as dbus-send that cannot build a{sv}. A bad report is an error reply whose text says why."""

    def answer(msg: Message, fields: Mapping[str, Any]) -> Message:
        try:
            return Message.new_method_return(msg, "s", [take(fields)])
        except ReportError as exc:
            return Message.new_error(msg, REPORT_ERROR, str(exc))

    def report(msg: Message) -> Message:
        if msg.signature != "a{sv}":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs",
                                     "Report takes a{sv}: id, charged, discharged, soc[, capacity, reset]")
        return answer(msg, {str(k): unwrap(v) for k, v in msg.body[0].items()})

    def report_values(msg: Message) -> Message:
        if msg.signature != "sdddd":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs",
                                     "ReportValues takes sdddd: id, charged, discharged, soc, capacity (-1: none)")
        ident, charged, discharged, soc, capacity = msg.body
        return answer(msg, {"id": ident, "charged": charged, "discharged": discharged, "soc": soc,
                            "capacity": None if capacity < 0 else capacity})

    service.add_method(ENERGY_INTERFACE, "Report", report)
    service.add_method(ENERGY_INTERFACE, "ReportValues", report_values)


MAX_REQUEST = 16384
HTTP_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large"}


class ReportHttpServer:
    """`POST /report` with a JSON object (the fields of `report`): 200 {"ok": true, "message": ...} or 400
    {"error": ...}. Tiny on purpose: one request per connection, bounded size and time, no dependency."""

    def __init__(self, take: Callable[[Mapping[str, Any]], str], host: str, port: int) -> None:
        self.take = take
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        _LOG.info("external reports over HTTP: POST http://%s:%d/report", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._answer(reader), HTTP_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            status, body = 400, {"error": "incomplete or too slow request"}
        payload = json.dumps(body).encode()
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + payload)
            await writer.drain()
            writer.close()
        except ConnectionError:
            pass

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_REQUEST:
            return 413, {"error": "request too large"}
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return 400, {"error": "not an HTTP request"}
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target != "/report":
            return 404, {"error": "only /report is here"}
        if method != "POST":
            return 405, {"error": "use POST with a JSON object"}
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        try:
            length = int(headers.get("content-length", ""))
        except ValueError:
            return 400, {"error": "Content-Length is required"}
        if not 0 <= length <= MAX_REQUEST:
            return 413, {"error": f"the body must be at most {MAX_REQUEST} bytes"}
        try:
            data = json.loads(await reader.readexactly(length))
        except ValueError as exc:
            return 400, {"error": f"the body is not JSON: {exc}"}
        if not isinstance(data, dict):
            return 400, {"error": "the body must be a JSON object: id, charged, discharged, soc[, capacity, reset]"}
        try:
            return 200, {"ok": True, "message": self.take(data)}
        except ReportError as exc:
            return 400, {"error": str(exc)}


# ---- the commands ------------------------------------------------------------------------------------------

def load_ledgers(state_dir: str | Path) -> list[EnergyLedger]:
    """The ledgers saved under `state_dir` (for `energy --csv`); [] when there are none."""
    data = StateStore(Path(state_dir) / STATE_FILE).load()
    saved = data.get("ledgers")
    ledgers = []
    for identity, entry in (saved.items() if isinstance(saved, dict) else ()):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        ledger, reason = EnergyLedger.from_dict(entry, identity, kind if kind in ("total", "daily") else "total")
        if reason is None:
            ledgers.append(ledger)
    return ledgers
