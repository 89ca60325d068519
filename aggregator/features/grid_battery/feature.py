"""The grid batteries: the config's `gridBatteries`, one GridBatteryService each, services of their own (not paths on
the aggregate's), each on a connection of its own (their meters are followed on the members' connection). Mounted
like every feature; a reload applies the new list in place (what it still asks for keeps running)."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ...bus.lib import connect
from ...config_data import as_model
from ..base import Bank, Feature

if TYPE_CHECKING:
    from ...bus.service import VeService
    from ...bus.settings import LocalSettings
    from ...config import Config
    from .runtime import GridBatteryService
    from .settings import GridBatterySettings

_LOG = logging.getLogger("aggregator.grid_battery_service")


class GridBatteryFeature(Feature):
    name = "grid_battery"

    def __init__(self, config: Config, bus_address: str | None = None) -> None:
        self.config = config
        self.bus_address = bus_address
        self.publishes = tuple(s.serviceName for s in config.gridBatteries)
        self.running: list[GridBatteryService] = []
        self.settings: tuple[list[GridBatterySettings], str] = ([], "")
        self._local_settings: LocalSettings | None = None
        self._members_bus: Any = None
        self._applying: asyncio.Task[None] | None = None

    async def mount(self, service: VeService, bus: Any, bank: Bank) -> None:
        # The aggregate's localsettings client reserves their device instances and keeps their /CustomName like
        # the aggregate's own; their meters are read with the members (one wake-up for both, moderated).
        self._local_settings = bank.settings
        self._members_bus = bus

    async def start(self) -> None:
        await self.apply(self.config)

    async def stop(self) -> None:
        if self._applying is not None:
            await self._applying
        await self._stop_services()

    def save(self) -> None:
        for service in self.running:
            service.save()

    def connections(self) -> list[tuple[str, Any]]:
        return [(s.settings.serviceName, s.bus) for s in self.running]

    def reconfigure(self, config: Config, bank: Bank) -> None:
        """Applied in a task of its own, after any earlier one: their services start and stop on connections of
        their own, so the aggregate need not wait for them."""
        self.config = config
        self.publishes = tuple(s.serviceName for s in config.gridBatteries)
        self._applying = asyncio.get_running_loop().create_task(self._apply_after(self._applying, config))

    async def _apply_after(self, previous: asyncio.Task[None] | None, config: Config) -> None:
        if previous is not None:
            await previous
        try:
            await self.apply(config)
        except Exception:  # a bug, not a grid battery that cannot start (apply logs those): never lost silently
            _LOG.exception("cannot apply the grid batteries of the new config")

    async def apply(self, config: Config) -> None:
        """Run the configured grid batteries; the same list (and stateDir) keeps them running."""
        wanted = (_settings_of(config.gridBatteries), config.stateDir)
        if wanted == self.settings:
            return
        await self._stop_services()
        self.settings = wanted
        if wanted[0]:
            from .runtime import GridBatteryService, grid_state_dir
        for grid_settings in wanted[0]:
            service = None
            try:
                service = GridBatteryService(await connect(self.bus_address), grid_settings,
                                             grid_state_dir(config.stateDir, grid_settings),
                                             local_settings=self._local_settings, meter_bus=self._members_bus)
                await service.start()
            except Exception as exc:  # the name is taken, say: the aggregate goes on without it
                _LOG.error("cannot start the grid battery %s: %s", grid_settings.serviceName, exc)
                if service is not None:
                    await service.stop()
                    service.bus.disconnect()
                continue
            self.running.append(service)
            _LOG.info("grid battery %s follows the meter %s", grid_settings.serviceName, grid_settings.meter)

    async def _stop_services(self) -> None:
        # Out of `running` before they close their connections: the host's watch checks only those running.
        running, self.running = self.running, []
        self.settings = ([], "")
        for service in running:
            await service.stop()  # closes its connection too


def _settings_of(sections: Any) -> list[GridBatterySettings]:
    """The configured grid batteries as their settings models: their runtime and pydantic are loaded only when
    there are some."""
    if not sections:
        return []
    from .settings import GridBatterySettings

    return [as_model(GridBatterySettings, section) for section in sections]
