"""A dedicated worker whose LISTEN connection was lost wakes its loops when it is back: a
job queued meanwhile (its NOTIFY went nowhere) runs then, not at the next poll (30 s)."""

from __future__ import annotations

import asyncio
import time
import uuid

from sandmill.store import db as dbmod

from support import recreate_database, wait_done


async def _sql(url: str, stmt: str, *args):
    conn = await dbmod.connect(url)
    try:
        return await conn.fetchval(stmt, *args)
    finally:
        await conn.close()


def test_a_job_queued_while_listen_was_down_runs_when_it_is_back(pg_server, make_cluster):
    dbname = "sandmill_dedr_" + uuid.uuid4().hex[:6]

    async def fresh() -> str:  # a database of its own: no connections to it are let in for a while
        url = await recreate_database(pg_server, dbname)
        await dbmod.migrate_url(url)
        return url

    c = make_cluster(db_url=asyncio.run(fresh()))
    ws, path = "w" + uuid.uuid4().hex[:6], "ded" + uuid.uuid4().hex[:6]
    name = "dedr-" + uuid.uuid4().hex[:6]
    admin = pg_server.get_uri()
    with c.client() as api:
        r = api.post(f"/api/w/{ws}/scripts/create", json={"path": path, "content": "def main(x):\n    return x\n",
                                                          "language": "python3", "dedicated_worker": True})
        assert r.status_code == 201, r.text
        c.start_worker(profile_text=f'name: {name}\ndedicated_workers: ["{ws}:{path}"]\nbackend: {{kind: process}}\n'
                                    'subworkers: 1\nlimits: {wall_s: 20, memory_mb: 128}\n')
        c.wait_workers(name)
        first = api.post(f"/api/w/{ws}/jobs/run/p/{path}", json={"x": 0}).text.strip('"')
        assert wait_done(api, ws, first, timeout=60)["success"], c.logs()
        # No new connection to the database while the listener is cut: it cannot come back
        # before the job is queued (the server's and the worker's open connections stay).
        asyncio.run(_sql(admin, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false'))
        try:
            cut = asyncio.run(_sql(admin, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                          " WHERE datname = $1 AND application_name = $2 AND query ILIKE 'LISTEN%'",
                                   dbname, f"sandmill-worker {name}"))
            assert cut == 1, cut
            jid = api.post(f"/api/w/{ws}/jobs/run/p/{path}", json={"x": 1}).text.strip('"')
            time.sleep(1.0)
        finally:
            asyncio.run(_sql(admin, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true'))
        t0 = time.monotonic()
        assert wait_done(api, ws, jid, timeout=25)["success"], c.logs()
        assert time.monotonic() - t0 < 15, "the job waited for the loop's poll"
