"""The beats of the loop clock: whole multiples of a period. The service's tick, its features' cycles and the
moderated reading of the members' signals wait for them, so that their timers fall due together and run in one
wake-up of the process instead of one each (on a GX a wake-up costs more than the work of a tick)."""
from __future__ import annotations

import asyncio
import math

_EARLY = 1e-6  # in periods: a moment this close before a beat counts as on it (float rounding of now / period)


def next_beat(now: float, period: float) -> float:
    """The first whole multiple of `period` after `now` (one just ahead by rounding is skipped), to the
    microsecond: the beats of two periods that meet are the same float, so their timers fall due together."""
    return round((math.floor(now / period + _EARLY) + 1) * period, 6)


async def beat(period: float) -> None:
    """Sleep until the next beat of `period` on the loop's clock."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(next_beat(loop.time(), period) - loop.time())
