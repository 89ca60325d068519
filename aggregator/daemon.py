"""`battery-aggregator run`: the service process.

It publishes the aggregated battery and the virtual batteries of the config. A misbehaving member never
stops it; losing the bus does (exit status 2, so the supervisor restarts it with a fresh connection).

Configuration: every config that loads is kept as `<config>.last-good`. At start-up a bad config is logged
and the last good one is used; with none the process waits `exit_delay` seconds and exits with status 1 (the
supervisor restarts it then, without spinning). SIGHUP, or a change of the file (checked every few seconds),
reloads it: a good config is applied without leaving the bus (unless it renames our services), a bad one is
logged and the running one kept.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from .aggregate import Aggregator
from .bus.settings import LocalSettings
from .bus.lib import LIBRARY, connect
from .config import DEFAULT_CONFIG_PATH, CheckResult, Config, check_config_file
from .grid_battery_service import GridBatterySettings, GridBatteryService
from .state import StateStore

_LOG = logging.getLogger("aggregator")
FILE_CHECK_INTERVAL = 5.0


def last_good_path(path: str) -> str:
    return path + ".last-good"


def load(path: str | None) -> tuple[CheckResult, str]:
    """The config to run with, and where it came from. A missing default file means all defaults."""
    path = path or DEFAULT_CONFIG_PATH
    if not os.path.exists(path) and path == DEFAULT_CONFIG_PATH:
        return CheckResult(Config(), [], []), "defaults"
    return check_config_file(path), path


def remember_good(path: str, config: Config) -> None:
    """Keep the good config next to the file, atomically (the next bad edit falls back to it)."""
    StateStore(last_good_path(path)).save(config.model_dump(mode="json", exclude_unset=True))


def grid_state_dir(state_dir: str, settings: GridBatterySettings) -> str:
    """One directory per grid battery (its state file has a fixed name), named after its service."""
    return os.path.join(state_dir, "grid", settings.serviceName.rsplit(".", 1)[-1])


class GridBatteries:
    """The config's `gridBatteries`: one GridBatteryService each, on a connection of its own."""

    def __init__(self, bus_address: str | None) -> None:
        self.bus_address = bus_address
        self.running: list[GridBatteryService] = []
        self.settings: tuple[list[GridBatterySettings], str] = ([], "")

    async def apply(self, config: Config, settings: LocalSettings | None = None) -> None:
        """Run the configured grid batteries; `settings` (the aggregate's localsettings client) reserves their
        device instances and keeps their /CustomName like the aggregate's own."""
        wanted = (list(config.gridBatteries), config.stateDir)
        if wanted == self.settings:
            return
        await self.stop()
        self.settings = wanted
        for grid_settings in config.gridBatteries:
            service = None
            try:
                service = GridBatteryService(await connect(self.bus_address), grid_settings,
                                             grid_state_dir(config.stateDir, grid_settings), local_settings=settings)
                await service.start()
            except Exception as exc:  # the name is taken, say: the aggregate goes on without it
                _LOG.error("cannot start the grid battery %s: %s", grid_settings.serviceName, exc)
                if service is not None:
                    await service.stop()
                    service.bus.disconnect()
                continue
            self.running.append(service)
            _LOG.info("grid battery %s follows the meter %s", grid_settings.serviceName, grid_settings.meter)

    async def stop(self) -> None:
        for service in self.running:
            await service.stop()  # closes its connection too
        self.running = []
        self.settings = ([], "")


def _report(result: CheckResult, source: str) -> None:
    for warning in result.warnings:
        _LOG.warning("config %s: %s", source, warning)
    for error in result.errors:
        _LOG.error("config %s: %s", source, error)


async def run(path: str | None, bus_address: str | None = None, exit_delay: float = 10.0,
              log_level: str | None = None) -> int:
    config_path = path or DEFAULT_CONFIG_PATH
    result, source = load(path)
    _report(result, source)
    config = result.config
    if config is None:
        fallback = check_config_file(last_good_path(config_path))
        if fallback.config is None:
            _LOG.error("no usable config (and no last good one): exiting in %g s", exit_delay)
            await asyncio.sleep(exit_delay)
            return 1
        _LOG.error("running on the last good config %s until %s is fixed", last_good_path(config_path), source)
        config = fallback.config
    elif source != "defaults":
        remember_good(config_path, config)
    if log_level:  # the command line wins, and /LogLevel must show what is in force
        config = config.model_copy(update={"logLevel": log_level})
    logging.getLogger().setLevel(config.logLevel)

    aggregator = Aggregator(config, bus_address)
    try:
        await aggregator.start()
    except Exception as exc:  # no bus, or the name is taken by another process
        _LOG.error("cannot start: %s", exc)
        await aggregator.stop()
        await asyncio.sleep(exit_delay)
        return 1
    assert aggregator.monitor is not None
    bus = aggregator.monitor.bus
    grid = GridBatteries(bus_address)
    await grid.apply(config, aggregator.settings)
    _LOG.info("running on D-Bus as %s (%s)", bus.unique_name, LIBRARY)

    stop = asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)

    async def watch_file() -> None:
        last = _mtime(config_path)
        while True:
            await asyncio.sleep(FILE_CHECK_INTERVAL)
            now = _mtime(config_path)
            if now != last:
                last = now
                reload.set()

    restarting = False
    reconnected = asyncio.Event()  # set after a reload changed which connections we own

    async def watch_connections() -> str:
        """Every connection we own, not just the members' watcher: the aggregate's or a virtual battery's
        connection dropped by the bus (a message too large, say) left the process running with no battery.
        Waits on the connections' ends rather than polling them: no wake-up while all is well."""
        while True:
            reconnected.clear()
            if restarting:  # the old connections close on purpose
                await reconnected.wait()
                continue
            owned = [*aggregator.connections(), *((s.settings.serviceName, s.bus) for s in grid.running)]
            for name, connection in owned:
                if not connection.connected:
                    return f"lost the D-Bus connection of {name}"
            ends = [loop.create_task(connection.wait_for_disconnect()) for _name, connection in owned]
            again = loop.create_task(reconnected.wait())
            try:
                await asyncio.wait([*ends, again], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (*ends, again):
                    task.cancel()
                for task in ends:  # how it ended is not ours to raise: the check above names the connection
                    if task.done() and not task.cancelled():
                        task.exception()

    async def reloader() -> None:
        nonlocal aggregator, restarting
        while True:
            await reload.wait()
            reload.clear()
            result, source = load(path)
            _report(result, source)
            if result.config is None:
                _LOG.error("the new config is not applied: the running one is kept")
                continue
            if source != "defaults":
                remember_good(config_path, result.config)
            if not aggregator.reconfigure(result.config):
                _LOG.warning("the new config renames our services: restarting them")
                restarting = True
                await aggregator.stop()
                aggregator = Aggregator(result.config, bus_address)
                try:
                    await aggregator.start()
                except Exception as exc:  # a name taken by another process, say: do not live on without a battery
                    _LOG.error("cannot restart with the new config: %s", exc)
                    return
                finally:
                    restarting = False
            await grid.apply(result.config, aggregator.settings)
            reconnected.set()

    tasks = [loop.create_task(watch_file()), loop.create_task(reloader())]
    lost_task = loop.create_task(watch_connections())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({lost_task, stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    lost = lost_task.result() if lost_task.done() else None
    if lost is None and not stopped.done():  # the reloader ended: it failed to restart our services
        lost = "our services could not be restarted"
    if lost is not None:
        _LOG.error("%s; exiting so the supervisor restarts us", lost)
        stopped.cancel()
        aggregator.energy.save()
        for service in grid.running:
            service.save()
        return 2
    lost_task.cancel()
    await grid.stop()
    await aggregator.stop()
    _LOG.info("stopped")
    return 0


def _mtime(path: str) -> float | None:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return None
