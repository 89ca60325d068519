"""Simulated LiFePO4 battery packs (pure physics + scenario files)."""
