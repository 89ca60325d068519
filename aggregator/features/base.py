"""The Feature interface: how a side feature is mounted on the service, the same way for every one.

In the spirit of the delegates of Victron's dbus-systemcalc-py, a feature declares what it reads and what it
publishes and is called at fixed points; the aggregate service loops over its features and knows none of them by
name:

    reads        member paths: `on_member` is called when a member's change touches one of them
    on_pack      a member joined, left or now publishes another pack (the bank's `identity_of` and
                 `duplicates` say which; the battery package decides, the first service seen stands for a pack)
    watches      (service, path) settings of other services: `on_setting` gets their values
    publishes    the paths (prefixes) it owns on the aggregate's service, or the services it publishes
    connections  the bus connections it owns besides the aggregate's (the host's watch ends the process when
                 one drops, so the supervisor restarts it)
    load         its saved state, before anything is published
    mount        adds its paths and methods to the aggregate's service before that registers (a client's first
                 GetItems sees them)
    start, stop  its tasks, after the first flush and at the end
    tick         once a second
    save         its state now (the host asks at an exit that skips stop)
    needs_restart  whether a new config can be applied in place (False) or needs the service restarted
    reconfigure  applies a new config in place (the bank's identities already follow it)

A feature imports no other feature: the host wires those that work together (the cooperative sets the
dispatcher's target through a protocol the cooperative declares).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

if TYPE_CHECKING:
    from ..battery.identity import Duplicate
    from ..bus.service import VeService
    from ..bus.settings import LocalSettings
    from ..config import Config


class Bank(Protocol):
    """What a feature may read of the aggregate: its members, their sanitized values and the packs they publish;
    and the aggregate's localsettings client (device instances and /CustomName of the services a feature
    publishes)."""

    settings: LocalSettings | None

    def member_rows(self) -> list[tuple[str, int, bool]]:
        """(service name, row slot, online) of every member."""
        ...

    def member_values(self, name: str) -> Mapping[str, Any]:
        ...

    def identity_of(self, name: str) -> str | None:
        """The pack member `name` publishes (its /Serial, else its configured id, else its name); None when it
        is no member."""
        ...

    def duplicates(self) -> Mapping[str, Duplicate]:
        """The packs more than one member publishes, by identity: their services and the one that stands for
        the pack (the others are not counted)."""
        ...


class Feature:
    """A side feature; every hook does nothing unless the feature overrides it."""

    name = "feature"
    reads: frozenset[str] = frozenset()
    watches: tuple[tuple[str, str], ...] = ()
    publishes: tuple[str, ...] = ()

    def load(self) -> None:
        pass

    async def mount(self, service: VeService, bus: Any, bank: Bank) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def on_member(self, name: str, values: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
        pass

    def on_pack(self, name: str) -> None:
        pass

    def on_setting(self, service: str, path: str, value: Any) -> None:
        pass

    def tick(self) -> None:
        pass

    def save(self) -> None:
        pass

    def needs_restart(self, old: Config, new: Config) -> bool:
        return False

    def reconfigure(self, config: Config, bank: Bank) -> None:
        pass

    def connections(self) -> list[tuple[str, Any]]:
        """(what it is for, connection) of every bus connection it owns."""
        return []
