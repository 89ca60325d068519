"""The lean D-Bus codec for dbus-next, decoding side: whole messages from bytes, BusItem signals read straight into
their values (see encode.py for why and what it covers)."""
from __future__ import annotations

import io
from typing import Any, Callable

from dbus_next import Message, Variant
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.constants import MessageFlag, MessageType
from dbus_next.signature import SignatureTree

from .encode import (ALIGN, BUSITEM, DOUBLE, HEADER_LE, INT32, LE, U32_BE, U32_LE, Node, Unsupported,
                     compile_signature, single_node)


def _variant(signature: str, value: Any) -> Variant:
    # The bytes were valid D-Bus, so skip the library's re-verification of the value.
    variant = Variant.__new__(Variant)
    variant.type = SignatureTree._get(signature).types[0]
    variant.signature = signature
    variant.value = value
    return variant


def _array_bounds(buf: bytes | bytearray | memoryview, offset: int, element_alignment: int) -> tuple[int, int]:
    """Where an array's elements start and end: its length, then padding to the first element (which the
    length does not count)."""
    offset += -offset & 3
    length = U32_LE.unpack_from(buf, offset)[0]
    offset += 4
    offset += -offset & (element_alignment - 1)
    return offset, offset + length


def _get(buf: bytes | bytearray | memoryview, offset: int, node: Node) -> tuple[Any, int]:
    code = node[0]
    unpacker = LE.get(code)
    if unpacker is not None:
        offset += -offset & (unpacker.size - 1)
        value = unpacker.unpack_from(buf, offset)[0]
        return (bool(value) if code == "b" else value), offset + unpacker.size
    if code == "s" or code == "o":
        offset += -offset & 3
        length = U32_LE.unpack_from(buf, offset)[0]
        start = offset + 4
        return str(buf[start:start + length], "utf-8"), start + length + 1
    if code == "v":
        length = buf[offset]
        signature = str(buf[offset + 1:offset + 1 + length], "utf-8")
        value, offset = _get(buf, offset + 2 + length, single_node(signature))
        return _variant(signature, value), offset
    if code == "a":
        child = node[1]
        offset, end = _array_bounds(buf, offset, ALIGN[child[0]])
        if child[0] == "{":
            key_node, value_node = child[1], child[2]
            result: dict[Any, Any] = {}
            while offset < end:
                offset += -offset & 7
                key, offset = _get(buf, offset, key_node)
                result[key], offset = _get(buf, offset, value_node)
            return result, end
        if child[0] == "y":
            return bytes(buf[offset:end]), end
        items = []
        while offset < end:
            item, offset = _get(buf, offset, child)
            items.append(item)
        return items, end
    if code == "(":
        offset += -offset & 7
        fields = []
        for child in node[1]:
            item, offset = _get(buf, offset, child)
            fields.append(item)
        return fields, offset
    if code == "g":
        length = buf[offset]
        return str(buf[offset + 1:offset + 1 + length], "utf-8"), offset + 2 + length
    raise Unsupported(f"cannot decode {code!r}")


# The variants every BusItem signal is made of, by their type code: (type tree, signature).
_COMMON_TREES = {ord(code): (SignatureTree._get(code).types[0], code) for code in "dsi"}


def _get_dict_of_variants(buf: bytes | bytearray | memoryview, offset: int) -> tuple[dict[str, Any], int]:
    """`a{sv}` with the common variants (d, s, i) read inline; the rest through _get."""
    offset, end = _array_bounds(buf, offset, 8)
    result: dict[str, Any] = {}
    new = Variant.__new__
    while offset < end:
        offset += -offset & 7
        length = U32_LE.unpack_from(buf, offset)[0]
        key = str(buf[offset + 4:offset + 4 + length], "utf-8")
        offset += 5 + length
        tree = _COMMON_TREES.get(buf[offset + 1]) if buf[offset] == 1 else None
        if tree is not None:  # d, s, i: read inline, wrapped without the library's re-verification
            variant = new(Variant)
            variant.type, variant.signature = tree
            variant.value, offset = _plain_value(buf, offset)
            result[key] = variant
            continue
        result[key], offset = _get(buf, offset, ("v",))
    return result, end


_MISSING = object()  # what an entry reader returns for an entry to leave out


def _items_by_path(buf: bytes | bytearray | memoryview, offset: int,
                   read_entry: Callable[[Any, int], tuple[Any, int]]) -> tuple[dict[str, Any], int]:
    """`a{s...}` keyed by path (ItemsChanged, GetItems): {path: read_entry(buf, where its value starts)}."""
    offset, end = _array_bounds(buf, offset, 8)
    result: dict[str, Any] = {}
    while offset < end:
        offset += -offset & 7
        length = U32_LE.unpack_from(buf, offset)[0]
        path = str(buf[offset + 4:offset + 4 + length], "utf-8")
        value, offset = read_entry(buf, offset + 5 + length)
        if value is not _MISSING:
            result[path] = value
    return result, end


def _get_items(buf: bytes | bytearray | memoryview, offset: int) -> tuple[dict[str, Any], int]:
    """`a{sa{sv}}`: ItemsChanged and GetItems, as dbus-next gives them."""
    return _items_by_path(buf, offset, _get_dict_of_variants)


def decode_body(signature: str, buf: bytes | bytearray | memoryview, offset: int = 0) -> list[Any]:
    """The body values of a little-endian message, as dbus-next gives them (dicts, lists, bytes for `ay`,
    Variant for `v`). Offsets are relative to the message start, whose alignment is 8."""
    if signature == "a{sa{sv}}":
        return [_get_items(buf, offset)[0]]
    if signature == "a{sv}":
        return [_get_dict_of_variants(buf, offset)[0]]
    body = []
    for node in compile_signature(signature):
        value, offset = _get(buf, offset, node)
        body.append(value)
    return body


_unwrap: Any = None


def _plain_value(buf: bytes, offset: int) -> tuple[Any, int]:
    """A BusItem value variant -> the Python value (as values.unwrap gives it), the common kinds inline."""
    if buf[offset] == 1:
        code = buf[offset + 1]
        if code == 100:  # 'd'
            offset += 3
            offset += -offset & 7
            return DOUBLE.unpack_from(buf, offset)[0], offset + 8
        if code == 105:  # 'i'
            offset += 3
            offset += -offset & 3
            return INT32.unpack_from(buf, offset)[0], offset + 4
        if code == 115:  # 's'
            offset += 3
            offset += -offset & 3
            length = U32_LE.unpack_from(buf, offset)[0]
            return str(buf[offset + 4:offset + 4 + length], "utf-8"), offset + 5 + length
    global _unwrap
    if _unwrap is None:
        from .values import unwrap  # values imports the library through lib, which imports this module

        _unwrap = unwrap
    variant, offset = _get(buf, offset, ("v",))
    return _unwrap(variant), offset


# Entries that start with their Value as a double or an int32 (as Victron's services send them): the key, the
# variant's signature and the padding are the same bytes every time, and the number sits 16 bytes after the
# entries' (8-aligned) start.
_VALUE_DOUBLE = b"\x05\0\0\0Value\0\x01d\0"
_VALUE_INT32 = b"\x05\0\0\0Value\0\x01i\0"


def _plain_entry_value(buf: bytes, offset: int) -> tuple[Any, int]:
    """The "Value" of an `a{sv}` BusItem entry, or _MISSING, and the end of the array. Other keys ("Text")
    are stepped over, not decoded into objects; a double or int32 Value given first is read in one step."""
    offset, end = _array_bounds(buf, offset, 8)
    if end - offset >= 24 and buf.startswith(_VALUE_DOUBLE, offset):
        return DOUBLE.unpack_from(buf, offset + 16)[0], end
    if end - offset >= 20 and buf.startswith(_VALUE_INT32, offset):
        return INT32.unpack_from(buf, offset + 16)[0], end
    while offset < end:
        offset += -offset & 7
        length = U32_LE.unpack_from(buf, offset)[0]
        is_value = length == 5 and buf[offset + 4:offset + 9] == b"Value"
        offset += 5 + length
        if is_value:
            return _plain_value(buf, offset)[0], end
        _variant, offset = _get(buf, offset, ("v",))
    return _MISSING, end


def _plain_items(buf: bytes, offset: int) -> dict[str, Any]:
    """`a{sa{sv}}` -> {path: value}; entries without a Value are left out (as client.parse_items does)."""
    return _items_by_path(buf, offset, _plain_entry_value)[0]


class BusItemSignal(Message):
    """An ItemsChanged or PropertiesChanged of the BusItem interface as read off the wire. `changes` ({path:
    value}, None for invalid) is decoded straight from the bytes: that is what monitors want, for every update
    of every member. The library's form of the body (dicts of Variants) is decoded only if someone reads it."""

    changes: dict[str, Any]

    @property  # type: ignore[override]
    def body(self) -> list[Any]:
        body = self.__dict__.get("_body")
        if body is None:
            body = self.__dict__["_body"] = decode_body(self.signature, self._data, self._body_at)
        return body

    @body.setter
    def body(self, value: list[Any]) -> None:
        self.__dict__["_body"] = value


def _header_fields(data: bytes, header_end: int) -> dict[int, Any]:
    """The header fields by code; the kinds the specification gives them (o, s, u, g) read inline."""
    fields: dict[int, Any] = {}
    offset = 16
    while offset < header_end:
        offset += -offset & 7
        code = data[offset]
        if data[offset + 1] == 1 and data[offset + 3] == 0:
            kind = data[offset + 2]
            offset += 4
            if kind == 115 or kind == 111:  # 's', 'o'
                offset += -offset & 3
                length = U32_LE.unpack_from(data, offset)[0]
                fields[code] = str(data[offset + 4:offset + 4 + length], "utf-8")
                offset += 5 + length
                continue
            if kind == 117:  # 'u'
                offset += -offset & 3
                fields[code] = U32_LE.unpack_from(data, offset)[0]
                offset += 4
                continue
            if kind == 103:  # 'g'
                length = data[offset]
                fields[code] = str(data[offset + 1:offset + 1 + length], "utf-8")
                offset += 2 + length
                continue
            offset -= 4
        variant, offset = _get(data, offset + 1, ("v",))
        fields[code] = variant.value
    return fields


_FIELDS_SEEN: dict[bytes, dict[int, Any]] = {}  # header fields' bytes -> the fields (read only once decoded)
_FIELDS_KEPT = 512


def decode_message(data: bytes) -> Message:
    """One whole message (starting at offset 0, so alignments hold) -> a dbus-next Message."""
    if data[0] != 108 or data[3] != 1:  # 'l', protocol 1
        return _library_decode(data)  # big-endian (no Venus OS machine is) or broken: the library's code
    body_len, serial, fields_len = HEADER_LE.unpack_from(data, 0)[4:]
    header_end = 16 + fields_len
    # A service's signals differ in their serial, which is not a header field: the fields' bytes repeat.
    raw_fields = bytes(data[16:header_end])
    fields = _FIELDS_SEEN.get(raw_fields)
    if fields is None:
        fields = _header_fields(data, header_end)
        if len(_FIELDS_SEEN) >= _FIELDS_KEPT:
            _FIELDS_SEEN.clear()
        _FIELDS_SEEN[raw_fields] = fields
    if fields.get(9):  # unix fds
        return _library_decode(data)
    signature = fields.get(8, "")
    body_at = header_end + (-header_end & 7)
    interface = fields.get(2)
    message: Message
    try:
        if data[1] == 4 and interface == BUSITEM and body_len and signature in ("a{sa{sv}}", "a{sv}"):
            message = BusItemSignal.__new__(BusItemSignal)
            message._data, message._body_at = data, body_at
            if signature == "a{sv}":
                value, _end = _plain_entry_value(data, body_at)
                message.changes = {} if value is _MISSING else {fields.get(1): value}
            else:
                message.changes = _plain_items(data, body_at)
        else:
            message = Message.__new__(Message)
            message.body = decode_body(signature, data, body_at) if body_len else []
    except Unsupported:
        return _library_decode(data)
    # The bus daemon has checked the names already; Message() would validate each again with regexes.
    message.destination = fields.get(6)
    message.path = fields.get(1)
    message.interface = interface
    message.member = fields.get(3)
    message.message_type = _MESSAGE_TYPES.get(data[1]) or MessageType(data[1])
    flags = _FLAGS.get(data[2])  # MessageFlag.NONE is falsy: no `or` here
    message.flags = flags if flags is not None else MessageFlag(data[2])
    message.error_name = fields.get(4)
    message.reply_serial = fields.get(5)
    message.sender = fields.get(7)
    message.unix_fds = []
    message.signature = signature
    message.signature_tree = SignatureTree._get(signature)
    message.serial = serial
    return message


_MESSAGE_TYPES = {t.value: t for t in MessageType}
_FLAGS = {f: MessageFlag(f) for f in range(8)}


def message_length(data: bytes | bytearray, start: int = 0) -> int | None:
    """The length of the message starting at `start`, or None while its fixed header is incomplete."""
    if len(data) - start < 16:
        return None
    u32 = U32_LE if data[start] == 108 else U32_BE
    header_end = 16 + u32.unpack_from(data, start + 12)[0]
    return header_end + (-header_end & 7) + u32.unpack_from(data, start + 4)[0]


def _library_decode(data: bytes) -> Message:
    unmarshaller = Unmarshaller(io.BytesIO(data))
    if unmarshaller.unmarshall() is None:
        raise ValueError("truncated D-Bus message")
    return unmarshaller.message
