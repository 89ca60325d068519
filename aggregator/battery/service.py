"""The aggregated battery and the virtual batteries on D-Bus: the thin layer around membership and merge.

Members' signals only record changes and mark paths dirty; one flush per burst (once the messages read in one
wake-up are handled) computes the dirty aggregate paths and publishes them with one ItemsChanged per published service.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..bus.lib import beat, connect, soon
from ..bus.monitor import ServiceMonitor, WatchedService
from ..bus.service import VeService
from ..bus.settings import SETTINGS_SERVICE, LocalSettings
from ..bus.watch import PathWatcher
from ..features import standard_features
from ..features.base import Feature
from ..features.energy.feature import EnergyFeature
from ..features.grid_battery.runtime import GRID_BATTERY_PRODUCT_ID
from ..limits.controller import LIMIT_INPUTS, ChargeControl, MemberInput, Note, one_pack
from ..limits.formulas import DvccLimits
from .membership import (AUXILIARY, CHAIN_PATH, MEMBER, PRIMARY, VIRTUAL_MEMBER, Roles, ServiceInfo, assign_roles,
                         resolve)
from .merge import LIMIT_PATHS, MODULES_OFFLINE, Merge, MergeOptions
from .publish import (BATTERY_PREFIX, add_battery_path, custom_name_setting, json_list_text, member_label,
                      publish_battery, unique_id)
from .rows import DUPLICATE, LOST, ONLINE, STALE, write_limit_keys, write_measurement_keys, write_row
from .sanitize import check_value, check_values
from .virtual import TIME_TO_GO, VIRTUAL_PRODUCT_NAME, VirtualBattery, role_config, virtual_battery_specs

if TYPE_CHECKING:
    from ..config import Config

_LOG = logging.getLogger("aggregator")

AGGREGATE_PRODUCT_ID = 0xBA01  # ours; outside the ids DVCC applies vendor quirks to
VIRTUAL_PRODUCT_ID = 0xBA02
AGGREGATE_PRODUCT_NAME = "Battery Aggregator"
SYSTEM_SERVICE = "com.victronenergy.system"
DVCC_PATHS = ((SETTINGS_SERVICE, "/Settings/SystemSetup/MaxChargeCurrent"),
              (SETTINGS_SERVICE, "/Settings/SystemSetup/MaxChargeVoltage"),
              (SYSTEM_SERVICE, "/Control/Dvcc"))
STATE_SAVE_INTERVAL = 60.0
MEASUREMENTS = frozenset({"/Dc/0/Current", "/Dc/0/Voltage"})
# Seconds: how often current/voltage changes alone recompute the limits. Victron's system calculator reads them
# once a second, so a second computation within its second would never be seen by DVCC.
MEASUREMENT_LIMIT_INTERVAL = 1.0
ROW_INTERVAL = 1.0  # seconds: how often a member's new measurements alone republish its /Batteries/<n> row
BAD_VALUE_LOG_INTERVAL = 600.0  # one log line per member and path in this time
PROBE_TIMEOUT = 5.0  # seconds a quiet member has to answer a probe (at most staleAfter)
# Seconds after which a member's current that has not changed counts as read anew for a complete sample: Victron
# services signal only changes, and drivers read their BMS at least this often, so it is still its current.
STEADY_CURRENT = 5.0
# Seconds start-up waits for the members' first reads before publishing; one that answers later joins then.
START_READ_WAIT = 1.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

@dataclass(slots=True)
class MemberState:
    slot: int
    state: str = ONLINE
    last_update: float = 0.0  # its last signal, or its last answer to a probe
    drop: asyncio.TimerHandle | None = None
    probed_at: float = -1e9  # when a probe last started
    probing: bool = False
    current_at: float = -1e9  # when its current last changed


class Aggregator:
    def __init__(self, config: Config, bus_address: str | None = None,
                 clock: Callable[[], float] = time.monotonic, features: list[Feature] | None = None) -> None:
        self.config = config
        self.bus_address = bus_address
        self.clock = clock
        self.name = config.serviceName
        self.merge = Merge(MergeOptions(capacity=config.capacity))
        self.role_config = role_config(config)
        self.roles = Roles({}, {}, [], [], [])
        self.members: dict[str, MemberState] = {}
        self.virtuals = {name: VirtualBattery(name, entries) for name, entries in virtual_battery_specs(config).items()}
        self.monitor: ServiceMonitor | None = None
        self.settings: LocalSettings | None = None
        self.service: VeService | None = None
        self.registered = False
        self._flush_handle: Any = None  # a token: a flush is scheduled
        self._dirty_rows: set[str] = set()
        # While start() discovers the services already on the bus, no flush: a flush between two members'
        # first replies would start the limits from a part of the bank and ramp up from there.
        self._discovering = False
        # Rows whose member only has new measurements: informational, so they ride along at most every
        # ROW_INTERVAL instead of doubling the size of every signal on the hot path.
        self._lazy_rows: set[str] = set()
        self._rows_at = -ROW_INTERVAL
        self._tasks_at = -ROW_INTERVAL
        self._membership_changed = True
        self._bad_value_logged: dict[tuple[str, str], float] = {}
        self._warned_refs: set[str] = set()
        self._have_voltage = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._membership_reasons: list[str] = []
        self._status_key: tuple[str, ...] | None = None  # what the status is about, without its live values
        self._limit_notes: tuple[Note, ...] = ()
        self._limit_alarms: dict[str, int] = {}  # ours, at least what is published (path -> level)
        self._limit_flags: dict[str, int] = {}  # ours, at most what is published (path -> 0)
        self._absent = 0  # expected batteries that are not on the bus at all
        self.control = ChargeControl(config)
        self.dvcc = DvccLimits()
        self.watcher: PathWatcher | None = None
        self._limits_dirty = True
        self._limit_rows: dict[str, dict[str, Any]] = {}
        self._limit_rows_changed: set[str] = set()
        self._duplicates: frozenset[str] = frozenset()  # members publishing a battery another member stands for
        # Members whose current arrived since the last complete sample (or that stayed steady: STEADY_CURRENT).
        self._reported: set[str] = set()
        self._limits_at = -1e9  # when the limits were last computed
        self._limits_due = False  # measurements changed since: the next tick recomputes
        self._store: Any = None
        # The energy feature is the aggregate's own: its tracker also says which service stands for a pack seen
        # twice (see _sync_duplicates). The others come from the host (the standard set by default).
        self.energy_feature = EnergyFeature(config)
        self.energy = self.energy_feature.tracker
        self.features: list[Feature] = [self.energy_feature,
                                        *(standard_features(config) if features is None else features)]
        self._readers = [f for f in self.features if f.reads]  # the hot path asks only these
        self._setting_readers: dict[tuple[str, str], list[Feature]] = {}
        for feature in self.features:
            for watched in feature.watches:
                self._setting_readers.setdefault(watched, []).append(feature)
        # Batteries on the bus at start that have not answered their first read yet: each may be a member whose
        # limits are unknown, so the CCL stays 0 until they answer or their read times out.
        self._awaiting: set[str] = set()

    # ---- life cycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        bus = await connect(self.bus_address, coalesce=True)  # the members' signals arrive here
        self.settings = LocalSettings(bus)
        await self.settings.start()
        self._load_state()
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
        self.monitor = ServiceMonitor(bus, [BATTERY_PREFIX], exclude={self.name, *self.virtuals},
                                      on_added=self._on_added, on_removed=self._on_removed,
                                      on_changed=self._on_changed)
        self._discovering = True
        try:
            await self.monitor.start(wait=START_READ_WAIT)
        finally:
            self._discovering = False
        self._awaiting = set(self.monitor.pending)
        if self._awaiting:
            self._spawn(self._await_slow_members())
        # Our own virtual batteries are members like any battery (they stand for their members); they are
        # fed to the merge directly rather than through the bus, so they are not watched.
        self._reclassify()
        self._flush()
        for feature in self.features:
            await feature.start()
        self._spawn(self._register_when_ready())
        self._spawn(self._watch_staleness())

    def reconfigure(self, config: Config) -> bool:
        """Apply a new config in place; False when it renames published services (the caller restarts)."""
        if config.serviceName != self.name or set(config.virtualBatteries) != set(self.virtuals) \
                or config.stateDir != self.config.stateDir \
                or any(feature.needs_restart(self.config, config) for feature in self.features):
            return False
        self.config = config
        self.merge.options = dataclasses.replace(self.merge.options, capacity=config.capacity)
        self.merge.dirty.update(self.merge.paths)
        self.role_config = role_config(config)
        for name, entries in virtual_battery_specs(config).items():
            vb = self.virtuals[name]
            fresh = VirtualBattery(name, entries)
            vb.refs, vb.hooks = fresh.refs, fresh.hooks
            vb.dirty.update(p for _, values, _ in vb.members.values() for p in values)
            for member in list(vb.members):  # re-enter with the new order and paths
                vb.remove_member(member)
                self.roles.roles.pop(member, None)
        for feature in self.features:
            feature.reconfigure(config, self)
        old_control, self.control = self.control, ChargeControl(config)
        self.control.adopt(old_control)  # learned shares, held limits and the ramps go on: no jump on reload
        logging.getLogger().setLevel(config.logLevel)
        if self.service is not None and "/LogLevel" in self.service:
            self.service.set_value("/LogLevel", config.logLevel)
        self._limits_dirty = True
        self._reclassify()
        _LOG.info("configuration reloaded")
        return True

    def connections(self) -> list[tuple[str, Any]]:
        """(what it is for, connection) of every bus connection this aggregate owns."""
        owned = [(f"the watcher of {self.name}", self.monitor.bus)] if self.monitor is not None else []
        owned += [(s.name, s.bus) for s in (self.service, *(vb.service for vb in self.virtuals.values()))
                  if s is not None]
        return owned

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
        self.registered = True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for feature in reversed(self.features):
            await feature.stop()
        self._save_state()
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the published paths -------------------------------------------------------------------------

    def _add_aggregate_paths(self, service: VeService) -> None:
        for path in [*self.merge.paths, *sorted(LIMIT_PATHS)]:
            add_battery_path(service, path, None)
        service.add_path("/Serial", unique_id(self.name))  # stable, and distinct per service on a bus
        service.add_path("/Info/ChargeLimitation", None)
        service.add_path("/System/NrOfBatteries", 0)
        service.add_path("/System/BatteriesParallel", 0)
        service.add_path("/Alarms/MissingBatteries", 0 if self.config.expectedBatteries else None)
        service.add_path("/Aggregator/Status", "starting")
        service.add_path("/Aggregator/Unresolved", json_list_text([]))
        service.add_path("/Aggregator/Tasks", None)
        service.add_path(CHAIN_PATH, [self.name])
        service.add_path("/LogLevel", self.config.logLevel, writeable=True, value_types=(str,),
                         on_change=self._on_log_level, description="one of " + ", ".join(LOG_LEVELS))

    def _on_log_level(self, _path: str, value: Any) -> bool:
        if value not in LOG_LEVELS:
            return False
        logging.getLogger().setLevel(value)
        _LOG.warning("log level set to %s over D-Bus", value)
        return True

    # ---- monitor events ------------------------------------------------------------------------------

    async def _await_slow_members(self) -> None:
        assert self.monitor is not None
        _LOG.info("publishing before %s answered: charging waits for them", ", ".join(sorted(self._awaiting)))
        await self.monitor.settle(self.monitor.call_timeout + 0.5)
        late = self._awaiting & set(self.monitor.pending)
        if late:
            _LOG.warning("%s did not answer at start: going on without them (they join when they answer)",
                         ", ".join(sorted(late)))
        self._answered(*self._awaiting)

    def _answered(self, *names: str) -> None:
        if self._awaiting & set(names):
            self._awaiting.difference_update(names)
            self._limits_dirty = self._membership_changed = True
            self._schedule_flush()

    def _on_added(self, service: WatchedService) -> None:
        self._answered(service.name)
        state = self.members.get(service.name)
        if state is not None and state.drop is not None:  # back within reconnectTimeout
            state.drop.cancel()
            state.drop = None
            _LOG.info("member %s is back", service.name)
            self.roles.roles.pop(service.name, None)  # re-enter through classification with fresh values
            self.merge.remove_member(service.name)
        self._reclassify()

    def _on_removed(self, service: WatchedService) -> None:
        self._answered(service.name)
        role = self.roles.roles.get(service.name)
        if role == MEMBER and service.name in self.members:
            state = self.members[service.name]
            state.state = STALE
            self._dirty_rows.add(service.name)
            timeout = self.config.reconnectTimeout
            _LOG.warning("member %s left the bus; keeping its last values for %g s", service.name, timeout)
            state.drop = asyncio.get_running_loop().call_later(timeout, self._drop, service.name)
            self._membership_changed = True
            self._schedule_flush()
            return
        self._reclassify()

    def _drop(self, name: str) -> None:
        state = self.members.get(name)
        if state is None:
            return
        _LOG.warning("member %s did not come back: dropped from the aggregate", name)
        state.drop = None
        state.state = LOST
        self.merge.remove_member(name)
        gone = self.energy.members.get(name)
        self._forget_identity(name)
        if gone is not None and any(m.identity == gone.identity for m in self.energy.members.values()):
            self.control.leave(name)  # another service still publishes this pack: its limits are known
        self.roles.roles.pop(name, None)
        self._dirty_rows.add(name)
        self._membership_changed = True
        self._schedule_flush()

    def _on_changed(self, service: WatchedService, changes: dict[str, Any]) -> None:
        name = service.name
        role = self.roles.roles.get(name)
        if role == MEMBER:
            clean, refused = check_values(changes)
            if refused:
                self._log_refused(name, refused)
            self.merge.update_member(name, clean)
            self._note_limit_inputs(clean)
            if "/Dc/0/Current" in clean:
                self._reported.add(name)
                if len(self._reported) >= len(self.members) and self._reported.issuperset(self.members):
                    # Every member has reported since the last sample: learn from this complete sample in the
                    # next flush (within MEASUREMENT_LIMIT_INTERVAL of the last computation) rather than at the
                    # next tick, by when some member may have moved on again.
                    self._limits_due = True
            for feature in self._readers:
                if not feature.reads.isdisjoint(clean):
                    feature.on_member(name, self.merge.members[name].values, clean)
            if "/Serial" in clean:
                self._identify(name)
            if "/CustomName" in changes or "/ProductName" in changes:
                self.merge.set_label(name, member_label(service))
                self._dirty_rows.add(name)
            state = self.members.get(name)
            if state is not None:
                state.last_update = self.clock()
                if "/Dc/0/Current" in clean:
                    state.current_at = state.last_update
                if service.values.get("/Connected") != 0:
                    if state.state != ONLINE:
                        self._set_state(name, state, ONLINE, "it updates again")
                    else:
                        self._lazy_rows.add(name)
                elif state.state == ONLINE:
                    self._set_state(name, state, STALE, "it says it lost its device (/Connected 0)")
        elif role in (PRIMARY, AUXILIARY):
            self.merge.update_source(name, self._checked(name, changes))
        elif role == VIRTUAL_MEMBER:
            vb = self.virtuals.get(self.roles.virtual_of.get(name, ""))
            if vb is not None:
                vb.update_member(name, self._checked(name, changes))
        if "/CustomName" in changes or "/Serial" in changes or CHAIN_PATH in changes:
            self._reclassify()
        self._schedule_flush()

    def _checked(self, name: str, values: dict[str, Any]) -> dict[str, Any]:
        """A service's values with the refused ones (absurd, mistyped, too large) as None, and logged."""
        clean, refused = check_values(values)
        if refused:
            self._log_refused(name, refused)
        return clean

    def _relabel(self, name: str) -> None:
        """Our virtual battery was renamed: its row and the cell ids that name it follow."""
        vb = self.virtuals.get(name)
        if vb is not None and name in self.members:
            self.merge.set_label(name, vb.label())
            self._dirty_rows.add(name)
            self._schedule_flush()

    def _log_refused(self, name: str, refused: dict[str, str]) -> None:
        now = self.clock()
        for path, reason in refused.items():
            key = (name, path)
            if now - self._bad_value_logged.get(key, -BAD_VALUE_LOG_INTERVAL) >= BAD_VALUE_LOG_INTERVAL:
                self._bad_value_logged[key] = now
                _LOG.warning("ignoring %s of %s: %s", path, name, reason)

    # ---- roles -----------------------------------------------------------------------------------------

    def _reclassify(self) -> None:
        assert self.monitor is not None
        # Grid batteries (ours, or another process's) are not batteries of this bank: they never join it.
        infos = [ServiceInfo.of(s.name, s.values) for s in self.monitor.services.values()
                 if s.values.get("/ProductId") != GRID_BATTERY_PRODUCT_ID]
        new = assign_roles(self.role_config, infos)
        old = self.roles
        for name in set(old.roles) | set(new.roles):
            before, after = old.roles.get(name), new.roles.get(name)
            vb_before, vb_after = old.virtual_of.get(name), new.virtual_of.get(name)
            if before == after and vb_before == vb_after:
                continue
            if name not in new.roles and before == MEMBER and name in self.members \
                    and self.members[name].drop is not None:
                new.roles[name] = MEMBER  # vanished but within reconnectTimeout: still a (stale) member
                continue
            self._leave(name, before, vb_before)
            self._enter(name, after, vb_after, infos)
        self.roles = new
        self._report_references(new)
        for role, refs in ((PRIMARY, self.role_config.primary), (AUXILIARY, self.role_config.auxiliary)):
            self.merge.order_sources(role, [n for ref in refs for n in resolve(ref, infos)])
        self._membership_changed = True
        self._schedule_flush()

    def _leave(self, name: str, role: str | None, virtual: str | None) -> None:
        if role == MEMBER:
            self.merge.remove_member(name)
            self._forget_identity(name)
            self.control.leave(name)  # taken out on purpose: its limit no longer holds the bank's
            state = self.members.pop(name, None)
            if state is not None and state.drop is not None:
                state.drop.cancel()
            self._dirty_rows.add(name)
        elif role in (PRIMARY, AUXILIARY):
            self.merge.set_source(role, name, None, None)
        elif role == VIRTUAL_MEMBER and virtual in self.virtuals:
            self.virtuals[virtual].remove_member(name)

    def _enter(self, name: str, role: str | None, virtual: str | None, infos: list[ServiceInfo]) -> None:
        assert self.monitor is not None
        watched = self.monitor.services.get(name)
        if role is None or watched is None:
            return
        clean = self._checked(name, watched.values)
        if role == MEMBER:
            self.merge.set_member(name, member_label(watched), clean)
            state = self.members.get(name)
            if state is None:
                state = MemberState(self._free_slot())
                self.members[name] = state
            state.state, state.last_update, state.drop = ONLINE, self.clock(), None
            if watched.values.get("/Connected") == 0:
                state.state = STALE
            self._dirty_rows.add(name)
            self._identify(name)
            _LOG.info("member %s (%s) joined%s", name, member_label(watched),
                      "" if state.state == ONLINE else ", but it says it lost its device (/Connected 0)")
        elif role in (PRIMARY, AUXILIARY):
            self.merge.set_source(role, name, self._source_paths(role, name, infos), clean)
            _LOG.info("%s is a %s service", name, role)
        elif role == VIRTUAL_MEMBER and virtual in self.virtuals:
            vb = self.virtuals[virtual]
            info = next(i for i in infos if i.name == name)
            index, wanted = vb.ref_index(info, infos)
            vb.set_member(name, index, clean, wanted)
            _LOG.info("%s is a member of the virtual battery %s", name, virtual)
        else:
            _LOG.info("%s is %s", name, role)

    def _source_paths(self, role: str, name: str, infos: list[ServiceInfo]) -> list[str] | None:
        spec = self.config.primaryServices if role == PRIMARY else self.config.auxiliaryServices
        if isinstance(spec, dict):
            for ref, paths in spec.items():
                if name in resolve(ref, infos):
                    return list(paths) or None
        return None

    def _free_slot(self) -> int:
        used = {s.slot for s in self.members.values()}
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def _report_references(self, roles: Roles) -> None:
        for ref in roles.unresolved:
            if ref not in self._warned_refs:
                self._warned_refs.add(ref)
                (_LOG.warning if self.registered else _LOG.info)(
                    "the config refers to %s, which matches no battery service on the bus (yet)", ref)
        self._warned_refs &= set(roles.unresolved)
        for ref in roles.ambiguous:
            _LOG.warning("%s matches more than one battery service; all of them are used", ref)
        for name in roles.conflicts:
            _LOG.warning("%s is claimed by two roles in the config; the first in precedence applies", name)

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
        for vb in self.virtuals.values():
            self._flush_virtual(vb)
        if self._membership_changed:
            self.merge.set_offline(frozenset(n for n, s in self.members.items() if s.state != ONLINE))
        values = self.merge.compute()
        # The energy totals are ours (per identity, monotonic), not the members' sum: _publish_energy sets them.
        values.pop("/History/ChargedEnergy", None)
        values.pop("/History/DischargedEnergy", None)
        if values.get("/Dc/0/Voltage") is not None:
            self._have_voltage.set()
        for path in (self._limit_alarms.keys() | self._limit_flags.keys()) & values.keys():
            values[path] = self._limited_value(path)  # the members' alarm or flag, or ours while a limit is held
        if self._membership_changed:
            self._membership_changed = False
            self._limits_dirty = True
            self._membership_paths(service, values)
        if MODULES_OFFLINE in values and self._absent:
            values[MODULES_OFFLINE] = (values[MODULES_OFFLINE] or 0) + self._absent
        if self._limits_due and self.clock() - self._limits_at >= MEASUREMENT_LIMIT_INTERVAL:
            self._limits_dirty = True
        if self._limits_dirty:
            self._limits_dirty = False
            self._update_limits(values)
        measured: set[str] = set()  # rows whose member has new measurements: only the keys showing them
        if self._lazy_rows:
            now = self.clock()
            if now - self._rows_at >= ROW_INTERVAL:
                self._rows_at = now
                measured, self._lazy_rows = self._lazy_rows - self._dirty_rows, set()
        with service.batch():  # one ItemsChanged for the aggregate paths and the member rows together
            now = self.clock()
            if now - self._tasks_at >= ROW_INTERVAL:
                # A diagnostic riding along (never a signal of its own): a leak of tasks shows as growth.
                self._tasks_at = now
                service.set_value("/Aggregator/Tasks", len(asyncio.all_tasks()))
            for name in self._dirty_rows:
                self._breakdown_row(service, name)
            for name in measured:
                self._measurement_keys(service, name)
            for name in self._limit_rows_changed - self._dirty_rows:
                self._limit_keys(service, name)
            self._dirty_rows.clear()
            self._limit_rows_changed.clear()
            for path, value in values.items():
                if path not in service:
                    add_battery_path(service, path, value)
                else:
                    service.set_value(path, value)

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
        if vb.name in self.members or vb.has_voltage() or vb.members:
            if vb.name not in self.members:
                self.members[vb.name] = MemberState(self._free_slot(), last_update=self.clock())
                self.merge.set_member(vb.name, vb.label(),
                                      {p: vb.service[p] for p in vb.service.paths()})
                self._identify(vb.name)
                self._membership_changed = True
            else:
                clean = check_values(values)[0]
                self.merge.update_member(vb.name, clean)
                state = self.members[vb.name]
                state.last_update = self.clock()
                if "/Dc/0/Current" in clean:
                    state.current_at = state.last_update
                if state.state == STALE and self._connected(self._probe_targets(vb.name)):
                    self._set_state(vb.name, state, ONLINE, "its members update again")
                if "/Dc/0/Current" in clean:
                    self._reported.add(vb.name)
                for feature in self._readers:
                    if not feature.reads.isdisjoint(clean):
                        feature.on_member(vb.name, self.merge.members[vb.name].values, clean)
                if "/Serial" in clean:
                    self._identify(vb.name)
                self._note_limit_inputs(clean)
            self._dirty_rows.add(vb.name)

    def _identify(self, name: str) -> None:
        """A member joined or its /Serial changed: who it is (energy identity), and whether it duplicates another."""
        self.energy.set_member(name, self.merge.members[name].values)
        self._sync_duplicates()

    def _forget_identity(self, name: str) -> None:
        self.energy.remove_member(name)
        self._sync_duplicates()

    def _sync_duplicates(self) -> None:
        """A service publishing a battery that another member already stands for (same serial or configured
        id: one pack seen through two drivers) is not counted again: not in the DC values, not in the limits
        (counted twice, its share would look halved and the bank's CCL doubled), not in the number of
        batteries. The energy tracker decides which service stands for the battery (the first seen)."""
        shadowed = self.energy.shadowed
        if shadowed == self._duplicates:
            return
        for name in shadowed ^ self._duplicates:
            counted = name not in shadowed
            self.merge.set_counted(name, counted)
            self._dirty_rows.add(name)
            if counted:
                _LOG.info("member %s is counted again: no other service publishes its battery", name)
            else:
                _LOG.warning("member %s publishes a battery another member already stands for: not counted twice",
                             name)
        self._duplicates = shadowed
        self._membership_changed = True
        self._schedule_flush()

    def _note_limit_inputs(self, clean: dict[str, Any]) -> None:
        """A change of a limit, a flag or a mode recomputes the limits in this flush; a change of current or
        voltage alone (every update of every member) at most every MEASUREMENT_LIMIT_INTERVAL: the limits
        follow them within a second, and the CPU of a small GX is spared a recompute per update."""
        if self._limits_dirty or LIMIT_INPUTS.isdisjoint(clean):
            return
        if not MEASUREMENTS.issuperset(clean.keys() & LIMIT_INPUTS):
            self._limits_dirty = True
        elif self.clock() - self._limits_at >= MEASUREMENT_LIMIT_INTERVAL:
            self._limits_dirty = True
        else:
            self._limits_due = True

    def _update_limits(self, values: dict[str, Any]) -> None:
        now = self.clock()
        self._limits_at = now
        self._limits_due = False
        reported = self._reported
        duplicates = self._duplicates
        steady = now - STEADY_CURRENT
        members = self.members
        inputs = [MemberInput(name, m.label, m.values, members[name].state == ONLINE,
                              name in reported or members[name].current_at <= steady)
                  for name, m in self.merge.members.items() if name in members and name not in duplicates]
        if duplicates:
            self._lowest_of_duplicates(inputs)
        samples = self.control.samples
        self.control.observe(inputs, now)
        if self.control.samples != samples or all(i.updated for i in inputs):
            reported.clear()  # a complete sample was taken: wait for every member again
        waiting = f"waiting for {', '.join(sorted(self._awaiting))} to answer" if self._awaiting else None
        out = self.control.update(inputs, self.dvcc, now, charge_wait=waiting)
        values["/Info/MaxChargeCurrent"] = out.ccl
        values["/Info/MaxDischargeCurrent"] = out.dcl
        values["/Info/MaxChargeVoltage"] = out.cvl
        values["/Info/ChargeLimitation"] = out.charge_limitation
        alarms = {path: level for path, level in out.alarms.items() if level or path in self._limit_alarms}
        changed = {p for p in alarms.keys() | self._limit_alarms.keys() if alarms.get(p) != self._limit_alarms.get(p)}
        changed |= out.flags.keys() ^ self._limit_flags.keys()
        self._limit_alarms, self._limit_flags = alarms, out.flags
        for path in changed:
            values[path] = self._limited_value(path)
        if out.notes != self._limit_notes:
            self._limit_notes = out.notes
            self._publish_status(values)
        for name, row in out.members.items():
            if self._limit_rows.get(name) != row:
                self._limit_rows[name] = row
                self._limit_rows_changed.add(name)  # only these keys: the rest of the row is unchanged

    def _lowest_of_duplicates(self, inputs: list[MemberInput]) -> None:
        """The service standing for a pack seen through two drivers takes the lowest of their limits, and a limit
        either has unknown is unknown (see one_pack)."""
        by_name = {i.name: n for n, i in enumerate(inputs)}
        for duplicate in self.energy.duplicates.values():
            index = by_name.get(duplicate.chosen)
            if index is None:
                continue
            chosen = inputs[index]
            # The pack's other services still in the bank (a dropped one is no longer the pack's).
            others = [(self.merge.members[s].values, self.members[s].state == ONLINE) for s in duplicate.services
                      if s != duplicate.chosen and s in self.merge.members and s in self.members]
            if others and (chosen.fresh or any(fresh for _, fresh in others)):
                values = one_pack([(chosen.values, chosen.fresh), *others])
                inputs[index] = MemberInput(chosen.name, chosen.label, values, True, chosen.updated)

    def _limited_value(self, path: str) -> Any:
        """A path the limits have a say in: 0 while they clear the flag, at least their alarm once raised."""
        if path in self._limit_flags:
            return 0
        merged = self.merge.compute_path(path)
        if path in self._limit_alarms:
            return max(merged or 0, self._limit_alarms[path])  # once raised, back to 0 (ok) rather than invalid
        return merged

    def _on_setting_change(self, service: str, path: str, value: Any) -> None:
        readers = self._setting_readers.get((service, path))
        if readers:
            for feature in readers:
                feature.on_setting(service, path, value)
            return
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if path == "/Control/Dvcc":
            self.dvcc = dataclasses.replace(self.dvcc, enabled=bool(number))
        elif path.endswith("MaxChargeCurrent"):
            self.dvcc = dataclasses.replace(self.dvcc, max_charge_current=number)
        else:
            self.dvcc = dataclasses.replace(self.dvcc, max_charge_voltage=number)
        _LOG.info("DVCC %s, user limits %s A, %s V", "on" if self.dvcc.enabled else "off",
                  self.dvcc.max_charge_current, self.dvcc.max_charge_voltage)
        self._limits_dirty = True
        self._schedule_flush()

    def _load_state(self) -> None:
        from ..state import StateStore

        path = os.path.join(self.config.stateDir, unique_id(self.name) + ".json")
        self._store = StateStore(path)
        state = self._store.load()
        if state:
            self.control.load_state(state)
            _LOG.info("learned shares and IR estimates loaded from %s", path)

    def _save_state(self) -> None:
        if self._store is not None:
            self._store.save(self.control.to_state())

    # ---- energy -----------------------------------------------------------------------------------------

    # ---- what the features read (features.base.Bank) --------------------------------------------------------

    def member_rows(self) -> list[tuple[str, int, bool]]:
        return [(name, state.slot, state.state == ONLINE) for name, state in self.members.items()]

    def member_values(self, name: str) -> dict[str, Any]:
        member = self.merge.members.get(name)
        return member.values if member is not None else {}

    def save(self) -> None:
        """What the features keep, now (the host's exit that skips stop: the bus is gone)."""
        for feature in self.features:
            feature.save()

    def _breakdown_row(self, service: VeService, name: str) -> None:
        state = self.members.get(name)
        if state is None:
            return
        member = self.merge.members.get(name)
        values = member.values if member is not None else {}
        watched = self.monitor.services.get(name) if self.monitor is not None else None
        label = member.label if member is not None else (member_label(watched) if watched else name)
        shown = DUPLICATE if name in self._duplicates and state.state != LOST else state.state
        write_row(service, state.slot, name, label, shown, values if state.state != LOST else None,
                  self._limit_rows.get(name, {}))

    def _stands_for(self, name: str) -> str:
        """The member that stands for the battery a duplicate publishes."""
        return next((d.chosen for d in self.energy.duplicates.values() if name in d.services), "?")

    def _measurement_keys(self, service: VeService, name: str) -> None:
        state = self.members.get(name)
        member = self.merge.members.get(name)
        if state is not None and member is not None and state.state != LOST \
                and not write_measurement_keys(service, state.slot, member.values):
            self._breakdown_row(service, name)  # not published yet: the whole row

    def _limit_keys(self, service: VeService, name: str) -> None:
        """The controller's keys of a member row, after a limit computation changed them."""
        state = self.members.get(name)
        if state is not None and state.state != LOST:
            write_limit_keys(service, state.slot, self._limit_rows.get(name, {}))

    def _membership_paths(self, service: VeService, merged: dict[str, Any]) -> None:
        duplicates = self._duplicates
        present = [n for n, s in self.members.items() if s.state != LOST and n not in duplicates]
        online = [n for n, s in self.members.items() if s.state == ONLINE and n not in duplicates]
        expected = self.config.expectedBatteries
        missing = max(0, expected - len(online)) if expected else 0
        # Expected batteries not on the bus at all count as one offline module each (the stale ones' modules
        # are offline in the merge already).
        self._absent = max(0, expected - len(present)) if expected else 0
        merged[MODULES_OFFLINE] = self.merge.compute_path(MODULES_OFFLINE)
        merged["/System/NrOfBatteries"] = len(present)
        merged["/System/BatteriesParallel"] = len(present)
        merged["/Alarms/MissingBatteries"] = (1 if missing else 0) if expected else None
        merged["/Mgmt/Connection"] = f"Aggregate of {len(present)} batteries"
        chain = [self.name]
        for name in present:
            watched = self.monitor.services.get(name) if self.monitor is not None else None
            member_chain = check_value(CHAIN_PATH, watched.values.get(CHAIN_PATH))[0] if watched is not None \
                else None
            if isinstance(member_chain, list):
                chain += [c for c in member_chain if isinstance(c, str) and c not in chain]
        merged[CHAIN_PATH] = chain
        reasons = []
        if self._awaiting:
            reasons.append(f"starting: charging waits for {len(self._awaiting)} batteries to answer")
        if missing:
            reasons.append(f"{missing} of {expected} expected batteries missing")
        stale = sorted(n for n, s in self.members.items() if s.state == STALE)
        if stale:
            reasons.append("stale: " + ", ".join(stale))
        lost = sorted(n for n, s in self.members.items() if s.state == LOST)
        if lost:
            reasons.append("lost: " + ", ".join(lost))
        if duplicates:
            reasons.append("not counted twice: " + ", ".join(
                f"{n} (same battery as {self._stands_for(n)})" for n in sorted(duplicates)))
        if self.roles.unresolved:
            reasons.append("unresolved: " + ", ".join(self.roles.unresolved))
        if not present:
            reasons.append("no member batteries")
        self._membership_reasons = reasons
        self._publish_status(merged)
        merged["/Aggregator/Unresolved"] = json_list_text(self.roles.unresolved)

    def _publish_status(self, merged: dict[str, Any]) -> None:
        reasons = self._membership_reasons + [n.text for n in self._limit_notes]
        status = "; ".join(reasons) or "ok"
        # Logged when what it is about changes, not at every value it shows (a held limit that falls).
        key = tuple(self._membership_reasons) + tuple(n.key for n in self._limit_notes)
        if key != self._status_key:
            # While members are still appearing at start-up, status changes are expected: INFO until then.
            (_LOG.warning if reasons and self.registered else _LOG.info)("status: %s", status)
            self._status_key = key
        merged["/Aggregator/Status"] = status

    def _set_state(self, name: str, state: MemberState, new: str, why: str) -> None:
        """Online <-> stale (a stale member counts as carrying nothing and its unknown limits hold the bank's)."""
        state.state = new
        self._dirty_rows.add(name)
        self._membership_changed = True
        if new == ONLINE:
            _LOG.info("member %s is online again: %s", name, why)
        else:
            _LOG.warning("member %s is stale: %s", name, why)

    def _probe_targets(self, name: str) -> list[str]:
        """The services whose answers tell whether a member is alive: itself, or a virtual battery's members."""
        vb = self.virtuals.get(name)
        return list(vb.members) if vb is not None else [name]

    def _connected(self, names: list[str]) -> bool:
        assert self.monitor is not None
        services = self.monitor.services
        return all(services[n].values.get("/Connected") != 0 for n in names if n in services)

    async def _probe(self, name: str, state: MemberState, timeout: float) -> None:
        """A member silent for staleAfter is asked whether it is alive: Victron's services signal only changes,
        so a battery at rest may send nothing for minutes. An answer (which also refreshes its values) keeps it
        online; no answer, an error or /Connected 0 makes it stale, until it signals or answers again."""
        assert self.monitor is not None
        silent = self.clock() - state.last_update
        targets = self._probe_targets(name)
        try:
            answers = await asyncio.gather(*(self.monitor.probe(t, timeout) for t in targets))
        finally:
            state.probing = False
        if self.members.get(name) is not state or state.drop is not None:
            return  # it left meanwhile: the vanishing rules apply
        if all(answers) and self._connected(targets):
            state.last_update = self.clock()
            if state.state == STALE:
                self._set_state(name, state, ONLINE, "it answers again")
                self._schedule_flush()
        elif state.state == ONLINE:
            why = "does not answer" if not all(answers) else "says it lost its device (/Connected 0)"
            self._set_state(name, state, STALE, f"it has sent nothing for {silent:.0f} s and {why}")
            self._schedule_flush()

    async def _watch_staleness(self) -> None:
        """Every second: members silent for staleAfter are asked whether they are alive (see _probe); rising
        limits continue their ramp and the limits' due checks run; learned state is saved now and then."""
        saved_at = self.clock()
        while True:
            await beat(1.0)
            stale_after = self.config.limits.staleAfter  # a reload may change it
            timeout = min(PROBE_TIMEOUT, stale_after)
            now = self.clock()
            if self.control.ticking or self._limits_due:
                self._limits_dirty = True
                self._schedule_flush()
            if self._lazy_rows:
                self._schedule_flush()
            if now - saved_at >= STATE_SAVE_INTERVAL:
                saved_at = now
                self._save_state()
            for feature in self.features:
                feature.tick()
            for name, state in self.members.items():
                if state.drop is None and state.state != LOST and not state.probing \
                        and now - max(state.last_update, state.probed_at) > stale_after:
                    state.probing, state.probed_at = True, now
                    self._spawn(self._probe(name, state, timeout))
            if self._membership_changed:
                self._schedule_flush()
