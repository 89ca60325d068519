"""`battery-aggregator run`: the service process.

It publishes the aggregated battery and the virtual batteries of the config. A misbehaving member never
stops it; losing the bus does (exit status 2, so the supervisor restarts it with a fresh connection).

Configuration: every config that loads is kept as `<config>.last-good`. At start-up a bad config is logged
and the last good one is used; with none the process waits `exit_delay` seconds and exits with status 1 (the
supervisor restarts it then, without spinning). SIGHUP, or a change of the file (checked every few seconds),
reloads it: a good config is applied without leaving the bus (unless it renames our services), a bad one is
logged and the running one kept. The aggregate mounts every feature (the grid batteries too, services of their
own); the host watches every connection they own.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..battery.service import Aggregator
from ..bus.beats import beat
from ..bus.lib import LIBRARY
from ..config_data import DEFAULT_CONFIG_PATH, CheckResult, with_log_level
from ..features import standard_features
from ..features.energy.runtime import configured_id
from ..state import StateStore
from .config_check import check_in_child, load
from .lean import needs_tls, tls_left_out

if TYPE_CHECKING:
    from ..config import Config

_LOG = logging.getLogger("aggregator")
FILE_CHECK_INTERVAL = 5.0
# Seconds between looks at which connections we own (a feature may open one after a reload); a connection that
# ends wakes the watch at once.
CONNECTION_RECHECK = 10.0


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


def first_config(path: str | None, log_level: str | None,
                 first: tuple[CheckResult, str] | None = None) -> Any:
    """The config to start with: the file's (`first`: already loaded by config_check.load_first), else its last
    good one; None when neither loads."""
    config_path = path or DEFAULT_CONFIG_PATH
    result, source = first or load(path)
    _report(result, source)
    config = result.config
    if config is None:
        fallback = check_in_child(last_good_path(config_path))
        if fallback.config is None:
            return None
        _LOG.error("running on the last good config %s until %s is fixed", last_good_path(config_path), source)
        config = fallback.config
    elif source != "defaults":
        remember_good(config_path, result)
    if log_level:  # the command line wins, and /LogLevel must show what is in force
        config = with_log_level(config, log_level)
    logging.getLogger().setLevel(config.logLevel)
    return config


async def run(path: str | None, bus_address: str | None = None, exit_delay: float = 10.0,
              log_level: str | None = None, first: tuple[CheckResult, str] | None = None) -> int:
    config = first_config(path, log_level, first)
    if config is None:
        _LOG.error("no usable config (and no last good one): exiting in %g s", exit_delay)
        await asyncio.sleep(exit_delay)
        return 1
    host = Host(path, bus_address)
    if not await host.start(config):
        await asyncio.sleep(exit_delay)
        return 1
    return await host.serve()


class Host:
    """The running service: its aggregate (which mounts every feature), the reloads of its config, and the watch
    of every connection it owns."""

    def __init__(self, path: str | None, bus_address: str | None) -> None:
        self.path = path
        self.config_path = path or DEFAULT_CONFIG_PATH
        self.bus_address = bus_address
        self.aggregator: Aggregator | None = None
        self.restarting = False  # the old connections close on purpose
        self.stopping = asyncio.Event()
        self.reload = asyncio.Event()
        self.reconnected = asyncio.Event()  # a reload changed which connections we own

    def _aggregator(self, config: Config) -> Aggregator:
        """The aggregate with every feature mounted; a pack without a /Serial is known by the id the energy
        section gives it (energy.members.<ref>.id)."""
        return Aggregator(config, self.bus_address, features=standard_features(config, self.bus_address),
                          configured_id=configured_id)

    async def start(self, config: Config) -> bool:
        self.aggregator = aggregator = self._aggregator(config)
        try:
            await aggregator.start()
        except Exception as exc:  # no bus, or the name is taken by another process
            _LOG.error("cannot start: %s", exc)
            await aggregator.stop()
            return False
        assert aggregator.monitor is not None
        _LOG.info("running on D-Bus as %s (%s)", aggregator.monitor.bus.unique_name, LIBRARY)
        return True

    async def serve(self) -> int:
        """Until a signal stops it (0) or a connection is lost or the services cannot be restarted (2)."""
        assert self.aggregator is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)
        reloading = loop.create_task(self._reloader())
        tasks = [loop.create_task(self._watch_file()), reloading]
        lost_task = loop.create_task(self._watch_connections())
        stopped = loop.create_task(self.stopping.wait())
        await asyncio.wait({lost_task, stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        lost = lost_task.result() if lost_task.done() else None
        if lost is None and reloading.done() and not reloading.cancelled():  # a new config needs a new process
            lost = reloading.result()
        if lost is not None:
            _LOG.error("%s; exiting so the supervisor restarts us", lost)
            stopped.cancel()
            self.aggregator.save()
            return 2
        lost_task.cancel()
        await self.aggregator.stop()
        _LOG.info("stopped")
        return 0

    async def _watch_file(self) -> None:
        last = _mtime(self.config_path)
        while True:
            await beat(FILE_CHECK_INTERVAL)  # on the tick's beats: no wake-up of its own
            now = _mtime(self.config_path)
            if now != last:
                last = now
                self.reload.set()

    async def _watch_connections(self) -> str:
        """Every connection we own (the aggregate's, its virtual batteries', its features'), not just the members'
        watcher: one dropped by the bus (a message too large, say) left the process running with no battery.
        Waits on the connections' ends rather than polling them: no wake-up while all is well."""
        loop = asyncio.get_running_loop()
        # One waiter per connection for its whole life: cancelling a task that awaits a connection's end would
        # cancel that connection's own future, and every later wait on it would return at once.
        ends: dict[int, tuple[Any, asyncio.Task[Any]]] = {}  # id -> (the connection, kept alive here, its waiter)
        while True:
            self.reconnected.clear()
            if self.restarting or self.aggregator is None:  # the old connections close on purpose
                await self.reconnected.wait()
                continue
            owned = self.aggregator.connections()
            for name, connection in owned:
                if not connection.connected:
                    return f"lost the D-Bus connection of {name}"
            ends = {id(c): _waiter(ends.get(id(c)), c, loop) for _name, c in owned}
            again = loop.create_task(self.reconnected.wait())
            try:
                await asyncio.wait([task for _c, task in ends.values()] + [again], timeout=CONNECTION_RECHECK,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                again.cancel()

    async def _reloader(self) -> str:
        """Applies each new config; returns why the process must restart when it cannot apply one in place."""
        while True:
            await self.reload.wait()
            self.reload.clear()
            result, source = await asyncio.to_thread(load, self.path)  # seconds on a GX: not on the loop
            _report(result, source)
            if result.config is None:
                _LOG.error("the new config is not applied: the running one is kept")
                continue
            if source != "defaults":
                remember_good(self.config_path, result)
            if tls_left_out() and needs_tls(result.config):
                return "the new config turns on an MQTT link, whose TLS support this process left out to save memory"
            assert self.aggregator is not None
            if not self.aggregator.reconfigure(result.config) and not await self._restart(result.config):
                return "our services could not be restarted"
            self.reconnected.set()

    async def _restart(self, config: Config) -> bool:
        _LOG.warning("the new config renames our services: restarting them")
        assert self.aggregator is not None
        self.restarting = True
        await self.aggregator.stop()
        self.aggregator = self._aggregator(config)
        try:
            await self.aggregator.start()
        except Exception as exc:  # a name taken by another process, say: do not live on without a battery
            _LOG.error("cannot restart with the new config: %s", exc)
            return False
        finally:
            self.restarting = False
            self.reconnected.set()
        return True


def _waiter(known: tuple[Any, asyncio.Task[Any]] | None, connection: Any,
            loop: asyncio.AbstractEventLoop) -> tuple[Any, asyncio.Task[Any]]:
    if known is not None and known[0] is connection:
        return known
    return connection, loop.create_task(_ended(connection))


async def _ended(connection: Any) -> None:
    """When the connection ends, however it ends (the watch then names it)."""
    try:
        await connection.wait_for_disconnect()
    except Exception:  # how it ended is not ours to raise
        pass


def _mtime(path: str) -> float | None:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return None
