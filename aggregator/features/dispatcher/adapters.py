"""The dispatcher's I/O: read a device's values and write its setpoint, over D-Bus or MQTT.

Readings keep their last value and when it was last confirmed, so the controller can tell a stale battery
from a quiet one. Sign conventions and unit scales are applied here: past this module, + is charging and
everything is in W (Wh, %). Setpoints are written only when they change (or as a keep-alive), and a device
that does not answer, or a broker that is gone, is a log line and a stale value, never an exception.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from typing import Any, Callable

from ...bus import client
from ...bus.client import CallError
from ...bus.lib import MessageBus
from ...bus.service import SET_NOT_WRITEABLE, SET_OK
from ...bus.watch import PathWatcher
from ...mqtt.link import MqttLink
from .settings import AdapterSpec, MqttSettings

_LOG = logging.getLogger("aggregator.dispatch.adapters")

Clock = Callable[[], float]


def as_number(value: Any) -> float | None:
    """A finite number, else None (a device's 'invalid', a string, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ---- readings --------------------------------------------------------------------------------------------

class Reading:
    """One device quantity: the last value (scaled to our units) and when it was last confirmed."""

    def __init__(self, label: str, scale: float = 1.0) -> None:
        self.label = label
        self.scale = scale
        self.value: float | None = None
        self.updated_at: float | None = None  # None: never confirmed (or not since the link was lost)

    def age(self, now: float) -> float:
        return math.inf if self.updated_at is None else max(0.0, now - self.updated_at)

    def accept(self, raw: Any, at: float | None) -> None:
        number = as_number(raw)
        self.value = None if number is None else number * self.scale
        self.updated_at = at

    def mark_stale(self) -> None:
        """Keep the value but stop vouching for it (the link it came through is down)."""
        self.updated_at = None


class DbusReading(Reading):
    def __init__(self, label: str, service: str, path: str, scale: float = 1.0) -> None:
        super().__init__(label, scale)
        self.service = service
        self.path = path


class _Heard:
    """When a service last showed it is alive (a signal, an answer), and whether it is being asked."""

    __slots__ = ("at", "asking")

    def __init__(self) -> None:
        self.at = -math.inf
        self.asking = False


class DbusReadings:
    """Every D-Bus reading through one PathWatcher (one match rule per service, not per path).

    Victron services signal only changes, so a quiet value is valid for as long as its service is alive. A signal
    from a service confirms all its readings (what it did not signal has not changed); a service silent for
    `refresh_s` is asked for one value, and its answer confirms them too. A service that neither signals nor
    answers (hung) leaves its readings unconfirmed, so they go stale.
    """

    def __init__(self, bus: MessageBus, *, refresh_s: float = 5.0, timeout: float = 2.0,
                 clock: Clock = time.monotonic) -> None:
        self.bus = bus
        self.refresh_s = refresh_s
        self.timeout = timeout
        self.clock = clock
        self._readings: dict[tuple[str, str], list[DbusReading]] = {}
        self._by_service: dict[str, list[DbusReading]] = {}
        self._heard: dict[str, _Heard] = {}
        self._watcher = PathWatcher(bus, self._on_change, timeout=timeout, on_signal=self._on_signal)
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False

    def reading(self, label: str, service: str, path: str, scale: float = 1.0) -> DbusReading:
        """Declare a reading (before start())."""
        if self._started:
            raise RuntimeError("declare every D-Bus reading before start()")
        reading = DbusReading(label, service, path, scale)
        self._readings.setdefault((service, path), []).append(reading)
        self._by_service.setdefault(service, []).append(reading)
        self._heard.setdefault(service, _Heard())
        self._watcher.watch(service, path)
        return reading

    async def start(self) -> None:
        self._started = True
        if self._readings:
            await self._watcher.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._readings and self.bus.connected:
            await self._watcher.stop()

    def _on_signal(self, service: str) -> None:
        self._confirm(service, self.clock())

    def _confirm(self, service: str, now: float) -> None:
        """The service is alive: its readings with a value still hold it."""
        self._heard[service].at = now
        for reading in self._by_service[service]:
            if reading.updated_at is not None:
                reading.updated_at = now

    def _on_change(self, service: str, path: str, value: Any) -> None:
        now = self.clock()
        if value is not None:
            self._heard[service].at = now
        for reading in self._readings.get((service, path), ()):
            # A service that left the bus: invalid and unconfirmed.
            reading.accept(value, now if value is not None else None)

    def refresh(self) -> None:
        """Ask every service silent for refresh_s whether it is alive (at most one question at a time each)."""
        now = self.clock()
        for service, heard in self._heard.items():
            if heard.asking or now - heard.at < self.refresh_s:
                continue
            heard.asking = True
            task = asyncio.get_running_loop().create_task(self._ask(service, heard))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ask(self, service: str, heard: _Heard) -> None:
        """One value the service has (its answer is the sign of life), then those of the readings without a
        confirmed value (a path that was missing may be there now)."""
        readings = self._by_service[service]
        known = next((r.path for r in readings if r.value is not None), readings[0].path)
        paths = [known] + sorted({r.path for r in readings if r.updated_at is None} - {known})
        answered = False
        try:
            for path in paths:
                try:
                    value = await client.get_value(self.bus, service, path, self.timeout, patient=True)
                except CallError as exc:
                    _LOG.debug("cannot re-read %s %s: %s", service, path, exc)
                    if exc.timed_out or exc.error_name == "connection":
                        return  # no answer: its readings age
                    continue  # an error answer (no such path, say): the next one may answer
                now = self.clock()
                if not answered:
                    answered = True
                    self._confirm(service, now)
                for reading in self._readings[(service, path)]:
                    reading.accept(value, now if value is not None else None)
        finally:
            heard.asking = False


class MqttReading(Reading):
    """A value from a state topic: a plain number, or the number at `json_key` of a JSON object."""

    def __init__(self, label: str, topic: str, json_key: str | None = None, scale: float = 1.0) -> None:
        super().__init__(label, scale)
        self.topic = topic
        self.json_key = json_key

    def on_message(self, payload: bytes, retained: bool, now: float) -> None:
        raw = parse_payload(payload, self.json_key)
        # A retained message may be the last word of a device that died long ago: its value is a hint, but it
        # does not make the reading fresh.
        self.accept(raw, None if retained else now)


def parse_payload(payload: bytes, json_key: str | None) -> Any:
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if json_key is None:
        try:
            return float(text)
        except ValueError:
            return None
    try:
        data: Any = json.loads(text)
    except ValueError:
        return None
    for key in json_key.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


# ---- setpoints ---------------------------------------------------------------------------------------------

class Setpoint:
    """Writes a battery's setpoint (W, + charge) in the device's sign and unit, only when it changed."""

    def __init__(self, label: str, *, sign: int = 1, scale: float = 1.0, min_command_w: float | None = None,
                 keepalive_s: float = 30.0) -> None:
        self.label = label
        self.sign = sign
        self.scale = scale
        self.min_command_w = min_command_w
        self.keepalive_s = keepalive_s
        self.last_w: float | None = None  # the last setpoint (our convention) the device accepted
        self.last_at = -math.inf
        self.reachable = True  # False after a write that went unanswered or failed on the way
        self.refused = False  # the device answered "no"

    def command(self, setpoint_w: float) -> float:
        """The setpoint we would send, in our convention: whole watts, 0 below the device's minimum."""
        if not math.isfinite(setpoint_w):
            setpoint_w = 0.0
        if self.min_command_w is not None and abs(setpoint_w) < self.min_command_w:
            return 0.0
        return float(round(setpoint_w))

    def due(self, setpoint_w: float, now: float) -> bool:
        """Whether `write` sends: the value changed, or the keep-alive is due."""
        return self.command(setpoint_w) != self.last_w or (self.keepalive_s > 0
                                                           and now - self.last_at >= self.keepalive_s)

    async def write(self, setpoint_w: float, now: float, *, force: bool = False) -> bool:
        """Send when the value changed, when the keep-alive is due, or when forced. True when sent and accepted."""
        if not force and not self.due(setpoint_w, now):
            return False
        value = self.command(setpoint_w)
        device_value = value * self.sign / self.scale
        if device_value == 0:
            device_value = 0.0  # not -0.0
        accepted = await self._send(device_value)
        if accepted:
            self.last_w = value
            self.last_at = now
        else:
            self.last_w = None  # unknown now: the next cycle sends again
        return accepted

    async def _send(self, device_value: float) -> bool:
        raise NotImplementedError

    def forget(self) -> None:
        """The device may no longer have our last setpoint (a will set it 0): send it again next cycle."""
        self.last_w = None

    def _report(self, reachable: bool, refused: bool, detail: str) -> None:
        if reachable != self.reachable or refused != self.refused:
            if reachable and not refused:
                _LOG.info("%s: setpoint accepted again", self.label)
            else:
                _LOG.warning("%s: setpoint not written: %s", self.label, detail)
        self.reachable = reachable
        self.refused = refused


class DbusSetpoint(Setpoint):
    """SetValue on a BusItem. A float first; a path that takes only integers (code 1) gets integers from then on."""

    def __init__(self, label: str, bus: MessageBus, service: str, path: str, *, timeout: float = 2.0,
                 **kwargs: Any) -> None:
        super().__init__(label, **kwargs)
        self.bus = bus
        self.service = service
        self.path = path
        self.timeout = timeout
        self._integer = False

    async def _send(self, device_value: float) -> bool:
        try:
            value: float | int = round(device_value) if self._integer else device_value
            code = await client.set_value(self.bus, self.service, self.path, value, self.timeout, patient=True)
            if code == SET_NOT_WRITEABLE and not self._integer:
                self._integer = True
                code = await client.set_value(self.bus, self.service, self.path, round(device_value), self.timeout,
                                              patient=True)
        except CallError as exc:
            self._report(False, False, str(exc))
            return False
        if code != SET_OK:
            self._report(True, True, f"{self.service} {self.path} answered {code} to {device_value:g}")
            return False
        self._report(True, False, "")
        return True


# ---- MQTT ------------------------------------------------------------------------------------------------

class MqttSetpoint(Setpoint):
    """Publishes the setpoint on a command topic: a plain number, or {json_key: number}. Not retained: a device
    that restarts must not act on an old command."""

    def __init__(self, label: str, link: MqttLink, topic: str, json_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(label, **kwargs)
        self.link = link
        self.topic = topic
        self.json_key = json_key

    def payload(self, device_value: float) -> str:
        number: float | int = int(device_value) if float(device_value).is_integer() else device_value
        if self.json_key is None:
            return json.dumps(number)
        data: Any = number
        for key in reversed(self.json_key.split(".")):
            data = {key: data}
        return json.dumps(data)

    async def _send(self, device_value: float) -> bool:
        sent = await self.link.publish(self.topic, self.payload(device_value), qos=1)
        self._report(sent, False, "" if sent else "no MQTT connection")
        return sent


def dispatcher_link(settings: MqttSettings, availability_topic: str, clock: Clock = time.monotonic) -> MqttLink:
    """The dispatcher's link to its broker: its client id and its log lines are the dispatcher's."""
    return MqttLink(settings, availability_topic=availability_topic, clock=clock,
                    client_id=settings.clientId or f"battery-aggregator-dispatcher-{os.getpid()}", log=_LOG,
                    missing="the dispatcher's mqtt settings need the Python package aiomqtt (install it, or remove "
                            "'mqtt' and use D-Bus adapters)")


def mqtt_reading(link: MqttLink, label: str, topic: str, json_key: str | None = None,
                 scale: float = 1.0) -> MqttReading:
    """A reading of a state topic; stale when the link is lost (nothing says what it holds meanwhile)."""
    reading = MqttReading(label, topic, json_key, scale)
    link.subscribe(topic, lambda _topic, payload, retained: reading.on_message(payload, retained, link.clock()))
    link.on_lost(reading.mark_stale)
    return reading


# ---- building ------------------------------------------------------------------------------------------

def make_reading(label: str, spec: AdapterSpec, dbus: DbusReadings | None, mqtt: MqttLink | None,
                 sign: int = 1) -> Reading:
    """The reading a spec describes (settings guarantee the links it needs exist)."""
    scale = spec.scale * sign
    if spec.dbus is not None:
        if dbus is None:
            raise ValueError(f"{label}: a D-Bus reading without a bus")
        return dbus.reading(label, spec.dbus.service, spec.dbus.path, scale)
    assert spec.mqtt is not None
    if mqtt is None:
        raise ValueError(f"{label}: an MQTT reading without a broker (the mqtt section)")
    return mqtt_reading(mqtt, label, spec.mqtt.topic, spec.mqtt.jsonKey, scale)


def make_setpoint(label: str, spec: AdapterSpec, bus: MessageBus | None, mqtt: MqttLink | None, *, sign: int,
                  min_command_w: float | None, keepalive_s: float, timeout: float = 2.0) -> Setpoint:
    common: dict[str, Any] = {"sign": sign, "scale": spec.scale, "min_command_w": min_command_w,
                              "keepalive_s": keepalive_s}
    if spec.dbus is not None:
        if bus is None:
            raise ValueError(f"{label}: a D-Bus setpoint without a bus")
        return DbusSetpoint(label, bus, spec.dbus.service, spec.dbus.path, timeout=timeout, **common)
    assert spec.mqtt is not None
    if mqtt is None:
        raise ValueError(f"{label}: an MQTT setpoint without a broker (the mqtt section)")
    return MqttSetpoint(label, mqtt, spec.mqtt.topic, spec.mqtt.jsonKey, **common)
