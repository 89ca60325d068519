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


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until `check()` returns something truthy (or raises nothing), else fail with its last result."""
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
