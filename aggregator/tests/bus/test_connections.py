"""Every connection the service owns is watched: the bus dropping one (a message too large) ends the process with
status 2, so the supervisor restarts it, instead of it living on with no battery on the bus. Writes that would
make our messages too large are refused. Each test runs its own dbus-daemon with a small message size limit."""
from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from aggregator.bus import client, service as service_module
from aggregator.bus.lib import connect
from aggregator_dev.privatebus import PrivateBus

from ..conftest import Processes
from ..helpers import eventually, on_tick_beat
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


@contextlib.contextmanager
def like_victrons_library(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Our services cut what they publish to the size limits; Victron's library (localsettings, battery drivers)
    does not: a test's member or localsettings publishing a huge value is made so with the cut switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(service_module, "bounded", lambda value: value)
        yield


def start(processes: Processes, tmp_path: Path, bank: Bank) -> tuple[str, object]:
    name = bank.name("agg")
    path = tmp_path / "agg.json"
    path.write_text(json.dumps({"serviceName": name, "stateDir": str(tmp_path / "state"), "startupBatteryWait": 5}))
    return name, processes.start("run", "--config", str(path))


async def an_oversize_reply_ends_the_process(processes: Processes, bank: Bank, agg: str, proc: Any) -> None:
    """100 more members make the aggregate's GetItems reply larger than the bus allows: asking for it makes the bus
    drop the aggregate's connection, and the process ends with 2 naming it."""
    for i in range(100):
        await bank.add(f"m{i}", instance=400 + i)
    await bank.value_is(agg, "/System/NrOfBatteries", 101, timeout=30)
    reader = await connect()
    with pytest.raises(client.CallError):
        await client.get_items(reader, agg)
    await eventually(lambda: proc.poll() is not None, timeout=10)
    assert proc.returncode == 2, processes.output(proc)
    assert "lost the D-Bus connection of " + agg in processes.output(proc)
    reader.disconnect()
    bank.close()


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


async def test_a_huge_custom_name_in_localsettings_is_cut_and_the_service_stays(
        small_bus: tuple[PrivateBus, Processes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write limit covered SetValue on our own paths only: a name written into localsettings was published
    as is, and our next GetItems reply was larger than the bus allows (the bus dropped us: exit 2, and since
    the setting stays, again after every restart)."""
    from aggregator.battery.publish import custom_name_setting
    from aggregator_dev.simulator.localsettings import serve

    _, processes = small_bus
    stand_in = await serve()
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=50.0)
    agg, proc = start(processes, tmp_path, bank)
    await bank.value_is(agg, "/System/NrOfBatteries", 1)
    huge = "N" * 30000  # localsettings' own signal of it (value and text) still fits the bus
    with like_victrons_library(monkeypatch):
        assert stand_in.set(custom_name_setting(agg), huge) == 0
    await bank.value_is(agg, "/CustomName", huge[:1023] + "\u2026")
    reader = await connect()
    items = await client.get_items(reader, agg)  # the reply that was too large
    assert items["/CustomName"] == huge[:1023] + "\u2026"
    assert proc.poll() is None  # type: ignore[attr-defined]
    assert "/CustomName cut to the size limit" in processes.output(proc)  # type: ignore[arg-type]
    reader.disconnect()
    bank.close()
    stand_in.service.close()


async def test_a_member_with_a_huge_custom_name_is_not_republished(small_bus: tuple[PrivateBus, Processes],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's 25 kB /CustomName went into its row's Name and every cell id naming it: our signal was larger
    than the bus allows, the bus dropped our connection, and with the member still there we crash-looped. A
    value too large to publish is refused like an absurd one: the member is named by its product name."""
    _, processes = small_bus
    bank = Bank()
    with like_victrons_library(monkeypatch):
        await bank.add("a", Info__MaxChargeCurrent=50.0, System__MinCellVoltage=3.30, System__MinVoltageCellId="C3",
                       System__MaxCellVoltage=3.35, System__MaxVoltageCellId="C7", CustomName="M" * 25000)
    await bank.add("b", Info__MaxChargeCurrent=50.0, System__MinCellVoltage=3.31, System__MaxCellVoltage=3.34)
    agg, proc = start(processes, tmp_path, bank)
    await bank.value_is(agg, "/System/NrOfBatteries", 2)
    reader = await connect()
    items = await client.get_items(reader, agg)
    names = {items[f"/Batteries/{n}/Service"]: items[f"/Batteries/{n}/Name"] for n in (0, 1)}
    assert names == {bank.name("a"): "Pack a", bank.name("b"): "Pack b"}
    assert items["/System/MinVoltageCellId"] == "Pack a C3"
    await bank.barrier(agg, "b")  # it still follows the members and publishes: its connection was not dropped
    assert proc.poll() is None  # type: ignore[attr-defined]
    log = processes.output(proc)  # type: ignore[arg-type]
    assert f"ignoring /CustomName of {bank.name('a')}: too large" in log
    assert "M" * 100 not in log  # nor is it copied into the log
    # A name of a sane size is taken again, and a rename reaches the row and the cell ids.
    bank.members["a"].set_value("/CustomName", "Rack 1")
    await bank.value_is(agg, "/System/MinVoltageCellId", "Rack 1 C3")
    row = next(n for n in (0, 1) if items[f"/Batteries/{n}/Service"] == bank.name("a"))
    await bank.value_is(agg, f"/Batteries/{row}/Name", "Rack 1")
    reader.disconnect()
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
    # The members' watcher receives, it does not send that reply: only the aggregate's connection is dropped.
    await an_oversize_reply_ends_the_process(processes, bank, agg, proc)


async def test_a_dropped_connection_after_a_restarting_reload_ends_the_process(
        small_bus: tuple[PrivateBus, Processes], tmp_path: Path) -> None:
    """The connections are watched by waiting on their ends: a reload that renames the aggregate replaces them,
    and the new ones are watched as the first were."""
    import signal

    _, processes = small_bus
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=50.0)
    agg, proc = start(processes, tmp_path, bank)
    await bank.value_is(agg, "/System/NrOfBatteries", 1)
    renamed = bank.name("renamed")
    (tmp_path / "agg.json").write_text(json.dumps({"serviceName": renamed, "stateDir": str(tmp_path / "state"),
                                                   "startupBatteryWait": 5}))
    proc.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
    await bank.value_is(renamed, "/System/NrOfBatteries", 1, timeout=20)
    await bank.barrier(renamed, "a")  # the old connections have closed on purpose: that is no loss
    assert proc.poll() is None  # type: ignore[attr-defined]
    # As above: the new aggregate's GetItems reply becomes too large for the bus.
    await an_oversize_reply_ends_the_process(processes, bank, renamed, proc)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/PID/stat, in clock ticks)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_the_connection_watch_stays_asleep_after_reloads_and_rechecks(
        small_bus: tuple[PrivateBus, Processes], tmp_path: Path) -> None:
    """Waiting on a connection's end must not cancel that end (a cancelled wait cancels the connection's own
    future, and every later wait then returns at once: the process spins). Each reload in place wakes the watch,
    as its periodic recheck does: an idle service stays idle after them."""
    import signal

    _, processes = small_bus
    bank = Bank()
    await bank.add("a", Info__MaxChargeCurrent=50.0)
    agg, proc = start(processes, tmp_path, bank)
    await bank.value_is(agg, "/System/NrOfBatteries", 1)
    for _ in range(2):
        proc.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
        reloads = processes.output(proc).count("configuration reloaded")  # type: ignore[arg-type]
        await eventually(lambda: processes.output(proc).count("configuration reloaded") > reloads,  # type: ignore
                         timeout=30)
    before, started = cpu_seconds(proc.pid), asyncio.get_running_loop().time()  # type: ignore[attr-defined]
    await asyncio.sleep(3.0)  # a measuring window, not a wait for an event
    used = cpu_seconds(proc.pid) - before  # type: ignore[attr-defined]
    elapsed = asyncio.get_running_loop().time() - started
    assert used / elapsed < 0.2, f"{used:.2f} CPU-s in {elapsed:.1f} s: the watch spins"
    assert proc.poll() is None  # type: ignore[attr-defined]
    bank.close()


async def test_the_config_file_is_looked_at_on_the_ticks_beats(tmp_path: Path, monkeypatch: Any) -> None:
    """The look for a changed config file falls on the beats of the service's tick, in its wake-up, not
    on a timer of its own (a wake-up of the process every few seconds)."""
    from aggregator.host import daemon

    looks: list[float] = []
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(daemon, "FILE_CHECK_INTERVAL", 1.0)
    monkeypatch.setattr(daemon, "_mtime", lambda _path: looks.append(loop.time()))
    await asyncio.sleep(0.5 - loop.time() % 1.0 if loop.time() % 1.0 < 0.5 else 1.5 - loop.time() % 1.0)
    watch = loop.create_task(daemon.Host(str(tmp_path / "config.json"), None)._watch_file())  # half-way
    try:
        await eventually(lambda: len(looks) >= 3, timeout=5)
    finally:
        watch.cancel()
    assert all(on_tick_beat(t) for t in looks[1:]), looks  # the first is at the start
