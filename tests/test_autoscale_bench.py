"""`python -m bench.autoscale --quick` runs the ramp on real processes and reports it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_bench_autoscale_quick(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.autoscale", "--quick", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "autoscale.json").read_text())
    assert res["jobs"] == 40 and res["max_workers_seen"] == 2
    assert res["time_to_first_scale_out_s"] is not None and res["queue_wait_p95_s"] > 0
    assert [e["event_type"] for e in res["events"]][0] == "full_scale_out"
    assert res["samples"][-1]["workers"] == 0
    assert "time_to_first_scale_out_s" in p.stdout
