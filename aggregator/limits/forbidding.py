"""A member that forbids a direction (AllowTo* 0, or a limit of 0): whether it is still connected, as its current
says, and what that holds the bank's limit at.

A BMS that forbids a direction may open its switch (the pack carries nothing: it leaves the sum and the others go
on) or keep its contactor closed, as many CAN BMSes do when cold or full (the pack still takes its share: the bank
must carry nothing, about 0 A for packs in parallel). Drivers publish no state of the power switch
(dbus-serialbattery's AllowToCharge is its FET and its own charge control together), so the currents decide.

Pure: the controller feeds the members' values and limits, and publishes what the hold returns.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .formulas import (CARRYING, CHARGE, DISCHARGE, DISCONNECTED, BankLimit, Direction, MemberLimits,
                       connection_evidence, forbids, test_current_limit)

if TYPE_CHECKING:
    from .controller import MemberInput

_LOG = logging.getLogger("aggregator.limits")

# A test current's evidence that a member is disconnected must last this long: a connected member's current may be
# reported a moment after the others'.
DISCONNECT_CONFIRM = 3.0
# What a member that forbids a direction is taken to be, from its current: still connected (the bank is held at
# 0 A), unknown (the bank may carry a test current's small current until the current tells), or disconnected (it leaves
# the sum).
HELD, PROBING, OUT = "held", "probing", "out"


@dataclass(slots=True)
class Episode:
    """A member forbidding one direction, from the moment it forbids until it allows again."""

    label: str
    state: str  # HELD, PROBING or OUT
    since: float  # when it entered that state
    carried: bool = False  # seen taking current in the direction it forbids (the alarm), until seen disconnected
    cap: float = 0.0  # while probing: the bank current allowed
    disconnected_at: float | None = None  # while probing: since when the currents say it is disconnected
    warned: bool = False  # its taking current was logged


class ForbiddingMembers:
    """The members that forbid a direction, by direction, each followed from its currents."""

    def __init__(self, test_current_interval: float) -> None:
        self.test_current_interval = test_current_interval
        self.episodes: dict[str, dict[str, Episode]] = {CHARGE: {}, DISCHARGE: {}}

    def follow(self, members: list[MemberInput], limits: list[MemberLimits], direction: Direction, now: float,
               inverted: dict[str, str], full_shares: Callable[[], dict[str, float]]) -> dict[str, Episode]:
        """Follow the members that forbid `direction` by what their currents say (`inverted`: the members whose
        current counts the other way; `full_shares`: each fresh member's share if every one took part):
        - it takes current that way (more than the noise): still connected, the bank is held at 0 A, and
          `testCurrentInterval` after the last current it took (at 0 A no current tells anything) a test current begins;
        - nothing tells (the bank carries too little, its current is unknown): probing, the bank may carry at
          most the small current at which the pack, if connected, would take TEST_CURRENT_MULTIPLE x the noise;
        - it takes none while the others take enough that it would, for DISCONNECT_CONFIRM s while probing (at
          once when it starts forbidding): disconnected, it leaves the sum until it takes current again."""
        episodes = self.episodes[direction]
        forbidding = {lim.name: lim for lim in limits if forbids(lim, direction)}
        self._close(episodes, forbidding, {m.name for m in members}, direction)
        if not forbidding:
            return episodes
        sign = 1.0 if direction == CHARGE else -1.0
        currents: dict[str, float] = {}
        for m in members:
            current = m.values.get("/Dc/0/Current")
            if m.fresh and current is not None:
                currents[m.name] = -sign * current if m.name in inverted else sign * current
        shares = full_shares()
        for name, lim in forbidding.items():
            own = currents.get(name)
            share = shares.get(name)
            evidence = connection_evidence(own, sum(c for n, c in currents.items() if n != name), share)
            if name not in episodes:
                episodes[name] = self._open(lim, evidence, direction, share, now)
            episode = episodes[name]
            episode.label, episode.cap = lim.label, test_current_limit(share)
            self._step(episode, evidence, own, direction, now)
        return episodes

    @staticmethod
    def _close(episodes: dict[str, Episode], forbidding: dict[str, MemberLimits], present: set[str],
               direction: Direction) -> None:
        """End the episodes of the members that allow the direction again or left."""
        for name in [n for n in episodes if n not in forbidding]:
            episode = episodes.pop(name)
            if episode.warned:
                _LOG.info("%s %s: the bank's %s limit is no longer held for it", episode.label,
                          f"allows {_ing(direction)} again" if name in present else "left", word(direction))

    @staticmethod
    def _open(lim: MemberLimits, evidence: str | None, direction: Direction, share: float | None,
              now: float) -> Episode:
        state = HELD if evidence == CARRYING else OUT if evidence == DISCONNECTED else PROBING
        if state == PROBING:
            _LOG.info("%s forbids %s and no current shows yet whether it is still connected: the bank's "
                      "%s current is at most %g A until one does", lim.label, _ing(direction), word(direction),
                      test_current_limit(share))
        return Episode(lim.label, state, now)

    def _step(self, episode: Episode, evidence: str | None, own: float | None, direction: Direction,
              now: float) -> None:
        """One member's episode, on what its current says now."""
        if evidence == CARRYING:  # the test current is due `testCurrentInterval` after the last current it took
            episode.state, episode.since, episode.disconnected_at = HELD, now, None
            if not episode.carried:
                episode.carried = True
                _log_carrying(episode, direction, own)
        elif episode.state == HELD:
            if now - episode.since >= self.test_current_interval:
                episode.state, episode.since = PROBING, now
                _LOG.debug("%s: probing whether it still takes %s current", episode.label, word(direction))
        elif episode.state == PROBING:
            if evidence != DISCONNECTED:
                episode.disconnected_at = None
            elif episode.disconnected_at is None:
                episode.disconnected_at = now
            elif now - episode.disconnected_at >= DISCONNECT_CONFIRM:
                episode.state, episode.since, episode.disconnected_at = OUT, now, None
                (_LOG.info if episode.carried else _LOG.debug)(
                    "%s forbids %s and takes no %s current while the others do: it is disconnected and leaves "
                    "the sum", episode.label, _ing(direction), word(direction))
                episode.carried = False

    def hold(self, bank: BankLimit, direction: Direction) -> tuple[BankLimit, tuple[str, str] | None]:
        """The bank's limit held for the members that forbid `direction` and are not seen disconnected: at 0 A
        while one still takes current that way, at a test current's while probing; with the status line (its
        text and its key, see Note) that says so."""
        episodes = [e for e in self.episodes[direction].values() if e.state != OUT]
        if not episodes:
            return bank, None
        w = word(direction)
        ing = _ing(direction)
        key = f"{w} limit held: " + ", ".join(sorted(e.label for e in episodes)) + f" forbid {ing}"
        held = sorted(e.label for e in episodes if e.state == HELD)
        if held:
            names = ", ".join(held)
            why = f"{names} {verb(held, 'forbid')} {ing} and still {verb(held, 'take')} {w} current"
            off = " (which switches the inverter off)" if direction == DISCHARGE else ""
            return dataclasses.replace(bank, value=0.0, reason=f"held at 0 A{off}: {why}"), \
                (f"{w} limit held at 0 A{off}: {why}", key)
        if not bank.value:
            return bank, None  # nobody else takes current that way: nothing to test with
        probing = sorted(e.label for e in episodes)
        cap = min(e.cap for e in episodes)
        names = ", ".join(probing)
        why = (f"at most {cap:g} A while probing whether {names}, which {verb(probing, 'forbid')} {ing}, still "
               f"{verb(probing, 'take')} {w} current")
        if bank.value > cap:
            return dataclasses.replace(bank, value=cap, reason=why), (f"{w} limit {why}", key)
        return bank, (f"{w} limit {why}", key)

    def alarmed(self, direction: Direction) -> bool:
        """Whether a member that forbids `direction` was seen taking current in it (and not disconnected since)."""
        return any(e.carried and e.state != OUT for e in self.episodes[direction].values())

    def holding_flag(self, direction: Direction) -> bool:
        """Whether a member that forbids `direction` still takes current in it: the bank's flag is cleared."""
        return any(e.state == HELD for e in self.episodes[direction].values())

    @property
    def ticking(self) -> bool:
        """Whether time alone changes them: a test current that is due, a disconnection being confirmed."""
        return any(e.state == HELD or e.disconnected_at is not None
                   for episodes in self.episodes.values() for e in episodes.values())

    def leave(self, name: str) -> None:
        for episodes in self.episodes.values():
            episodes.pop(name, None)


def as_forbidding(limits: MemberLimits, direction: Direction) -> MemberLimits:
    """A member's limits as one that forbids the direction (it leaves the shares)."""
    if direction == CHARGE:
        return dataclasses.replace(limits, allow_charge=0)
    return dataclasses.replace(limits, allow_discharge=0)


def _log_carrying(episode: Episode, direction: Direction, current: float | None) -> None:
    if episode.warned:  # once per episode: it may take current again after being seen disconnected
        _LOG.debug("%s takes %s current again", episode.label, word(direction))
        return
    episode.warned = True
    if direction == CHARGE:
        _LOG.warning("%s forbids charging but still takes %.1f A of charge current: the bank's charge limit is "
                     "held at 0 A until it allows charging again or is seen disconnected", episode.label,
                     current or 0.0)
    else:
        _LOG.warning("%s forbids discharging but still takes %.1f A of discharge current: the bank's discharge "
                     "limit is held at 0 A, which switches the inverter off, until it allows discharging again "
                     "or is seen disconnected", episode.label, current or 0.0)


def word(direction: Direction) -> str:
    return "charge" if direction == CHARGE else "discharge"


def _ing(direction: Direction) -> str:
    return "charging" if direction == CHARGE else "discharging"


def verb(names: list[str], base: str) -> str:
    return base if len(names) > 1 else base + "s"
