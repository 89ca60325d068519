"""One MQTT link: a client that keeps its connection (TLS, credentials, an availability topic with its last will,
reconnecting with back-off), subscriptions made again after each reconnect, and extra connections that each carry
one last will. The dispatcher's adapters and the cooperative's site use it; neither opens a client of its own
kind.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import ssl
import time
from typing import Any, Awaitable, Callable, Protocol

try:
    import aiomqtt

    from .beat_client import Client
except ImportError:  # a GX without the optional MQTT wheels: the features that need it say so
    aiomqtt = None  # type: ignore[assignment]

Clock = Callable[[], float]


class BrokerSettings(Protocol):
    """What a link needs of a feature's broker settings (mqtt/settings.py BrokerConnection has them all)."""

    host: str
    port: int
    tls: bool
    caFile: str | None
    certFile: str | None
    keyFile: str | None
    username: str | None
    password: str | None
    keepaliveSeconds: int


def tls_context(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """The broker's certificate checked against `ca_file` (the system's trust store without one) and its host
    name; with `cert_file` we authenticate with a client certificate."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def client_tls(settings: BrokerSettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    return tls_context(settings.caFile, settings.certFile, settings.keyFile)


# (topic, payload, retained); a handler may return an awaitable, which is awaited before the next message.
MessageHandler = Callable[[str, bytes, bool], "Awaitable[None] | None"]
ConnectHook = Callable[[], Awaitable[None]]

AVAILABLE = "online"
NOT_AVAILABLE = "offline"


class MqttLink:
    """One aiomqtt client shared by every user of a broker, reconnecting with back-off.

    While connected, `availability_topic` says "online" (retained); the broker's last will says "offline" when
    we vanish. A subscription is a topic or a filter with the wildcards + and #; subscriptions are made again
    and `on_connect` hooks run (discovery, retained states) after every reconnect; `on_lost` hooks run when a
    connection that was up is lost (the dispatcher marks its readings stale). `client_id` is the client's id (by
    default one of this process); `backoff_s` the first and the longest wait before a new attempt; `log` is the
    feature's logger.
    """

    def __init__(self, settings: BrokerSettings, *, availability_topic: str | None = None,
                 clock: Clock = time.monotonic, client_id: str | None = None,
                 backoff_s: tuple[float, float] = (1.0, 30.0), log: logging.Logger | None = None,
                 missing: str = "MQTT needs the Python package aiomqtt") -> None:
        if aiomqtt is None:
            raise ImportError(missing)
        self.initial_backoff_s, self.max_backoff_s = backoff_s
        self.settings = settings
        self.client_id = client_id or f"battery-aggregator-{os.getpid()}"
        self.log = log or logging.getLogger(__name__)
        self.availability_topic = availability_topic
        self.clock = clock
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects so far (tests and the status use it)
        self._client: aiomqtt.Client | None = None
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._lost_hooks: list[Callable[[], None]] = []
        self._connect_hooks: list[ConnectHook] = []
        self._wills: list[tuple[str, str, Callable[[], None] | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._guards: list[asyncio.Task[None]] = []
        self._stopping = False
        self.guards_connected = 0  # will connections up now (tests and the status use it)

    # ---- declaring -----------------------------------------------------------------------------------

    def subscribe(self, topic: str, handler: MessageHandler) -> None:
        self._handlers.setdefault(topic, []).append(handler)
        client_ = self._client
        if client_ is not None and len(self._handlers[topic]) == 1:
            asyncio.get_running_loop().create_task(self._subscribe_quietly(client_, topic))

    def on_connect(self, hook: ConnectHook) -> None:
        self._connect_hooks.append(hook)

    def on_lost(self, hook: Callable[[], None]) -> None:
        self._lost_hooks.append(hook)

    def add_will(self, topic: str, payload: str, on_connect: Callable[[], None] | None = None) -> None:
        """A last will: `payload` (not retained) goes to `topic` when we vanish without a clean disconnect
        (kill -9, a crash, a lost link). A client has one will, and the main one says "offline", so each will gets
        a connection of its own. `on_connect` runs after each (re)connect of it: the will may have fired meanwhile."""
        self._wills.append((topic, payload, on_connect))

    # ---- running -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        self._guards = [loop.create_task(self._guard(i, *will)) for i, will in enumerate(self._wills)]

    async def run(self, announce_offline: bool = True) -> None:
        """start(), then keep the link until cancelled, and stop()."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop(announce_offline)

    async def stop(self, announce_offline: bool = True) -> None:
        self._stopping = True
        client_ = self._client
        if client_ is not None and self.availability_topic is not None and announce_offline:
            # A clean disconnect does not fire the will: say "offline" ourselves.
            try:
                await client_.publish(self.availability_topic, NOT_AVAILABLE, qos=1, retain=True, timeout=2)
            except Exception:
                pass
        # A clean disconnect of the will connections does not fire their wills: the runtime wrote 0 itself.
        for task in [self._task, *self._guards]:
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._task = None
        self._guards = []

    async def publish(self, topic: str, payload: str | bytes, *, retain: bool = False, qos: int = 0) -> bool:
        """Publish if connected; False when the message could not be handed to the broker."""
        client_ = self._client
        if client_ is None:
            return False
        try:
            await client_.publish(topic, payload, qos=qos, retain=retain, timeout=5)
        except Exception as exc:  # aiomqtt.MqttError and what paho raises on a dying socket
            self.log.debug("publish to %s failed: %s", topic, exc)
            return False
        return True

    def _make_client(self, will: Any = None, suffix: str = "") -> aiomqtt.Client:
        s = self.settings
        if will is None and self.availability_topic is not None:
            will = aiomqtt.Will(self.availability_topic, NOT_AVAILABLE, qos=1, retain=True)
        identifier = self.client_id + suffix
        return Client(
            s.host, s.port, username=s.username, password=s.password, will=will, tls_context=client_tls(s),
            identifier=identifier[:64] if suffix else identifier, keepalive=s.keepaliveSeconds, timeout=10,
        )

    async def _guard(self, index: int, topic: str, payload: str, on_connect: Callable[[], None] | None) -> None:
        """Hold the connection that carries one will; reconnect with back-off."""
        delay = self.initial_backoff_s
        will = aiomqtt.Will(topic, payload, qos=1, retain=False)
        while not self._stopping:
            up = False
            try:
                async with self._make_client(will, f"-will{index}") as client_:
                    up = True
                    self.guards_connected += 1
                    delay = self.initial_backoff_s
                    if on_connect is not None:
                        on_connect()
                    async for _ in client_.messages:  # nothing subscribed: this ends when the link does
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.debug("MQTT: the will connection for %s: %s", topic, exc)
            finally:
                if up:
                    self.guards_connected -= 1
            if self._stopping:
                break
            await self._back_off(delay)
            delay = min(delay * 2, self.max_backoff_s)

    async def _run(self) -> None:
        delay = self.initial_backoff_s
        failing = False
        while not self._stopping:
            try:
                async with self._make_client() as client_:
                    self._client = client_
                    for topic in list(self._handlers):
                        await client_.subscribe(topic, qos=1)
                    if self.availability_topic is not None:
                        await client_.publish(self.availability_topic, AVAILABLE, qos=1, retain=True)
                    self.connections += 1
                    self.connected.set()
                    self.log.info("MQTT: connected to %s:%d", self.settings.host, self.settings.port)
                    failing = False
                    delay = self.initial_backoff_s
                    for hook in self._connect_hooks:
                        try:
                            await hook()
                        except aiomqtt.MqttError:
                            raise
                        except Exception:
                            self.log.exception("MQTT: a connect hook failed")
                    async for message in client_.messages:
                        await self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, unreachable, TLS, lost, an unreadable caFile: "try again later"
                if not failing:
                    self.log.warning("MQTT: no connection to %s:%d (%s); retrying with back-off",
                                 self.settings.host, self.settings.port, exc)
                failing = True
            finally:
                self._client = None
                if self.connected.is_set():
                    self.connected.clear()
                    for lost in self._lost_hooks:
                        lost()
            if self._stopping:
                break
            await self._back_off(delay)
            delay = min(delay * 2, self.max_backoff_s)

    async def _back_off(self, delay: float) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # A cancellation that a library's wait_for swallowed (Python 3.11): stop anyway.
            raise asyncio.CancelledError
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # clients that lost one broker do not return at once

    def _matching(self, topic: aiomqtt.Topic) -> list[MessageHandler]:
        exact = self._handlers.get(topic.value, [])
        return exact + [handler for pattern, handlers in self._handlers.items()
                        if ("+" in pattern or "#" in pattern) and topic.matches(pattern) for handler in handlers]

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, (bytes, bytearray)):
            payload = b"" if payload is None else str(payload).encode()
        topic = message.topic.value
        for handler in self._matching(message.topic):
            try:
                result = handler(topic, bytes(payload), bool(message.retain))
                if inspect.isawaitable(result):
                    await result
            except aiomqtt.MqttError:
                raise  # the link is lost: reconnect
            except Exception:
                self.log.exception("MQTT: the handler of %s failed", topic[:80])

    async def _subscribe_quietly(self, client_: aiomqtt.Client, topic: str) -> None:
        try:
            await client_.subscribe(topic, qos=1)
        except Exception as exc:
            self.log.debug("subscribe to %s failed: %s (done again on reconnect)", topic, exc)
