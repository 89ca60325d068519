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
import signal
from pathlib import Path

from ..battery.service import Aggregator
from ..bus.lib import LIBRARY
from ..config_data import DEFAULT_CONFIG_PATH, CheckResult, with_log_level
from ..features.grid_battery.runtime import GridBatteries
from ..state import StateStore
from .config_check import check_in_child, load
from .lean import needs_tls, tls_left_out

_LOG = logging.getLogger("aggregator")
FILE_CHECK_INTERVAL = 5.0


def last_good_path(path: str) -> str:
    return path + ".last-good"


def remember_good(path: str, result: CheckResult) -> None:
    """Keep the good config next to the file, atomically (the next bad edit falls back to it)."""
    StateStore(last_good_path(path)).save(result.document)


def _report(result: CheckResult, source: str) -> None:
    for warning in result.warnings:
        _LOG.warning("config %s: %s", source, warning)
    for error in result.errors:
        _LOG.error("config %s: %s", source, error)


async def run(path: str | None, bus_address: str | None = None, exit_delay: float = 10.0,
              log_level: str | None = None, first: tuple[CheckResult, str] | None = None) -> int:
    """`first`: the config already loaded (config_check.first_config), else it is loaded here."""
    config_path = path or DEFAULT_CONFIG_PATH
    result, source = first or load(path)
    _report(result, source)
    config = result.config
    if config is None:
        fallback = check_in_child(last_good_path(config_path))
        if fallback.config is None:
            _LOG.error("no usable config (and no last good one): exiting in %g s", exit_delay)
            await asyncio.sleep(exit_delay)
            return 1
        _LOG.error("running on the last good config %s until %s is fixed", last_good_path(config_path), source)
        config = fallback.config
    elif source != "defaults":
        remember_good(config_path, result)
    if log_level:  # the command line wins, and /LogLevel must show what is in force
        config = with_log_level(config, log_level)
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

    async def reloader() -> str:
        """Applies each new config; returns why the process must restart when it cannot apply one in place."""
        nonlocal aggregator, restarting
        while True:
            await reload.wait()
            reload.clear()
            result, source = await asyncio.to_thread(load, path)  # the check takes seconds on a GX: not on the loop
            _report(result, source)
            if result.config is None:
                _LOG.error("the new config is not applied: the running one is kept")
                continue
            if source != "defaults":
                remember_good(config_path, result)
            if tls_left_out() and needs_tls(result.config):
                return ("the new config turns on an MQTT link, whose TLS support this process left out to save "
                        "memory")
            if not aggregator.reconfigure(result.config):
                _LOG.warning("the new config renames our services: restarting them")
                restarting = True
                await aggregator.stop()
                aggregator = Aggregator(result.config, bus_address)
                try:
                    await aggregator.start()
                except Exception as exc:  # a name taken by another process, say: do not live on without a battery
                    _LOG.error("cannot restart with the new config: %s", exc)
                    return "our services could not be restarted"
                finally:
                    restarting = False
            await grid.apply(result.config, aggregator.settings)
            reconnected.set()

    reloading = loop.create_task(reloader())
    tasks = [loop.create_task(watch_file()), reloading]
    lost_task = loop.create_task(watch_connections())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({lost_task, stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    lost = lost_task.result() if lost_task.done() else None
    if lost is None and reloading.done():  # the new config needs a new process
        lost = reloading.result()
    if lost is not None:
        _LOG.error("%s; exiting so the supervisor restarts us", lost)
        stopped.cancel()
        aggregator.save()
        grid.save()
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
