#!/usr/bin/env python3
"""The ARM check (`./run.sh gx-check`): install the release as a GX would, without pip or network, on 32-bit
(armhf) and 64-bit (arm64) ARM, and read the aggregate it publishes over D-Bus.

For each CPU: a Debian bookworm root (Python 3.11, no pip; --suite trixie: 3.13) made by debootstrap and run under qemu-user-static,
cached in ~/.cache/battery-aggregator/gx-roots (the first run takes about 15 minutes; later ones reuse it).
In it: the release built here is unpacked and setup/install.sh run; the root's own dbus-daemon is started; a
simulated bank (three packs, run on this machine by `battery-aggregator simulate`) joins that bus; the
installed service starts from its run script; and the aggregate is read over the bus twice: by dbus-send here and
by `battery-aggregator status` inside the root. check_config.sh runs from the unpacked release there too.
--firmware-update trixie then moves the installed /data into a trixie root (Python 3.13), as a firmware update
with another Python would leave it, runs the boot check there (it repairs the dependencies from the bundle,
offline) and reads the aggregate again.

The release is the default one (Python 3.11, 3.12 and 3.13, armv7l and aarch64): the wheels for 3.12 (Venus OS
v3.60+) and 3.13 cannot run here, so their tags are checked instead (every target has all its wheels, each built
for its CPU and CPython).

Needs root (chroot, debootstrap) and Debian's qemu-user-static, debootstrap and binfmt-support (installed with
apt when missing). Exit status 0 when every step passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "battery-aggregator"
SUITES = ("bookworm", "trixie")  # Python 3.11 and 3.13 (no Debian release has 3.12, Venus OS v3.60's)
ROOTS = {"armhf": ("armv7l", "qemu-arm"), "arm64": ("aarch64", "qemu-aarch64")}
SERVICE = "com.victronenergy.battery.aggregator"
PACKS = 3
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=/run/gx-check/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
  <allow own="*"/><allow user="*"/></policy>
</busconfig>
"""

T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {text}", flush=True)


class CheckFailed(Exception):
    pass


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def need_tools() -> None:
    missing = [pkg for tool, pkg in (("qemu-arm-static", "qemu-user-static"), ("debootstrap", "debootstrap"),
                                     ("update-binfmts", "binfmt-support"), ("dbus-send", "dbus-bin"))
               if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if missing:
        say(f"installing with apt: {' '.join(missing)}")
        run(["apt-get", "update", "-qq"])
        proc = run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if proc.returncode:
            raise CheckFailed(f"apt-get install {' '.join(missing)} failed: {proc.stderr[-500:]}")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    for _, (_, name) in ROOTS.items():
        if not (binfmt / name).exists():
            run(["update-binfmts", "--enable", name])
        if not (binfmt / name).exists():
            raise CheckFailed(f"binfmt_misc has no {name}: this machine cannot run ARM binaries")


def debian_root(suite: str, arch: str) -> Path:
    """The cached root for arch, made once (minbase + python3 + dbus-daemon: no pip)."""
    root = CACHE / "gx-roots" / f"{suite}-{arch}"
    if (root / "usr/bin/python3").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    say(f"debootstrap {suite} {arch} into {root} (once; about 10 minutes)")
    proc = run(["debootstrap", f"--arch={arch}", "--variant=minbase", "--include=python3,dbus-daemon", suite,
                str(tmp), "http://deb.debian.org/debian"], timeout=3600)
    if proc.returncode:
        raise CheckFailed(f"debootstrap {arch} failed: {proc.stdout[-800:]}{proc.stderr[-800:]}")
    tmp.rename(root)
    return root


def chroot(root: Path, script: str, timeout: float = 600, env: dict[str, str] | None = None):
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
    return subprocess.run(["chroot", str(root), "/bin/sh", "-c", script], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def build_release(out: Path) -> Path:
    say("building the release (setup/release.py, default targets)")
    proc = run([sys.executable, str(PROJECT / "setup/release.py"), "--out", str(out)], timeout=1800)
    if proc.returncode:
        raise CheckFailed(f"release.py failed:\n{proc.stdout}\n{proc.stderr}")
    archive = next(out.glob("battery-aggregator-*.tar.gz"))
    say(f"built {archive.name} ({archive.stat().st_size / 1e6:.1f} MB)")
    return archive


def check_wheel_tags(archive: Path) -> list[str]:
    """Every target of the bundle: all its wheels present, each compiled one for its CPython and CPU."""
    lines = []
    with tarfile.open(archive) as tar:
        names = set(Path(n).name for n in tar.getnames() if n.endswith(".whl"))
        manifest = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("targets.json"))))
    for key, entry in sorted(manifest["targets"].items()):
        cp, arch = key.split("-", 1)
        wheels = entry["required"] + [w for group in entry["optional"].values() for w in group]
        missing = [w for w in wheels if w not in names]
        wrong = [w for w in wheels if not w.endswith("-none-any.whl")
                 and not (f"-{cp}-" in w and re.search(rf"manylinux[_0-9]*_{arch}\b", w))]
        core = [w for w in entry["required"] if w.startswith("pydantic_core-")]
        if missing or wrong or len(core) != 1:
            raise CheckFailed(f"{key}: missing {missing}, wrong tags {wrong}, pydantic-core {core}")
        lines.append(f"{key}: {len(wheels)} wheels, {core[0]}"
                     + (f", optional {', '.join(sorted(entry['optional']))}" if entry["optional"] else ""))
    for key in ("cp312-armv7l", "cp312-aarch64"):
        if key not in manifest["targets"]:
            raise CheckFailed(f"the release has no {key} (Venus OS v3.60+)")
    return lines


def reset_root(root: Path) -> None:
    for sub in ("data", "service", "var/log/battery-aggregator", "run/gx-check", "tmp/release"):
        shutil.rmtree(root / sub, ignore_errors=True)


def bus_value(address: str, path: str) -> str | None:
    proc = run(["dbus-send", f"--bus={address}", "--print-reply=literal", "--reply-timeout=5000",
                f"--dest={SERVICE}", path, "com.victronenergy.BusItem.GetValue"], timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else None


def wait_for(what: str, probe, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")


def check_root(suite: str, arch: str, archive: Path, firmware_update: str | None = None) -> None:
    machine, _ = ROOTS[arch]
    root = debian_root(suite, arch)
    reset_root(root)
    out = chroot(root, "uname -m; python3 -c 'import sys; print(sys.version.split()[0])'; "
                       "python3 -m pip --version >/dev/null 2>&1 && echo pip || echo no-pip")
    got = out.stdout.split()
    say(f"{arch}: root {root.name}: {' '.join(got)}")
    if got[:1] != [machine] or "no-pip" not in got:
        raise CheckFailed(f"{arch}: expected {machine} without pip, got {got}")
    expected_lib = "cp" + "".join(got[1].split(".")[:2]) + "-" + machine

    (root / "tmp/release").mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root / "tmp/release", filter="data")
    release = "/tmp/release/" + archive.name[:-len(".tar.gz")]
    proc = chroot(root, f"{release}/setup/install.sh --no-start", timeout=900)
    if proc.returncode:
        raise CheckFailed(f"{arch}: install.sh exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    status = (root / "data/battery-aggregator/STATUS").read_text().strip()
    lib = os.readlink(root / "data/battery-aggregator/lib/current")
    link = os.readlink(root / "service/battery-aggregator")
    say(f"{arch}: install.sh: exit 0, lib/current -> {lib}, /service/battery-aggregator -> {link}")
    optional = [line for line in proc.stdout.splitlines() if line.startswith("optional")]
    say(f"{arch}: {'; '.join(optional) or 'no optional packages'}")
    if not status.startswith("OK") or lib != expected_lib:
        raise CheckFailed(f"{arch}: STATUS {status!r}, lib {lib}")

    proc = chroot(root, f"cd {release} && ./check_config.sh; "
                        "cd / && echo '{\"currentRatioMethod\": \"ir\"}' > /tmp/ir.json && "
                        "/data/battery-aggregator/check_config.sh /tmp/ir.json")
    checked = proc.stdout.strip().splitlines()
    say(f"{arch}: check_config.sh (in the unpacked release): {checked[0] if checked else proc.stderr.strip()}; "
        "with ir: "
        f"{checked[1][:70] + '...' if len(checked) > 1 else ''}")
    if not checked or checked[0] != "OK":
        raise CheckFailed(f"{arch}: check_config.sh: {proc.stdout}{proc.stderr}")

    serve_and_read(root, arch)
    if firmware_update:
        carry_over(root, arch, firmware_update)
    reset_root(root)


def carry_over(old_root: Path, arch: str, suite: str) -> None:
    """A firmware update that brings another Python: the same /data under another root, then the boot check."""
    machine, _ = ROOTS[arch]
    root = debian_root(suite, arch)
    reset_root(root)
    shutil.copytree(old_root / "data", root / "data", symlinks=True)
    version = chroot(root, "python3 -c 'import sys; print(\"%d%d\" % sys.version_info[:2])'").stdout.strip()
    say(f"{arch}: firmware update: the installed /data moved to a {suite} root (Python {version[0]}.{version[1:]}); "
        "no /service link, no network")
    proc = chroot(root, "/data/battery-aggregator/setup/boot.sh", timeout=900)
    lib = os.readlink(root / "data/battery-aggregator/lib/current")
    say(f"{arch}: boot.sh: exit {proc.returncode}, lib/current -> {lib}, "
        f"STATUS {(root / 'data/battery-aggregator/STATUS').read_text().split(' (')[0]}")
    if proc.returncode or lib != f"cp{version}-{machine}" or not (root / "service/battery-aggregator").is_symlink():
        raise CheckFailed(f"{arch}: the boot check after the update failed:\n{proc.stdout}\n{proc.stderr}")
    serve_and_read(root, arch)
    reset_root(root)


def serve_and_read(root: Path, arch: str) -> None:
    """The root's dbus-daemon, a simulated bank from here, the installed service; the aggregate read back."""
    (root / "run/gx-check").mkdir(parents=True)
    (root / "run/gx-check/bus.conf").write_text(BUS_CONF)
    address = f"unix:path={root}/run/gx-check/bus"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(["chroot", str(root), "dbus-daemon", "--config-file=/run/gx-check/bus.conf",
                                       "--nofork"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        wait_for("the root's dbus-daemon", lambda: (root / "run/gx-check/bus").exists(), 60)
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
        procs.append(subprocess.Popen([sys.executable, "-m", "aggregator", "simulate", "default", "--packs",
                                       str(PACKS)], env=env, cwd=PROJECT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        log = root / "run/gx-check/service.log"
        with open(log, "w") as logf:
            procs.append(subprocess.Popen(
                ["chroot", str(root), "/bin/sh", "-c", "exec /service/battery-aggregator/run"],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/gx-check/bus"},
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True))
        started = time.monotonic()
        count = wait_for(f"{SERVICE} with {PACKS} batteries",
                         lambda: (v := bus_value(address, "/System/NrOfBatteries")) and v.split()[-1] == str(PACKS)
                         and v, 300)
        soc = wait_for("a valid /Soc", lambda: (v := bus_value(address, "/Soc")) and "double" in v and v, 60)
        say(f"{arch}: the service on the bus after {time.monotonic() - started:.1f} s: /System/NrOfBatteries "
            f"{count.split()[-1]}, /Soc {soc.split()[-1]}, /Dc/0/Voltage "
            f"{(bus_value(address, '/Dc/0/Voltage') or '?').split()[-1]}")
        proc = chroot(root, f". /data/home/root/.profile; battery-aggregator status --service {SERVICE}",
                      timeout=180, env={"DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/gx-check/bus"})
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode or not lines:
            raise CheckFailed(f"{arch}: battery-aggregator status: {proc.stdout}{proc.stderr}")
        say(f"{arch}: `battery-aggregator status` in the root: {lines[0][:90]}")
        for line in lines[1:9]:
            print(f"           {line[:100]}")
        if procs[-1].poll() is not None:
            raise CheckFailed(f"{arch}: the service exited: {log.read_text()[-2000:]}")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="armhf,arm64", help="Debian roots to check (default armhf,arm64)")
    parser.add_argument("--suite", default="bookworm", choices=SUITES,
                        help="Debian release of the roots: bookworm (Python 3.11, default) or trixie (3.13)")
    parser.add_argument("--release", type=Path, help="an already built battery-aggregator-*.tar.gz")
    parser.add_argument("--firmware-update", choices=SUITES, metavar="SUITE",
                        help="then move the installed /data to a root of SUITE (another Python) and check that the "
                             "boot check repairs it offline, e.g. --firmware-update trixie")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("gx-check needs root (chroot, debootstrap)", file=sys.stderr)
        return 2
    try:
        need_tools()
        with tempfile.TemporaryDirectory(prefix="ba-gx-check-") as tmp:
            archive = args.release or build_release(Path(tmp))
            for line in check_wheel_tags(archive):
                say(f"wheel tags: {line}")
            for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
                check_root(args.suite, arch, archive, args.firmware_update)
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        say(f"FAILED: {exc}")
        return 1
    say("gx-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
