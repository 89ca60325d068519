"""The service loads the heavy side of a feature (numpy for the dispatcher's model, MQTT for the cooperative and
the dispatcher's MQTT links) only when the config turns that feature on: memory on a GX is scarce."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("numpy", "aiomqtt", "paho", "jsonschema", "pydantic", "matplotlib", "aggregator.features.dispatcher.runtime",
         "aggregator.features.coop.runtime", "aggregator.mqtt")

# Runs the service in a process of its own until its aggregate is on the bus (a GetItems answered), then prints
# which of HEAVY it has imported.
_PROBE = """
import asyncio, json, os, sys
from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.host import daemon

async def main():
    task = asyncio.get_running_loop().create_task(daemon.run(sys.argv[1], exit_delay=0))
    observer = await connect()
    for _ in range(600):
        if task.done() or await client.name_owner(observer, sys.argv[2], 0.1):
            break
        await asyncio.sleep(0.05)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY or m in HEAVY)
    print(json.dumps({"running": not task.done(), "loaded": loaded}), flush=True)
    os._exit(0)

HEAVY = %r
asyncio.run(main())
"""


def loaded_by(config: dict, tmp_path: Path, bus_address: str) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"stateDir": str(tmp_path / "state"), "startupBatteryWait": 1, **config}))
    done = subprocess.run([sys.executable, "-c", _PROBE % (HEAVY,), str(path), config["serviceName"]],
                          capture_output=True, text=True,
                          timeout=60, env={"DBUS_SESSION_BUS_ADDRESS": bus_address, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_plain_config_loads_no_side_feature(tmp_path: Path, bus_address: str) -> None:
    result = loaded_by({"serviceName": "com.victronenergy.battery.lazyplain"}, tmp_path, bus_address)
    assert result == {"running": True, "loaded": []}


def test_the_dispatcher_loads_what_it_needs(tmp_path: Path, bus_address: str) -> None:
    """The other side of the rule (and of the probe): a feature that is on brings its own modules."""
    service = "com.batteryaggregator.controllable.lazy"
    battery = {"name": "lazy", "setpoint": {"dbus": {"service": service, "path": "/Setpoint"}},
               "measured": {"dbus": {"service": service, "path": "/Dc/0/Power"}}, "maxChargeW": 1000,
               "maxDischargeW": 1000, "capacityWh": 5000}
    result = loaded_by({"serviceName": "com.victronenergy.battery.lazydispatch",
                        "dispatcher": {"enabled": True, "batteries": [battery]}}, tmp_path, bus_address)
    assert result["running"]
    assert {"numpy", "aggregator.features.dispatcher.runtime", "pydantic"} <= set(result["loaded"])
