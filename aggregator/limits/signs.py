"""Members whose current's sign looks inverted (a driver that counts the other way): its power has the other sign,
or its learned marginal share is clearly negative. Their current is not trusted: the shares fall back to the plain
ratio (capacity), with no operating point, until it looks right again.

Pure: the controller feeds the members' values and its share learner.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .formulas import CHARGE, DISCHARGE
from .shares import ShareLearner

if TYPE_CHECKING:
    from .controller import MemberInput

_LOG = logging.getLogger("aggregator.limits")

# The current-vs-power sign check: only currents this large vote (a few W of noise around 0 A say nothing),
# and a member is suspected after this many net votes (and cleared when they are back to 0).
SIGN_CHECK_MIN_CURRENT = 2.0
SIGN_CHECK_VOTES = 3
# A learned marginal share below this says the member's current falls when the bank's rises: impossible for a
# pack in parallel, so its sign is wrong.
NEGATIVE_SHARE = -0.1


class SignCheck:
    def __init__(self) -> None:
        self.votes: dict[str, int] = {}  # net votes of the current-vs-power check, per member
        self.by_power: set[str] = set()  # suspected by that check: kept until its votes are back to 0
        self.inverted: dict[str, str] = {}  # member -> why its current's sign looks wrong

    def check(self, members: list[MemberInput], learner: ShareLearner, method: str) -> None:
        """Vote on one view of the members and update `inverted` (`method`: the controller's, for the log)."""
        inverted: dict[str, str] = {}
        for m in members:
            name = m.name
            current, power = m.values.get("/Dc/0/Current"), m.values.get("/Dc/0/Power")
            votes = self._vote(m)
            if votes >= SIGN_CHECK_VOTES or (votes > 0 and name in self.by_power):
                self.by_power.add(name)
                inverted[name] = f"its current ({current:g} A) and its power ({power:g} W) have opposite signs" \
                    if current is not None and power is not None else "its current and its power had opposite signs"
                continue
            self.by_power.discard(name)
            for d in (CHARGE, DISCHARGE):
                share = learner.marginal_share(name, d)
                if share is not None and share < NEGATIVE_SHARE:
                    inverted[name] = f"its current falls when the bank's {d} current rises (share {share:.2f})"
                    break
        for name in inverted.keys() - self.inverted.keys():
            label = next((m.label for m in members if m.name == name), name)
            _LOG.warning("the current of %s looks sign-inverted: %s; charge limits fall back to the %s ratio and "
                         "the over-current guard counts its current the other way", label, inverted[name],
                         plain(method))
        for name in self.inverted.keys() - inverted.keys():
            _LOG.info("the current of %s looks right again", name)
        self.inverted = inverted

    def _vote(self, m: MemberInput) -> int:
        """The member's net votes after this view: a large enough current whose power has the other sign votes
        for, one with the same sign against."""
        values = m.values
        current, power = values.get("/Dc/0/Current"), values.get("/Dc/0/Power")
        votes = self.votes.get(m.name, 0)
        if m.fresh and current is not None and power is not None and abs(current) >= SIGN_CHECK_MIN_CURRENT:
            voltage = values.get("/Dc/0/Voltage")
            # A power far below V x I is stale or from elsewhere: no vote.
            if voltage is None or abs(power) >= 0.25 * abs(voltage * current):
                if (power > 0) != (current > 0):
                    votes = min(votes + 1, 2 * SIGN_CHECK_VOTES)
                else:
                    votes = max(votes - 1, 0)
                self.votes[m.name] = votes
        return votes

    def leave(self, name: str) -> None:
        self.votes.pop(name, None)
        self.by_power.discard(name)
        self.inverted.pop(name, None)


def plain(method: str) -> str:
    """The plain ratio a learned or estimated method falls back to when the members' currents are not trusted."""
    return "capacity" if method in ("share", "ir") else method
