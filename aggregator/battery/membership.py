"""Which battery service plays which role for an aggregate: member, primary, auxiliary, excluded...

Pure. Services are referred to in the config by full name, `name:<CustomName>` or `serial:<Serial>`;
references are resolved against the services on the bus each time they change, so a renamed tty or a
service that appears late is followed. A reference that matches nothing is reported, never fatal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

CHAIN_PATH = "/Aggregator/Chain"  # our aggregates list themselves and every aggregate below them here

MEMBER = "member"
OWN = "own"
EXCLUDED = "excluded"
PRIMARY = "primary"
AUXILIARY = "auxiliary"
VIRTUAL_MEMBER = "virtual member"
LOOP = "loop"


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What reference resolution needs to know of a service on the bus."""

    name: str
    custom_name: str | None = None
    serial: str | None = None
    chain: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, values: Mapping[str, Any]) -> ServiceInfo:
        chain = values.get(CHAIN_PATH)
        return cls(name, _text(values.get("/CustomName")), _text(values.get("/Serial")),
                   tuple(c for c in chain if isinstance(c, str)) if isinstance(chain, list) else ())


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def resolve(ref: str, services: Iterable[ServiceInfo]) -> list[str]:
    """The service names a reference matches now (a full name matches itself even when absent)."""
    if ref.startswith("name:"):
        wanted = ref[5:]
        return [s.name for s in services if s.custom_name == wanted]
    if ref.startswith("serial:"):
        wanted = ref[7:]
        return [s.name for s in services if s.serial == wanted]
    return [ref]


@dataclass(frozen=True, slots=True)
class RoleConfig:
    """The references of one aggregate's config, by role. Virtual batteries: name -> member references."""

    own_names: frozenset[str]
    excluded: tuple[str, ...] = ()
    primary: tuple[str, ...] = ()
    auxiliary: tuple[str, ...] = ()
    virtual_members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class Roles:
    roles: dict[str, str]  # service name -> role
    virtual_of: dict[str, str]  # service name -> the virtual battery it belongs to
    unresolved: list[str]  # references that match no service on the bus
    ambiguous: list[str]  # references that match more than one service (all are used)
    conflicts: list[str]  # services that two roles claim (the first role in precedence wins)


def assign_roles(config: RoleConfig, services: Iterable[ServiceInfo]) -> Roles:
    """The role of every service on the bus. Precedence when two roles claim one service (a config checked
    at load cannot list one reference twice, but `name:` and a full name can meet on one service): own,
    excluded, primary, auxiliary, virtual member."""
    services = list(services)
    present = {s.name for s in services}
    roles: dict[str, str] = {}
    virtual_of: dict[str, str] = {}
    unresolved: list[str] = []
    ambiguous: list[str] = []
    conflicts: list[str] = []

    def claim(refs: Iterable[str], role: str, virtual: str | None = None) -> None:
        for ref in refs:
            names = [n for n in resolve(ref, services) if n in present]
            if not names and (role != EXCLUDED or ref.startswith(("name:", "serial:"))):
                unresolved.append(ref)  # an excluded service that is simply absent is no news
            elif len(names) > 1:
                ambiguous.append(ref)
            for name in names:
                if name in roles:
                    if roles[name] != role or virtual_of.get(name) != virtual:
                        conflicts.append(name)
                    continue
                roles[name] = role
                if virtual is not None:
                    virtual_of[name] = virtual

    for name in config.own_names & present:
        roles[name] = OWN
    claim(config.excluded, EXCLUDED)
    claim(config.primary, PRIMARY)
    claim(config.auxiliary, AUXILIARY)
    for virtual, refs in config.virtual_members.items():
        claim(refs, VIRTUAL_MEMBER, virtual)
    for service in services:
        if service.name in roles:
            continue
        # Another aggregate that contains one of ours (directly or further down) would count us twice.
        roles[service.name] = LOOP if config.own_names.intersection(service.chain) else MEMBER
    return Roles(roles, virtual_of, unresolved, ambiguous, conflicts)
