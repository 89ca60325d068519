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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from typing import Any

from .energy import local_date

__all__ = ["GridBattery", "GridBatteryConfig", "HistoryRow", "history_rows_csv", "parse_month_day", "resolution_of",
           "reset_occurrence"]

METER_KWH_LIMIT = 1e9  # beyond this a meter counter is garbage
MARGIN = 1.5  # the grid connection's limit is firm, but samples arrive late
SLACK_KWH = 0.05  # the least slack: samples are read late
RESOLUTIONS = (1.0, 0.1, 0.01)  # kWh steps meters publish their counters in
JITTER_KWH = 0.05  # a step back this small is rounding, not a reset
HISTORY_DAYS = 1096
STATE_VERSION = 1


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
        if not _finite(grid_power_w):
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
        self._reset_if_due(today, now)
        imported = self._follow("import", self._import, forward_kwh, now, messages)
        exported = self._follow("export", self._export, reverse_kwh, now, messages)
        if today >= self.config.start_date and (imported or exported):
            self._apply(today, now, exported, imported)
        elif today >= self.config.start_date:
            self._row(today, now)
        return messages

    def _follow(self, label: str, counter: _Counter, value: Any, now: float, messages: list[str]) -> float:
        """The counter's accepted energy since its last sample (0 when there is nothing to count)."""
        if value is None:
            return 0.0  # missing: the next value's delta covers the gap, nothing is invented
        if not _finite(value) or not 0 <= value < METER_KWH_LIMIT:
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

    def _reset_if_due(self, today: date, now: float) -> None:
        month_day = self.config.reset_day
        if month_day is None or today < self.config.start_date:
            return
        recent = reset_occurrence(today.year, month_day)
        if recent > today:
            recent = reset_occurrence(today.year - 1, month_day)
        done = max(self.config.start_date, self.last_reset or self.config.start_date)
        if recent > done:
            self.forfeited_kwh += self.level_kwh
            self.level_kwh = 0.0
            self.last_reset = recent
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
        }

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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float:
    if not _finite(value):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _amount(value: Any) -> float:
    if not _finite(value) or not 0 <= value < METER_KWH_LIMIT:
        raise ValueError(f"{value!r} is not an energy in kWh")
    return float(value)


def history_rows_csv(rows: list[HistoryRow], tz: tzinfo | None = None) -> str:
    """CSV of daily rows: the time of the day's last sample (local ISO), then kWh with 3 decimals."""
    lines = ["timestamp,level_kwh,charged_kwh,discharged_kwh,overflow_kwh,import_beyond_kwh"]
    for row in rows:
        stamp = datetime.fromtimestamp(row.timestamp, tz).isoformat(timespec="seconds")
        lines.append(f"{stamp},{row.level_kwh:.3f},{row.charged_kwh:.3f},{row.discharged_kwh:.3f},"
                     f"{row.overflow_kwh:.3f},{row.beyond_kwh:.3f}")
    return "\n".join(lines) + "\n"

