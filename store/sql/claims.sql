-- The claims and completions of a worker: the hot path (see docs/performance.md ("Store")).
--
-- Every claim reads the waiting jobs of the worker's tags the same way: due, with room in
-- their concurrency key, best first (priority, then due time, then push order), skipping
-- rows another worker holds. The parameters are the same in every claim:
--   $1 base tags (text[]), $2 worker name, $3 plain tags (text[]), $4 'tag(ws)' pairs (text[])
-- Each claim comes twice: for a worker of several base tags (q.tag = ANY($1)) and of one
-- (q.tag = ($1::text[])[1]: equality lets PostgreSQL read queue_pull_idx in order and stop
-- at the first free row; ANY makes it read and sort every waiting row of the tag). The two
-- differ in that line only.
-- What a claim returns of a job is what the worker runs and reports, not the whole row.


-- name: pull
-- Claim the best due job (keyed or not), taking a slot of its concurrency key; cand_id set and id NULL: a racing worker took the last slot, try again.
-- $1 base tags, $2 worker, $3 plain tags, $4 'tag(ws)' pairs.
WITH cand AS (
    SELECT q.id, q.concurrency_key AS key, q.concurrent_limit AS lim,
           coalesce(q.concurrency_time_window_s, 0) AS win
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ANY($1::text[]) AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT 1
     FOR UPDATE OF q SKIP LOCKED
), slot AS (
    -- ON CONFLICT .. WHERE re-checks the limit on the key row's newest version: it holds under any race
    INSERT INTO concurrency_key AS ck (key, running, starts)
    SELECT key, ARRAY[id],
           CASE WHEN win > 0 THEN ARRAY[extract(epoch FROM clock_timestamp())::double precision]
                ELSE '{}'::double precision[] END
      FROM cand WHERE key IS NOT NULL
    ON CONFLICT (key) DO UPDATE
       SET running = ck.running || excluded.running,
           -- the clock is read again here: excluded's was read before we got the row lock
           starts = sandmill_live_starts(ck.starts, (SELECT win FROM cand))
                    || CASE WHEN (SELECT win FROM cand) > 0
                            THEN ARRAY[extract(epoch FROM clock_timestamp())::double precision]
                            ELSE '{}'::double precision[] END
     WHERE sandmill_has_slot(ck.running, ck.starts, (SELECT lim FROM cand), (SELECT win FROM cand))
    RETURNING key, ck.starts[cardinality(ck.starts)] AS started
), claimed AS (
    -- started_at is the very start the window counted, so what the limit enforces is what
    -- the job records show
    UPDATE queue q
       SET running = true, worker = $2, last_ping = now(),
           started_at = coalesce((SELECT to_timestamp(started) FROM slot), clock_timestamp())
      FROM cand c
     WHERE q.id = c.id AND (c.key IS NULL OR EXISTS (SELECT 1 FROM slot))
    RETURNING q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done
)
SELECT c.id AS cand_id, cl.* FROM cand c LEFT JOIN claimed cl ON true;


-- name: pull_one_tag
-- pull, for a worker with one base tag.
-- $1 base tags (one), $2 worker, $3 plain tags, $4 'tag(ws)' pairs.
WITH cand AS (
    SELECT q.id, q.concurrency_key AS key, q.concurrent_limit AS lim,
           coalesce(q.concurrency_time_window_s, 0) AS win
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ($1::text[])[1] AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT 1
     FOR UPDATE OF q SKIP LOCKED
), slot AS (
    -- ON CONFLICT .. WHERE re-checks the limit on the key row's newest version: it holds under any race
    INSERT INTO concurrency_key AS ck (key, running, starts)
    SELECT key, ARRAY[id],
           CASE WHEN win > 0 THEN ARRAY[extract(epoch FROM clock_timestamp())::double precision]
                ELSE '{}'::double precision[] END
      FROM cand WHERE key IS NOT NULL
    ON CONFLICT (key) DO UPDATE
       SET running = ck.running || excluded.running,
           -- the clock is read again here: excluded's was read before we got the row lock
           starts = sandmill_live_starts(ck.starts, (SELECT win FROM cand))
                    || CASE WHEN (SELECT win FROM cand) > 0
                            THEN ARRAY[extract(epoch FROM clock_timestamp())::double precision]
                            ELSE '{}'::double precision[] END
     WHERE sandmill_has_slot(ck.running, ck.starts, (SELECT lim FROM cand), (SELECT win FROM cand))
    RETURNING key, ck.starts[cardinality(ck.starts)] AS started
), claimed AS (
    -- started_at is the very start the window counted, so what the limit enforces is what
    -- the job records show
    UPDATE queue q
       SET running = true, worker = $2, last_ping = now(),
           started_at = coalesce((SELECT to_timestamp(started) FROM slot), clock_timestamp())
      FROM cand c
     WHERE q.id = c.id AND (c.key IS NULL OR EXISTS (SELECT 1 FROM slot))
    RETURNING q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done
)
SELECT c.id AS cand_id, cl.* FROM cand c LEFT JOIN claimed cl ON true;


-- name: pull_many
-- Claim up to $5 due jobs, best first, up to the first keyed one (pull takes those; the jobs behind it must not pass it); each row carries its rank (1 = best).
-- $1 base tags, $2 worker, $3 plain tags, $4 'tag(ws)' pairs, $5 how many.
WITH cand AS (
    SELECT q.id, q.concurrency_key IS NOT NULL AS keyed, q.priority, q.scheduled_for, q.seq
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ANY($1::text[]) AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT $5
     FOR UPDATE OF q SKIP LOCKED
), pick AS (
    SELECT id, rank FROM (
        SELECT id, scheduled_for, bool_or(keyed) OVER w AS from_key, row_number() OVER w AS rank
          FROM cand WINDOW w AS (ORDER BY priority DESC, scheduled_for, seq)) c
     WHERE NOT from_key
), claimed AS (
    UPDATE queue q
       SET running = true, worker = $2, started_at = clock_timestamp(), last_ping = now()
      FROM pick WHERE q.id = pick.id
    RETURNING q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done, pick.rank
)
SELECT * FROM claimed;


-- name: pull_many_one_tag
-- pull_many, for a worker with one base tag.
-- $1 base tags (one), $2 worker, $3 plain tags, $4 'tag(ws)' pairs, $5 how many.
WITH cand AS (
    SELECT q.id, q.concurrency_key IS NOT NULL AS keyed, q.priority, q.scheduled_for, q.seq
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ($1::text[])[1] AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT $5
     FOR UPDATE OF q SKIP LOCKED
), pick AS (
    SELECT id, rank FROM (
        SELECT id, scheduled_for, bool_or(keyed) OVER w AS from_key, row_number() OVER w AS rank
          FROM cand WINDOW w AS (ORDER BY priority DESC, scheduled_for, seq)) c
     WHERE NOT from_key
), claimed AS (
    UPDATE queue q
       SET running = true, worker = $2, started_at = clock_timestamp(), last_ping = now()
      FROM pick WHERE q.id = pick.id
    RETURNING q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done, pick.rank
)
SELECT * FROM claimed;


-- name: pull_many_ahead
-- pull_many, plus up to $6 more jobs to hold ahead (started_at NULL until the worker stamps their start) among those due $7 seconds ago: a backlog no idle slot took.
-- $1 base tags, $2 worker, $3 plain tags, $4 'tag(ws)' pairs, $5 how many to run now, $6 how many ahead, $7 seconds waited.
WITH cand AS (
    SELECT q.id, q.concurrency_key IS NOT NULL AS keyed, q.priority, q.scheduled_for, q.seq
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ANY($1::text[]) AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT $5::int + $6::int
     FOR UPDATE OF q SKIP LOCKED
), pick AS (
    SELECT id, rank FROM (
        SELECT id, scheduled_for, bool_or(keyed) OVER w AS from_key, row_number() OVER w AS rank
          FROM cand WINDOW w AS (ORDER BY priority DESC, scheduled_for, seq)) c
     WHERE NOT from_key
       AND (rank <= $5 OR scheduled_for <= now() - make_interval(secs => $7::float8))
), claimed AS (
    UPDATE queue q
       SET running = true, worker = $2, started_at = CASE WHEN pick.rank <= $5 THEN clock_timestamp() END, last_ping = now()
      FROM pick WHERE q.id = pick.id
    RETURNING q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done, pick.rank
)
SELECT * FROM claimed;


-- name: pull_many_ahead_one_tag
-- pull_many_ahead, for a worker with one base tag.
-- $1 base tags (one), $2 worker, $3 plain tags, $4 'tag(ws)' pairs, $5 how many to run now, $6 how many ahead, $7 seconds waited.
WITH cand AS (
    SELECT q.id, q.concurrency_key IS NOT NULL AS keyed, q.priority, q.scheduled_for, q.seq
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ($1::text[])[1] AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT $5::int + $6::int
     FOR UPDATE OF q SKIP LOCKED
), pick AS (
    SELECT id, rank FROM (
        SELECT id, scheduled_for, bool_or(keyed) OVER w AS from_key, row_number() OVER w AS rank
          FROM cand WINDOW w AS (ORDER BY priority DESC, scheduled_for, seq)) c
     WHERE NOT from_key
       AND (rank <= $5 OR scheduled_for <= now() - make_interval(secs => $7::float8))
), claimed AS (
    UPDATE queue q
       SET running = true, worker = $2, started_at = CASE WHEN pick.rank <= $5 THEN clock_timestamp() END, last_ping = now()
      FROM pick WHERE q.id = pick.id
    RETURNING q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done, pick.rank
)
SELECT * FROM claimed;


-- name: complete
-- Complete a batch of running jobs: each queue row goes, its concurrency slot is given back (waking its tag's workers), its completed_job row is written, and result waiters (notify_done) are notified; only the worker that holds a job can complete it.
-- $1..$10 one array each, an element per job: id, worker, status, result (JSON text), error, duration_ms, cpu_ms, mem_peak, outcome (JSON text), started (worker's clock).
WITH i AS (
    -- results travel as JSON text: a list would read as an array dimension in jsonb[]
    SELECT id, worker, status, result::jsonb AS result, error, duration_ms, cpu_ms, mem_peak,
           outcome::jsonb AS outcome, started
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                  $6::int[], $7::int[], $8::int[], $9::text[], $10::timestamptz[])
        AS t(id, worker, status, result, error, duration_ms, cpu_ms, mem_peak, outcome, started)
), gone AS (
    -- id = ANY: a primary key lookup (a join to i alone may hash-join a scan of the queue);
    -- no `running` test (worker is set exactly while a job runs; the test invites a scan of queue_running_idx)
    DELETE FROM queue USING i
     WHERE queue.id = ANY($1::uuid[]) AND queue.id = i.id AND queue.worker = i.worker
    RETURNING queue.*,
              CASE WHEN queue.notify_done THEN pg_notify('sandmill_done', queue.id::text) END AS notified
), released AS (
    UPDATE concurrency_key ck
       SET running = (SELECT coalesce(array_agg(x), '{}') FROM unnest(ck.running) x
                       WHERE x <> ALL(r.ids))
      FROM (SELECT concurrency_key AS key, array_agg(id) AS ids, min(tag) AS tag
              FROM gone WHERE concurrency_key IS NOT NULL GROUP BY 1) r
     WHERE ck.key = r.key
    RETURNING pg_notify('sandmill_queue', r.tag)
), done AS (
    INSERT INTO completed_job (id, workspace, kind, script_path, script_hash, language, content,
        args, tag, priority, created_by, created_at, scheduled_for, started_at, worker, status,
        result, error, duration_ms, cpu_ms, mem_peak, outcome, restarts, canceled_by,
        canceled_reason, concurrency_key)
    SELECT q.id, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
           CASE WHEN q.kind = 'script' THEN NULL ELSE q.content END,
           q.args, q.tag, q.priority, q.created_by, q.created_at, q.scheduled_for,
           -- a job held ahead that ended before its start stamp came in (one statement in
           -- flight stamps it, another completes it): its start as the worker saw it
           coalesce(q.started_at, i.started, now() - make_interval(secs => i.duration_ms / 1000.0)),
           q.worker, CASE WHEN q.canceled THEN 'canceled' ELSE i.status END, i.result,
           CASE WHEN q.canceled THEN coalesce('canceled: ' || q.canceled_reason, 'canceled')
                ELSE i.error END,
           i.duration_ms, i.cpu_ms, i.mem_peak, i.outcome, q.restarts, q.canceled_by,
           q.canceled_reason, q.concurrency_key
      FROM gone q JOIN i ON i.id = q.id
    RETURNING id, status
)
SELECT id, status FROM done;


-- name: complete_and_claim
-- complete and pull_many_ahead in one statement (one round trip, one commit per batch), stamp the start of jobs held ahead, and append each completed job's log text (a short job's logs ride on its completion: no statement of their own; one who sees the job completed sees its logs); the completions ride on the best claim's row (rank 1), or on one row of NULLs when nothing is claimed.
-- $1 base tags, $2 worker, $3 plain tags, $4 'tag(ws)' pairs, $5 how many to run now, $6..$15 the ten arrays of complete, $16 how many ahead, $17 seconds waited, $18 ids of held jobs starting now (uuid[]), $19 their starts (timestamptz[]), $20 log texts (text[]: an element per completed job, '' for none; NULL when no completion carries logs, which appends nothing and is cheaper).
WITH cand AS (
    SELECT q.id, q.concurrency_key IS NOT NULL AS keyed, q.priority, q.scheduled_for, q.seq
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ANY($1::text[]) AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT $5::int + $16::int
     FOR UPDATE OF q SKIP LOCKED
), pick AS (
    SELECT id, rank FROM (
        SELECT id, scheduled_for, bool_or(keyed) OVER w AS from_key, row_number() OVER w AS rank
          FROM cand WINDOW w AS (ORDER BY priority DESC, scheduled_for, seq)) c
     WHERE NOT from_key
       AND (rank <= $5 OR scheduled_for <= now() - make_interval(secs => $17::float8))
), claimed AS (
    -- reads the queue as the statement began: a keyed job whose slot this batch frees is
    -- not seen free here (its completion's NOTIFY wakes a puller for it)
    UPDATE queue q
       SET running = true, worker = $2, started_at = CASE WHEN pick.rank <= $5 THEN clock_timestamp() END, last_ping = now()
      FROM pick WHERE q.id = pick.id
    RETURNING q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done, pick.rank
), i AS (
    -- results travel as JSON text: a list would read as an array dimension in jsonb[]
    SELECT id, worker, status, result::jsonb AS result, error, duration_ms, cpu_ms, mem_peak,
           outcome::jsonb AS outcome, started
      FROM unnest($6::uuid[], $7::text[], $8::text[], $9::text[], $10::text[],
                  $11::int[], $12::int[], $13::int[], $14::text[], $15::timestamptz[])
        AS t(id, worker, status, result, error, duration_ms, cpu_ms, mem_peak, outcome, started)
), gone AS (
    -- id = ANY: a primary key lookup (a join to i alone may hash-join a scan of the queue);
    -- no `running` test (worker is set exactly while a job runs; the test invites a scan of queue_running_idx)
    DELETE FROM queue USING i
     WHERE queue.id = ANY($6::uuid[]) AND queue.id = i.id AND queue.worker = i.worker
    RETURNING queue.*,
              CASE WHEN queue.notify_done THEN pg_notify('sandmill_done', queue.id::text) END AS notified
), logs AS (
    -- only for the jobs this statement completes (a job no longer this worker's keeps none);
    -- $20 NULL (no completion carries logs): unnest pads it with NULLs, and NULL <> '' is not true
    INSERT INTO job_logs (job_id, chunk)
    SELECT l.id, l.chunk FROM unnest($6::uuid[], $20::text[]) AS l(id, chunk)
     WHERE l.chunk <> '' AND l.id IN (SELECT id FROM gone)
), released AS (
    UPDATE concurrency_key ck
       SET running = (SELECT coalesce(array_agg(x), '{}') FROM unnest(ck.running) x
                       WHERE x <> ALL(r.ids))
      FROM (SELECT concurrency_key AS key, array_agg(id) AS ids, min(tag) AS tag
              FROM gone WHERE concurrency_key IS NOT NULL GROUP BY 1) r
     WHERE ck.key = r.key
    RETURNING pg_notify('sandmill_queue', r.tag)
), done AS (
    INSERT INTO completed_job (id, workspace, kind, script_path, script_hash, language, content,
        args, tag, priority, created_by, created_at, scheduled_for, started_at, worker, status,
        result, error, duration_ms, cpu_ms, mem_peak, outcome, restarts, canceled_by,
        canceled_reason, concurrency_key)
    SELECT q.id, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
           CASE WHEN q.kind = 'script' THEN NULL ELSE q.content END,
           q.args, q.tag, q.priority, q.created_by, q.created_at, q.scheduled_for,
           -- a job held ahead that ended before its start stamp came in (one statement in
           -- flight stamps it, another completes it): its start as the worker saw it
           coalesce(q.started_at, i.started, now() - make_interval(secs => i.duration_ms / 1000.0)),
           q.worker, CASE WHEN q.canceled THEN 'canceled' ELSE i.status END, i.result,
           CASE WHEN q.canceled THEN coalesce('canceled: ' || q.canceled_reason, 'canceled')
                ELSE i.error END,
           i.duration_ms, i.cpu_ms, i.mem_peak, i.outcome, q.restarts, q.canceled_by,
           q.canceled_reason, q.concurrency_key
      FROM gone q JOIN i ON i.id = q.id
    RETURNING id, status
), started AS (
    -- never a job this statement completes; no indexed column changes, so the update can be
    -- HOT; the time is the worker's, so starts stay in the order the jobs started
    UPDATE queue SET started_at = s.at
      FROM unnest($18::uuid[], $19::timestamptz[]) AS s(id, at)
     WHERE queue.id = ANY($18::uuid[]) AND queue.id = s.id AND worker = $2 AND started_at IS NULL
)
SELECT CASE WHEN coalesce(c.rank, 1) = 1 THEN d.done_ids END AS done_ids,
       CASE WHEN coalesce(c.rank, 1) = 1 THEN d.done_status END AS done_status, c.*
  FROM (SELECT array_agg(id) AS done_ids, array_agg(status) AS done_status FROM done) d
  -- the completions ride on the best claim's row only (not n claims x n completions to decode)
  LEFT JOIN claimed c ON true;


-- name: complete_and_claim_one_tag
-- complete_and_claim, for a worker with one base tag.
-- $1 base tags (one), $2 worker, $3 plain tags, $4 'tag(ws)' pairs, $5 how many to run now, $6..$15 the ten arrays of complete, $16 how many ahead, $17 seconds waited, $18 ids of held jobs starting now (uuid[]), $19 their starts (timestamptz[]), $20 log texts (text[]: an element per completed job, '' for none; NULL when no completion carries logs).
WITH cand AS (
    SELECT q.id, q.concurrency_key IS NOT NULL AS keyed, q.priority, q.scheduled_for, q.seq
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ($1::text[])[1] AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT $5::int + $16::int
     FOR UPDATE OF q SKIP LOCKED
), pick AS (
    SELECT id, rank FROM (
        SELECT id, scheduled_for, bool_or(keyed) OVER w AS from_key, row_number() OVER w AS rank
          FROM cand WINDOW w AS (ORDER BY priority DESC, scheduled_for, seq)) c
     WHERE NOT from_key
       AND (rank <= $5 OR scheduled_for <= now() - make_interval(secs => $17::float8))
), claimed AS (
    -- reads the queue as the statement began: a keyed job whose slot this batch frees is
    -- not seen free here (its completion's NOTIFY wakes a puller for it)
    UPDATE queue q
       SET running = true, worker = $2, started_at = CASE WHEN pick.rank <= $5 THEN clock_timestamp() END, last_ping = now()
      FROM pick WHERE q.id = pick.id
    RETURNING q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done, pick.rank
), i AS (
    -- results travel as JSON text: a list would read as an array dimension in jsonb[]
    SELECT id, worker, status, result::jsonb AS result, error, duration_ms, cpu_ms, mem_peak,
           outcome::jsonb AS outcome, started
      FROM unnest($6::uuid[], $7::text[], $8::text[], $9::text[], $10::text[],
                  $11::int[], $12::int[], $13::int[], $14::text[], $15::timestamptz[])
        AS t(id, worker, status, result, error, duration_ms, cpu_ms, mem_peak, outcome, started)
), gone AS (
    -- id = ANY: a primary key lookup (a join to i alone may hash-join a scan of the queue);
    -- no `running` test (worker is set exactly while a job runs; the test invites a scan of queue_running_idx)
    DELETE FROM queue USING i
     WHERE queue.id = ANY($6::uuid[]) AND queue.id = i.id AND queue.worker = i.worker
    RETURNING queue.*,
              CASE WHEN queue.notify_done THEN pg_notify('sandmill_done', queue.id::text) END AS notified
), logs AS (
    -- only for the jobs this statement completes (a job no longer this worker's keeps none);
    -- $20 NULL (no completion carries logs): unnest pads it with NULLs, and NULL <> '' is not true
    INSERT INTO job_logs (job_id, chunk)
    SELECT l.id, l.chunk FROM unnest($6::uuid[], $20::text[]) AS l(id, chunk)
     WHERE l.chunk <> '' AND l.id IN (SELECT id FROM gone)
), released AS (
    UPDATE concurrency_key ck
       SET running = (SELECT coalesce(array_agg(x), '{}') FROM unnest(ck.running) x
                       WHERE x <> ALL(r.ids))
      FROM (SELECT concurrency_key AS key, array_agg(id) AS ids, min(tag) AS tag
              FROM gone WHERE concurrency_key IS NOT NULL GROUP BY 1) r
     WHERE ck.key = r.key
    RETURNING pg_notify('sandmill_queue', r.tag)
), done AS (
    INSERT INTO completed_job (id, workspace, kind, script_path, script_hash, language, content,
        args, tag, priority, created_by, created_at, scheduled_for, started_at, worker, status,
        result, error, duration_ms, cpu_ms, mem_peak, outcome, restarts, canceled_by,
        canceled_reason, concurrency_key)
    SELECT q.id, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
           CASE WHEN q.kind = 'script' THEN NULL ELSE q.content END,
           q.args, q.tag, q.priority, q.created_by, q.created_at, q.scheduled_for,
           -- a job held ahead that ended before its start stamp came in (one statement in
           -- flight stamps it, another completes it): its start as the worker saw it
           coalesce(q.started_at, i.started, now() - make_interval(secs => i.duration_ms / 1000.0)),
           q.worker, CASE WHEN q.canceled THEN 'canceled' ELSE i.status END, i.result,
           CASE WHEN q.canceled THEN coalesce('canceled: ' || q.canceled_reason, 'canceled')
                ELSE i.error END,
           i.duration_ms, i.cpu_ms, i.mem_peak, i.outcome, q.restarts, q.canceled_by,
           q.canceled_reason, q.concurrency_key
      FROM gone q JOIN i ON i.id = q.id
    RETURNING id, status
), started AS (
    -- never a job this statement completes; no indexed column changes, so the update can be
    -- HOT; the time is the worker's, so starts stay in the order the jobs started
    UPDATE queue SET started_at = s.at
      FROM unnest($18::uuid[], $19::timestamptz[]) AS s(id, at)
     WHERE queue.id = ANY($18::uuid[]) AND queue.id = s.id AND worker = $2 AND started_at IS NULL
)
SELECT CASE WHEN coalesce(c.rank, 1) = 1 THEN d.done_ids END AS done_ids,
       CASE WHEN coalesce(c.rank, 1) = 1 THEN d.done_status END AS done_status, c.*
  FROM (SELECT array_agg(id) AS done_ids, array_agg(status) AS done_status FROM done) d
  -- the completions ride on the best claim's row only (not n claims x n completions to decode)
  LEFT JOIN claimed c ON true;
