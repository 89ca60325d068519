"""The quick form of the daemon benchmark: fails when the CPU per member update doubles against
the baseline recorded in bench/baseline.json. Select or skip it with the `perf` marker."""
from __future__ import annotations

import json

import pytest

from ..helpers import load_script

pytestmark = pytest.mark.perf


def _bench():  # type: ignore[no-untyped-def]
    return load_script("bench/daemon.py")


def test_cpu_per_member_update_has_not_doubled() -> None:
    bench = _bench()
    baseline = json.loads(bench.BASELINE.read_text())
    result = bench.run(baseline["scenario"], baseline["duration_s"], baseline["library"])
    # Another machine runs the same code at another speed: scale by a fixed workload timed on both.
    speed = bench.calibration_cpu_s() / baseline["calibration_cpu_s"]
    allowed = 2.0 * baseline["cpu_s_per_1000_updates"] * speed
    measured = result["cpu_s_per_1000_updates"]
    assert measured <= allowed, (
        f"{measured} CPU-s per 1000 member updates on {result['machine']}; baseline "
        f"{baseline['cpu_s_per_1000_updates']} on {baseline['machine']} ({baseline['recorded']}), "
        f"this machine is {speed:.2f}x its time for the calibration workload, so at most {allowed:.3f} is allowed")
    assert result["probe_updates_seen"].split()[0] == result["probe_updates_seen"].split()[-1], \
        f"the probe missed updates of the aggregate: {result['probe_updates_seen']}"
