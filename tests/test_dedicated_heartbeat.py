"""Issue 18: a dedicated worker's heartbeat must not take for lost the jobs of a claim that
committed while the heartbeat statement ran (its snapshot predates them, so they are
missing from its answer although they are the worker's). Marked lost, they were skipped,
yet still held and heartbeated by the worker: never run, never given back (the bench's
drain of 5000 jobs hung now and then)."""

from __future__ import annotations

import asyncio
import types
import uuid

from sandmill.profiles.model import profile_from_dict
from sandmill.store import db as dbmod
from sandmill.store import queue
from sandmill.worker.dedicated import Dedicated
from sandmill.worker.stmt_timing import StatementTiming


async def _scenario(url: str) -> tuple[set[uuid.UUID], uuid.UUID, uuid.UUID, list]:
    ws = "ws" + uuid.uuid4().hex[:8]
    profile = profile_from_dict({"name": "hb", "dedicated_workers": [f"{ws}:f/x"],
                                 "backend": {"kind": "process"}})
    pool = await dbmod.create_pool(url)
    conn = await dbmod.connect(url)
    locker = await dbmod.connect(url)
    try:
        w = types.SimpleNamespace(profile=profile, pool=pool, name="hb-" + uuid.uuid4().hex[:6],
                                  timing=StatementTiming())
        d = Dedicated(w)  # type: ignore[arg-type]
        lp = d.loops[0]

        async def push() -> uuid.UUID:
            return await queue.push(conn, workspace=ws, language="python3", content="def main():\n    pass\n",
                                    args={}, tag=lp.tag, script_path="f/x", script_hash="h" * 16)

        a = await push()
        await lp._claim_now()  # job a is the worker's
        assert [j["id"] for j in lp.local] == [a]
        # hold job a's row: the heartbeat takes its snapshot, then waits on that row
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT 1 FROM queue WHERE id = $1 FOR UPDATE", a)
        ping = asyncio.ensure_future(d.ping_once())
        for _ in range(200):  # until the heartbeat waits on the lock
            await asyncio.sleep(0.05)
            if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                   " AND query LIKE '%last_ping = now()%'"):
                break
        else:
            raise AssertionError("the heartbeat never waited on the locked row")
        b = await push()
        await lp._claim_now()  # job b is claimed and committed after the heartbeat's snapshot
        await tx.rollback()
        await asyncio.wait_for(ping, 30)
        held = {r["id"] for r in await conn.fetch("SELECT id FROM queue WHERE worker = $1 AND running", w.name)}
        return set(lp.lost), a, b, [held]
    finally:
        await locker.close()
        await conn.close()
        await pool.close()


def test_a_claim_committing_during_the_heartbeat_is_not_taken_for_lost(pg_url):
    lost, a, b, (held,) = asyncio.run(_scenario(pg_url))
    assert held == {a, b}  # both are the worker's in the database ...
    assert b not in lost  # ... so neither may be skipped as lost (it would stay held forever)
    assert a not in lost
