"""`battery-aggregator run`: the service process.

It publishes the aggregated battery and the virtual batteries of the config. A misbehaving member never
stops it; losing the bus does (exit status 2, so the supervisor restarts it with a fresh connection).
"""
from __future__ import annotations

import asyncio
import logging
import signal

from .aggregate import Aggregator
from .bus.lib import LIBRARY
from .config import Config

_LOG = logging.getLogger("aggregator")


async def run(config: Config, bus_address: str | None = None) -> int:
    aggregator = Aggregator(config, bus_address)
    try:
        await aggregator.start()
    except Exception as exc:  # no bus, or the name is taken by another process
        _LOG.error("cannot start: %s", exc)
        await aggregator.stop()
        return 1
    assert aggregator.monitor is not None
    bus = aggregator.monitor.bus
    _LOG.info("running on D-Bus as %s (%s)", bus.unique_name, LIBRARY)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    disconnected = loop.create_task(bus.wait_for_disconnect())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if disconnected.done():
        _LOG.error("lost the D-Bus connection; exiting so the supervisor restarts us")
        stopped.cancel()
        return 2
    disconnected.cancel()
    await aggregator.stop()
    _LOG.info("stopped")
    return 0
