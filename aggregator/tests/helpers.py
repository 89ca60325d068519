"""Small helpers shared by the tests."""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable


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
