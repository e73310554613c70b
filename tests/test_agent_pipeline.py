"""An agent's completions overlap its slots' held jobs (``Feed.send_first``): once its
slots have run half the jobs they hold, their completions go out while they run the other
half, and two are in flight, rather than one round trip for the whole batch after every
slot ran all it held
(the agent's drain at 52-66% of the DB worker's: docs/performance.md, "Agent workers")."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from sandmill.worker.batching import Batcher
from sandmill.worker.feed import Feed, Pace, SlotState
from sandmill.worker.settings import WorkerSettings

SLOTS, HELD = 8, 32


def _drain(send_first: bool) -> dict:
    """8 slots, each holding 32 jobs that run at once (no-op jobs), hand in a completion per
    job; a completion's round trip takes 20 ms. What each batch carried, how many jobs the
    slots still held when it went out, and the most batches in flight at once."""

    async def run() -> dict:
        settings = WorkerSettings(claim_ahead_cover_s=1.0, claim_ahead_max=HELD)
        pace = Pace(settings)
        pace.note(0.0001)  # no-op jobs: a slot holds HELD
        feed = Feed(None, settings, None, pace, set(), set(), lambda c: None)  # type: ignore[arg-type]
        feed.send_first = send_first
        sent: list[tuple[int, int]] = []  # (completions in the batch, jobs still held then)
        flying, most = 0, 0
        states = [SlotState(ready=deque({"id": f"{s}-{i}"} for i in range(HELD))) for s in range(SLOTS)]

        async def round_trip(reqs: list[int]) -> list[None]:
            nonlocal flying, most
            sent.append((len(reqs), sum(len(st.ready) for st in states)))
            flying += 1
            most = max(most, flying)
            await asyncio.sleep(0.02)
            flying -= 1
            return [None] * len(reqs)

        feed.completer = Batcher(round_trip, in_flight=2)

        async def slot(st: SlotState) -> None:
            while (job := await feed.next_held(st)) is not None:
                feed.completer.enqueue(job["id"])  # the job ran (no-op): its completion

        t0 = time.monotonic()
        await asyncio.gather(*(slot(st) for st in states))
        await feed.completer.wait_idle()
        return {"sent": sent, "most_in_flight": most, "s": time.monotonic() - t0}

    return asyncio.run(run())


def test_completions_go_out_while_the_slots_run_their_held_jobs():
    before = _drain(send_first=False)  # the DB worker's default
    assert before["sent"][0] == (SLOTS * HELD, 0)  # one batch of all, after every job ran
    assert before["most_in_flight"] == 1

    after = _drain(send_first=True)
    first, held_then = after["sent"][0]  # half of each slot's jobs ran: their completions go
    assert first == SLOTS * HELD // 2 and held_then == SLOTS * HELD // 2, after["sent"][:3]
    assert after["most_in_flight"] == 2
    assert sum(n for n, _ in after["sent"]) == SLOTS * HELD  # every completion, once
