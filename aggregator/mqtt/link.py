"""One MQTT link: a client that keeps its connection (TLS, credentials, an availability topic with its last will,
reconnecting with back-off), subscriptions made again after each reconnect, and extra connections that each carry
one last will. The dispatcher's adapters and the cooperative's site use it; neither opens a client of its own
kind.
"""
from __future__ import annotations

import asyncio
import logging
import os
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
    """What a link needs of a feature's broker settings (certFile, keyFile and clientId are optional)."""

    host: str
    port: int
    tls: bool
    caFile: str | None
    username: str | None
    password: str | None


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
    return tls_context(settings.caFile, getattr(settings, "certFile", None), getattr(settings, "keyFile", None))


MessageHandler = Callable[[bytes, bool], None]
ConnectHook = Callable[[], Awaitable[None]]

AVAILABLE = "online"
NOT_AVAILABLE = "offline"


class MqttLink:
    """One aiomqtt client shared by every user of a broker, reconnecting with back-off.

    While connected, `availability_topic` says "online" (retained); the broker's last will says "offline" when
    we vanish. Subscriptions are made again and `on_connect` hooks run (discovery, retained states) after every
    reconnect; `on_lost` hooks run when a connection that was up is lost (the dispatcher marks its readings
    stale). `client_id` names the client when the settings give no clientId; `log` is the feature's logger.
    """

    initial_backoff_s = 1.0
    max_backoff_s = 30.0

    def __init__(self, settings: BrokerSettings, *, availability_topic: str | None = None,
                 clock: Clock = time.monotonic, client_id: str = "battery-aggregator", keepalive: int = 30,
                 log: logging.Logger | None = None, missing: str = "MQTT needs the Python package aiomqtt") -> None:
        if aiomqtt is None:
            raise ImportError(missing)
        self.settings = settings
        self.client_id = client_id
        self.keepalive = keepalive
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

    async def stop(self) -> None:
        self._stopping = True
        client_ = self._client
        if client_ is not None and self.availability_topic is not None:
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
        identifier = (getattr(s, "clientId", None) or f"{self.client_id}-{os.getpid()}") + suffix
        return Client(
            s.host, s.port, username=s.username, password=s.password, will=will, tls_context=client_tls(s),
            identifier=identifier[:64] if suffix else identifier, keepalive=self.keepalive, timeout=10,
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
            await asyncio.sleep(delay)
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
                        self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, unreachable, TLS, lost: all mean "try again later"
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
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    def _dispatch(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, (bytes, bytearray)):
            payload = b"" if payload is None else str(payload).encode()
        for handler in self._handlers.get(message.topic.value, ()):
            try:
                handler(bytes(payload), bool(message.retain))
            except Exception:
                self.log.exception("MQTT: the handler of %s failed", message.topic.value)

    async def _subscribe_quietly(self, client_: aiomqtt.Client, topic: str) -> None:
        try:
            await client_.subscribe(topic, qos=1)
        except Exception as exc:
            self.log.debug("subscribe to %s failed: %s (done again on reconnect)", topic, exc)
