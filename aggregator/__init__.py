"""Battery aggregator for Victron Venus OS."""
__version__ = "0.1.0"
