"""The beats of the loop clock: whole multiples of a period. The service's tick, its features' cycles and the
moderated reading of the members' signals wait for them, so that their timers fall due together and run in one
wake-up of the process instead of one each (on a GX a wake-up costs more than the work of a tick)."""
from __future__ import annotations

import asyncio
import math

_EARLY = 1e-6  # in periods: a moment this close before a beat counts as on it (float rounding of now / period)
# Seconds between reads of the members' signals while they keep coming (wire.py), and the grid every longer period's
# beats fall on: a change waits at most this long to be published (Victron's system calculator reads once a second),
# and each beat is one wake-up of the process.
READ_BEAT = 0.225


def next_beat(now: float, period: float) -> float:
    """The first whole multiple of `period` after `now` (one just ahead by rounding is skipped), to the
    microsecond; for a period longer than READ_BEAT, the first read beat from that multiple on (so a 1 s tick
    comes after 0.9 or 1.125 s). The beats that meet are the same float, so their timers fall due together."""
    at = (math.floor(now / period + _EARLY) + 1) * period
    if period > READ_BEAT:
        at = math.ceil(at / READ_BEAT - _EARLY) * READ_BEAT
    return round(at, 6)


async def beat(period: float) -> None:
    """Sleep until the next beat of `period` on the loop's clock."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(next_beat(loop.time(), period) - loop.time())
