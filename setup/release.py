#!/usr/bin/env python3
"""Build the GX release archives of battery-aggregator.

    python setup/release.py [--out DIR] [--skip-download] [--arch armv7l,aarch64] [--python-version 3.12]

Writes, in DIR (default dist/):

* ``battery-aggregator-<version>.tar.gz``: one directory ``battery-aggregator-<version>/`` with the package
  source (``aggregator/`` without its tests), ``setup/`` (install.sh, uninstall.sh, the default config, the
  SetupHelper files), ``config_generator/``, ``check_config.sh``, ``README.md``, ``config.schema.json``,
  ``pyproject.toml`` and ``wheels/``: the dependencies as wheels for the GX's Python (3.12 on Venus OS v3.60+)
  on 32-bit (armv7l) and 64-bit (aarch64) ARM, so ``setup/install.sh`` needs no internet. dbus-next and the
  pure parts of jsonschema and pydantic are platform-independent wheels; pydantic-core and rpds-py are
  compiled, so their manylinux wheels are fetched per CPU. numpy is optional (it has no 32-bit ARM wheel: the
  IR estimator is off there). ``wheels/FETCHED.txt`` and the output say what could not be fetched.
* ``BatteryAggregator-<version>.tar.gz``: the same release as a SetupHelper package: ``BatteryAggregator/``
  with ``setup``, ``version`` and ``firstCompatibleVersion`` at the top and the release under ``release/``.

The version comes from ``aggregator/__init__.py``. Only the standard library is used; wheels are fetched by
running ``pip download`` (``--skip-download`` builds the archives without wheels).
"""
from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
NAME = "battery-aggregator"
PACKAGE_NAME = "BatteryAggregator"  # SetupHelper package name (no spaces), as /data/setupOptions/BatteryAggregator
REQUIRED = ["dbus-next>=0.2.3", "pydantic>=2.5", "jsonschema>=4.17"]
OPTIONAL = ["numpy>=1.24", "aiomqtt>=2.0"]  # aiomqtt (and paho-mqtt): pure Python, for the MQTT features
PLATFORMS = {
    "armv7l": ["manylinux2014_armv7l", "manylinux_2_17_armv7l"],
    "aarch64": ["manylinux2014_aarch64", "manylinux_2_17_aarch64"],
}
TOP_FILES = ["check_config.sh", "README.md", "config.schema.json", "pyproject.toml", "LICENSE"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".hypothesis")


def project_version(project: Path = PROJECT) -> str:
    text = (project / "aggregator" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if not match:
        raise SystemExit("no __version__ in aggregator/__init__.py")
    return match.group(1)


def stage_release(project: Path, dest: Path, version: str) -> None:
    """Copy what a GX install needs into dest (the release directory)."""
    dest.mkdir(parents=True)
    shutil.copytree(project / "aggregator", dest / "aggregator",
                    ignore=shutil.ignore_patterns("tests", "__pycache__", "*.pyc", "*.pyo"))
    shutil.copytree(project / "setup", dest / "setup", ignore=IGNORE)
    (dest / "setup" / "setuphelper" / "version").write_text(f"v{version}\n", encoding="utf-8")
    if (project / "config_generator").is_dir():
        shutil.copytree(project / "config_generator", dest / "config_generator", ignore=IGNORE)
    for name in TOP_FILES:
        if (project / name).is_file():
            shutil.copy2(project / name, dest / name)
    (dest / "wheels").mkdir()


def pip_download(wheels: Path, requirements: list[str], platforms: list[str] | None, python_version: str,
                 timeout: float) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "-q",
           "--dest", str(wheels), "--only-binary=:all:"]
    if platforms:
        cmd += ["--python-version", python_version, "--implementation", "cp",
                "--abi", "cp" + python_version.replace(".", ""), "--abi", "abi3", "--abi", "none"]
        for platform in platforms:
            cmd += ["--platform", platform]
    cmd += requirements
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pip download timed out after {timeout:.0f} s"
    except OSError as exc:
        return False, str(exc)
    lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
    return proc.returncode == 0, (lines[-1] if lines else "")


def fetch_wheels(wheels: Path, arches: list[str], python_version: str, timeout: float) -> list[str]:
    """Download the wheels for every CPU; return the lines of the report (what was and was not fetched)."""
    report: list[str] = []
    for arch in arches:
        platforms = PLATFORMS[arch]
        ok, why = pip_download(wheels, REQUIRED, platforms, python_version, timeout)
        if ok:
            report.append(f"{arch}: required dependencies fetched ({', '.join(REQUIRED)})")
        else:
            # Find which ones fail, and keep what can be fetched.
            for req in REQUIRED:
                ok1, why1 = pip_download(wheels, [req], platforms, python_version, timeout)
                if ok1:
                    report.append(f"{arch}: {req} fetched")
                else:
                    report.append(f"{arch}: COULD NOT FETCH {req} ({why1 or why}); install.sh on such a GX "
                                  f"needs internet for it")
        for req in OPTIONAL:
            ok1, why1 = pip_download(wheels, [req], platforms, python_version, timeout)
            if ok1:
                report.append(f"{arch}: optional {req} fetched")
            else:
                off = "the IR estimator" if req.startswith("numpy") else "MQTT (dispatcher adapters, cooperative)"
                report.append(f"{arch}: optional {req} not available ({why1}); {off} is off there")
    names = sorted(p.name for p in wheels.glob("*.whl"))
    cores = [n for n in names if n.startswith(("pydantic_core-", "pydantic-core-"))]
    report.append("pydantic's own wheel is pure Python; pydantic-core is compiled: "
                  + (f"fetched {', '.join(cores)}" if cores else "NO pydantic-core wheel was fetched"))
    compiled = [n for n in names if not n.endswith("-none-any.whl")]
    report.append("platform wheels (per CPU): " + (", ".join(compiled) if compiled else "none"))
    return report


def add_tree(tar: tarfile.TarFile, src: Path, arcname: str) -> None:
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    tar.add(src, arcname=arcname, filter=clean)


def build(out: Path, skip_download: bool, arches: list[str], python_version: str, timeout: float,
          project: Path = PROJECT) -> list[Path]:
    version = project_version(project)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ba-release-") as tmp:
        release = Path(tmp) / f"{NAME}-{version}"
        stage_release(project, release, version)
        wheels = release / "wheels"
        if skip_download:
            report = ["downloads skipped (--skip-download): setup/install.sh will use PyPI"]
        else:
            report = fetch_wheels(wheels, arches, python_version, timeout)
        fetched = sorted(p.name for p in wheels.glob("*.whl"))
        (wheels / "FETCHED.txt").write_text(
            "\n".join(report + ["", "wheels:"] + fetched) + "\n", encoding="utf-8")

        archive = out / f"{NAME}-{version}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            add_tree(tar, release, release.name)

        helper_archive = out / f"{PACKAGE_NAME}-{version}.tar.gz"
        with tarfile.open(helper_archive, "w:gz") as tar:
            for name in ("setup", "version", "firstCompatibleVersion"):
                add_tree(tar, release / "setup" / "setuphelper" / name, f"{PACKAGE_NAME}/{name}")
            add_tree(tar, release, f"{PACKAGE_NAME}/release")

    for line in report:
        print(line)
    print(f"{len(fetched)} wheels in wheels/")
    print(f"built {archive}")
    print(f"built {helper_archive} (SetupHelper package)")
    return [archive, helper_archive]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "dist", help="output directory (default dist/)")
    parser.add_argument("--skip-download", action="store_true", help="no wheels (no network)")
    parser.add_argument("--arch", default="armv7l,aarch64", help="CPUs to fetch wheels for (default armv7l,aarch64)")
    parser.add_argument("--python-version", default="3.12", help="the GX's Python (default 3.12, Venus OS v3.60+)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per pip download")
    args = parser.parse_args(argv)
    arches = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in arches if a not in PLATFORMS]
    if unknown:
        parser.error(f"unknown --arch {', '.join(unknown)} (known: {', '.join(PLATFORMS)})")
    build(args.out, args.skip_download, arches, args.python_version, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
