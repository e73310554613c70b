"""`python -m bench.agent --quick` runs both measurements and prints their figures; the
throughput's figure is the median of the rounds' shares; ``--versus`` drains a second agent
with other settings in the same rounds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from support import REPO


@pytest.mark.timeout(180)
def test_bench_agent_quick(tmp_path):
    out = tmp_path / "agent.json"
    p = subprocess.run([sys.executable, "-m", "bench.agent", "--quick", "--json", str(out),
                        "--versus", "SANDMILL_AGENT_SEND_FIRST=0"], cwd=REPO,
                       capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "throughput" in p.stdout and "idle:" in p.stdout
    res = json.loads(out.read_text())
    tp = res["throughput"]
    assert tp["db_median"] > 0 and tp["agent_median"] > 0
    assert tp["agent_share"] == statistics.median(tp["round_shares"]) > 0
    assert tp["agent_b"]["env"] == {"SANDMILL_AGENT_SEND_FIRST": "0"} and tp["agent_b"]["median"] > 0
    assert "agent with SANDMILL_AGENT_SEND_FIRST=0" in p.stdout
    assert res["idle"]["agents"] == 20 and res["idle"]["tx_per_s"] >= 0
