"""The lean codec must produce and accept exactly what dbus-next's own codec does."""
from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator.bus.lib import LIBRARY

pytestmark = pytest.mark.skipif(LIBRARY != "dbus-next", reason="the codec is for dbus-next only")

from dbus_next import Message, MessageType, Variant  # noqa: E402
from dbus_next._private.unmarshaller import Unmarshaller  # noqa: E402

from aggregator.bus import decode, encode  # noqa: E402
from aggregator.bus.client import parse_items  # noqa: E402
from aggregator.bus.values import unwrap  # noqa: E402

int32 = st.integers(-(2**31), 2**31 - 1)
text = st.text(max_size=12)
path = st.from_regex(r"\A(/[A-Za-z0-9_]{1,6}){0,4}\Z").map(lambda p: p or "/")
scalar_variant = st.one_of(
    st.floats(allow_nan=False).map(lambda v: Variant("d", v)),
    int32.map(lambda v: Variant("i", v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: Variant("x", v)),
    text.map(lambda v: Variant("s", v)),
    st.booleans().map(lambda v: Variant("b", v)),
    st.integers(0, 255).map(lambda v: Variant("y", v)),
    st.lists(int32, max_size=3).map(lambda v: Variant("ai", v)),
    st.lists(st.floats(allow_nan=False), max_size=3).map(lambda v: Variant("ad", v)),
    st.binary(max_size=5).map(lambda v: Variant("ay", v)),
)
variant = st.recursive(scalar_variant, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(lambda v: Variant("av", v)),
    st.dictionaries(text, inner, max_size=3).map(lambda v: Variant("a{sv}", v)),
    st.tuples(text, inner).map(lambda v: Variant("(sv)", list(v))),
), max_leaves=8)
items = st.dictionaries(path, st.dictionaries(st.sampled_from(["Value", "Text"]), variant, max_size=2), max_size=5)


def library_bytes(signature: str, body: list[Any], **fields: Any) -> bytes:
    return Message(message_type=MessageType.SIGNAL, signature=signature, body=body, serial=7, **fields)._marshall()


def library_read(data: bytes) -> Message:
    unmarshaller = Unmarshaller(io.BytesIO(data))
    assert unmarshaller.unmarshall() is not None
    return unmarshaller.message


def fast_read(data: bytes) -> Message:
    assert decode.message_length(data) == len(data)
    return decode.decode_message(data)


@settings(max_examples=100, deadline=None)
@given(items)
def test_items_changed_bytes_match_the_library(body: dict[str, Any]) -> None:
    fields = {"path": "/", "interface": "com.victronenergy.BusItem", "member": "ItemsChanged"}
    expected = library_bytes("a{sa{sv}}", [body], **fields)
    ours = encode.FastMessage(message_type=MessageType.SIGNAL, signature="a{sa{sv}}", body=[body], serial=7, **fields)
    assert ours._marshall() == expected


@settings(max_examples=100, deadline=None)
@given(items, st.sampled_from([None, ":1.42"]), st.sampled_from([None, "com.victronenergy.battery.x"]))
# An item without entries followed by a key that looks like the start of a "Value" entry.
@example({"/A": {}, "Value": {"Value": Variant("d", 1.0)}}, None, None)
def test_decoding_matches_the_library(body: dict[str, Any], sender: str | None, destination: str | None) -> None:
    data = library_bytes("a{sa{sv}}", [body], path="/", interface="com.victronenergy.BusItem", member="ItemsChanged",
                         sender=sender, destination=destination)
    theirs, ours = library_read(data), fast_read(data)
    for attribute in ("path", "interface", "member", "sender", "destination", "serial", "signature", "message_type",
                      "flags", "reply_serial", "error_name"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    # What monitors read: the values straight off the wire, as parse_items makes them of the library's body.
    assert ours.changes == parse_items(theirs.body[0])
    assert ours.body == theirs.body


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["Value", "Text", "Min"]), variant, max_size=3), path)
def test_properties_changed_values_match_the_library(body: dict[str, Any], where: str) -> None:
    data = library_bytes("a{sv}", [body], path=where, interface="com.victronenergy.BusItem",
                         member="PropertiesChanged", sender=":1.9")
    theirs, ours = library_read(data), fast_read(data)
    assert ours.changes == ({where: unwrap(body["Value"])} if "Value" in body else {})
    assert ours.body == theirs.body


@pytest.mark.parametrize("signature, body", [
    ("", []),
    ("a{sv}", [{"Value": Variant("d", 1.5), "Text": Variant("s", "1.5 V")}]),
    ("sa{sv}as", ["com.victronenergy.BusItem", {"x": Variant("ai", [])}, ["a", "b"]]),
    ("(ybnqiuxtd)", [[1, True, -2, 3, -4, 5, -6, 7, 8.5]]),
    ("a(ssay)", [[["a", "b", b"\x00\x01"], ["", "", b""]]]),
    ("gov", ["a{sv}", "/a/b", Variant("as", ["x"])]),
])
def test_other_signatures_round_trip(signature: str, body: list[Any]) -> None:
    data = library_bytes(signature, body, path="/p", member="M", interface="a.b")
    assert encode.FastMessage(message_type=MessageType.SIGNAL, signature=signature, body=body, serial=7, path="/p",
                            member="M", interface="a.b")._marshall() == data
    assert fast_read(data).body == library_read(data).body


def test_big_endian_messages_go_to_the_library_code() -> None:
    # Only little-endian machines run Venus OS; a big-endian message is rare enough for the slow path.
    import struct
    fields = bytes([1, 1]) + b"o\0" + struct.pack(">I", 1) + b"/\0" + bytes(6)
    fields += bytes([3, 1]) + b"s\0" + struct.pack(">I", 8) + b"GetValue\0"
    data = struct.pack(">BBBBIII", ord("B"), 1, 0, 1, 0, 9, len(fields)) + fields
    data += bytes(-len(data) & 7)
    message = fast_read(data)
    assert (message.path, message.member, message.serial, message.body) == ("/", "GetValue", 9, [])


# Python values as services publish them: the direct ItemsChanged encoder must give what the library gives
# for the variants values.wrap makes of them.
bus_value = st.recursive(
    st.one_of(st.none(), st.floats(allow_nan=False), st.integers(-(2**70), 2**70), text, st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=6,
)


class _Item:
    def __init__(self, path: str, value: Any, text: str) -> None:
        self.path, self.value, self.text = path, value, text


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(path, st.tuples(bus_value, text), max_size=6), st.integers(1, 2**32 - 1))
def test_direct_items_changed_matches_the_library(values: dict[str, tuple[Any, str]], serial: int) -> None:
    from aggregator.bus.values import wrap

    items = [_Item(p, v, t) for p, (v, t) in values.items()]
    body = {i.path: {"Value": wrap(i.value), "Text": Variant("s", i.text)} for i in items}
    expected = Message(message_type=MessageType.SIGNAL, path="/", interface="com.victronenergy.BusItem",
                       member="ItemsChanged", signature="a{sa{sv}}", body=[body], serial=serial)._marshall()
    assert encode.ItemsChangedEncoder("com.victronenergy.BusItem").encode(serial, items) == expected


@given(st.floats(0.0, 1e7), st.sampled_from([0.1, 0.2, 0.225, 0.5, 1.0, 5.0, 10.0]))
def test_a_beat_is_the_next_multiple_of_its_period_and_the_ticks_fall_on_the_polls(now, period) -> None:
    from aggregator.bus.beats import READ_BEAT, next_beat

    beat = next_beat(now, period)
    assert now < beat + 1e-6 * period
    if period <= READ_BEAT:  # a multiple of its period
        assert beat - now <= period * (1 + 1e-6)
        assert abs(beat - round(beat / period) * period) <= 1e-6
    else:  # a longer period's beat is the first read beat from its multiple: one wake-up for both
        assert beat - now <= (period + READ_BEAT) * (1 + 1e-6)
        assert next_beat(beat - 0.01, READ_BEAT) == beat
        after = next_beat(beat, period)  # and the next one comes a period later, give or take a read beat
        assert period - READ_BEAT < after - beat < period + READ_BEAT
    # A tick's beat (1 s) is also a poll's, the same float: their timers fall due in one wake-up.
    tick = next_beat(now, 1.0)
    assert next_beat(tick - 0.1, READ_BEAT) == tick
