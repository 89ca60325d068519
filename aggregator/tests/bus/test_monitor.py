"""The monitor (client side) against real services on a private bus."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from typing import Any, AsyncIterator

from dbus_next.service import ServiceInterface, method

from aggregator.bus import client
from aggregator.bus.lib import Variant, connect
from aggregator.bus.monitor import ServiceMonitor, WatchedService
from aggregator.bus.service import VeService

from ..helpers import eventually

_ids = itertools.count()


def unique_prefix() -> str:
    """Each test watches its own name space, since the bus is shared by the whole session."""
    return f"com.victronenergy.battery.t{next(_ids)}x"


async def make_battery(name: str, instance: int, soc: float | None = 50.0, register: bool = True) -> VeService:
    service = VeService(await connect(), name)
    service.add_mandatory_paths(process_name="test", process_version="1", connection="test",
                                device_instance=instance, product_id=0xB0F0, product_name="Test battery")
    service.add_path("/Soc", soc, text="{:.0f}%")
    service.add_path("/Dc/0/Voltage", 53.0, text="{:.2f}V")
    service.add_path("/Dc/0/Current", 0.0)
    if register:
        await service.register()
    return service


class Recorder:
    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []
        self.changes: list[tuple[str, dict[str, Any]]] = []
        self.added_at: dict[str, float] = {}

    def on_added(self, service: WatchedService) -> None:
        self.added.append(service.name)
        self.added_at[service.name] = time.monotonic()

    def on_removed(self, service: WatchedService) -> None:
        self.removed.append(service.name)

    def on_changed(self, service: WatchedService, changes: dict[str, Any]) -> None:
        self.changes.append((service.name, dict(changes)))

    def monitor(self, bus: Any, prefix: str, **kwargs: Any) -> ServiceMonitor:
        return ServiceMonitor(bus, [prefix], on_added=self.on_added, on_removed=self.on_removed,
                              on_changed=self.on_changed, **kwargs)


async def test_follows_three_packs_appearing_changing_and_vanishing(private_bus: Any) -> None:
    prefix = unique_prefix()
    first = await make_battery(prefix + "a", 1)  # there before the monitor starts
    rec = Recorder()
    monitor = rec.monitor(await connect(), prefix)
    await monitor.start()
    assert rec.added == [prefix + "a"]
    assert monitor.services[prefix + "a"].values["/Soc"] == 50.0
    assert monitor.services[prefix + "a"].device_instance == 1

    second = await make_battery(prefix + "b", 2, soc=None)
    third = await make_battery(prefix + "c", 3)
    await eventually(lambda: len(monitor.services) == 3)
    assert monitor.services[prefix + "b"].values["/Soc"] is None  # invalid stays invalid, not 0

    second.set_value("/Soc", 61.5)  # PropertiesChanged
    third.set_values({"/Soc": 70.0, "/Dc/0/Current": -12.5})  # one ItemsChanged
    await eventually(lambda: monitor.services[prefix + "b"].values["/Soc"] == 61.5)
    await eventually(lambda: monitor.services[prefix + "c"].values["/Dc/0/Current"] == -12.5)
    # One callback per signal, carrying all of its changes.
    assert (prefix + "c", {"/Soc": 70.0, "/Dc/0/Current": -12.5}) in rec.changes
    assert (prefix + "b", {"/Soc": 61.5}) in rec.changes

    second.close()
    await eventually(lambda: prefix + "b" not in monitor.services)
    assert rec.removed == [prefix + "b"]
    assert set(monitor.services) == {prefix + "a", prefix + "c"}
    await monitor.stop()
    for s in (first, third):
        s.close()


async def test_a_hung_member_does_not_delay_the_others(private_bus: Any) -> None:
    prefix = unique_prefix()
    hung = await make_battery(prefix + "hung", 1)
    hung.reply_delay = 30.0  # answers nothing within the monitor's timeout
    fine = [await make_battery(prefix + f"ok{i}", 10 + i) for i in range(3)]
    rec = Recorder()
    monitor = rec.monitor(await connect(), prefix, call_timeout=1.0, retry_delay=0.5)
    started = time.monotonic()
    await monitor.start()
    # The healthy ones were reported well before the hung one's timeout expired.
    assert sorted(rec.added) == sorted(s.name for s in fine)
    assert all(at - started < 0.9 for at in rec.added_at.values()), rec.added_at
    assert monitor.pending == [prefix + "hung"]
    # They keep flowing while the hung one is retried.
    fine[0].set_value("/Soc", 99.0)
    await eventually(lambda: monitor.services[fine[0].name].values["/Soc"] == 99.0, timeout=2)
    # When it answers again, it is picked up by a retry.
    hung.reply_delay = 0.0
    await eventually(lambda: prefix + "hung" in monitor.services, timeout=10)
    assert monitor.pending == []
    await monitor.stop()
    for s in (hung, *fine):
        s.close()


async def test_vanish_and_return_many_times_leaks_no_match_rules(private_bus: Any) -> None:
    prefix = unique_prefix()
    rec = Recorder()
    mon_bus = await connect()
    monitor = rec.monitor(mon_bus, prefix)
    await monitor.start()
    baseline = monitor.match_count
    for round_ in range(20):
        battery = await make_battery(prefix + "flappy", 5, soc=float(round_))
        await eventually(lambda: prefix + "flappy" in monitor.services)
        assert monitor.services[prefix + "flappy"].values["/Soc"] == float(round_)  # fresh values each time
        battery.close()
        await eventually(lambda: prefix + "flappy" not in monitor.services)
    await eventually(lambda: monitor.match_count == baseline)
    assert len(rec.added) == len(rec.removed) == 20
    # The bus daemon agrees: our connection holds only the discovery rule (plus dbus-next's own).
    stats = await client.call(mon_bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "GetConnectionStats", "s",
                              [mon_bus.unique_name], interface="org.freedesktop.DBus.Debug.Stats")
    assert stats.body[0]["MatchRules"].value <= baseline + 2
    await monitor.stop()


async def test_services_without_device_instance_are_ignored_and_exclusions_hold(private_bus: Any) -> None:
    prefix = unique_prefix()
    plain = VeService(await connect(), prefix + "noinstance")
    plain.add_path("/Soc", 1.0)
    await plain.register()
    excluded = await make_battery(prefix + "excluded", 7)
    kept = await make_battery(prefix + "kept", 8)
    rec = Recorder()
    monitor = rec.monitor(await connect(), prefix, exclude=[prefix + "excluded"])
    await monitor.start()
    assert rec.added == [prefix + "kept"]
    for s in (plain, excluded, kept):
        s.close()
    await monitor.stop()


class _LegacyBusItem(ServiceInterface):
    """An old-style service: one exported object per path, GetValue only, no GetItems."""

    def __init__(self, value: Any) -> None:
        super().__init__("com.victronenergy.BusItem")
        self.value = value

    @method()
    def GetValue(self) -> "v":  # type: ignore[name-defined]  # noqa: F821
        return self.value


async def test_falls_back_to_per_path_getvalue_without_getitems(private_bus: Any) -> None:
    prefix = unique_prefix()
    legacy_bus = await connect()
    for path, value in {"/DeviceInstance": Variant("i", 42), "/Soc": Variant("d", 77.5),
                        "/Dc/0/Voltage": Variant("d", 52.1), "/Info/MaxChargeCurrent": Variant("ai", [])}.items():
        legacy_bus.export(path, _LegacyBusItem(value))
    await legacy_bus.request_name(prefix + "legacy")
    rec = Recorder()
    monitor = rec.monitor(await connect(), prefix)
    await monitor.start()
    service = monitor.services[prefix + "legacy"]
    assert service.device_instance == 42
    assert service.values == {"/DeviceInstance": 42, "/Soc": 77.5, "/Dc/0/Voltage": 52.1,
                              "/Info/MaxChargeCurrent": None}
    await monitor.stop()
    legacy_bus.disconnect()


async def test_malformed_signals_are_dropped_and_the_monitor_goes_on(private_bus: Any) -> None:
    from aggregator.bus.lib import Message

    prefix = unique_prefix()
    battery = await make_battery(prefix + "odd", 3)
    rec = Recorder()
    monitor = rec.monitor(await connect(), prefix)
    await monitor.start()
    for signature, body in (("s", ["nonsense"]), ("a{sv}", [{"NoValue": Variant("i", 1)}]),
                            ("a{sa{sv}}", [{"/Soc": {"Text": Variant("s", "x")}}])):
        member = "ItemsChanged" if signature.startswith("a{sa") else "PropertiesChanged"
        await battery.bus.send(Message.new_signal("/" if member == "ItemsChanged" else "/Soc",
                                                  "com.victronenergy.BusItem", member, signature, body))
    battery.set_value("/Soc", 12.0)
    await eventually(lambda: monitor.services[prefix + "odd"].values["/Soc"] == 12.0)
    assert rec.changes == [(prefix + "odd", {"/Soc": 12.0})]
    await monitor.stop()
    battery.close()


async def test_no_change_is_lost_around_the_first_read(private_bus: Any) -> None:
    """A service that changes continuously while being discovered: the cache ends equal to the service."""
    prefix = unique_prefix()
    battery = await make_battery(prefix + "busy", 4, soc=0.0)
    stop = asyncio.Event()

    async def churn() -> None:
        soc = 0.0
        while not stop.is_set():
            soc += 1.0
            battery.set_value("/Soc", soc)
            await asyncio.sleep(0.001)  # ~1000 changes per second, during discovery

    churner = asyncio.get_running_loop().create_task(churn())
    monitor = ServiceMonitor(await connect(), [prefix])
    await monitor.start()
    await asyncio.sleep(0.2)
    stop.set()
    await churner
    await eventually(lambda: monitor.services[prefix + "busy"].values["/Soc"] == battery["/Soc"])
    await monitor.stop()
    battery.close()


async def test_a_burst_of_signals_does_not_drop_the_publishers_connection(private_bus: Any) -> None:
    """dbus-next drops a connection whose socket buffer is full; our connect() guards against that."""
    prefix = unique_prefix()
    battery = await make_battery(prefix + "burst", 9)
    monitor = ServiceMonitor(await connect(), [prefix])
    await monitor.start()
    for i in range(20000):  # far more than a socket buffer holds, without yielding to the loop
        battery.set_value("/Soc", float(i % 100) + 0.5)
    assert battery.bus.connected
    await eventually(lambda: monitor.services[prefix + "burst"].values["/Soc"] == battery["/Soc"], timeout=30)
    assert battery.bus.connected
    await monitor.stop()
    battery.close()


async def test_a_burst_of_itemschanged_keeps_the_connection_and_the_order(private_bus: Any) -> None:
    """ItemsChanged goes out as bytes written straight to the socket (lib.raw_sender): when the send buffer is
    full the rest must wait for the socket, in order, not be lost or overtake."""
    prefix = unique_prefix()
    battery = await make_battery(prefix + "burst", 9)
    monitor = ServiceMonitor(await connect(), [prefix])
    await monitor.start()
    os.kill(private_bus.pid, signal.SIGSTOP)  # the bus daemon reads nothing: the publisher's buffer fills
    try:
        for i in range(3000):
            battery.set_values({"/Soc": float(i % 100) + 0.5, "/Dc/0/Voltage": 50.0 + i / 1000})
        queued = battery.bus._writer.messages.qsize()
    finally:
        os.kill(private_bus.pid, signal.SIGCONT)
    assert queued > 0, "the send buffer never filled: this test would check nothing"
    assert battery.bus.connected
    last = 50.0 + 2999 / 1000
    watched = monitor.services[prefix + "burst"]
    await eventually(lambda: watched.values["/Dc/0/Voltage"] == last, timeout=30)
    assert watched.values["/Soc"] == battery["/Soc"]
    assert battery.bus.connected
    await monitor.stop()
    battery.close()


async def keep_changing(pack: Any, stop: asyncio.Event) -> None:
    """A member changing every 20 ms: a moderated watcher stays in batch reading while this runs."""
    i = 0
    while not stop.is_set():
        i += 1
        pack.set_value("/Soc", float(i % 100))
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def moderated_watcher() -> AsyncIterator[tuple[Any, str]]:
    """A moderated watcher (the members' connection) of two batteries, `prefix + "a"` changing every 20 ms so
    that it reads in batches, and `prefix + "b"` to call; on leaving, every change of "a" was seen."""
    prefix = unique_prefix()
    pack = await make_battery(prefix + "a", 1)
    other = await make_battery(prefix + "b", 2)
    watcher_bus = await connect(coalesce=True)
    monitor = ServiceMonitor(watcher_bus, [prefix])
    await monitor.start()
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(keep_changing(pack, stop))
    try:
        yield watcher_bus, prefix
    finally:
        stop.set()
        await task
    await eventually(lambda: monitor.services[prefix + "a"].values["/Soc"] == pack["/Soc"])  # nothing lost
    await monitor.stop()
    for bus in (watcher_bus, pack.bus, other.bus):
        bus.disconnect()


async def test_a_patient_call_is_answered_with_the_next_batch_of_a_moderated_connection(private_bus: Any) -> None:
    """A side feature's periodic read (client.call(..., patient=True)) does not cost a wake-up of its own while
    the members' watcher reads in batches: its reply is read with the next batch, at a read beat."""
    from aggregator.bus import wire
    from aggregator.bus.beats import next_beat

    loop = asyncio.get_running_loop()
    answered = []
    async with moderated_watcher() as (watcher_bus, prefix):
        await asyncio.sleep(0.7)  # past the start-up calls' reply window: batch reading
        for _ in range(5):
            started = loop.time()
            assert await client.get_value(watcher_bus, prefix + "b", "/Soc", patient=True) == 50.0
            answered.append((started, loop.time()))
            await asyncio.sleep(0.13)
    for started, at in answered:
        beat = next_beat(at - wire.POLL_INTERVAL, wire.POLL_INTERVAL)  # the last read beat up to `at`
        assert 0 <= at - beat < 0.03 and at - started < wire.POLL_INTERVAL + 0.05, (answered, started, at)


async def test_a_moderated_connection_reads_replies_to_its_calls_at_once(private_bus: Any) -> None:
    """The members' watcher reads signals in batches (every wire.POLL_INTERVAL while they keep coming), but the
    reply to a call it makes is read the moment it arrives: start-up and reading a new member are sequences of
    calls, and each would otherwise wait for the next poll."""
    from aggregator.bus import wire

    round_trips = []
    async with moderated_watcher() as (watcher_bus, prefix):
        await asyncio.sleep(0.5)
        for _ in range(7):
            started = time.monotonic()
            assert await client.get_value(watcher_bus, prefix + "b", "/Soc") == 50.0
            round_trips.append(time.monotonic() - started)
            await asyncio.sleep(0.7)  # past the reply window: batch reading again
    # Waiting for the next poll would take half an interval on average.
    assert sorted(round_trips)[3] < wire.POLL_INTERVAL / 4, f"round trips {round_trips}"


async def test_a_call_does_not_stop_the_reading_in_batches(private_bus: Any) -> None:
    """A call's reply is read at once, and the batches go on at the beat already set: a return to reading message
    by message would cost a wake-up per member signal until the next batch."""
    polling = []
    async with moderated_watcher() as (watcher_bus, prefix):
        reader = watcher_bus._expect_reply.__self__
        for _ in range(5):
            await eventually(lambda: reader.timer is not None and not reader.awaiting_reply())  # in batches
            assert await client.get_value(watcher_bus, prefix + "b", "/Soc") == 50.0
            polling.append(reader.timer is not None)  # when the reply is in: still on the beat's poll
    assert all(polling), polling
