"""`battery-aggregator run`: the service process.

For now it loads the config and follows the member batteries on the bus (aggregation comes with issue #3).
A misbehaving member never stops it; losing the bus does (non-zero exit, so the supervisor restarts it).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from .bus.lib import LIBRARY, connect
from .bus.monitor import ServiceMonitor, WatchedService
from .config import Config

_LOG = logging.getLogger("aggregator")
BATTERY_PREFIX = "com.victronenergy.battery."


class Watcher:
    """Follows the member candidates: every battery service except our own and the excluded ones."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.monitor: ServiceMonitor | None = None

    async def start(self, bus: Any) -> None:
        exclude = {self.config.serviceName, *self.config.excludedServices, *self.config.virtualBatteries}
        self.monitor = ServiceMonitor(bus, [BATTERY_PREFIX], exclude=exclude, on_added=self._added,
                                      on_removed=self._removed, on_changed=self._changed)
        await self.monitor.start()
        _LOG.info("watching %d battery services", len(self.monitor.services))

    def _added(self, service: WatchedService) -> None:
        _LOG.info("member candidate %s: %s, SoC %s", service.name, service.get("/ProductName", "?"),
                  service.get("/Soc", "---"))

    def _removed(self, service: WatchedService) -> None:
        _LOG.info("member candidate %s left", service.name)

    def _changed(self, service: WatchedService, changes: dict[str, Any]) -> None:
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug("%s: %d values changed", service.name, len(changes))


async def run(config: Config, bus_address: str | None = None) -> int:
    try:
        bus = await connect(bus_address)
    except Exception as exc:
        _LOG.error("cannot connect to D-Bus: %s", exc)
        return 1
    _LOG.info("connected to D-Bus as %s (%s)", bus.unique_name, LIBRARY)
    watcher = Watcher(config)
    await watcher.start(bus)
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
    assert watcher.monitor is not None
    await watcher.monitor.stop()
    bus.disconnect()
    _LOG.info("stopped")
    return 0
