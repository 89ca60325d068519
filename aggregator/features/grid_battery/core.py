"""The grid as a battery: exported energy charges it, imported energy discharges it (net metering).

Pure: the grid meter's cumulative counters and time go in, the virtual battery comes out. The level is
export - import since the start date (or the last yearly reset), held within [0, capacity]; export that a
full battery cannot take is lost export (`overflow_kwh`), import an empty battery cannot supply is import
beyond the battery (`beyond_kwh`). Lifetime totals always satisfy

    level = charged - discharged - overflow + beyond - forfeited

where charged/discharged are the whole export/import and forfeited is what yearly resets took away.

Meter counters are followed like energy.py follows BMS counters, but a meter counter that goes backwards
(meter replaced, counter reset) is only re-anchored: nothing is counted for it and the level does not move.
Within one sample interval import and export are netted (a meter is read every second or so).

Meters publish their counters in steps (0.01, 0.1 or 1 kWh): a step is checked against the time since the
counter last moved (not since the last sample, which may be a second ago) plus one step of resolution, so
quantised counters count while a jump beyond the connection's power is still rejected.

Where counting starts (`origin`): the meter's counters at the start date's midnight when they are configured;
else the last sample before that midnight, its delta shared by time so only the part after midnight counts;
else the first sample, with the configured start level. Started later than START_GRACE after the midnight
without either, the energy in between is not counted and `exact` is False (until the next reset).

Every sample's counted energy also goes into a 15-minute load profile (`closed_slots` are the finished slots;
the energy a sample brings after a gap lands in the slot it arrives in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from typing import Any

from ...local_time import local_date, local_midnight
from ...numbers import finite

__all__ = ["GridBattery", "GridBatteryConfig", "HistoryRow", "ProfileSlot", "history_rows_csv", "parse_month_day",
           "profile_csv_line", "resolution_of", "reset_occurrence", "PROFILE_HEADER"]

GRID_PREFIX = "com.victronenergy.grid."  # the meters a grid battery follows
GRID_BATTERY_PRODUCT_ID = 0xB0F3  # ours, next to the simulator's and the aggregate's
METER_KWH_LIMIT = 1e9  # beyond this a meter counter is garbage
MARGIN = 1.5  # the grid connection's limit is firm, but samples arrive late
SLACK_KWH = 0.05  # the least slack: samples are read late
RESOLUTIONS = (1.0, 0.1, 0.01)  # kWh steps meters publish their counters in
JITTER_KWH = 0.05  # a step back this small is rounding, not a reset
HISTORY_DAYS = 1096
STATE_VERSION = 1
START_GRACE = 900.0  # s after the start date's midnight within which a first sample misses nothing worth saying
SLOT = 900.0  # s: the load profile's 15-minute slots (every zone's offset is a multiple of 15 minutes)
PENDING_SLOTS = 2 * 96  # finished slots kept for the writer: two days if it never takes them
PROFILE_HEADER = "start,import_kwh,export_kwh,level_kwh"


def parse_month_day(text: str) -> tuple[int, int]:
    """'MM-DD' -> (month, day); ValueError naming what is allowed. 02-29 is allowed (Feb 28 in other years)."""
    parts = text.split("-") if isinstance(text, str) else []
    if len(parts) != 2 or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a date; allowed: MM-DD, e.g. 01-01")
    month, day = int(parts[0]), int(parts[1])
    try:
        date(2024, month, day)  # a leap year: 02-29 exists
    except ValueError:
        raise ValueError(f"{text!r} is not a day of the year; allowed: MM-DD, e.g. 01-01") from None
    return month, day


def reset_occurrence(year: int, month_day: tuple[int, int]) -> date:
    month, day = month_day
    try:
        return date(year, month, day)
    except ValueError:  # 02-29 outside leap years
        return date(year, month, day - 1)


@dataclass(frozen=True, slots=True)
class GridBatteryConfig:
    capacity_kwh: float = 0.0  # 0 = unlimited
    start_date: date = date(1970, 1, 1)
    reset_day: tuple[int, int] | None = None  # (month, day): the level returns to 0 on that day every year
    reset_once: date | None = None  # the level returns to 0 on that day, once
    start_reading: tuple[float, float] | None = None  # the meter's (import, export) kWh at the start midnight
    start_level_kwh: float | None = None  # the level counting starts from (None: 0, not configured)
    nominal_voltage: float = 51.2
    max_power_kw: float = 100.0  # the grid connection's largest power: faster counter changes are impossible
    tz: tzinfo | None = None
    history_days: int = HISTORY_DAYS


@dataclass(slots=True)
class HistoryRow:
    """One day: the level at its last sample and the energy that moved during it."""

    day: date
    timestamp: float = 0.0  # the day's last sample
    level_kwh: float = 0.0
    charged_kwh: float = 0.0
    discharged_kwh: float = 0.0
    overflow_kwh: float = 0.0
    beyond_kwh: float = 0.0

    def as_list(self) -> list[Any]:
        return [self.day.isoformat(), self.timestamp, self.level_kwh, self.charged_kwh, self.discharged_kwh,
                self.overflow_kwh, self.beyond_kwh]


@dataclass(slots=True)
class ProfileSlot:
    """One 15-minute slot of the load profile: energy imported and exported in it, the level at its end."""

    start: float  # epoch seconds, a multiple of SLOT
    import_kwh: float = 0.0
    export_kwh: float = 0.0
    level_kwh: float = 0.0

    def as_list(self) -> list[float]:
        return [self.start, self.import_kwh, self.export_kwh, self.level_kwh]


def profile_csv_line(slot: ProfileSlot, tz: tzinfo | None = None) -> str:
    """A slot as a CSV line (no newline): its start as local ISO time with the offset, kWh with 3 decimals."""
    stamp = datetime.fromtimestamp(slot.start, tz).isoformat(timespec="minutes")
    return f"{stamp},{slot.import_kwh:.3f},{slot.export_kwh:.3f},{slot.level_kwh:.3f}"


@dataclass(slots=True)
class _Counter:
    value: float | None = None
    at: float | None = None


@dataclass
class GridBattery:
    config: GridBatteryConfig
    level_kwh: float = 0.0
    charged_kwh: float = 0.0  # all export since the start date
    discharged_kwh: float = 0.0  # all import since the start date
    overflow_kwh: float = 0.0  # export lost to a full battery
    beyond_kwh: float = 0.0  # import an empty battery could not supply
    forfeited_kwh: float = 0.0  # level taken away by yearly resets
    last_reset: date | None = None
    counter_resets: int = 0
    history: dict[date, HistoryRow] = field(default_factory=dict)
    started: bool = False  # counting has started (on or after the start date)
    origin: str | None = None  # where counting started, in words
    exact: bool = True  # False: energy between the start date and the first sample was not counted
    slot: ProfileSlot | None = None  # the load profile's slot in progress
    closed_slots: list[ProfileSlot] = field(default_factory=list)  # finished slots for the writer to take
    _import: _Counter = field(default_factory=_Counter, init=False, repr=False)
    _export: _Counter = field(default_factory=_Counter, init=False, repr=False)

    # ---- derived values --------------------------------------------------------------------------------

    @property
    def soc(self) -> float | None:
        """% of capacity; None for an unlimited battery (a level has no percentage then)."""
        if self.config.capacity_kwh <= 0:
            return None
        return 100.0 * self.level_kwh / self.config.capacity_kwh

    @property
    def level_ah(self) -> float:
        return self.level_kwh * 1000.0 / self.config.nominal_voltage

    @property
    def installed_ah(self) -> float | None:
        cap = self.config.capacity_kwh
        return cap * 1000.0 / self.config.nominal_voltage if cap > 0 else None

    def battery_power_w(self, grid_power_w: Any) -> float | None:
        """Charge (+) / discharge (-) power for a grid power (+ = import): export charges the battery,
        except that a full battery takes nothing and an empty one gives nothing."""
        if not finite(grid_power_w):
            return None
        power = -float(grid_power_w)
        full = self.config.capacity_kwh > 0 and self.level_kwh >= self.config.capacity_kwh
        if (power > 0 and full) or (power < 0 and self.level_kwh <= 0):
            return 0.0
        return power

    # ---- samples -------------------------------------------------------------------------------------

    def update(self, now: float, forward_kwh: Any, reverse_kwh: Any) -> list[str]:
        """Take the meter's cumulative import (/Ac/Energy/Forward) and export (/Ac/Energy/Reverse) at `now`.
        Returns a message for every value not taken at face value (garbage, impossible jumps, resets)."""
        messages: list[str] = []
        today = local_date(now, self.config.tz)
        if today < self.config.start_date:
            self._follow("import", self._import, forward_kwh, now, messages)  # anchors for the start
            self._follow("export", self._export, reverse_kwh, now, messages)
            return messages
        shares = (1.0, 1.0)
        if not self.started:
            shares = self._start(today, now)
        self._reset_if_due(today, now)
        imported = self._follow("import", self._import, forward_kwh, now, messages) * shares[0]
        exported = self._follow("export", self._export, reverse_kwh, now, messages) * shares[1]
        if imported or exported:
            self._apply(today, now, exported, imported)
        else:
            self._row(today, now)
        self._profile(now, imported, exported)
        return messages

    def _start(self, today: date, now: float) -> tuple[float, float]:
        """The first sample on or after the start date: set where counting starts. Returns the share of the
        next import and export delta to count (a delta from before the start midnight counts only in part)."""
        config = self.config
        midnight = local_midnight(config.start_date, config.tz)
        level = config.start_level_kwh or 0.0
        self.level_kwh = min(level, config.capacity_kwh) if config.capacity_kwh > 0 else level
        self.started, self.exact = True, True
        stamp = _stamp(now, config.tz)
        given = "" if config.start_level_kwh is None else f", level {config.start_level_kwh:g} kWh (startLevelKwh)"
        due = self._due_reset(today)
        if due is not None and due > config.start_date:
            # A reset came between the start date and this first sample: what was counted before it is gone,
            # and how much came after it is not known.
            self.level_kwh, self.last_reset = 0.0, due
            self.exact = now - local_midnight(due, config.tz) <= START_GRACE
            self.origin = f"the first sample, {stamp}, after the reset on {due.isoformat()}" + (
                "" if self.exact else f": the energy from {due.isoformat()} to then is not counted")
            return 1.0, 1.0
        if config.start_reading is not None:
            self._import = _Counter(config.start_reading[0], midnight)
            self._export = _Counter(config.start_reading[1], midnight)
            self.origin = (f"the meter's counters on {config.start_date.isoformat()} 00:00 (startImportKwh "
                           f"{config.start_reading[0]:g}, startExportKwh {config.start_reading[1]:g}){given}")
            return 1.0, 1.0
        import_at, export_at = self._import.at, self._export.at
        if import_at is not None and export_at is not None and import_at < midnight and export_at < midnight:
            self.origin = (f"the meter's counters at {_stamp(max(import_at, export_at), config.tz)}, before the start "
                           f"date: of the energy since then the part after {config.start_date.isoformat()} 00:00 "
                           f"counts{given}")

            def after_start(at: float) -> float:
                return max(0.0, now - midnight) / (now - at) if now > at else 1.0

            return after_start(import_at), after_start(export_at)
        late = now - midnight
        if config.start_level_kwh is not None or late <= START_GRACE:
            self.origin = f"the first sample, {stamp}{given}"
        else:
            self.exact = False
            self.origin = (f"the first sample, {stamp}: the energy from {config.start_date.isoformat()} to then "
                           "is not counted (configure startImportKwh and startExportKwh, or startLevelKwh)")
        return 1.0, 1.0

    def _profile(self, now: float, imported: float, exported: float) -> None:
        start = math.floor(now / SLOT) * SLOT
        slot = self.slot
        if slot is None or start > slot.start:
            if slot is not None:
                self.closed_slots.append(slot)
                del self.closed_slots[:-PENDING_SLOTS]
            slot = self.slot = ProfileSlot(start)
        slot.import_kwh += imported
        slot.export_kwh += exported
        slot.level_kwh = self.level_kwh

    def take_closed_slots(self) -> list[ProfileSlot]:
        """The finished load-profile slots since the last call, oldest first."""
        slots, self.closed_slots = self.closed_slots, []
        return slots

    def _follow(self, label: str, counter: _Counter, value: Any, now: float, messages: list[str]) -> float:
        """The counter's accepted energy since its last sample (0 when there is nothing to count)."""
        if value is None:
            return 0.0  # missing: the next value's delta covers the gap, nothing is invented
        if not finite(value) or not 0 <= value < METER_KWH_LIMIT:
            messages.append(f"meter {label} counter {value!r} kWh is not a plausible value; ignored")
            return 0.0
        value = float(value)
        last, at = counter.value, counter.at
        if value == last:
            return 0.0  # keep the time it last moved: the next step is weighed against all the time since
        counter.value, counter.at = value, now
        if last is None or at is None:
            return 0.0
        delta = value - last
        if delta < 0:
            if -delta <= JITTER_KWH:
                counter.value, counter.at = last, at  # rounding: keep the higher anchor
                return 0.0
            self.counter_resets += 1
            messages.append(f"meter {label} counter went back from {last:g} to {value:g} kWh (meter replaced or "
                            f"reset); counting from {value:g} kWh on, the level is unchanged")
            return 0.0
        # A counter in steps of q kWh moves by one step however little energy crossed it: allow one step.
        step = min(resolution_of(last), resolution_of(value))
        bound = self.config.max_power_kw * MARGIN * max(0.0, now - at) / 3600.0 + max(SLACK_KWH, step)
        if delta > bound:
            messages.append(f"meter {label} counter jumped by {delta:g} kWh in {max(0.0, now - at):.0f} s, more "
                            f"than {self.config.max_power_kw:g} kW allows; rejected, counting from {value:g} kWh on")
            return 0.0
        return delta

    def _apply(self, today: date, now: float, exported: float, imported: float) -> None:
        capacity = self.config.capacity_kwh
        raw = self.level_kwh + exported - imported
        overflow = raw - capacity if capacity > 0 and raw > capacity else 0.0
        beyond = -raw if raw < 0 else 0.0
        self.level_kwh = min(max(raw, 0.0), capacity) if capacity > 0 else max(raw, 0.0)
        self.charged_kwh += exported
        self.discharged_kwh += imported
        self.overflow_kwh += overflow
        self.beyond_kwh += beyond
        row = self._row(today, now)
        row.charged_kwh += exported
        row.discharged_kwh += imported
        row.overflow_kwh += overflow
        row.beyond_kwh += beyond

    def _due_reset(self, today: date) -> date | None:
        """The latest reset day (yearly or the one-time one) on or before `today`; None without one."""
        candidates = []
        month_day = self.config.reset_day
        if month_day is not None:
            recent = reset_occurrence(today.year, month_day)
            candidates.append(recent if recent <= today else reset_occurrence(today.year - 1, month_day))
        once = self.config.reset_once
        if once is not None and once <= today:
            candidates.append(once)
        return max(candidates, default=None)

    def _reset_if_due(self, today: date, now: float) -> None:
        due = self._due_reset(today)
        if due is None:
            return
        done = max(self.config.start_date, self.last_reset or self.config.start_date)
        if due > done:
            self.forfeited_kwh += self.level_kwh
            self.level_kwh = 0.0
            self.last_reset = due
            if not self.exact:  # counting from the reset on: what was missed before no longer matters
                self.exact, self.origin = True, f"the reset on {due.isoformat()}"
            self._row(today, now)

    def _row(self, today: date, now: float) -> HistoryRow:
        row = self.history.get(today)
        if row is None:
            row = self.history[today] = HistoryRow(today)
            if len(self.history) > self.config.history_days:
                for old in sorted(self.history)[: len(self.history) - self.config.history_days]:
                    del self.history[old]
        row.timestamp = now
        row.level_kwh = self.level_kwh
        return row

    def rows(self) -> list[HistoryRow]:
        return [self.history[day] for day in sorted(self.history)]

    def forget_counters(self) -> None:
        """Drop the counter anchors (another meter now): its first sample only anchors."""
        self._import = _Counter()
        self._export = _Counter()

    # ---- persistence ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "startDate": self.config.start_date.isoformat(),
            "level": self.level_kwh, "charged": self.charged_kwh, "discharged": self.discharged_kwh,
            "overflow": self.overflow_kwh, "beyond": self.beyond_kwh, "forfeited": self.forfeited_kwh,
            "lastReset": self.last_reset.isoformat() if self.last_reset else None,
            "counterResets": self.counter_resets,
            "import": [self._import.value, self._import.at], "export": [self._export.value, self._export.at],
            "history": [row.as_list() for row in self.rows()],
            "start": self.start_key(), "started": self.started, "origin": self.origin, "exact": self.exact,
            "slot": None if self.slot is None else self.slot.as_list(),
        }

    def start_key(self) -> dict[str, Any]:
        """The configured start; a state saved under another one is not used (counting starts anew)."""
        config = self.config
        return {"date": config.start_date.isoformat(), "reading": list(config.start_reading or []) or None,
                "level": config.start_level_kwh}

    @classmethod
    def from_dict(cls, data: Any, config: GridBatteryConfig) -> tuple[GridBattery, str | None]:
        """The battery saved by to_dict() under `config`; a fresh one and the reason when `data` is not usable
        (garbage, or saved for another start date). A lowered capacity clips the level (forfeited)."""
        if not data:
            return cls(config), None
        try:
            battery = _restore(cls(config), data)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            return cls(config), f"saved grid battery state not usable ({exc}); starting empty"
        return battery, None

    @staticmethod
    def rows_from_dict(data: Any) -> list[HistoryRow]:
        """The history rows of a saved state, without its config (for CSV export); [] when not usable."""
        try:
            rows = [_row_of(item) for item in data["history"]]
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            return []
        return sorted(rows, key=lambda row: row.day)


def _row_of(item: Any) -> HistoryRow:
    day, timestamp, *amounts = item
    if len(amounts) != 5:
        raise ValueError("a history row does not have 7 fields")
    return HistoryRow(date.fromisoformat(day), _number(timestamp), *(_amount(a) for a in amounts))


def _restore(battery: GridBattery, data: Any) -> GridBattery:
    config = battery.config
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a version {STATE_VERSION} grid battery state")
    if data.get("startDate") != config.start_date.isoformat():
        raise ValueError(f"saved for start date {data.get('startDate')}, configured {config.start_date}")
    start = battery.start_key()
    if data.get("start", start) != start:  # a state of before the start was saved has none: its date is checked
        raise ValueError(f"saved for the start {data['start']}, configured {start}")
    for name, key in (("level_kwh", "level"), ("charged_kwh", "charged"), ("discharged_kwh", "discharged"),
                      ("overflow_kwh", "overflow"), ("beyond_kwh", "beyond"), ("forfeited_kwh", "forfeited")):
        setattr(battery, name, _amount(data[key]))
    last_reset = data.get("lastReset")
    battery.last_reset = date.fromisoformat(last_reset) if last_reset is not None else None
    battery.counter_resets = int(data.get("counterResets", 0))
    for counter, key in ((battery._import, "import"), (battery._export, "export")):
        value, at = data[key]
        if (value is None) != (at is None):
            raise ValueError(f"{key} counter is half set")
        counter.value = None if value is None else _amount(value)
        counter.at = None if at is None else _number(at)
    for item in data.get("history", []):
        row = _row_of(item)
        battery.history[row.day] = row
    battery.started = bool(data.get("started", bool(battery.history)))  # rows are written from the start on
    origin = data.get("origin")
    battery.origin = origin[:500] if isinstance(origin, str) else None
    battery.exact = bool(data.get("exact", True))
    slot = data.get("slot")
    if slot is not None:
        start, *amounts = slot
        battery.slot = ProfileSlot(_number(start), *(_amount(a) for a in amounts))
    if config.capacity_kwh > 0 and battery.level_kwh > config.capacity_kwh:
        battery.forfeited_kwh += battery.level_kwh - config.capacity_kwh
        battery.level_kwh = config.capacity_kwh
    return battery


def resolution_of(value: float) -> float:
    """The coarsest meter step (1, 0.1 or 0.01 kWh) `value` is a multiple of; 0 when it is none of them."""
    for step in RESOLUTIONS:
        if abs(value / step - round(value / step)) < 1e-6:
            return step
    return 0.0



def _number(value: Any) -> float:
    if not finite(value):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _amount(value: Any) -> float:
    if not finite(value) or not 0 <= value < METER_KWH_LIMIT:
        raise ValueError(f"{value!r} is not an energy in kWh")
    return float(value)


def _stamp(ts: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M")


def history_rows_csv(rows: list[HistoryRow], tz: tzinfo | None = None) -> str:
    """CSV of daily rows: the time of the day's last sample (local ISO), then kWh with 3 decimals."""
    lines = ["timestamp,level_kwh,charged_kwh,discharged_kwh,overflow_kwh,import_beyond_kwh"]
    for row in rows:
        stamp = datetime.fromtimestamp(row.timestamp, tz).isoformat(timespec="seconds")
        lines.append(f"{stamp},{row.level_kwh:.3f},{row.charged_kwh:.3f},{row.discharged_kwh:.3f},"
                     f"{row.overflow_kwh:.3f},{row.beyond_kwh:.3f}")
    return "\n".join(lines) + "\n"

