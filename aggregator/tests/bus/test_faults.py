"""Faults against the real daemon process: it stays registered and answering, values are invalid rather than
wrong, nothing leaks, and losing the bus ends it promptly so the supervisor restarts it."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from aggregator.battery.service import TASKS_INTERVAL
from aggregator.bus import client
from aggregator.bus.lib import connect
from aggregator.bus.settings import SETTINGS_SERVICE

from ..conftest import Processes
from ..helpers import eventually
from .test_aggregate import Bank, bus_address, start_aggregator, start_settings  # noqa: F401  (fixture)

DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"


async def match_rules_of(bus: Any, unique_names: list[str]) -> int:
    """Match rules the bus daemon holds for these connections (its debug interface)."""
    reply = await client.call(bus, DBUS, DBUS_PATH, "GetAllMatchRules", interface="org.freedesktop.DBus.Debug.Stats")
    rules = reply.body[0]
    return sum(len(rules.get(name, [])) for name in unique_names)


async def connections_of(bus: Any, pid: int) -> list[str]:
    reply = await client.call(bus, DBUS, DBUS_PATH, "ListNames", interface=DBUS)
    names = []
    for name in reply.body[0]:
        if name.startswith(":"):
            try:
                owner_pid = await client.call(bus, DBUS, DBUS_PATH, "GetConnectionUnixProcessID", "s", [name],
                                              interface=DBUS)
            except client.CallError:
                continue
            if owner_pid.body[0] == pid:
                names.append(name)
    return names


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def test_losing_the_bus_ends_the_daemon_promptly_with_status_2(processes: Processes, tmp_path: Path) -> None:
    from aggregator_dev.privatebus import PrivateBus

    with PrivateBus() as own_bus:
        name = "com.victronenergy.battery.lonely"
        proc = processes.start("run", "--config", str(_config(tmp_path, name)),
                               env={"DBUS_SESSION_BUS_ADDRESS": own_bus.address})
        observer = await connect(own_bus.address)
        await eventually(lambda: client.name_owner(observer, name, 1.0), timeout=15)  # started and registered
        observer.disconnect()
        assert proc.poll() is None
        own_bus.stop()  # the bus daemon dies (as when the GX restarts it)
        started = time.monotonic()
        code = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(timeout=15))
    assert code == 2
    assert time.monotonic() - started < 5
    assert "lost the D-Bus connection" in processes.output(proc)


def _config(tmp_path: Path, name: str, **extra: Any) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"serviceName": name, "stateDir": str(tmp_path / "state"), "startupBatteryWait": 1,
                                **extra}))
    return path


async def cycles_leak_nothing(bank: Bank, agg: str, proc: Any, cycle: Callable[[int], Awaitable[None]]) -> None:
    """After a warm-up, 10 cycles leave the daemon with no more bus match rules, asyncio tasks or memory. Ten
    are enough: rules and tasks are counted exactly (one left per cycle is ten more), and the memory bound is
    about 100 KiB a cycle (a member's proxy, items and row are more); the daemon's memory moves a few KiB over
    them when nothing leaks."""
    steady = bank.members["steady"]

    async def task_count() -> Any:
        # The count rides along with the aggregate's changes at most every TASKS_INTERVAL: make one after a pause.
        await asyncio.sleep(TASKS_INTERVAL + 0.2)
        soc = steady["/Soc"] + 0.5  # a change the cycles do not look at
        steady.set_value("/Soc", soc)
        await bank.value_is(agg, "/Batteries/0/Soc", soc)
        return await bank.read(agg, "/Aggregator/Tasks")

    observer = await connect()
    daemon_connections = await connections_of(observer, proc.pid)
    assert daemon_connections
    await cycle(5)  # warm up: caches, first allocations
    tasks_before = await task_count()
    rules_before = await match_rules_of(observer, daemon_connections)
    rss_before = rss_kib(proc.pid)
    await cycle(10)

    async def no_more_tasks() -> bool:
        # A task of the moment (a probe, a read of a member that just came back) ends: one per cycle would not.
        return await task_count() <= tasks_before

    await eventually(no_more_tasks, timeout=30, interval=0.1)
    rules_after = await match_rules_of(observer, daemon_connections)
    rss_after = rss_kib(proc.pid)
    assert rules_after == rules_before, (rules_before, rules_after)
    assert isinstance(tasks_before, int)
    assert rss_after - rss_before < 1024, (rss_before, rss_after)  # KiB: no growth per cycle worth the name
    assert proc.poll() is None
    observer.disconnect()


async def test_a_member_vanishing_and_returning_10_times_leaks_nothing(processes: Processes,
                                                                       tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("steady", Dc__0__Current=1.0)
    agg, proc = start_aggregator(processes, tmp_path, bank, reconnectTimeout=0)
    await bank.value_is(agg, "/Dc/0/Current", 1.0)

    async def cycle(n: int) -> None:
        for _ in range(n):
            flappy = await bank.add("flappy", Dc__0__Current=2.0)
            await bank.value_is(agg, "/Dc/0/Current", 3.0)
            flappy.close()
            bank.members.pop("flappy")
            await bank.value_is(agg, "/Dc/0/Current", 1.0)

    await cycles_leak_nothing(bank, agg, proc, cycle)
    assert await bank.read(agg, "/System/NrOfBatteries") == 1
    bank.close()


async def test_a_member_returning_within_the_reconnect_timeout_10_times_leaks_nothing(processes: Processes,
                                                                                   tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("steady", Dc__0__Current=1.0)
    agg, proc = start_aggregator(processes, tmp_path, bank, reconnectTimeout=60)
    await bank.value_is(agg, "/Dc/0/Current", 1.0)
    returns = itertools.count()

    async def cycle(n: int) -> None:
        for _ in range(n):
            odd = next(returns) % 2  # a new current each time, so its return is seen, not its kept last value
            flappy = await bank.add("flappy", Dc__0__Current=2.0 + odd)
            await bank.value_is(agg, "/Dc/0/Current", 3.0 + odd)  # back, with its new values
            assert await bank.read(agg, "/Batteries/1/State") == "online"
            flappy.close()
            bank.members.pop("flappy")
            # Gone but within the reconnect timeout: stale, its last values kept, the limits counting it as
            # carrying nothing.
            await bank.value_is(agg, "/Batteries/1/State", "stale")

    await cycles_leak_nothing(bank, agg, proc, cycle)
    assert await bank.read(agg, "/System/NrOfBatteries") == 2  # the stale one is still a member
    bank.close()


async def test_a_member_flooding_500_changes_per_second(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("calm", Dc__0__Current=1.0, Soc=50.0)
    noisy = await bank.add("noisy", Dc__0__Current=0.0, Soc=50.0)
    agg, proc = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/Dc/0/Current", 1.0)
    stop = asyncio.Event()

    async def flood() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            noisy.set_values({"/Dc/0/Current": float(i % 100), "/Soc": 40.0 + (i % 20)})
            await asyncio.sleep(0.002)  # ~500 changes per second

    task = asyncio.get_running_loop().create_task(flood())
    await asyncio.sleep(3.0)
    # Still answering promptly while flooded, and following the calm member.
    bank.members["calm"].set_value("/Soc", 90.0)
    started = time.monotonic()
    count = await bank.read(agg, "/System/NrOfBatteries")
    assert count == 2 and time.monotonic() - started < 1.0
    stop.set()
    await task
    final = noisy["/Dc/0/Current"]
    await bank.value_is(agg, "/Dc/0/Current", 1.0 + final)  # caught up with the last value
    assert proc.poll() is None
    bank.close()


async def test_updates_are_read_in_batches_and_a_lone_update_at_once(processes: Processes, tmp_path: Path) -> None:
    """Once a member's message has been handled, the daemon reads every wire.POLL_INTERVAL and publishes once per
    batch, also at rates an old threshold of 40 messages a second left unbatched (a bank of 16 BMSes at 2 Hz: a
    wake-up per message); when a poll finds nothing, the next update is published within milliseconds again."""
    from aggregator.bus import wire
    from aggregator.bus.monitor import ServiceMonitor

    bank = Bank()
    fast = await bank.add("fast", Dc__0__Current=0.0)
    agg, proc = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/Dc/0/Current", 0.0)
    published: list[tuple[float, Any]] = []  # (when, current) of the aggregate's changes, as a client sees them
    watcher = ServiceMonitor(await connect(), [agg], on_changed=lambda _s, changes: published.append(
        (time.monotonic(), changes["/Dc/0/Current"])) if "/Dc/0/Current" in changes else None)
    await watcher.start()

    sent = 0
    flood_for = 3.0
    sent_at: dict[float, float] = {}
    started = time.monotonic()
    while time.monotonic() - started < flood_for:  # 30 updates a second, each a new current
        sent += 1
        fast.set_values({"/Dc/0/Current": float(sent)})
        sent_at[float(sent)] = time.monotonic()
        await asyncio.sleep(1 / 30)
    await bank.value_is(agg, "/Dc/0/Current", float(sent))  # the last value arrives: batches lose nothing
    during = [t for t, _v in published if started + 1.0 <= t < started + flood_for]
    # Unbatched, the aggregate would change about 60 times in these 2 s; batched, about 2 / POLL_INTERVAL.
    assert len(during) <= 2.0 / wire.POLL_INTERVAL * 1.5, f"{len(during)} publications for ~{sent * 2 // 3} updates"
    # And a batch waits at most one interval (with room for a slow machine).
    waits = [t - sent_at[v] for t, v in published if v in sent_at]
    assert max(waits) < wire.POLL_INTERVAL + 0.1, f"an update waited {max(waits):.3f} s"

    await asyncio.sleep(1.0)  # quiet: the next poll finds nothing and reading at once resumes
    delays = []
    for i in range(5):
        value = 1000.0 + i
        before = len(published)
        at = time.monotonic()
        fast.set_values({"/Dc/0/Current": value})
        await eventually(lambda: any(v == value for _t, v in published[before:]), timeout=5.0, interval=0.001)
        delays.append(next(t for t, v in published[before:] if v == value) - at)
        await asyncio.sleep(0.3)
    # At once: a few ms each (one hiccup allowed); still polling, most would wait up to POLL_INTERVAL.
    assert sorted(delays)[3] < wire.POLL_INTERVAL / 5, f"updates at a low rate waited {delays} s"
    assert proc.poll() is None
    await watcher.stop()
    bank.close()


async def test_a_hung_member_does_not_stop_the_aggregate(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    hung = await bank.add("hung", Dc__0__Current=50.0)
    hung.reply_delay = 3600.0  # never answers GetItems
    await bank.add("fine", Dc__0__Current=4.0)
    agg, proc = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/Dc/0/Current", 4.0, timeout=15)
    assert await bank.read(agg, "/System/NrOfBatteries") == 1
    hung.reply_delay = 0.0  # it recovers: picked up by a retry
    await bank.value_is(agg, "/Dc/0/Current", 54.0, timeout=30)
    assert proc.poll() is None
    bank.close()


async def test_a_member_answering_getitems_after_our_call_timeout_still_joins(processes: Processes,
                                                                              tmp_path: Path) -> None:
    bank = Bank()
    slow = await bank.add("slow", Dc__0__Current=50.0)
    slow.reply_delay = 5.5  # every answer, retries included, comes after our 5 s call timeout
    await bank.add("fine", Dc__0__Current=4.0)
    agg, proc = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/Dc/0/Current", 4.0, timeout=15)
    assert await bank.read(agg, "/System/NrOfBatteries") == 1
    # Its late answer to the first GetItems is taken, although our call had given up on it.
    await bank.value_is(agg, "/Dc/0/Current", 54.0, timeout=20)
    assert await bank.read(agg, "/System/NrOfBatteries") == 2
    assert proc.poll() is None
    bank.close()


async def test_a_slow_member_at_start_does_not_keep_the_aggregate_off_the_bus(processes: Processes,
                                                                              tmp_path: Path) -> None:
    """A restart while one member answered slowly kept the aggregate off the bus until that member's read was done
    or timed out (5 s). It registers at once with the members that answered; charging waits for the slow one (its
    limits are unknown: counted as carrying nothing, the other's limit could be its undoing), which joins when
    it answers."""
    bank = Bank()
    slow = await bank.add("slow", Info__MaxChargeCurrent=50.0, Info__MaxDischargeCurrent=100.0, Dc__0__Current=5.0)
    slow.reply_delay = 4.5  # its answers come late, within our call timeout
    await bank.add("fast", Info__MaxChargeCurrent=100.0, Info__MaxDischargeCurrent=100.0, Dc__0__Current=6.0)
    agg, proc = start_aggregator(processes, tmp_path, bank, currentRatioMethod="capacity",
                                 limits={"rampUpRate": 1000, "hysteresis": 0})
    await bank.value_is(agg, "/System/NrOfBatteries", 1, timeout=20)  # on the bus before the slow one answered
    assert await bank.read(agg, "/Dc/0/Current") == 6.0
    assert await bank.read(agg, "/Info/MaxChargeCurrent") == 0.0
    assert await bank.read(agg, "/Info/MaxDischargeCurrent") == 100.0  # never 0 for that: the loads stay on
    assert "waiting for " + bank.name("slow") in await bank.read(agg, "/Info/ChargeLimitation")
    assert "starting: charging waits for 1 batteries" in await bank.read(agg, "/Aggregator/Status")
    await bank.value_is(agg, "/System/NrOfBatteries", 2)
    await bank.value_is(agg, "/Info/MaxChargeCurrent", 100.0)  # the slow one's 50 A at a half share
    assert await bank.read(agg, "/Aggregator/Status") == "ok"
    assert proc.poll() is None
    bank.close()


async def test_localsettings_absent_then_present_then_gone(processes: Processes, tmp_path: Path) -> None:
    bank = Bank()
    await bank.add("a")
    agg, proc = start_aggregator(processes, tmp_path, bank)
    await bank.value_is(agg, "/Connected", 1)  # runs without localsettings, with defaults
    settings = await start_settings(tmp_path / "settings.json")
    # It appears: our settings get declared there (device instance, CustomName).
    await eventually(lambda: (tmp_path / "settings.json").exists()
                     and "batteryaggregator_" in (tmp_path / "settings.json").read_text(), timeout=15)
    settings.service.close()
    await eventually(lambda: f"{SETTINGS_SERVICE} left the bus" in processes.output(proc))
    await bank.barrier(agg, "a")  # and it goes on publishing after that
    assert await bank.read(agg, "/Connected") == 1
    assert proc.poll() is None
    bank.close()
