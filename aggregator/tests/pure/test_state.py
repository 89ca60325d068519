"""Persisted state: atomic JSON file that never raises."""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import aggregator.state as state_mod
from aggregator.state import StateStore

REPO = Path(__file__).resolve().parents[3]


def test_round_trip(tmp_path):
    store = StateStore(tmp_path / "state.json")
    data = {"members": {"a": {"r": 0.008, "n": 3}}, "list": [1, 2.5, None, "x"], "flag": True}
    store.save(data)
    assert store.load() == data
    assert StateStore(str(tmp_path / "state.json")).load() == data
    assert not (tmp_path / "state.json.tmp").exists()
    store.save({"second": 1})
    assert store.load() == {"second": 1}


def test_missing_file_is_empty_without_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert StateStore(tmp_path / "nope.json").load() == {}
    assert not caplog.records


def test_creates_parent_directory(tmp_path):
    path = tmp_path / "a" / "b" / "state.json"
    StateStore(path).save({"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"a": 1', b"", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'"a string"', b"\x00" * 100],
)
def test_corrupt_file_gives_empty_and_a_warning(tmp_path, caplog, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="aggregator.state"):
        assert StateStore(path).load() == {}
    assert any(str(path) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_unreadable_path_gives_empty(tmp_path, caplog):
    path = tmp_path / "state.json"
    path.mkdir()  # a directory where the file should be
    with caplog.at_level(logging.WARNING, logger="aggregator.state"):
        assert StateStore(path).load() == {}
    assert any(str(path) in r.getMessage() for r in caplog.records)


def test_parent_is_a_file_save_logs_and_does_not_raise(tmp_path, caplog):
    (tmp_path / "blocker").write_text("x")
    store = StateStore(tmp_path / "blocker" / "state.json")
    with caplog.at_level(logging.ERROR, logger="aggregator.state"):
        store.save({"x": 1})
    assert any("cannot save" in r.getMessage() for r in caplog.records)
    assert store.load() == {}


def test_disk_full_keeps_the_old_file(tmp_path, caplog, monkeypatch):
    store = StateStore(tmp_path / "state.json")
    store.save({"old": 1})

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_mod.os, "fsync", full)
    with caplog.at_level(logging.ERROR, logger="aggregator.state"):
        store.save({"new": 2})
    monkeypatch.undo()
    assert any("cannot save" in r.getMessage() for r in caplog.records)
    assert store.load() == {"old": 1}
    assert not (tmp_path / "state.json.tmp").exists()


def test_unserialisable_data_is_logged_not_raised(tmp_path, caplog):
    store = StateStore(tmp_path / "state.json")
    store.save({"old": 1})
    with caplog.at_level(logging.ERROR, logger="aggregator.state"):
        store.save({"bad": object()})
    assert caplog.records
    assert store.load() == {"old": 1}


CHILD = textwrap.dedent(
    """
    import sys
    from aggregator.state import StateStore
    store = StateStore(sys.argv[1])
    a = {"version": "A", "blob": ["a" * 100] * 2000}            # ~200 KB
    b = {"version": "B", "blob": ["bb" * 60] * 2000, "n": 1}    # different size and content
    k = 0
    while True:
        store.save(a if k % 2 == 0 else b)
        k += 1
        if k == 2:
            print("saving", flush=True)
    """
)


def _versions() -> tuple[dict, dict]:
    a = {"version": "A", "blob": ["a" * 100] * 2000}
    b = {"version": "B", "blob": ["bb" * 60] * 2000, "n": 1}
    return a, b


def test_kill_9_at_random_moments_leaves_old_or_new(tmp_path):
    path = tmp_path / "state.json"
    a, b = _versions()
    assert len(json.dumps(a)) > 200_000
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rnd = random.Random(1234)
    seen = []
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env, cwd=str(REPO)
        )
        try:
            assert proc.stdout.readline().strip() == b"saving"
            time.sleep(rnd.uniform(0.0, 0.05))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        loaded = StateStore(path).load()
        assert loaded in (a, b), f"file is neither version: {str(loaded)[:200]}"
        seen.append(loaded["version"])
    print("versions after kill:", "".join(seen))
