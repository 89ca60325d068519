"""A lean D-Bus wire codec for dbus-next, for the messages on the hot path.

dbus-next 0.2.3 (pure Python) spends most of the service's CPU in its marshaller and unmarshaller: every
element goes through several method calls, and every variant re-verifies its value against its signature.
This codec compiles a signature once into a small tree and walks values with struct directly. It produces
and accepts exactly the bytes of the D-Bus specification for little-endian messages; anything else (big-endian,
unix fds) falls back to the library's own code. dbus-fast already has a
compiled codec; this module is used only on dbus-next.
"""
from __future__ import annotations

import io
import logging
import struct
from functools import lru_cache
from typing import Any, Callable

from dbus_next import Message, Variant
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.constants import MessageFlag, MessageType
from dbus_next.signature import SignatureTree

# (struct format, alignment) of the fixed-size types; 'b' is a uint32 on the wire.
_FIXED = {"y": ("B", 1), "b": ("I", 4), "n": ("h", 2), "q": ("H", 2), "i": ("i", 4), "u": ("I", 4),
          "x": ("q", 8), "t": ("Q", 8), "d": ("d", 8), "h": ("I", 4)}
_ALIGN = {**{k: a for k, (_f, a) in _FIXED.items()}, "s": 4, "o": 4, "g": 1, "v": 1, "a": 4, "(": 8, "{": 8}
_LE = {k: struct.Struct("<" + f) for k, (f, _a) in _FIXED.items()}
_U32_LE = struct.Struct("<I")
_HEADER_LE = struct.Struct("<BBBBIII")

_LOG = logging.getLogger(__name__)

Node = tuple[Any, ...]  # (code,) | ("a", child) | ("(", children) | ("{", key, value)


class Unsupported(Exception):
    """The codec does not handle this message; the library's own code must."""


# ---- signatures -----------------------------------------------------------------------------------------

def _parse_one(signature: str, i: int) -> tuple[Node, int]:
    code = signature[i]
    if code == "a":
        child, j = _parse_one(signature, i + 1)
        return ("a", child), j
    if code == "(":
        children = []
        i += 1
        while signature[i] != ")":
            child, i = _parse_one(signature, i)
            children.append(child)
        return ("(", tuple(children)), i + 1
    if code == "{":
        key, j = _parse_one(signature, i + 1)
        value, j = _parse_one(signature, j)
        if signature[j] != "}":
            raise Unsupported(f"bad dict entry in {signature!r}")
        return ("{", key, value), j + 1
    if code in _FIXED or code in "sogv":
        return (code,), i + 1
    raise Unsupported(f"unknown type code {code!r}")


@lru_cache(maxsize=512)
def compile_signature(signature: str) -> tuple[Node, ...]:
    nodes = []
    i = 0
    while i < len(signature):
        node, i = _parse_one(signature, i)
        nodes.append(node)
    return tuple(nodes)


@lru_cache(maxsize=512)
def _single(signature: str) -> Node:
    nodes = compile_signature(signature)
    if len(nodes) != 1:
        raise Unsupported(f"a variant needs one complete type, not {signature!r}")
    return nodes[0]


# ---- encoding -------------------------------------------------------------------------------------------

def _pad(buf: bytearray, alignment: int) -> None:
    extra = -len(buf) & (alignment - 1)
    if extra:
        buf += bytes(extra)


def _put_string(buf: bytearray, text: str) -> None:
    raw = text.encode()
    _pad(buf, 4)
    buf += _U32_LE.pack(len(raw))
    buf += raw
    buf.append(0)


def _put_signature(buf: bytearray, text: str) -> None:
    raw = text.encode()
    buf.append(len(raw))
    buf += raw
    buf.append(0)


def _put(buf: bytearray, node: Node, value: Any) -> None:
    code = node[0]
    packer = _LE.get(code)
    if packer is not None:
        if code == "h":
            raise Unsupported("unix fds")
        _pad(buf, packer.size)
        buf += packer.pack(value)
    elif code == "s" or code == "o":
        _put_string(buf, value)
    elif code == "v":
        signature = value.signature
        _put_signature(buf, signature)
        _put(buf, _single(signature), value.value)
    elif code == "a":
        _pad(buf, 4)
        at = len(buf)
        buf += b"\0\0\0\0"
        child = node[1]
        _pad(buf, _ALIGN[child[0]])  # the first element's padding is not part of the length
        start = len(buf)
        if child[0] == "{":
            key_node, value_node = child[1], child[2]
            for key, item in value.items():
                _pad(buf, 8)
                _put(buf, key_node, key)
                _put(buf, value_node, item)
        elif child[0] == "y" and isinstance(value, (bytes, bytearray)):
            buf += value
        else:
            for item in value:
                _put(buf, child, item)
        _U32_LE.pack_into(buf, at, len(buf) - start)
    elif code == "(":
        _pad(buf, 8)
        for child, item in zip(node[1], value, strict=True):
            _put(buf, child, item)
    elif code == "g":
        _put_signature(buf, value)
    else:
        raise Unsupported(f"cannot encode {code!r}")


_DOUBLE = struct.Struct("<d")
_INT32 = struct.Struct("<i")


def _put_dict_of_variants(buf: bytearray, entries: dict[str, Any]) -> None:
    """`a{sv}` with the common variants (d, i, s) written inline: every BusItem signal is made of these."""
    _pad(buf, 4)
    at = len(buf)
    buf += b"\0\0\0\0"
    _pad(buf, 8)
    start = len(buf)
    for key, variant in entries.items():
        _pad(buf, 8)
        raw = key.encode()
        buf += _U32_LE.pack(len(raw))
        buf += raw
        buf.append(0)
        signature = variant.signature
        if signature == "d":
            buf += b"\x01d\0"
            _pad(buf, 8)
            buf += _DOUBLE.pack(variant.value)
        elif signature == "s":
            buf += b"\x01s\0"
            _put_string(buf, variant.value)
        elif signature == "i":
            buf += b"\x01i\0"
            _pad(buf, 4)
            buf += _INT32.pack(variant.value)
        else:
            _put_signature(buf, signature)
            _put(buf, _single(signature), variant.value)
    _U32_LE.pack_into(buf, at, len(buf) - start)


def _encode_items(items: dict[str, dict[str, Any]]) -> bytearray:
    """`a{sa{sv}}`, the body of ItemsChanged and GetItems."""
    buf = bytearray(8)  # array length, then padding to the first (8-aligned) dict entry
    for path, entries in items.items():
        _pad(buf, 8)
        _put_string(buf, path)
        _put_dict_of_variants(buf, entries)
    _U32_LE.pack_into(buf, 0, len(buf) - 8)
    return buf


def encode_body(signature: str, body: list[Any]) -> bytearray:
    if signature == "a{sa{sv}}":
        return _encode_items(body[0])
    if signature == "a{sv}":
        buf = bytearray()
        _put_dict_of_variants(buf, body[0])
        return buf
    buf = bytearray()
    for node, value in zip(compile_signature(signature), body, strict=True):
        _put(buf, node, value)
    return buf


# Header fields of the specification: code, value type.
_FIELDS = (("path", 1, "o"), ("interface", 2, "s"), ("member", 3, "s"), ("error_name", 4, "s"),
           ("reply_serial", 5, "u"), ("destination", 6, "s"), ("sender", 7, "s"), ("signature", 8, "g"))


def encode_message(msg: Message) -> bytes:
    if msg.unix_fds:
        raise Unsupported("unix fds")
    body = encode_body(msg.signature, msg.body) if msg.signature else bytearray()
    fields = bytearray()
    for attribute, code, kind in _FIELDS:
        value = getattr(msg, attribute)
        if not value:
            continue
        _pad(fields, 8)
        fields.append(code)
        _put_signature(fields, kind)
        _put(fields, (kind,), value)
    head = bytearray(_HEADER_LE.pack(ord("l"), msg.message_type.value, msg.flags.value, 1, len(body), msg.serial,
                                     len(fields)))
    head += fields
    _pad(head, 8)
    head += body
    return bytes(head)


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _put_value_variant(buf: bytearray, value: Any) -> None:
    """A BusItem value without a fixed layout (text, a bool, a wide int, a list...) as a variant: text
    inline, the rest through the same mapping as values.wrap."""
    if type(value) is str:
        buf += b"\x01s\0"
        _put_string(buf, value)
        return
    from .values import wrap  # values imports the library through lib, which imports this module

    variant = wrap(value)
    _put_signature(buf, variant.signature)
    _put(buf, _single(variant.signature), variant.value)


def _signal_fields(path: str, interface: str, member: str, signature: str) -> bytes:
    fields = bytearray()
    for code, kind, value in ((1, "o", path), (2, "s", interface), (3, "s", member), (8, "g", signature)):
        _pad(fields, 8)
        fields.append(code)
        _put_signature(fields, kind)
        _put(fields, (kind,), value)
    return bytes(fields)


_ZEROS = tuple(bytes(n) for n in range(8))
# One item's entries after its 8-aligned start, where the layout is fixed by the value's kind:
# "Value" (u32 5, 'Value', NUL), the variant's signature, padding to the value, the value, padding to 8, then
# "Text" (u32 4, 'Text', NUL) and its signature 's'; the text's length and bytes follow (4-aligned there).
_VALUE_KEY = b"\x05\0\0\0Value\0"
_TEXT_KEY = b"\x04\0\0\0Text\0\x01s\0"
_DOUBLE_ITEM = _VALUE_KEY + b"\x01d\0" + bytes(3)  # 16: the double, then the Text entry at 24
_INT_ITEM = _VALUE_KEY + b"\x01i\0" + bytes(3)  # 16: the int32, 4 bytes of padding, the Text entry at 24
_INVALID_ITEM = _VALUE_KEY + b"\x02ai\0" + bytes(2) + bytes(4) + bytes(4)  # `ai` [] and padding: Text at 24


class ItemsChangedEncoder:
    """Encodes a service's ItemsChanged signal straight from its items (anything with .path, .value and
    .text): no Message, no Variant per value. Only the serial and the body differ between two signals, so the
    header fields are built once; each path's string is encoded once; floats, int32s and invalid values
    have a fixed layout and are written in one piece."""

    __slots__ = ("_fields", "_pad_after", "_paths")

    def __init__(self, interface: str) -> None:
        self._fields = _signal_fields("/", interface, "ItemsChanged", "a{sa{sv}}")
        self._pad_after = bytes(-(16 + len(self._fields)) & 7)
        self._paths: dict[str, bytes] = {}

    def _path(self, path: str) -> bytes:
        raw = path.encode()
        encoded = self._paths[path] = _U32_LE.pack(len(raw)) + raw + b"\0"
        return encoded

    def encode(self, serial: int, items: Any) -> bytes:
        buf = bytearray(8)  # the array's length, then padding to its first (8-aligned) entry
        zeros = _ZEROS
        paths = self._paths
        u32 = _U32_LE.pack
        pack_into = _U32_LE.pack_into
        for item in items:
            buf += zeros[-len(buf) & 7]
            buf += paths.get(item.path) or self._path(item.path)
            buf += zeros[-len(buf) & 3]
            at = len(buf)
            buf += b"\0\0\0\0"  # the entries' length, set below
            buf += zeros[-len(buf) & 7]
            start = len(buf)
            value = item.value
            kind = type(value)
            if kind is float:
                buf += _DOUBLE_ITEM
                buf += _DOUBLE.pack(value)
            elif kind is int and _INT32_MIN <= value <= _INT32_MAX:
                buf += _INT_ITEM
                buf += _INT32.pack(value)
                buf += b"\0\0\0\0"
            elif value is None:
                buf += _INVALID_ITEM
            else:
                buf += _VALUE_KEY
                _put_value_variant(buf, value)
                buf += zeros[-len(buf) & 7]
            buf += _TEXT_KEY
            raw = item.text.encode()
            buf += u32(len(raw))
            buf += raw
            buf += b"\0"
            pack_into(buf, at, len(buf) - start)
        pack_into(buf, 0, len(buf) - 8)
        fields = self._fields
        head = _HEADER_LE.pack(108, 4, 0, 1, len(buf), serial, len(fields))  # 'l', SIGNAL, no flags, version 1
        return b"".join((head, fields, self._pad_after, buf))


class FastMessage(Message):
    """A dbus-next Message that marshals itself with this codec (the library's writer calls _marshall).
    The constructors return this class, so replies and signals built with them take the lean path too."""

    @classmethod
    def new_error(cls, msg: Message, error_name: str, error_text: str) -> FastMessage:
        return cls(message_type=MessageType.ERROR, reply_serial=msg.serial, destination=msg.sender,
                   error_name=error_name, signature="s", body=[error_text])

    @classmethod
    def new_method_return(cls, msg: Message, signature: str = "", body: list[Any] | None = None,
                          unix_fds: list[int] | None = None) -> FastMessage:
        return cls(message_type=MessageType.METHOD_RETURN, reply_serial=msg.serial, destination=msg.sender,
                   signature=signature, body=body or [], unix_fds=unix_fds or [])

    @classmethod
    def new_signal(cls, path: str, interface: str, member: str, signature: str = "", body: list[Any] | None = None,
                   unix_fds: list[int] | None = None) -> FastMessage:
        return cls(message_type=MessageType.SIGNAL, interface=interface, path=path, member=member,
                   signature=signature, body=body or [], unix_fds=unix_fds or [])

    def _marshall(self, negotiate_unix_fd: bool = False) -> bytes:
        try:
            return encode_message(self)
        except Unsupported:
            return super()._marshall(negotiate_unix_fd)


# ---- decoding -------------------------------------------------------------------------------------------

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
    length = _U32_LE.unpack_from(buf, offset)[0]
    offset += 4
    offset += -offset & (element_alignment - 1)
    return offset, offset + length


def _get(buf: bytes | bytearray | memoryview, offset: int, node: Node) -> tuple[Any, int]:
    code = node[0]
    unpacker = _LE.get(code)
    if unpacker is not None:
        offset += -offset & (unpacker.size - 1)
        value = unpacker.unpack_from(buf, offset)[0]
        return (bool(value) if code == "b" else value), offset + unpacker.size
    if code == "s" or code == "o":
        offset += -offset & 3
        length = _U32_LE.unpack_from(buf, offset)[0]
        start = offset + 4
        return str(buf[start:start + length], "utf-8"), start + length + 1
    if code == "v":
        length = buf[offset]
        signature = str(buf[offset + 1:offset + 1 + length], "utf-8")
        value, offset = _get(buf, offset + 2 + length, _single(signature))
        return _variant(signature, value), offset
    if code == "a":
        child = node[1]
        offset, end = _array_bounds(buf, offset, _ALIGN[child[0]])
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
        length = _U32_LE.unpack_from(buf, offset)[0]
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
        length = _U32_LE.unpack_from(buf, offset)[0]
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


BUSITEM = "com.victronenergy.BusItem"
_unwrap: Any = None


def _plain_value(buf: bytes, offset: int) -> tuple[Any, int]:
    """A BusItem value variant -> the Python value (as values.unwrap gives it), the common kinds inline."""
    if buf[offset] == 1:
        code = buf[offset + 1]
        if code == 100:  # 'd'
            offset += 3
            offset += -offset & 7
            return _DOUBLE.unpack_from(buf, offset)[0], offset + 8
        if code == 105:  # 'i'
            offset += 3
            offset += -offset & 3
            return _INT32.unpack_from(buf, offset)[0], offset + 4
        if code == 115:  # 's'
            offset += 3
            offset += -offset & 3
            length = _U32_LE.unpack_from(buf, offset)[0]
            return str(buf[offset + 4:offset + 4 + length], "utf-8"), offset + 5 + length
    global _unwrap
    if _unwrap is None:
        from .values import unwrap  # values imports the library through lib, which imports this module

        _unwrap = unwrap
    variant, offset = _get(buf, offset, ("v",))
    return _unwrap(variant), offset


def _plain_entry_value(buf: bytes, offset: int) -> tuple[Any, int]:
    """The "Value" of an `a{sv}` BusItem entry, or _MISSING, and the end of the array. Other keys ("Text")
    are stepped over, not decoded into objects."""
    offset, end = _array_bounds(buf, offset, 8)
    while offset < end:
        offset += -offset & 7
        length = _U32_LE.unpack_from(buf, offset)[0]
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
                length = _U32_LE.unpack_from(data, offset)[0]
                fields[code] = str(data[offset + 4:offset + 4 + length], "utf-8")
                offset += 5 + length
                continue
            if kind == 117:  # 'u'
                offset += -offset & 3
                fields[code] = _U32_LE.unpack_from(data, offset)[0]
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


def decode_message(data: bytes) -> Message:
    """One whole message (starting at offset 0, so alignments hold) -> a dbus-next Message."""
    if data[0] != 108 or data[3] != 1:  # 'l', protocol 1
        return _library_decode(data)  # big-endian (no Venus OS machine is) or broken: the library's code
    body_len, serial, fields_len = _HEADER_LE.unpack_from(data, 0)[4:]
    header_end = 16 + fields_len
    fields = _header_fields(data, header_end)
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
    order = "<" if data[start] == 108 else ">"
    body_len, fields_len = struct.unpack_from(order + "I", data, start + 4)[0], \
        struct.unpack_from(order + "I", data, start + 12)[0]
    header_end = 16 + fields_len
    return header_end + (-header_end & 7) + body_len


def _library_decode(data: bytes) -> Message:
    unmarshaller = Unmarshaller(io.BytesIO(data))
    if unmarshaller.unmarshall() is None:
        raise ValueError("truncated D-Bus message")
    return unmarshaller.message


_reading = False
_after_read: list[Callable[[], None]] = []


def after_read(callback: Callable[[], None]) -> bool:
    """While a connection's messages are being handled, run `callback` once they all are, in the same wake-up
    (call_soon would cost another turn of the loop per update). False when no read is going on: the caller
    schedules it another way."""
    if not _reading:
        return False
    _after_read.append(callback)
    return True


def _run_after_read() -> None:
    callbacks = _after_read[:]
    _after_read.clear()
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one consumer's bug must not keep the others from running
            _LOG.exception("%s failed after reading messages", getattr(callback, "__qualname__", callback))


def _dispatch_signal(bus: Any, message: Message) -> None:
    """What dbus-next does with a signal, minus its generic steps that never apply to a BusItem one: each
    handler in turn until one returns true; a failing handler is logged and the next one still runs."""
    for handler in bus._user_message_handlers:
        try:
            if handler(message):
                break
        except Exception:
            _LOG.exception("a message handler failed on %s from %s", message.member, message.sender)


# Read moderation, as a network card moderates its interrupts: a message that arrives at least POLL_INTERVAL
# after the last read is handled the moment it arrives; one that arrives sooner waits until POLL_INTERVAL after
# that read, and everything that arrived by then is handled in one wake-up with one flush of the aggregate (on a
# GX a wake-up of the process costs more than the work of one update). While messages keep coming the connection
# is read every POLL_INTERVAL; a read that finds nothing waits for the next message again, so a quiet bank costs
# nothing and a lone change is published at once. Our own method calls are not moderated (expect_reply below):
# their replies are read at once. Victron's system calculator reads the battery once a second, so POLL_INTERVAL
# bounds the extra latency well inside what it can see.
POLL_INTERVAL = 0.2
REPLY_WINDOW = 0.5  # seconds after a method call is sent during which, until its reply, messages are read at once


def install(bus: Any, coalesce: bool = False) -> None:
    """Read a connected dbus-next bus with this codec: one recv takes every message that has arrived, instead
    of three reads (header, rest, a failing probe) and a new Unmarshaller per message. Connections that pass
    unix fds keep the library's reader. `coalesce`: read moderation (see above)."""
    if getattr(bus, "_negotiate_unix_fd", False):
        return
    sock, loop, fd = bus._sock, bus._loop, bus._fd
    # Bytes the library has already taken off the socket: a message it began, and its stream's read-ahead.
    pending = bytearray(bus._unmarshaller.buf)
    buffered = bus._stream.peek(1 << 16) if hasattr(bus._stream, "peek") else b""
    if buffered:
        pending += bus._stream.read1(len(buffered))

    def read_and_handle() -> int:
        """Handle every whole message that has arrived; how many there were."""
        nonlocal pending
        global _reading
        _reading = True
        handled = 0
        try:
            while True:
                try:
                    chunk = sock.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    raise EOFError("the bus closed the connection")
                pending += chunk
                if len(chunk) < 1 << 16:
                    break
            start = 0
            while bus.connected:
                length = message_length(pending, start)
                if length is None or len(pending) - start < length:
                    break
                message = decode_message(bytes(pending[start:start + length]))
                start += length
                handled += 1
                if type(message) is BusItemSignal:
                    _dispatch_signal(bus, message)
                else:
                    bus._on_message(message)
            if start:
                del pending[:start]
        except Exception as error:  # what the library's reader does: the connection is unusable
            bus._finalize(error)
        finally:
            _reading = False
            if _after_read:
                _run_after_read()
        return handled

    timer: Any = None  # the next poll, while reading in batches
    at_once_until = 0.0  # loop time until which a reply to our call is read the moment it arrives
    last = -POLL_INTERVAL  # loop time of the last read

    def awaiting_reply() -> bool:
        """A call of ours sent within REPLY_WINDOW still awaits its reply (one that never comes, from a hung
        service, holds batch reading off for that window only)."""
        return bool(bus._method_return_handlers) and loop.time() < at_once_until

    def on_readable() -> None:
        nonlocal timer, last
        now = loop.time()
        if not coalesce or now - last >= POLL_INTERVAL or awaiting_reply():
            last = now
            read_and_handle()  # the first message after a quiet spell: at once
        elif bus.connected:  # soon after the last read: the next read takes everything up to then
            loop.remove_reader(fd)
            timer = loop.call_at(last + POLL_INTERVAL, poll)

    def poll() -> None:
        nonlocal timer, last
        timer = None
        if not bus.connected:
            return  # the library has closed the connection; nothing to read or resume
        last = loop.time()
        handled = read_and_handle()
        if not bus.connected:
            return
        if handled and not awaiting_reply():
            timer = loop.call_later(POLL_INTERVAL, poll)  # still busy: keep reading in batches
        else:  # quiet, or a reply is awaited: wake on the next message
            loop.add_reader(fd, on_readable)

    def expect_reply() -> None:
        """A method call went out: its reply is read the moment it arrives, so that a sequence of calls (start-up,
        reading a new member) is not held up by a poll interval at each step."""
        nonlocal timer, at_once_until
        at_once_until = loop.time() + REPLY_WINDOW
        if timer is not None:
            timer.cancel()
            timer = None
            loop.add_reader(fd, on_readable)

    bus._expect_reply = expect_reply
    loop.remove_reader(fd)
    loop.add_reader(fd, on_readable)
