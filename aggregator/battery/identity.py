"""Which battery a service publishes, and which service stands for a battery seen through two of them.

A pack is known by its /Serial (or an id the config gives it); two services with the same identity publish one
battery, and the one seen first stands for it. Pure.
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
