"""`python -m bench --quick` runs its sections and writes the report with its charts: the
core sections 1-5 and the feature sections 6-10 (dedicated, agent, autoscale, pydeps,
dashboard) side by side."""

from __future__ import annotations

import io
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
    # sections 1-5 (the feature sections 6-10: the tests below and each benchmark's own)
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out),
                        "--only", "overhead,scaling,queue,idle,recovery"], cwd=REPO,
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


MORE = ["dedicated", "agent", "autoscale", "pydeps", "dashboard"]
MORE_HEADINGS = ["## 6. Dedicated workers", "## 7. Agent workers", "## 8. Autoscaling",
                 "## 9. Python dependencies", "## 10. Dashboard"]


def _more_results() -> dict:
    """What `python -m bench --quick --only dedicated,agent,autoscale,pydeps,dashboard` wrote."""
    return json.loads((REPO / "tests" / "data" / "bench_more_results.json").read_text())


def test_the_feature_sections_report_side_by_side(tmp_path):
    """The feature benchmarks' figures land in one report: their Targets rows with verdicts,
    a section each with its table, and their charts (the autoscale ramp among them)."""
    pytest.importorskip("matplotlib")
    from bench.__main__ import main

    (tmp_path / "results.json").write_text(json.dumps(_more_results()))
    assert main(["--out", str(tmp_path), "--replot", "--only", ",".join(MORE)]) == 0
    report = (tmp_path / "report.md").read_text()
    for heading in MORE_HEADINGS:
        assert heading in report, heading
    assert report.index("## Targets") < report.index(MORE_HEADINGS[0])
    targets = report[report.index("## Targets"):report.index(MORE_HEADINGS[0])]
    for row in ("| dedicated worker drain (process) | >= 2,000 jobs/s | 1,385 jobs/s",
                "| fib(10) run_wait_result p50, dedicated (process) | <= 5 ms | 10.9 ms",
                "| agent vs DB worker, 8 subworkers each | >= 80% of DB jobs/s | 31%",
                "| 200 idle agents: server CPU |", "| 200 idle agents: database |",
                "| autoscale: burst -> first scale-out | none (reported) | 0.23 s",
                "| pydeps: first job of a new lock (process) |", "| dashboard page load p95, 100,000 jobs |"):
        assert row in targets, row
    assert targets.count("**missed**") == 3  # the two dedicated targets and the agent's share, in that run
    for png in ("autoscale.png", "pydeps.png", "dashboard.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
        assert f"({png})" in report
    assert "### agent vs DB worker, 8 subworkers each" in report  # a missed target says where to read on


def test_feature_targets_are_judged_only_at_their_size():
    """--quick's 20 idle agents and 10,000 dashboard jobs are not the targets' 200 and
    100,000: no verdict; at full size, a verdict."""
    from bench.report_more import targets

    res = _more_results()
    verdict = {t["name"]: t["met"] for t in targets(res)}
    assert verdict["200 idle agents: server CPU"] is None and verdict["200 idle agents: database"] is None
    assert verdict["dashboard page load p95, 100,000 jobs"] is None
    assert verdict["agent vs DB worker, 8 subworkers each"] is False
    res["agent"]["idle"]["agents"], res["dashboard"]["jobs"] = 200, 100_000
    res["agent"]["idle"]["tx_per_s"] = 5.5
    rows = {t["name"]: t for t in targets(res)}
    assert rows["200 idle agents: server CPU"]["met"] is True
    assert rows["200 idle agents: database"]["met"] is False and rows["200 idle agents: database"]["gap"] == "0.50 tx/s over"
    assert rows["dashboard page load p95, 100,000 jobs"]["met"] is True


@pytest.mark.timeout(150)
def test_the_feature_sections_run_through_the_suite(tmp_path):
    """`python -m bench` runs the feature benchmarks on its one PostgreSQL (tinier than
    --quick, to keep the test run short; autoscale's ramp runs in tests/test_autoscale_bench.py)."""
    pytest.importorskip("matplotlib")
    import dataclasses

    from rich.console import Console

    from bench import suite
    from bench.__main__ import run

    tiny = dataclasses.replace(suite.QUICK, dedicated_jobs=100, dedicated_runs=3, agent_jobs=100,
                               agent_idle_agents=3, agent_idle_s=1, pydeps_jobs=2, dashboard_jobs=1000,
                               dashboard_rounds=2)
    only = ["dedicated", "agent", "pydeps", "dashboard"]
    res = run(tmp_path, quick=True, only=only, counts=tiny, console=Console(file=io.StringIO()))
    (ded,) = res["dedicated"]["rows"]
    assert ded["drain_dedicated"]["jobs"] == 100 and ded["drain_dedicated"]["failed"] == 0
    assert ded["latency_dedicated"]["runs"] == 3
    assert res["agent"]["throughput"]["agent_median"] > 0 and res["agent"]["idle"]["agents"] == 3
    (pd,) = res["pydeps"]["rows"]
    assert pd["backend"] == "process" and pd["rows"]["later jobs"]["n"] == 2
    assert res["dashboard"]["jobs"] == 1000 and res["dashboard"]["worst_p95_ms"] > 0
    report = (tmp_path / "report.md").read_text()
    for heading in MORE_HEADINGS[:2] + MORE_HEADINGS[3:]:
        assert heading in report, heading
    assert json.loads((tmp_path / "results.json").read_text())["dashboard"]["rounds"] == 2


def test_standard_workers_at_the_limit_are_judged():
    """bash and python3 on nsjail against 300 and 200 jobs/s, and bash's overhead above
    its bare start (latency p50 - bare p50), with the batch's figure beside it."""
    from bench.report import targets

    def row(lang: str, jps: float, over: float, bare: float) -> dict:
        return {"backend": "nsjail", "language": lang, "jps": {"median": jps}, "overhead_ms": over,
                "bare": {"median": bare}}

    res = {"overhead": {"rows": [row("python3", 190.0, -3.0, 13.0), row("bash", 350.0, 3.5, 1.5)],
                        "probes": {}}}
    rows = {t["name"]: t for t in targets(res)}
    assert rows["python3 on nsjail, one worker, at the limit"]["met"] is False
    assert rows["python3 on nsjail, one worker, at the limit"]["gap"] == "5% short"
    assert rows["bash on nsjail, one worker, at the limit"]["met"] is True
    over = rows["bash on nsjail, overhead above bare"]
    assert over["met"] is False and over["gap"] == "1.5 ms over"
    assert "in the batch: 1.4 ms a job above bare" in over["value"]
