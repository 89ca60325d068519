#!/usr/bin/env python3
"""Install the release's bundled wheels without pip, and check that they import.

    python3 wheels.py target                      the bundle key of this interpreter, e.g. cp312-armv7l
    python3 wheels.py install BUNDLE LIBROOT      unpack the wheels for this interpreter into LIBROOT/<target>
    python3 wheels.py check LIBROOT               do the required modules import from LIBROOT/<target>?

A wheel is a zip file: installing one is unpacking it into a directory on the module search path (its
``.dist-info`` comes along, so importlib.metadata works; ``<name>.data/purelib`` and ``platlib`` are moved to the
top). ``BUNDLE/targets.json`` (written by setup/release.py) lists, per target, the wheels pip resolved for it.
The new directory replaces the old one only when the required modules import from it in a fresh interpreter.

Standard library only, and old enough syntax to run (and explain itself) on any Python 3.
Exit status: 0 done; 3 Python too old; 5 the bundle has nothing for this CPU and Python; 6 the required
modules do not import; 7 (check) they import but were not installed from this bundle; 2 usage.
"""
from __future__ import print_function

import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import zipfile

MIN_PYTHON = (3, 11)
MANIFEST = "targets.json"
OK_MARK = ".imports-ok"  # written into a lib directory once its required modules imported


def target():
    """cp<major><minor>-<cpu>: the CPU as manylinux wheels name it, seen from this interpreter (a 32-bit userland
    on a 64-bit kernel reports aarch64, yet needs armv7l wheels)."""
    machine = platform.machine().lower()
    bits = struct.calcsize("P") * 8
    if machine in ("aarch64", "arm64", "armv8l", "armv8b") and bits == 32:
        machine = "armv7l"
    elif machine.startswith("armv7") or machine == "armhf":
        machine = "armv7l"
    elif machine in ("amd64", "x86_64") and bits == 32:
        machine = "i686"
    elif machine == "amd64":
        machine = "x86_64"
    return "cp%d%d-%s" % (sys.version_info[0], sys.version_info[1], machine)


def read_manifest(bundle):
    path = os.path.join(bundle, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, IOError, ValueError) as exc:
        raise SystemExit("cannot read %s: %s" % (path, exc))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("targets"), dict):
        raise SystemExit("%s: no targets" % path)
    return manifest


def bundle_stamp(bundle, key):
    """What the lib directory of `key` was made from: the target and a digest of its wheel list."""
    manifest = read_manifest(bundle)
    entry = manifest["targets"].get(key)
    if entry is None:
        return None
    return "%s %s" % (key, hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16])


def unpack_wheel(wheel, dest):
    """Unpack one wheel into dest, refusing members that would land outside it."""
    root = os.path.realpath(dest)
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.infolist():
            path = os.path.realpath(os.path.join(root, member.filename))
            if path != root and not path.startswith(root + os.sep):
                raise ValueError("%s: unsafe path %s" % (os.path.basename(wheel), member.filename))
        zf.extractall(root)
    # <dist>.data/{purelib,platlib}/... belong at the top; scripts, headers and data files are not needed
    for name in os.listdir(root):
        if not name.endswith(".data") or not os.path.isdir(os.path.join(root, name)):
            continue
        for scheme in ("purelib", "platlib"):
            src = os.path.join(root, name, scheme)
            if os.path.isdir(src):
                for item in os.listdir(src):
                    target_path = os.path.join(root, item)
                    if os.path.isdir(target_path):
                        shutil.rmtree(target_path)
                    shutil.move(os.path.join(src, item), target_path)
        shutil.rmtree(os.path.join(root, name))


def imports(lib, modules, python=None):
    """Do `modules` import from lib in a fresh interpreter (lib first on the path)? (ok, the error's last line)"""
    if not modules:
        return True, ""
    env = dict(os.environ)
    env["PYTHONPATH"] = lib
    env.pop("PYTHONHOME", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    code = "import " + ", ".join(modules)
    proc = subprocess.Popen([python or sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _, err = proc.communicate()
    lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    return proc.returncode == 0, (lines[-1] if lines else "")


def install(bundle, libroot):
    key = target()
    if not os.path.isfile(os.path.join(bundle, MANIFEST)):
        print("no wheel bundle (%s) in %s" % (MANIFEST, bundle))
        return 5
    manifest = read_manifest(bundle)
    entry = manifest["targets"].get(key)
    if not entry:
        have = ", ".join(sorted(manifest["targets"])) or "none"
        print("the bundle in %s has no wheels for this GX (%s); it has: %s" % (bundle, key, have))
        return 5
    required_modules = manifest.get("required_modules", [])
    final = os.path.join(libroot, key)
    staging = final + ".new"
    if os.path.isdir(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    try:
        for name in entry.get("required", []):
            unpack_wheel(os.path.join(bundle, name), staging)
    except (OSError, IOError, ValueError, zipfile.BadZipfile) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        print("cannot unpack the required wheels: %s" % exc)
        return 6
    ok, why = imports(staging, required_modules)
    if not ok:
        shutil.rmtree(staging, ignore_errors=True)
        print("the required modules (%s) do not import from the bundled wheels for %s: %s"
              % (", ".join(required_modules), key, why))
        return 6
    for group, names in sorted(entry.get("optional", {}).items()):
        modules = manifest.get("optional_modules", {}).get(group, [])
        probe = staging + ".probe"
        try:
            shutil.copytree(staging, probe)
            for name in names:
                unpack_wheel(os.path.join(bundle, name), probe)
            good, why = imports(probe, modules)
        except (OSError, IOError, ValueError, zipfile.BadZipfile) as exc:
            good, why = False, str(exc)
        if good:
            shutil.rmtree(staging)
            os.rename(probe, staging)
            print("optional %s: installed" % group)
        else:
            shutil.rmtree(probe, ignore_errors=True)
            print("optional %s: does not import (%s), left out" % (group, why))
    for group, why in sorted(entry.get("missing", {}).items()):
        print("optional %s: not in the bundle for %s (%s)" % (group, key, why))
    with open(os.path.join(staging, OK_MARK), "w") as f:
        f.write(bundle_stamp(bundle, key) + "\n")
    if os.path.isdir(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)
    print("dependencies for %s installed in %s" % (key, final))
    return 0


def check(libroot, bundle=None):
    """0: the required modules import from LIBROOT/<target>, installed from this bundle; 7: they import, but the
    bundle has other wheels for this target now (an update); 6: they do not import."""
    key = target()
    lib = os.path.join(libroot, key)
    modules = ["dbus_next", "pydantic", "jsonschema"]
    stamp = None
    if bundle and os.path.isfile(os.path.join(bundle, MANIFEST)):
        modules = read_manifest(bundle).get("required_modules", modules)
        stamp = bundle_stamp(bundle, key)
    try:
        with open(os.path.join(lib, OK_MARK)) as f:
            mark = f.read().strip()
    except (OSError, IOError):
        mark = None
    ok, why = imports(lib, modules) if mark else (False, "not installed")
    if not ok:
        print("%s: the required modules do not import from %s: %s" % (key, lib, why))
        return 6
    if stamp and mark != stamp:
        print("%s: %s import from %s, but the bundle has other wheels for it now" % (key, ", ".join(modules), lib))
        return 7
    print("%s: %s import from %s" % (key, ", ".join(modules), lib))
    return 0


def main(argv):
    if sys.version_info[:2] < MIN_PYTHON:
        print("Python %d.%d is too old: battery-aggregator needs Python >= %d.%d (Venus OS v3.60 or later)"
              % (sys.version_info[0], sys.version_info[1], MIN_PYTHON[0], MIN_PYTHON[1]))
        return 3
    if argv[:1] == ["target"] and len(argv) == 1:
        print(target())
        return 0
    if argv[:1] == ["install"] and len(argv) == 3:
        return install(argv[1], argv[2])
    if argv[:1] == ["check"] and len(argv) in (2, 3):
        return check(argv[1], argv[2] if len(argv) == 3 else None)
    print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
