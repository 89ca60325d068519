"""A private dbus-daemon for the demo, the tests and the benchmarks, so nothing touches the real buses."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
  <limit name="max_match_rules_per_connection">4096</limit>
{limits}</busconfig>
"""


class PrivateBus:
    """Start with `start()` (or as a context manager); `address` is what DBUS_SESSION_BUS_ADDRESS gets."""

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self.limits = limits or {}  # extra <limit>s (tests make the bus drop a client that sends too much)
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> str:
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            raise RuntimeError("dbus-daemon is not installed (Debian: apt-get install dbus-daemon)")
        self._dir = tempfile.mkdtemp(prefix="battagg-bus-")
        socket = os.path.join(self._dir, "bus")
        config = Path(self._dir, "bus.conf")
        limits = "".join(f'  <limit name="{k}">{v}</limit>\n' for k, v in self.limits.items())
        config.write_text(_CONFIG.format(socket=socket, limits=limits))
        self._proc = subprocess.Popen(
            [daemon, f"--config-file={config}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode().strip()
        if not line:
            self.stop()
            raise RuntimeError("dbus-daemon did not start")
        self.address = line
        return line

    @property
    def pid(self) -> int | None:
        """The dbus-daemon's process id (tests pause it to fill a client's socket buffer)."""
        return self._proc.pid if self._proc is not None else None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose session bus is this one (Victron's tools then use it instead of the system bus)."""
        env = dict(os.environ if base is None else base)
        env["DBUS_SESSION_BUS_ADDRESS"] = self.address
        return env

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PrivateBus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
