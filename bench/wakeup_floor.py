"""The floor under the daemon's CPU per member update: what one wake-up of an asyncio process costs here.

    .venv/bin/python bench/wakeup_floor.py [--messages 300] [--interval 0.03]

A child process sends a 600-byte message every `interval` seconds over a socketpair (like a member's signal
arriving through the bus daemon); the parent, an asyncio loop with one reader that only recv()s, measures its
own CPU time (CLOCK_PROCESS_CPUTIME_ID) per message. Any event-driven Python service on this machine pays at
least this per update before doing any work.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator_dev.bench import machine  # noqa: E402


async def _read(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    received = 0

    def on_readable() -> None:
        nonlocal received
        try:
            while True:
                if not sock.recv(65536):
                    done.set()
                    return
                received += 1
        except BlockingIOError:
            pass

    loop.add_reader(sock.fileno(), on_readable)
    await done.wait()
    return received


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--interval", type=float, default=0.03)
    args = parser.parse_args(argv)
    reader, writer = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the sender
        reader.close()
        for _ in range(args.messages):
            writer.send(b"x" * 600)
            time.sleep(args.interval)
        os._exit(0)
    writer.close()
    reader.setblocking(False)
    start = time.process_time()
    received = asyncio.run(_read(reader))
    cpu = time.process_time() - start
    os.waitpid(pid, 0)
    print(f"machine: {machine()}")
    print(f"asyncio reader: {1e6 * cpu / max(1, received):.0f} µs of CPU per wake-up ({received} messages, "
          f"one every {1000 * args.interval:g} ms), i.e. {cpu / max(1, received) * 1000:.3f} CPU-s per 1000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
