"""Benchmark of the bus layer: N members publishing at R Hz, watched by our monitor.

    python -m aggregator_dev.bench [--members 16] [--rate 2] [--paths 8] [--duration 10]   (or ./run.sh bench ...)

Three processes on a private dbus-daemon: a publisher (N services, each on its own connection, sending one
ItemsChanged with `--paths` changed values per update), a watcher (our ServiceMonitor, the client side the
aggregator uses), and this one, which reports. Figures: CPU seconds per 1000 member updates of the watcher
and of the publisher (user+system from the kernel), the watcher's RSS, and the latency from a member's
update leaving the publisher to the watcher's cache holding it (median, p99, max; CLOCK_MONOTONIC is shared
by processes on one machine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

STAMP = "/Bench/SentAt"


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from aggregator.bus.lib import LIBRARY

    versions = ", ".join(f"{lib} {_version(lib)}" for lib in (LIBRARY, "pydantic", "numpy"))
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {versions}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# ---- roles -----------------------------------------------------------------------------------------------

async def _publisher(members: int, rate: float, paths: int, duration: float) -> dict[str, Any]:
    from aggregator.bus.lib import connect
    from aggregator.bus.service import VeService

    services = []
    for i in range(members):
        service = VeService(await connect(), f"com.victronenergy.battery.bench{i}")
        service.add_mandatory_paths(process_name="bench", process_version="1", connection="bench",
                                    device_instance=100 + i, product_id=0xB0F0, product_name="Bench battery")
        for p in range(paths - 1):
            service.add_path(f"/Bench/Value{p}", 0.0, text="{:.2f}V")
        service.add_path(STAMP, 0.0)
        await service.register()
        services.append(service)
    print(json.dumps({"ready": True}), flush=True)
    # Wait for the watcher to be ready (a line on stdin), then publish.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    period = 1.0 / rate
    updates = 0
    cpu0 = _cpu_seconds()
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < duration:
        tick += 1
        for i, service in enumerate(services):
            values = {f"/Bench/Value{p}": tick + i + p * 0.01 for p in range(paths - 1)}
            values[STAMP] = time.monotonic()
            service.set_values(values)
            updates += 1
            # Spread the members over the period as independent BMSes would be.
            await asyncio.sleep(period / members)
    cpu = _cpu_seconds() - cpu0
    await asyncio.sleep(0.5)  # let the last signals drain
    return {"updates": updates, "cpu": cpu, "elapsed": time.monotonic() - start}


async def _watcher(members: int, duration: float) -> dict[str, Any]:
    from aggregator.bus.lib import connect
    from aggregator.bus.monitor import ServiceMonitor, WatchedService

    latencies: list[float] = []
    started_at = time.monotonic()

    def changed(service: WatchedService, changes: dict[str, Any]) -> None:
        sent = changes.get(STAMP)
        if sent is not None:
            latencies.append(time.monotonic() - sent)

    t0 = time.monotonic()
    monitor = ServiceMonitor(await connect(), ["com.victronenergy.battery.bench"], on_changed=changed)
    await monitor.start()
    startup = time.monotonic() - t0
    assert len(monitor.services) == members, f"found {len(monitor.services)} of {members} members"
    print(json.dumps({"ready": True, "startup": startup}), flush=True)
    cpu0 = _cpu_seconds()
    started_at = time.monotonic()
    # Measure until the publisher is done (it runs `duration` s) plus a drain margin.
    await asyncio.sleep(duration + 0.8)
    cpu = _cpu_seconds() - cpu0
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"updates": len(latencies), "cpu": cpu, "elapsed": time.monotonic() - started_at,
            "latencies": latencies, "rss_kib": rss_kib, "startup": startup}


# ---- orchestration -----------------------------------------------------------------------------------------

def _start_role(role: str, args: argparse.Namespace, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aggregator_dev.bench", "--role", role, "--members", str(args.members), "--rate",
         str(args.rate), "--paths", str(args.paths), "--duration", str(args.duration)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def read_json_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The next line a role process prints, as JSON (RuntimeError when it exited instead)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark process exited early (code {proc.wait()})")
    return json.loads(line)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from aggregator_dev.privatebus import PrivateBus

    with PrivateBus() as bus:
        env = bus.env()
        publisher = _start_role("publisher", args, env)
        read_json_line(publisher)
        watcher = _start_role("watcher", args, env)
        ready = read_json_line(watcher)
        assert publisher.stdin is not None
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        pub = read_json_line(publisher)
        mon = read_json_line(watcher)
        publisher.wait(timeout=30)
        watcher.wait(timeout=30)
    lat = sorted(mon["latencies"])
    per_k = 1000.0 / max(1, pub["updates"])
    result = {
        "machine": machine(),
        "members": args.members, "rate_hz": args.rate, "paths_per_update": args.paths,
        "duration_s": round(pub["elapsed"], 2),
        "updates_sent": pub["updates"], "updates_seen": mon["updates"],
        "watcher_cpu_s_per_1000_updates": round(mon["cpu"] * per_k, 4),
        "watcher_cpu_percent_of_one_core": round(100.0 * mon["cpu"] / mon["elapsed"], 2),
        "publisher_cpu_s_per_1000_updates": round(pub["cpu"] * per_k, 4),
        "watcher_rss_mib": round(mon["rss_kib"] / 1024, 1),
        "watcher_startup_s": round(ready["startup"], 3),
        "latency_ms": {
            "median": round(1000 * statistics.median(lat), 3) if lat else None,
            "p99": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
            "max": round(1000 * lat[-1], 3) if lat else None,
        },
    }
    return result


def format_result(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return "\n".join([
        f"machine: {r['machine']}",
        f"load: {r['members']} members x {r['rate_hz']:g} Hz x {r['paths_per_update']} paths per update, "
        f"{r['duration_s']} s; updates sent {r['updates_sent']}, seen {r['updates_seen']}",
        f"watcher:   {r['watcher_cpu_s_per_1000_updates']:.4f} CPU-s per 1000 member updates "
        f"({r['watcher_cpu_percent_of_one_core']:.2f}% of one core), RSS {r['watcher_rss_mib']} MiB, "
        f"start-up with {r['members']} members {r['watcher_startup_s']:.3f} s",
        f"publisher: {r['publisher_cpu_s_per_1000_updates']:.4f} CPU-s per 1000 member updates",
        f"latency member update -> watcher cache: median {lat['median']} ms, p99 {lat['p99']} ms, max {lat['max']} ms",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggregator_dev.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--rate", type=float, default=2.0, help="updates per member per second")
    parser.add_argument("--paths", type=int, default=8, help="changed paths per update")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of publishing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--role", choices=["publisher", "watcher"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "publisher":
        print(json.dumps(asyncio.run(_publisher(args.members, args.rate, args.paths, args.duration))), flush=True)
        return 0
    if args.role == "watcher":
        print(json.dumps(asyncio.run(_watcher(args.members, args.duration))), flush=True)
        return 0
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
