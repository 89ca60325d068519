"""VeService against the BusItem contract, read only through independent clients (busctl, dbus-send,
dbus-monitor), except where the contract needs what those tools cannot send (calls without an interface)."""
from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import threading
import time
from typing import Any

import pytest

from aggregator.bus.lib import Message, MessageType, Variant, connect
from aggregator.bus.service import NameTakenError, VeService

from ..helpers import eventually

BUSITEM = "com.victronenergy.BusItem"
_ids = itertools.count()


def unique_name() -> str:
    return f"com.victronenergy.battery.conf{next(_ids)}x{time.monotonic_ns() % 100000}"


async def make_service(name: str | None = None, register: bool = True, **extra: Any) -> VeService:
    service = VeService(await connect(), name or unique_name())
    service.add_mandatory_paths(process_name="conformance", process_version="1.0", connection="test bus",
                                device_instance=7, product_id=0xB0FF, product_name="Test battery")
    service.add_path("/Dc/0/Voltage", 53.2, text="{:.2f}V", writeable=True, description="Battery voltage")
    service.add_path("/Dc/0/Current", 15.0, text="{:.1f}A")
    service.add_path("/Soc", 62, text="{:.0f}%")
    for path, value in extra.items():
        service.add_path(path, value)
    if register:
        await service.register()
    return service


def dbus_send(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dbus-send", f"--bus={address}", "--print-reply", *args], capture_output=True,
                          text=True, timeout=20)


async def adbus_send(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.get_running_loop().run_in_executor(None, lambda: dbus_send(address, *args))


def value_of(reply: Any) -> tuple[str, Any]:
    """busctl JSON of a `v` reply -> (inner signature, inner data)."""
    assert reply["type"] == "v", reply
    inner = reply["data"][0]
    return inner["type"], inner["data"]


SENTINEL = "org.batteryaggregator.Test"


class Monitor:
    """dbus-monitor as a subprocess, limited to the signals of one connection."""

    def __init__(self, address: str, sender: str) -> None:
        self.address = address
        self.sender = sender
        self.proc: asyncio.subprocess.Process | None = None
        self.head = b""

    async def __aenter__(self) -> Monitor:
        self.proc = await asyncio.create_subprocess_exec(
            "dbus-monitor", "--address", self.address, f"type='signal',sender='{self.sender}'",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        assert self.proc.stdout is not None
        # dbus-monitor prints its own NameAcquired once it is a monitor: then it is ready.
        self.head = await asyncio.wait_for(self.proc.stdout.readline(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()

    async def signals(self, bus: Any) -> list[tuple[str, str, str]]:
        """(path, member, body text) of every signal the sender sent so far: `bus` (the sender's connection)
        then sends a sentinel signal, which comes after all of them, and the monitor is read up to it."""
        assert self.proc is not None and self.proc.stdout is not None
        bus.send(Message.new_signal("/Sentinel", SENTINEL, "Sentinel"))
        lines: list[bytes] = []
        async with asyncio.timeout(10):
            while not lines or f"interface={SENTINEL}".encode() not in lines[-1]:
                line = await self.proc.stdout.readline()
                assert line, b"".join(lines)
                lines.append(line)
        self.proc.terminate()
        await self.proc.wait()
        out = b"".join(lines[:-1]).decode()
        found = []
        blocks = ("\n" + out).split("\nsignal ")[1:]
        for block in blocks:
            header, _, body = block.partition("\n")
            if f"sender={self.sender} " not in header:
                continue
            fields = dict(part.strip().split("=", 1) for part in header.replace(";", " ").split() if "=" in part)
            found.append((fields["path"], fields["member"], body))
        return found


# ---- GetValue / GetText on leaves ------------------------------------------------------------------------

async def test_getvalue_types_on_leaves(busctl: Any) -> None:
    service = await make_service(**{"/F": 1.5, "/I": -7, "/Big": 2**40, "/B": True, "/S": "hello", "/L": [1, "a"],
                                    "/Empty": [], "/D": {"a": 1, "b": "x"}, "/Inv": None})
    try:
        expect = {
            "/F": ("d", 1.5), "/I": ("i", -7), "/Big": ("x", 2**40), "/B": ("b", True), "/S": ("s", "hello"),
            "/L": ("av", [{"type": "i", "data": 1}, {"type": "s", "data": "a"}]), "/Empty": ("au", []),
            "/D": ("a{sv}", {"a": {"type": "i", "data": 1}, "b": {"type": "s", "data": "x"}}), "/Inv": ("ai", []),
            "/Dc/0/Voltage": ("d", 53.2),
        }
        for path, wanted in expect.items():
            assert value_of(await busctl.acall_json(service.name, path, "GetValue")) == wanted, path
    finally:
        service.close()


async def test_gettext_on_leaves(busctl: Any) -> None:
    service = await make_service(**{"/Inv": None})
    try:
        async def text(path: str) -> str:
            reply = await busctl.acall_json(service.name, path, "GetText")
            assert reply["type"] == "s", reply
            return reply["data"][0]

        assert await text("/Dc/0/Voltage") == "53.20V"
        assert await text("/Dc/0/Current") == "15.0A"
        assert await text("/Soc") == "62%"
        assert await text("/Inv") == "---"
        assert await text("/ProductId") == "0xB0FF"
        assert await text("/FirmwareVersion") == "---"
    finally:
        service.close()


# ---- nodes ------------------------------------------------------------------------------------------------

async def test_getvalue_and_gettext_on_nodes_use_relative_keys(busctl: Any) -> None:
    service = await make_service()
    try:
        sig, root = value_of(await busctl.acall_json(service.name, "/", "GetValue"))
        assert sig == "a{sv}"
        assert root["Dc/0/Voltage"] == {"type": "d", "data": 53.2}
        assert root["DeviceInstance"] == {"type": "i", "data": 7}
        assert not any(k.startswith("/") for k in root)
        assert len(root) == len(service.paths())

        sig, dc = value_of(await busctl.acall_json(service.name, "/Dc", "GetValue"))
        assert (sig, set(dc)) == ("a{sv}", {"0/Voltage", "0/Current"})
        sig, dc0 = value_of(await busctl.acall_json(service.name, "/Dc/0", "GetValue"))
        assert (sig, dc0["Voltage"], set(dc0)) == ("a{sv}", {"type": "d", "data": 53.2}, {"Voltage", "Current"})

        sig, texts = value_of(await busctl.acall_json(service.name, "/Dc", "GetText"))
        assert (sig, texts) == ("a{ss}", {"0/Voltage": "53.20V", "0/Current": "15.0A"})
        sig, texts = value_of(await busctl.acall_json(service.name, "/", "GetText"))
        assert sig == "a{ss}" and texts["ProductId"] == "0xB0FF" and texts["Soc"] == "62%"
    finally:
        service.close()


async def test_getitems_has_absolute_paths_with_value_and_text(busctl: Any) -> None:
    service = await make_service(**{"/Inv": None})
    try:
        reply = await busctl.acall_json(service.name, "/", "GetItems")
        assert reply["type"] == "a{sa{sv}}"
        items = reply["data"][0]
        mandatory = {"/Mgmt/ProcessName", "/Mgmt/ProcessVersion", "/Mgmt/Connection", "/DeviceInstance",
                     "/ProductId", "/ProductName", "/FirmwareVersion", "/HardwareVersion", "/Connected"}
        assert set(items) == mandatory | {"/Dc/0/Voltage", "/Dc/0/Current", "/Soc", "/Inv"}
        for path, entry in items.items():
            assert set(entry) == {"Value", "Text"}, path
            assert entry["Text"]["type"] == "s", path
        assert items["/Dc/0/Voltage"] == {"Value": {"type": "d", "data": 53.2}, "Text": {"type": "s", "data": "53.20V"}}
        assert items["/Inv"] == {"Value": {"type": "ai", "data": []}, "Text": {"type": "s", "data": "---"}}
        assert items["/Connected"]["Value"] == {"type": "i", "data": 1}
        assert items["/ProductId"]["Text"]["data"] == "0xB0FF"
    finally:
        service.close()


# ---- SetValue -----------------------------------------------------------------------------------------------

async def test_setvalue_codes(busctl: Any) -> None:
    service = await make_service()
    seen: list[tuple[str, Any]] = []

    def check(path: str, value: Any) -> bool:
        seen.append((path, value))
        return value is None or value < 100

    service.add_path("/Checked", 1.0, writeable=True, on_change=check)
    service.add_path("/Typed", 1.0, writeable=True, value_types=[float])

    def boom(path: str, value: Any) -> bool:
        raise RuntimeError("broken check")

    service.add_path("/Raises", 1, writeable=True, on_change=boom)
    name = service.name

    async def set_(path: str, *sig_and_value: str) -> int:
        reply = await busctl.acall_json(name, path, "SetValue", "v", *sig_and_value)
        assert reply["type"] == "i"
        return reply["data"][0]

    try:
        assert await set_("/Dc/0/Voltage", "d", "54.5") == 0
        assert value_of(await busctl.acall_json(name, "/Dc/0/Voltage", "GetValue")) == ("d", 54.5)
        assert (await busctl.acall_json(name, "/Dc/0/Voltage", "GetText"))["data"][0] == "54.50V"
        assert await set_("/Dc/0/Voltage", "d", "54.5") == 0  # the same value

        assert await set_("/Soc", "i", "10") == 1  # not writeable
        assert value_of(await busctl.acall_json(name, "/Soc", "GetValue")) == ("i", 62)

        assert await set_("/Typed", "s", "text") == 1  # wrong type
        assert await set_("/Typed", "b", "true") == 1
        assert value_of(await busctl.acall_json(name, "/Typed", "GetValue")) == ("d", 1.0)
        assert await set_("/Typed", "d", "2.5") == 0
        assert value_of(await busctl.acall_json(name, "/Typed", "GetValue")) == ("d", 2.5)
        assert await set_("/Typed", "i", "3") == 0  # an int on a float path is the same quantity
        assert value_of(await busctl.acall_json(name, "/Typed", "GetValue")) == ("d", 3.0)

        assert await set_("/Checked", "d", "500") == 2  # rejected by the service's check
        assert value_of(await busctl.acall_json(name, "/Checked", "GetValue")) == ("d", 1.0)
        assert await set_("/Checked", "d", "50") == 0
        assert seen == [("/Checked", 500.0), ("/Checked", 50.0)]

        assert await set_("/Raises", "i", "5") == 2  # a check that raises rejects, and the service lives on
        assert value_of(await busctl.acall_json(name, "/Raises", "GetValue")) == ("i", 1)
        assert value_of(await busctl.acall_json(name, "/Dc/0/Voltage", "GetValue")) == ("d", 54.5)

        assert await set_("/Dc/0/Voltage", "ai", "0") == 0  # invalid
        assert value_of(await busctl.acall_json(name, "/Dc/0/Voltage", "GetValue")) == ("ai", [])
        assert (await busctl.acall_json(name, "/Dc/0/Voltage", "GetText"))["data"][0] == "---"
        assert await set_("/Checked", "ai", "0") == 0
        assert seen[-1] == ("/Checked", None)
        assert service["/Checked"] is None
    finally:
        service.close()


async def test_setvalue_converts_to_the_item_type_as_victrons_library_does(busctl: Any) -> None:
    """dbus-spy sends a number typed into a text field as int32; Victron's BusItem library converts a write to
    the item's type (str(123)), and so does localsettings: the value is taken, as that type."""
    service = await make_service()
    seen: list[Any] = []
    service.add_path("/Name", "", writeable=True, value_types=(str,))
    service.add_path("/Count", 1, writeable=True, value_types=(int,), on_change=lambda _p, v: seen.append(v) or True)
    service.add_path("/Level", 1.0, writeable=True, value_types=(float,))
    name = service.name

    async def set_(path: str, *sig_and_value: str) -> int:
        return (await busctl.acall_json(name, path, "SetValue", "v", *sig_and_value))["data"][0]

    async def get(path: str) -> tuple[str, Any]:
        return value_of(await busctl.acall_json(name, path, "GetValue"))

    try:
        for sig, written, published in [("i", "123", "123"), ("d", "1.5", "1.5"), ("s", "Shed", "Shed")]:
            assert await set_("/Name", sig, written) == 0
            assert await get("/Name") == ("s", published)
        for sig, written, published in [("s", "12", 12), ("d", "2", 2), ("i", "3", 3)]:
            assert await set_("/Count", sig, written) == 0
            assert await get("/Count") == ("i", published)
        assert seen == [12, 2, 3]  # the service's check sees the converted value
        for sig, written, published in [("s", "2.5", 2.5), ("i", "3", 3.0)]:
            assert await set_("/Level", sig, written) == 0
            assert await get("/Level") == ("d", published)
        # What has no value of the type is still refused with code 1, the value unchanged.
        for path, sig_and_value in [("/Name", ("b", "true")), ("/Name", ("as", "1", "x")), ("/Count", ("d", "2.5")),
                                    ("/Count", ("s", "two")), ("/Level", ("s", "nan")), ("/Level", ("b", "false"))]:
            assert await set_(path, *sig_and_value) == 1, (path, sig_and_value)
        assert (await get("/Name"), await get("/Count"), await get("/Level")) == (("s", "Shed"), ("i", 3), ("d", 3.0))
    finally:
        service.close()


# ---- calls without an interface header, errors, description, introspection ---------------------------------

async def test_calls_without_interface_are_answered_like_with_it() -> None:
    service = await make_service(**{"/Inv": None})
    service.add_path("/W", 1, writeable=True)
    other = await connect()
    try:
        async def ask(path: str, member: str, interface: str | None, sig: str = "", body: list[Any] | None = None
                      ) -> Message:
            return await asyncio.wait_for(other.call(Message(destination=service.name, path=path, interface=interface,
                                                              member=member, signature=sig, body=body or [])), 5)

        for path, member in [("/Dc/0/Voltage", "GetValue"), ("/Dc/0/Voltage", "GetText"), ("/Inv", "GetValue"),
                             ("/", "GetValue"), ("/Dc", "GetText"), ("/", "GetItems"),
                             ("/Dc/0/Voltage", "GetDescription")]:
            args = ("si", ["en", 100]) if member == "GetDescription" else ("", None)
            bare = await ask(path, member, None, *args)
            full = await ask(path, member, BUSITEM, *args)
            assert bare.message_type is MessageType.METHOD_RETURN, (path, member, bare.body)
            assert (bare.signature, bare.body) == (full.signature, full.body), (path, member)
        reply = await ask("/W", "SetValue", None, "v", [Variant("i", 5)])
        assert (reply.message_type, reply.body) == (MessageType.METHOD_RETURN, [0])
        assert service["/W"] == 5
        reply = await ask("/Soc", "SetValue", None, "v", [Variant("i", 5)])
        assert reply.body == [1]
        reply = await ask("/Nope", "GetValue", None)
        assert (reply.message_type, reply.error_name) == (MessageType.ERROR,
                                                          "org.freedesktop.DBus.Error.UnknownObject")
    finally:
        other.disconnect()
        service.close()


async def test_unknown_path_is_an_error(bus_address: str, busctl: Any) -> None:
    service = await make_service()
    try:
        result = await busctl.arun("call", service.name, "/Nope", BUSITEM, "GetValue", check=False)
        assert result.returncode != 0
        result = await adbus_send(bus_address, f"--dest={service.name}", "/Dc/0/Nope", f"{BUSITEM}.GetValue")
        assert result.returncode != 0
        assert "org.freedesktop.DBus.Error.UnknownObject" in result.stderr
        result = await adbus_send(bus_address, f"--dest={service.name}", "/Nope", f"{BUSITEM}.SetValue",
                                  "variant:int32:1")
        assert "org.freedesktop.DBus.Error.UnknownObject" in result.stderr
        # and the service still answers
        assert value_of(await busctl.acall_json(service.name, "/Soc", "GetValue")) == ("i", 62)
    finally:
        service.close()


async def test_getdescription(busctl: Any) -> None:
    service = await make_service()
    try:
        reply = await busctl.acall_json(service.name, "/Dc/0/Voltage", "GetDescription", "si", "en", "100")
        assert reply == {"type": "s", "data": ["Battery voltage"]}
    finally:
        service.close()


async def test_introspection(busctl: Any) -> None:
    service = await make_service()
    try:
        tree = (await busctl.arun("tree", service.name)).stdout
        for path in ["/Dc", "/Dc/0", "/Dc/0/Voltage", "/Dc/0/Current", "/Soc", "/Mgmt/ProcessName", "/ProductId"]:
            assert path in re.findall(r"/\S*", tree), path
        leaf = (await busctl.arun("introspect", service.name, "/Dc/0/Voltage")).stdout
        assert BUSITEM in leaf
        for member in [".GetValue", ".GetText", ".SetValue", ".GetDescription", ".PropertiesChanged"]:
            assert member in leaf, member
        root = (await busctl.arun("introspect", service.name, "/")).stdout
        assert ".GetItems" in root and ".ItemsChanged" in root
    finally:
        service.close()


# ---- signals --------------------------------------------------------------------------------------------------

async def test_single_change_emits_one_propertieschanged(bus_address: str) -> None:
    service = await make_service()
    try:
        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            service.set_value("/Dc/0/Voltage", 54.1)
            signals = await monitor.signals(service.bus)
        assert [(p, m) for p, m, _ in signals] == [("/Dc/0/Voltage", "PropertiesChanged")]
        body = signals[0][2]
        assert '"Value"' in body and "double 54.1" in body
        assert '"Text"' in body and 'string "54.10V"' in body
    finally:
        service.close()


async def test_set_values_and_batch_emit_one_itemschanged(bus_address: str) -> None:
    service = await make_service()
    try:
        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            assert service.set_values({"/Dc/0/Voltage": 52.0, "/Soc": 63, "/Dc/0/Current": 15.0}) == 2
            signals = await monitor.signals(service.bus)
        assert [(p, m) for p, m, _ in signals] == [("/", "ItemsChanged")]
        body = signals[0][2]
        assert 'string "/Dc/0/Voltage"' in body and 'string "52.00V"' in body
        assert 'string "/Soc"' in body and 'string "63%"' in body
        assert '"/Dc/0/Current"' not in body  # unchanged

        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            with service.batch():
                service.set_value("/Dc/0/Voltage", 51.0)
                service.set_value("/Dc/0/Current", -3.0)
                with service.batch():  # nested: still one signal at the end of the outer batch
                    service.set_value("/Soc", 64)
            signals = await monitor.signals(service.bus)
        assert [(p, m) for p, m, _ in signals] == [("/", "ItemsChanged")]
        for text in ['"/Dc/0/Voltage"', '"51.00V"', '"/Dc/0/Current"', '"-3.0A"', '"/Soc"', '"64%"']:
            assert text in signals[0][2], text
    finally:
        service.close()


async def test_same_value_emits_nothing(bus_address: str, busctl: Any) -> None:
    service = await make_service()
    try:
        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            assert service.set_value("/Dc/0/Voltage", 53.2) is False
            assert service.set_values({"/Soc": 62, "/Dc/0/Current": 15.0}) == 0
            reply = await busctl.acall_json(service.name, "/Dc/0/Voltage", "SetValue", "v", "d", "53.2")
            assert reply["data"] == [0]
            signals = await monitor.signals(service.bus)
        assert signals == []
    finally:
        service.close()


async def test_remove_path_publishes_invalid(bus_address: str, busctl: Any) -> None:
    service = await make_service(**{"/A": 1, "/B": 2})
    try:
        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            service.remove_path("/Soc")
            signals = await monitor.signals(service.bus)
        assert [(p, m) for p, m, _ in signals] == [("/Soc", "PropertiesChanged")]
        assert 'string "---"' in signals[0][2] and "array [" in signals[0][2]
        result = await busctl.arun("call", service.name, "/Soc", BUSITEM, "GetValue", check=False)
        assert result.returncode != 0

        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            with service.batch():  # removed inside a batch: the invalid goes with the ItemsChanged
                service.set_value("/A", 10)
                service.remove_path("/B")
            signals = await monitor.signals(service.bus)
        assert [(p, m) for p, m, _ in signals] == [("/", "ItemsChanged")]
        assert '"/A"' in signals[0][2] and '"/B"' in signals[0][2] and '"---"' in signals[0][2]
        items = (await busctl.acall_json(service.name, "/", "GetItems"))["data"][0]
        assert "/B" not in items and "/Soc" not in items and items["/A"]["Value"]["data"] == 10
    finally:
        service.close()


async def test_setvalue_from_another_client_emits_propertieschanged(bus_address: str, busctl: Any) -> None:
    service = await make_service()
    try:
        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            reply = await busctl.acall_json(service.name, "/Dc/0/Voltage", "SetValue", "v", "d", "49.5")
            assert reply["data"] == [0]
            signals = await monitor.signals(service.bus)
        assert [(p, m) for p, m, _ in signals] == [("/Dc/0/Voltage", "PropertiesChanged")]
        assert "double 49.5" in signals[0][2] and '"49.50V"' in signals[0][2]
    finally:
        service.close()


async def test_floats_are_published_at_their_resolution(bus_address: str, busctl: Any) -> None:
    """Read through Victron's MQTT bridge, 60.182758620689654 went out as is, and a power alternating between
    -4729.8 and -4729.700000000001 went out at every change: one displayed value published again and again."""
    service = await make_service()
    service.add_path("/Soc1", None, text="{:.1f}%", digits=1)
    service.add_path("/Power", -4729.8, text="{:.0f}W", digits=0)
    try:
        service.set_value("/Soc1", 60.182758620689654)
        assert value_of(await busctl.acall_json(service.name, "/Soc1", "GetValue")) == ("d", 60.2)
        assert value_of(await busctl.acall_json(service.name, "/Power", "GetValue")) == ("d", -4730.0)
        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            for power in (-4729.700000000001, -4729.8, -4730.4, -4729.5000001):
                assert service.set_value("/Power", power) is False  # the same watt: no change
            assert service.set_value("/Soc1", 60.21) is False
            signals = await monitor.signals(service.bus)
        assert signals == []
        async with Monitor(bus_address, service.bus.unique_name) as monitor:
            assert service.set_value("/Power", -4731.2) is True
            assert service.set_value("/Soc1", -0.04) is True
            signals = await monitor.signals(service.bus)
        assert [p for p, _, _ in signals] == ["/Power", "/Soc1"]
        assert "double -4731" in signals[0][2] and '"-4731W"' in signals[0][2]
        assert '"0.0%"' in signals[1][2]  # not "-0.0%"
        assert service["/Dc/0/Voltage"] == 53.2  # a path without a resolution is published as given
    finally:
        service.close()


async def test_what_we_publish_is_cut_to_the_size_limits(busctl: Any) -> None:
    """Whatever sets it (a setting, a member, our own composition), a text or list we publish stays within
    the limits: a 5 MB text republished in every signal made the bus drop our connection."""
    service = await make_service(**{"/Text": "", "/List": []})
    try:
        service.set_value("/Text", "x" * 5_000_000)
        service.set_value("/List", [f"com.victronenergy.battery.m{i}" for i in range(1000)])
        items = (await busctl.acall_json(service.name, "/", "GetItems"))["data"][0]
        text = items["/Text"]["Value"]["data"]
        assert len(text) == 1024 and text.endswith("\u2026") and items["/Text"]["Text"]["data"] == text
        assert len(items["/List"]["Value"]["data"]) == 256
        assert service.set_value("/Text", "x" * 5_000_000) is False  # the same cut value: no signal again
    finally:
        service.close()


# ---- the bus name ---------------------------------------------------------------------------------------------

async def test_second_service_with_the_same_name_is_refused(busctl: Any) -> None:
    first = await make_service()
    second = VeService(await connect(), first.name)
    second.add_path("/X", 1)
    try:
        with pytest.raises(NameTakenError):
            await second.register()
        reply = await busctl.acall_json("org.freedesktop.DBus", "/org/freedesktop/DBus", "GetNameOwner", "s",
                                        first.name, interface="org.freedesktop.DBus")
        assert reply["data"] == [first.bus.unique_name]
        queued = await busctl.acall_json("org.freedesktop.DBus", "/org/freedesktop/DBus", "ListQueuedOwners", "s",
                                         first.name, interface="org.freedesktop.DBus")
        assert queued["data"] == [[first.bus.unique_name]]  # do-not-queue: the second is not waiting
        assert value_of(await busctl.acall_json(first.name, "/Dc/0/Voltage", "GetValue")) == ("d", 53.2)
    finally:
        second.close()
        first.close()


async def test_name_appears_only_with_all_paths(bus_address: str) -> None:
    name = unique_name()
    first_items: list[str] = []
    stop = threading.Event()

    def poll() -> None:  # an independent client asking GetItems as fast as it can until the name answers
        while not stop.is_set():
            result = dbus_send(bus_address, f"--dest={name}", "/", f"{BUSITEM}.GetItems")
            if result.returncode == 0:
                first_items.append(result.stdout)
                return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    service = VeService(await connect(), name)
    try:
        service.add_mandatory_paths(process_name="t", process_version="1", connection="c", device_instance=1,
                                    product_id=0xB0FF, product_name="T")
        for i in range(60):
            service.add_path(f"/Item/{i}", i)
            await asyncio.sleep(0.002)
        await service.register()
        await eventually(lambda: first_items, timeout=10)
        for i in range(60):
            assert f'string "/Item/{i}"' in first_items[0], i
        assert 'string "/DeviceInstance"' in first_items[0]
    finally:
        stop.set()
        thread.join(10)
        service.close()


# ---- many paths -----------------------------------------------------------------------------------------------

async def test_many_paths_still_answer_quickly(busctl: Any) -> None:
    service = await make_service(register=False)
    for i in range(320):
        service.add_path(f"/Cells/{i // 16}/Cell{i % 16}", 3.2 + i / 1000, text="{:.3f}V")
    await service.register()
    other = await connect()
    try:
        items = (await busctl.acall_json(service.name, "/", "GetItems"))["data"][0]
        assert len(items) == len(service.paths()) >= 320
        assert items["/Cells/19/Cell15"]["Text"]["data"] == "3.519V"
        assert value_of(await busctl.acall_json(service.name, "/Cells/3/Cell2", "GetValue")) == ("d", 3.25)

        message = Message(destination=service.name, path="/Cells/10/Cell5", interface=BUSITEM, member="GetValue")
        start = time.perf_counter()
        for _ in range(200):
            reply = await other.call(message)
        elapsed = time.perf_counter() - start
        assert reply.body[0].value == pytest.approx(3.2 + 165 / 1000)
        print(f"\n200 leaf GetValue calls at {len(service.paths())} paths: {elapsed * 1000:.1f} ms")
        assert elapsed < 2.0
    finally:
        other.disconnect()
        service.close()
