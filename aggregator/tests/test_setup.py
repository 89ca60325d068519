"""The GX installer (setup/install.sh, setup/uninstall.sh, setup/setuphelper, setup/release.py) in a fake root.

A temporary directory stands in for ``/`` (with ``/data``, ``/service``, ``/var/log``); the scripts take it with
``--root``. python3 on the PATH is this venv's Python (or a fake one printing an old version); svc is absent or
a fake that records its calls; pip installs only from a local wheel directory built here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from aggregator import __version__

PROJECT = Path(__file__).resolve().parents[2]
SETUP = PROJECT / "setup"
INSTALL = SETUP / "install.sh"
UNINSTALL = SETUP / "uninstall.sh"
NAME = "battery-aggregator"
CONFIG = "data/setupOptions/BatteryAggregator/config.json"
MARKER = "# battery-aggregator: recreate the service link at boot"


@pytest.fixture
def env(tmp_path):
    """PATH with python3 (this venv's) and the basic tools, but no svc, opkg or pip executables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    e = {k: v for k, v in os.environ.items() if k not in ("ROOT", "PYTHON", "PYTHONPATH", "BA_NO_DEPS",
                                                           "BA_REQUIREMENTS", "BA_OPTIONAL")}
    e["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    e["PIP_NO_INDEX"] = "1"  # never the network, whatever the scripts do
    return e


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def run(script, *args, env, check=True):
    proc = subprocess.run(["sh", str(script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} {args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def install(root, env, *extra, check=True):
    return run(INSTALL, "--root", root, "--no-start", *extra, env=env, check=check)


def uninstall(root, env, *extra):
    return run(UNINSTALL, "--root", root, *extra, env=env)


def rc_lines(root):
    return [line for line in (root / "data/rc.local").read_text().splitlines() if MARKER in line]


def make_wheel(dest: Path, name: str, version: str = "1.0") -> Path:
    """A minimal valid pure-Python wheel (built by hand: no build backend, no network)."""
    dest.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {name!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arc, text in files.items():
            zf.writestr(arc, text)
        zf.writestr(f"{dist}/RECORD", record)
    return path


def test_install_writes_app_service_rclocal_and_config(root, env):
    out = install(root, env, "--no-deps").stdout
    app = root / "data" / NAME
    assert (app / "aggregator" / "__init__.py").is_file()
    assert (app / "aggregator" / "bus").is_dir()
    assert not (app / "aggregator" / "tests").exists()
    assert os.access(app / "check_config.sh", os.X_OK)
    if (PROJECT / "config_generator").is_dir():
        assert (app / "config_generator").is_dir()
    assert "--no-deps" in out

    run_script = (app / "service" / "run").read_text()
    assert run_script.startswith("#!/bin/sh\n")
    assert f"export PYTHONPATH={app}:{app}/lib\n" in run_script
    assert "exec 2>&1\n" in run_script
    assert f". {root}/etc/profile.d/profile.sh" in run_script
    assert re.search(rf"^exec \S*python3 -m aggregator run --config {re.escape(str(root / CONFIG))}$",
                     run_script, re.M)
    log_run = (app / "service" / "log" / "run").read_text()
    assert f"exec multilog t s25000 n4 {root}/var/log/{NAME}\n" in log_run
    for script in (app / "service" / "run", app / "service" / "log" / "run"):
        assert os.access(script, os.X_OK)

    link = root / "service" / NAME
    assert link.is_symlink() and os.readlink(link) == str(app / "service")

    rc = root / "data/rc.local"
    assert rc.read_text().startswith("#!/bin/sh\n")
    assert rc.stat().st_mode & stat.S_IXUSR
    assert len(rc_lines(root)) == 1

    config = root / CONFIG
    assert json.loads(config.read_text())["serviceName"] == "com.victronenergy.battery.aggregator"


def test_default_config_is_valid():
    proc = subprocess.run([sys.executable, "-m", "aggregator", "check", str(SETUP / "config.default.json")],
                          capture_output=True, text=True, cwd=PROJECT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_run_script_starts_the_installed_app(root, env):
    """The run script's PYTHONPATH finds the installed package (checked with the `check` command)."""
    install(root, env, "--no-deps")
    run_script = (root / "data" / NAME / "service" / "run").read_text()
    pythonpath = re.search(r"^export PYTHONPATH=(\S+)$", run_script, re.M).group(1)
    e = dict(env, PYTHONPATH=pythonpath)
    proc = subprocess.run(["python3", "-c", "import aggregator; print(aggregator.__file__)"], env=e,
                          capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.stdout.strip() == str(root / "data" / NAME / "aggregator" / "__init__.py")


def test_install_twice_is_idempotent_and_keeps_config(root, env):
    install(root, env, "--no-deps")
    config = root / CONFIG
    config.write_text('{"capacity": 280}\n')
    state = root / "data" / NAME / "shares.json"  # learned state lives in the app dir (stateDir default)
    state.write_text("{}")
    rc = root / "data/rc.local"
    rc.write_text(rc.read_text() + "echo other-package\n")
    out = install(root, env, "--no-deps")
    assert "config kept" in out.stdout
    assert config.read_text() == '{"capacity": 280}\n'
    assert state.exists()
    assert len(rc_lines(root)) == 1
    assert "echo other-package" in rc.read_text()
    assert out.stderr == ""


def test_rclocal_existing_file_kept_and_line_before_exit(root, env):
    rc = root / "data/rc.local"
    rc.parent.mkdir(parents=True)
    rc.write_text("#!/bin/bash\necho mine\nexit 0\n")
    rc.chmod(0o644)
    install(root, env, "--no-deps")
    install(root, env, "--no-deps")
    lines = rc.read_text().splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1] == "echo mine" and lines[-1] == "exit 0"
    assert sum(MARKER in line for line in lines) == 1
    assert MARKER in lines[-2]
    assert rc.stat().st_mode & stat.S_IXUSR


def test_rclocal_line_recreates_link_after_firmware_update(root, env):
    install(root, env, "--no-deps")
    link = root / "service" / NAME
    shutil.rmtree(root / "service")  # /service is rebuilt at boot: our link is gone
    (root / "service").mkdir()
    assert not link.exists()
    (line,) = rc_lines(root)
    subprocess.run(["sh", "-c", line], check=True, env=env, timeout=30)
    assert link.is_symlink() and os.readlink(link) == str(root / "data" / NAME / "service")
    # and running the whole rc.local (twice, as at two boots) works too
    for _ in range(2):
        subprocess.run(["sh", str(root / "data/rc.local")], check=True, env=env, timeout=30)
    assert link.is_symlink()


def test_uninstall_twice_keeps_config_and_other_rclocal_lines(root, env):
    install(root, env, "--no-deps")
    rc = root / "data/rc.local"
    rc.write_text(rc.read_text() + "echo other-package\n")
    for _ in range(2):
        uninstall(root, env)
    assert not (root / "data" / NAME).exists()
    assert not os.path.lexists(root / "service" / NAME)
    assert rc_lines(root) == []
    text = rc.read_text()
    assert text.startswith("#!/bin/sh\n") and "echo other-package" in text
    assert (root / CONFIG).is_file()


def test_uninstall_purge_removes_config(root, env):
    install(root, env, "--no-deps")
    uninstall(root, env, "--purge")
    uninstall(root, env, "--purge")
    assert not (root / CONFIG).exists()
    assert not (root / CONFIG).parent.exists()
    assert not (root / "data" / NAME).exists()


def test_svc_is_used_when_present(root, env, tmp_path):
    calls = tmp_path / "svc.calls"
    svc = Path(env["PATH"].split(":")[0]) / "svc"
    svc.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 0\n')
    svc.chmod(0o755)
    run(INSTALL, "--root", root, "--no-deps", env=env)
    link = root / "service" / NAME
    assert f"-u {link}" in calls.read_text()
    uninstall(root, env)
    text = calls.read_text()
    assert f"-dx {root}/data/{NAME}/service" in text
    assert f"-dx {root}/data/{NAME}/service/log" in text


def test_no_svc_no_start_never_calls_svc(root, env, tmp_path):
    out = run(INSTALL, "--root", root, "--no-deps", env=env).stdout  # no svc on PATH, no --no-start
    assert "svc (daemontools) not found" in out
    assert "aggregator run --config" in out


def test_refuses_old_python(root, env):
    fake = Path(env["PATH"].split(":")[0]) / "python3"
    fake.unlink()
    fake.write_text("#!/bin/sh\necho 'Python 3.8.13'\n")
    fake.chmod(0o755)
    proc = install(root, env, "--no-deps", check=False)
    assert proc.returncode == 3
    assert "Python 3.8 is too old" in proc.stderr
    assert ">= 3.11" in proc.stderr and "v3.60" in proc.stderr
    assert not (root / "data" / NAME).exists()
    assert not (root / "data/rc.local").exists()


def test_deps_from_local_wheels(root, env, tmp_path):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "tinydep")
    e = dict(env, BA_REQUIREMENTS="tinydep", BA_OPTIONAL="numpy_not_for_this_cpu")
    out = install(root, e, "--wheels", wheels).stdout
    lib = root / "data" / NAME / "lib"
    assert (lib / "tinydep" / "__init__.py").is_file()
    assert "from " + str(wheels) in out
    assert "numpy_not_for_this_cpu" in out and "skipped" in out
    assert "IR estimator is off" in out
    out2 = install(root, e, "--wheels", wheels).stdout  # again: replaced, not duplicated
    assert (lib / "tinydep" / "__init__.py").is_file()
    assert "Python dependencies installed" in out2


def test_deps_missing_fails_clearly_offline(root, env, tmp_path):
    e = dict(env, BA_REQUIREMENTS="tinydep_absent", BA_OPTIONAL="")
    proc = install(root, e, "--wheels", tmp_path / "empty", "--offline", check=False)
    assert proc.returncode == 4
    assert "NOT working yet" in proc.stdout
    assert (root / "service" / NAME).is_symlink()  # files are there: a later run with wheels finishes it


def test_wheels_that_do_not_fit_fall_back_to_the_index(root, env, tmp_path):
    """wheels/ without a fitting wheel: PyPI is tried too (here PIP_NO_INDEX makes that fail, offline)."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "otherdep")
    e = dict(env, BA_REQUIREMENTS="tinydep", BA_OPTIONAL="")
    proc = install(root, e, "--wheels", wheels, check=False)
    assert proc.returncode == 4
    assert "trying PyPI as well" in proc.stdout
    assert "could not install the required dependencies: tinydep" in proc.stderr
    assert not (root / "data" / NAME / "lib").exists()


def test_no_pip_says_what_to_do(root, env, tmp_path):
    fake = Path(env["PATH"].split(":")[0]) / "python3"
    fake.unlink()
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then exit 1; fi\nexec {sys.executable} -S "$@"\n')
    fake.chmod(0o755)
    proc = install(root, env, check=False)
    assert proc.returncode == 4
    assert "opkg install python3-pip" in proc.stderr


def test_setuphelper_package(root, env, tmp_path):
    helper = SETUP / "setuphelper"
    assert (helper / "version").read_text().strip() == f"v{__version__}"
    assert re.fullmatch(r"v\d+\.\d+", (helper / "firstCompatibleVersion").read_text().strip())
    assert os.access(helper / "setup", os.X_OK)
    e = dict(env, ROOT=str(root), BA_NO_DEPS="1", BA_NO_SETUPHELPER="1")
    proc = subprocess.run(["bash", str(helper / "setup"), "install", "auto"], env=e, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "service" / NAME).is_symlink()
    proc = subprocess.run(["bash", str(helper / "setup"), "uninstall", "auto"], env=e, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (root / "data" / NAME).exists()
    # an old Python maps to SetupHelper's "incompatible version"
    fake = Path(env["PATH"].split(":")[0]) / "python3"
    fake.unlink()
    fake.write_text("#!/bin/sh\necho 3.8\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(helper / "setup"), "install"], env=e, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 254


def test_release_archive_members(tmp_path):
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, str(SETUP / "release.py"), "--skip-download", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    top = f"{NAME}-{__version__}"
    archive = out / f"{top}.tar.gz"
    assert archive.is_file()
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for name in ("aggregator/__init__.py", "aggregator/__main__.py", "aggregator/bus", "setup/install.sh",
                 "setup/uninstall.sh", "setup/release.py", "setup/config.default.json", "setup/setuphelper/setup",
                 "setup/setuphelper/version", "check_config.sh", "README.md", "wheels", "wheels/FETCHED.txt"):
        assert f"{top}/{name}" in members, name
    if (PROJECT / "config_generator").is_dir():
        assert f"{top}/config_generator" in members
    assert not any("/tests/" in n or "__pycache__" in n for n in members)
    for name in ("setup/install.sh", "setup/uninstall.sh", "setup/setuphelper/setup", "check_config.sh"):
        assert members[f"{top}/{name}"].mode & 0o111, name
    helper = out / f"BatteryAggregator-{__version__}.tar.gz"
    with tarfile.open(helper) as tar:
        names = set(tar.getnames())
    assert {"BatteryAggregator/setup", "BatteryAggregator/version",
            "BatteryAggregator/release/setup/install.sh"} <= names


def test_release_archive_installs(tmp_path, root, env):
    """The unpacked release installs and uninstalls like the checkout (here without dependencies)."""
    out = tmp_path / "dist"
    subprocess.run([sys.executable, str(SETUP / "release.py"), "--skip-download", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    with tarfile.open(out / f"{NAME}-{__version__}.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    release = tmp_path / "unpacked" / f"{NAME}-{__version__}"
    run(release / "setup/install.sh", "--root", root, "--no-start", "--no-deps", env=env)
    assert (root / "data" / NAME / "aggregator" / "__init__.py").is_file()
    assert (root / CONFIG).is_file()
    run(release / "setup/uninstall.sh", "--root", root, env=env)
    assert not (root / "data" / NAME).exists()
