"""Untrusted values, bounded: the largest value we publish or take from another process, and the form a hostile
payload (an MQTT message, a SetValue, a config value) takes in log lines and error messages: its beginning and its
size, never in full, so it cannot fill the log.

Pure; import it wherever something received from outside is named in a message. (Config errors keep
aggregator.validation's short_repr: the config page mirrors its exact text.)
"""
from __future__ import annotations

import reprlib
from typing import Any

# The largest value we publish or take from another process (a write, a member's value): a 20 MB /CustomName
# was republished in every GetItems and signal until the bus dropped our connection. A text counts its
# characters; a list or dict its items, and the whole value its characters and items together.
MAX_TEXT = 1024
MAX_ITEMS = 256
MAX_SIZE = 16384
_CUT = "\u2026"  # what ends a text that was cut
SHOWN_CHARS = 80  # the most of a value a message shows

_REPR = reprlib.Repr()
_REPR.maxstring = SHOWN_CHARS
_REPR.maxother = SHOWN_CHARS
_REPR.maxlong = 40


def bounded_repr(value: Any, limit: int = SHOWN_CHARS) -> str:
    """repr() of `value` in at most `limit` characters (plus, for long text or bytes, their size): a cut value
    ends in '...'. Builds no more than a bounded repr (a 10 MB payload is not copied to be cut)."""
    limit = max(8, limit)
    if isinstance(value, (str, bytes, bytearray)):
        # escapes make a repr up to 4x its text: the slice is generous, the cut below exact
        text = repr(value[:limit]) if len(value) > limit else repr(value)
        if len(value) > limit or len(text) > limit:
            unit = "characters" if isinstance(value, str) else "bytes"
            return f"{text[:limit - 3]}... ({len(value)} {unit})"
        return text
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def bounded_text(text: str, limit: int = 200) -> str:
    """At most `limit` characters of a text someone else controls (a topic, a reason quoting their values),
    saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


# ---- size limits -----------------------------------------------------------------------------------------

def oversize(value: Any) -> str | None:
    """Why a value is too large to publish, or None: a text over MAX_TEXT characters, a list or dict over
    MAX_ITEMS items, or more than MAX_SIZE characters and items in all (at any depth)."""
    kind = type(value)
    if kind is str:
        return f"{len(value)} characters is more than the {MAX_TEXT} allowed" if len(value) > MAX_TEXT else None
    if kind is not list and kind is not tuple and kind is not dict:
        return None
    return _oversize_container(value, [MAX_SIZE])


def _oversize_container(value: Any, budget: list[int]) -> str | None:
    if len(value) > MAX_ITEMS:
        return f"{len(value)} items is more than the {MAX_ITEMS} allowed"
    members = [*value.keys(), *value.values()] if type(value) is dict else value
    for member in members:
        kind = type(member)
        budget[0] -= 1
        if kind is str:
            if len(member) > MAX_TEXT:
                return f"a text of {len(member)} characters is more than the {MAX_TEXT} allowed"
            budget[0] -= len(member)
        elif kind is list or kind is tuple or kind is dict:
            reason = _oversize_container(member, budget)
            if reason is not None:
                return reason
        if budget[0] < 0:
            return f"more than {MAX_SIZE} characters and items in all"
    return None


def bounded(value: Any) -> Any:
    """The value cut to the size limits (see oversize): texts end in an ellipsis, lists and dicts keep their
    first items. Values within the limits come back as they are (the same object)."""
    if oversize(value) is None:
        return value
    return _cut(value, [MAX_SIZE])


def _cut(value: Any, budget: list[int]) -> Any:
    """`value` within what is left of the budget (its container has counted it as an item already)."""
    kind = type(value)
    if kind is str:
        room = min(MAX_TEXT, budget[0])
        if len(value) > room:
            value = value[:max(0, room - 1)] + _CUT
        budget[0] -= len(value)
        return value
    if kind is list or kind is tuple:
        out = []
        for member in value[:MAX_ITEMS]:
            if budget[0] < 2:  # room for the item and something of it
                break
            budget[0] -= 1
            out.append(_cut(member, budget))
        return out
    if kind is dict:
        cut_dict = {}
        for key, member in list(value.items())[:MAX_ITEMS]:
            if budget[0] < 4:
                break
            budget[0] -= 2
            key = _cut(key, budget)
            if key in cut_dict or budget[0] < 1:
                break
            cut_dict[key] = _cut(member, budget)
        return cut_dict
    return value
