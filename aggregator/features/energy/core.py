"""Energy totals per battery identity (charged and discharged kWh) that stay right when things go wrong.

Pure: values in, values out. Time is passed in (epoch seconds); local dates come from `tz` (None = the
machine's zone). Nothing here logs: every sample that is not taken at face value gives a message the caller
logs.

A member's counters are followed, never trusted blindly:
- "total" counters run for the pack's lifetime; "daily" ones restart every day at local midnight.
- A counter that goes backwards (BMS reset, pack replaced, firmware update) is a restart: the aggregate's
  totals go on from where they were. The new value counts as energy since the restart only when it is
  physically possible in the time since the last sample; otherwise (a replaced pack with its own lifetime
  total) the counter is re-anchored and nothing is counted.
- A forward jump larger than the member's current limit allows in the elapsed time (a daily value
  published instead of a running total, 4e15 Wh...) is rejected and the counter re-anchored at the new value,
  so the next good sample counts only real energy.
- Members without counters get V x I integrated (trapezoid); a gap longer than `max_gap` is bridged without
  energy (nothing is invented for a time nobody measured).
"""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from datetime import date, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping

from ...local_time import local_date, local_midnight
from ...numbers import finite

if TYPE_CHECKING:
    from .report import ExternalReport

__all__ = [
    "CounterKind", "EnergyLedger", "ReportConflict", "ReportError", "ReportSeries", "average_level",
    "beyond_capacity", "capacity_weighted_level", "energy_csv", "report_regression", "same_totals", "split_by_day",
    "total_energy", "trapezoid_split",
]

CounterKind = Literal["total", "daily"]
COUNTER_KINDS: tuple[str, ...] = ("total", "daily")

KWH_LIMIT = 1e7  # a counter at or beyond this is garbage (BMSes have been seen to publish 4e15 Wh)
DEFAULT_MAX_POWER_KW = 60.0  # bound for a member that publishes no current limit (1000 A at 60 V)
MIN_MAX_POWER_KW = 1.0  # a limit of 0 A (BMS forbids a direction) must not make every sample "impossible"
BOUND_VOLTAGE = 60.0  # V used for the bound when the member publishes no voltage (48 V class, fully charged)
MARGIN = 2.0  # current limits are soft and counters are read late: allow twice the limit's energy
SLACK_KWH = 0.2  # counters are published with 0.1 kWh resolution
DAILY_SKEW = 3600.0  # a BMS's clock may be off by up to this much around midnight
DEFAULT_MAX_GAP = 300.0  # seconds: a longer gap between V x I samples is bridged without energy
HISTORY_DAYS = 1096  # three years of daily buckets
STATE_VERSION = 1
REPORT_JITTER_KWH = 0.05  # a reported total this much below the last is rounding (reporters send kWh to 0.1)
ROLLED_BACK_KEPT = 4  # rolled-back reports looked at to tell a second battery from typos
EFFICIENCY_FLOOR = 0.8  # no battery stores less of what it is charged with, or gives less of what it stored
REANCHORED = "rejected, counting from the new value on"  # a refused report says instead that nothing moved


def split_by_day(t0: float, t1: float, energy: float, tz: tzinfo | None = None) -> list[tuple[date, float]]:
    """`energy` spread over [t0, t1] in proportion to the time in each local day (a gap of several days is
    shared out, never put on one day twice or lost)."""
    first, last = local_date(t0, tz), local_date(t1, tz)
    if t1 <= t0 or first == last:
        return [(last, energy)]
    out: list[tuple[date, float]] = []
    start = t0
    day = first
    while day < last:
        end = local_midnight(day + timedelta(days=1), tz)
        out.append((day, energy * (end - start) / (t1 - t0)))
        start = end
        day += timedelta(days=1)
    out.append((last, energy * (t1 - start) / (t1 - t0)))
    return out



# ---- the ledger ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Anchor:
    """The raw counter value the next delta is taken from, and when it was read."""

    value: float | None = None
    at: float | None = None


@dataclass
class EnergyLedger:
    """Monotonic charged/discharged totals of one battery identity, with daily buckets.

    Feed it with `add()`; read `charged_kwh`, `discharged_kwh` and `days` (ISO date -> [charged, discharged]).
    """

    identity: str
    kind: CounterKind = "total"
    tz: tzinfo | None = None
    max_gap: float = DEFAULT_MAX_GAP
    history_days: int = HISTORY_DAYS
    charged_kwh: float = 0.0
    discharged_kwh: float = 0.0
    uses_counters: bool = False  # once a member has published a counter, V x I is no longer integrated
    restarts: int = 0  # counter restarts seen (total counters; daily restarts are expected)
    days: dict[str, list[float]] = field(default_factory=dict)
    _charged: _Anchor = field(default_factory=_Anchor, init=False, repr=False)
    _discharged: _Anchor = field(default_factory=_Anchor, init=False, repr=False)
    _power_at: float | None = field(default=None, init=False, repr=False)  # the last V x I sample: when...
    _power_kw: float = field(default=0.0, init=False, repr=False)  # ...and kW (+ = charging)
    # The local day of the last V x I sample: (its first second, the next day's, in zone, the day). Samples come
    # a few a second, each would otherwise work out its local date twice.
    _day: tuple[float, float, tzinfo | None, date] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in COUNTER_KINDS:
            raise ValueError(f"counter kind {self.kind!r} is not one of {', '.join(COUNTER_KINDS)}")

    # ---- samples ---------------------------------------------------------------------------------------

    def add(self, now: float, charged_kwh: float | None = None, discharged_kwh: float | None = None,
            voltage: float | None = None, current: float | None = None,
            max_current_a: float | None = None, max_power_kw: float | None = None) -> list[str]:
        """Take one sample of the member. Returns a message for every value not taken at face value
        (rejected jumps and garbage, counter restarts); empty when all is well. `max_power_kw`, when given,
        is the battery's largest power instead of the one its current limit and voltage make."""
        messages: list[str] = []
        max_kw = max_power_kw if max_power_kw is not None else _max_power_kw(voltage, max_current_a)
        for label, anchor, value in (("charged", self._charged, charged_kwh),
                                     ("discharged", self._discharged, discharged_kwh)):
            if value is None:
                continue  # a missing counter loses nothing: the next value's delta covers the gap
            message = self._follow_counter(label, anchor, value, now, max_kw)
            if message:
                messages.append(message)
        if not self.uses_counters:
            message = self._integrate(now, voltage, current, max_kw)
            if message:
                messages.append(message)
        return messages

    def _follow_counter(self, label: str, anchor: _Anchor, value: Any, now: float, max_kw: float) -> str | None:
        if not finite(value) or not 0 <= value < KWH_LIMIT:
            return (f"{self.identity}: {label} counter {value!r} kWh is not a plausible value (0 to {KWH_LIMIT:g}); "
                    "ignored")
        value = float(value)
        self.uses_counters = True
        last, at = anchor.value, anchor.at
        if last is None or at is None:
            anchor.value, anchor.at = value, now
            return None
        dt = max(0.0, now - at)
        if self.kind == "daily" and self._restarted_unseen(at, now):
            # The gap covers midnight (with the BMS's clock skew): the counter restarted in it, so its value
            # is today's energy. The rest of the days in the gap was never observed and cannot be counted.
            midnight = local_midnight(local_date(now, self.tz), self.tz)
            anchor.value, anchor.at = value, now
            if value > _bound_kwh(max_kw, now - midnight):
                return self._impossible(label, value, now - midnight, max_kw, "since midnight")
            self._credit(label, [(local_date(now, self.tz), value)])
            return None
        delta = value - last
        if delta >= 0:
            anchor.value, anchor.at = value, now
            if delta > _bound_kwh(max_kw, dt):
                return self._impossible(label, delta, dt, max_kw, f"(counter {last:g} -> {value:g} kWh)")
            self._credit(label, split_by_day(at, now, delta, self.tz))
            return None
        if -delta <= max(0.05, 1e-3 * last):
            return None  # jitter: keep the higher anchor, or the way back up would be counted twice
        anchor.value, anchor.at = value, now
        if self.kind == "total":
            self.restarts += 1
        if value <= _bound_kwh(max_kw, dt):
            if self.kind == "daily":
                # The daily restart itself: what it counted since belongs to the day it restarted for.
                self._credit(label, [(local_date(now, self.tz), value)])
                return None
            self._credit(label, split_by_day(at, now, value, self.tz))  # energy since the restart
            return f"{self.identity}: {label} counter went back from {last:g} to {value:g} kWh (reset); totals go on"
        return (f"{self.identity}: {label} counter went back from {last:g} to {value:g} kWh (reset or replaced "
                f"pack); counting from {value:g} kWh on")

    def _restarted_unseen(self, at: float, now: float) -> bool:
        today = local_date(now, self.tz)
        if local_date(at, self.tz) == today:
            return False
        midnight = local_midnight(today, self.tz)
        return at < midnight - DAILY_SKEW and now > midnight + DAILY_SKEW

    def _impossible(self, label: str, energy: float, seconds: float, max_kw: float, what: str) -> str:
        return (f"{self.identity}: {label} +{energy:g} kWh in {seconds:.0f} s {what} is more than {max_kw:g} kW "
                f"allows; {REANCHORED}")

    def _integrate(self, now: float, voltage: Any, current: Any, max_kw: float) -> str | None:
        if not (finite(voltage) and finite(current)):
            return None  # nothing measured: the gap rule bridges it
        power = voltage * current / 1000.0
        if abs(power) > max_kw * MARGIN or abs(voltage) > 1000:
            return f"{self.identity}: {voltage:g} V x {current:g} A is not plausible; sample ignored"
        last_at, last_kw = self._power_at, self._power_kw
        self._power_at, self._power_kw = now, power
        if last_at is None or not 0 < now - last_at <= self.max_gap:
            return None
        charged, discharged = trapezoid_split(last_kw, power, now - last_at)
        day = self._one_day(last_at, now)
        if charged:
            self._credit("charged", [(day, charged)] if day else split_by_day(last_at, now, charged, self.tz))
        if discharged:
            self._credit("discharged", [(day, discharged)] if day else split_by_day(last_at, now, discharged,
                                                                                    self.tz))
        return None

    def _one_day(self, t0: float, t1: float) -> date | None:
        """The local day [t0, t1] lies in, or None when it spans midnight (split_by_day shares it out)."""
        span = self._day
        if span is None or span[2] is not self.tz or not span[0] <= t1 < span[1]:
            day = local_date(t1, self.tz)
            span = self._day = (local_midnight(day, self.tz), local_midnight(day + timedelta(days=1), self.tz),
                                self.tz, day)
        return span[3] if span[0] <= t0 else None

    def _credit(self, label: str, parts: list[tuple[date, float]]) -> None:
        index = 0 if label == "charged" else 1
        for day, energy in parts:
            if energy <= 0:
                continue
            if index == 0:
                self.charged_kwh += energy
            else:
                self.discharged_kwh += energy
            self.days.setdefault(day.isoformat(), [0.0, 0.0])[index] += energy
        self._prune()

    def _prune(self) -> None:
        if len(self.days) > self.history_days:
            for key in sorted(self.days)[: len(self.days) - self.history_days]:
                del self.days[key]

    def counters(self) -> tuple[float | None, float | None]:
        """The raw (charged, discharged) counter values the next sample is compared with."""
        return self._charged.value, self._discharged.value

    def seed(self, now: float, charged_kwh: float, discharged_kwh: float) -> None:
        """The first report of an external battery: its running totals are its lifetime energy, and count.

        A member on D-Bus is counted from when the aggregate first saw it; a reporter (a Homey flow, a
        script) sends lifetime totals and expects to see them. With total counters that energy is on no day
        (when it moved is not known); a daily counter's first value is today's."""
        for label, anchor, value in (("charged", self._charged, charged_kwh),
                                     ("discharged", self._discharged, discharged_kwh)):
            anchor.value, anchor.at = float(value), now
            if self.kind == "daily":
                self._credit(label, [(local_date(now, self.tz), float(value))])
            elif label == "charged":
                self.charged_kwh += float(value)
            else:
                self.discharged_kwh += float(value)
        self.uses_counters = True

    def copy(self) -> EnergyLedger:
        """An independent copy: a report is tried on it and only kept when it is taken whole."""
        return copy.deepcopy(self)

    def undo_record(self, before: EnergyLedger) -> dict[str, Any]:
        """What `undo()` needs to set this ledger back to `before` (a copy taken before the last report): the
        totals, anchors and the few days that changed. Small, so it is saved with the external battery."""
        changed = {day: before.days.get(day) for day in set(self.days) | set(before.days)
                   if self.days.get(day) != before.days.get(day)}
        return {"charged": before.charged_kwh, "discharged": before.discharged_kwh, "restarts": before.restarts,
                "anchors": {"charged": [before._charged.value, before._charged.at],
                            "discharged": [before._discharged.value, before._discharged.at]},
                "days": {day: None if pair is None else list(pair) for day, pair in sorted(changed.items())}}

    def undo(self, record: Any) -> EnergyLedger:
        """A copy of this ledger as it was before the report `record` (from undo_record) was taken;
        ValueError (or TypeError, KeyError...) when the record is not usable."""
        ledger = self.copy()
        ledger.charged_kwh = _amount(record["charged"])
        ledger.discharged_kwh = _amount(record["discharged"])
        ledger.restarts = int(record["restarts"])
        _restore_anchors(ledger, record["anchors"])
        for day, pair in record["days"].items():
            date.fromisoformat(day)
            if pair is None:
                ledger.days.pop(day, None)
            else:
                ledger.days[day] = [_amount(pair[0]), _amount(pair[1])]
        return ledger

    # ---- persistence -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "identity": self.identity, "kind": self.kind,
            "charged": self.charged_kwh, "discharged": self.discharged_kwh, "usesCounters": self.uses_counters,
            "restarts": self.restarts,
            "anchors": {"charged": [self._charged.value, self._charged.at],
                        "discharged": [self._discharged.value, self._discharged.at]},
            "power": [self._power_at, self._power_kw],
            "days": {k: list(v) for k, v in sorted(self.days.items())},
        }

    @classmethod
    def from_dict(cls, data: Any, identity: str, kind: CounterKind = "total", tz: tzinfo | None = None,
                  **options: Any) -> tuple[EnergyLedger, str | None]:
        """The ledger saved by to_dict(); a fresh one and the reason when `data` is not usable."""
        fresh = cls(identity, kind, tz, **options)
        if not data:
            return fresh, None
        try:
            return _restore(fresh, data), None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            reason = f"{identity}: saved energy state not usable ({exc}); starting at 0"
            return cls(identity, kind, tz, **options), reason


def _restore(ledger: EnergyLedger, data: Any) -> EnergyLedger:
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a version {STATE_VERSION} energy state")
    if data.get("kind") != ledger.kind:
        raise ValueError(f"saved for {data.get('kind')!r} counters, now {ledger.kind!r}")
    ledger.charged_kwh = _amount(data["charged"])
    ledger.discharged_kwh = _amount(data["discharged"])
    ledger.uses_counters = bool(data.get("usesCounters", False))
    ledger.restarts = int(data.get("restarts", 0))
    _restore_anchors(ledger, data["anchors"])
    power_at, power_kw = data["power"]
    ledger._power_at = None if power_at is None else _time(power_at)
    ledger._power_kw = float(power_kw) if finite(power_kw) else 0.0
    days = data.get("days", {})
    if not isinstance(days, dict):
        raise ValueError("days is not an object")
    for key, pair in days.items():
        date.fromisoformat(key)
        charged, discharged = pair
        ledger.days[key] = [_amount(charged), _amount(discharged)]
    ledger._prune()
    return ledger


def _restore_anchors(ledger: EnergyLedger, anchors: Any) -> None:
    for label, anchor in (("charged", ledger._charged), ("discharged", ledger._discharged)):
        value, at = anchors[label]
        if (value is None) != (at is None):
            raise ValueError(f"{label} anchor is half set")
        anchor.value = None if value is None else _amount(value)
        anchor.at = None if at is None else _time(at)


def _amount(value: Any) -> float:
    if not finite(value) or not 0 <= value < KWH_LIMIT:
        raise ValueError(f"{value!r} is not an energy in kWh")
    return float(value)


def _time(value: Any) -> float:
    if not finite(value):
        raise ValueError(f"{value!r} is not a time")
    return float(value)


def _max_power_kw(voltage: Any, max_current_a: Any) -> float:
    if not finite(max_current_a) or max_current_a < 0:
        return DEFAULT_MAX_POWER_KW
    volts = abs(voltage) if finite(voltage) and 0 < abs(voltage) <= 1000 else BOUND_VOLTAGE
    return max(MIN_MAX_POWER_KW, max_current_a * volts / 1000.0)


def _bound_kwh(max_kw: float, seconds: float) -> float:
    """The most energy a member can move in `seconds`."""
    return max_kw * MARGIN * max(0.0, seconds) / 3600.0 + SLACK_KWH


def trapezoid_split(p0_kw: float, p1_kw: float, seconds: float) -> tuple[float, float]:
    """kWh charged and discharged between two power samples joined by a straight line (a line that crosses
    zero is split at the crossing, so charge and discharge do not cancel)."""
    hours = seconds / 3600.0
    if p0_kw >= 0 and p1_kw >= 0:
        return (p0_kw + p1_kw) / 2 * hours, 0.0
    if p0_kw <= 0 and p1_kw <= 0:
        return 0.0, -(p0_kw + p1_kw) / 2 * hours
    crossing = p0_kw / (p0_kw - p1_kw)  # fraction of the interval before the line crosses zero
    first = p0_kw / 2 * hours * crossing
    second = p1_kw / 2 * hours * (1 - crossing)
    return (first, -second) if p0_kw > 0 else (second, -first)


# ---- the aggregate -------------------------------------------------------------------------------------

def total_energy(ledgers: Iterable[EnergyLedger]) -> tuple[float, float]:
    """(charged, discharged) kWh over every identity: each counted once, whatever its service is now."""
    charged = discharged = 0.0
    for ledger in ledgers:
        charged += ledger.charged_kwh
        discharged += ledger.discharged_kwh
    return charged, discharged


def _level_pairs(pairs: Iterable[tuple[Any, Any]]) -> list[tuple[float, Any]]:
    return [(float(soc), cap) for soc, cap in pairs if finite(soc) and 0 <= soc <= 100]


def average_level(pairs: Iterable[tuple[Any, Any]]) -> float | None:
    """Plain mean of the valid SoCs of (soc, capacity) pairs; None without any."""
    socs = [soc for soc, _ in _level_pairs(pairs)]
    return sum(socs) / len(socs) if socs else None


def capacity_weighted_level(pairs: Iterable[tuple[Any, Any]]) -> float | None:
    """SoC weighted by capacity: what fraction of the bank's Ah is stored. Pairs without a valid capacity
    are left out; None when no pair has both (the caller may fall back to average_level)."""
    weighted = [(soc, float(cap)) for soc, cap in _level_pairs(pairs) if finite(cap) and cap > 0]
    total = sum(cap for _, cap in weighted)
    return sum(soc * cap for soc, cap in weighted) / total if total else None


def energy_csv(ledgers: Iterable[EnergyLedger]) -> str:
    """`energy --csv`: one row per identity and day, kWh with 3 decimals, oldest first."""
    lines = ["identity,date,charged_kwh,discharged_kwh"]
    for ledger in sorted(ledgers, key=lambda item: item.identity):
        name = _csv_field(ledger.identity)
        for day, (charged, discharged) in sorted(ledger.days.items()):
            lines.append(f"{name},{day},{charged:.3f},{discharged:.3f}")
    return "\n".join(lines) + "\n"


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


# ---- external (non-D-Bus) members --------------------------------------------------------------------




class ReportError(ValueError):
    """A `report` the service cannot take; `messages` name each field, its value and what is allowed."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("; ".join(messages))
        self.messages = messages


class ReportConflict(ReportError):
    """Reports under one id that come from two batteries (two series of totals, alternating)."""


@dataclass(slots=True)
class ReportSeries:
    """What one external id was refused, to tell a typo from two batteries reporting under that id.

    A typo is refused once and the next correct report is taken. Two batteries under one id send two series
    of running totals in turn: one is taken, the other refused again and again, each refused report
    continuing the last refused one (a plausible increase since it) while accepted reports come between. A
    real jump beyond the bounds (a reporter that was away for long) is refused once and confirmed by the next
    report that agrees with it."""

    refused: tuple[float, float, float] | None = None  # charged, discharged kWh and when (epoch s)
    accepted_since: bool = False
    held: bool = False  # the refused report was beyond the bounds (not below the last one)
    # the last reports rolled back (totals and time), oldest first
    rolled_back: deque[tuple[float, float, float]] = field(default_factory=lambda: deque(maxlen=ROLLED_BACK_KEPT))

    def accepted(self) -> None:
        self.accepted_since = True

    def refuse(self, identity: str, charged: float, discharged: float, now: float,
               last: tuple[float | None, float | None], max_kw: float = DEFAULT_MAX_POWER_KW,
               held: bool = False) -> tuple[Literal["refused", "conflict", "confirmed"], str | None]:
        """Note a refused report. ("conflict", message) when it continues the series refused before while
        other reports were taken between them: two batteries under one id. ("confirmed", None) when it and the
        report refused just before, both beyond the bounds (`held`), agree with each other with nothing taken
        between: the battery's own counters said it twice, so the jump was real. Else ("refused", None)."""
        previous, alternated, was_held = self.refused, self.accepted_since, self.held
        self.refused, self.accepted_since, self.held = (charged, discharged, now), False, held
        if previous is None:
            return "refused", None
        if not _continues(previous, (charged, discharged), now, max_kw):
            return "refused", None
        if alternated:
            return "conflict", _two_batteries(identity, last[0], charged)
        if held and was_held:
            self.refused, self.held = None, False
            return "confirmed", None
        return "refused", None

    def roll_back(self, identity: str, last: tuple[float | None, float | None], last_at: float | None,
                  charged: float, max_kw: float = DEFAULT_MAX_POWER_KW) -> str | None:
        """The last report (`last` totals, taken at `last_at`) is about to be rolled back: the report after it
        continues the one before it. The conflict message instead when it continues two reports rolled back
        lately (a chain of three): a series that keeps being rolled back is a second battery, while typos
        now and then form no series."""
        charged_before, discharged_before = last
        if charged_before is None or discharged_before is None or last_at is None:
            return None
        rolled = (float(charged_before), float(discharged_before), float(last_at))
        earlier = list(self.rolled_back)
        self.rolled_back.append(rolled)
        chained = any(_continues(first, second[:2], second[2], max_kw) and
                      _continues(second, rolled[:2], rolled[2], max_kw)
                      for i, first in enumerate(earlier) for second in earlier[i + 1:])
        return _two_batteries(identity, last[0], charged) if chained else None


def _continues(previous: tuple[float, float, float], totals: tuple[float, float], now: float, max_kw: float) -> bool:
    """Whether `totals` at `now` can follow `previous` (totals and time) in one battery of `max_kw`."""
    bound = _bound_kwh(max_kw, now - previous[2])
    return all(-REPORT_JITTER_KWH <= new - old <= bound for new, old in zip(totals, previous[:2]))


def _two_batteries(identity: str, taken: float | None, other: float) -> str:
    shown = "?" if taken is None else f"{taken:g}"
    return (f"id: {identity!r} gets the totals of two batteries: the reports alternate between two series of "
            f"running totals (charged {shown} kWh and {other:g} kWh); give each battery an id of its own "
            f"(`battery-aggregator report --remove {identity}` starts this id again)")


def report_regression(ledger: EnergyLedger, report: ExternalReport) -> str | None:
    """Why a report cannot be taken as running totals: a "total" counter below the last report is a delta (the
    energy since the last report) or a restart the reporter did not announce (`reset`); None when fine."""
    if ledger.kind != "total" or report.reset:
        return None
    for label, last, value in zip(("charged", "discharged"), ledger.counters(), (report.charged, report.discharged)):
        if last is not None and value < last - REPORT_JITTER_KWH:
            return (f"{label}: {value:g} kWh is below the last reported total {last:g} kWh; report running totals "
                    "(the battery's lifetime kWh), not the energy since the last report; after a real counter "
                    "restart report with reset")
    return None


def beyond_capacity(ledger: EnergyLedger, report: ExternalReport, capacity_kwh: float | None) -> str | None:
    """Why a report's increase cannot have happened in a battery of `capacity_kwh`; None when it can.

    Whatever the time between two reports, what went in and what came out differ by at most what the battery
    holds, give or take its losses: discharged - charged <= capacity, and charged x EFFICIENCY_FLOOR -
    discharged / EFFICIENCY_FLOOR <= capacity (a battery stores at least that share of what it is charged
    with). Running totals ("total" counters) only: a daily counter restarts."""
    if capacity_kwh is None or ledger.kind != "total" or report.reset:
        return None
    last_charged, last_discharged = ledger.counters()
    if last_charged is None or last_discharged is None:
        return None
    charged, discharged = report.charged - last_charged, report.discharged - last_discharged
    if charged < 0 or discharged < 0:
        return None  # a step back: report_regression's case
    stored = charged * EFFICIENCY_FLOOR - discharged / EFFICIENCY_FLOOR
    if stored <= capacity_kwh + SLACK_KWH and discharged - charged <= capacity_kwh + SLACK_KWH:
        return None
    return (f"{ledger.identity}: charged +{charged:g} kWh and discharged +{discharged:g} kWh since the last report "
            f"(charged {last_charged:g}, discharged {last_discharged:g} kWh) cannot fit in a battery of "
            f"{capacity_kwh:g} kWh (energy.members.{ledger.identity}.capacityKwh); {REANCHORED}")


def same_totals(totals: Mapping[str, tuple[float | None, float | None]]) -> list[tuple[str, ...]]:
    """Ids whose last reported totals are the same (to the Wh, and not 0): most likely one battery reported
    under two ids, so counted twice. Groups of ids, each sorted, in order."""
    groups: dict[tuple[float, float], list[str]] = {}
    for identity, (charged, discharged) in totals.items():
        if charged is None or discharged is None or charged + discharged <= 0:
            continue
        groups.setdefault((round(charged, 3), round(discharged, 3)), []).append(identity)
    return sorted(tuple(sorted(ids)) for ids in groups.values() if len(ids) > 1)


