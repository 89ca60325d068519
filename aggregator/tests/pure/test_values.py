"""Pure tests of the value encoding (aggregator/bus/values.py): no bus, but real D-Bus marshalling."""
from __future__ import annotations

import enum
import io
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.bus.lib import Message, Variant
from aggregator.battery.paths import format_digits
from aggregator.bus.values import (INVALID, INVALID_TEXT, MAX_ITEMS, MAX_TEXT, NOT_CONVERTIBLE, bounded, converted, fmt,
                                   oversize, product_id_text, same_value, text_of, unwrap, wrap)

# dbus-next's own unmarshaller: what a peer would read from the wire.
from dbus_next._private.unmarshaller import Unmarshaller  # noqa: E402


def over_the_wire(variant: Variant) -> Variant:
    """Marshal a variant into a signal and read it back, as another process would."""
    data = Message.new_signal("/x", "com.example.T", "S", "v", [variant])._marshall()
    unmarshaller = Unmarshaller(io.BytesIO(data))
    assert unmarshaller.unmarshall()
    return unmarshaller.message.body[0]


def deep_same(a: Any, b: Any) -> bool:
    """same_value, recursively through lists and dicts (tuples come back as lists)."""
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(a, list):
        return type(b) is list and len(a) == len(b) and all(deep_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(deep_same(a[k], b[k]) for k in a)
    return same_value(a, b)


_text = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
_leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | _text)
_values = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
                       max_leaves=20)


# ---- wrap / unwrap ---------------------------------------------------------------------------------------

def test_invalid_is_an_empty_int32_array() -> None:
    assert wrap(None) == Variant("ai", [])
    assert INVALID == Variant("ai", [])
    assert unwrap(Variant("ai", [])) is None
    assert unwrap(over_the_wire(wrap(None))) is None
    assert over_the_wire(wrap(None)).signature == "ai"


@pytest.mark.parametrize("value, signature", [
    (0, "i"), (2**31 - 1, "i"), (-(2**31), "i"), (2**31, "x"), (-(2**31) - 1, "x"),
    (2**63 - 1, "x"), (-(2**63), "x"), (2**63, "t"), (2**64 - 1, "t"),
    (1.5, "d"), (True, "b"), (False, "b"), ("", "s"), ("53.2V", "s"),
    ([], "au"), ([1, "a"], "av"), ((1, 2), "av"), ({"a": 1}, "a{sv}"), ({}, "a{sv}"),
])
def test_signatures(value: Any, signature: str) -> None:
    variant = wrap(value)
    assert variant.signature == signature
    back = unwrap(over_the_wire(variant))
    assert deep_same(value, back), (value, back)


def test_ints_beyond_64_bits_become_doubles() -> None:
    assert wrap(2**64) == Variant("d", float(2**64))
    assert wrap(-(2**63) - 1) == Variant("d", float(-(2**63) - 1))
    assert wrap(10**30).signature == "d"


def test_special_floats() -> None:
    for value in (math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308):
        assert unwrap(over_the_wire(wrap(value))) == value
    back = unwrap(over_the_wire(wrap(math.nan)))
    assert type(back) is float and math.isnan(back)


def test_subclasses_and_variants() -> None:
    class Level(enum.IntEnum):
        ALARM = 2

    assert wrap(Level.ALARM) == Variant("i", 2)
    assert type(wrap(Level.ALARM).value) is int
    assert wrap(Variant("u", 5)) == Variant("u", 5)  # a ready variant passes through
    assert unwrap(Variant("ay", b"ab")) == b"ab"
    assert unwrap(Variant("au", [])) == []  # valid empty list, not invalid
    assert unwrap(Variant("ai", [1, 2])) == [1, 2]  # a non-empty ai is a value
    assert unwrap(42) == 42  # plain values from a body pass through
    with pytest.raises(TypeError):
        wrap(object())
    with pytest.raises(TypeError):
        wrap({1, 2})


def test_nested_structures() -> None:
    value = {"a": [1, 2.5, None, "x", [True, {}]], "b": {"c": None, "d": 2**40}}
    variant = wrap(value)
    assert variant.signature == "a{sv}"
    assert variant.value["a"].value[2] == INVALID
    assert variant.value["b"].value["d"] == Variant("x", 2**40)
    assert deep_same(value, unwrap(over_the_wire(variant)))


@settings(max_examples=300, deadline=None)
@given(_values)
def test_round_trip_property(value: Any) -> None:
    variant = wrap(value)
    assert deep_same(value, unwrap(variant))
    assert deep_same(value, unwrap(over_the_wire(variant)))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_int_signature_property(value: int) -> None:
    signature = wrap(value).signature
    if -(2**31) <= value < 2**31:
        assert signature == "i"
    elif value < 2**63:
        assert signature == "x"
    else:
        assert signature == "t"
    assert unwrap(over_the_wire(wrap(value))) == value


# ---- same_value --------------------------------------------------------------------------------------------

def test_same_value_is_type_aware() -> None:
    assert same_value(1, 1)
    assert not same_value(1, 1.0)
    assert not same_value(1, True)
    assert not same_value(1.0, True)
    assert not same_value(0, False)
    assert not same_value(0, None)
    assert not same_value(None, 0.0)
    assert same_value(None, None)
    assert same_value(math.nan, math.nan)
    assert same_value(float("nan"), float("nan"))
    assert not same_value(math.nan, 1.0)
    assert same_value("a", "a") and not same_value("a", "b")
    assert same_value([1, "a"], [1, "a"]) and not same_value([1], [2])
    assert not same_value(-0.0, 1e-300)


@given(_leaves, _leaves)
def test_same_value_property(a: Any, b: Any) -> None:
    assert same_value(a, a)
    assert same_value(a, b) == same_value(b, a)
    if same_value(a, b):
        assert wrap(a).signature == wrap(b).signature


# ---- text ---------------------------------------------------------------------------------------------------

def test_text_of() -> None:
    volts = fmt("{:.2f}V")
    assert text_of(53.2, volts) == "53.20V"
    assert text_of(53, volts) == "53.00V"
    assert text_of(None, volts) == INVALID_TEXT == "---"
    assert text_of(None) == "---"
    assert text_of("n/a", volts) == "n/a"  # the formatter fails on a string: the value's own text
    assert text_of([1, 2], volts) == "[1, 2]"
    assert text_of(7) == "7"
    assert text_of(True) == "True"
    assert text_of(62, lambda v: f"{v:.0f}%") == "62%"
    assert text_of(0, fmt("{:.1f}A")) == "0.0A"  # zero is a value, not invalid


def test_product_id_text() -> None:
    assert product_id_text(0xB0FF) == "0xB0FF"
    assert product_id_text(0xA3E3) == "0xA3E3"
    assert product_id_text("custom") == "custom"


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**6), 10**6) | _text)
def test_text_of_never_fails_for_a_unit_formatter(value: Any) -> None:
    text = text_of(value, fmt("{:.2f}V"))
    assert isinstance(text, str)
    if isinstance(value, str):
        assert text == value
    else:
        assert text.endswith("V")


# ---- size limits -------------------------------------------------------------------------------------------

def test_oversize_names_what_is_too_large() -> None:
    assert oversize("x" * MAX_TEXT) is None and oversize(1.5) is None and oversize(None) is None
    assert "1025 characters is more than the 1024 allowed" in oversize("x" * (MAX_TEXT + 1))
    assert oversize(list(range(MAX_ITEMS))) is None
    assert "257 items" in oversize(list(range(MAX_ITEMS + 1)))
    assert "characters" in oversize(["ok", "x" * (MAX_TEXT + 1)])  # at any depth
    assert "characters" in oversize({"a": {"b": "x" * (MAX_TEXT + 1)}})
    assert "in all" in oversize(["x" * MAX_TEXT] * 20)  # each one fits, all together do not
    assert "in all" in oversize([["x" * 100] * 200] * 200)


def test_bounded_cuts_texts_and_lists_and_keeps_what_fits() -> None:
    fine = ["a", {"b": 1}]
    assert bounded(fine) is fine and bounded("abc") == "abc" and bounded(2.5) == 2.5
    cut = bounded("x" * 5_000_000)
    assert len(cut) == MAX_TEXT and cut.endswith("\u2026")
    assert len(bounded(list(range(1000)))) == MAX_ITEMS
    assert oversize(bounded(["x" * 5000] * 5000)) is None
    assert oversize(bounded({str(i): ["y" * 2000] * 300 for i in range(300)})) is None


# Large values cheaply: a character or a value repeated up to past each limit.
_long_text = st.tuples(st.characters(exclude_categories=("Cs",)), st.integers(0, 3000)).map(lambda t: t[0] * t[1])
_sized = st.recursive(
    st.none() | st.floats() | _text | _long_text,
    lambda inner: (st.tuples(inner, st.integers(0, 400)).map(lambda t: [t[0]] * t[1])
                   | st.lists(inner, max_size=5) | st.dictionaries(_text | _long_text, inner, max_size=5)),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(_sized)
def test_bounded_is_always_within_the_limits_and_publishable(value: Any) -> None:
    cut = bounded(value)
    assert oversize(cut) is None
    wrap(cut)  # still a value D-Bus can carry
    if oversize(value) is None:
        assert cut is value


# ---- SetValue conversion -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, types, expected", [
    (123, (str,), "123"), (1.5, (str,), "1.5"), ("x", (str,), "x"),
    (3, (float,), 3.0), ("2.5", (float,), 2.5), (" 7 ", (float,), 7.0), ("12", (int,), 12), (2.0, (int,), 2),
    ("3", (int, float), 3), ("3.5", (int, float), 3.5), (None, (str,), None), (None, (int,), None),
])
def test_a_written_value_becomes_the_item_type(value: Any, types: tuple[type, ...], expected: Any) -> None:
    got = converted(value, types)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, types", [
    (True, (str,)), (True, (int,)), (False, (float,)), ([1], (str,)), ({"a": 1}, (str,)),
    ("x", (int,)), ("nan", (float,)), ("inf", (float,)), (2.5, (int,)), (math.nan, (int,)), ("1.5", (int,)),
])
def test_what_cannot_be_converted_is_refused(value: Any, types: tuple[type, ...]) -> None:
    assert converted(value, types) is NOT_CONVERTIBLE


# ---- resolution --------------------------------------------------------------------------------------------

def test_format_digits() -> None:
    assert format_digits("{:.2f}V") == 2 and format_digits("{:.0f}W".format) == 0
    assert format_digits("{:.3f}") == 3 and format_digits("{:>8.1f} A") == 1
    for not_fixed in (None, "{}", "{:d}", "{:.1f} {:.2f}", str, lambda v: f"{v:.1f}"):
        assert format_digits(not_fixed) is None
