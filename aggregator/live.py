"""What a config would do on the bus now: every battery service and the role it would get (check --live)."""
from __future__ import annotations

from .battery.publish import BATTERY_PREFIX
from .battery.virtual import role_config
from .bus.lib import connect
from .bus.monitor import ServiceMonitor
from .config import Config
from .battery.membership import ServiceInfo, assign_roles


async def print_live_roles(config: Config) -> int:
    try:
        bus = await connect()
    except Exception as exc:
        print(f"cannot connect to D-Bus: {exc}")
        return 1
    monitor = ServiceMonitor(bus, [BATTERY_PREFIX], call_timeout=3.0)
    await monitor.start()
    infos = [ServiceInfo.of(s.name, s.values) for s in monitor.services.values()]
    roles = assign_roles(role_config(config), infos)
    rows = [("service", "custom name", "serial", "role")]
    for info in sorted(infos, key=lambda i: i.name):
        role = roles.roles.get(info.name, "?")
        if info.name in roles.virtual_of:
            role += f" of {roles.virtual_of[info.name]}"
        rows.append((info.name, info.custom_name or "", info.serial or "", role))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for ref in roles.unresolved:
        print(f"unresolved: {ref} matches no battery service on the bus")
    for ref in roles.ambiguous:
        print(f"ambiguous: {ref} matches more than one service")
    for name in monitor.pending:
        print(f"not answering: {name}")
    await monitor.stop()
    bus.disconnect()
    return 0
