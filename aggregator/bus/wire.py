"""The lean codec on a dbus-next connection: how its messages are read (one recv for all that arrived, read
moderation) and handed on; encode.py and decode.py are the codec itself."""
from __future__ import annotations

import logging
from typing import Any, Callable

from dbus_next import Message

from .beats import READ_BEAT, next_beat
from .decode import BusItemSignal, decode_message, message_length

_LOG = logging.getLogger(__name__)


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
# after the last read is handled the moment it arrives; one that arrives sooner waits for the next beat of
# POLL_INTERVAL (beats.READ_BEAT: the service's tick falls on them too), and everything that arrived by then is
# handled in one wake-up with one flush of the aggregate (on a GX a wake-up of the process costs more than the work
# of one update). While messages keep coming the connection is read at every beat; a read that finds nothing waits for
# the next message again, so a quiet bank costs nothing and a lone change is published at once. Our own method
# calls are not moderated (expect_reply below): their replies are read at once. Victron's system calculator reads
# the battery once a second, so POLL_INTERVAL bounds the extra latency well inside what it can see.
POLL_INTERVAL = READ_BEAT
REPLY_WINDOW = 0.5  # seconds after a method call is sent during which, until its reply, messages are read at once


def install(bus: Any, coalesce: bool = False) -> None:
    """Read a connected dbus-next bus with this codec: one recv takes every message that has arrived, instead
    of three reads (header, rest, a failing probe) and a new Unmarshaller per message. Connections that pass
    unix fds keep the library's reader. `coalesce`: read moderation (see above)."""
    if getattr(bus, "_negotiate_unix_fd", False):
        return
    reader = ConnectionReader(bus, coalesce)
    bus._expect_reply = reader.expect_reply
    bus._loop.remove_reader(bus._fd)
    bus._loop.add_reader(bus._fd, reader.on_readable)


class ConnectionReader:
    """Reads one connection: every whole message that has arrived at each read, moderated when `coalesce`."""

    def __init__(self, bus: Any, coalesce: bool) -> None:
        self.bus, self.coalesce = bus, coalesce
        self.sock, self.loop, self.fd = bus._sock, bus._loop, bus._fd
        # Bytes the library has already taken off the socket: a message it began, and its stream's read-ahead.
        self.pending = bytearray(bus._unmarshaller.buf)
        buffered = bus._stream.peek(1 << 16) if hasattr(bus._stream, "peek") else b""
        if buffered:
            self.pending += bus._stream.read1(len(buffered))
        self.timer: Any = None  # the next poll, while reading in batches
        self.at_once_until = 0.0  # loop time until which a reply to our call is read the moment it arrives
        self.last = -POLL_INTERVAL  # loop time of the last read

    def _receive(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            if not chunk:
                raise EOFError("the bus closed the connection")
            self.pending += chunk
            if len(chunk) < 1 << 16:
                return

    def read_and_handle(self) -> int:
        """Handle every whole message that has arrived; how many there were."""
        global _reading
        _reading = True
        handled = 0
        bus, pending = self.bus, self.pending
        try:
            self._receive()
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

    def awaiting_reply(self) -> bool:
        """A call of ours sent within REPLY_WINDOW still awaits its reply (one that never comes, from a hung
        service, holds batch reading off for that window only)."""
        return bool(self.bus._method_return_handlers) and self.loop.time() < self.at_once_until

    def on_readable(self) -> None:
        now = self.loop.time()
        if not self.coalesce or now - self.last >= POLL_INTERVAL or self.awaiting_reply():
            self.last = now
            self.read_and_handle()  # the first message after a quiet spell, or a reply: at once
            if self.timer is not None and self.bus.connected and not self.awaiting_reply():
                self.loop.remove_reader(self.fd)  # the reply is in: batches go on at the beat already set
        elif self.bus.connected:  # soon after the last read: the next read takes everything up to then
            self.loop.remove_reader(self.fd)
            if self.timer is None:
                self.timer = self.loop.call_at(next_beat(now, POLL_INTERVAL), self.poll)

    def poll(self) -> None:
        self.timer = None
        if not self.bus.connected:
            return  # the library has closed the connection; nothing to read or resume
        self.last = self.loop.time()
        handled = self.read_and_handle()
        if not self.bus.connected:
            return
        if handled:
            # Still busy: keep reading in batches, at the beats of the service's tick (one wake-up for both).
            self.timer = self.loop.call_at(next_beat(self.last, POLL_INTERVAL), self.poll)
            if self.awaiting_reply():
                self.loop.add_reader(self.fd, self.on_readable)  # the reply at once; the batches go on
            else:
                self.loop.remove_reader(self.fd)  # armed for a reply that has come since
        else:  # quiet: wake on the next message
            self.loop.add_reader(self.fd, self.on_readable)

    def expect_reply(self) -> None:
        """A method call went out: its reply is read the moment it arrives, so that a sequence of calls (start-up,
        reading a new member) is not held up by a poll interval at each step. Reading in batches goes on at the
        beat already set (a call must not cost the wake-ups of a return to reading message by message)."""
        self.at_once_until = self.loop.time() + REPLY_WINDOW
        if self.timer is not None:
            self.loop.add_reader(self.fd, self.on_readable)
