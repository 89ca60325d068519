"""A real mosquitto broker on loopback, for the tests, the benchmarks and the demo.

The dispatcher and the cooperative talk MQTT; their tests must meet a real broker (with its password file,
ACL and TLS), not a mock. This starts Debian's mosquitto in a directory of its own and stops it again.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_test_certificates(directory: Path) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=battery-aggregator test CA",
            "-keyout", str(ca_key), "-out", str(ca))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", str(cert))
    return TlsFiles(ca=ca, cert=cert, key=key)


@dataclass
class MosquittoBroker:
    """mosquitto on 127.0.0.1. `users` turns anonymous access off; `acl` is an ACL file's text; `tls` makes the
    listener TLS-only with certificates made for this run (clients trust `tls_files.ca`)."""

    users: Mapping[str, str] | None = None
    acl: str | None = None
    tls: bool = False
    directory: Path | None = None
    port: int = 0
    host: str = "127.0.0.1"
    tls_files: TlsFiles | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _own_directory: bool = field(default=False, repr=False)

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (Debian package 'mosquitto'; ./run.sh setup installs it)")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="mosquitto-"))
            self._own_directory = True
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.directory.joinpath("mosquitto.conf").write_text(self._config())
        self._proc = subprocess.Popen([binary, "-c", str(self.directory / "mosquitto.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}; see {self.directory}/mosquitto.log")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def _config(self) -> str:
        assert self.directory is not None
        lines = [
            f"listener {self.port} {self.host}",
            "persistence false",
            f"log_dest file {self.directory / 'mosquitto.log'}",
            "log_type error", "log_type warning", "log_type notice", "log_type subscribe",
            # As root mosquitto would switch to the 'mosquitto' user, who cannot read our private directory.
            f"user {getpass.getuser()}",
        ]
        if self.users:
            password_file = self.directory / "passwords"
            password_file.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(password_file), user, password], check=True,
                               capture_output=True)
            os.chmod(password_file, 0o600)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl_file = self.directory / "acl"
            acl_file.write_text(self.acl)
            os.chmod(acl_file, 0o600)
            lines.append(f"acl_file {acl_file}")
        if self.tls:
            self.tls_files = make_test_certificates(self.directory / "tls")
            lines += [f"cafile {self.tls_files.ca}", f"certfile {self.tls_files.cert}",
                      f"keyfile {self.tls_files.key}", "tls_version tlsv1.2"]
        return "\n".join(lines) + "\n"

    def log(self) -> str:
        assert self.directory is not None
        try:
            return (self.directory / "mosquitto.log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._own_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
