"""Small helpers shared by the tests."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import time
from pathlib import Path
from types import ModuleType
from typing import Any, AsyncIterator, Callable

REPO = Path(__file__).resolve().parents[2]


def load_script(relative: str) -> ModuleType:
    """A script of the repository that is not part of the package (bench/*.py, config_generator/build.py),
    imported as a module so a test can call its functions."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_tick_beat(moment: float, late: float = 0.05) -> bool:
    """Whether a moment of the loop clock is one of the service's 1-second beats (beats.next_beat), up to `late`:
    a timer that falls on them runs in the wake-up of the tick."""
    from aggregator.bus.beats import READ_BEAT, next_beat

    return 0 <= moment - next_beat(moment - READ_BEAT - late, 1.0) < late


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until `check()` returns something truthy (or raises nothing), else fail with its last result. The
    timeout only bounds a failure: a passing test waits for the event, and a loaded machine may start a daemon
    in more than ten seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last result: {last!r}")
        await asyncio.sleep(interval)


class CallWatch:
    """dbus-monitor (an independent eavesdropper on the private bus) counting the calls of one member to one
    service: how a test waits for the aggregate's probes of a service in another process."""

    def __init__(self, address: str, destination: str, member: str = "GetItems") -> None:
        self.args = ["dbus-monitor", "--address", address,
                     f"type='method_call',member='{member}',destination='{destination}'"]
        self.needle = f"member={member}"
        self.count = 0

    async def __aenter__(self) -> "CallWatch":
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.DEVNULL)
        self.task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            if self.needle.encode() in line:
                self.count += 1

    async def __aexit__(self, *_exc: object) -> None:
        self.task.cancel()
        self.proc.kill()
        await self.proc.wait()


async def retained_on(mqtt: Any, topic: str, wait: float = 1.0) -> bytes | None:
    """The retained message of `topic` as a fresh subscriber gets it, on `mqtt` (a connected aiomqtt client);
    None if there is none within `wait` s."""
    await mqtt.subscribe(topic, qos=1)
    try:
        async with asyncio.timeout(wait):
            async for message in mqtt.messages:
                payload = message.payload
                return payload if isinstance(payload, bytes) else str(payload).encode()
    except TimeoutError:
        return None
    return None


@contextlib.asynccontextmanager
async def coop_states(broker: dict[str, Any]) -> AsyncIterator[Any]:
    """An MQTT client of a demo cooperative's broker (demo.json's "broker": host, port, caFile and its
    read-only user), subscribed to every site's state."""
    import ssl

    import aiomqtt

    tls = ssl.create_default_context(cafile=broker["caFile"])
    async with aiomqtt.Client(broker["host"], broker["port"], username=broker["username"],
                              password=broker["password"], tls_context=tls, timeout=10) as mqtt:
        await mqtt.subscribe("coop/+/state", qos=1)
        yield mqtt
