"""Which battery a service publishes, and which service stands for a battery seen through two of them.

A pack is known by its /Serial (or an id the config gives it); two services with the same identity publish one
battery, and the one seen first stands for it. `Packs` keeps that for the member table. Pure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping


def identity_of(serial: str | None, configured_id: str | None, service_name: str) -> str:
    """Who a member is across restarts and renames: its serial, else the id the user gave it, else its
    D-Bus name (which changes when a tty number does, hence last)."""
    for candidate in (serial, configured_id):
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip()
    return service_name


@dataclass(frozen=True, slots=True)
class Duplicate:
    """One battery seen under several services, and the one whose values are used."""

    identity: str
    services: tuple[str, ...]
    chosen: str


def find_duplicates(identities: Mapping[str, str],
                    first_seen: Mapping[str, float] | None = None) -> dict[str, Duplicate]:
    """Identities reachable under more than one service ({service: identity} in).

    The service used is the one seen first (smallest `first_seen`), so a second driver that starts later
    for the same pack never takes over; without a time (or on a tie) the lowest name, so the choice is the
    same on every run."""
    by_identity: dict[str, list[str]] = {}
    for service, identity in identities.items():
        by_identity.setdefault(identity, []).append(service)
    seen = first_seen or {}
    out: dict[str, Duplicate] = {}
    for identity, services in by_identity.items():
        if len(services) < 2:
            continue
        ordered = tuple(sorted(services))
        chosen = min(ordered, key=lambda s: (seen.get(s, math.inf), s))
        out[identity] = Duplicate(identity, ordered, chosen)
    return out


class Packs:
    """Which pack every member publishes ({service: identity}) and when each service was first seen, and so which
    service stands for a pack seen through several: the one seen first (see find_duplicates). A service keeps its
    first-seen time while it stays a member, also when its identity changes."""

    def __init__(self) -> None:
        self._identities: dict[str, str] = {}
        self._first_seen: dict[str, float] = {}
        self.duplicates: dict[str, Duplicate] = {}  # identity -> the services publishing it and the one used
        self.shadowed: frozenset[str] = frozenset()  # services another service stands for

    def set(self, service: str, identity: str, now: float) -> bool:
        """`service` publishes the pack `identity` (seen at `now` if it is new); True when that changed."""
        if self._identities.get(service) == identity:
            return False
        self._identities[service] = identity
        self._first_seen.setdefault(service, now)
        self._find()
        return True

    def remove(self, service: str) -> bool:
        """`service` is no member any more; True when it was one."""
        if self._identities.pop(service, None) is None:
            return False
        del self._first_seen[service]
        self._find()
        return True

    def identity_of(self, service: str) -> str | None:
        return self._identities.get(service)

    def services(self) -> list[str]:
        return list(self._identities)

    def published(self, identity: str) -> bool:
        """Whether some member publishes the pack `identity`."""
        return identity in self._identities.values()

    def stands_for(self, service: str) -> str | None:
        """The service that stands for the pack `service` publishes, when more than one publishes it."""
        return next((d.chosen for d in self.duplicates.values() if service in d.services), None)

    def _find(self) -> None:
        self.duplicates = find_duplicates(self._identities, self._first_seen)
        self.shadowed = frozenset(s for d in self.duplicates.values() for s in d.services if s != d.chosen)
