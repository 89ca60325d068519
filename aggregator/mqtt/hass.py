"""Home Assistant MQTT discovery for the dispatcher (pure: settings in, (topic, payload) out).

Discovery topic: `<discovery_prefix>/<component>/<node_id>/<object_id>/config`, payload JSON, published
retained so Home Assistant finds the entities again after its own restart. Every entity belongs to one
device (`device.identifiers`), has a `unique_id` (required for the device registry and for editing it in the
UI), and shares one availability topic: "online" retained while we run, "offline" as the broker's last will.
An empty retained payload on a config topic removes the entity.

The state and command topics below `topic_prefix` are the ones the runtime publishes (see `Topics`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from .. import __version__

PAYLOAD_AVAILABLE = "online"
PAYLOAD_NOT_AVAILABLE = "offline"
PAYLOAD_ON = "ON"
PAYLOAD_OFF = "OFF"

_ID = re.compile(r"[^A-Za-z0-9_-]+")


def slug(text: str) -> str:
    """Home Assistant's node_id/object_id alphabet (and a safe MQTT topic level): letters, digits, _ and -."""
    out = _ID.sub("_", text.strip()).strip("_").lower()
    return out or "x"


@dataclass(frozen=True, slots=True)
class Topics:
    """Our MQTT topics: one retained state topic per value, `.../set` to command."""

    prefix: str

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"

    def state(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def command(self, key: str) -> str:
        return f"{self.prefix}/{key}/set"

    def battery(self, name: str, key: str) -> str:
        return f"{self.prefix}/batteries/{slug(name)}/{key}"


@dataclass(frozen=True, slots=True)
class HassContext:
    discovery_prefix: str
    node_id: str
    topics: Topics
    device_name: str = "Battery dispatcher"

    def config_topic(self, component: str, object_id: str) -> str:
        return f"{self.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"

    def device(self) -> dict[str, Any]:
        return {"identifiers": [self.node_id], "name": self.device_name, "manufacturer": "battery-aggregator",
                "model": "Power dispatcher", "sw_version": __version__}

    def common(self, object_id: str, name: str) -> dict[str, Any]:
        """The keys every entity of ours has."""
        return {
            "name": name,
            "unique_id": f"{self.node_id}_{object_id}",
            "device": self.device(),
            "origin": {"name": "battery-aggregator", "sw_version": __version__},
            "availability_topic": self.topics.availability,
            "payload_available": PAYLOAD_AVAILABLE,
            "payload_not_available": PAYLOAD_NOT_AVAILABLE,
        }


Discovery = tuple[str, dict[str, Any]]


def target_number(ctx: HassContext, min_w: float, max_w: float, step_w: float = 10.0) -> Discovery:
    """The total power target (W, + charge / - discharge), bounded by the fleet's limits."""
    payload = ctx.common("target_power", "Target power") | {
        "command_topic": ctx.topics.command("target_power"),
        "state_topic": ctx.topics.state("target_power"),
        "min": float(min_w),
        "max": float(max_w),
        "step": float(step_w),
        "mode": "box",
        "unit_of_measurement": "W",
        "device_class": "power",
        "icon": "mdi:battery-sync",
    }
    return ctx.config_topic("number", "target_power"), payload


def enabled_switch(ctx: HassContext) -> Discovery:
    payload = ctx.common("enabled", "Dispatching") | {
        "command_topic": ctx.topics.command("enabled"),
        "state_topic": ctx.topics.state("enabled"),
        "payload_on": PAYLOAD_ON,
        "payload_off": PAYLOAD_OFF,
        "state_on": PAYLOAD_ON,
        "state_off": PAYLOAD_OFF,
        "icon": "mdi:battery-charging-wireless",
    }
    return ctx.config_topic("switch", "enabled"), payload


def sensor(ctx: HassContext, object_id: str, name: str, state_topic: str, *, unit: str | None = None,
           device_class: str | None = None, state_class: str | None = None, icon: str | None = None,
           entity_category: str | None = None) -> Discovery:
    payload = ctx.common(object_id, name) | {"state_topic": state_topic}
    for key, value in (("unit_of_measurement", unit), ("device_class", device_class), ("state_class", state_class),
                       ("icon", icon), ("entity_category", entity_category)):
        if value is not None:
            payload[key] = value
    return ctx.config_topic("sensor", object_id), payload


def _power(ctx: HassContext, object_id: str, name: str, state_topic: str) -> Discovery:
    return sensor(ctx, object_id, name, state_topic, unit="W", device_class="power", state_class="measurement")


def _energy(ctx: HassContext, object_id: str, name: str, state_topic: str) -> Discovery:
    """Energy held (or holdable): Home Assistant's stored-energy class, not the metered `energy` one."""
    return sensor(ctx, object_id, name, state_topic, unit="kWh", device_class="energy_storage",
                  state_class="measurement")


def fleet_sensors(ctx: HassContext) -> list[Discovery]:
    t = ctx.topics
    return [
        sensor(ctx, "soc", "Combined SoC", t.state("soc"), unit="%", device_class="battery",
               state_class="measurement"),
        _energy(ctx, "capacity", "Combined capacity", t.state("capacity")),
        _energy(ctx, "remaining_energy", "Remaining energy", t.state("remaining_energy")),
        _power(ctx, "power", "Combined power", t.state("power")),
        _power(ctx, "requested_power", "Requested power", t.state("requested_power")),
        _power(ctx, "achieved_power", "Achieved power", t.state("achieved_power")),
        _power(ctx, "predicted_power", "Predicted power", t.state("predicted_power")),
        sensor(ctx, "status", "Dispatcher status", t.state("status"), icon="mdi:information-outline",
               entity_category="diagnostic"),
    ]


def battery_sensors(ctx: HassContext, name: str) -> list[Discovery]:
    """Per battery: SoC, setpoint, measured power, learned limits, learned gain, status."""
    t = ctx.topics
    b = slug(name)
    return [
        sensor(ctx, f"{b}_soc", f"{name} SoC", t.battery(name, "soc"), unit="%", device_class="battery",
               state_class="measurement"),
        _power(ctx, f"{b}_setpoint", f"{name} setpoint", t.battery(name, "setpoint")),
        _power(ctx, f"{b}_measured", f"{name} power", t.battery(name, "measured")),
        sensor(ctx, f"{b}_charge_limit", f"{name} learned charge limit", t.battery(name, "charge_limit"),
               unit="W", device_class="power", state_class="measurement", entity_category="diagnostic"),
        sensor(ctx, f"{b}_discharge_limit", f"{name} learned discharge limit", t.battery(name, "discharge_limit"),
               unit="W", device_class="power", state_class="measurement", entity_category="diagnostic"),
        sensor(ctx, f"{b}_gain", f"{name} learned gain", t.battery(name, "gain"), state_class="measurement",
               icon="mdi:tune", entity_category="diagnostic"),
        sensor(ctx, f"{b}_status", f"{name} status", t.battery(name, "status"), icon="mdi:information-outline",
               entity_category="diagnostic"),
    ]


def discovery_messages(ctx: HassContext, battery_names: Sequence[str], min_w: float, max_w: float) -> list[Discovery]:
    """Every discovery message of the dispatcher; publish each retained."""
    out = [target_number(ctx, min_w, max_w), enabled_switch(ctx), *fleet_sensors(ctx)]
    for name in battery_names:
        out.extend(battery_sensors(ctx, name))
    return out


def removal(topic: str) -> tuple[str, str]:
    """The retained empty payload that makes Home Assistant forget an entity."""
    return topic, ""
