"""The user's time zone, as the GX keeps it: com.victronenergy.settings /Settings/System/TimeZone.

On a GX, Linux runs in UTC and the zone the user chose lives in localsettings as an Olson name
("Europe/Amsterdam"). Dates (daily energy buckets, CSV rows, a grid battery's reset day) must follow it.
Pure: `zone_named` and `TimeZoneSetting` turn the setting's values into zones (a PathWatcher the caller runs
feeds them); `local_date` and `local_midnight` are the local calendar.
"""
from __future__ import annotations

import logging
from datetime import date, datetime, time, tzinfo
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


__all__ = ["SETTINGS_SERVICE", "TIME_ZONE_PATH", "TimeZoneSetting", "local_date", "local_midnight", "zone_named"]

SETTINGS_SERVICE = "com.victronenergy.settings"
TIME_ZONE_PATH = "/Settings/System/TimeZone"

_LOG = logging.getLogger(__name__)


def zone_named(name: Any) -> tuple[tzinfo | None, str | None]:
    """The zone of an Olson name; (None, why) when there is none (None = the process's own zone)."""
    if not isinstance(name, str) or not name.strip():
        return None, f"{TIME_ZONE_PATH} is {name!r}, not a time zone name"
    try:
        return ZoneInfo(name.strip()), None
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # ValueError: a name like "../x" that is no key at all; OSError: unreadable tzdata
        return None, f"{TIME_ZONE_PATH} {name!r} is not a known time zone ({type(exc).__name__})"


class TimeZoneSetting:
    """Calls `on_zone(zone, name)` with the user's zone for every value of the setting given to `changed`;
    (None, None) means the process's zone. A setting that disappears (localsettings restarting) keeps the zone
    in use. The caller watches TIME_ZONE_PATH of SETTINGS_SERVICE on a PathWatcher it runs anyway."""

    def __init__(self, on_zone: Callable[[tzinfo | None, str | None], None]) -> None:
        self.on_zone = on_zone
        self.name: str | None = None  # the setting in use; None = the process's zone
        self._warned: set[str] = set()  # bad names already logged: once each, not at every re-read

    def changed(self, value: Any) -> None:
        if value is None:
            return  # localsettings left or the setting is not there (yet): keep what we use
        zone, reason = zone_named(value)
        if zone is None:
            key = repr(value)
            if key not in self._warned:
                self._warned.add(key)
                _LOG.warning("%s; dates follow the process's time zone", reason)
            name = None
        else:
            name = str(value).strip()
            _LOG.info("dates follow the time zone %s", name)
        self.name = name
        self.on_zone(zone, name)


# ---- local calendar --------------------------------------------------------------------------------------

def local_date(ts: float, tz: tzinfo | None = None) -> date:
    return datetime.fromtimestamp(ts, tz).date()


def local_midnight(day: date, tz: tzinfo | None = None) -> float:
    """Epoch seconds of the local midnight that starts `day`."""
    return datetime.combine(day, time(), tzinfo=tz).timestamp()
