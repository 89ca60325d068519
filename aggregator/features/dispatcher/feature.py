"""The dispatcher on the aggregate's service: /Dispatcher/* and its cycle, when batteries are configured."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ...state import StateStore
from ..base import Bank, Feature

if TYPE_CHECKING:
    from ...bus.service import VeService
    from ...config import Config
    from .runtime import DispatcherRuntime

_LOG = logging.getLogger("aggregator.components")


class DispatcherFeature(Feature):
    """Off unless `dispatcher.batteries` is configured. One that cannot run (its optional MQTT package missing)
    is left out with an error in the log; the aggregate battery runs on regardless."""

    name = "dispatcher"
    publishes = ("/Dispatcher/",)

    def __init__(self, config: Config) -> None:
        self.config = config.dispatcher
        self.state_dir = config.stateDir
        self.runtime: DispatcherRuntime | None = None

    async def mount(self, service: VeService, bus: Any, bank: Bank) -> None:
        if not self.config.batteries:
            return
        try:
            from ...config_data import as_model
            from .runtime import DispatcherRuntime
            from .settings import DispatcherConfig

            self.config = as_model(DispatcherConfig, self.config)
            store = StateStore(os.path.join(self.state_dir, "dispatcher.json"))
            self.runtime = DispatcherRuntime(self.config, service, bus=bus, save_state=store.save,
                                             restore_state=store.load())
        except ImportError as exc:
            _LOG.error("the dispatcher cannot run: %s", exc)

    async def start(self) -> None:
        if self.runtime is not None:
            await self.runtime.start()
            _LOG.info("dispatcher: %d batteries, mode %s", len(self.runtime.batteries), self.runtime.config.mode)

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()  # every setpoint 0: no battery keeps an order nobody follows

    def needs_restart(self, old: Config, new: Config) -> bool:
        return old.dispatcher != new.dispatcher

    def set_target(self, value: Any) -> bool:
        """The cooperative's target for the batteries the dispatcher drives (False while it does not run)."""
        return self.runtime.set_target(value) if self.runtime is not None else False
