"""Every connection the service owns is watched: the bus dropping one (a message too large) ends the process with
status 2, so the supervisor restarts it, instead of it living on with no battery on the bus. Writes that would
make our messages too large are refused. Each test runs its own dbus-daemon with a small message size limit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.privatebus import PrivateBus

from .conftest import Processes
from .helpers import eventually
from .test_aggregate import Bank


@pytest.fixture
def small_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PrivateBus, Processes]]:
    """A dbus-daemon that drops a client sending a message above 64 KiB (the default is far larger; the rule is
    the same)."""
    with PrivateBus(limits={"max_message_size": 65536}) as bus:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.address)
        processes = Processes(bus.address, tmp_path)
        try:
            yield bus, processes
        finally:
            processes.stop_all()


def start(processes: Processes, tmp_path: Path, bank: Bank) -> tuple[str, object]:
    name = bank.name("agg")
    path = tmp_path / "agg.json"
    path.write_text(json.dumps({"serviceName": name, "stateDir": str(tmp_path / "state"), "startupBatteryWait": 5}))
    return name, processes.start("run", "--config", str(path))


async def test_a_huge_custom_name_is_refused_and_the_service_stays(small_bus: tuple[PrivateBus, Processes],
                                                                  tmp_path: Path) -> None:
    """Accepted, 60 kB of /CustomName made our GetItems reply too large: the bus dropped the aggregate's connection
    and the process lived on with no battery on the bus."""
    _, processes = small_bus
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=50.0)
    agg, proc = start(processes, tmp_path, bank)
    await bank.value_is(agg, "/System/NrOfBatteries", 1)
    writer = await connect()
    assert await client.set_value(writer, agg, "/CustomName", "x" * 60000) == 2  # refused
    assert await client.set_value(writer, agg, "/CustomName", "Shed bank") == 0
    items = await client.get_items(writer, agg)
    assert items["/CustomName"] == "Shed bank"
    assert proc.poll() is None  # type: ignore[attr-defined]
    assert "more than the 1024 allowed" in processes.output(proc)  # type: ignore[arg-type]
    writer.disconnect()
    bank.close()


async def test_a_dropped_service_connection_ends_the_process_with_2(small_bus: tuple[PrivateBus, Processes],
                                                                    tmp_path: Path) -> None:
    """The members' watcher stays connected, but the aggregate's own connection is dropped by the bus: before, only
    the watcher's connection was watched and the process lived on with no battery on the bus."""
    _, processes = small_bus
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=50.0)
    agg, proc = start(processes, tmp_path, bank)
    await bank.value_is(agg, "/System/NrOfBatteries", 1)
    # 100 members' rows make the aggregate's GetItems reply larger than the bus allows: asking for it makes the
    # bus drop the aggregate's connection (the members' watcher receives, it does not send that reply).
    for i in range(100):
        await bank.add(f"m{i}", instance=400 + i)
    await bank.value_is(agg, "/System/NrOfBatteries", 101, timeout=30)
    reader = await connect()
    with pytest.raises(client.CallError):
        await client.get_items(reader, agg)
    await eventually(lambda: proc.poll() is not None, timeout=10)  # type: ignore[attr-defined]
    assert proc.returncode == 2, processes.output(proc)  # type: ignore[attr-defined]
    assert "lost the D-Bus connection of " + agg in processes.output(proc)  # type: ignore[arg-type]
    reader.disconnect()
    bank.close()
