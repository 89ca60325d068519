"""Virtual batteries: a `virtualBatteries` entry of the config is a battery of its own, built path by path from
its members and hooks in config order. Pure: the aggregate service publishes it and feeds it its members' values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .hooks import Hook, build_hook
from .membership import CHAIN_PATH, RoleConfig, ServiceInfo, resolve
from .merge import RULES, MemberView, MergeOptions, first_valid

if TYPE_CHECKING:
    from ..bus.service import VeService
    from ..config import Config

VIRTUAL_PRODUCT_NAME = "Virtual Battery"
# Paths of a service itself, never copied from a member into a virtual battery.
_OWN_PATHS = frozenset({"/Mgmt/ProcessName", "/Mgmt/ProcessVersion", "/Mgmt/Connection", "/DeviceInstance",
                        "/ProductId", "/ProductName", "/FirmwareVersion", "/HardwareVersion", "/Connected",
                        "/CustomName", CHAIN_PATH})
TIME_TO_GO = "/TimeToGo"
_TIME_TO_GO_INPUTS = frozenset(RULES[TIME_TO_GO].inputs)


class VirtualBattery:
    """One `virtualBatteries` entry: per path, the first listed source with a valid value wins, where the
    sources are its members and hooks in config order (FixedValueHook before all)."""

    def __init__(self, name: str, entries: list[VirtualEntry]) -> None:
        self.name = name
        self.refs = [(i, e.ref, e.paths) for i, e in enumerate(entries) if e.hook is None]
        self.hooks = [(-1 if e.hook.always_wins else i, e.hook) for i, e in enumerate(entries) if e.hook is not None]
        self.members: dict[str, tuple[int, dict[str, Any], frozenset[str] | None]] = {}
        self.service: VeService | None = None
        self.dirty: set[str] = set()
        self.registered = False
        self._hook_paths: set[str] = set()

    def ref_index(self, service: ServiceInfo, services: list[ServiceInfo]) -> tuple[int, frozenset[str] | None]:
        for index, ref, wanted in self.refs:
            if service.name in resolve(ref, services):
                return index, wanted
        return len(self.refs) + len(self.hooks), None

    def set_member(self, name: str, index: int, values: dict[str, Any], wanted: frozenset[str] | None) -> None:
        self.members[name] = (index, dict(values), wanted)
        self.dirty.update(p for p in values if p not in _OWN_PATHS)

    def update_member(self, name: str, changes: dict[str, Any]) -> None:
        entry = self.members.get(name)
        if entry is not None:
            entry[1].update(changes)
            self.dirty.update(p for p in changes if p not in _OWN_PATHS)

    def remove_member(self, name: str) -> None:
        entry = self.members.pop(name, None)
        if entry is not None:
            self.dirty.update(p for p in entry[1] if p not in _OWN_PATHS)

    def compute(self) -> dict[str, Any]:
        dirty, self.dirty = self.dirty, set()
        members = [(i, values, wanted) for i, values, wanted in self.members.values()]
        sources = sorted(members, key=lambda e: e[0])
        if self.hooks:
            # Hooks read the members' merge (the first member with a value), then stand in the list too.
            member_sources = [(v, w) for _, v, w in sources]
            merged = {p: first_valid(member_sources, p) for v, _ in member_sources for p in v}
            hook_sources: list[tuple[int, dict[str, Any], frozenset[str] | None]] = [
                (i, hook.outputs(merged), None) for i, hook in self.hooks]
            produced = {p for _, out, _ in hook_sources for p in out}
            dirty |= produced | self._hook_paths  # a path a hook stopped setting falls back to the members
            self._hook_paths = produced
            sources = sorted(members + hook_sources, key=lambda e: e[0])
        ordered = [(values, wanted) for _, values, wanted in sources]
        out = {path: first_valid(ordered, path) for path in dirty if path not in _OWN_PATHS}
        if TIME_TO_GO in dirty or not _TIME_TO_GO_INPUTS.isdisjoint(dirty):
            # A member's own estimate wins; else the aggregate's rule over this battery's values.
            out[TIME_TO_GO] = first_valid(ordered, TIME_TO_GO)
            if out[TIME_TO_GO] is None:
                view = MemberView(self.name, "", {p: first_valid(ordered, p) for p in _TIME_TO_GO_INPUTS})
                out[TIME_TO_GO] = RULES[TIME_TO_GO].compute([view], MergeOptions())
        return out

    def has_voltage(self) -> bool:
        return any(values.get("/Dc/0/Voltage") is not None for _, values, _ in self.members.values())

    def label(self) -> str:
        """Its name for people, as a member's: its CustomName, else its product name."""
        name = self.service["/CustomName"] if self.service is not None and "/CustomName" in self.service else None
        return name if isinstance(name, str) and name else VIRTUAL_PRODUCT_NAME


@dataclass(frozen=True, slots=True)
class VirtualEntry:
    """One entry of a virtual battery's list: a member reference (with its paths, None = all) or a hook."""

    ref: str
    paths: frozenset[str] | None = None
    hook: Hook | None = None


def role_config(config: Config) -> RoleConfig:
    def refs(spec: Any) -> tuple[str, ...]:
        return tuple(spec) if isinstance(spec, (list, dict)) else ()

    virtual = {name: tuple(e.ref for e in entries if e.hook is None)
               for name, entries in virtual_battery_specs(config).items()}
    # Our grid batteries are listed as excluded, so `check --live` shows them so.
    excluded = tuple(config.excludedServices) + tuple(g.serviceName for g in config.gridBatteries)
    return RoleConfig(own_names=frozenset({config.serviceName}), excluded=excluded,
                      primary=refs(config.primaryServices), auxiliary=refs(config.auxiliaryServices),
                      virtual_members=virtual)


def virtual_battery_specs(config: Config) -> dict[str, list[VirtualEntry]]:
    """name -> its entries in config order, from either form (list, or member -> paths)."""
    specs = {}
    for name, spec in config.virtualBatteries.items():
        items = spec.items() if isinstance(spec, dict) else ((ref, []) for ref in spec)
        entries = []
        for ref, paths in items:
            if ref.startswith("class:"):
                entries.append(VirtualEntry(ref, None, build_hook(ref[len("class:"):], config.classes)))
            else:
                entries.append(VirtualEntry(ref, frozenset(paths) if paths else None))
        specs[name] = entries
    return specs
