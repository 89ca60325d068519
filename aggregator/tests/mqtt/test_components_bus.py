"""The dispatcher and the cooperative as parts of the running service (`battery-aggregator run`): their paths
on the aggregate's own D-Bus service, a target written there moving real (simulated) batteries, and the
cooperative's target, from a peer site over a real mosquitto with TLS and the documented ACL, feeding the
dispatcher."""
from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregator.bus.lib import connect
from aggregator.bus import client
from aggregator.bus.service import VeService
from aggregator.features.coop.site import CoopSite
from aggregator_dev.mqttbroker import MosquittoBroker, find_mosquitto

from ..conftest import REPO, Processes
from ..helpers import eventually
from ..bus.test_aggregate import Bank, bus_address, start_aggregator  # noqa: F401  (fixture)
from .test_coop_mqtt import SETUP, USERS, settings_for, state
from ..bus.test_dispatch_bus import SIM_A, SIM_B, Sims, _battery

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


def _dispatcher(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"enabled": True, "cycleSeconds": 0.25, "staleAfterS": 1.5, "readRefreshS": 0.4,
                              "batteries": [_battery("Pack A", SIM_A, 1, 1000), _battery("Pack B", SIM_B, -1, 2000)]}
    config.update(overrides)
    return config


async def _start_sims(address: str, tmp_path: Path) -> Sims:
    sims = Sims(address, tmp_path)
    sims.start("dispatch_a", "--gain", "1.0", "--max-discharge", "300", "--capacity", "5000")
    sims.start("dispatch_b", "--gain", "1.0", "--max-discharge", "3000", "--capacity", "10000",
               "--setpoint-sign", "-1", "--measured-sign", "-1", "--device-instance", "41")
    bus = await connect()
    try:
        async def there() -> bool:
            for name in (SIM_A, SIM_B):
                try:
                    await client.get_value(bus, name, "/Setpoint", timeout=1.0)
                except client.CallError:
                    return False
            return True

        await eventually(there, timeout=20, interval=0.2)
    finally:
        bus.disconnect()
    return sims


async def test_dispatcher_on_the_aggregate_service(processes: Processes, tmp_path: Path, bus_address: str) -> None:
    sims = await _start_sims(bus_address, tmp_path)
    bank = Bank()
    try:
        await bank.add("a")
        agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"),
                                     dispatcher=_dispatcher())
        await bank.value_is(agg, "/Dispatcher/Mode", "target", timeout=15)
        await eventually(lambda: _number(bank.read(agg, "/Dispatcher/MaxTargetPower")), timeout=10)
        writer = await connect()
        assert await client.set_value(writer, agg, "/Dispatcher/TargetPower", -1000.0) == 0
        assert await client.set_value(writer, agg, "/Dispatcher/TargetPower", "lots") != 0  # refused, not fatal

        async def delivered() -> bool:
            achieved = await bank.read(agg, "/Dispatcher/AchievedPower")
            return isinstance(achieved, float) and abs(achieved + 1000) < 80

        await eventually(delivered, timeout=25, interval=0.5)
        # The aggregate battery itself is still served next to it.
        assert await bank.read(agg, "/System/NrOfBatteries") == 1
        writer.disconnect()
        proc.terminate()
        proc.wait(10)
        # Stopping the service leaves no battery with an order nobody follows.
        reader = await connect()
        assert await client.get_value(reader, SIM_A, "/Setpoint") == 0
        assert await client.get_value(reader, SIM_B, "/Setpoint") == 0
        reader.disconnect()
        assert (tmp_path / "state" / "dispatcher.json").exists()  # what it learned is kept
    finally:
        bank.close()
        sims.stop_all()


async def _number(read: Any) -> bool:
    return isinstance(await read, (int, float))


async def test_coop_target_from_a_peer_site_drives_the_dispatcher(processes: Processes, tmp_path: Path,
                                                                   bus_address: str) -> None:
    sims = await _start_sims(bus_address, tmp_path)
    bank = Bank()
    with MosquittoBroker(users=USERS, acl=(SETUP / "acl.example").read_text(), tls=True) as broker:
        peer = CoopSite(settings_for(broker, "site-b"))
        peer_task = asyncio.get_running_loop().create_task(peer.run())
        try:
            # Our bank: 50 % of 100 Ah at 53 V (5.3 kWh). The peer: 90 % of 10 kWh, so we are below the average.
            await bank.add("a", Soc=50.0, InstalledCapacity=100.0, Dc__0__Voltage=53.0)
            # Victron's system calculator: the household imports 1.5 kW and uses 0.5 kW.
            system = VeService(await connect(), "com.victronenergy.system")
            system.add_path("/Ac/Grid/L1/Power", 1500.0)
            system.add_path("/Ac/Consumption/L1/Power", 500.0)
            system.add_path("/Dc/Pv/Power", 0.0)
            await system.register()
            coop = settings_for(broker, "site-a", curtail={"adapter": "none"}).model_dump(mode="json",
                                                                                        exclude_none=True)
            agg, proc = start_aggregator(processes, tmp_path, bank, stateDir=str(tmp_path / "state"),
                                         dispatcher=_dispatcher(), coop=coop)
            await asyncio.wait_for(peer.connected.wait(), 10)

            async def peer_publishes() -> bool:
                await peer.step(state("site-b", 90.0, capacity=10.0, consumption=0.0), 0.0)
                assert proc.poll() is None, processes.output(proc)
                try:
                    return await bank.read(agg, "/Coop/PeersOnline") == 1
                except client.CallError:
                    return False

            await eventually(peer_publishes, timeout=20, interval=0.5)
            average = await bank.read(agg, "/Coop/AverageLevel")
            assert average == pytest.approx(100 * (0.5 * 5.3 + 9.0) / 15.3, abs=0.5)
            target = await bank.read(agg, "/Coop/OwnTarget")
            assert target > 100, "below the fleet's average: charge from the grid"
            # The dispatcher takes the cooperative's target and the batteries follow it.
            await eventually(lambda: _close_to(bank.read(agg, "/Dispatcher/TargetPower"), target), timeout=10)
            assert peer.fleet() is not None and peer.peers_online() == ["site-a"]
            assert proc.poll() is None
            # Metering for the cooperative's accounts: kept at stop, exported as CSV. Its cycles meter the time
            # between them: wait until the peer has our states of a second more (0.5 kW: > 0.1 Wh metered).
            first = peer.peers["site-a"].timestamp
            await eventually(lambda: peer.peers["site-a"].timestamp >= first + 1.0, timeout=20)
            proc.terminate()
            proc.wait(10)
            exported = subprocess.run([sys.executable, "-m", "aggregator", "coop", "--csv", "--state-dir",
                                       str(tmp_path / "state")], capture_output=True, text=True, cwd=REPO, timeout=30)
            rows = list(csv.DictReader(io.StringIO(exported.stdout)))
            assert exported.returncode == 0 and [r["site"].split()[0] for r in rows] == ["site-a"], exported
            assert float(rows[0]["import_kwh"]) > 0 and float(rows[0]["load_kwh"]) > 0
            system.close()
        finally:
            peer_task.cancel()
            await asyncio.gather(peer_task, return_exceptions=True)
            bank.close()
            sims.stop_all()


async def _close_to(read: Any, expected: float) -> bool:
    value = await read
    return isinstance(value, float) and abs(value - expected) <= max(25.0, 0.05 * abs(expected))
