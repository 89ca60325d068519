"""check_config.sh as users run it: files with mistakes, a good file, and --live against services on a bus."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from aggregator.bus.lib import connect
from aggregator.bus.service import VeService

from ..conftest import REPO


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "check_config.sh"), *args], capture_output=True, text=True, timeout=60,
                          env=env or dict(os.environ))


def test_every_mistake_is_named_with_key_value_and_place(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "excludedServices": ["com.victronenergy.battery.shunt"],
        "primaryServices": {"com.victronenergy.battery.shunt": ["/SOC"]},
        "virtualBatteries": {"com.victronenergy.battery.v1": ["com.victronenergy.battery.a",
                                                              "class:hooks.NoSuchHook"]},
    }, indent=1))
    result = check(str(config))
    assert result.returncode == 1
    out = result.stdout
    assert "also listed in excludedServices" in out
    assert "did you mean /Soc?" in out
    assert 'virtualBatteries."com.victronenergy.battery.v1"[1]' in out and "unknown hook class" in out
    assert "line " in out and "column " in out
    config.write_text('{"logLevel": "INFO", "logLevel": "DEBUG"}')
    result = check(str(config))
    assert result.returncode == 1 and "duplicate key 'logLevel'" in result.stdout
    result = check(str(tmp_path / "missing.json"))
    assert result.returncode == 1 and "cannot read" in result.stdout


def test_a_good_config_is_ok(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"currentRatioMethod": "ir", "excludedServices": ["serial:SHUNT-1"]}))
    result = check(str(config))
    assert result.returncode == 0 and result.stdout.strip() == "OK"


async def test_live_lists_services_and_their_roles(tmp_path: Path, bus_address: str) -> None:
    import asyncio

    services = []
    for suffix, custom in (("a", "Pack A"), ("b", "Pack B"), ("shunt", "Shunt")):
        service = VeService(await connect(), f"com.victronenergy.battery.live{suffix}")
        service.add_mandatory_paths(process_name="t", process_version="1", connection="t",
                                    device_instance=40 + len(services), product_id=1, product_name="T")
        service.add_path("/CustomName", custom)
        service.add_path("/Serial", f"SN-{suffix}")
        await service.register()
        services.append(service)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"excludedServices": ["name:Shunt"],
                                  "virtualBatteries": {"com.victronenergy.battery.vlive": ["serial:SN-b"]},
                                  "primaryServices": ["name:Nobody"]}))
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus_address)
    result = await asyncio.get_running_loop().run_in_executor(None, lambda: check("--live", str(config), env=env))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("com.")}
    assert lines["com.victronenergy.battery.livea"].endswith("member")
    assert lines["com.victronenergy.battery.liveshunt"].endswith("excluded")
    assert "virtual member of com.victronenergy.battery.vlive" in lines["com.victronenergy.battery.liveb"]
    assert "unresolved: name:Nobody" in result.stdout
    for service in services:
        service.close()
