"""The SQL as named statements (store/sql/*.sql): the loader, the channels, the variants
kept in step, and (while the commit is at hand) that every statement the store sends is
the one it sent before the statements were written out whole, comments and whitespace
aside. No database: the store's functions run against a recording stand-in."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sandmill.store import queries, queue, scripts, workers
from sandmill.store.queries import QUERIES, parse

REPO = Path(__file__).resolve().parents[1]
# The last commit with the statements assembled from fragments in store/queue.py.
BEFORE = "5657a6923ee4cb7453d53b963f5ebcaaf4911bde"


# ---- the loader ------------------------------------------------------------------------------

def test_parse_names_describes_and_drops_the_semicolon():
    text = ("-- a file comment\n\n-- name: one\n-- Does one thing.\n-- $1 what.\n"
            "SELECT 1\n  -- inside\n  , $1;\n\n\n-- name: two\n-- Two.\nSELECT 2;\n")
    one, two = parse(text)
    assert (one.name, one.doc, one.sql) == ("one", "Does one thing.\n$1 what.",
                                            "SELECT 1\n  -- inside\n  , $1")
    assert (two.name, two.sql) == ("two", "SELECT 2")


def test_a_statement_needs_a_description():
    with pytest.raises(ValueError, match="no description"):
        parse("-- name: bare\nSELECT 1;\n")


def test_a_name_given_twice_fails_at_load(monkeypatch, tmp_path):
    pkg = tmp_path / "sql"
    pkg.mkdir()
    (pkg / "a.sql").write_text("-- name: same\n-- A.\nSELECT 1;\n")
    (pkg / "b.sql").write_text("-- name: same\n-- B.\nSELECT 2;\n")

    class Files:
        def joinpath(self, _):
            return pkg
    monkeypatch.setattr(queries.resources, "files", lambda _: Files())
    with pytest.raises(ValueError, match="'same' is defined twice: in a.sql and in b.sql"):
        queries.load()


def test_a_missing_name_fails_loudly():
    with pytest.raises(KeyError, match="no SQL statement named 'nope'"):
        queries.sql("nope")


def test_every_statement_is_used_and_described():
    # importing the store's modules took every statement they use
    import sandmill.store.claims, sandmill.store.jobs, sandmill.store.reads, sandmill.store.tokens  # noqa: F401,E401
    import sandmill.store.autoscale  # noqa: F401 (the autoscaler's)
    import sandmill.store.dedicated  # noqa: F401 (dedicated workers')
    import sandmill.store.agent  # noqa: F401 (agent workers': tokens, their checked writes)
    import sandmill.store.dashboard  # noqa: F401 (the dashboard's and the metrics' reads)
    import sandmill.store.pydeps  # noqa: F401 (python dependencies' locks)
    assert set(QUERIES) == queries._used
    for q in QUERIES.values():
        assert q.doc.strip() and not q.sql.rstrip().endswith(";"), q.name


def test_the_channels_in_the_sql_are_the_constants():
    assert queue.CH_QUEUE == "sandmill_queue" and queue.CH_DONE == "sandmill_done"
    assert queue.CH_CANCEL == "sandmill_cancel" and workers.CH_CONFIG == "sandmill_config"
    used = {ch for q in QUERIES.values() for ch in re.findall(r"pg_notify\('([^']*)'", q.sql)}
    assert used == set(queries.CHANNELS)


def test_one_tag_variants_differ_in_the_tag_test_only():
    for name in ("pull", "pull_many", "pull_many_ahead", "complete_and_claim"):
        many, one = QUERIES[name].sql, QUERIES[name + "_one_tag"].sql
        assert many.count("q.tag = ANY($1::text[]) AND q.scheduled_for") == 1, name
        assert one == many.replace("q.tag = ANY($1::text[]) AND q.scheduled_for",
                                   "q.tag = ($1::text[])[1] AND q.scheduled_for"), name


def test_the_claim_and_completion_are_the_same_in_every_statement():
    """complete_and_claim is pull_many_ahead's claim (its $6, $7 as $16, $17) and complete's
    completion (its $1..$10 as $6..$15), comments aside."""
    both = without_logs(norm(QUERIES["complete_and_claim"].sql))
    claim = _with_list(QUERIES["pull_many_ahead"].sql, "SELECT * FROM claimed")
    assert _renumber(claim, {6: 16, 7: 17}) in both
    completion = _with_list(QUERIES["complete"].sql, "SELECT id,status FROM done")
    assert _renumber(completion, {k: k + 5 for k in range(1, 11)}) in both


def _with_list(sql: str, final: str) -> str:
    s = norm(sql)
    assert s.startswith("WITH ") and s.endswith(final)
    return s[len("WITH "):-len(final)]


def _renumber(s: str, new: dict[int, int]) -> str:
    return re.sub(r"\$(\d+)\b", lambda m: f"${new.get(int(m.group(1)), int(m.group(1)))}", s)


# ---- the same statements as before -----------------------------------------------------------

_TOKEN = re.compile(r"--[^\n]*|'(?:[^']|'')*'")  # a comment or a string literal, whichever starts first


def norm(s: str) -> str:
    """SQL text with its comments gone and its whitespace normalised (string literals kept)."""
    out, pos = [], 0
    for m in [*_TOKEN.finditer(s), None]:
        code = s[pos:m.start() if m else len(s)]
        code = re.sub(r"\s+", " ", code)
        code = re.sub(r"\s*([(),\[\]])\s*", r"\1", code)
        out.append(code)
        if m:
            out.append(" " if m.group().startswith("--") else m.group())
            pos = m.end()
    return re.sub(r"\s*([(),\[\]])\s*", r"\1", re.sub(r"\s+", " ", "".join(out))).strip().rstrip(";").strip()


def without_logs(s: str) -> str:
    """Normalised complete_and_claim(_one_tag) text without its logs CTE (the job_logs
    insert of $20, added after BEFORE): the rest is still the statement of then."""
    out, n = re.subn(r"\),logs AS\(INSERT INTO job_logs\(.*?\),released AS\(", "),released AS(", s)
    assert n == 1, s
    return out


_CLAIMS_WITH_LOGS = {QUERIES["complete_and_claim"].sql, QUERIES["complete_and_claim_one_tag"].sql}


class Recorder:
    """A stand-in for a connection: records each statement and answers from ``answers``
    (in order), then with nothing."""

    def __init__(self, answers=()):
        self.sent: list[tuple[str, str, tuple]] = []
        self.answers = list(answers)

    def _answer(self, method, sql, args, default):
        self.sent.append((method, sql, args))
        return self.answers.pop(0) if self.answers else default

    async def fetch(self, sql, *args):
        return self._answer("fetch", sql, args, [])

    async def fetchrow(self, sql, *args):
        return self._answer("fetchrow", sql, args, None)

    async def fetchval(self, sql, *args):
        return self._answer("fetchval", sql, args, None)

    async def execute(self, sql, *args):
        return self._answer("execute", sql, args, "OK")

    def transaction(self):
        class Tx:
            async def start(self): pass
            async def commit(self): pass
            async def rollback(self): pass
        return Tx()


J1, J2 = uuid.UUID(int=1), uuid.UUID(int=2)
T0 = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
ONE, MANY = ["a"], ["a", "b(ws1+ws2)", "c"]


def _scenarios(q, w, s):
    """(name, answers, call) for every store function; q, w, s: the queue, workers and
    scripts modules to run."""
    done = [q.Completion(J1, "w", "success", {"x": [1]}, None, 5, 3, 100, {"k": 1}),
            q.Completion(J2, "w", "failure", None, "boom", started_at=T0)]
    stale = [{"id": J1, "worker": "w1", "restarts": 0, "started": False},
             {"id": J2, "worker": "w2", "restarts": 3, "started": True},
             {"id": J1, "worker": "w3", "restarts": 0, "started": True}]
    return [
        ("push", [], lambda db: q.push(db, workspace="ws", language="python3", content="x", args={"a": 1},
                                       tag="t", kind="preview", script_path="f/x", script_hash="h",
                                       priority=2, timeout_s=3.0, scheduled_in_secs=4,
                                       created_by="me", concurrency_key="k", concurrent_limit=1,
                                       concurrency_time_window_s=5, notify_done=True)),
        ("pull one", [], lambda db: q.pull(db, "w", ONE)),
        ("pull many", [{"id": None, "cand_id": J1}], lambda db: q.pull(db, "w", MANY)),
        ("pull_many one", [], lambda db: q.pull_many(db, "w", ONE, 3)),
        ("pull_many many", [], lambda db: q.pull_many(db, "w", MANY, 3)),
        ("pull_many ahead one", [], lambda db: q.pull_many(db, "w", ONE, 3, ahead=2, ahead_after_s=1)),
        ("pull_many ahead many", [], lambda db: q.pull_many(db, "w", MANY, 3, ahead=2, ahead_after_s=1)),
        ("complete_many", [], lambda db: q.complete_many(db, done)),
        ("complete", [], lambda db: q.complete(db, J1, "w", status="success", result=1, error=None,
                                               duration_ms=1, cpu_ms=2, mem_peak_kb=3, outcome=None)),
        ("complete_and_pull one", [], lambda db: q.complete_and_pull(
            db, done, "w", ONE, 2, ahead=1, ahead_after_s=0.5, starting=[(J2, T0)])),
        ("complete_and_pull many", [], lambda db: q.complete_and_pull(db, done, "w", MANY, 2)),
        ("prepare one", [], lambda db: q.prepare_worker_statements(db, "w", ONE)),
        ("prepare many", [], lambda db: q.prepare_worker_statements(db, "w", MANY)),
        ("next_due", [], lambda db: q.next_due(db, MANY)),
        ("cancel", [], lambda db: q.cancel(db, "ws", J1, "me", "why")),
        ("requeue", [], lambda db: q.requeue(db, J1, "w")),
        ("requeue_stale", [stale], lambda db: q.requeue_stale(db, 30, 3)),
        ("ping_job", [], lambda db: q.ping_job(db, J1, "w")),
        ("append_logs", [], lambda db: q.append_logs(db, J1, ["a\n", "b\n"])),
        ("insert_completed", [], lambda db: q.insert_completed(
            db, workspace="ws", kind="init", language="bash", content="x", tag="t", worker="w",
            started_at=T0, status="success", result=None, error=None, logs="l", duration_ms=1,
            cpu_ms=2, mem_peak_kb=3, outcome={"o": 1})),
        ("get_job", [], lambda db: q.get_job(db, "ws", J1)),
        ("get_completed", [], lambda db: q.get_completed(db, "ws", J1)),
        ("job_state", [], lambda db: q.job_state(db, "ws", J1)),
        ("get_logs", [{"text": "", "last": 0}], lambda db: q.get_logs(db, J1, 7)),
        ("list_jobs", [], lambda db: q.list_jobs(db, "ws", limit=5, script_path="p", success=True,
                                                 running=False)),
        ("key_has_slot", [], lambda db: q.key_has_slot(db, J1)),
        ("queued_tags_without_workers", [], lambda db: q.queued_tags_without_workers(db, ["a"], "ws")),
        ("counts", [{}], lambda db: q.counts(db)),
        ("is_future", [], lambda db: q.is_future(db, T0)),
        ("register", [], lambda db: w.register(db, name="n", group="g", hostname="h", tags=["t"],
                                               backend="process", subworkers=2, info={"i": 1})),
        ("ping", [], lambda db: w.ping(db, "n", tags=["t"], jobs_done=1, busy=2, occupancy=0.5)),
        ("unregister", [], lambda db: w.unregister(db, "n")),
        ("list_workers", [], lambda db: w.list_workers(db, 60)),
        ("get_config", [], lambda db: w.get_config(db, "worker__g")),
        ("put_config", [], lambda db: w.put_config(db, "worker__g", {"c": 1})),
        ("create script", [], lambda db: s.create(db, "ws", "f/x", {"language": "python3", "content": "x",
                                                                     "tag": "t", "priority": 1})),
        ("get_by_path", [], lambda db: s.get_by_path(db, "ws", "f/x")),
        ("get_by_hash", [], lambda db: s.get_by_hash(db, "ws", "h")),
        ("list_scripts", [], lambda db: s.list_scripts(db, "ws")),
    ]


async def _sent_since() -> set[str]:
    """The statements added after BEFORE (none to compare with): the monitor's and the
    result waiters' after a database outage, the tokens'."""
    from sandmill.store import jobs
    db = Recorder([0.0])
    await jobs.db_up_s(db)
    await jobs.completed_among(db, [J1])
    db.answers = [100.0]  # up long enough: the stale jobs are read
    await jobs.requeue_stale(db, 30, 3, db_settle_s=30)
    db.answers = []  # a server's concurrent submits in one statement (server/submit_batch.py)
    await jobs.push_many(db, [{"job_id": J1, "workspace": "ws", "language": "bash", "content": "echo",
                               "args": {}, "tag": "bash"}])
    from sandmill.store import tokens  # the workspace tokens' statements
    db.answers = [{"prefix": "p"}]
    await tokens.create(db, label="l", workspace="ws", scopes=["jobs:run"], expires_at=None)
    await tokens.authenticate(db, "smt_0123456789ab_" + "s" * 43)
    await tokens.list_tokens(db, "ws")
    await tokens.delete(db, "0123456789ab")
    from sandmill.store import queue  # completions that carry their jobs' logs (fast path, round 2)
    db.answers = []
    logged = [queue.Completion(J1, "w", "success", 1, None, logs="a\n")]
    await queue.complete_and_pull(db, logged, "w", ["a"], 1)
    await queue.complete_and_pull(db, logged, "w", ["a", "b"], 1)
    from sandmill.store import dedicated  # dedicated workers' (migration 0007)
    db.answers = []
    await dedicated.claim(db, "ws:f/x", "w", 512)
    await dedicated.complete(db, "w", [dedicated.Done(J1, "success", "1", None, 1, 2, "{}", None, "log")])
    db.answers = [{"held": [J1], "canceled": []}]
    await dedicated.ping(db, "w", [(J1, dt.datetime.now(dt.timezone.utc))])
    await dedicated.give_back(db, "w", [J1])
    await jobs.push_if_latest(db, workspace="ws", language="python3", content="", args={}, tag="t",
                              script_path="f/x", script_hash="h")  # a run by path, remembered
    from sandmill.store import pydeps  # python dependencies' locks (migration 0011)
    db.answers = ["0123456789abcdef"]
    await pydeps.request_lock(db, "ws", "0123456789abcdef", "six\n", "t", {"content": "x", "path": "f/x"})
    await pydeps.script_lock(db, "ws", "0123456789abcdef")
    await pydeps.store_lock(db, "ws", "0123456789abcdef", "six==1.17.0", None)
    from sandmill.store import dashboard  # the dashboard's and the metrics' reads
    for call in (dashboard.queue_by_tag, dashboard.throughput, dashboard.group_names, dashboard.db_now,
                 dashboard.running_started):
        await call(db)
    await dashboard.active_jobs(db, workspace=None, script_path=None, tag=None, state=None, limit=5)
    await dashboard.completed_jobs(db, workspace=None, script_path=None, tag=None, status=None, limit=5)
    await dashboard.running_jobs_of(db, ["w"])
    await dashboard.last_admin_runs(db, ["w"])
    await dashboard.fold_completed(db, dt.datetime.now(dt.timezone.utc), dt.datetime.now(dt.timezone.utc), [1])
    await workers.set_gpu_jobs(db, "w", [{"index": 0, "name": "", "jobs": []}])  # a GPU worker's GPUs
    from sandmill.store import agent  # agent workers' (migration 0008)
    db.answers = []
    await agent.secret(db, "s")
    await agent.blacklist(db, "jti", "g", T0)
    await agent.blacklisted(db)
    await agent.completed_by(db, [J1], "w")
    await agent.append_log_if_held(db, J1, ["a\n"], "w")
    await agent.ping_workers(db, [("w", 1, 2, 0.5)])
    from sandmill.store import autoscale  # the autoscaler's (migration 0009)
    db.answers = []
    await autoscale.try_lock(db)
    await autoscale.publish_group(db, "g", {"name": "g"}, True, ["a", "b(ws1+ws2)"])
    await autoscale.groups(db)
    db.answers = [3]
    await autoscale.jobs_waiting(db, ["a"])
    db.answers = [{"workers": 0}]
    await autoscale.group_workers(db, "g", 60)
    await autoscale.set_desired(db, "g", ["a"], 2, "scale_out")
    await autoscale.insert_event(db, group="g", event_type="scale_out", from_workers=1, desired=2,
                                 reason="r", integration="dryrun", status="recorded", output="", server="s")
    await autoscale.list_events(db, "g", 5)
    await autoscale.desired_counts(db, ["g"])
    await autoscale.running_per_worker(db, "g")
    await autoscale.group_for_tag(db, "a", "ws")
    await autoscale.list_groups(db)
    await workers.set_gpu_jobs(db, "w", [{"index": 0, "name": "", "jobs": []}])  # a GPU worker's GPUs
    from sandmill.store import agent  # agent workers' (migration 0008)
    db.answers = []
    await agent.secret(db, "s")
    await agent.blacklist(db, "jti", "g", T0)
    await agent.blacklisted(db)
    await agent.completed_by(db, [J1], "w")
    await agent.append_log_if_held(db, J1, ["a\n"], "w")
    await agent.ping_workers(db, [("w", 1, 2, 0.5)])
    return {sql for _, sql, _ in db.sent}


async def _record(q, w, s) -> dict[str, list]:
    out = {}
    for name, answers, call in _scenarios(q, w, s):
        db = Recorder(answers)
        await call(db)
        out[name] = db.sent
    return out


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    """store/queue.py, workers.py and scripts.py as they were at BEFORE, importable."""
    pkg = tmp_path_factory.mktemp("before") / "store_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for f in ("queue.py", "workers.py", "scripts.py"):
        p = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:store/{f}"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"the commit before the rewrite is not at hand: {p.stderr.strip()}")
        (pkg / f).write_text(p.stdout)
    sys.path.insert(0, str(pkg.parent))
    try:
        import store_before.queue, store_before.scripts, store_before.workers  # noqa: E401
        yield store_before.queue, store_before.workers, store_before.scripts
    finally:
        sys.path.remove(str(pkg.parent))


async def test_every_statement_sent_is_the_one_sent_before(before, monkeypatch):
    ids = iter(range(100, 10**6))
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=next(ids)))  # new job ids
    old = await _record(*before)
    ids = iter(range(100, 10**6))
    new = await _record(queue, workers, scripts)
    for name in new:
        o, n = old[name], new[name]
        if name == "create script":  # script.dedicated_worker is back (migration 0007): false, not NULL,
            (m, sql, args), = o  # and in the hash only when true (so the hash differs from then)
            assert args[2] != n[0][2][2] and args[-1] is None
            o = [(m, sql, args[:2] + n[0][2][2:3] + args[3:-1] + (False,))]
        if name == "ping":  # the 15 s / 5 min / 30 min occupancy (autoscaling, migration 0009) rides along
            assert n[0][2][:5] == o[0][2] and n[0][2][5:8] == (0.0, 0.0, 0.0) and "occupancy_30m = $8" in n[0][1]
            # and the statement latency (worker/stmt_timing.py), merged into info: None leaves it
            assert n[0][2][8:] == (None,) and "'statement_latency', $9::jsonb" in n[0][1]
            continue
        if name == "requeue_stale":  # the WorkerDied message says what SANDMILL_MAX_RESTARTS means now
            assert "the 4th worker to die running it; a job survives 3 dead worker(s)" in n[3][2][4][0]
            o = o[:3] + [(o[3][0], o[3][1], o[3][2][:3] + n[3][2][3:5] + o[3][2][5:])] + o[4:]
        # complete_and_claim(_one_tag) gained the logs CTE and $20 since (NULL: no logs here)
        assert all(a[-1] is None for _, ns, a in n if ns in _CLAIMS_WITH_LOGS), name
        n = [(m, ns, a[:-1]) if ns in _CLAIMS_WITH_LOGS else (m, ns, a) for m, ns, a in n]
        assert [(m, a) for m, _, a in n] == [(m, a) for m, _, a in o], name
        for (_, ns, _), (_, os_, _) in zip(n, o):
            nn = without_logs(norm(ns)) if ns in _CLAIMS_WITH_LOGS else norm(ns)
            assert nn == norm(os_), f"{name}:\n{ns}\n----- before:\n{os_}"
    sent = {sql for calls in new.values() for _, sql, _ in calls}
    sent |= await _sent_since()
    assert {q.sql for q in QUERIES.values()} <= sent, "a statement the scenarios never send"


def test_the_old_fragments_gave_these_texts(before):
    """The statements assembled from fragments, constant by constant."""
    old_q = before[0]
    names = {"_PULL": "pull", "_PULL_ONE_TAG": "pull_one_tag", "_PULL_MANY": "pull_many",
             "_PULL_MANY_ONE_TAG": "pull_many_one_tag", "_PULL_MANY_AHEAD": "pull_many_ahead",
             "_PULL_MANY_AHEAD_ONE_TAG": "pull_many_ahead_one_tag", "_COMPLETE": "complete",
             "_COMPLETE_AND_CLAIM": "complete_and_claim",
             "_COMPLETE_AND_CLAIM_ONE_TAG": "complete_and_claim_one_tag", "_REQUEUE": "requeue",
             "_PUSH": "push", "_CANCEL_QUEUED": "cancel_queued", "_CANCEL_RUNNING": "cancel_running",
             "_INSERT_COMPLETED": "insert_completed"}
    for const, name in names.items():
        new = norm(QUERIES[name].sql)
        if QUERIES[name].sql in _CLAIMS_WITH_LOGS:  # deliberately changed since: the logs CTE and $20 added
            new = without_logs(new)
        assert new == norm(getattr(old_q, const)), name
