"""Communicating vessels: households that balance their battery levels with each other over MQTT.

Every site shares its battery level and its production and consumption on the cooperative's broker, and
steers its own battery toward the fleet's average level: a site that lags takes energy from the grid while a
site ahead delivers the same amount, so the batteries act as one without a coordinator.

    core.py      pure: peer states and their sanity checks, the fleet average, the site's target power,
                 curtailment with hysteresis, the settlement ledger
    settings.py  the `coop` config section (pydantic)
    site.py      CoopSite: the site on the cooperative's broker through the MQTT link (mqtt/link.py: TLS,
                 per-site credentials, last will, back-off), the curtailment adapters and Home Assistant discovery
    runtime.py   the cooperative inside the service: the site fed from the aggregate and the system calculator
"""
