"""Persisted service state: one JSON file, replaced atomically.

``save`` writes ``<path>.tmp`` in the same directory, flushes and fsyncs it,
``os.replace``s it onto ``path`` and fsyncs the directory. After a kill -9 (or a
power cut, on a filesystem that honours fsync) at any moment, ``path`` holds
either the old or the new version, never a mix or an empty file. Neither
``load`` nor ``save`` ever raises: the service goes on with its state in memory.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

__all__ = ["StateStore"]

log = logging.getLogger(__name__)


class StateStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.tmp_path = self.path + ".tmp"

    def load(self) -> dict[str, Any]:
        """The saved dict; {} if the file is missing, unreadable or not a JSON object."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.warning("cannot read state file %s (%s); starting with empty state", self.path, e)
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            log.warning("state file %s is corrupt (%s); starting with empty state", self.path, e)
            return {}
        if not isinstance(data, dict):
            log.warning("state file %s holds a %s, not an object; starting with empty state", self.path,
                        type(data).__name__)
            return {}
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Atomically replace the file with ``data``; errors are logged, never raised."""
        try:
            payload = json.dumps(data, separators=(",", ":")).encode()
        except (TypeError, ValueError, RecursionError) as e:
            log.error("state for %s is not JSON-serialisable (%s); not saved", self.path, e)
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            with open(self.tmp_path, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.tmp_path, self.path)
        except OSError as e:
            log.error("cannot save state file %s (%s); keeping state in memory", self.path, e)
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
            return
        self._fsync_dir(directory)

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse fsync on a directory
            pass
        finally:
            os.close(fd)
