#!/usr/bin/env python3
"""Build the GX release archives of battery-aggregator.

    python setup/release.py [--out DIR] [--skip-download] [--arch armv7l,aarch64] [--python-version 3.11,3.12,3.13]
                            [--numpy-for 3.12] [--github-user USER]

Writes, in DIR (default dist/):

* ``battery-aggregator-<version>.tar.gz``: one directory ``battery-aggregator-<version>/`` with the package
  source (``aggregator/`` without its tests), ``setup/``, ``config_generator/``, ``docs/``, ``check_config.sh``,
  ``README.md``, ``CHANGELOG.md``, ``config.schema.json`` and ``wheels/``: every dependency as a wheel for each
  CPU and CPython asked for, and ``wheels/targets.json``, which lists per target (``cp312-armv7l``, ...) the
  wheels pip resolved for it. The GX installs them without pip or network (setup/wheels.py unpacks them). Pure-Python wheels (dbus-next, pydantic,
  jsonschema and theirs, aiomqtt and paho-mqtt) are stored once; pydantic-core and rpds-py are compiled, one per
  target. numpy is optional and large (no 32-bit ARM wheel exists): it is bundled for the ``--numpy-for``
  Pythons only; elsewhere the IR estimator is off.
* ``BatteryBankAggregator-<version>.tar.gz``: the same release as a SetupHelper/PackageManager package:
  ``BatteryBankAggregator/`` with ``setup``, ``version``, ``firstCompatibleVersion``, ``packageDependencies``,
  ``gitHubInfo`` (with ``--github-user``) and the release under ``release/``.
* ``venus-data.tgz``: that package plus ``rc/post-hook.sh``, for a USB stick or SD card: Venus OS unpacks it into
  /data at boot and the hook installs it (the blind install).

The version comes from ``aggregator/__init__.py``. Only the standard library is used; wheels are fetched by
running ``pip download`` (``--skip-download`` builds the archives without wheels).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
NAME = "battery-aggregator"
# The SetupHelper package name: letters only (PackageManager cuts archive names at the first '-'), and not
# "BatteryAggregator", which is pulquero's package that this one replaces.
PACKAGE_NAME = "BatteryBankAggregator"
REQUIRED = ["dbus-next>=0.2.3", "pydantic>=2.5", "jsonschema>=4.17"]
REQUIRED_MODULES = ["dbus_next", "pydantic", "jsonschema"]
OPTIONAL = {"mqtt": ["aiomqtt>=2.0"], "numpy": ["numpy>=1.24"]}
OPTIONAL_MODULES = {"mqtt": ["aiomqtt"], "numpy": ["numpy"]}
OPTIONAL_OFF = {"mqtt": "the dispatcher's MQTT adapters and the cooperative are off",
                "numpy": "the IR estimator is off (shares fall back to capacity)"}
# Venus OS v3.60+ ships Python 3.12; 3.11 is the oldest the code runs on (and Debian bookworm's, for the ARM
# check); 3.13 is there so that a firmware update to it repairs from the bundle offline.
DEFAULT_PYTHONS = "3.11,3.12,3.13"
DEFAULT_NUMPY_FOR = "3.12"
ARCHES = ("armv7l", "aarch64", "x86_64")
GLIBC_MINORS = (17, 24, 26, 27, 28)  # manylinux_2_x tags accepted (Venus OS v3.60 has glibc 2.39)
TOP_FILES = ["check_config.sh", "README.md", "CHANGELOG.md", "config.schema.json", "pyproject.toml", "LICENSE"]
PACKAGE_FILES = ["setup", "firstCompatibleVersion", "packageDependencies"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".hypothesis")


def platforms(arch: str) -> list[str]:
    return [f"manylinux2014_{arch}"] + [f"manylinux_2_{minor}_{arch}" for minor in GLIBC_MINORS]


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
    shutil.copytree(project / "setup", dest / "setup",  # the ARM check is for this machine, not the GX
                    ignore=shutil.ignore_patterns("gx_check.py", "__pycache__", "*.pyc", "*.pyo"))
    (dest / "setup" / "setuphelper" / "version").write_text(f"v{version}\n", encoding="utf-8")
    for name in ("config_generator", "docs"):
        if (project / name).is_dir():
            shutil.copytree(project / name, dest / name, ignore=IGNORE)
    for name in TOP_FILES:
        if (project / name).is_file():
            shutil.copy2(project / name, dest / name)
    (dest / "VERSION").write_text(version + "\n", encoding="utf-8")
    (dest / "wheels").mkdir()


def pip_download(dest: Path, requirements: list[str], arch: str, python_version: str,
                 timeout: float) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "-q",
           "--dest", str(dest), "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", "--abi", "cp" + python_version.replace(".", ""), "--abi", "abi3",
           "--abi", "none"]
    for platform in platforms(arch):
        cmd += ["--platform", platform]
    cmd += requirements
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pip download timed out after {timeout:.0f} s"
    except OSError as exc:
        return False, str(exc)
    lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines()
             if line.strip() and not line.startswith("WARNING")]
    return proc.returncode == 0, (lines[-1] if lines else "")


def target_key(arch: str, python_version: str) -> str:
    return "cp" + python_version.replace(".", "") + "-" + arch


def fetch_group(wheels: Path, requirements: list[str], arch: str, python_version: str,
                timeout: float) -> tuple[list[str] | None, str]:
    """Download one group for one target; return the wheel names it needs (None and why when it cannot)."""
    with tempfile.TemporaryDirectory(prefix="ba-wheels-") as tmp:
        ok, why = pip_download(Path(tmp), requirements, arch, python_version, timeout)
        if not ok:
            return None, why
        names = sorted(p.name for p in Path(tmp).glob("*.whl"))
        for name in names:
            if not (wheels / name).exists():
                shutil.move(str(Path(tmp) / name), wheels / name)
    return names, ""


def fetch_wheels(wheels: Path, arches: list[str], pythons: list[str], numpy_for: set[str],
                 timeout: float) -> tuple[dict, list[str]]:
    """Download every target's wheels into wheels/; return the manifest and the report's lines."""
    targets: dict[str, dict] = {}
    report: list[str] = []
    for python_version in pythons:
        for arch in arches:
            key = target_key(arch, python_version)
            required, why = fetch_group(wheels, REQUIRED, arch, python_version, timeout)
            if required is None:
                report.append(f"{key}: COULD NOT FETCH the required dependencies ({why}); no bundle for it")
                continue
            entry: dict = {"required": required, "optional": {}, "missing": {}}
            for group, requirements in OPTIONAL.items():
                if group == "numpy" and arch == "armv7l":
                    entry["missing"][group] = "numpy has no wheel for 32-bit ARM"
                    continue
                if group == "numpy" and python_version not in numpy_for:
                    entry["missing"][group] = "not bundled for this Python (release.py --numpy-for)"
                    continue
                names, why = fetch_group(wheels, requirements, arch, python_version, timeout)
                if names is None:
                    entry["missing"][group] = f"no wheel: {why}"
                    report.append(f"{key}: optional {group} not available; {OPTIONAL_OFF[group]} there")
                else:
                    entry["optional"][group] = [n for n in names if n not in required]
            targets[key] = entry
            compiled = [n for n in required if not n.endswith("-none-any.whl")]
            report.append(f"{key}: required fetched (compiled: {', '.join(compiled) or 'none'}); optional: "
                          f"{', '.join(sorted(entry['optional'])) or 'none'}")
    manifest = {"format": 1, "required_modules": REQUIRED_MODULES, "optional_modules": OPTIONAL_MODULES,
                "targets": targets}
    return manifest, report


def add_tree(tar: tarfile.TarFile, src: Path, arcname: str) -> None:
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0 if info.mtime < 0 else info.mtime
        return info

    tar.add(src, arcname=arcname, filter=clean)


def add_package(tar: tarfile.TarFile, release: Path, version: str, github_user: str | None) -> None:
    """The SetupHelper package directory: its files at the top, the release under release/."""
    helper = release / "setup" / "setuphelper"
    for name in PACKAGE_FILES + ["version"]:
        add_tree(tar, helper / name, f"{PACKAGE_NAME}/{name}")
    add_tree(tar, release / "check_config.sh", f"{PACKAGE_NAME}/check_config.sh")
    if github_user:
        with tempfile.TemporaryDirectory() as tmp:
            info = Path(tmp) / "gitHubInfo"
            info.write_text(f"{github_user}:latest\n", encoding="utf-8")
            add_tree(tar, info, f"{PACKAGE_NAME}/gitHubInfo")
    add_tree(tar, release, f"{PACKAGE_NAME}/release")


def build(out: Path, skip_download: bool, arches: list[str], pythons: list[str], numpy_for: set[str],
          timeout: float, github_user: str | None = None, project: Path = PROJECT) -> list[Path]:
    version = project_version(project)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ba-release-") as tmp:
        release = Path(tmp) / f"{NAME}-{version}"
        stage_release(project, release, version)
        wheels = release / "wheels"
        if skip_download:
            manifest = {"format": 1, "required_modules": REQUIRED_MODULES, "optional_modules": OPTIONAL_MODULES,
                        "targets": {}}
            report = ["downloads skipped (--skip-download): the GX must already have the dependencies"]
        else:
            manifest, report = fetch_wheels(wheels, arches, pythons, numpy_for, timeout)
        (wheels / "targets.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        fetched = sorted(p.name for p in wheels.glob("*.whl"))
        (wheels / "FETCHED.txt").write_text("\n".join(report + ["", "wheels:"] + fetched) + "\n", encoding="utf-8")

        archive = out / f"{NAME}-{version}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            add_tree(tar, release, release.name)
        helper_archive = out / f"{PACKAGE_NAME}-{version}.tar.gz"
        with tarfile.open(helper_archive, "w:gz") as tar:
            add_package(tar, release, version, github_user)
        blind = out / "venus-data.tgz"
        with tarfile.open(blind, "w:gz") as tar:
            add_tree(tar, release / "setup" / "setuphelper" / "post-hook.sh", "rc/post-hook.sh")
            add_package(tar, release, version, github_user)

    for line in report:
        print(line)
    print(f"{len(fetched)} wheels in wheels/, targets: {', '.join(sorted(manifest['targets'])) or 'none'}")
    print(f"built {archive}")
    print(f"built {helper_archive} (SetupHelper package)")
    print(f"built {blind} (USB stick / SD card install)")
    return [archive, helper_archive, blind]


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "dist", help="output directory (default dist/)")
    parser.add_argument("--skip-download", action="store_true", help="no wheels (no network)")
    parser.add_argument("--arch", default="armv7l,aarch64",
                        help=f"CPUs to bundle wheels for (default armv7l,aarch64; known: {', '.join(ARCHES)})")
    parser.add_argument("--python-version", default=DEFAULT_PYTHONS,
                        help=f"CPythons to bundle wheels for (default {DEFAULT_PYTHONS})")
    parser.add_argument("--numpy-for", default=DEFAULT_NUMPY_FOR,
                        help=f"CPythons that also get numpy (default {DEFAULT_NUMPY_FOR}; 'all' or 'none')")
    parser.add_argument("--github-user", help="write gitHubInfo (USER:latest) for PackageManager's downloads")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per pip download")
    args = parser.parse_args(argv)
    arches = split(args.arch)
    unknown = [a for a in arches if a not in ARCHES]
    if unknown:
        parser.error(f"unknown --arch {', '.join(unknown)} (known: {', '.join(ARCHES)})")
    pythons = split(args.python_version)
    bad = [p for p in pythons if not re.fullmatch(r"3\.\d+", p) or int(p.split(".")[1]) < 11]
    if bad:
        parser.error(f"--python-version {', '.join(bad)}: battery-aggregator needs CPython >= 3.11")
    numpy_for = set(pythons) if args.numpy_for == "all" else set() if args.numpy_for == "none" \
        else set(split(args.numpy_for))
    build(args.out, args.skip_download, arches, pythons, numpy_for, args.timeout, args.github_user)
    return 0


if __name__ == "__main__":
    sys.exit(main())
