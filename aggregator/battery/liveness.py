"""Whether each member is alive. Victron's services signal only changes, so a battery at rest may send nothing for
minutes: a member silent for `limits.staleAfter` is asked (a probe), and one that does not answer, or says it lost
its device (/Connected 0), is stale until it signals or answers again. At start, the batteries that have not
answered their first read yet hold charging (their limits are unknown) until they answer or their read times out.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

from .rows import LOST, ONLINE, STALE

if TYPE_CHECKING:
    from .charge_limits import ChargeLimits
    from .members import Members, MemberState

_LOG = logging.getLogger("aggregator")

PROBE_TIMEOUT = 5.0  # seconds a quiet member has to answer a probe (at most staleAfter)


class Liveness:
    def __init__(self, table: Members, limits: ChargeLimits, spawn: Callable[[Any], None],
                 schedule_flush: Callable[[], None]) -> None:
        self.table = table
        self.limits = limits
        self.spawn = spawn
        self.schedule_flush = schedule_flush
        # Batteries on the bus at start that have not answered their first read yet: each may be a member whose
        # limits are unknown, so the CCL stays 0 until they answer or their read times out.
        self.awaiting: set[str] = set()

    def set_state(self, name: str, state: MemberState, new: str, why: str) -> None:
        """Online <-> stale (a stale member counts as carrying nothing and its unknown limits hold the bank's)."""
        state.state = new
        self.table.dirty_rows.add(name)
        self.table.changed = True
        if new == ONLINE:
            _LOG.info("member %s is online again: %s", name, why)
        else:
            _LOG.warning("member %s is stale: %s", name, why)

    def probe_targets(self, name: str) -> list[str]:
        """The services whose answers tell whether a member is alive: itself, or a virtual battery's members."""
        vb = self.table.virtuals.get(name)
        return list(vb.members) if vb is not None else [name]

    def connected(self, names: list[str]) -> bool:
        assert self.table.monitor is not None
        services = self.table.monitor.services
        return all(services[n].values.get("/Connected") != 0 for n in names if n in services)

    def probe_quiet(self, now: float) -> None:
        """The tick's part: members silent for staleAfter (a reload may change it) are probed."""
        stale_after = self.table.config.limits.staleAfter
        timeout = min(PROBE_TIMEOUT, stale_after)
        for name, state in self.table.members.items():
            if state.drop is None and state.state != LOST and not state.probing \
                    and now - max(state.last_update, state.probed_at) > stale_after:
                state.probing, state.probed_at = True, now
                self.spawn(self._probe(name, state, timeout))

    async def _probe(self, name: str, state: MemberState, timeout: float) -> None:
        """An answer (which also refreshes its values) keeps a quiet member online; no answer, an error or
        /Connected 0 makes it stale, until it signals or answers again."""
        table = self.table
        assert table.monitor is not None
        silent = table.clock() - state.last_update
        targets = self.probe_targets(name)
        try:
            answers = await asyncio.gather(*(table.monitor.probe(t, timeout) for t in targets))
        finally:
            state.probing = False
        if table.members.get(name) is not state or state.drop is not None:
            return  # it left meanwhile: the vanishing rules apply
        if all(answers) and self.connected(targets):
            state.last_update = table.clock()
            if state.state == STALE:
                self.set_state(name, state, ONLINE, "it answers again")
                self.schedule_flush()
        elif state.state == ONLINE:
            why = "does not answer" if not all(answers) else "says it lost its device (/Connected 0)"
            self.set_state(name, state, STALE, f"it has sent nothing for {silent:.0f} s and {why}")
            self.schedule_flush()

    async def await_slow_members(self) -> None:
        monitor = self.table.monitor
        assert monitor is not None
        _LOG.info("publishing before %s answered: charging waits for them", ", ".join(sorted(self.awaiting)))
        await monitor.settle(monitor.call_timeout + 0.5)
        late = self.awaiting & set(monitor.pending)
        if late:
            _LOG.warning("%s did not answer at start: going on without them (they join when they answer)",
                         ", ".join(sorted(late)))
        self.answered(*self.awaiting)

    def answered(self, *names: str) -> None:
        if self.awaiting & set(names):
            self.awaiting.difference_update(names)
            self.limits.dirty = self.table.changed = True
            self.schedule_flush()
