"""The lean D-Bus codec for dbus-next, encoding side (decode.py reads; wire.py puts both on a connection).

dbus-next 0.2.3 (pure Python) spends most of the service's CPU in its marshaller and unmarshaller: every
element goes through several method calls, and every variant re-verifies its value against its signature.
This codec compiles a signature once into a small tree and walks values with struct directly. It produces
and accepts exactly the bytes of the D-Bus specification for little-endian messages; anything else (big-endian,
unix fds) falls back to the library's own code. dbus-fast already has a compiled codec; this one is used only on
dbus-next.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any

from dbus_next import Message
from dbus_next.constants import MessageType

BUSITEM = "com.victronenergy.BusItem"
# (struct format, alignment) of the fixed-size types; 'b' is a uint32 on the wire.
FIXED = {"y": ("B", 1), "b": ("I", 4), "n": ("h", 2), "q": ("H", 2), "i": ("i", 4), "u": ("I", 4),
         "x": ("q", 8), "t": ("Q", 8), "d": ("d", 8), "h": ("I", 4)}
ALIGN = {**{k: a for k, (_f, a) in FIXED.items()}, "s": 4, "o": 4, "g": 1, "v": 1, "a": 4, "(": 8, "{": 8}
LE = {k: struct.Struct("<" + f) for k, (f, _a) in FIXED.items()}
U32_LE = struct.Struct("<I")
U32_BE = struct.Struct(">I")
HEADER_LE = struct.Struct("<BBBBIII")
DOUBLE = struct.Struct("<d")

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
    if code in FIXED or code in "sogv":
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
def single_node(signature: str) -> Node:
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
    buf += U32_LE.pack(len(raw))
    buf += raw
    buf.append(0)


def _put_signature(buf: bytearray, text: str) -> None:
    raw = text.encode()
    buf.append(len(raw))
    buf += raw
    buf.append(0)


def _put(buf: bytearray, node: Node, value: Any) -> None:
    code = node[0]
    packer = LE.get(code)
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
        _put(buf, single_node(signature), value.value)
    elif code == "a":
        _pad(buf, 4)
        at = len(buf)
        buf += b"\0\0\0\0"
        child = node[1]
        _pad(buf, ALIGN[child[0]])  # the first element's padding is not part of the length
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
        U32_LE.pack_into(buf, at, len(buf) - start)
    elif code == "(":
        _pad(buf, 8)
        for child, item in zip(node[1], value, strict=True):
            _put(buf, child, item)
    elif code == "g":
        _put_signature(buf, value)
    else:
        raise Unsupported(f"cannot encode {code!r}")


INT32 = struct.Struct("<i")


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
        buf += U32_LE.pack(len(raw))
        buf += raw
        buf.append(0)
        signature = variant.signature
        if signature == "d":
            buf += b"\x01d\0"
            _pad(buf, 8)
            buf += DOUBLE.pack(variant.value)
        elif signature == "s":
            buf += b"\x01s\0"
            _put_string(buf, variant.value)
        elif signature == "i":
            buf += b"\x01i\0"
            _pad(buf, 4)
            buf += INT32.pack(variant.value)
        else:
            _put_signature(buf, signature)
            _put(buf, single_node(signature), variant.value)
    U32_LE.pack_into(buf, at, len(buf) - start)


def _encode_items(items: dict[str, dict[str, Any]]) -> bytearray:
    """`a{sa{sv}}`, the body of ItemsChanged and GetItems."""
    buf = bytearray(8)  # array length, then padding to the first (8-aligned) dict entry
    for path, entries in items.items():
        _pad(buf, 8)
        _put_string(buf, path)
        _put_dict_of_variants(buf, entries)
    U32_LE.pack_into(buf, 0, len(buf) - 8)
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
    head = bytearray(HEADER_LE.pack(ord("l"), msg.message_type.value, msg.flags.value, 1, len(body), msg.serial,
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
    _put(buf, single_node(variant.signature), variant.value)


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
        encoded = self._paths[path] = U32_LE.pack(len(raw)) + raw + b"\0"
        return encoded

    def encode(self, serial: int, items: Any) -> bytes:
        buf = bytearray(8)  # the array's length, then padding to its first (8-aligned) entry
        zeros = _ZEROS
        paths = self._paths
        u32 = U32_LE.pack
        pack_into = U32_LE.pack_into
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
                buf += DOUBLE.pack(value)
            elif kind is int and _INT32_MIN <= value <= _INT32_MAX:
                buf += _INT_ITEM
                buf += INT32.pack(value)
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
        head = HEADER_LE.pack(108, 4, 0, 1, len(buf), serial, len(fields))  # 'l', SIGNAL, no flags, version 1
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
