"""The aggregated battery and virtual batteries: `battery-aggregator run` as its own process, members built
by the tests on the private bus, results read over the bus by other clients."""
from __future__ import annotations

import asyncio
import itertools
import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest

from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.bus.service import VeService
from aggregator_dev.privatebus import PrivateBus

from ..conftest import Busctl, Processes
from ..helpers import eventually

_ids = itertools.count()


@pytest.fixture
def bus_address(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bus of its own for each test: an aggregator takes every battery on its bus as a member."""
    with PrivateBus() as bus:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.address)
        yield bus.address


async def start_settings(store: Path | None = None) -> Any:
    """Victron's localsettings stand-in on the test's bus: on a GX it is always there."""
    from aggregator_dev.simulator.localsettings import serve

    return await serve(str(store) if store else None)


class Bank:
    """Member batteries built by a test, and a client connection to read the aggregate."""

    def __init__(self) -> None:
        self.members: dict[str, VeService] = {}
        self.reader: Any = None
        self.tag = f"t{next(_ids)}"

    def name(self, suffix: str) -> str:
        return f"com.victronenergy.battery.{self.tag}{suffix}"

    async def add(self, suffix: str, instance: int = 0, **values: Any) -> VeService:
        service = VeService(await connect(), self.name(suffix))
        service.add_mandatory_paths(process_name="test", process_version="1", connection="test",
                                    device_instance=instance or 300 + len(self.members), product_id=0xB0F0,
                                    product_name=f"Pack {suffix}")
        defaults = {"/Dc/0/Voltage": 53.0, "/Dc/0/Current": 0.0, "/Soc": 50.0, "/InstalledCapacity": 100.0,
                    "/CustomName": f"Pack {suffix}", "/Serial": f"SN-{self.tag}-{suffix}"}
        defaults.update({"/" + k.replace("__", "/"): v for k, v in values.items()})
        for path, value in defaults.items():
            service.add_path(path, value, writeable=path == "/CustomName")
        await service.register()
        self.members[suffix] = service
        return service

    async def read(self, service: str, path: str) -> Any:
        if self.reader is None:
            self.reader = await connect()
        return await client.get_value(self.reader, service, path, timeout=2.0)

    async def value_is(self, service: str, path: str, expected: Any, timeout: float = 20.0) -> None:
        seen: list[Any] = []

        async def check() -> bool:
            try:
                value = await self.read(service, path)
            except client.CallError as error:
                seen[:] = [error]
                return False
            seen[:] = [value]
            if isinstance(expected, float) and isinstance(value, float):
                return math.isclose(value, expected, rel_tol=1e-3, abs_tol=1e-3)
            return value == expected

        try:
            await eventually(check, timeout=timeout, interval=0.1)
        except AssertionError:
            raise AssertionError(f"{path} of {service} is {seen[0] if seen else '?'!r}, not {expected!r}") from None

    async def barrier(self, service: str, member: str) -> None:
        """Returns once the aggregate has handled every change `member` sent before: a sentinel change of the
        member's /Soc (which no limit reads), sent after them on the same connection, seen in the aggregate. A test
        asserting that something did NOT change asserts after this, not after a pause."""
        battery = self.members[member]
        before = await self.read(service, "/Soc")
        soc = battery["/Soc"]
        battery.set_value("/Soc", soc - 0.5 if soc >= 50.0 else soc + 0.5)

        async def moved() -> bool:
            return await self.read(service, "/Soc") != before

        await eventually(moved, timeout=10)

    def close(self) -> None:
        for service in self.members.values():
            service.close()
        if self.reader is not None:
            self.reader.disconnect()


async def watch_signals(bus_address: str, service: str) -> asyncio.subprocess.Process:
    """dbus-monitor on every signal of the service's connection, once it listens (read it with signals_until)."""
    bus = await connect()
    try:
        owner = (await client.call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "GetNameOwner", "s",
                                   [service], interface="org.freedesktop.DBus")).body[0]
    finally:
        bus.disconnect()
    monitor = await asyncio.create_subprocess_exec(
        "dbus-monitor", "--address", bus_address, f"type='signal',sender='{owner}'",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert monitor.stdout is not None
    # dbus-monitor prints its own NameAcquired once it is a monitor: then it is ready.
    await asyncio.wait_for(monitor.stdout.readline(), 5)
    return monitor


async def signals_until(monitor: asyncio.subprocess.Process, text: str, timeout: float = 20.0) -> str:
    """What the monitor printed up to and including the first line with `text`; then it is stopped. What a
    service sent before the signal with `text` is all in it: a bus delivers one sender's messages in order."""
    assert monitor.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while not lines or text not in lines[-1]:
                line = await monitor.stdout.readline()
                if not line:
                    break
                lines.append(line.decode())
    finally:
        monitor.terminate()
        await monitor.wait()
    out = "".join(lines)
    assert text in out, out
    return out


def start_aggregator(processes: Processes, tmp_path: Path, bank: Bank, suffix: str = "agg",
                     **config: Any) -> tuple[str, Any]:
    name = bank.name(suffix)
    config.setdefault("serviceName", name)
    config.setdefault("startupBatteryWait", 5)
    config.setdefault("reconnectTimeout", 0)
    config.setdefault("stateDir", str(tmp_path / "state"))  # never the production stateDir
    path = tmp_path / f"{suffix}.json"
    path.write_text(json.dumps(config))
    return name, processes.start("run", "--config", str(path), "--log-level", "DEBUG")


async def test_soc_is_capacity_weighted_and_busctl_reads_it_as_the_gx_would(
        processes: Processes, tmp_path: Path, busctl: Busctl) -> None:
    bank = Bank()
    await bank.add("a", Soc=60.0, InstalledCapacity=280.0, Capacity=168.0, Dc__0__Current=-30.0)
    await bank.add("b", Soc=70.0, InstalledCapacity=100.0, Capacity=70.0, Dc__0__Current=-20.0)
    agg, _ = start_aggregator(processes, tmp_path, bank, excludedServices=[])
    await bank.value_is(agg, "/Soc", 62.6316)  # (168 + 70) / 380; the old tool showed 65%
    reply = await busctl.acall_json(agg, "/", "GetItems")
    items = reply["data"][0]
    assert items["/Soc"]["Text"]["data"] == "62.6%"
    assert items["/Dc/0/Current"]["Value"] == {"type": "d", "data": -50.0}
    assert items["/InstalledCapacity"]["Value"]["data"] == 380.0
    # TimeToGo from remaining Ah and the bank current, not a mean of members: 238 Ah / 50 A.
    assert items["/TimeToGo"]["Value"]["data"] == round(238 / 50 * 3600)
    assert items["/ProductName"]["Value"]["data"] == "Battery Aggregator"
    assert items["/Connected"]["Value"]["data"] == 1
    assert items["/Mgmt/Connection"]["Value"]["data"] == "Aggregate of 2 batteries"
    assert items["/DeviceInstance"]["Value"]["type"] == "i"
    assert items["/System/NrOfBatteries"]["Value"]["data"] == 2
    # Nothing known is never 0: no member publishes a temperature.
    assert items["/Dc/0/Temperature"]["Value"] == {"type": "ai", "data": []}
    # Per-member rows as real paths.
    rows = {items[f"/Batteries/{n}/Service"]["Value"]["data"]: n for n in (0, 1)}
    row_a = rows[bank.name("a")]
    assert items[f"/Batteries/{row_a}/Soc"]["Value"]["data"] == 60.0
    assert items[f"/Batteries/{row_a}/State"]["Value"]["data"] == "online"
    assert items[f"/Batteries/{row_a}/Name"]["Value"]["data"] == "Pack a"
    # Charging: TimeToGo becomes invalid.
    for member in bank.members.values():
        member.set_value("/Dc/0/Current", 10.0)
    await bank.value_is(agg, "/TimeToGo", None)
    bank.close()


async def test_waits_for_a_member_with_a_voltage_then_registers(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    agg, proc = start_aggregator(processes, tmp_path, bank, startupBatteryWait=60)
    await asyncio.sleep(1.5)
    try:
        await bank.read(agg, "/Soc")
        raise AssertionError("the aggregate registered without any member")
    except client.CallError:
        pass
    await bank.add("a", Soc=40.0, Dc__0__Voltage=52.5)
    await bank.value_is(agg, "/Dc/0/Voltage", 52.5)
    bank.close()
    proc.terminate()  # else the next aggregate would take this one as its member
    proc.wait(timeout=10)
    # Without any member it registers after the wait, with invalid values rather than zeros.
    bank2 = Bank()
    agg2, _ = start_aggregator(processes, tmp_path, bank2, startupBatteryWait=1)
    await bank2.value_is(agg2, "/Connected", 1)
    assert await bank2.read(agg2, "/Dc/0/Voltage") is None
    assert await bank2.read(agg2, "/Soc") is None
    assert await bank2.read(agg2, "/Info/MaxChargeCurrent") is None
    assert "no member batteries" in await bank2.read(agg2, "/Aggregator/Status")
    bank2.close()


async def test_primary_auxiliary_and_excluded(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("a", Soc=50.0, Dc__0__Current=10.0)
    await bank.add("b", Soc=50.0, Dc__0__Current=10.0)
    await bank.add("shunt", Soc=47.0, Dc__0__Current=19.5, Info__MaxChargeCurrent=999.0)
    await bank.add("meta", Dc__0__Temperature=21.0, Soc=99.0)
    await bank.add("ignored", Soc=1.0, Dc__0__Current=500.0)
    agg, _ = start_aggregator(processes, tmp_path, bank, excludedServices=[bank.name("ignored")],
                              primaryServices={bank.name("shunt"): ["/Soc", "/Dc/0/Current",
                                                                    "/Info/MaxChargeCurrent"]},
                              auxiliaryServices=[bank.name("meta")])
    await bank.value_is(agg, "/Dc/0/Current", 19.5)  # the shunt wins after merging
    assert await bank.read(agg, "/Soc") == 47.0
    assert await bank.read(agg, "/Dc/0/Temperature") == 21.0  # nobody else has one: auxiliary fills it
    assert await bank.read(agg, "/InstalledCapacity") == 200.0  # only a and b are members
    assert await bank.read(agg, "/System/NrOfBatteries") == 2
    # Charge limits never come from a primary or auxiliary service, nor does the aggregate's identity.
    assert await bank.read(agg, "/Info/MaxChargeCurrent") is None
    for path, own in (("/ProductName", "Battery Aggregator"), ("/CustomName", ""),
                      ("/Serial", "batteryaggregator_" + agg.rsplit(".", 1)[-1])):
        assert await bank.read(agg, path) == own, path
    assert await bank.read(agg, "/DeviceInstance") != await bank.read(bank.name("meta"), "/DeviceInstance")
    # The shunt changes: the aggregate follows.
    bank.members["shunt"].set_value("/Dc/0/Current", -3.0)
    await bank.value_is(agg, "/Dc/0/Current", -3.0)
    bank.close()


async def test_name_and_serial_references_follow_the_bus(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("a", Dc__0__Current=5.0)
    await bank.add("b", Dc__0__Current=7.0)
    excluded_serial = f"SN-{bank.tag}-b"
    agg, proc = start_aggregator(processes, tmp_path, bank, excludedServices=[f"serial:{excluded_serial}",
                                                                              "name:Shunt of " + bank.tag])
    await bank.value_is(agg, "/Dc/0/Current", 5.0)
    assert "unresolved: name:Shunt of" in await bank.read(agg, "/Aggregator/Status")
    # A JSON text: an empty array would read as invalid through Victron's MQTT bridge.
    assert json.loads(await bank.read(agg, "/Aggregator/Unresolved")) == ["name:Shunt of " + bank.tag]
    # A service renamed to the excluded CustomName is excluded from then on.
    bank.members["a"].set_value("/CustomName", "Shunt of " + bank.tag)
    await bank.value_is(agg, "/Dc/0/Current", None)
    assert await bank.read(agg, "/Aggregator/Status") == "no member batteries"
    assert await bank.read(agg, "/Aggregator/Unresolved") == "[]"
    await bank.add("c", Dc__0__Current=2.0)
    await bank.value_is(agg, "/Dc/0/Current", 2.0)
    assert proc.poll() is None
    bank.close()


async def test_virtual_battery_merges_first_valid_and_applies_hooks(processes: Processes, tmp_path: Path,
                                                                    busctl: Busctl) -> None:
    settings = await start_settings()
    bank = Bank()
    await bank.add("bms", Dc__0__Voltage=51.5, Soc=None, Info__MaxChargeCurrent=100.0, Dc__0__Current=None)
    await bank.add("shunt", Dc__0__Voltage=51.4, Soc=80.0, Dc__0__Current=-12.0)
    await bank.add("other", Dc__0__Voltage=51.6, Soc=60.0, Dc__0__Current=-8.0, InstalledCapacity=100.0)
    vb = bank.name("vb")
    agg, _ = start_aggregator(
        processes, tmp_path, bank,
        virtualBatteries={vb: ["class:hooks.CustomChargingHook#t", bank.name("bms"), "name:Pack shunt"]},
        classes={"hooks.CustomChargingHook#t": {"ccls": {"46": 128, "51": 64, "52": 32}, "dcls": {"0": 150}}})
    # Per path, the first listed member with a valid value: voltage from the BMS, SoC/current from the shunt.
    await bank.value_is(vb, "/Soc", 80.0)
    assert await bank.read(vb, "/Dc/0/Voltage") == 51.5
    assert await bank.read(vb, "/Dc/0/Current") == -12.0
    # The hook stands first in the list: 51.5 V is in the 51 V row, over the BMS's 100 A.
    assert await bank.read(vb, "/Info/MaxChargeCurrent") == 64.0
    assert await bank.read(vb, "/Info/MaxDischargeCurrent") == 150.0
    assert await bank.read(vb, "/ProductName") == "Virtual Battery"
    # No member publishes /TimeToGo: computed like the aggregate's, 80 % of 100 Ah at 12 A.
    assert await bank.read(vb, "/TimeToGo") == 24000
    bank.members["bms"].set_value("/Dc/0/Voltage", 52.2)
    await bank.value_is(vb, "/Info/MaxChargeCurrent", 32.0)
    # The aggregate counts the virtual battery once and its members not at all.
    await bank.value_is(agg, "/Dc/0/Current", -20.0)
    assert await bank.read(agg, "/System/NrOfBatteries") == 2
    instances = {await bank.read(n, "/DeviceInstance") for n in (agg, vb)}
    assert len(instances) == 2
    # Its row is named like any member's: its CustomName, else its product name (not its service suffix).
    row = [n for n in (0, 1) if await bank.read(agg, f"/Batteries/{n}/Service") == vb][0]
    assert await bank.read(agg, f"/Batteries/{row}/Name") == "Virtual Battery"
    assert (await busctl.acall_json(vb, "/CustomName", "SetValue", "v", "s", "Rack A"))["data"] == [0]
    await bank.value_is(agg, f"/Batteries/{row}/Name", "Rack A")
    bank.members["shunt"].set_value("/Dc/0/Current", 5.0)
    await bank.value_is(vb, "/TimeToGo", None)  # charging
    bank.close()
    settings.service.close()


async def test_modules_online_and_offline_add_up_while_a_member_is_stale(processes: Processes, tmp_path: Path) -> None:
    """A stale member's last online count was still summed: 3 online + 1 offline with 3 batteries. Its modules
    count as offline until it is back (or dropped); expected batteries not on the bus at all add one each."""
    bank = Bank()
    modules = {"System__NrOfModulesOnline": 2, "System__NrOfModulesOffline": 0}
    await bank.add("a", **modules)
    await bank.add("b", **modules)
    c = await bank.add("c", **modules)
    agg, _ = start_aggregator(processes, tmp_path, bank, reconnectTimeout=30, expectedBatteries=4)
    await bank.value_is(agg, "/System/NrOfBatteries", 3)
    assert await bank.read(agg, "/System/NrOfModulesOnline") == 6
    assert await bank.read(agg, "/System/NrOfModulesOffline") == 1  # the fourth battery is missing
    c.close()  # stale while it may come back
    await bank.value_is(agg, "/System/NrOfModulesOnline", 4)
    assert await bank.read(agg, "/System/NrOfModulesOffline") == 3
    assert await bank.read(agg, "/System/NrOfBatteries") == 3
    # A module count that changes while another member is stale keeps the missing battery counted.
    bank.members["a"].set_value("/System/NrOfModulesOffline", 1)
    bank.members["a"].set_value("/System/NrOfModulesOnline", 1)
    await bank.value_is(agg, "/System/NrOfModulesOffline", 4)
    assert await bank.read(agg, "/System/NrOfModulesOnline") == 3
    await bank.add("c", **modules)
    await bank.value_is(agg, "/System/NrOfModulesOnline", 5)
    assert await bank.read(agg, "/System/NrOfModulesOffline") == 2
    bank.close()


async def test_serial_charge_cycles_and_values_at_their_resolution(processes: Processes, tmp_path: Path,
                                                                     busctl: Busctl, bus_address: str) -> None:
    """Members and virtual batteries have a /Serial and /History/ChargeCycles, the aggregate had neither. And
    read through Victron's MQTT bridge, its doubles went out unrounded (Soc 60.182758620689654, a power
    alternating -4729.8 / -4729.700000000001): one displayed value published again and again."""
    bank = Bank()
    a = await bank.add("a", InstalledCapacity=100.0, History__ChargeCycles=100, Soc=60.182758620689654,
                       Dc__0__Power=-2000.1, Dc__0__Voltage=53.123456)
    await bank.add("b", InstalledCapacity=300.0, History__ChargeCycles=300, Soc=60.182758620689654,
                   Dc__0__Power=-2729.600000000001, Dc__0__Voltage=53.123456)
    agg, _ = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/System/NrOfBatteries", 2)
    items = (await busctl.acall_json(agg, "/", "GetItems"))["data"][0]
    assert items["/Serial"]["Value"] == {"type": "s", "data": "batteryaggregator_" + agg.rsplit(".", 1)[-1]}
    assert items["/History/ChargeCycles"]["Value"] == {"type": "d", "data": 250.0}  # weighted by capacity
    assert items["/Soc"]["Value"] == {"type": "d", "data": 60.2} and items["/Soc"]["Text"]["data"] == "60.2%"
    assert items["/Dc/0/Power"]["Value"] == {"type": "d", "data": -4730.0}
    assert items["/Dc/0/Voltage"]["Value"] == {"type": "d", "data": 53.12}
    rows = [n for n in (0, 1) if items[f"/Batteries/{n}/Service"]["Value"]["data"] == bank.name("a")]
    assert items[f"/Batteries/{rows[0]}/Soc"]["Value"] == {"type": "d", "data": 60.2}
    monitor = await watch_signals(bus_address, agg)
    for power in (-2000.0, -2000.3, -2000.8):  # the bank's -4729.6 .. -4730.4 W: the same watt
        a.set_value("/Dc/0/Power", power)
        await asyncio.sleep(0.1)
    a.set_value("/Soc", 60.19)
    a.set_value("/Dc/0/Power", -2010.0)  # after the others: once it is out, they have been handled
    out = await signals_until(monitor, "-4740")
    assert out.count('string "/Dc/0/Power"') == 1, out  # only the change of -10 W went out
    assert 'string "/Soc"' not in out
    bank.close()


async def test_member_vanishes_and_returns_with_reconnect_timeout(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("a", InstalledCapacity=100.0, Dc__0__Current=4.0)
    b = await bank.add("b", InstalledCapacity=200.0, Dc__0__Current=6.0)
    agg, _ = start_aggregator(processes, tmp_path, bank, reconnectTimeout=3)
    await bank.value_is(agg, "/InstalledCapacity", 300.0)
    rows = {await bank.read(agg, f"/Batteries/{n}/Service"): n for n in (0, 1)}
    row_b = rows[bank.name("b")]
    b.close()
    await bank.value_is(agg, f"/Batteries/{row_b}/State", "stale")
    assert await bank.read(agg, "/InstalledCapacity") == 300.0  # last values kept while it may come back
    assert "stale" in await bank.read(agg, "/Aggregator/Status")
    b = await bank.add("b", InstalledCapacity=200.0, Dc__0__Current=1.0)
    await bank.value_is(agg, f"/Batteries/{row_b}/State", "online")
    await bank.value_is(agg, "/Dc/0/Current", 5.0)  # fresh values
    assert await bank.read(agg, f"/Batteries/{row_b}/Service") == bank.name("b")  # same row
    b.close()
    await bank.value_is(agg, f"/Batteries/{row_b}/State", "lost", timeout=10)
    assert await bank.read(agg, "/InstalledCapacity") == 100.0
    assert await bank.read(agg, f"/Batteries/{row_b}/Soc") is None
    bank.close()


async def test_without_reconnect_timeout_a_member_is_dropped_at_once(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("a", Dc__0__Current=4.0)
    b = await bank.add("b", Dc__0__Current=6.0)
    agg, _ = start_aggregator(processes, tmp_path, bank, reconnectTimeout=0)
    await bank.value_is(agg, "/Dc/0/Current", 10.0)
    b.close()
    await bank.value_is(agg, "/Dc/0/Current", 4.0, timeout=5)
    bank.close()


async def test_absurd_and_mistyped_member_values_are_ignored(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("a", Soc=40.0, InstalledCapacity=100.0, Dc__0__Voltage=52.0)
    b = await bank.add("b", Soc=60.0, InstalledCapacity=100.0, Dc__0__Voltage=54.0)
    agg, proc = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/Soc", 50.0)
    b.set_values({"/Soc": 150.0, "/Dc/0/Voltage": float("nan"), "/InstalledCapacity": -100.0})
    await bank.value_is(agg, "/Soc", 40.0)  # b's SoC is unknown now, not 150 and not 0
    assert await bank.read(agg, "/Dc/0/Voltage") == 52.0
    assert await bank.read(agg, "/InstalledCapacity") == 100.0
    b.set_values({"/Soc": "full", "/Dc/0/Current": "n/a"})
    b.set_value("/Dc/0/Voltage", 54.0)  # a sentinel: once the aggregate shows it, the values before were handled

    async def sentinel_seen() -> bool:
        return await bank.read(agg, "/Dc/0/Voltage") != 52.0

    await eventually(sentinel_seen)
    assert await bank.read(agg, "/Soc") == 40.0
    assert proc.poll() is None
    log = processes.output(proc)
    assert "ignoring /Soc of " + bank.name("b") in log and "150" in log
    bank.close()


async def test_one_member_opening_its_fets_does_not_zero_the_bank(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    a = await bank.add("a", Info__MaxChargeCurrent=100.0, Io__AllowToCharge=1, Dc__0__Current=20.0)
    b = await bank.add("b", Info__MaxChargeCurrent=80.0, Io__AllowToCharge=1, Dc__0__Current=20.0)
    agg, _ = start_aggregator(processes, tmp_path, bank, limits={"rampUpRate": 1000})  # no ramp from 0 at start
    # Equal capacities, no learned shares yet: 50% each, and b's 80 A binds: 160 A for the bank.
    await bank.value_is(agg, "/Info/MaxChargeCurrent", 160.0)
    b.set_values({"/Io/AllowToCharge": 0, "/Dc/0/Current": 0.0})
    a.set_value("/Dc/0/Current", 40.0)
    # b's FETs are open (it carries nothing while a charges): a takes everything, and only a's own limit counts
    # (a drop goes out at once).
    await bank.value_is(agg, "/Info/MaxChargeCurrent", 100.0)
    assert await bank.read(agg, "/Io/AllowToCharge") == 1
    bank.members["a"].set_value("/Io/AllowToCharge", 0)
    await bank.value_is(agg, "/Info/MaxChargeCurrent", 0.0)
    assert await bank.read(agg, "/Io/AllowToCharge") == 0
    bank.close()


async def test_degraded_mode_with_expected_batteries(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("a")
    await bank.add("b")
    agg, _ = start_aggregator(processes, tmp_path, bank, expectedBatteries=3)
    await bank.value_is(agg, "/Alarms/MissingBatteries", 1)
    assert await bank.read(agg, "/System/NrOfModulesOffline") == 1
    assert "1 of 3 expected batteries missing" in await bank.read(agg, "/Aggregator/Status")
    await bank.add("c")
    await bank.value_is(agg, "/Alarms/MissingBatteries", 0)
    bank.close()


async def test_two_instances_multi_level_without_loops(processes: Processes, tmp_path: Path) -> None:
    settings = await start_settings()
    bank = Bank()
    await bank.add("p1", Dc__0__Current=1.0)
    await bank.add("p2", Dc__0__Current=2.0)
    await bank.add("p3", Dc__0__Current=4.0)
    lower, lower_proc = start_aggregator(processes, tmp_path, bank, suffix="lower",
                                         excludedServices=[bank.name("p3")])
    await bank.value_is(lower, "/Dc/0/Current", 3.0)
    upper, _ = start_aggregator(processes, tmp_path, bank, suffix="upper",
                                excludedServices=[bank.name("p1"), bank.name("p2")])
    # The upper one aggregates the lower aggregate and p3; the lower one does not take the upper one back.
    await bank.value_is(upper, "/Dc/0/Current", 7.0)
    await eventually(lambda: f"found {upper} " in processes.output(lower_proc))  # the lower one has read it
    await bank.barrier(lower, "p1")
    assert await bank.read(lower, "/Dc/0/Current") == 3.0
    assert await bank.read(upper, "/Aggregator/Chain") == [upper, lower]
    assert await bank.read(lower, "/DeviceInstance") != await bank.read(upper, "/DeviceInstance")
    bank.close()
    settings.service.close()


async def test_writeable_paths_and_custom_name_persisted(processes: Processes, tmp_path: Path,
                                                         busctl: Busctl) -> None:
    store = tmp_path / "settings.json"
    stand_in = await start_settings(store)
    bank = Bank()
    await bank.add("a")
    agg, proc = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/Connected", 1)
    # dbus-spy sends a number typed into a text field as int32: it is that text, as Victron's services take it.
    assert (await busctl.acall_json(agg, "/CustomName", "SetValue", "v", "i", "3"))["data"] == [0]
    await bank.value_is(agg, "/CustomName", "3")
    assert (await busctl.acall_json(agg, "/CustomName", "SetValue", "v", "as", "1", "x"))["data"] == [1]
    assert (await busctl.acall_json(agg, "/CustomName", "SetValue", "v", "s", "Shed bank"))["data"] == [0]
    assert (await busctl.acall_json(agg, "/LogLevel", "SetValue", "v", "s", "DEBUG"))["data"] == [0]
    assert (await busctl.acall_json(agg, "/LogLevel", "SetValue", "v", "s", "LOUD"))["data"] == [2]
    assert (await busctl.acall_json(agg, "/Soc", "SetValue", "v", "d", "5"))["data"] == [1]
    await eventually(lambda: "Shed bank" in (store.read_text() if store.exists() else ""), timeout=5)
    instance = await bank.read(agg, "/DeviceInstance")
    proc.terminate()
    proc.wait(timeout=10)
    agg, _ = start_aggregator(processes, tmp_path, bank, suffix="agg")
    await bank.value_is(agg, "/CustomName", "Shed bank")
    assert await bank.read(agg, "/DeviceInstance") == instance  # the same unique id, the same instance
    stand_in.service.close()
    bank.close()


async def test_a_burst_is_published_as_one_itemschanged(processes: Processes, tmp_path: Path,
                                                        bus_address: str) -> None:
    bank = Bank()
    a = await bank.add("a")
    agg, _ = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/Connected", 1)
    # The member's energy row is published at a tick after it joined: that one ItemsChanged comes before the watch.
    await bank.value_is(agg, "/Batteries/0/Identity", f"SN-{bank.tag}-a")
    monitor = await watch_signals(bus_address, agg)
    a.set_values({"/Soc": 77.0, "/Dc/0/Voltage": 51.1, "/Dc/0/Current": -9.0, "/InstalledCapacity": 120.0})
    await bank.value_is(agg, "/Soc", 77.0)
    a.set_value("/Soc", 78.5)  # a sentinel: its own ItemsChanged follows every signal of the burst
    out = await signals_until(monitor, "double 78.5")
    assert out.count("member=ItemsChanged") == 2, out
    assert "member=PropertiesChanged" not in out
    bank.close()


async def test_config_reload_in_place_last_good_and_bad_edits(processes: Processes, tmp_path: Path) -> None:
    import signal
    import time

    bank = Bank()
    await bank.add("a", InstalledCapacity=100.0)
    name = bank.name("agg")
    path = tmp_path / "config.json"
    base = {"serviceName": name, "startupBatteryWait": 5, "stateDir": str(tmp_path / "state")}
    path.write_text(json.dumps({**base, "capacity": 300}))
    proc = processes.start("run", "--config", str(path), "--exit-delay", "0")
    await bank.value_is(name, "/InstalledCapacity", 300.0)
    assert Path(str(path) + ".last-good").exists()
    owner = await client.call(bank.reader, "org.freedesktop.DBus", "/org/freedesktop/DBus", "GetNameOwner", "s",
                              [name], interface="org.freedesktop.DBus")
    # SIGHUP with a good config: applied without leaving the bus.
    path.write_text(json.dumps({**base, "capacity": 450}))
    proc.send_signal(signal.SIGHUP)
    await bank.value_is(name, "/InstalledCapacity", 450.0)
    again = await client.call(bank.reader, "org.freedesktop.DBus", "/org/freedesktop/DBus", "GetNameOwner", "s",
                              [name], interface="org.freedesktop.DBus")
    assert again.body == owner.body
    # A bad edit is refused, the running config kept.
    path.write_text(json.dumps({**base, "capacity": -5}))
    proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "the new config is not applied" in processes.output(proc), timeout=30)
    assert await bank.read(name, "/InstalledCapacity") == 450.0
    # A change of the file alone is noticed too.
    time.sleep(0.01)
    path.write_text(json.dumps({**base, "capacity": 500}))
    await bank.value_is(name, "/InstalledCapacity", 500.0, timeout=15)
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    # Restart with a broken file: runs on the last good config instead of stopping.
    path.write_text('{"capacity": ')
    proc = processes.start("run", "--config", str(path), "--exit-delay", "0")
    await bank.value_is(name, "/InstalledCapacity", 500.0)
    assert "running on the last good config" in processes.output(proc)
    bank.close()


def test_without_any_usable_config_it_waits_then_exits(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from ..conftest import REPO

    path = tmp_path / "config.json"
    path.write_text('{"cvlMode": "nonsense"}')
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "aggregator", "run", "--config", str(path), "--exit-delay", "1.5"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert time.monotonic() - started >= 1.5  # no tight restart loop under the supervisor
    assert "cvlMode" in result.stderr and "'nonsense'" in result.stderr
