"""The D-Bus library the bus layer runs on.

dbus-next is the default, with its pure-Python codec replaced by the leaner one of encode.py, decode.py and
wire.py (the same bytes, a fraction of the CPU). Victron's own asyncio services moved to its maintained fork
dbus-fast, which keeps the same API; setting BATTERY_AGGREGATOR_DBUS=dbus-fast selects it. Only names both
libraries share are used by the rest of the package, and only through this module.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Callable

_choice = os.environ.get("BATTERY_AGGREGATOR_DBUS", "dbus-next")

if _choice == "dbus-fast":
    from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant  # type: ignore[import-not-found]
    from dbus_fast.aio import MessageBus  # type: ignore[import-not-found]
    from dbus_fast.constants import NameFlag, RequestNameReply  # type: ignore[import-not-found]
    from dbus_fast.errors import AuthError, DBusError  # type: ignore[import-not-found]

    LIBRARY = "dbus-fast"
else:
    from dbus_next import BusType, MessageFlag, MessageType, Variant
    from dbus_next.aio import MessageBus
    from dbus_next.constants import NameFlag, RequestNameReply
    from dbus_next.errors import AuthError, DBusError

    from . import wire
    from .encode import FastMessage

    Message = FastMessage  # type: ignore[misc]  # marshals with the lean codec
    LIBRARY = "dbus-next"

__all__ = [
    "LIBRARY", "BusType", "BusUnreachable", "DBusError", "Message", "MessageFlag", "MessageBus", "MessageType",
    "NameFlag", "RequestNameReply", "Variant", "bus_type_from_env", "connect", "raw_sender", "soon", "which_bus",
]


def bus_type_from_env() -> BusType:
    """Victron's rule: the session bus when DBUS_SESSION_BUS_ADDRESS is set (a PC, our tests), else system."""
    return BusType.SESSION if os.environ.get("DBUS_SESSION_BUS_ADDRESS") else BusType.SYSTEM


class _FullBufferTolerantSocket:
    """dbus-next 0.2.3 (and dbus-fast 5.2) treat a full socket send buffer (EAGAIN) as fatal and drop the connection,
    so a burst of signals could take a service off the bus. Reporting "0 bytes sent" instead makes its
    writer wait until the socket is writable again, which is what it does for a partial write."""

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def sendmsg(self, buffers: Any, ancdata: Any = ()) -> int:
        try:
            return self._sock.sendmsg(buffers, ancdata)
        except (BlockingIOError, InterruptedError):
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BusUnreachable(ConnectionError):
    """connect() found no bus to talk to; the message names which bus (and address) it tried."""


def which_bus(bus_address: str | None = None) -> str:
    address = bus_address or os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return f"the D-Bus at {address.split(',guid=', 1)[0]}" + ("" if bus_address else " (DBUS_SESSION_BUS_ADDRESS)")
    return "the D-Bus system bus (DBUS_SESSION_BUS_ADDRESS is not set)"


async def connect(bus_address: str | None = None, coalesce: bool = False) -> MessageBus:
    """Open one connection. Each published service needs its own (monitors map a sender to one service).
    `coalesce`: read moderation, for the connection that watches the members: after a message, read in batches
    every wire.POLL_INTERVAL rather than message by message, while the replies to our own calls are read at once."""
    try:
        if bus_address:
            bus = await MessageBus(bus_address=bus_address).connect()
        else:
            bus = await MessageBus(bus_type=bus_type_from_env()).connect()
    except (OSError, ValueError, AuthError) as exc:  # no socket, refused, a malformed address, auth refused
        raise BusUnreachable(f"cannot reach {which_bus(bus_address)}: {exc.strerror or exc}"
                             if isinstance(exc, OSError) else f"cannot reach {which_bus(bus_address)}: {exc}") from exc
    writer = getattr(bus, "_writer", None)
    if writer is not None and not isinstance(writer.sock, _FullBufferTolerantSocket):
        try:
            writer.sock = _FullBufferTolerantSocket(writer.sock)
        except (AttributeError, TypeError):  # a compiled writer that does not take it: nothing to guard
            pass
    if LIBRARY == "dbus-next":
        wire.install(bus, coalesce)  # the lean codec reads every message after the handshake
        _write_at_once(bus)
    return bus


def _write_at_once(bus: Any) -> None:
    """dbus-next queues every message and registers the socket for writability, sends on the next loop turn,
    then unregisters it: two epoll changes and a loop turn per message. Writing at once when nothing is
    queued ahead keeps the order and does the same work; only a partial write waits for writability."""
    writer = bus._writer
    loop = bus._loop

    def schedule_write(msg: Any = None, future: Any = None) -> None:
        if msg is not None:
            writer.buffer_message(msg, future)
            if msg.message_type is MessageType.METHOD_CALL and not msg.flags & MessageFlag.NO_REPLY_EXPECTED \
                    and not getattr(msg, "patient", False):
                expect_reply = getattr(bus, "_expect_reply", None)
                if expect_reply is not None:
                    expect_reply()  # a moderated connection reads the reply at once
        if not bus.unique_name:
            return  # not ready to send: the library's connect() schedules the writer after Hello
        if writer.buf is None:
            writer.write_callback()  # sends what is queued; stops at a partial write
        if writer.buf is not None or writer.messages.qsize():
            loop.add_writer(writer.fd, writer.write_callback)

    writer.schedule_write = schedule_write


def raw_sender(bus: Any) -> Callable[[Callable[[int], bytes]], None] | None:
    """For a connection of dbus-next: send(encode) puts the bytes encode(serial) on the bus, in order with the
    library's own messages, with no Message object (a signal the service encodes itself, see
    encode.ItemsChangedEncoder). None on dbus-fast, whose own compiled marshaller is already lean."""
    if LIBRARY != "dbus-next" or not hasattr(bus, "_writer"):
        return None
    writer = bus._writer
    loop = bus._loop

    def send(encode: Callable[[int], bytes]) -> None:
        if not bus.connected:  # dbus-next: a unique name and not disconnected
            return
        data = encode(bus.next_serial())
        if writer.buf is None and not writer.messages.qsize():
            try:
                sent = writer.sock.send(data)  # 0 when the buffer is full: see _FullBufferTolerantSocket
            except Exception as error:  # what the library's writer does: the connection is unusable
                bus._finalize(error)
                return
            if sent >= len(data):
                return
            data = data[sent:]
        writer.messages.put_nowait((data, [], None))  # the rest goes out when the socket is writable
        loop.add_writer(writer.fd, writer.write_callback)

    return send


def soon(callback: Callable[[], None]) -> Any:
    """Run `callback` soon: on dbus-next while messages are being read, right after them in the same wake-up;
    otherwise at the next turn of the loop (call_soon). The result is only a token that it is scheduled."""
    if LIBRARY == "dbus-next" and wire.after_read(callback):
        return True
    return asyncio.get_running_loop().call_soon(callback)

