"""Untrusted values in messages are shown bounded: their beginning and their size."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.bounded import SHOWN_CHARS, bounded_repr


def test_short_values_are_their_repr() -> None:
    assert bounded_repr("-800") == "'-800'"
    assert bounded_repr(b"ON") == "b'ON'"
    assert bounded_repr(12.5) == "12.5"
    assert bounded_repr(None) == "None"


def test_a_long_payload_shows_its_beginning_and_size() -> None:
    text = bounded_repr("A" * 10240)
    assert text.startswith("'AAAA") and text.endswith("... (10240 characters)")
    assert len(text) <= SHOWN_CHARS + 30
    assert bounded_repr(b"\xff" * 5000).endswith("... (5000 bytes)")
    assert len(bounded_repr({"k": list(range(10000))})) <= SHOWN_CHARS


@given(value=st.one_of(st.text(), st.binary(), st.lists(st.text()), st.dictionaries(st.text(), st.integers())),
       limit=st.integers(0, 200))
@settings(max_examples=200, deadline=None)
def test_never_longer_than_the_limit_and_its_size(value: object, limit: int) -> None:
    assert len(bounded_repr(value, limit)) <= max(8, limit) + len(" (99999 characters)")
