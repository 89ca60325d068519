"""Benchmark of the whole service: members -> `battery-aggregator run` -> a client reading the aggregate.

    .venv/bin/python bench/daemon.py [--scenario a|b|c|idle|quiet|features|a+features|all] [--duration 20] [--json]
                                     [--reference DIR] [--rounds N] [--imports]

Scenarios: (a) 16 members x 2 Hz x 8 changed paths per update; (b) 64 members x 1 Hz; (c) a burst: every
member changes at once, once per second, 32 members; idle: 16 members at one update in 20 s; quiet: 64
members that signal nothing at all, measured for at least 65 s so that the aggregate's round of liveness probes
(GetItems to each member silent for limits.staleAfter, 60 s by default) falls in the window; features: (a) with
every side feature running in the daemon (energy ledger with its HTTP endpoint, a grid battery on a simulated meter,
the dispatcher over two controllable batteries, a cooperative site on a local mosquitto); a+features: the daemon
alone and with every side feature in turns in one sitting (the features' helpers up for both), for their ratio:
the median of each round's ratio (the machine's speed drifts between sittings more than the features cost);
all: each of a, b, c, quiet and features in a sitting of its own.

One sitting per scenario: a private dbus-daemon, a localsettings stand-in and a publisher of N battery
services (each its own connection, one ItemsChanged per update with 8 battery paths) stay up while each
daemon under test runs in turn on that bus and that bank: ours (`battery-aggregator run`) and, with
`--reference DIR`, BatteryAggregator (pulquero's, with Victron's velib_python in DIR/ext, run by the
system's python3 with dbus-python and PyGObject). `--rounds N` alternates them N times and takes the median.

Figures: CPU seconds of the daemon process per 1000 member updates (all its threads' time on a CPU, from
/proc/PID/task/*/schedstat) and in % of one core, its wake-ups per update (voluntary context switches of all its
threads), RSS, its start-up time with N members (start to the aggregate answering with every member counted), and
the latency from a member's update leaving the publisher to the aggregate's new value seen by a client: member 0's
temperature carries a rising probe value, which both aggregates' max-temperature rule passes through
(median, p99, max; CLOCK_MONOTONIC is shared by processes on one machine).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
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
# members, updates per member per second, all at once
SCENARIOS = {"a": (16, 2.0, False), "b": (64, 1.0, False), "c": (32, 1.0, True), "idle": (16, 0.05, False),
             "quiet": (64, 0.0, False), "features": (16, 2.0, False)}
ALL = ("a", "b", "c", "quiet", "features")
GROUPS = {"all": ALL}  # several scenarios in one invocation
PAIRED = "a+features"
FEATURES = ("energy", "gridBatteries", "dispatcher", "coop")  # the config keys of the side features
AGGREGATE = "com.victronenergy.battery.benchagg"
REFERENCE_AGGREGATE = "com.victronenergy.battery.aggregator"  # BatteryAggregator's name is fixed
PROBE_BASE = 100.0  # probe temperatures 100..150 degC: above every real member, inside the sanity bounds
QUIET_MIN_S = 65.0  # a quiet bank is measured this long at least: one round of liveness probes
SETTLE_S = 1.0  # after start-up, before measuring

# BatteryAggregator reads its config from a fixed path and its version from a file next to its install
# directory; this runs it unchanged from DIR with both pointed elsewhere.
REFERENCE_LAUNCHER = """
import pathlib, sys, types
home, config_dir = sys.argv[1], sys.argv[2]
utils = types.ModuleType("script_utils")
utils.SCRIPT_HOME, utils.VERSION = home, "reference"
sys.modules["script_utils"] = utils
sys.path.insert(0, home)
import battery_service
real = pathlib.Path
battery_service.Path = lambda p: real(config_dir) if str(p) == "/data/setupOptions/BatteryAggregator" else real(p)
battery_service.main()
"""


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


def process_cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of all the process's threads (the scheduler's own count: /proc/PID/stat counts in
    10 ms ticks, too coarse for a daemon that runs a few ms a second). A thread that ends is not counted."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread ended while we read
            pass
    return total


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
    """The bank. After "ready", each line on stdin publishes for `duration` s and prints what was sent; EOF ends."""
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
    loop = asyncio.get_running_loop()
    seq = 0
    tick = 0
    while await loop.run_in_executor(None, sys.stdin.readline):
        sent: list[tuple[float, float]] = []
        updates = 0
        start = time.monotonic()
        if rate <= 0:  # a quiet bank: nothing at all is signalled
            await asyncio.sleep(duration)
        while rate > 0 and time.monotonic() - start < duration:
            tick += 1
            for i, s in enumerate(services):
                wobble = ((tick * 7 + i * 3) % 11) / 10.0
                # The voltage follows its own pattern: on a voltage exactly linear in the current,
                # BatteryAggregator's resistance fit takes the root of a rounding error below 0 and exits.
                volts = ((tick * 5 + i * 7) % 13) / 100.0
                values = {"/Dc/0/Voltage": 53.0 + volts, "/Dc/0/Current": 10.0 + wobble,
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
                    await asyncio.sleep(1.0 / rate / members)  # independent BMSes spread over the period
            if burst:
                await asyncio.sleep(1.0 / rate)  # all members at once, then quiet
        await asyncio.sleep(1.0)
        print(json.dumps({"updates": updates, "elapsed": time.monotonic() - start, "sent": sent}), flush=True)


async def probe(name: str) -> None:
    from aggregator.bus.lib import connect
    from aggregator.bus.monitor import ServiceMonitor, WatchedService

    seen: list[tuple[float, float]] = []

    def changed(_s: WatchedService, changes: dict[str, Any]) -> None:
        value = changes.get("/Dc/0/Temperature")
        if isinstance(value, (int, float)) and value >= PROBE_BASE:
            seen.append((value, time.monotonic()))

    monitor = ServiceMonitor(await connect(), [name], on_changed=changed)
    await monitor.start()
    print(json.dumps({"ready": name in monitor.services}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps({"seen": seen}), flush=True)


# ---- the daemons under test ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ours:
    """`battery-aggregator run` on this checkout; `features`: with every side feature in its config."""

    label = "ours"
    aggregate = AGGREGATE

    def __init__(self, library: str = "dbus-next", features: bool = False,
                 only: tuple[str, ...] = FEATURES) -> None:
        self.library = library
        self.features = features
        self.only = only  # which side features (the config's keys) when `features`

    def config(self, tmp: Path, helpers: Helpers) -> dict[str, Any]:
        config: dict[str, Any] = {"serviceName": AGGREGATE, "stateDir": str(tmp / "state"), "startupBatteryWait": 10}
        if self.features:
            controllable = [{"name": name, "setpoint": {"dbus": {"service": service, "path": "/Setpoint"}},
                             "measured": {"dbus": {"service": service, "path": "/Dc/0/Power"}},
                             "soc": {"dbus": {"service": service, "path": "/Soc"}},
                             "capacity": {"dbus": {"service": service, "path": "/CapacityWh"}},
                             "maxChargeW": 3000, "maxDischargeW": 3000}
                            for name, service in helpers.controllables.items()]
            every = {
                "energy": {"httpPort": free_port()},
                "gridBatteries": [{"meter": helpers.meter, "capacityKwh": 40, "startDate": "2020-01-01",
                                   "startLevelKwh": 0, "serviceName": "com.victronenergy.battery.benchgrid",
                                   "maxPowerKw": 100000}],
                "dispatcher": {"enabled": True, "cycleSeconds": 1.0, "batteries": controllable},
                "coop": {"enabled": True, "siteId": "bench", "publishSeconds": 5.0,
                         "peers": {"bench": {"capacityKwh": 10}, "other": {"capacityKwh": 10}},
                         "broker": {"host": "127.0.0.1", "port": helpers.broker_port, "tls": False}},
            }
            config |= {key: section for key, section in every.items() if key in self.only}
        return config

    def start(self, env: dict[str, str], tmp: Path, helpers: Helpers) -> subprocess.Popen[bytes]:
        path = tmp / "config.json"
        path.write_text(json.dumps(self.config(tmp, helpers)))
        daemon_env = dict(env, BATTERY_AGGREGATOR_DBUS=self.library)  # only the daemon: the others stay the same
        with open(tmp / "daemon.log", "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "aggregator", "run", "--config", str(path), "--log-level",
                                     "WARNING"], env=daemon_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


class Reference:
    """pulquero's BatteryAggregator from `home` (battery_service.py, its modules, velib_python in ext/), on the
    system's python3 with dbus-python and PyGObject, at logLevel WARNING like ours."""

    label = "BatteryAggregator"
    aggregate = REFERENCE_AGGREGATE

    def __init__(self, home: str, python: str = "/usr/bin/python3") -> None:
        self.home = str(Path(home).expanduser().resolve())
        self.python = python
        if not Path(self.home, "battery_service.py").exists() or not Path(self.home, "ext", "vedbus.py").exists():
            raise SystemExit(f"{self.home}: no battery_service.py with velib_python in ext/ there")
        check = subprocess.run([python, "-c", "import dbus, gi; from gi.repository import GLib; import sys;"
                                "print(sys.version.split()[0], dbus.__version__, gi.__version__)"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"{python} cannot run BatteryAggregator (needs dbus-python and PyGObject: Debian "
                             f"python3-dbus python3-gi): {check.stderr.strip().splitlines()[-1:]}")
        version, dbus_version, gi_version = check.stdout.split()
        self.describe = f"Python {version}, dbus-python {dbus_version}, PyGObject {gi_version}"

    def start(self, env: dict[str, str], tmp: Path, helpers: Helpers) -> subprocess.Popen[bytes]:
        (tmp / "config.json").write_text(json.dumps({"logLevel": "WARNING", "startupBatteryWait": 10}))
        with open(tmp / "daemon.log", "wb") as log:
            return subprocess.Popen([self.python, "-c", REFERENCE_LAUNCHER, self.home, str(tmp)], env=env, cwd=tmp,
                                    stdout=log, stderr=subprocess.STDOUT)


class Helpers:
    """What the side features talk to: a grid meter, two controllable batteries, a mosquitto."""

    def __init__(self) -> None:
        self.meter = "com.victronenergy.grid.bench"
        self.controllables = {name: f"com.batteryaggregator.controllable.{name}" for name in ("garage", "shed")}
        self.broker_port = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._broker: Any = None

    def start(self, env: dict[str, str]) -> None:
        from aggregator_dev.mqttbroker import MosquittoBroker

        self._broker = MosquittoBroker().start()
        self.broker_port = self._broker.port
        self._spawn(env, "aggregator_dev.simulator.grid_meter", "--name", "bench")
        for i, name in enumerate(self.controllables):
            self._spawn(env, "aggregator_dev.simulator.controllable", "--name", name, "--layout", "generic",
                        "--device-instance", str(60 + i), "--gain", "0.6" if i else "1.0")

    def _spawn(self, env: dict[str, str], *args: str) -> None:
        self._procs.append(subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL))

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            proc.wait(timeout=20)
        self._procs.clear()
        if self._broker is not None:
            self._broker.stop()
            self._broker = None


# ---- a sitting ------------------------------------------------------------------------------------------------

def _say(proc: subprocess.Popen[str], line: str = "go") -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


class Sitting:
    """A private bus with localsettings and one bank, on which daemons are measured one after the other."""

    def __init__(self, scenario: str, duration: float) -> None:
        self.scenario = scenario
        self.members, self.rate, self.burst = SCENARIOS[scenario]
        self.duration = max(duration, QUIET_MIN_S) if scenario == "quiet" else duration
        self.helpers = Helpers()

    def __enter__(self) -> Sitting:
        self._stack = contextlib.ExitStack()
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        self.bus = self._stack.enter_context(PrivateBus())
        self.env = self.bus.env()
        self.env["PYTHONPATH"] = str(REPO)
        self._settings = subprocess.Popen([sys.executable, "-m", "aggregator_dev.simulator.localsettings"],
                                          env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._stack.callback(self._end, self._settings)
        self.publisher = self._role("publisher")
        self._stack.callback(self._end, self.publisher)
        read_json_line(self.publisher)
        if self.scenario == "features":
            self._stack.callback(self.helpers.stop)
            self.helpers.start(self.env)

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _role(self, role: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--scenario", self.scenario,
                                 "--duration", str(self.duration), "--role", role, *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)

    @staticmethod
    def _end(proc: subprocess.Popen[Any]) -> None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.poll() is None:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)

    def measure(self, daemon: Ours | Reference, profile: str | None = None) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            proc = daemon.start(self.env, Path(tmp), self.helpers)
            try:
                try:
                    result = self._measure(daemon, proc, started, profile)
                except RuntimeError as error:
                    log = Path(tmp, "daemon.log").read_text(errors="replace").splitlines()[-15:]
                    raise RuntimeError("\n".join([f"{daemon.label}: {error}; its log ended with:", *log])) from None
                if not result["alive"]:  # say why: the figures of a daemon that died are not its own
                    result["log_tail"] = Path(tmp, "daemon.log").read_text(errors="replace").splitlines()[-15:]
                return result
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _measure(self, daemon: Ours | Reference, proc: subprocess.Popen[bytes], started: float,
                 profile: str | None) -> dict[str, Any]:
        startup = self._wait_for_members(daemon.aggregate, started, proc)
        prb = self._role("probe", "--aggregate", daemon.aggregate)
        try:
            read_json_line(prb)
            time.sleep(SETTLE_S)  # let start-up work settle before measuring
            spy = None
            if profile:  # sample the measured part only (py-spy: also sees time in C code and the GC)
                spy = subprocess.Popen(["py-spy", "record", "--format", "raw", "--rate", "1000", "--gil",
                                        "--nonblocking", "-o", str(Path(profile).resolve()), "--pid", str(proc.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            user0, system0 = process_cpu_split(proc.pid)
            wakeups0, ns0 = process_wakeups(proc.pid), process_cpu_ns(proc.pid)
            _say(self.publisher)
            result = read_json_line(self.publisher)
            user1, system1 = process_cpu_split(proc.pid)
            wakeups1, ns1 = process_wakeups(proc.pid), process_cpu_ns(proc.pid)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(timeout=20)
            rss = process_rss_mib(proc.pid)
            alive = proc.poll() is None
            _say(prb)
            seen = read_json_line(prb)["seen"]
        finally:
            self._end(prb)
        ticks = (user1 - user0) + (system1 - system0)
        cpu = (ns1 - ns0) / 1e9 if ns1 else ticks
        sent = dict(result["sent"])
        latencies = sorted(t - sent[v] for v, t in seen if v in sent)
        updates = result["updates"]
        return {
            "machine": machine(), "daemon": daemon.label,
            "library": daemon.library if isinstance(daemon, Ours) else "dbus-python",
            "scenario": self.scenario, "members": self.members, "rate_hz": self.rate, "burst": self.burst,
            "duration_s": round(result["elapsed"], 1), "member_updates": updates, "alive": alive,
            "cpu_s_per_1000_updates": round(1000 * cpu / updates, 4) if updates else None,
            "cpu_percent_of_one_core": round(100 * cpu / result["elapsed"], 3),
            "wakeups_per_update": round((wakeups1 - wakeups0) / updates, 2) if updates else None,
            "wakeups_per_s": round((wakeups1 - wakeups0) / result["elapsed"], 1),
            "system_share": round((system1 - system0) / ticks, 2) if ticks else None,
            "rss_mib": round(rss, 1), "startup_s": round(startup, 2),
            "probe_updates_seen": f"{len(latencies)} of {len(sent)}",
            "latency_ms": {"median": round(1000 * statistics.median(latencies), 2) if latencies else None,
                           "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
                           "max": round(1000 * latencies[-1], 2) if latencies else None},
        }

    def _wait_for_members(self, aggregate: str, started: float, proc: subprocess.Popen[bytes]) -> float:
        """Seconds from starting the daemon until the aggregate answers with every member counted."""
        while time.monotonic() - started < 60 and proc.poll() is None:
            result = subprocess.run(["busctl", f"--address={self.env['DBUS_SESSION_BUS_ADDRESS']}", "--json=short",
                                     "call", aggregate, "/System/NrOfBatteries", "com.victronenergy.BusItem",
                                     "GetValue"], capture_output=True, text=True)
            if result.returncode == 0 and json.loads(result.stdout)["data"][0]["data"] == self.members:
                return time.monotonic() - started
            time.sleep(0.02)
        raise RuntimeError(f"the daemon did not count every member within 60 s (exit status {proc.poll()})")


def run(scenario: str, duration: float, library: str = "dbus-next", profile: str | None = None) -> dict[str, Any]:
    """Our daemon alone in one sitting (the regression test's form)."""
    with Sitting(scenario, duration) as sitting:
        return sitting.measure(_ours(scenario, library), profile)


def _ours(scenario: str, library: str) -> Ours:
    return Ours(library, features=scenario == "features")


def median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over rounds (the machine's speed drifts; a round is one run of each daemon)."""
    if len(results) == 1:
        return results[0]
    merged = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            middle = statistics.median(r[key] for r in results)
            merged[key] = round(middle) if type(value) is int else round(middle, 4)
        elif key == "latency_ms":
            merged[key] = {k: statistics.median(r[key][k] for r in results) if value[k] is not None else None
                           for k in value}
    merged["rounds"] = len(results)
    return merged


def compare(scenarios: tuple[str, ...], duration: float, library: str, reference: Reference | None,
            rounds: int, profile: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "scenarios": {}}
    if reference is not None:
        out["reference"] = f"BatteryAggregator from {reference.home} on {reference.python}: {reference.describe}"
    for scenario in scenarios:
        with Sitting(scenario, duration) as sitting:
            ours: list[dict[str, Any]] = []
            theirs: list[dict[str, Any]] = []
            for _ in range(rounds):
                ours.append(sitting.measure(_ours(scenario, library), profile))
                if reference is not None and scenario != "features":
                    theirs.append(sitting.measure(reference))
        entry: dict[str, Any] = {"ours": median_result(ours)}
        if theirs:
            entry["reference"] = median_result(theirs)
            entry["ratio"] = ratios(entry["ours"], entry["reference"])
        out["scenarios"][scenario] = entry
    if "features" in out["scenarios"] and "a" in out["scenarios"]:
        alone = out["scenarios"]["a"]["ours"]["cpu_s_per_1000_updates"]
        every = out["scenarios"]["features"]["ours"]["cpu_s_per_1000_updates"]
        out["features_over_alone"] = round(every / alone, 2) if alone and every else None
    return out


def features_paired(duration: float, library: str, rounds: int, profile: str | None,
                    only: tuple[str, ...] = FEATURES) -> dict[str, Any]:
    """The daemon alone (scenario a's config) and with every side feature, in turns on one bank in one sitting;
    the order alternates by round. The ratio is the median of the rounds' ratios."""
    alone: list[dict[str, Any]] = []
    every: list[dict[str, Any]] = []
    with Sitting("features", duration) as sitting:
        for i in range(rounds):
            pair = [(alone, Ours(library)), (every, Ours(library, features=True, only=only))]
            for results, daemon in (pair if i % 2 == 0 else pair[::-1]):
                results.append(sitting.measure(daemon, profile if daemon.features else None))
    for r in alone:
        r["scenario"] = "a"
    per_round = [round(e["cpu_s_per_1000_updates"] / a["cpu_s_per_1000_updates"], 3)
                 for a, e in zip(alone, every) if a["cpu_s_per_1000_updates"] and e["cpu_s_per_1000_updates"]]
    return {"machine": machine(), "scenarios": {"a": {"ours": median_result(alone)},
                                                "features": {"ours": median_result(every)}},
            "features_over_alone": round(statistics.median(per_round), 2) if per_round else None,
            "features_over_alone_rounds": per_round}


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    return {"cpu_s_per_1000_updates": ratio(ours["cpu_s_per_1000_updates"], theirs["cpu_s_per_1000_updates"]),
            "cpu_percent_of_one_core": ratio(ours["cpu_percent_of_one_core"], theirs["cpu_percent_of_one_core"]),
            "latency_median": ratio(ours["latency_ms"]["median"], theirs["latency_ms"]["median"]),
            "latency_p99": ratio(ours["latency_ms"]["p99"], theirs["latency_ms"]["p99"]),
            "rss_mib": ratio(ours["rss_mib"], theirs["rss_mib"]), "startup_s": ratio(ours["startup_s"],
                                                                                     theirs["startup_s"])}


# ---- what each import costs --------------------------------------------------------------------------------

# What the service loads for a plain config (the daemon: host.daemon), and what a config may add.
IMPORTS = ("asyncio", "dbus_next", "pydantic", "jsonschema", "numpy", "aiomqtt", "ssl", "aggregator.bus.lib",
           "aggregator.config", "aggregator.battery.service", "aggregator.host.daemon",
           "aggregator.features.dispatcher.runtime", "aggregator.features.coop.runtime")


def import_costs(modules: tuple[str, ...] = IMPORTS) -> list[dict[str, Any]]:
    """Each module imported alone in a fresh interpreter: wall time and the RSS it adds to a bare python."""
    code = ("import resource, sys, time; r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "t0 = time.perf_counter();"
            "{imp}; t1 = time.perf_counter(); import json, os;"
            "rss = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]);"
            "print(json.dumps({{'ms': 1000 * (t1 - t0), 'rss_kib': rss, 'loaded': sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('numpy', 'pydantic', 'aiomqtt', 'paho', 'jsonschema', 'dbus_next', 'dbus_fast', "
            "'ssl'))}}))")
    rows = []
    bare = json.loads(subprocess.run([sys.executable, "-c", code.format(imp="pass")], capture_output=True, text=True,
                                     cwd=REPO, check=True).stdout)["rss_kib"]
    for module in modules:
        done = subprocess.run([sys.executable, "-c", code.format(imp=f"import {module}")], capture_output=True,
                              text=True, cwd=REPO)
        if done.returncode != 0:
            rows.append({"module": module, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        r = json.loads(done.stdout)
        heavy = sorted({m.split(".")[0] for m in r["loaded"]})
        rows.append({"module": module, "ms": round(r["ms"], 1), "rss_mib": round((r["rss_kib"] - bare) / 1024, 1),
                     "heavy": heavy})
    rows.append({"module": "(bare python)", "rss_mib": round(bare / 1024, 1)})
    return rows


# ---- output --------------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_single(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    per_update = f"{r['cpu_s_per_1000_updates']:.3f} CPU-s per 1000 member updates (" \
        if r["cpu_s_per_1000_updates"] is not None else "("
    return "\n".join([
        f"machine: {r['machine']}; daemon {r['daemon']} on {r['library']}",
        f"scenario {r['scenario']}: {r['members']} members x {r['rate_hz']:g} Hz"
        f"{' (burst: all at once)' if r['burst'] else ''}, {r['duration_s']} s, {r['member_updates']} member updates",
        f"daemon: {per_update}{r['cpu_percent_of_one_core']:.2f}% of one core, "
        f"{_fmt(r['system_share'], 2)} in the kernel), RSS {r['rss_mib']} MiB, start-up with {r['members']} members "
        f"{r['startup_s']} s; {_fmt(r['wakeups_per_update'], 2)} wake-ups per update ({r['wakeups_per_s']}/s)",
        f"latency member update -> aggregate seen by a client: median {lat['median']} ms, p99 {lat['p99']} ms, "
        f"max {lat['max']} ms ({r['probe_updates_seen']} probe updates seen)",
    ])


_ROWS = (("CPU-s / 1000 member updates", lambda r: _fmt(r["cpu_s_per_1000_updates"])),
         ("CPU, % of one core", lambda r: _fmt(r["cpu_percent_of_one_core"], 2)),
         ("wake-ups per update (per s)", lambda r: f"{_fmt(r['wakeups_per_update'], 2)} ({r['wakeups_per_s']})"),
         ("latency median / p99 / max ms", lambda r: " / ".join(_fmt(r["latency_ms"][k], 1)
                                                                for k in ("median", "p99", "max"))),
         ("RSS MiB", lambda r: _fmt(r["rss_mib"], 1)),
         ("start-up s", lambda r: _fmt(r["startup_s"], 2)))


def format_comparison(out: dict[str, Any]) -> str:
    lines = [f"machine: {out['machine']}"]
    if "reference" in out:
        lines.append(f"reference: {out['reference']}")
    for scenario, entry in out["scenarios"].items():
        ours = entry["ours"]
        lines.append("")
        lines.append(f"scenario {scenario}: {ours['members']} members x {ours['rate_hz']:g} Hz"
                     f"{' (burst)' if ours['burst'] else ''}{', every side feature' if scenario == 'features' else ''}"
                     f", {ours['duration_s']} s, {ours['member_updates']} member updates"
                     f"{', median of %d rounds' % ours['rounds'] if ours.get('rounds') else ''}")
        theirs = entry.get("reference")
        header = f"  {'':32}{'ours':>24}" + (f"{'BatteryAggregator':>24}{'ratio':>8}" if theirs else "")
        lines.append(header)
        ratio_keys = ("cpu_s_per_1000_updates", "cpu_percent_of_one_core", None, "latency_p99", "rss_mib",
                      "startup_s")
        for (name, cell), key in zip(_ROWS, ratio_keys):
            row = f"  {name:32}{cell(ours):>24}"
            if theirs:
                ratio = entry["ratio"].get(key) if key else None
                row += f"{cell(theirs):>24}{_fmt(ratio, 2):>8}"
            lines.append(row)
        for r in (ours, theirs):
            if r is not None and not r["alive"]:
                lines.append(f"  !! {r['daemon']} was not running at the end; its log ended with:")
                lines.extend(f"     {line}" for line in r.get("log_tail", []))
    if out.get("features_over_alone") is not None:
        lines.append("")
        rounds = out.get("features_over_alone_rounds")
        lines.append(f"every side feature / the aggregate alone at 16 x 2 Hz: {out['features_over_alone']:.2f}x CPU"
                     + (f" (median of the rounds' ratios {', '.join(f'{r:.2f}' for r in rounds)})" if rounds else ""))
    return "\n".join(lines)


def format_imports(rows: list[dict[str, Any]]) -> str:
    lines = ["what each import costs alone (fresh interpreter; RSS added to a bare python):"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['module']:32} not importable: {r['error']}")
        elif "ms" not in r:
            lines.append(f"  {r['module']:32} {r['rss_mib']:6.1f} MiB")
        else:
            lines.append(f"  {r['module']:32} {r['rss_mib']:6.1f} MiB {r['ms']:7.1f} ms   "
                         f"loads: {', '.join(r['heavy'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS) + sorted(GROUPS) + [PAIRED], default="a")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--library", choices=["dbus-next", "dbus-fast"], default="dbus-next",
                        help="the D-Bus library our daemon runs on")
    parser.add_argument("--reference", metavar="DIR", help="also run BatteryAggregator from DIR (battery_service.py "
                        "and its modules, velib_python in DIR/ext) in the same sitting, and compare")
    parser.add_argument("--reference-python", default="/usr/bin/python3", help="a python with dbus-python and gi")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the daemons this often; medians")
    parser.add_argument("--imports", action="store_true", help="also measure what each import costs")
    parser.add_argument("--write-baseline", action="store_true",
                        help=f"record this run as the regression baseline ({BASELINE.relative_to(REPO)})")
    parser.add_argument("--profile", metavar="FILE", help="sample our daemon with py-spy while it is measured; "
                        "collapsed stacks to FILE")
    parser.add_argument("--features", metavar="KEYS", help=f"a+features: only these side features, by their config "
                        f"keys, comma-separated (default all: {','.join(FEATURES)})")
    parser.add_argument("--role", choices=["publisher", "probe"], help=argparse.SUPPRESS)
    parser.add_argument("--aggregate", default=AGGREGATE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "publisher":
        members, rate, burst = SCENARIOS[args.scenario]
        asyncio.run(publisher(members, rate, burst, args.duration))
        return 0
    if args.role == "probe":
        asyncio.run(probe(args.aggregate))
        return 0
    reference = Reference(args.reference, args.reference_python) if args.reference else None
    if args.scenario == PAIRED:
        out = features_paired(args.duration, args.library, max(1, args.rounds), args.profile,
                              tuple(args.features.split(",")) if args.features else FEATURES)
        print(json.dumps(out, indent=1) if args.json else format_comparison(out))
    elif args.scenario not in GROUPS and reference is None and args.rounds == 1:
        r = run(args.scenario, args.duration, args.library, args.profile)
        if args.write_baseline:
            write_baseline(r, args.duration)
        print(json.dumps(r, indent=1) if args.json else format_single(r))
    else:
        scenarios = GROUPS.get(args.scenario, (args.scenario,))
        out = compare(scenarios, args.duration, args.library, reference, max(1, args.rounds), args.profile)
        print(json.dumps(out, indent=1) if args.json else format_comparison(out))
    if args.imports:
        rows = import_costs()
        print(json.dumps(rows, indent=1) if args.json else "\n" + format_imports(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
