"""The dispatcher on MQTT: its state topics (only changes are sent, one after the other), its command topics
(target, enabled) and its Home Assistant discovery (mqtt/hass.py), on the dispatcher's MQTT link."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, Mapping

from ...bounded import bounded_repr
from ...mqtt import hass
from ...mqtt.link import MqttLink

if TYPE_CHECKING:
    from .runtime import DispatcherRuntime

_LOG = logging.getLogger("aggregator.dispatch.runtime")

HA_STATUS_TOPIC = "status"  # below the discovery prefix: Home Assistant's birth message ("online")
# A row of /Dispatcher/Batteries/<n>/* and its battery's state topic.
ROW_TOPICS = {"Setpoint": "setpoint", "Measured": "measured", "Gain": "gain", "ChargeLimit": "charge_limit",
              "DischargeLimit": "discharge_limit", "Soc": "soc", "Status": "status"}


class DispatcherTopics:
    """The MQTT side of one DispatcherRuntime (`runtime`): it takes its commands and publishes its values."""

    def __init__(self, runtime: DispatcherRuntime, link: MqttLink, topics: hass.Topics) -> None:
        self.runtime = runtime
        self.link = link
        self.topics = topics
        self.settings = runtime.config.mqtt
        assert self.settings is not None
        self._published: dict[str, str] = {}  # MQTT topic -> last payload sent (only changes are sent again)
        self._outbox: dict[str, str] = {}  # MQTT states waiting to be sent
        self._flusher: asyncio.Task[None] | None = None
        self._hass_range: tuple[float, float] | None = None

    def wire(self) -> None:
        refused = self.settings.commands_refused()
        if refused is None:
            self.link.subscribe(self.topics.command("target_power"), self._on_target)
            self.link.subscribe(self.topics.command("enabled"), self._on_enabled)
        else:
            # Not subscribed at all: a command nobody may send is never read.
            _LOG.warning("MQTT commands (target, enabled) are not taken: %s", refused)
        self.link.on_connect(self._on_connect)
        if self.settings.homeAssistant:
            ha_status = f"{self.settings.discoveryPrefix}/{HA_STATUS_TOPIC}"

            def on_ha_status(_topic: str, payload: bytes, _retained: bool) -> None:
                if payload.strip() == b"online":  # Home Assistant restarted: tell it again who we are
                    self._hass_range = None
                    self._published.clear()
                    self.runtime.spawn(self._publish_discovery())

            self.link.subscribe(ha_status, on_ha_status)

    def _on_target(self, _topic: str, payload: bytes, retained: bool) -> None:
        if retained:
            return  # a command left on the broker is not a command now
        text = payload.decode("utf-8", "replace").strip()
        try:
            value: Any = float(text)
        except ValueError:
            value = text
        if self.runtime.set_target(value):
            self.runtime.service.set_value(f"{self.runtime.prefix}/TargetPower", float(value))
        self._published.pop(self.topics.state("target_power"), None)  # echo the state

    def _on_enabled(self, _topic: str, payload: bytes, retained: bool) -> None:
        if retained:
            return
        text = payload.decode("utf-8", "replace").strip().upper()
        if text in ("ON", "1", "TRUE"):
            self.runtime.set_enabled(True)
        elif text in ("OFF", "0", "FALSE"):
            self.runtime.set_enabled(False)
        else:
            _LOG.warning("MQTT enabled: %s is not ON or OFF", bounded_repr(text))
        self.runtime.service.set_value(f"{self.runtime.prefix}/Enabled", int(self.runtime.enabled))
        self._published.pop(self.topics.state("enabled"), None)

    async def _on_connect(self) -> None:
        self._published.clear()  # a new session (maybe a new broker): send every state again
        self._outbox.clear()
        self._hass_range = None
        await self._publish_discovery()

    def hass_context(self) -> hass.HassContext | None:
        m = self.settings
        if not m.homeAssistant:
            return None
        return hass.HassContext(m.discoveryPrefix, m.nodeId, self.topics)

    async def _publish_discovery(self, only_target: bool = False) -> None:
        ctx = self.hass_context()
        if ctx is None:
            return
        low, high = self.runtime.fleet_range()
        self._hass_range = (low, high)
        commands = self.settings.commands_refused() is None
        if only_target and not commands:
            return
        messages = [hass.target_number(ctx, low, high)] if only_target else \
            hass.discovery_messages(ctx, [b.name for b in self.runtime.batteries], low, high)
        for topic, payload in messages:
            if "command_topic" in payload and not commands:
                # No controls without a command path: Home Assistant would show a number and a switch that do
                # nothing. Ones a run with commands left on the broker (retained) are removed.
                await self.link.publish(*hass.removal(topic), retain=True, qos=1)
            else:
                await self.link.publish(topic, json.dumps(payload), retain=True, qos=1)

    def publish(self, values: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]],
                fleet: Mapping[str, float | None]) -> None:
        """The cycle's values as state topics (`fleet`: its achieved_power, soc, capacity and remaining_energy,
        rounded): those that changed are queued and sent."""
        t, p, runtime = self.topics, self.runtime.prefix, self.runtime
        states: dict[str, Any] = {
            t.state("target_power"): values[f"{p}/TargetPower"],
            t.state("requested_power"): values[f"{p}/TargetPower"],
            t.state("enabled"): hass.PAYLOAD_ON if runtime.enabled else hass.PAYLOAD_OFF,
            t.state("mode"): runtime.config.mode,
            t.state("status"): runtime.status,
            t.state("power"): fleet["achieved_power"],
            t.state("achieved_power"): fleet["achieved_power"],
            t.state("predicted_power"): values[f"{p}/PredictedPower"],
            t.state("correction"): values[f"{p}/Correction"],
            t.state("saturated"): values[f"{p}/Saturated"],
            t.state("soc"): fleet["soc"],
            t.state("capacity"): fleet["capacity"],
            t.state("remaining_energy"): fleet["remaining_energy"],
        }
        for name, row in rows.items():
            for key, topic_key in ROW_TOPICS.items():
                states[t.battery(name, topic_key)] = row[key]
        for topic, value in states.items():
            payload = _payload(value)
            if self._published.get(topic) != payload:
                self._published[topic] = payload
                self._outbox[topic] = payload
        if self._outbox and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        if self.hass_context() is not None and self._hass_range is not None and \
                self._hass_range != runtime.fleet_range():
            self._hass_range = runtime.fleet_range()  # the number entity's min/max follow the fleet's limits
            runtime.spawn(self._publish_discovery(only_target=True))

    async def _flush(self) -> None:
        """Send the changed states one after the other (a burst of concurrent publishes only queues up in the
        client); a value that changes again meanwhile is sent once, in its latest version."""
        while self._outbox:
            topic = next(iter(self._outbox))
            payload = self._outbox.pop(topic)
            if not await self.link.publish(topic, payload, retain=True):
                self._published.pop(topic, None)  # not delivered: send again next cycle

    def cancel(self) -> None:
        """Stop sending (the link stops next)."""
        if self._flusher is not None:
            self._flusher.cancel()


def _payload(value: Any) -> str:
    if value is None:
        return ""  # Home Assistant shows an empty state as unknown
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
