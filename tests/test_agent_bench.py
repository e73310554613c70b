"""`python -m bench.agent --quick` runs both measurements and prints their figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO


@pytest.mark.timeout(180)
def test_bench_agent_quick(tmp_path):
    out = tmp_path / "agent.json"
    p = subprocess.run([sys.executable, "-m", "bench.agent", "--quick", "--json", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "throughput" in p.stdout and "idle:" in p.stdout
    res = json.loads(out.read_text())
    assert res["throughput"]["db_median"] > 0 and res["throughput"]["agent_median"] > 0
    assert res["idle"]["agents"] == 20 and res["idle"]["tx_per_s"] >= 0
