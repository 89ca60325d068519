"""The cooperative on the aggregate's service: /Coop/* and its site on the cooperative's broker, when enabled."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from ..base import Bank, Feature

if TYPE_CHECKING:
    from ...bus.service import VeService
    from ...config import Config
    from .runtime import CoopRuntime, TargetSink

_LOG = logging.getLogger("aggregator.components")


class CoopFeature(Feature):
    """Off unless `coop.enabled`. `target_sink` gives what takes the site's battery target (the dispatcher when it
    runs, else None); the host wires it, so the cooperative imports no other feature."""

    name = "coop"
    publishes = ("/Coop/",)

    def __init__(self, config: Config, target_sink: Callable[[], TargetSink | None] = lambda: None) -> None:
        self.settings = config.coop
        self.state_dir = config.stateDir
        self.target_sink = target_sink
        self.runtime: CoopRuntime | None = None

    async def mount(self, service: VeService, bus: Any, bank: Bank) -> None:
        if not self.settings.enabled:
            return
        try:
            from ...config_data import as_model
            from .runtime import CoopRuntime
            from .settings import CoopSettings

            self.settings = as_model(CoopSettings, self.settings)
            self.runtime = CoopRuntime(self.settings, service, bus, dispatcher=self.target_sink(),
                                       state_dir=self.state_dir)
        except ImportError as exc:
            _LOG.error("the cooperative cannot run: it needs the Python package aiomqtt (%s)", exc)

    async def start(self) -> None:
        if self.runtime is not None:
            await self.runtime.start()
            _LOG.info("cooperative: site %s", self.runtime.site.site_id)

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()

    def needs_restart(self, old: Config, new: Config) -> bool:
        return old.coop != new.coop
