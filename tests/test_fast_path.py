"""The warm fast path for exec'd programs (bash) and python3 jobs: what keeps a job's
path short must keep being taken (docs/performance.md, "Warm exec"). Timing goals are in
the benchmark (``python -m bench.latency``), not here."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from sandmill.isolation import Backend, RunSpec, Status, workdir
from sandmill.isolation.nsjail import NsjailBackend
from sandmill.isolation.process import ProcessBackend
from sandmill.profiles import profile_from_dict
from sandmill.store import db as dbmod
from sandmill.store import queue
from sandmill.worker.settings import WorkerSettings
from sandmill.worker.worker import Worker

pytestmark = pytest.mark.timeout(60)

PY = "/usr/bin/python3"
ENV = {"PATH": "/usr/bin:/bin"}


def _usable(cls: type[Backend]) -> Backend:
    b = cls()
    if not b.probe().available or b.warm_pool is None:  # type: ignore[attr-defined]
        b.close()
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs the warm suite, but {cls.name} has no warm interpreters here")
        pytest.skip(f"{cls.name}: no warm interpreters here")
    return b


@pytest.fixture(params=["process", "nsjail"])
def warm(request):
    b = _usable(ProcessBackend if request.param == "process" else NsjailBackend)
    yield b
    b.close()


def _zygotes(b) -> dict[str, int]:
    """"exec" or "python" -> pid of that idle zygote (one that only execs has no script)."""
    return {"python" if z.key[1] else "exec": z.pid for zs in b.warm_pool.idle.values() for z in zs}


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


async def test_exec_zygote_preloads_nothing(warm) -> None:
    # bash is exec'd by a job process forked from the exec zygote: every page the zygote
    # maps is copied at the fork and torn down by the exec, so it imports no job modules.
    # (The Python one, as where no compiler is found: the native one is a few pages.)
    warm.warm_pool.launcher = ""
    o = await warm.run(RunSpec(argv=["/bin/bash", "-c", "echo 1"], env=ENV))
    assert o.status is Status.success and o.warm and o.stdout == b"1\n", o
    wrapper = b"import sys\nprint('py')\n"
    o = await warm.run(RunSpec(argv=[PY, "-u", "w.py"], env=ENV, files={"w.py": wrapper}, warm="w.py"))
    assert o.status is Status.success and o.warm and o.stdout == b"py\n", o
    zs = _zygotes(warm)
    assert set(zs) == {"exec", "python"}, zs
    assert "_hashlib" not in _maps(zs["exec"])  # no warm_preload in the exec zygote
    assert "_hashlib" in _maps(zs["python"])  # the python3 zygote keeps its preload


async def test_job_modules_are_imported_once_in_the_zygote(warm) -> None:
    # What a job process needs (resource for its rlimits, signal before an exec) is
    # imported by the (Python exec) zygote, not by every job process on its job's path.
    warm.warm_pool.launcher = ""
    o = await warm.run(RunSpec(argv=["/bin/bash", "-c", "ulimit -c; trap - PIPE; yes | head -n 1"],
                               env=ENV))
    assert o.status is Status.success and o.warm and o.stdout == b"0\ny\n", o
    maps = _maps(_zygotes(warm)["exec"])
    assert "/resource.cpython" in maps, "the zygote did not import resource itself"


def test_work_dir_files_nested_and_owned(tmp_path: Path) -> None:
    # Work dirs are made without a walk of the tree: every dir made and file written is
    # chowned, and nothing else.
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    root = tmp_path / "jobs"
    wd = workdir.create(root, {"a/b/c.txt": b"c", "a/d.txt": b"d", "e": b""}, 65534, 65534)
    try:
        assert (root.stat().st_mode & 0o777) == 0o711
        for rel in ("", "a", "a/b", "a/b/c.txt", "a/d.txt", "e"):
            st = (wd / rel).stat()
            assert (st.st_uid, st.st_gid) == (65534, 65534), rel
        assert (wd / "a/b/c.txt").read_bytes() == b"c"
        assert workdir.collect(wd, [], 100) == {}
        assert workdir.collect(wd, ["a/d.txt"], 100) == {"a/d.txt": b"d"}
    finally:
        workdir.remove(wd)
    # The root is made again when it went away between two jobs.
    os.rmdir(root)
    wd = workdir.create(root, {"x": b"1"}, None, None)
    assert wd.parent == root and (wd / "x").read_bytes() == b"1"


LO_UP = b"""
import fcntl, os, socket, struct
print(os.readlink("/proc/self/ns/net"))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]  # SIOCGIFFLAGS
print("lo up" if flags & 1 else "lo down")
try:
    fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # SIOCSIFFLAGS: bring it up
    print("lo brought up")
except OSError as e:
    print(e.strerror)
try:
    socket.create_connection(("127.0.0.1", 1), timeout=1)
except OSError as e:
    print("connect:", e.strerror)
"""


async def test_jobs_share_the_zygotes_netns_and_cannot_configure_it(warm) -> None:
    # A job process makes no network namespace of its own (1 ms of CPU per job): it
    # stays in the zygote's, which the backend made empty with loopback down, and which
    # belongs to a user namespace where the job has no capability.
    spec = RunSpec(argv=[PY, "-u", "w.py"], env=ENV, files={"w.py": LO_UP}, warm="w.py")
    outs = [await warm.run(spec) for _ in range(2)]
    bash = await warm.run(RunSpec(argv=["/bin/bash", "-c", "readlink /proc/self/ns/net"], env=ENV))
    assert all(o.status is Status.success and o.warm for o in [*outs, bash]), outs
    lines = [o.stdout.decode().splitlines() for o in outs]
    assert lines[0] == lines[1], lines
    ns, state, change, connect = lines[0]
    assert ns == os.readlink(f"/proc/{_zygotes(warm)['python']}/ns/net") != os.readlink("/proc/self/ns/net")
    assert bash.stdout.decode().strip() == os.readlink(f"/proc/{_zygotes(warm)['exec']}/ns/net")
    assert (state, change) == ("lo down", "Operation not permitted"), lines[0]
    assert connect.startswith("connect: "), connect


async def test_the_next_job_starts_while_the_last_ones_logs_are_written(pg_url, monkeypatch) -> None:
    # A bash job always prints (its result is its last line). The slot starts the job it
    # holds ahead as soon as a job ends; the job's logs are written meanwhile, and its
    # completion is sent only after them: who sees it completed sees all its logs.
    if ProcessBackend().warm_pool is None:
        pytest.skip("no warm process backend here")
    pool = await dbmod.create_pool(pg_url)
    tag = "fastlogs-" + uuid.uuid4().hex[:6]
    early: list[uuid.UUID] = []  # jobs completed before their logs were written (never)
    write = queue.append_logs

    async def slow_append_logs(db, job_id, chunks):
        await asyncio.sleep(0.4)
        if await pool.fetchval("SELECT count(*) FROM completed_job WHERE id = $1", job_id):
            early.append(job_id)
        await write(db, job_id, chunks)

    monkeypatch.setattr(queue, "append_logs", slow_append_logs)
    ids = [await queue.push(pool, workspace="w", language="bash", content=f"echo start $EPOCHREALTIME; sleep {s}; echo end $EPOCHREALTIME; echo hi{i}",
                            args={}, tag=tag) for i, s in enumerate((0.3, 0, 0))]
    w = Worker(profile_from_dict({"name": "fastlogs", "tags": [tag], "backend": {"kind": "process"},
                                  "claim_ahead": True}), pg_url,
               settings=WorkerSettings(poll_s=1.0, claim_ahead_after_s=0.0, claim_ahead_hold_s=5.0))
    run = asyncio.create_task(w.run())
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while await pool.fetchval("SELECT count(*) FROM completed_job WHERE id = ANY($1)", ids) < 3:
            assert asyncio.get_running_loop().time() < deadline, "jobs did not complete"
            await asyncio.sleep(0.05)
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
    rows = {r["id"]: r for r in await pool.fetch(
        "SELECT id, status, result, started_at, duration_ms FROM completed_job WHERE id = ANY($1)", ids)}
    logs = {r["job_id"]: r["text"] for r in await pool.fetch(
        "SELECT job_id, string_agg(chunk, '' ORDER BY id) AS text FROM job_logs"
        " WHERE job_id = ANY($1) GROUP BY job_id", ids)}
    await pool.close()
    assert early == []
    assert [rows[i]["result"] for i in ids] == ["hi0", "hi1", "hi2"], rows
    assert all(f"hi{n}" in logs[i] for n, i in enumerate(ids)), logs
    # the second job started as the first one ended (by the jobs' own clocks), not 0.4 s
    # later, after the first one's logs
    stamps = [dict(line.split() for line in logs[i].splitlines() if " " in line) for i in ids]
    gap = float(stamps[1]["start"]) - float(stamps[0]["end"])
    assert gap < 0.25, gap


@pytest.mark.timeout(150)
def test_latency_bench_quick_reports_cpu_per_process() -> None:
    # `python -m bench.latency --quick` is small enough for a smoke test, and reports
    # the CPU per job of each process.
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bench.latency", "--backend", "process", "--language",
                        "bash", "--quick"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "throughput" in r.stdout and "over 40 jobs" in r.stdout, r.stdout
    line = next(x for x in r.stdout.splitlines() if "CPU per job" in x)
    assert all(k in line for k in ("server", "worker", "sandbox", "postgres")), line


async def test_a_short_jobs_logs_ride_on_its_completion(pg_url, monkeypatch) -> None:
    # Round 2: a job that ends before its first log write (FLUSH_EVERY_S) has its whole log
    # appended by its completion's statement, no statement of its own; a long job's logs
    # still stream while it runs. Either way, who sees the job completed sees all its logs.
    if ProcessBackend().warm_pool is None:
        pytest.skip("no warm process backend here")
    pool = await dbmod.create_pool(pg_url)
    tag = "carrylogs-" + uuid.uuid4().hex[:6]
    wrote: list[uuid.UUID] = []  # jobs whose logs took a statement of their own
    write = queue.append_logs

    async def counting_append_logs(db, job_id, chunks):
        wrote.append(job_id)
        await write(db, job_id, chunks)

    monkeypatch.setattr(queue, "append_logs", counting_append_logs)
    short = [await queue.push(pool, workspace="w", language="bash", args={}, tag=tag,
                              content=f"echo one{i}; echo err >&2; printf 'tail{i}'") for i in range(5)]
    long = await queue.push(pool, workspace="w", language="bash", args={}, tag=tag,
                            content="echo early; sleep 1.5; echo late")
    w = Worker(profile_from_dict({"name": "carrylogs", "tags": [tag], "backend": {"kind": "process"},
                                  "claim_ahead": True}), pg_url,
               settings=WorkerSettings(poll_s=1.0, claim_ahead_after_s=0.0))
    run = asyncio.create_task(w.run())
    seen_early = False
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while await pool.fetchval("SELECT count(*) FROM completed_job WHERE id = ANY($1)", [*short, long]) < 6:
            assert asyncio.get_running_loop().time() < deadline, "jobs did not complete"
            if not seen_early and not await pool.fetchval("SELECT count(*) FROM completed_job WHERE id = $1", long):
                seen_early = bool(await pool.fetchval(
                    "SELECT count(*) FROM job_logs WHERE job_id = $1 AND chunk LIKE '%early%'", long))
            await asyncio.sleep(0.05)
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
    logs = {r["job_id"]: r["text"] for r in await pool.fetch(
        "SELECT job_id, string_agg(chunk, '' ORDER BY id) AS text FROM job_logs"
        " WHERE job_id = ANY($1) GROUP BY job_id", [*short, long])}
    await pool.close()
    for i, j in enumerate(short):
        assert sorted(logs[j].splitlines()) == sorted([f"one{i}", "err", f"tail{i}"]), logs[j]
    assert logs[long] == "early\nlate\n"
    assert seen_early, "the long job's first line was not stored while it ran"
    assert set(wrote) == {long}, wrote


async def test_a_zygotes_job_cgroups_are_recycled_and_nothing_carries_over(warm) -> None:
    # Round 2 (cgroup v1): an emptied job cgroup serves a later job of the same zygote
    # (reset instead of a new mkdir and an rmdir per job, ~0.6 ms of kernel time); the
    # next job sees nothing of the last one's: peak memory, OOM kills, limits.
    from sandmill.isolation import Limits
    from sandmill.isolation.cgroups import detect

    if detect().version != 1:
        pytest.skip("cgroups are recycled on v1 only")
    big = "python3 -c 'x = bytearray(100 << 20)'; grep memory /proc/self/cgroup"
    small = "grep memory /proc/self/cgroup"
    loose, tight = Limits(memory_mb=512), Limits(memory_mb=64)

    async def run(cmd: str, limits: Limits):
        o = await warm.run(RunSpec(argv=["/bin/bash", "-c", cmd], env=ENV, limits=limits))
        assert o.warm, o
        return o

    seen = []
    oom = await run(big, tight)  # killed by the OOM killer in its cgroup
    assert oom.status is Status.memory_limit, oom
    for _ in range(8):
        o = await run(small, loose)
        assert o.status is Status.success, o
        assert o.peak_memory_kb < 50 * 1024, o.peak_memory_kb
        seen.append(o.stdout.decode().strip())
        o = await run(big, loose)  # the 64 MB limit of the OOM job is not this one's
        assert o.status is Status.success, o
        assert o.peak_memory_kb > 90 * 1024, o.peak_memory_kb
        seen.append(o.stdout.decode().strip().splitlines()[-1])
    # the same few cgroups, not one per job (16 here): the running one, those of the job
    # processes forked ahead (FORK_DEPTH), the empty one the zygote parks in, the last
    # job's in its clean-up, a spare (and a fresh one where one was not reset: too much
    # of a big job's memory left charged)
    assert len(set(seen)) <= len(seen) // 2, seen
