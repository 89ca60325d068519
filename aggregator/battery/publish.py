"""Our battery services on D-Bus: a new service with the mandatory paths, a device instance reserved in
localsettings and a /CustomName kept there, battery paths with their text formats, and the texts we publish about
members (their names, lists of names within the size limit). The aggregate, its virtual batteries and the grid
batteries are published this way.
"""
from __future__ import annotations

import json
import logging
import zlib
from typing import Any, Callable

from .. import __version__
from ..bounded import MAX_TEXT
from ..bus.lib import connect
from ..bus.monitor import WatchedService
from ..bus.service import VeService
from ..bus.settings import LocalSettings, Setting
from .merge import LIMIT_PATHS
from .paths import resolution, text_format
from .sanitize import check_value

BATTERY_PREFIX = "com.victronenergy.battery."
PREFERRED_INSTANCE = 200
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def preferred_instance(service_name: str) -> int:
    """Spread over 200..263 by name, so two of our services rarely ask for the same instance even while
    localsettings (which resolves collisions) is absent."""
    return PREFERRED_INSTANCE + zlib.crc32(unique_id(service_name).encode()) % 64


def unique_id(service_name: str) -> str:
    """Stable id for localsettings (device instance, CustomName): from the service name, never a tty."""
    return "batteryaggregator_" + service_name.rsplit(".", 1)[-1]


def add_battery_path(service: VeService, path: str, value: Any, kind: str | None = None) -> None:
    """A battery path with the text format and resolution of its kind (a battery path; the path itself by
    default); the charge limits as the controller computed them (it rounds them itself)."""
    kind = path if kind is None else kind
    service.add_path(path, value, text=text_format(kind), digits=None if kind in LIMIT_PATHS else resolution(kind))


def custom_name_setting(service_name: str) -> str:
    return f"/Settings/BatteryAggregator/{unique_id(service_name)}/CustomName"


async def bind_custom_name(settings: LocalSettings, service: VeService) -> Callable[[], None]:
    """A writeable /CustomName kept in localsettings, as Victron's services keep theirs; returns the unbinding."""
    path = custom_name_setting(service.name)
    await settings.add(Setting(path, ""))
    return settings.bind(service, "/CustomName", path)


async def publish_battery(settings: LocalSettings, name: str, product_name: str, product_id: int,
                          connection: str, bus_address: str | None) -> VeService:
    """A new battery service of ours on its own connection, with the mandatory paths, a reserved device
    instance and a persisted /CustomName. Paths are added by the caller; register() is the caller's too."""
    service = VeService(await connect(bus_address), name)
    instance = await settings.reserve_device_instance(unique_id(name), "battery", preferred_instance(name))
    service.add_mandatory_paths(process_name="battery-aggregator", process_version=__version__,
                                connection=connection, device_instance=instance, product_id=product_id,
                                product_name=product_name, firmware_version=__version__, hardware_version=None)
    await bind_custom_name(settings, service)
    return service


def member_label(service: WatchedService) -> str:
    """A short name for people: the CustomName, else the product name, else the service suffix (a name too
    large to publish is no name)."""
    for path in ("/CustomName", "/ProductName"):
        value = check_value(path, service.values.get(path))[0]
        if isinstance(value, str) and value:
            return value
    return service.name.rsplit(".", 1)[-1]


def json_list_text(items: list[str]) -> str:
    """A list of texts as one JSON text ('[]' when empty: an empty array reads as invalid through Victron's MQTT
    bridge), within the size limit: the items that fit, then how many more there are."""
    kept = list(items)
    text = json.dumps(kept, ensure_ascii=False)
    while len(text) > MAX_TEXT and kept:
        kept.pop()
        text = json.dumps(kept + [f"+{len(items) - len(kept)} more"], ensure_ascii=False)
    return text


def add_log_level_path(service: VeService, level: str) -> None:
    """/LogLevel: the process's log level, shown and set over D-Bus."""
    service.add_path("/LogLevel", level, writeable=True, value_types=(str,), on_change=_on_log_level,
                     description="one of " + ", ".join(LOG_LEVELS))


def _on_log_level(_path: str, value: Any) -> bool:
    if value not in LOG_LEVELS:
        return False
    logging.getLogger().setLevel(value)
    logging.getLogger("aggregator").warning("log level set to %s over D-Bus", value)
    return True
