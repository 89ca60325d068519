"""Untrusted values in log lines and error messages, bounded: a hostile payload (an MQTT message, a SetValue, a
config value) is shown by its beginning and its size, never in full, so it cannot fill the log.

Pure; import it wherever something received from outside is named in a message. (Config errors keep
aggregator.validation's short_repr: the config page mirrors its exact text.)
"""
from __future__ import annotations

import reprlib
from typing import Any

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
