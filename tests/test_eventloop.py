"""The worker's event loop: its timers end their waits on time (a timerfd in the epoll
set), a fired timer never leaves the loop spinning, and it falls back to asyncio's own
loop where timerfd is missing."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
import types

import pytest

from sandmill.worker import eventloop

pytestmark = pytest.mark.skipif(eventloop._timerfd() is None, reason="needs Linux timerfd")


def _lateness_ms(selector, wait_s: float, tries: int = 15) -> float:
    late = []
    for _ in range(tries):
        t0 = time.monotonic()
        selector.select(wait_s)
        late.append((time.monotonic() - t0 - wait_s) * 1000)
    return statistics.median(late)


def test_a_wait_ends_at_its_timeout_not_at_the_next_millisecond():
    """10.05 ms: epoll alone waits 11 ms (rounded up) plus its slack, about 1 ms late."""
    sel = eventloop.PreciseEpollSelector()
    try:
        late = _lateness_ms(sel, 0.01005)
    finally:
        sel.close()
    assert 0 <= late < 0.6, f"median {late:.2f} ms late"


def test_a_fired_timer_does_not_keep_the_loop_busy():
    """After a wait that ended on the timer, a wait without timeout blocks until an fd is
    ready (the timerfd is disarmed), and select(0) polls."""
    sel = eventloop.PreciseEpollSelector()
    a, b = socket.socketpair()
    try:
        sel.register(a, eventloop.selectors.EVENT_READ)
        assert sel.select(0.002) == []
        t0 = time.monotonic()
        assert sel.select(0) == []
        assert time.monotonic() - t0 < 0.05
        b.send(b"x")
        ready = sel.select(None)  # returns at once, for the socket only
        assert [key.fileobj for key, _ in ready] == [a]
        a.recv(1)
        # nothing ready and no timer: a bounded wait must really wait (no timerfd event)
        t0 = time.monotonic()
        assert sel.select(0.05) == []
        assert time.monotonic() - t0 >= 0.05
    finally:
        sel.close()
        a.close()
        b.close()


def test_the_loop_runs_timers_sockets_and_subprocesses():
    async def main() -> tuple[float, bytes]:
        t0 = time.monotonic()
        await asyncio.sleep(0.0205)
        slept = time.monotonic() - t0
        proc = await asyncio.create_subprocess_exec("echo", "hi", stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return slept, out

    with asyncio.Runner(loop_factory=eventloop.new_event_loop) as runner:
        assert isinstance(runner.get_loop()._selector, eventloop.PreciseEpollSelector)
        slept, out = runner.run(main())
    assert slept >= 0.0205 and out == b"hi\n"


def test_without_timerfd_it_is_asyncios_own_loop(monkeypatch):
    monkeypatch.setattr(eventloop, "_timerfd", lambda: None)
    loop = eventloop.new_event_loop()
    try:
        assert not isinstance(loop._selector, eventloop.PreciseEpollSelector)
        assert loop.run_until_complete(asyncio.sleep(0.001, "ok")) == "ok"
    finally:
        loop.close()


def test_the_timer_is_armed_once_for_the_same_deadline(monkeypatch):
    """A busy loop waits again and again for the same next timer: the pending timerfd is
    kept, not re-armed each turn."""
    # A clock that moves 1 us a read: the test's and the selector's reads of one turn
    # stay within _SAME_S however long the host keeps this process off a core.
    ticks = iter(range(10**9))
    t0 = time.monotonic()
    monkeypatch.setattr(eventloop, "time", types.SimpleNamespace(monotonic=lambda: t0 + next(ticks) * 1e-6))
    time_ = eventloop.time
    sel = eventloop.PreciseEpollSelector()
    a, b = socket.socketpair()
    arms = []
    arm = sel._arm
    sel._arm = lambda ns: (arms.append(ns), arm(ns))
    try:
        sel.register(a, eventloop.selectors.EVENT_READ)
        b.send(b"x")  # always ready: each select returns at once
        deadline = time_.monotonic() + 5
        for _ in range(100):
            assert len(sel.select(deadline - time_.monotonic())) == 1
        assert len(arms) == 1
        sel.select(1.0)  # a later timer: armed anew
        assert len(arms) == 2
        for _ in range(10):  # polls of a loop with work to do leave the timer alone
            sel.select(0)
        assert len(arms) == 2
        sel.select(deadline - time_.monotonic())  # ...and a wait for a sooner one re-arms it
        assert len(arms) == 3
    finally:
        sel.close()
        a.close()
        b.close()


def test_a_worker_process_leaves_its_start_up_objects_out_of_garbage_collections():
    """A full collection walks every object the worker built at start (modules, the pool):
    75-100 ms in which none of its slots runs. Once started, those are frozen."""
    import gc

    from sandmill.worker.main import freeze_startup_objects

    before = gc.get_freeze_count()
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > max(before, 10_000)
    finally:
        gc.unfreeze()


async def test_a_worker_calls_on_started_once_it_is_up_and_before_any_job(pg_url):
    import uuid

    from sandmill.profiles import profile_from_dict
    from sandmill.worker.settings import WorkerSettings
    from sandmill.worker.worker import Worker

    tag = "ev-" + uuid.uuid4().hex[:6]
    w = Worker(profile_from_dict({"name": "ev", "tags": [tag], "native": True}), pg_url,
               settings=WorkerSettings(poll_s=1.0))
    seen: list[tuple[bool, int]] = []
    run = asyncio.create_task(w.run(on_started=lambda: seen.append((w.listener is not None, w.stats.jobs_done))))
    try:
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == [(True, 0)]
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
    assert len(seen) == 1


def test_the_worker_process_freezes_its_start_up_objects_once_started(monkeypatch):
    from sandmill.profiles import profile_from_dict
    from sandmill.worker import main

    given = []

    async def run(self, on_started=None):
        given.append(on_started)

    monkeypatch.setattr(main.Worker, "run", run)
    # run_worker installs a pidfd child watcher on its loop: once that loop is gone, later
    # tests in this process would find no working watcher for their subprocesses.
    monkeypatch.setattr(main, "fast_child_watcher", lambda: None)
    assert main.run_worker(profile_from_dict({"name": "ev", "tags": ["t"], "native": True}), "postgresql://unused") == 0
    assert given == [main.freeze_startup_objects]
