"""The aggregated battery and the virtual batteries on D-Bus: the thin layer around membership and merge.

Members' signals only record changes and mark paths dirty; one flush per burst (once the messages read in one
wake-up are handled) computes the dirty aggregate paths and publishes them with one ItemsChanged per published service.
Its parts: members.py (the member table and the roles), liveness.py (quiet members probed, stale ones),
charge_limits.py (the bank's limits and DVCC), status.py (/Aggregator/Status, the counts and the member rows); the
side features (features/) are looped over.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..bus.beats import beat
from ..bus.lib import connect, soon
from ..bus.monitor import ServiceMonitor, WatchedService
from ..bus.service import VeService
from ..bus.settings import LocalSettings
from ..bus.watch import PathWatcher
from ..features.base import Feature
from .charge_limits import DVCC_PATHS, MEASUREMENT_LIMIT_INTERVAL, ChargeLimits
from .liveness import Liveness
from .identity import Duplicate
from .members import ConfiguredId, Members, no_configured_id
from .membership import AUXILIARY, CHAIN_PATH, MEMBER, PRIMARY, VIRTUAL_MEMBER
from .merge import LIMIT_PATHS, MODULES_OFFLINE, Merge, MergeOptions
from .publish import (BATTERY_PREFIX, add_battery_path, add_log_level_path, custom_name_setting, member_label,
                      publish_battery, unique_id)
from .rows import ONLINE, STALE
from .sanitize import check_values
from .status import BankStatus
from .virtual import TIME_TO_GO, VIRTUAL_PRODUCT_NAME, VirtualBattery, virtual_battery_specs

if TYPE_CHECKING:
    from ..config import Config

_LOG = logging.getLogger("aggregator")

AGGREGATE_PRODUCT_ID = 0xBA01  # ours; outside the ids DVCC applies vendor quirks to
VIRTUAL_PRODUCT_ID = 0xBA02
AGGREGATE_PRODUCT_NAME = "Battery Aggregator"
STATE_SAVE_INTERVAL = 60.0
# Seconds: how often a member's new measurements alone republish its /Batteries/<n> row (informational; on a GX
# each changed path is also a message of the MQTT bridge).
ROW_INTERVAL = 5.0
TASKS_INTERVAL = 2.0  # seconds: how often /Aggregator/Tasks is counted
# Seconds start-up waits for the members' first reads before publishing; one that answers later joins then.
START_READ_WAIT = 1.0


class Aggregator:
    """The aggregate service with `features` mounted on it (the host hands them over, with `configured_id`: the id
    the config gives the pack a member publishes, when it publishes no /Serial)."""

    def __init__(self, config: Config, bus_address: str | None = None,
                 clock: Callable[[], float] = time.monotonic, features: list[Feature] | None = None,
                 configured_id: ConfiguredId = no_configured_id) -> None:
        self.config = config
        self.bus_address = bus_address
        self.clock = clock
        self.name = config.serviceName
        self.merge = Merge(MergeOptions(capacity=config.capacity))
        self.virtuals = {name: VirtualBattery(name, entries) for name, entries in virtual_battery_specs(config).items()}
        self.monitor: ServiceMonitor | None = None
        self.settings: LocalSettings | None = None
        self.service: VeService | None = None
        self.watcher: PathWatcher | None = None
        self._flush_handle: Any = None  # a token: a flush is scheduled
        # While start() discovers the services already on the bus, no flush: a flush between two members'
        # first replies would start the limits from a part of the bank and ramp up from there.
        self._discovering = False
        # Rows whose member only has new measurements: informational, so they ride along at most every
        # ROW_INTERVAL instead of doubling the size of every signal on the hot path.
        self._lazy_rows: set[str] = set()
        self._rows_at = -ROW_INTERVAL
        self._tasks_at = -TASKS_INTERVAL
        self._have_voltage = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.table = Members(config, self.merge, self.virtuals, clock, self._schedule_flush,
                             forget_limits=lambda name: self.limits.leave(name), configured_id=configured_id,
                             pack_changed=self._pack_changed)
        self.members = self.table.members  # the same dict, for the hot path
        self.limits = ChargeLimits(config, self.table, self._schedule_flush)
        self.liveness = Liveness(self.table, self.limits, self._spawn, self._schedule_flush)
        self.status = BankStatus(self.name, self.table, self.limits, self.liveness)
        self.features: list[Feature] = list(features or ())
        self._readers = [f for f in self.features if f.reads]  # the hot path asks only these
        self._setting_readers: dict[tuple[str, str], list[Feature]] = {}
        for feature in self.features:
            for watched in feature.watches:
                self._setting_readers.setdefault(watched, []).append(feature)

    # ---- life cycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        bus = await connect(self.bus_address, coalesce=True)  # the members' signals arrive here
        self.settings = LocalSettings(bus)
        await self.settings.start()
        self.limits.load_state(self.config.stateDir, self.name)
        for feature in self.features:
            feature.load()
        # One watcher for every setting we and the features follow, as each watcher's handler sees every member
        # signal on this connection.
        self.watcher = PathWatcher(bus, self._on_setting_change)
        for service, path in [*DVCC_PATHS, *self._setting_readers]:
            self.watcher.watch(service, path)
        await self.watcher.start()
        self.service = await publish_battery(self.settings, self.name, AGGREGATE_PRODUCT_NAME, AGGREGATE_PRODUCT_ID,
                                             "Aggregate of 0 batteries", self.bus_address)
        self._add_aggregate_paths(self.service)
        for feature in self.features:  # their paths too before we register: a first GetItems sees them
            await feature.mount(self.service, bus, self)
        for vb in self.virtuals.values():
            vb.service = await publish_battery(self.settings, vb.name, VIRTUAL_PRODUCT_NAME, VIRTUAL_PRODUCT_ID,
                                               f"Virtual battery of {len(vb.refs)} services", self.bus_address)
            add_battery_path(vb.service, TIME_TO_GO, None)
            self.settings.watch(custom_name_setting(vb.name), lambda _p, _v, name=vb.name: self._relabel(name))
        self.monitor = self.table.monitor = ServiceMonitor(
            bus, [BATTERY_PREFIX], exclude=self._own_services(), on_added=self._on_added,
            on_removed=self._on_removed, on_changed=self._on_changed)
        self._discovering = True
        try:
            await self.monitor.start(wait=START_READ_WAIT)
        finally:
            self._discovering = False
        self.liveness.awaiting = set(self.monitor.pending)
        if self.liveness.awaiting:
            self._spawn(self.liveness.await_slow_members())
        # Our own virtual batteries are members like any battery (they stand for their members); they are
        # fed to the merge directly rather than through the bus, so they are not watched.
        self.table.reclassify()
        self._flush()
        for feature in self.features:
            await feature.start()
        self._spawn(self._register_when_ready())
        self._spawn(self._tick())

    def reconfigure(self, config: Config) -> bool:
        """Apply a new config in place; False when it renames published services (the caller restarts)."""
        if config.serviceName != self.name or set(config.virtualBatteries) != set(self.virtuals) \
                or config.stateDir != self.config.stateDir \
                or any(feature.needs_restart(self.config, config) for feature in self.features):
            return False
        self.config = config
        self.merge.options = dataclasses.replace(self.merge.options, capacity=config.capacity)
        self.merge.dirty.update(self.merge.paths)
        self.table.reconfigure(config)
        for feature in self.features:
            feature.reconfigure(config, self)
        if self.monitor is not None:
            self.monitor.exclude = self._own_services()
        self.limits.reconfigure(config)
        logging.getLogger().setLevel(config.logLevel)
        if self.service is not None and "/LogLevel" in self.service:
            self.service.set_value("/LogLevel", config.logLevel)
        self.table.reclassify()
        _LOG.info("configuration reloaded")
        return True

    def _own_services(self) -> set[str]:
        """The battery services this process publishes: the aggregate, its virtual batteries and the features'
        services (grid batteries). Never members, so not watched: their signals would only cost reads."""
        features = {p for feature in self.features for p in feature.publishes if not p.startswith("/")}
        return {self.name, *self.virtuals, *features}

    def connections(self) -> list[tuple[str, Any]]:
        """(what it is for, connection) of every bus connection this aggregate owns."""
        owned = [(f"the watcher of {self.name}", self.monitor.bus)] if self.monitor is not None else []
        owned += [(s.name, s.bus) for s in (self.service, *(vb.service for vb in self.virtuals.values()))
                  if s is not None]
        return owned + [owned_by for feature in self.features for owned_by in feature.connections()]

    async def _register_when_ready(self) -> None:
        """Register once a member has a voltage (so no 0 V is ever published), or after startupBatteryWait
        with invalid values rather than not at all."""
        wait = self.config.startupBatteryWait
        try:
            await asyncio.wait_for(self._have_voltage.wait(), wait)
        except asyncio.TimeoutError:
            _LOG.warning("no battery with a voltage after %g s: publishing %s with invalid values", wait, self.name)
        for vb in self.virtuals.values():
            if vb.service is not None and not vb.registered:
                await vb.service.register()
                vb.registered = True
        assert self.service is not None
        self._flush()
        await self.service.register()
        self.table.registered = True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for feature in reversed(self.features):
            await feature.stop()
        self.limits.save_state()
        if self.watcher is not None:
            await self.watcher.stop()
        for state in self.members.values():
            if state.drop is not None:
                state.drop.cancel()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.settings is not None:
            await self.settings.stop()
        for service in [self.service] + [vb.service for vb in self.virtuals.values()]:
            if service is not None:
                service.close()

    def save(self) -> None:
        """What the features keep, now (the host's exit that skips stop: the bus is gone)."""
        for feature in self.features:
            feature.save()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick(self) -> None:
        """Every second: members silent for staleAfter are asked whether they are alive (liveness.py); rising
        limits continue their ramp and the limits' due checks run; every feature ticks; learned state is saved
        now and then."""
        saved_at = self.clock()
        limits = self.limits
        while True:
            await beat(1.0)
            now = self.clock()
            if limits.control.ticking or limits.due:
                limits.dirty = True
                self._schedule_flush()
            if self._lazy_rows:
                self._schedule_flush()
            if now - saved_at >= STATE_SAVE_INTERVAL:
                saved_at = now
                limits.save_state()
            for feature in self.features:
                feature.tick()
            self.liveness.probe_quiet(now)
            if self.table.changed:
                self._schedule_flush()

    # ---- the published paths -------------------------------------------------------------------------

    def _add_aggregate_paths(self, service: VeService) -> None:
        for path in [*self.merge.paths, *sorted(LIMIT_PATHS)]:
            add_battery_path(service, path, None)
        service.add_path("/Serial", unique_id(self.name))  # stable, and distinct per service on a bus
        service.add_path("/Info/ChargeLimitation", None)
        self.status.add_paths(service)
        add_log_level_path(service, self.config.logLevel)

    # ---- monitor and settings events -------------------------------------------------------------------

    def _on_added(self, service: WatchedService) -> None:
        self.liveness.answered(service.name)
        self.table.appeared(service)

    def _on_removed(self, service: WatchedService) -> None:
        self.liveness.answered(service.name)
        self.table.vanished(service)

    def _on_changed(self, service: WatchedService, changes: dict[str, Any]) -> None:
        name = service.name
        table = self.table
        role = table.roles.roles.get(name)
        if role == MEMBER:
            clean, refused = check_values(changes)
            if refused:
                table.log_refused(name, refused)
            self.merge.update_member(name, clean)
            limits = self.limits
            limits.note_inputs(clean)
            if "/Dc/0/Current" in clean:
                reported = limits.reported
                reported.add(name)
                if len(reported) >= len(self.members) and reported.issuperset(self.members):
                    # Every member has reported since the last sample: learn from this complete sample in the
                    # next flush (within MEASUREMENT_LIMIT_INTERVAL of the last computation) rather than at the
                    # next tick, by when some member may have moved on again.
                    limits.due = True
            for feature in self._readers:
                if not feature.reads.isdisjoint(clean):
                    feature.on_member(name, self.merge.members[name].values, clean)
            if "/Serial" in clean:
                table.identify(name)
            if "/CustomName" in changes or "/ProductName" in changes:
                self.merge.set_label(name, member_label(service))
                table.dirty_rows.add(name)
            state = self.members.get(name)
            if state is not None:
                state.last_update = self.clock()
                if "/Dc/0/Current" in clean:
                    state.current_at = state.last_update
                if service.values.get("/Connected") != 0:
                    if state.state != ONLINE:
                        self.liveness.set_state(name, state, ONLINE, "it updates again")
                    else:
                        self._lazy_rows.add(name)
                elif state.state == ONLINE:
                    self.liveness.set_state(name, state, STALE, "it says it lost its device (/Connected 0)")
        elif role in (PRIMARY, AUXILIARY):
            self.merge.update_source(name, table.checked(name, changes))
        elif role == VIRTUAL_MEMBER:
            vb = self.virtuals.get(table.roles.virtual_of.get(name, ""))
            if vb is not None:
                vb.update_member(name, table.checked(name, changes))
        else:  # no part of the aggregate (an excluded service, another process's grid battery)
            role = None
        if "/CustomName" in changes or "/Serial" in changes or CHAIN_PATH in changes:
            table.reclassify()
        elif role is None:
            return
        self._schedule_flush()

    def _relabel(self, name: str) -> None:
        """Our virtual battery was renamed: its row and the cell ids that name it follow."""
        vb = self.virtuals.get(name)
        if vb is not None and name in self.members:
            self.merge.set_label(name, vb.label())
            self.table.dirty_rows.add(name)
            self._schedule_flush()

    def _pack_changed(self, name: str) -> None:
        for feature in self.features:
            feature.on_pack(name)

    def _on_setting_change(self, service: str, path: str, value: Any) -> None:
        readers = self._setting_readers.get((service, path))
        if readers:
            for feature in readers:
                feature.on_setting(service, path, value)
            return
        self.limits.on_dvcc(path, value)

    # ---- publishing ----------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._discovering:
            return  # start() flushes once every member found at start-up is known
        if self._flush_handle is None:
            self._flush_handle = soon(self._flush)  # after the member signals read in this wake-up

    def _flush(self) -> None:
        self._flush_handle = None
        service = self.service
        if service is None:
            return
        table, limits = self.table, self.limits
        for vb in self.virtuals.values():
            self._flush_virtual(vb)
        if table.changed:
            self.merge.set_offline(frozenset(n for n, s in self.members.items() if s.state != ONLINE))
        values = self.merge.compute()
        # The energy totals are ours (per identity, monotonic), not the members' sum: the energy feature sets them.
        values.pop("/History/ChargedEnergy", None)
        values.pop("/History/DischargedEnergy", None)
        if values.get("/Dc/0/Voltage") is not None:
            self._have_voltage.set()
        for path in (limits.alarms.keys() | limits.flags.keys()) & values.keys():
            values[path] = limits.limited_value(path)  # the members' alarm or flag, or ours while a limit is held
        if table.changed:
            table.changed = False
            limits.dirty = True
            self.status.membership_paths(values)
        if MODULES_OFFLINE in values and self.status.absent:
            values[MODULES_OFFLINE] = (values[MODULES_OFFLINE] or 0) + self.status.absent
        if limits.due and self.clock() - limits.at >= MEASUREMENT_LIMIT_INTERVAL:
            limits.dirty = True
        if limits.dirty:
            limits.dirty = False
            if limits.update(values, self.liveness.awaiting):
                self.status.publish(values)
        dirty_rows = table.dirty_rows
        measured: set[str] = set()  # rows whose member has new measurements: only the keys showing them
        if self._lazy_rows:
            now = self.clock()
            if now - self._rows_at >= ROW_INTERVAL:
                self._rows_at = now
                measured, self._lazy_rows = self._lazy_rows - dirty_rows, set()
        with service.batch():  # one ItemsChanged for the aggregate paths and the member rows together
            now = self.clock()
            if now - self._tasks_at >= TASKS_INTERVAL:
                # A diagnostic riding along (never a signal of its own): a leak of tasks shows as growth.
                self._tasks_at = now
                service.set_value("/Aggregator/Tasks", len(asyncio.all_tasks()))
            for name in dirty_rows:
                self.status.write_row(service, name)
            for name in measured:
                self.status.write_measurements(service, name)
            for name in limits.rows_changed - dirty_rows:
                limits.write_keys(service, name)
            dirty_rows.clear()
            limits.rows_changed.clear()
            for path in service.update_values(values):
                add_battery_path(service, path, values[path])

    def _flush_virtual(self, vb: VirtualBattery) -> None:
        if vb.service is None or not vb.dirty:
            return
        values = vb.compute()
        with vb.service.batch():
            for path, value in values.items():
                if path in vb.service:
                    vb.service.set_value(path, value)
                elif value is not None:
                    add_battery_path(vb.service, path, value)
        # Our virtual battery is a member of the aggregate, standing for its members.
        table = self.table
        if vb.name in self.members or vb.has_voltage() or vb.members:
            if vb.name not in self.members:
                table.enter_virtual(vb, {p: vb.service[p] for p in vb.service.paths()})
            else:
                clean = check_values(values)[0]
                self.merge.update_member(vb.name, clean)
                state = self.members[vb.name]
                state.last_update = self.clock()
                if "/Dc/0/Current" in clean:
                    state.current_at = state.last_update
                if state.state == STALE and self.liveness.connected(self.liveness.probe_targets(vb.name)):
                    self.liveness.set_state(vb.name, state, ONLINE, "its members update again")
                if "/Dc/0/Current" in clean:
                    self.limits.reported.add(vb.name)
                for feature in self._readers:
                    if not feature.reads.isdisjoint(clean):
                        feature.on_member(vb.name, self.merge.members[vb.name].values, clean)
                if "/Serial" in clean:
                    table.identify(vb.name)
                self.limits.note_inputs(clean)
            table.dirty_rows.add(vb.name)

    # ---- what the features read (features.base.Bank) --------------------------------------------------------

    def member_rows(self) -> list[tuple[str, int, bool]]:
        return [(name, state.slot, state.state == ONLINE) for name, state in self.members.items()]

    def member_values(self, name: str) -> dict[str, Any]:
        member = self.merge.members.get(name)
        return member.values if member is not None else {}

    def identity_of(self, name: str) -> str | None:
        return self.table.packs.identity_of(name)

    def duplicates(self) -> Mapping[str, Duplicate]:
        return self.table.packs.duplicates
