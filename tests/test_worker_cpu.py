"""The worker's own CPU per job (docs/performance.md, "Round 3: the worker's CPU per job"):
the job's work dir made and removed with fewer system calls, the job's end awaited with no
task of its own, output already in the pipes read without a loop turn, and the completions
of short jobs held ahead sharing statements. Each cut keeps
what it replaced: nothing outside the work dir is followed or removed, caps hold."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from bench.common import count_completion_batches
from sandmill.isolation import Limits, workdir
from sandmill.isolation.output import CappedStream, drain
from sandmill.isolation.supervise import KILL_OUTPUT, KILL_TIMEOUT, Launched, supervise_launch
from sandmill.profiles import profile_from_dict
from sandmill.store import db as dbmod
from sandmill.store import queue
from sandmill.worker.feed import SlotState
from sandmill.worker.settings import WorkerSettings
from sandmill.worker.worker import Worker


def test_work_dir_is_made_without_mkdtemp(tmp_path: Path, monkeypatch) -> None:
    # os.mkdir with a random name: mkdtemp's name sequence and pathlib cost more than the
    # mkdir itself on a job's path. Names stay unguessable and distinct, the dir 0700.
    def no_mkdtemp(*a, **k):
        raise AssertionError("mkdtemp on a job's path")

    monkeypatch.setattr(tempfile, "mkdtemp", no_mkdtemp)
    root = tmp_path / "jobs"
    made = [workdir.create(root, {"main.sh": b"echo 1\n"}, None, None) for _ in range(50)]
    assert len({d.name for d in made}) == 50
    for d in made:
        assert d.parent == root and d.name.startswith("job-") and len(d.name) == 16
        assert (d.stat().st_mode & 0o777) == 0o700
        assert (d / "main.sh").read_bytes() == b"echo 1\n"
        workdir.remove(d)
    assert list(root.iterdir()) == []


def test_work_dir_of_files_goes_without_rmtree_and_follows_no_link(tmp_path: Path, monkeypatch) -> None:
    # The usual job leaves only files: they go by name relative to the dir's fd. A link the
    # job left to something outside is removed, never followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    wd = workdir.create(tmp_path / "jobs", {"main.sh": b"echo 1\n", "a.txt": b""}, None, None)
    (wd / "to_dir").symlink_to(outside)
    (wd / "to_file").symlink_to(outside / "keep")
    os.mkfifo(wd / "fifo")
    (wd / "locked").write_text("y")
    os.chmod(wd / "locked", 0)

    def no_rmtree(*a, **k):
        raise AssertionError("rmtree for a dir of files")

    monkeypatch.setattr(shutil, "rmtree", no_rmtree)
    workdir.remove(wd)
    assert not wd.exists()
    assert (outside / "keep").read_text() == "x"


def test_work_dir_with_subdirs_or_as_a_link_is_removed_as_before(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    wd = workdir.create(tmp_path / "jobs", {"a/b/c.txt": b"c", "d.txt": b"d"}, None, None)
    (wd / "a" / "link").symlink_to(outside)
    os.chmod(wd / "a" / "b", 0o500)
    workdir.remove(wd)
    assert not wd.exists() and (outside / "keep").read_text() == "x"
    # a work dir swapped for a link: nothing behind it is touched
    link = tmp_path / "jobs" / "job-link"
    link.symlink_to(outside)
    workdir.remove(link)
    assert (outside / "keep").read_text() == "x"
    workdir.remove(tmp_path / "jobs" / "job-gone")  # gone already: no error


def _launch_writing(data: bytes, ended: asyncio.Future | None = None):
    """A launch whose 'job' wrote ``data`` to its stdout and ended (or ends when killed,
    when ``ended`` is given)."""

    async def launch(stdin_fd: int | None, out_w: int, err_w: int) -> Launched:
        if data:
            os.write(out_w, data)

        async def wait() -> int:
            if ended is None:
                return 0
            return await ended

        def kill() -> None:
            if ended is not None and not ended.done():
                ended.set_result(-9)

        return Launched(wait=wait(), pgid=None, kill=kill, sweep=False)

    return launch


async def test_the_jobs_end_is_awaited_with_no_task_of_its_own() -> None:
    # supervise used to run the job's wait in a task and end its watch through a future:
    # a task and two loop turns per job.
    loop = asyncio.get_running_loop()
    made: list[object] = []
    default = loop.get_task_factory()

    def factory(loop, coro, **kw):
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kw) if default is None else default(loop, coro, **kw)

    loop.set_task_factory(factory)
    try:
        sup = await supervise_launch(_launch_writing(b"1\n"), stdin=b"", limits=Limits(wall_s=5),
                                     cgroup=None, on_output=None)
    finally:
        loop.set_task_factory(default)
    assert made == []
    assert sup.returncode == 0 and sup.stdout == b"1\n" and sup.killed_for is None


async def test_the_deadline_and_an_output_overflow_still_end_the_job() -> None:
    ended = asyncio.get_running_loop().create_future()
    sup = await supervise_launch(_launch_writing(b"", ended), stdin=b"", limits=Limits(wall_s=0.2),
                                 cgroup=None, on_output=None)
    assert sup.killed_for == KILL_TIMEOUT and sup.returncode == -9
    # more than the cap, in the pipe when the job has ended: read at the drain, still an overflow
    sup = await supervise_launch(_launch_writing(b"x" * 5000), stdin=b"",
                                 limits=Limits(wall_s=5, output_bytes=1000), cgroup=None, on_output=None)
    assert sup.killed_for == KILL_OUTPUT and sup.stdout_truncated and len(sup.stdout) == 1000


async def test_output_in_the_pipe_at_the_jobs_end_is_read_without_a_wait() -> None:
    # At the job's end its pipes mostly hold their last output and EOF already: drain reads
    # them at once, with no wait for the loop to report them (a future, a timer, turns).
    r, w = os.pipe2(os.O_CLOEXEC)
    got: list[bytes] = []
    s = CappedStream("stdout", r, 1 << 20, lambda _n, c: got.append(c), lambda: None)
    os.write(w, b"last line\n")
    os.close(w)
    step = drain([s], grace=5).__await__()
    with pytest.raises(StopIteration):  # done without suspending once
        next(step)
    assert bytes(s.buf) == b"last line\n" and got == [b"last line\n"] and s.done.done()


async def test_a_writer_that_never_stops_does_not_hold_the_drain() -> None:
    # read_now reads a bounded number of chunks: a writer still alive (a stray process
    # outside any cgroup) cannot keep the worker in a loop
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(w, False)
    s = CappedStream("stdout", r, 1 << 30, None, lambda: None)
    try:
        os.write(w, b"y" * 60000)
        s.read_now(max_reads=4)
        assert len(s.buf) == 60000 and s.fd >= 0  # no EOF: still open
    finally:
        s.close()
        os.close(w)


def test_a_short_jobs_completion_waits_for_the_next_one_unless_someone_waits_on_it() -> None:
    # With more jobs held than the one it starts, a short job's completion is not wanted
    # before those have run: it waits (about one job and a half) for company.
    w = Worker(profile_from_dict({"name": "share", "tags": ["s"], "native": True}), "postgresql://unused",
               settings=WorkerSettings(completion_lazy_s=0.02))
    w.pace.job_s = 0.003
    st = SlotState()
    nxt = {"id": uuid.uuid4()}
    ran: dict = {"id": uuid.uuid4()}
    assert w.slots._completion_wait_s(st, ran, 0.003, nxt, False) == 0.0  # nothing more held
    st.ready.append({"id": uuid.uuid4()})
    assert w.slots._completion_wait_s(st, ran, 0.003, nxt, False) == pytest.approx(0.0045)
    st.ready.extend({"id": uuid.uuid4()} for _ in range(20))
    assert w.slots._completion_wait_s(st, ran, 0.003, nxt, False) == 0.02  # completion_lazy_s at most
    assert w.slots._completion_wait_s(st, {**ran, "notify_done": True}, 0.003, nxt, False) == 0.0


async def test_short_jobs_held_ahead_share_their_completions_statements(pg_url) -> None:
    """One slot, a backlog of 3 ms jobs, several held ahead (claim_ahead_cover_s 30 ms):
    a completion waits for the next job's, so a statement completes two jobs or more; each
    used to go alone (its round trip is shorter than a job). Every job runs once."""
    tag = "share-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    ids = [await queue.push(pool, workspace="w", language="sleep", content="", args={"seconds": 0.003}, tag=tag)
           for _ in range(150)]
    w = Worker(profile_from_dict({"name": "share", "tags": [tag], "native": True}), pg_url,
               settings=WorkerSettings(poll_s=1.0, claim_ahead_after_s=0.0, claim_ahead_cover_s=0.03))
    sizes = count_completion_batches(w)
    run = asyncio.create_task(w.run())
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while await pool.fetchval("SELECT count(*) FROM completed_job WHERE id = ANY($1)", ids) < len(ids):
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.02)
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
    assert sum(sizes) == len(ids) and sum(sizes) / len(sizes) >= 1.8, sizes
    rows = await pool.fetch("SELECT status, started_at FROM completed_job WHERE id = ANY($1)", ids)
    assert len(rows) == len(ids) and {r["status"] for r in rows} == {"success"}
    assert all(r["started_at"] is not None for r in rows)
    await pool.close()


def test_completions_bench_quick_reports_both_ways() -> None:
    # python -m bench.completions --quick: the before/after of the shared statements, in
    # seconds (the switch SANDMILL_SHARE_SHORT_COMPLETIONS=0 gives the before)
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "bench.completions", "--quick"], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    per = {m[0]: float(m[1]) for m in re.findall(r"^\s+(off|on)\s+([\d.]+) jobs a statement", p.stdout, re.M)}
    assert set(per) == {"off", "on"}, p.stdout
    # a smoke run under the suite's load: that the switch shares statements; the size of
    # the gain is the benchmark's figure, and test_short_jobs_held_ahead_share_... pins it
    assert per["off"] < 1.5 and per["on"] > per["off"], p.stdout
