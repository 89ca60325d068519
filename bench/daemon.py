"""Benchmark of the whole service: members -> `battery-aggregator run` -> a client reading the aggregate.

    .venv/bin/python bench/daemon.py --scenario a|b|c [--duration 20] [--json]

Scenarios (issue #6): (a) 16 members x 2 Hz x 8 changed paths per update; (b) 64 members x 1 Hz; (c) a
burst: every member changes at once, once per second, 32 members.
Processes on a private dbus-daemon: a publisher of N battery services (each its own connection, one
ItemsChanged per update with 8 battery paths), the daemon under test, and a probe client that watches the
aggregate. Figures: CPU seconds of the daemon process per 1000 member updates (utime+stime+cutime+cstime
from /proc), its RSS, its start-up time with N members (start to the aggregate answering with every member
counted), and the latency from a member's update leaving the publisher to the aggregate's new value seen
by the probe: member 0's temperature carries a rising probe value, which the aggregate's max-temperature rule
passes through (median, p99, max; CLOCK_MONOTONIC is shared by processes on one machine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aggregator_dev.bench import machine, read_json_line  # noqa: E402
from aggregator_dev.privatebus import PrivateBus  # noqa: E402

BASELINE = REPO / "bench" / "baseline.json"
SCENARIOS = {"a": (16, 2.0, False), "b": (64, 1.0, False), "c": (32, 1.0, True), "idle": (16, 0.05, False)}
AGGREGATE = "com.victronenergy.battery.benchagg"
PROBE_BASE = 100.0  # probe temperatures 100..150 degC: above every real member, inside the sanity bounds


def calibration_cpu_s() -> float:
    """CPU seconds of a fixed pure-Python workload (dict, struct and float work like the daemon's), best of 3.
    Dividing by it makes a CPU figure comparable across machines of different speed."""
    import struct

    pack = struct.Struct("<d").pack
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        table: dict[str, float] = {}
        for i in range(200_000):
            key = f"/Batteries/{i & 63}/Soc"
            table[key] = table.get(key, 0.0) * 0.5 + i
            pack(table[key])
        best = min(best, time.process_time() - start)
    return best


def write_baseline(result: dict[str, Any], duration: float) -> dict[str, Any]:
    baseline = {
        "machine": result["machine"], "library": result["library"], "scenario": result["scenario"],
        "duration_s": duration, "cpu_s_per_1000_updates": result["cpu_s_per_1000_updates"],
        "calibration_cpu_s": round(calibration_cpu_s(), 4), "recorded": time.strftime("%Y-%m-%d"),
        "how": "python bench/daemon.py --scenario a --duration 5 --write-baseline",
    }
    BASELINE.write_text(json.dumps(baseline, indent=1) + "\n")
    return baseline


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    return sum(process_cpu_split(pid))


def process_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + cutime) / _ticks(), (stime + cstime) / _ticks()


def process_wakeups(pid: int) -> int:
    """Voluntary context switches of all the process's threads: each is one sleep, so one wake-up after it."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:  # a thread ended while we read
            pass
    return total


def process_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---- roles -------------------------------------------------------------------------------------------------

async def publisher(members: int, rate: float, burst: bool, duration: float) -> None:
    from aggregator.bus.lib import connect
    from aggregator.bus.service import VeService

    services = []
    for i in range(members):
        s = VeService(await connect(), f"com.victronenergy.battery.bench{i}")
        s.add_mandatory_paths(process_name="bench", process_version="1", connection="bench",
                              device_instance=100 + i, product_id=0xB0F0, product_name="Bench battery")
        base = {"/Dc/0/Voltage": 53.0, "/Dc/0/Current": 10.0, "/Dc/0/Power": 530.0, "/Soc": 50.0,
                "/Capacity": 100.0, "/InstalledCapacity": 200.0, "/Dc/0/Temperature": 25.0,
                "/System/MinCellVoltage": 3.3, "/System/MaxCellVoltage": 3.32, "/Info/MaxChargeCurrent": 100.0,
                "/Info/MaxDischargeCurrent": 150.0, "/Info/MaxChargeVoltage": 55.2, "/Io/AllowToCharge": 1,
                "/Io/AllowToDischarge": 1, "/Serial": f"B{i}", "/CustomName": f"Bench {i}"}
        for path, value in base.items():
            s.add_path(path, value)
        await s.register()
        services.append(s)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    sent: list[tuple[float, float]] = []
    period = 1.0 / rate
    updates = 0
    seq = 0
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < duration:
        tick += 1
        for i, s in enumerate(services):
            wobble = ((tick * 7 + i * 3) % 11) / 10.0
            values = {"/Dc/0/Voltage": 53.0 + wobble / 10, "/Dc/0/Current": 10.0 + wobble,
                      "/Dc/0/Power": 530.0 + wobble * 53, "/Soc": 50.0 + wobble, "/Capacity": 100.0 + wobble,
                      "/Dc/0/Temperature": 25.0 + wobble, "/System/MinCellVoltage": 3.3 + wobble / 100,
                      "/System/MaxCellVoltage": 3.32 + wobble / 100}
            if i == 0:
                seq += 1
                # In steps of the aggregate's temperature resolution (0.1 degC): a smaller step is no change.
                values["/Dc/0/Temperature"] = round(PROBE_BASE + (seq % 500) / 10.0, 1)
                sent.append((values["/Dc/0/Temperature"], time.monotonic()))
            s.set_values(values)
            updates += 1
            if not burst:
                await asyncio.sleep(period / members)  # independent BMSes spread over the period
        if burst:
            await asyncio.sleep(period)  # all members at once, then quiet
    await asyncio.sleep(1.0)
    print(json.dumps({"updates": updates, "elapsed": time.monotonic() - start, "sent": sent}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def probe(members: int, duration: float) -> None:
    from aggregator.bus.lib import connect
    from aggregator.bus.monitor import ServiceMonitor, WatchedService

    seen: list[tuple[float, float]] = []

    def changed(_s: WatchedService, changes: dict[str, Any]) -> None:
        value = changes.get("/Dc/0/Temperature")
        if isinstance(value, float) and value >= PROBE_BASE:
            seen.append((value, time.monotonic()))

    monitor = ServiceMonitor(await connect(), [AGGREGATE], on_changed=changed)
    await monitor.start()
    print(json.dumps({"ready": AGGREGATE in monitor.services}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps({"seen": seen}), flush=True)


# ---- orchestration -----------------------------------------------------------------------------------------

def _say(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def run(scenario: str, duration: float, library: str = "dbus-next", profile: str | None = None) -> dict[str, Any]:
    members, rate, burst = SCENARIOS[scenario]
    with PrivateBus() as bus, tempfile.TemporaryDirectory() as tmp:
        env = bus.env()
        env["PYTHONPATH"] = str(REPO)
        role = [sys.executable, str(Path(__file__).resolve()), "--scenario", scenario, "--duration", str(duration)]
        pub = subprocess.Popen(role + ["--role", "publisher"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=env)
        read_json_line(pub)
        config = Path(tmp, "config.json")
        config.write_text(json.dumps({"serviceName": AGGREGATE, "stateDir": tmp, "startupBatteryWait": 10}))
        started = time.monotonic()
        daemon_env = dict(env, BATTERY_AGGREGATOR_DBUS=library)  # only the daemon: the others stay the same
        daemon = subprocess.Popen([sys.executable, "-m", "aggregator", "run", "--config", str(config),
                                   "--log-level", "WARNING"], env=daemon_env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        startup = _wait_for_members(env, members, started)
        prb = subprocess.Popen(role + ["--role", "probe"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=env)
        read_json_line(prb)
        time.sleep(1.0)  # let start-up work settle before measuring
        spy = None
        if profile:  # sample the measured part only (py-spy: also sees time in C code and the GC)
            spy = subprocess.Popen(["py-spy", "record", "--format", "raw", "--rate", "1000", "--gil", "--nonblocking", "-o",
                                    str(Path(profile).resolve()), "--pid", str(daemon.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        user0, system0 = process_cpu_split(daemon.pid)
        wakeups0 = process_wakeups(daemon.pid)
        _say(pub)
        result = read_json_line(pub)
        user1, system1 = process_cpu_split(daemon.pid)
        wakeups1 = process_wakeups(daemon.pid)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(timeout=20)
        cpu = (user1 - user0) + (system1 - system0)
        rss = process_rss_mib(daemon.pid)
        _say(prb)
        seen = read_json_line(prb)["seen"]
        _say(pub)
        for proc in (pub, prb):
            proc.wait(timeout=20)
        daemon.terminate()
        daemon.wait(timeout=20)
    sent = dict(result["sent"])
    latencies = sorted(t - sent[v] for v, t in seen if v in sent)
    return {
        "machine": machine(), "library": library, "scenario": scenario, "members": members, "rate_hz": rate, "burst": burst,
        "duration_s": round(result["elapsed"], 1), "member_updates": result["updates"],
        "cpu_s_per_1000_updates": round(1000 * cpu / max(1, result["updates"]), 4),
        "cpu_percent_of_one_core": round(100 * cpu / result["elapsed"], 2),
        "wakeups_per_update": round((wakeups1 - wakeups0) / max(1, result["updates"]), 2),
        "system_share": round((system1 - system0) / cpu, 2) if cpu else None,
        "rss_mib": round(rss, 1), "startup_s": round(startup, 2),
        "probe_updates_seen": f"{len(latencies)} of {len(sent)}",
        "latency_ms": {"median": round(1000 * statistics.median(latencies), 2) if latencies else None,
                       "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
                       "max": round(1000 * latencies[-1], 2) if latencies else None},
    }


def _wait_for_members(env: dict[str, str], members: int, started: float) -> float:
    """Seconds from starting the daemon until the aggregate answers with every member counted."""
    while time.monotonic() - started < 60:
        result = subprocess.run(["busctl", f"--address={env['DBUS_SESSION_BUS_ADDRESS']}", "--json=short", "call",
                                 AGGREGATE, "/System/NrOfBatteries", "com.victronenergy.BusItem", "GetValue"],
                                capture_output=True, text=True)
        if result.returncode == 0 and json.loads(result.stdout)["data"][0]["data"] == members:
            return time.monotonic() - started
        time.sleep(0.02)
    raise RuntimeError("the daemon did not count every member within 60 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="a")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--library", choices=["dbus-next", "dbus-fast"], default="dbus-next",
                        help="the D-Bus library the daemon under test runs on")
    parser.add_argument("--write-baseline", action="store_true",
                        help=f"record this run as the regression baseline ({BASELINE.relative_to(REPO)})")
    parser.add_argument("--profile", metavar="FILE", help="sample the daemon with py-spy while it is measured; collapsed stacks to FILE")
    parser.add_argument("--role", choices=["publisher", "probe"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    members, rate, burst = SCENARIOS[args.scenario]
    if args.role == "publisher":
        asyncio.run(publisher(members, rate, burst, args.duration))
        return 0
    if args.role == "probe":
        asyncio.run(probe(members, args.duration))
        return 0
    r = run(args.scenario, args.duration, args.library, args.profile)
    if args.write_baseline:
        write_baseline(r, args.duration)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        lat = r["latency_ms"]
        print(f"machine: {r['machine']}; daemon on {r['library']}")
        print(f"scenario {r['scenario']}: {r['members']} members x {r['rate_hz']:g} Hz"
              f"{' (burst: all at once)' if r['burst'] else ''}, {r['duration_s']} s, "
              f"{r['member_updates']} member updates")
        print(f"daemon: {r['cpu_s_per_1000_updates']:.3f} CPU-s per 1000 member updates "
              f"({r['cpu_percent_of_one_core']:.1f}% of one core, {r['system_share']:.0%} in the kernel), RSS {r['rss_mib']} MiB, "
              f"start-up with {r['members']} members {r['startup_s']} s; {r['wakeups_per_update']} wake-ups per update")
        print(f"latency member update -> aggregate seen by a client: median {lat['median']} ms, p99 {lat['p99']} ms, "
              f"max {lat['max']} ms ({r['probe_updates_seen']} probe updates seen)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
