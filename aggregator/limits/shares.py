"""How the bank current splits between members, learned from their measured currents (the `share` method).

Pure: values in, values out; the controller feeds it complete samples and saves what it learned.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from .formulas import CHARGE, DISCHARGE, Direction


class ShareLearner:
    """Learns how the bank current splits between members from their measured currents (the `share` method).

    Marginal shares: a_k = (exponentially weighted sum of dI_k * sign(dI_bank)) / (the same of |dI_bank|)
    over changes between complete samples, so the larger changes weigh most. Until enough change has been
    seen, the plain ratio s_k = I_k / I_bank (current-weighted the same way) stands in. Both are kept per
    direction of the bank current and fade with time constant `tau` seconds, so a pack that ages, warms up or
    tapers is followed. The prediction error (RMS of the miss of each member's current) is reported.

    Which changes teach the split: those the bank makes on its own (loads, sun) do. Those a published limit
    makes while the bank current sits at it do too, unless that limit tracks the members' currents: it then
    moves with the drift of the member that sets it, whose current stays at its aim whatever its share, and
    learning from that would shrink its share (to half of it, in a steady drift). Whether the marginal shares
    are `settled` (good enough for the limit to track the currents) rests on the bank's own changes alone."""

    def __init__(self, tau: float = 600.0, min_bank_current: float = 2.0, min_change: float = 1.0,
                 enough_change: float = 50.0) -> None:
        self.tau = tau
        self.min_bank_current = min_bank_current
        self.min_change = min_change
        self.enough_change = enough_change  # A of weighted |dI_bank| before marginal shares are trusted
        self._ratio = _WeightedShares()
        self._marginal = _WeightedShares()
        self._own: dict[str, float] = {}  # per direction: the weight of the bank's own changes among them
        self._err: dict[tuple[str, str], float] = {}
        self._last: dict[str, float] | None = None
        self._last_at = 0.0
        self._last_at_limit = (False, False)

    def update(self, currents: Mapping[str, float], now: float, at_limit: bool = False,
               tracking: bool = False) -> None:
        """One complete, simultaneous sample of every member's current (A, + charging). `at_limit`: the bank
        current sits at a published limit; `tracking`: that limit tracks the members' currents."""
        bank = sum(currents.values())
        direction = CHARGE if bank >= 0 else DISCHARGE
        decay = math.exp(-max(0.0, now - self._last_at) / self.tau) if self._last is not None else 1.0
        last = self._last
        # A change from or to a sample at a limit is (partly) the limit's doing.
        tracking = at_limit and tracking
        (was_at_limit, was_tracking), self._last_at_limit = self._last_at_limit, (at_limit, tracking)
        at_limit, tracking = at_limit or was_at_limit, tracking or was_tracking
        if last is not None and set(last) == set(currents) and not tracking:
            d_bank = bank - sum(last.values())
            for name, current in currents.items():
                predicted = self.share(name, direction)
                if predicted is not None and abs(d_bank) >= self.min_change:
                    miss = (current - last[name]) - predicted * d_bank
                    key = (name, direction)
                    prev = self._err.get(key)
                    self._err[key] = miss * miss if prev is None else prev * decay + (1 - decay) * miss * miss
            if abs(d_bank) >= self.min_change:
                self._marginal.add(direction, {n: currents[n] - last[n] for n in currents}, d_bank, decay)
                self._own[direction] = self._own.get(direction, 0.0) * decay + (0.0 if at_limit else abs(d_bank))
        if abs(bank) >= self.min_bank_current:
            self._ratio.add(direction, currents, bank, decay)
        self._last = dict(currents)
        self._last_at = now

    def settled(self, direction: Direction) -> bool:
        """Whether the marginal shares rest on enough of the bank's own changes."""
        return self._own.get(direction, 0.0) >= self.enough_change

    def marginal_share(self, name: str, direction: Direction) -> float | None:
        """The learned marginal share, unclamped (None until enough change was seen). Packs in parallel all
        take more when the bank takes more: a clearly negative one says the member's current sign is wrong."""
        if self._marginal.weight(direction) < self.enough_change:
            return None
        return self._marginal.raw_share(name, direction)

    def share(self, name: str, direction: Direction) -> float | None:
        if self._marginal.weight(direction) >= self.enough_change:
            return self._marginal.share(name, direction)
        return self._ratio.share(name, direction)

    def view(self, direction: Direction) -> tuple[dict[str, float], frozenset[str]]:
        """What share() gives every member in `direction`, and the members whose marginal share is settled
        (settled() and a marginal_share()): the limits read all of them at once, every second."""
        marginal = self._marginal.weight(direction) >= self.enough_change
        raw = (self._marginal if marginal else self._ratio).raw_shares_of(direction)
        settled = frozenset(raw) if marginal and self.settled(direction) else frozenset()
        return {n: max(0.0, v) for n, v in raw.items()}, settled

    def shares(self, direction: Direction) -> dict[str, float]:
        names = self._marginal.names(direction) | self._ratio.names(direction)
        return {n: s for n in names if (s := self.share(n, direction)) is not None}

    def prediction_error(self, name: str, direction: Direction) -> float | None:
        """RMS (A) of the miss between a member's change of current and the learned share's prediction."""
        err = self._err.get((name, direction))
        return None if err is None else math.sqrt(err)

    def predict(self, bank_current: float) -> dict[str, float]:
        direction = CHARGE if bank_current >= 0 else DISCHARGE
        return {name: s * bank_current for name, s in self.shares(direction).items()}

    def forget(self, name: str) -> None:
        self._ratio.forget(name)
        self._marginal.forget(name)
        for key in [k for k in self._err if k[0] == name]:
            del self._err[key]
        if self._last is not None:
            self._last = None  # the next sample has another member set: no difference from it

    def raise_share(self, name: str, direction: Direction, share: float) -> None:
        """The over-current guard: the member carried `share` of the bank current; learn it at once. That is a
        ratio: the marginal shares keep what the bank's changes say (the limit's share floor covers them), so
        a member brought back below its limit is brought back by as much as its marginal share says."""
        self._ratio.raise_share(name, direction, share)

    def to_state(self) -> dict[str, object]:
        return {"ratio": self._ratio.to_state(), "marginal": self._marginal.to_state(), "own": dict(self._own)}

    def load_state(self, state: Mapping[str, object]) -> None:
        for key, target in (("ratio", self._ratio), ("marginal", self._marginal)):
            part = state.get(key)
            if isinstance(part, dict):
                target.load_state(part)
        own = state.get("own")
        if isinstance(own, dict):
            try:
                weights = {str(d): float(v) for d, v in own.items()}
            except (TypeError, ValueError):
                return
            if all(math.isfinite(v) and v >= 0 for v in weights.values()):
                self._own = weights


class _WeightedShares:
    """share_k = sum(w x_k sign(X)) / sum(w |X|) per direction, with exponential fading."""

    def __init__(self) -> None:
        self.num: dict[tuple[str, str], float] = {}
        self.den: dict[str, float] = {}

    def add(self, direction: str, parts: Mapping[str, float], whole: float, decay: float) -> None:
        sign = 1.0 if whole > 0 else -1.0
        self.den[direction] = self.den.get(direction, 0.0) * decay + abs(whole)
        for name, part in parts.items():
            key = (name, direction)
            self.num[key] = self.num.get(key, 0.0) * decay + part * sign

    def weight(self, direction: str) -> float:
        return self.den.get(direction, 0.0)

    def share(self, name: str, direction: str) -> float | None:
        raw = self.raw_share(name, direction)
        return None if raw is None else max(0.0, raw)

    def raw_share(self, name: str, direction: str) -> float | None:
        den = self.den.get(direction)
        num = self.num.get((name, direction))
        if not den or num is None:
            return None
        return num / den

    def raw_shares_of(self, direction: str) -> dict[str, float]:
        """raw_share() of every member known in `direction`."""
        den = self.den.get(direction)
        if not den:
            return {}
        return {n: v / den for (n, d), v in self.num.items() if d == direction}

    def names(self, direction: str) -> set[str]:
        return {n for (n, d) in self.num if d == direction}

    def forget(self, name: str) -> None:
        for key in [k for k in self.num if k[0] == name]:
            del self.num[key]

    def raise_share(self, name: str, direction: str, share: float) -> None:
        den = self.den.get(direction)
        if den:
            key = (name, direction)
            self.num[key] = max(self.num.get(key, 0.0), share * den)

    def to_state(self) -> dict[str, object]:
        return {"num": [[n, d, v] for (n, d), v in self.num.items()], "den": dict(self.den)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        try:
            num = {(str(n), str(d)): float(v) for n, d, v in state.get("num", [])}
            den = {str(d): float(v) for d, v in dict(state.get("den", {})).items()}
        except (TypeError, ValueError):
            return
        if all(math.isfinite(v) and v >= 0 for v in den.values()) and all(math.isfinite(v) for v in num.values()):
            self.num, self.den = num, den
