"""Victron BusItem protocol on asyncio D-Bus: publish services, watch other services, localsettings."""
