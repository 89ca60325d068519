"""What the service process leaves out of its memory while its config does not need it.

A GX has 512 MB to 1 GB for everything it runs. Python's asyncio loads TLS support (the ssl module and OpenSSL's
libraries, about 4 MiB resident) whether or not anything uses it; only the MQTT links of the dispatcher and of the
cooperative can. Before asyncio is first imported, a config with neither leaves ssl out (Python's documented way:
None in sys.modules makes `import ssl` fail, and asyncio runs without TLS). A later config that turns one of them
on needs a new process: the host exits so that the supervisor restarts it (see `needs_tls`).
"""
from __future__ import annotations

import sys
from typing import Any


def needs_tls(config: Any) -> bool:
    """Whether a feature of this config may open a TLS connection (an MQTT link)."""
    return bool(config.coop.enabled) or bool(config.dispatcher.batteries)


def leave_out_tls(config: Any) -> bool:
    """Leave TLS support out of this process if the config needs none and nothing has loaded it; whether it did."""
    if needs_tls(config) or "asyncio" in sys.modules or "ssl" in sys.modules:
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]
    return True


def tls_left_out() -> bool:
    return "ssl" in sys.modules and sys.modules["ssl"] is None
