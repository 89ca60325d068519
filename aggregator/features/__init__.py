"""The side features of the service, each a package of its own (core, settings, runtime, and the Feature that
mounts it): energy, grid_battery, dispatcher and coop. base.py is the interface they share.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Feature


def standard_features(config: Config, bus_address: str | None = None) -> list[Feature]:
    """The features mounted on the aggregate's service, in the order they start (and stop in reverse): the energy
    ledgers first. The cooperative hands its battery target to the dispatcher when that runs: wired here, so
    neither imports the other. The grid batteries publish services of their own, each on a connection of its own
    to the bus at `bus_address`."""
    from .coop.feature import CoopFeature
    from .dispatcher.feature import DispatcherFeature
    from .energy.feature import EnergyFeature
    from .grid_battery.feature import GridBatteryFeature

    dispatcher = DispatcherFeature(config)
    return [EnergyFeature(config), dispatcher, CoopFeature(config, lambda: dispatcher.runtime),
            GridBatteryFeature(config, bus_address)]
