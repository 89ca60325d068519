"""`battery-aggregator status` and `dump`: what the aggregate and the batteries publish, for people and for
bug reports. Everything is read from the bus (the aggregate's own per-member paths), nothing from files."""
from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any

from .bus import client
from .bus.lib import connect, which_bus
from .bus.monitor import ServiceMonitor
from .config import DEFAULT_SERVICE_NAME

BATTERY_PREFIX = "com.victronenergy.battery."
_ROW = re.compile(r"^/Batteries/(\d+)/(\w+)$")
_COLUMNS = (("Service", 30, "Service", "{}"), ("Name", 16, "Name", "{}"), ("Serial", 12, "Serial", "{}"),
            ("State", 7, "State", "{}"), ("SoC", 7, "Soc", "{:.1f}%"), ("Voltage", 8, "Voltage", "{:.2f}V"),
            ("Current", 8, "Current", "{:+.1f}A"), ("Share", 6, "Share", "{:.0%}"),
            ("CCL", 7, "ChargeLimit", "{:.0f}A"), ("DCL", 7, "DischargeLimit", "{:.0f}A"),
            ("IR", 8, "InternalResistance", "{:.1f}mΩ"))


def _cell(value: Any, fmt: str, key: str) -> str:
    if value is None:
        return "---"
    if key == "InternalResistance" and isinstance(value, (int, float)):
        value = value * 1000
    if key == "Service" and isinstance(value, str):
        value = value.removeprefix("com.victronenergy.")
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def render_status(name: str, items: dict[str, Any]) -> str:
    """The aggregate's own values and one line per member row (pure: the items of a GetItems)."""
    def v(path: str, fmt: str) -> str:
        return _cell(items.get(path), fmt, path)

    lines = [
        f"{name} ({items.get('/CustomName') or items.get('/ProductName') or ''}), "
        f"instance {items.get('/DeviceInstance')}, {items.get('/Mgmt/Connection') or ''}",
        f"  SoC {v('/Soc', '{:.1f}%')}  {v('/Dc/0/Voltage', '{:.2f}V')}  {v('/Dc/0/Current', '{:+.1f}A')}  "
        f"{v('/Dc/0/Power', '{:+.0f}W')}  capacity {v('/Capacity', '{:.0f}')}/{v('/InstalledCapacity', '{:.0f}Ah')}"
        f"  time to go {v('/TimeToGo', '{:.0f}s')}",
        f"  CCL {v('/Info/MaxChargeCurrent', '{:.1f}A')}  DCL {v('/Info/MaxDischargeCurrent', '{:.1f}A')}  "
        f"CVL {v('/Info/MaxChargeVoltage', '{:.2f}V')}  mode {items.get('/Info/ChargeMode') or '---'}",
        f"  charge limit: {items.get('/Info/ChargeLimitation') or '---'}",
        f"  status: {items.get('/Aggregator/Status') or '---'}",
        "",
    ]
    rows: dict[int, dict[str, Any]] = {}
    for path, value in items.items():
        match = _ROW.match(path)
        if match:
            rows.setdefault(int(match.group(1)), {})[match.group(2)] = value
    header = "  ".join(title.ljust(width) for title, width, _, _ in _COLUMNS)
    lines += [header, "-" * len(header)]
    for n in sorted(rows):
        row = rows[n]
        lines.append("  ".join(_cell(row.get(key), fmt, key).ljust(width)
                               for _, width, key, fmt in _COLUMNS).rstrip())
    if not rows:
        lines.append("(no members)")
    return "\n".join(lines)


async def _find_aggregates(bus: Any, wanted: str | None) -> list[str]:
    if wanted:
        return [wanted]
    reply = await client.call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "ListNames",
                              interface="org.freedesktop.DBus")
    found = []
    for name in sorted(n for n in reply.body[0] if n.startswith(BATTERY_PREFIX)):
        try:
            if await client.get_value(bus, name, "/ProductName", 2.0) == "Battery Aggregator":
                found.append(name)
        except client.CallError:
            continue
    return found or [DEFAULT_SERVICE_NAME]


async def status(service: str | None, watch: bool, interval: float = 1.0) -> int:
    bus = await connect()
    try:
        names = await _find_aggregates(bus, service)
        while True:
            screens = []
            for name in names:
                try:
                    screens.append(render_status(name, await client.get_items(bus, name, 5.0)))
                except client.CallError as exc:
                    screens.append(f"{name}: not on the bus ({exc})")
            text = "\n\n".join(screens)
            if watch:
                sys.stdout.write(("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n") + text + "\n")
                sys.stdout.flush()
                await asyncio.sleep(interval)
                continue
            print(text)
            if any("not on the bus" in s for s in screens):
                print(f"Is the service running on {which_bus()}? (--service names another aggregate)",
                      file=sys.stderr)
                return 1
            return 0
    finally:
        bus.disconnect()


async def dump(path: str) -> int:
    """Every battery service's paths and values into one JSON file (for bug reports)."""
    bus = await connect()
    monitor = ServiceMonitor(bus, [BATTERY_PREFIX], require_device_instance=False, call_timeout=5.0)
    await monitor.start()
    data = {
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "services": {name: dict(sorted(s.values.items())) for name, s in sorted(monitor.services.items())},
        "not_answering": monitor.pending,
    }
    await monitor.stop()
    bus.disconnect()
    text = json.dumps(data, indent=1, default=repr)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"wrote {len(data['services'])} battery services to {path}")
    return 0
