"""The GX installer (setup/install.sh, boot.sh, uninstall.sh, wheels.py, setuphelper/, release.py) in a fake root.

A temporary directory stands in for ``/`` (with ``/data``, ``/service``, ``/var/log``); the scripts take it with
``--root``. python3 on the PATH is this venv's Python (its site-packages has the dependencies) or a venv made
with ``--without-pip`` (only the standard library: what a GX without pip has); svc is absent or a fake that
records its calls. Wheel bundles are built here by hand (tiny pure wheels), or by release.py for this machine.
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
import tomllib
import zipfile
from pathlib import Path

import pytest

from aggregator import __version__, cli
from aggregator.config import Config

from .helpers import eventually, load_script

PROJECT = Path(__file__).resolve().parents[2]
SETUP = PROJECT / "setup"
INSTALL = SETUP / "install.sh"
UNINSTALL = SETUP / "uninstall.sh"
NAME = "battery-aggregator"
PACKAGE = "BatteryBankAggregator"
OPTIONS = "data/setupOptions/BatteryAggregator"
CONFIG = f"{OPTIONS}/config.json"
STATE = f"{OPTIONS}/state"
MARKER = "# battery-aggregator: boot check"
wheels_py = load_script("setup/wheels.py")
release_py = load_script("setup/release.py")
TARGET = wheels_py.target()


def python_at(path: Path, python) -> None:
    """python3 at path, running `python` (a script, not a link: a venv's Python finds its venv by its own path)."""
    path.unlink(missing_ok=True)
    path.write_text(f'#!/bin/sh\nexec {python} "$@"\n')
    path.chmod(0o755)


@pytest.fixture
def env(tmp_path):
    """PATH with python3 (this venv's) and the basic tools, but no svc, opkg or pip executables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python_at(bin_dir / "python3", sys.executable)
    e = {k: v for k, v in os.environ.items() if k not in ("ROOT", "PYTHON", "PYTHONPATH", "DBUS_SESSION_BUS_ADDRESS")}
    e["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    e["PIP_NO_INDEX"] = "1"  # never the network, whatever the scripts do
    return e


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A Python with the standard library only and no pip, as on a GX without the optional pip package."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python3"
    assert subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode != 0
    assert subprocess.run([python, "-c", "import pydantic"], capture_output=True).returncode != 0
    return python


@pytest.fixture
def bare_env(env, bare_python):
    python_at(Path(env["PATH"].split(":")[0]) / "python3", bare_python)
    return env


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def run(script, *args, env, check=True, timeout=120):
    proc = subprocess.run(["sh", str(script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{Path(script).name} {args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def install(root, env, *extra, check=True, script=INSTALL):
    return run(script, "--root", root, "--no-start", *extra, env=env, check=check)


def uninstall(root, env, *extra):
    return run(UNINSTALL, "--root", root, *extra, env=env)


def app(root) -> Path:
    return root / "data" / NAME


def lines_with(path: Path, text: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if text in line] if path.exists() else []


def make_wheel(dest: Path, name: str, version: str = "1.0", body: str | None = None, data_dir: bool = False) -> str:
    """A minimal valid pure-Python wheel (built by hand: no build backend, no network)."""
    dest.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    prefix = f"{name}-{version}.data/purelib/" if data_dir else ""
    files = {
        f"{prefix}{name}/__init__.py": body if body is not None else f"VALUE = {name!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    filename = f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(dest / filename, "w") as zf:
        for arc, text in files.items():
            zf.writestr(arc, text)
        zf.writestr(f"{dist}/RECORD", record)
    return filename


def make_bundle(dest: Path, targets: dict[str, list[str]], required_modules=("tinydep",), optional=None) -> Path:
    """wheels/ with targets.json as release.py writes it; the wheels themselves are made by make_wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = {"format": 1, "required_modules": list(required_modules), "optional_modules": {"extra": ["extradep"]},
                "targets": {key: {"required": names, "optional": optional or {}, "missing": {}}
                            for key, names in targets.items()}}
    (dest / "targets.json").write_text(json.dumps(manifest))
    return dest


def fake_svc(env, tmp_path) -> Path:
    calls = tmp_path / "svc.calls"
    svc = Path(env["PATH"].split(":")[0]) / "svc"
    svc.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 0\n')
    svc.chmod(0o755)
    return calls


def pulquero(root: Path, setup_log: Path | None = None) -> None:
    """pulquero's BatteryAggregator as SetupHelper installs it: package, service, installed version, config."""
    package = root / "data/BatteryAggregator"
    package.mkdir(parents=True)
    (package / "battery_service.py").write_text("# theirs\n")
    (package / "version").write_text("v3.4\n")
    (package / "gitHubInfo").write_text("pulquero:main")
    if setup_log is not None:
        (package / "setup").write_text(f'#!/bin/sh\necho "$@" >> {setup_log}\n')
        (package / "setup").chmod(0o755)
    (root / "service/BatteryAggregator/log").mkdir(parents=True)
    (root / "service/BatteryAggregator/run").write_text("#!/bin/sh\nexec python3 battery_service.py\n")
    (root / "etc/venus").mkdir(parents=True, exist_ok=True)
    (root / "etc/venus/installedVersion-BatteryAggregator").write_text("v3.4\n")
    (root / OPTIONS).mkdir(parents=True, exist_ok=True)
    (root / CONFIG).write_text('{"capacity": 280, "currentRatioMethod": "capacity"}\n')


# --- install, files and the boot line ---------------------------------------------------------------------------

def test_install_writes_app_command_service_boot_line_and_config(root, env):
    out = install(root, env).stdout
    a = app(root)
    assert (a / "aggregator" / "__init__.py").is_file()
    assert not (a / "aggregator" / "tests").exists()
    assert os.access(a / "check_config.sh", os.X_OK)
    assert os.access(a / "setup" / "boot.sh", os.X_OK) and (a / "setup" / "wheels.py").is_file()
    assert (a / "VERSION").read_text().strip() == __version__
    for doc in ("README.md", "CHANGELOG.md", "docs/configuration.md"):  # the README's links work on the GX too
        assert (a / doc).is_file(), doc
    assert "using the dependencies installed in the system's Python" in out  # no bundle in a checkout

    run_script = (a / "service" / "run").read_text()
    assert run_script.startswith("#!/bin/sh\n") and "exec 2>&1\n" in run_script
    assert f". {root}/etc/profile.d/profile.sh" in run_script
    assert f"exec {a}/bin/{NAME} run --config {root / CONFIG}\n" in run_script
    assert f"exec multilog t s25000 n4 {root}/var/log/{NAME}\n" in (a / "service/log/run").read_text()
    for script in (a / "service/run", a / "service/log/run", a / "bin" / NAME):
        assert os.access(script, os.X_OK)

    link = root / "service" / NAME
    assert link.is_symlink() and os.readlink(link) == str(a / "service")
    assert (a / "STATUS").read_text().startswith("OK")
    assert os.readlink(a / "lib" / "current") == TARGET

    rc = root / "data/rc.local"
    assert rc.read_text().startswith("#!/bin/sh\n") and rc.stat().st_mode & stat.S_IXUSR
    (line,) = lines_with(rc, MARKER)
    assert f"{a}/setup/boot.sh --background" in line
    (path_line,) = lines_with(root / "data/home/root/.profile", MARKER)
    assert f"PATH=$PATH:{a}/bin" in path_line
    assert json.loads((root / CONFIG).read_text())["serviceName"] == "com.victronenergy.battery.aggregator"


def test_default_config_is_valid():
    proc = subprocess.run([sys.executable, "-m", "aggregator", "check", str(SETUP / "config.default.json")],
                          capture_output=True, text=True, cwd=PROJECT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_state_dir_default_is_outside_the_app():
    assert Config().stateDir == "/" + STATE
    assert not Config().stateDir.startswith(f"/data/{NAME}")


def test_installed_command_runs_check_and_energy(root, env, tmp_path):
    install(root, env)
    command = app(root) / "bin" / NAME
    proc = subprocess.run([command, "check", root / CONFIG], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
    proc = subprocess.run([command, "energy", "--state-dir", tmp_path / "state"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "no energy kept" in proc.stdout, proc.stdout + proc.stderr
    # and as a new login shell finds it
    proc = subprocess.run(["sh", "-c", f". {root}/data/home/root/.profile; {NAME} --help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "status" in proc.stdout, proc.stderr


def test_check_config_from_the_package_dir_uses_the_installers_python(root, env, tmp_path):
    """The installer chose PYTHON; check_config.sh in the release or package directory runs the installed app
    with it, not whatever python3 is first on the PATH."""
    used = tmp_path / "python.used"
    chosen = tmp_path / "chosen-python"
    chosen.write_text(f'#!/bin/sh\necho "$@" >> {used}\nexec {sys.executable} "$@"\n')
    chosen.chmod(0o755)
    install(root, dict(env, PYTHON=str(chosen)))
    used.unlink()
    package = tmp_path / "package"
    package.mkdir()
    shutil.copy2(PROJECT / "check_config.sh", package / "check_config.sh")
    proc = subprocess.run([package / "check_config.sh", root / CONFIG], env=dict(env, BA_APP=str(app(root))),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
    assert "-m aggregator check" in used.read_text()


def test_checker_warns_about_ir_without_numpy(tmp_path, monkeypatch, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"currentRatioMethod": "ir"}')
    monkeypatch.setattr(cli, "_installed", lambda module: module != "numpy")
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert 'warning: currentRatioMethod is "ir", but numpy is not installed on this device' in out
    assert out.strip().endswith("OK")
    monkeypatch.setattr(cli, "_installed", lambda module: True)
    assert cli.main(["check", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_device_warnings_name_what_does_not_run():
    config = Config.model_validate({"currentRatioMethod": "share", "coop": {"enabled": True, "siteId": "a",
                                                                            "broker": {"host": "h"}}})
    assert cli.device_warnings(config, lambda m: True) == []
    (warning,) = cli.device_warnings(config, lambda m: m != "aiomqtt")
    assert "coop.enabled" in warning and "aiomqtt" in warning
    assert cli.device_warnings(Config(), lambda m: False) == []  # nothing asked that needs them


def test_install_twice_is_idempotent_and_keeps_config(root, env):
    install(root, env)
    config = root / CONFIG
    config.write_text('{"capacity": 280}\n')
    rc = root / "data/rc.local"
    rc.write_text(rc.read_text() + "echo other-package\n")
    out = install(root, env)
    assert "config kept" in out.stdout
    assert config.read_text() == '{"capacity": 280}\n'
    assert len(lines_with(rc, MARKER)) == 1 and "echo other-package" in rc.read_text()
    assert len(lines_with(root / "data/home/root/.profile", MARKER)) == 1
    assert out.stderr == ""


def test_rclocal_existing_file_kept_and_line_before_exit(root, env):
    rc = root / "data/rc.local"
    rc.parent.mkdir(parents=True)
    rc.write_text("#!/bin/bash\necho mine\nexit 0\n")
    rc.chmod(0o644)
    install(root, env)
    install(root, env)
    lines = rc.read_text().splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1] == "echo mine" and lines[-1] == "exit 0"
    assert sum(MARKER in line for line in lines) == 1 and MARKER in lines[-2]
    assert rc.stat().st_mode & stat.S_IXUSR


async def test_boot_line_relinks_the_service_after_a_reboot(root, env):
    install(root, env)
    link = root / "service" / NAME
    shutil.rmtree(root / "service")  # /service is rebuilt in RAM at boot: our link is gone
    (root / "service").mkdir()
    for _ in range(2):  # two boots
        subprocess.run(["sh", str(root / "data/rc.local")], check=True, env=env, timeout=30)
        await eventually(lambda: link.is_symlink() and not (app(root) / ".boot.lock").exists(), timeout=60)
    assert os.readlink(link) == str(app(root) / "service")
    assert "the service is linked" in (root / f"var/log/{NAME}/boot.log").read_text() or link.is_symlink()


def test_svc_is_used_when_present(root, env, tmp_path):
    calls = fake_svc(env, tmp_path)
    run(INSTALL, "--root", root, env=env)
    assert f"-u {root}/service/{NAME}" in calls.read_text()
    uninstall(root, env)
    text = calls.read_text()
    assert f"-dx {root}/data/{NAME}/service\n" in text and f"-dx {root}/data/{NAME}/service/log\n" in text


def test_refuses_old_python(root, env):
    fake = Path(env["PATH"].split(":")[0]) / "python3"
    fake.unlink()
    fake.write_text("#!/bin/sh\necho 'Python 3.8.13'\n")
    fake.chmod(0o755)
    proc = install(root, env, check=False)
    assert proc.returncode == 3
    assert "Python 3.8 is too old" in proc.stderr and ">= 3.11" in proc.stderr and "v3.60" in proc.stderr
    assert not app(root).exists() and not (root / "data/rc.local").exists()


# --- dependencies without pip ------------------------------------------------------------------------------------

def test_bundle_installs_without_pip_and_the_service_starts(root, bare_env, tmp_path):
    wheels = tmp_path / "wheels"
    make_bundle(wheels, {TARGET: [make_wheel(wheels, "tinydep", data_dir=True)]},
                optional={"extra": [make_wheel(wheels, "extradep")]})
    out = install(root, bare_env, "--wheels", wheels).stdout
    lib = app(root) / "lib" / TARGET
    assert (lib / "tinydep" / "__init__.py").is_file()  # moved up from tinydep-1.0.data/purelib
    assert (lib / "tinydep-1.0.dist-info" / "METADATA").is_file()
    assert not list(lib.glob("*.data"))
    assert (lib / "extradep" / "__init__.py").is_file() and "optional extra: installed" in out
    assert (root / "service" / NAME).is_symlink()
    assert (app(root) / "wheels" / "targets.json").is_file()  # kept for repairs after a firmware update


def test_no_fitting_bundle_leaves_the_service_down_with_a_status_file(root, bare_env, tmp_path, env):
    wheels = tmp_path / "wheels"
    make_bundle(wheels, {"cp399-sparc": [make_wheel(wheels, "tinydep")]})
    proc = install(root, bare_env, "--wheels", wheels, check=False)
    assert proc.returncode == 4
    status = (app(root) / "STATUS").read_text()
    assert status.startswith("NOT RUNNING") and f"no dependencies for this GX ({TARGET}" in status
    assert "setup/release.py --arch" in status
    assert not os.path.lexists(root / "service" / NAME)  # never linked
    assert len(lines_with(root / "data/rc.local", MARKER)) == 1  # the next boot checks again
    # the command says why instead of a traceback
    proc = subprocess.run([app(root) / "bin" / NAME, "status"], env=bare_env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 4 and "NOT RUNNING" in proc.stderr
    # and the run script, if something starts it anyway, waits instead of restarting in a tight loop
    runner = subprocess.Popen([app(root) / "service" / "run"], stdout=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
    try:
        assert "not started: the dependencies are not ready" in runner.stdout.readline()
        with pytest.raises(subprocess.TimeoutExpired):
            runner.wait(timeout=1)
    finally:
        os.killpg(runner.pid, 9)
        runner.wait()


def test_firmware_update_with_another_python_is_repaired_offline_at_boot(root, bare_env, tmp_path):
    """A new Python has no lib directory of its own yet: the boot line unpacks it from the kept bundle."""
    wheels = tmp_path / "wheels"
    make_bundle(wheels, {TARGET: [make_wheel(wheels, "tinydep")]})
    install(root, bare_env, "--wheels", wheels)
    shutil.rmtree(wheels)  # the release is gone; only the app's copy of the bundle is left
    lib = app(root) / "lib"
    shutil.rmtree(lib / TARGET)
    (lib / "current").unlink()
    os.symlink("cp38-armv7l", lib / "current")  # what the old firmware's Python used
    shutil.rmtree(root / "service")
    (root / "service").mkdir()
    proc = subprocess.run([app(root) / "setup" / "boot.sh"], env=bare_env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (lib / TARGET / "tinydep" / "__init__.py").is_file()
    assert os.readlink(lib / "current") == TARGET
    assert (root / "service" / NAME).is_symlink()


def test_update_whose_new_wheels_do_not_import_keeps_the_working_ones(root, bare_env, tmp_path):
    """A failed reinstall never takes down a working install."""
    good = tmp_path / "good"
    make_bundle(good, {TARGET: [make_wheel(good, "tinydep")]})
    install(root, bare_env, "--wheels", good)
    bad = tmp_path / "bad"
    make_bundle(bad, {TARGET: [make_wheel(bad, "tinydep", "2.0", body="raise ImportError('broken build')\n")]})
    out = install(root, bare_env, "--wheels", bad)
    assert "keeping the ones that do" in out.stderr
    assert (app(root) / "lib" / TARGET / "tinydep-1.0.dist-info").is_dir()
    assert (root / "service" / NAME).is_symlink()
    assert (app(root) / "STATUS").read_text().startswith("OK")


def test_release_for_this_machine_installs_without_pip_and_imports(root, bare_env, tmp_path, bare_python):
    """setup/release.py builds for the machine it runs on; a Python without pip installs it and imports all."""
    python_version = "%d.%d" % sys.version_info[:2]
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, SETUP / "release.py", "--arch", os.uname().machine, "--python-version",
                           python_version, "--numpy-for", "none", "--out", out], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(out / f"{NAME}-{__version__}.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    release = tmp_path / "unpacked" / f"{NAME}-{__version__}"
    result = install(root, bare_env, script=release / "setup/install.sh")
    assert "optional mqtt: installed" in result.stdout
    lib = app(root) / "lib" / TARGET
    assert (lib / "pydantic_core").is_dir()
    imports = subprocess.run([bare_python, "-c", "import dbus_next, pydantic, jsonschema, aiomqtt; print('ok')"],
                             env=dict(bare_env, PYTHONPATH=str(lib)), capture_output=True, text=True, timeout=120)
    assert imports.stdout.strip() == "ok", imports.stderr
    check = subprocess.run([app(root) / "check_config.sh", root / CONFIG], env=bare_env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip().endswith("OK"), check.stdout + check.stderr


def test_wheel_with_a_path_outside_the_target_is_refused(tmp_path):
    wheel = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("../outside.py", "x = 1\n")
    with pytest.raises(ValueError, match="unsafe path"):
        wheels_py.unpack_wheel(str(wheel), str(tmp_path / "lib"))
    assert not (tmp_path / "outside.py").exists()


def test_target_names_the_cpu_as_wheels_do(monkeypatch):
    version = "cp%d%d" % sys.version_info[:2]
    for machine, bits, expected in (("armv7l", 4, "armv7l"), ("aarch64", 8, "aarch64"), ("aarch64", 4, "armv7l"),
                                    ("x86_64", 8, "x86_64"), ("AMD64", 8, "x86_64")):
        monkeypatch.setattr(wheels_py.platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(wheels_py.struct, "calcsize", lambda fmt, b=bits: b)
        assert wheels_py.target() == f"{version}-{expected}"


# --- state, uninstall ----------------------------------------------------------------------------------------------

def test_state_in_the_old_app_dir_is_moved_out_on_install(root, env):
    old = app(root)
    (old / "grid" / "meter").mkdir(parents=True)
    (old / "grid" / "meter" / "grid_battery.json").write_text("{}")
    (old / "energy.json").write_text('{"a": 1}')
    (old / "aggregator").mkdir()  # an old install's app: replaced, not moved
    out = install(root, env).stdout
    assert (root / STATE / "energy.json").read_text() == '{"a": 1}'
    assert (root / STATE / "grid" / "meter" / "grid_battery.json").is_file()
    assert not (old / "energy.json").exists()
    assert "learned state moved" in out


def test_state_in_the_app_dir_stays_when_the_config_names_it(root, env):
    (root / OPTIONS).mkdir(parents=True)
    (root / CONFIG).write_text(json.dumps({"stateDir": f"/data/{NAME}"}))
    (app(root)).mkdir(parents=True)
    (app(root) / "energy.json").write_text("{}")
    out = install(root, env).stdout
    assert (app(root) / "energy.json").is_file() and "stateDir" in out
    out = uninstall(root, env).stdout
    assert (app(root) / "energy.json").is_file()  # uninstall removes only what the install put there
    assert f"kept there, as they are not part of it:\n{app(root)}/energy.json" in out


def test_uninstall_keeps_config_and_state_and_says_where(root, env):
    install(root, env)
    (root / STATE).mkdir(parents=True)
    (root / STATE / "energy.json").write_text("{}")
    rc = root / "data/rc.local"
    rc.write_text(rc.read_text() + "echo other-package\n")
    profile = root / "data/home/root/.profile"
    profile.write_text("alias ll='ls -l'\n" + profile.read_text())
    for _ in range(2):
        out = uninstall(root, env).stdout
    assert not app(root).exists() and not os.path.lexists(root / "service" / NAME)
    assert lines_with(rc, MARKER) == [] and "echo other-package" in rc.read_text()
    assert lines_with(profile, MARKER) == [] and "alias ll" in profile.read_text()
    assert (root / CONFIG).is_file() and (root / STATE / "energy.json").is_file()
    assert f"kept the config: {root / CONFIG}" in out
    assert f"kept the learned state (energy totals, shares, grid batteries): {root / STATE}" in out


def test_uninstall_purge_removes_config_state_and_logs(root, env):
    install(root, env)
    (root / STATE).mkdir(parents=True)
    (root / STATE / "energy.json").write_text("{}")
    (root / OPTIONS / "DO_NOT_AUTO_INSTALL").write_text("")  # PackageManager's flag for the old package
    uninstall(root, env, "--purge")
    uninstall(root, env, "--purge")
    assert not (root / CONFIG).exists() and not (root / STATE).exists()
    assert not (root / f"var/log/{NAME}").exists() and not app(root).exists()
    assert (root / OPTIONS / "DO_NOT_AUTO_INSTALL").exists()


# --- pulquero's BatteryAggregator ----------------------------------------------------------------------------------

def test_refuses_to_install_beside_batteryaggregator(root, env):
    pulquero(root)
    proc = install(root, env, check=False)
    assert proc.returncode == 5
    assert "pulquero's BatteryAggregator is installed" in proc.stderr
    assert "--replace-batteryaggregator" in proc.stderr and "com.victronenergy.battery.aggregator" in proc.stderr
    assert not app(root).exists() and not (root / "data/rc.local").exists()
    assert (root / "service/BatteryAggregator").is_dir()


def test_replace_batteryaggregator_keeps_its_config_and_stops_packagemanager(root, env, tmp_path):
    setup_log = tmp_path / "their-setup.log"
    pulquero(root, setup_log)
    config = (root / CONFIG).read_text()
    calls = fake_svc(env, tmp_path)
    out = run(INSTALL, "--root", root, "--replace-batteryaggregator", env=env).stdout
    assert setup_log.read_text().split()[:1] == ["uninstall"]
    assert f"-dx {root}/service/BatteryAggregator\n" in calls.read_text()
    assert not (root / "service/BatteryAggregator").exists() and not (root / "data/BatteryAggregator").exists()
    assert not (root / "etc/venus/installedVersion-BatteryAggregator").exists()
    with tarfile.open(root / OPTIONS / "BatteryAggregator-package.tar.gz") as tar:
        assert "BatteryAggregator/battery_service.py" in tar.getnames()
    for flag in ("DO_NOT_AUTO_INSTALL", "DO_NOT_AUTO_ADD", "FORCE_REMOVE"):
        assert (root / OPTIONS / flag).exists(), flag
    assert (root / CONFIG).read_text() == config and "config kept" in out
    assert (root / "service" / NAME).is_symlink()
    run(INSTALL, "--root", root, env=env)  # nothing of it left: a plain install runs now


def test_our_earlier_package_under_the_old_name_is_not_a_conflict(root, env):
    old = root / "data/BatteryAggregator"
    (old / "release/setup").mkdir(parents=True)
    (old / "release/setup/install.sh").write_text("#!/bin/sh\n")
    (old / "version").write_text("v0.0.9\n")
    out = install(root, env).stdout
    assert not old.exists() and "earlier release of this package" in out
    assert (root / OPTIONS / "DO_NOT_AUTO_INSTALL").exists()


# --- SetupHelper package, release archives, blind install -------------------------------------------------------

def setuphelper(*args, env, helpers: Path | None = None):
    e = dict(env, BA_NO_SETUPHELPER="1") if helpers is None else dict(env, SETUPHELPER_INCLUDE=str(helpers))
    return subprocess.run(["bash", str(SETUP / "setuphelper" / "setup"), *args], env=e, capture_output=True,
                          text=True, timeout=120)


async def test_setuphelper_package(root, env):
    helper = SETUP / "setuphelper"
    assert (helper / "version").read_text().strip() == f"v{__version__}"
    assert re.fullmatch(r"v\d+\.\d+", (helper / "firstCompatibleVersion").read_text().strip())
    assert "BatteryAggregator uninstalled" in (helper / "packageDependencies").read_text().splitlines()
    assert os.access(helper / "setup", os.X_OK)
    e = dict(env, ROOT=str(root))
    proc = setuphelper("install", "auto", env=e)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    await eventually(lambda: (root / "service" / NAME).is_symlink(), timeout=60)  # checked in the background
    await eventually(lambda: not (app(root) / ".boot.lock").exists(), timeout=60)
    proc = setuphelper("uninstall", "auto", env=e)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not app(root).exists() and (root / CONFIG).exists()


def test_setuphelper_exit_codes_and_a_failed_install_uninstalls_nothing(root, env, tmp_path):
    e = dict(env, ROOT=str(root))
    install(root, env)
    (root / STATE).mkdir(parents=True)
    (root / STATE / "energy.json").write_text("{}")
    helpers = tmp_path / "IncludeHelpers"  # SetupHelper's part, reduced to what the setup script relies on
    helpers.write_text('scriptAction=INSTALL\ninstallFailed=false\n'
                       f'endScript() {{ echo "endScript $scriptAction installFailed=$installFailed" >> {tmp_path}/end; '
                       'exit ${installExitReason:-0}; }\n')
    pulquero(root)
    proc = setuphelper("install", env=e, helpers=helpers)
    assert proc.returncode == 246 and "--replace-batteryaggregator" in proc.stderr
    assert (tmp_path / "end").read_text() == "endScript INSTALL installFailed=true\n"
    assert (app(root) / "aggregator").is_dir() and (root / STATE / "energy.json").exists()
    shutil.rmtree(root / "data/BatteryAggregator")
    shutil.rmtree(root / "service/BatteryAggregator")
    (root / "etc/venus/installedVersion-BatteryAggregator").unlink()
    fake = Path(env["PATH"].split(":")[0]) / "python3"
    fake.unlink()
    fake.write_text("#!/bin/sh\necho 3.8\n")
    fake.chmod(0o755)
    assert setuphelper("install", env=e).returncode == 254
    assert (app(root) / "aggregator").is_dir() and (root / "service" / NAME).is_symlink()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, str(SETUP / "release.py"), "--skip-download", "--out", str(out),
                           "--github-user", "someone"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_release_archive_members(archives):
    top = f"{NAME}-{__version__}"
    with tarfile.open(archives / f"{top}.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    for name in ("aggregator/__init__.py", "aggregator/__main__.py", "setup/install.sh", "setup/boot.sh",
                 "setup/wheels.py", "setup/uninstall.sh", "setup/common.sh", "setup/config.default.json",
                 "setup/setuphelper/setup", "setup/setuphelper/post-hook.sh", "check_config.sh", "VERSION",
                 "wheels/targets.json", "wheels/FETCHED.txt", "config_generator/index.html", "README.md",
                 "CHANGELOG.md", "docs/configuration.md", "docs/install.md"):
        assert f"{top}/{name}" in members, name
    assert not any("/tests/" in n or "__pycache__" in n or "gx_check" in n for n in members)
    for name in ("setup/install.sh", "setup/boot.sh", "setup/uninstall.sh", "setup/setuphelper/setup",
                 "check_config.sh"):
        assert members[f"{top}/{name}"].mode & 0o111, name

    assert re.fullmatch(r"[A-Za-z0-9]+", release_py.PACKAGE_NAME) and release_py.PACKAGE_NAME != "BatteryAggregator"
    with tarfile.open(archives / f"{PACKAGE}-{__version__}.tar.gz") as tar:
        names = set(tar.getnames())
        info = tar.extractfile(f"{PACKAGE}/gitHubInfo").read().decode().strip()
    assert {f"{PACKAGE}/{n}" for n in ("setup", "version", "firstCompatibleVersion", "packageDependencies",
                                        "check_config.sh", "release/setup/install.sh")} <= names
    assert info == "someone:latest"
    with tarfile.open(archives / "venus-data.tgz") as tar:
        names = set(tar.getnames())
    assert {"rc/post-hook.sh", f"{PACKAGE}/setup", f"{PACKAGE}/release/setup/install.sh"} <= names


def test_pyproject_license_is_an_spdx_string():
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"


def unpack_venus_data(archives: Path, root: Path) -> Path:
    """What Venus OS does at boot with venus-data.tgz on a stick: rc/ aside, the rest into /data."""
    media = root / "media" / "sda1"
    media.mkdir(parents=True, exist_ok=True)
    shutil.copy2(archives / "venus-data.tgz", media / "venus-data.tgz")
    hooks = root / "tmp-hooks"
    with tarfile.open(archives / "venus-data.tgz") as tar:
        for member in tar.getmembers():
            tar.extract(member, hooks if member.name.startswith("rc") else root / "data", filter="data")
    return hooks / "rc" / "post-hook.sh"


async def test_blind_install_from_a_usb_stick(root, env, archives):
    hook = unpack_venus_data(archives, root)
    e = dict(env, ROOT=str(root))
    subprocess.run(["sh", str(hook)], env=e, check=True, timeout=120)
    await eventually(lambda: (root / "service" / NAME).is_symlink(), timeout=60)
    await eventually(lambda: not (app(root) / ".boot.lock").exists(), timeout=60)
    log = root / "media/sda1/battery-aggregator-install.log"
    assert "exit status 0" in log.read_text()
    log.unlink()
    subprocess.run(["sh", str(hook)], env=e, check=True, timeout=120)  # the next boot, stick still in
    assert not log.exists()


def test_blind_install_beside_batteryaggregator_needs_the_flag_file(root, env, archives):
    pulquero(root)
    hook = unpack_venus_data(archives, root)
    e = dict(env, ROOT=str(root))
    subprocess.run(["sh", str(hook)], env=e, check=True, timeout=120)
    log = (root / "media/sda1/battery-aggregator-install.log").read_text()
    assert "REPLACE" not in log or "--replace-batteryaggregator" in log
    assert "exit status 5" in log and not app(root).exists()
    (root / "media/sda1/REPLACE_BATTERYAGGREGATOR").write_text("")
    subprocess.run(["sh", str(hook)], env=e, check=True, timeout=120)
    assert "exit status 0" in (root / "media/sda1/battery-aggregator-install.log").read_text()
    assert not (root / "data/BatteryAggregator").exists() and (root / OPTIONS / "FORCE_REMOVE").exists()


def test_boot_check_takes_over_a_lock_left_by_a_power_cut(root, env):
    install(root, env)
    shutil.rmtree(root / "service")
    lock = app(root) / ".boot.lock"
    lock.mkdir()
    (lock / "pid").write_text("999999\n")  # no such process any more
    proc = subprocess.run([app(root) / "setup" / "boot.sh"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "service" / NAME).is_symlink() and not lock.exists()
    lock.mkdir()
    (lock / "pid").write_text(f"{os.getpid()}\n")  # a check that is still running: leave it alone
    proc = subprocess.run([app(root) / "setup" / "boot.sh"], env=env, capture_output=True, text=True, timeout=60)
    assert "another boot check is running" in proc.stdout and lock.exists()


def test_a_failed_update_starts_the_running_version_again(root, env, tmp_path):
    calls = fake_svc(env, tmp_path)
    run(INSTALL, "--root", root, env=env)
    cp = Path(env["PATH"].split(":")[0]) / "cp"  # the copy of the new app fails (a full /data, say)
    cp.write_text('#!/bin/sh\ncase "$*" in *aggregator.new*) echo "cp: No space left on device" >&2; exit 1 ;; esac\n'
                  'exec /bin/cp "$@"\n')
    cp.chmod(0o755)
    calls.write_text("")
    proc = run(INSTALL, "--root", root, env=env, check=False)
    assert proc.returncode == 1 and "the previous install is unchanged" in proc.stderr
    assert "the service runs on as it was" in proc.stderr
    assert calls.read_text().splitlines() == [f"-d {root}/service/{NAME}", f"-u {root}/service/{NAME}"]
    assert (app(root) / "aggregator" / "__init__.py").is_file() and (root / "service" / NAME).is_symlink()


def test_disabled_boot_hooks_stay_disabled(root, env):
    """Venus OS can switch third-party boot hooks off by renaming rc.local: the install does not undo that."""
    disabled = root / "data/rc.local.disabled"
    disabled.parent.mkdir(parents=True)
    disabled.write_text("#!/bin/sh\necho mine\n")
    proc = install(root, env)
    assert not (root / "data/rc.local").exists()
    assert len(lines_with(disabled, MARKER)) == 1 and "echo mine" in disabled.read_text()
    assert "boot hooks are disabled" in proc.stderr and "Modification checks" in proc.stderr
    uninstall(root, env)
    assert lines_with(disabled, MARKER) == [] and "echo mine" in disabled.read_text()
