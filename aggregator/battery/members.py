"""The member table: which services are members of the bank and in which row, the roles of the others, and which
pack every member publishes (identity.py's Packs: a pack seen through two services is counted through one). It
follows the monitor's events (a service appears, vanishes, changes its name or serial) and keeps the merge, the
rows and the packs in step with the roles of membership.py; the features hear of a member whose pack changed.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..features.grid_battery.core import GRID_BATTERY_PRODUCT_ID
from .identity import Packs, identity_of
from .membership import AUXILIARY, MEMBER, PRIMARY, VIRTUAL_MEMBER, Roles, ServiceInfo, assign_roles, resolve
from .publish import member_label
from .rows import LOST, ONLINE, STALE
from .sanitize import check_values
from .virtual import VirtualBattery, role_config, virtual_battery_specs

if TYPE_CHECKING:
    from ..bus.monitor import ServiceMonitor, WatchedService
    from ..config import Config
    from .merge import Merge

_LOG = logging.getLogger("aggregator")

BAD_VALUE_LOG_INTERVAL = 600.0  # one log line per member and path in this time

# The id the config gives the pack a member publishes (config, service name, its values), None without one.
ConfiguredId = Callable[["Config", str, Mapping[str, Any]], "str | None"]


def no_configured_id(_config: Config, _name: str, _values: Mapping[str, Any]) -> str | None:
    return None


@dataclass(slots=True)
class MemberState:
    slot: int
    state: str = ONLINE
    last_update: float = 0.0  # its last signal, or its last answer to a probe
    drop: asyncio.TimerHandle | None = None
    probed_at: float = -1e9  # when a probe last started
    probing: bool = False
    current_at: float = -1e9  # when its current last changed


class Members:
    """The members (service name -> MemberState, in the order they joined) and the roles of every battery service.

    `dirty_rows` are the members whose /Batteries/<n> row the next flush writes; `changed` says the membership
    changed (the next flush recomputes the membership paths and the limits)."""

    def __init__(self, config: Config, merge: Merge, virtuals: dict[str, VirtualBattery],
                 clock: Callable[[], float], schedule_flush: Callable[[], None],
                 forget_limits: Callable[[str], None], configured_id: ConfiguredId = no_configured_id,
                 pack_changed: Callable[[str], None] = lambda _name: None) -> None:
        self.config = config
        self.role_config = role_config(config)
        self.merge = merge
        self.virtuals = virtuals
        self.clock = clock
        self.schedule_flush = schedule_flush
        self.forget_limits = forget_limits  # a member taken out: its limit no longer holds the bank's
        self.configured_id = configured_id
        self.pack_changed = pack_changed  # a member joined, left or publishes another pack: the features hear
        self.members: dict[str, MemberState] = {}
        self.roles = Roles({}, {}, [], [], [])
        self.packs = Packs()
        self.duplicates: frozenset[str] = frozenset()  # members publishing a battery another member stands for
        self.dirty_rows: set[str] = set()
        self.changed = True
        self.monitor: ServiceMonitor | None = None  # set once the service started it
        self.registered = False  # the aggregate is on the bus: from then on, surprises are warnings
        self._bad_value_logged: dict[tuple[str, str], float] = {}
        self._warned_refs: set[str] = set()

    def reconfigure(self, config: Config) -> None:
        """The new config's roles and virtual batteries, and the identities it gives (the features hear of those
        in their own reconfigure)."""
        self.config = config
        self.role_config = role_config(config)
        for name in self.packs.services():
            if name in self.merge.members:
                self.identify(name, tell=False)
        for name, entries in virtual_battery_specs(config).items():
            vb = self.virtuals[name]
            fresh = VirtualBattery(name, entries)
            vb.refs, vb.hooks = fresh.refs, fresh.hooks
            vb.dirty.update(p for _, values, _ in vb.members.values() for p in values)
            for member in list(vb.members):  # re-enter with the new order and paths
                vb.remove_member(member)
                self.roles.roles.pop(member, None)

    # ---- the monitor's events ----------------------------------------------------------------------------

    def appeared(self, service: WatchedService) -> None:
        state = self.members.get(service.name)
        if state is not None and state.drop is not None:  # back within reconnectTimeout
            state.drop.cancel()
            state.drop = None
            _LOG.info("member %s is back", service.name)
            self.roles.roles.pop(service.name, None)  # re-enter through classification with fresh values
            self.merge.remove_member(service.name)
        self.reclassify()

    def vanished(self, service: WatchedService) -> None:
        role = self.roles.roles.get(service.name)
        if role == MEMBER and service.name in self.members:
            state = self.members[service.name]
            state.state = STALE
            self.dirty_rows.add(service.name)
            timeout = self.config.reconnectTimeout
            _LOG.warning("member %s left the bus; keeping its last values for %g s", service.name, timeout)
            state.drop = asyncio.get_running_loop().call_later(timeout, self.drop, service.name)
            self.changed = True
            self.schedule_flush()
            return
        self.reclassify()

    def drop(self, name: str) -> None:
        state = self.members.get(name)
        if state is None:
            return
        _LOG.warning("member %s did not come back: dropped from the aggregate", name)
        state.drop = None
        state.state = LOST
        self.merge.remove_member(name)
        gone = self.packs.identity_of(name)
        self.forget_identity(name)
        if gone is not None and self.packs.published(gone):
            self.forget_limits(name)  # another service still publishes this pack: its limits are known
        self.roles.roles.pop(name, None)
        self.dirty_rows.add(name)
        self.changed = True
        self.schedule_flush()

    def checked(self, name: str, values: dict[str, Any]) -> dict[str, Any]:
        """A service's values with the refused ones (absurd, mistyped, too large) as None, and logged."""
        clean, refused = check_values(values)
        if refused:
            self.log_refused(name, refused)
        return clean

    def log_refused(self, name: str, refused: dict[str, str]) -> None:
        now = self.clock()
        for path, reason in refused.items():
            key = (name, path)
            if now - self._bad_value_logged.get(key, -BAD_VALUE_LOG_INTERVAL) >= BAD_VALUE_LOG_INTERVAL:
                self._bad_value_logged[key] = now
                _LOG.warning("ignoring %s of %s: %s", path, name, reason)

    # ---- roles -----------------------------------------------------------------------------------------

    def reclassify(self) -> None:
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
        self.changed = True
        self.schedule_flush()

    def _leave(self, name: str, role: str | None, virtual: str | None) -> None:
        if role == MEMBER:
            self.merge.remove_member(name)
            self.forget_identity(name)
            self.forget_limits(name)  # taken out on purpose: its limit no longer holds the bank's
            state = self.members.pop(name, None)
            if state is not None and state.drop is not None:
                state.drop.cancel()
            self.dirty_rows.add(name)
        elif role in (PRIMARY, AUXILIARY):
            self.merge.set_source(role, name, None, None)
        elif role == VIRTUAL_MEMBER and virtual in self.virtuals:
            self.virtuals[virtual].remove_member(name)

    def _enter(self, name: str, role: str | None, virtual: str | None, infos: list[ServiceInfo]) -> None:
        assert self.monitor is not None
        watched = self.monitor.services.get(name)
        if role is None or watched is None:
            return
        clean = self.checked(name, watched.values)
        if role == MEMBER:
            self.merge.set_member(name, member_label(watched), clean)
            state = self.members.get(name)
            if state is None:
                state = MemberState(self.free_slot())
                self.members[name] = state
            state.state, state.last_update, state.drop = ONLINE, self.clock(), None
            if watched.values.get("/Connected") == 0:
                state.state = STALE
            self.dirty_rows.add(name)
            self.identify(name)
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

    def enter_virtual(self, vb: VirtualBattery, values: dict[str, Any]) -> None:
        """Our virtual battery joins the bank once it has something to stand for (it is fed directly, not through
        the monitor)."""
        self.members[vb.name] = MemberState(self.free_slot(), last_update=self.clock())
        self.merge.set_member(vb.name, vb.label(), values)
        self.identify(vb.name)
        self.changed = True

    def free_slot(self) -> int:
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

    # ---- a pack seen twice -------------------------------------------------------------------------------

    def identify(self, name: str, tell: bool = True) -> None:
        """A member joined or its /Serial changed: which pack it publishes (its /Serial, else the id the config
        gives it, else its name), and whether another member already stands for that pack."""
        values = self.merge.members[name].values
        identity = identity_of(values.get("/Serial"), self.configured_id(self.config, name, values), name)
        if self.packs.set(name, identity, self.clock()):
            if tell:
                self.pack_changed(name)
            self._sync_duplicates()

    def forget_identity(self, name: str) -> None:
        if self.packs.remove(name):
            self.pack_changed(name)
            self._sync_duplicates()

    def _sync_duplicates(self) -> None:
        """A service publishing a battery that another member already stands for (same serial or configured
        id: one pack seen through two drivers) is not counted again: not in the DC values, not in the limits
        (counted twice, its share would look halved and the bank's CCL doubled), not in the number of
        batteries. The one seen first stands for the battery (Packs)."""
        shadowed = self.packs.shadowed
        if shadowed == self.duplicates:
            return
        for name in shadowed ^ self.duplicates:
            counted = name not in shadowed
            self.merge.set_counted(name, counted)
            self.dirty_rows.add(name)
            if counted:
                _LOG.info("member %s is counted again: no other service publishes its battery", name)
            else:
                _LOG.warning("member %s publishes a battery another member already stands for: not counted twice",
                             name)
        self.duplicates = shadowed
        self.changed = True
        self.schedule_flush()

    def stands_for(self, name: str) -> str:
        """The member that stands for the battery a duplicate publishes."""
        return self.packs.stands_for(name) or "?"
