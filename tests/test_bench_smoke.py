"""`python -m bench --quick` runs every section and writes the report with its charts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_bench_quick_writes_report_and_charts(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pgqueuer")
    out = tmp_path / "tmp"
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=230)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (out / "report.md").read_text()
    for png in ("overhead.png", "scaling.png", "queue.png", "idle_recovery.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in report
    for heading in ("## Machine", "## Targets", "## 1. Per-job overhead", "## 2. Scaling",
                    "## 3. Queue throughput vs pgqueuer", "## 4. Idle load", "## 5. Recovery"):
        assert heading in report
    res = json.loads((out / "results.json").read_text())
    assert res["queue"]["sandmill"]["median"] > 0 and res["queue"]["pgqueuer"]["median"] > 0
    assert res["recovery"]["seconds"] and res["idle"]["windows"]
    assert "targets" in p.stdout


@pytest.mark.timeout(120)
def test_a_drain_is_timed_between_commits():
    """From the enqueue's commit to the last completion's commit, as PostgreSQL stamped
    them: never later than the harness's polled end, and never shorter than the work."""
    from bench.common import BenchPG
    from bench.drain import drain_once

    bp = BenchPG()
    try:
        r = drain_once(bp, subworkers=2, jobs=20, language="sleep", args={"seconds": 0.05})
    finally:
        bp.close()
    # its PostgreSQL (stopped, not left running on a deleted data dir), profiles and logs
    # go with it
    assert not bp.tmp.exists()
    import psutil
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(bp.tmp) in " ".join(p.info["cmdline"] or [])]
    # the harness saw its commit return_lag_s after PostgreSQL stamped it
    assert 0 <= r["return_lag_s"] < 1, r
    assert 10 * 0.05 <= r["drain_s"] <= r["polled_drain_s"] + r["return_lag_s"] + 0.002, r
    assert r["jobs_per_s"] == 20 / r["drain_s"]


def test_a_run_without_the_bench_extra_says_what_to_install_before_it_starts(tmp_path, monkeypatch, capsys):
    """The queue section comes minutes into a run: a missing peer is named at once, with
    the install command, not as a traceback at that point."""
    from bench.__main__ import main

    monkeypatch.setitem(sys.modules, "pgqueuer", None)  # find_spec: not installed
    out = tmp_path / "report"
    assert main(["--out", str(out), "--only", "scaling,queue"]) == 2
    err = capsys.readouterr().err
    assert "pgqueuer" in err and "pip install -e '.[bench]'" in err
    assert not out.exists()  # nothing ran


def test_sections_that_do_not_run_the_peer_do_not_need_it(monkeypatch):
    from bench.__main__ import missing_extras

    monkeypatch.setitem(sys.modules, "pgqueuer", None)
    assert "pgqueuer" not in missing_extras(["overhead", "scaling", "idle", "recovery"])
    assert "pgqueuer" not in missing_extras(["queue"], replot=True)
    assert "pgqueuer" in missing_extras(["queue"])
