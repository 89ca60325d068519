"""The optional components that live on the aggregate's service: the power dispatcher and the cooperative.

Both are off unless configured. They add their paths (/Dispatcher/*, /Coop/*) to the aggregate battery's
service before it registers, so a client's first GetItems already sees them, and they stop with it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from .bus.service import VeService
from .config import Config
from .state import StateStore

_LOG = logging.getLogger(__name__)


class Components:
    """What is configured of the two. One that cannot run (its optional MQTT package missing) is left out with
    an error in the log; the aggregate battery runs on regardless."""

    def __init__(self, config: Config, service: VeService, bus: Any) -> None:
        self.dispatcher: Any = None
        self.coop: Any = None
        if config.dispatcher.batteries:
            try:
                from .features.dispatcher.runtime import DispatcherRuntime

                store = StateStore(os.path.join(config.stateDir, "dispatcher.json"))
                self.dispatcher = DispatcherRuntime(config.dispatcher, service, bus=bus, save_state=store.save,
                                                    restore_state=store.load())
            except ImportError as exc:
                _LOG.error("the dispatcher cannot run: %s", exc)
        if config.coop.enabled:
            try:
                from .features.coop.runtime import CoopRuntime

                self.coop = CoopRuntime(config.coop, service, bus, dispatcher=self.dispatcher,
                                        state_dir=config.stateDir)
            except ImportError as exc:
                _LOG.error("the cooperative cannot run: it needs the Python package aiomqtt (%s)", exc)

    async def start(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.start()
            _LOG.info("dispatcher: %d batteries, mode %s", len(self.dispatcher.batteries),
                      self.dispatcher.config.mode)
        if self.coop is not None:
            await self.coop.start()
            _LOG.info("cooperative: site %s", self.coop.site.site_id)

    async def stop(self) -> None:
        if self.coop is not None:
            await self.coop.stop()
        if self.dispatcher is not None:
            await self.dispatcher.stop()  # every setpoint 0: no battery keeps an order nobody follows


def same_components(old: Config, new: Config) -> bool:
    """Whether a reload can keep the running components (otherwise the service restarts)."""
    return old.dispatcher == new.dispatcher and old.coop == new.coop
