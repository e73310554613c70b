"""The `sandmill` command as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil

from support import REPO, TOKEN, free_port

SM = [sys.executable, "-m", "sandmill"]


def run_cli(cluster, *args, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "SANDMILL_URL": cluster.base, "SANDMILL_TOKEN": TOKEN}
    return subprocess.run(SM + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_streams_logs_prints_result(cluster, tmp_path):
    f = tmp_path / "job.py"
    f.write_text("def main(who, n=1):\n    print('working for', who)\n    return {'who': who, 'n': n}\n")
    p = run_cli(cluster, "run", str(f), "-a", "who=ann", "-a", "n=3")
    assert p.returncode == 0, p.stderr
    assert "working for ann" in p.stdout
    assert '"who": "ann"' in p.stdout and '"n": 3' in p.stdout


def test_run_bash_and_failure_exit_code(cluster, tmp_path):
    f = tmp_path / "job.sh"
    f.write_text('msg="$1"\necho "said $msg"\nexit 3\n')
    p = run_cli(cluster, "run", str(f), "-a", "msg=hi")
    assert p.returncode == 1
    assert "said hi" in p.stdout and "exited with code 3" in p.stdout


def test_run_bad_file(cluster, tmp_path):
    f = tmp_path / "job.rb"
    f.write_text("puts 1")
    p = run_cli(cluster, "run", str(f))
    assert p.returncode == 2 and "use a .py" in p.stderr
    p = run_cli(cluster, "run", str(tmp_path / "missing.py"))
    assert p.returncode == 2 and "missing.py" in p.stderr
    g = tmp_path / "bad.py"
    g.write_text("def main(:\n")
    p = run_cli(cluster, "run", str(g))
    assert p.returncode == 1 and "line 1" in p.stderr


def test_jobs_table(cluster, tmp_path):
    f = tmp_path / "j.py"
    f.write_text("def main():\n    return 1\n")
    assert run_cli(cluster, "run", str(f), "-w", "clijobs").returncode == 0
    p = run_cli(cluster, "jobs", "-w", "clijobs")
    assert p.returncode == 0 and "success" in p.stdout and "python3" in p.stdout


def _descendants_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_up_runs_everything_restarts_workers_and_stops_clean(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SANDMILL_ADMIN_TOKEN")}
    up = subprocess.Popen(SM + ["up", "--data-dir", str(data), "--port", str(port), "--workers", "1"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and up.poll() is None, "sandmill up did not come up"
            time.sleep(0.2)
        token = (data / "admin_token").read_text().strip()  # generated, written to the data dir
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        while len(c.get("/api/workers/list").json()) < 2:  # default + native
            assert time.time() < deadline
            time.sleep(0.2)
        r = c.post("/api/w/main/jobs/run_wait_result/preview",
                   json={"content": "def main():\n    return 'up'\n", "language": "python3"})
        assert r.status_code == 200 and r.json() == "up"
        r = c.post("/api/w/main/jobs/run_wait_result/preview",
                   json={"content": "echo hi\necho done", "language": "bash"})
        assert r.status_code == 200 and r.json() == "done"
        # a worker that dies is started again
        kids = psutil.Process(up.pid).children(recursive=True)
        worker = next(k for k in kids if "worker" in k.cmdline() and "default.yaml" in " ".join(k.cmdline()))
        worker.kill()
        t0 = time.time()
        while True:
            ws = [w for w in c.get("/api/workers/list").json() if w["worker_group"] == "default"]
            if any(str(worker.pid) not in w["worker"] for w in ws):
                break
            assert time.time() - t0 < 30, "dead worker was not restarted"
            time.sleep(0.2)
        all_pids = [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
        pg_pids = [p.pid for p in psutil.process_iter(["cmdline"]) if str(data) in " ".join(p.info["cmdline"] or [])]
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "generated admin token" in out
    time.sleep(0.5)
    assert _descendants_alive(all_pids + pg_pids) == [], "processes left running after sandmill up stopped"
