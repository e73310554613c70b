-- Writes to a job outside the claim path: push, cancel, requeue, heartbeats, logs, and the
-- jobs a worker runs on its own (init and periodic scripts). NOTIFY channels: sandmill_queue
-- (payload: a tag, or 'tag|epoch' for a scheduled job), sandmill_done (a completed job's id),
-- sandmill_cancel (the id of a running job to kill).


-- name: push
-- Queue one job and wake the workers of its tag (payload 'tag|epoch' when scheduled in the future).
-- $1 id, $2 workspace, $3 kind, $4 script_path, $5 script_hash, $6 language, $7 content, $8 args, $9 tag, $10 priority, $11 timeout_s, $12 created_by, $13 seconds until due (float), $14 concurrency_key, $15 concurrent_limit, $16 concurrency_time_window_s, $17 notify_done.
INSERT INTO queue (id, workspace, kind, script_path, script_hash, language, content, args,
                   tag, priority, timeout_s, created_by, scheduled_for,
                   concurrency_key, concurrent_limit, concurrency_time_window_s, notify_done)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
        now() + make_interval(secs => $13), $14, $15, $16, $17)
RETURNING id, scheduled_for,
          pg_notify('sandmill_queue', $9 || CASE WHEN $13 > 0
                     THEN '|' || extract(epoch FROM now() + make_interval(secs => $13))::text
                     ELSE '' END);


-- name: push_many
-- Queue several jobs in one statement and one commit (a server's concurrent submits), in the order given (seq), and wake the workers of their tags: one NOTIFY per distinct payload (PostgreSQL delivers equal ones of a transaction once).
-- $1..$17 one text[] each, an element per job, as push's $1..$17 in their text form (text[] only: asyncpg looks every other array type up on each new connection, 4-17 ms apiece).
INSERT INTO queue (id, workspace, kind, script_path, script_hash, language, content, args,
                   tag, priority, timeout_s, created_by, scheduled_for,
                   concurrency_key, concurrent_limit, concurrency_time_window_s, notify_done)
SELECT id::uuid, workspace, kind, script_path, script_hash, language, content, args::jsonb,
       tag, priority::smallint, timeout_s::real, created_by,
       now() + make_interval(secs => due_in::float8), concurrency_key,
       concurrent_limit::integer, concurrency_time_window_s::integer, notify_done::boolean
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
              $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
              $14::text[], $15::text[], $16::text[], $17::text[])
       WITH ORDINALITY
    AS t(id, workspace, kind, script_path, script_hash, language, content, args, tag, priority,
         timeout_s, created_by, due_in, concurrency_key, concurrent_limit,
         concurrency_time_window_s, notify_done, ord)
 ORDER BY ord
RETURNING id, pg_notify('sandmill_queue', tag || CASE WHEN scheduled_for > now()
                     THEN '|' || extract(epoch FROM scheduled_for)::text ELSE '' END);


-- name: push_if_latest
-- Queue one job as push does, only while version $5 is still the newest of script $4 in workspace $2 (the server's remembered lookup, checked in the same statement); no row when it is not.
-- $1..$17 as push.
INSERT INTO queue (id, workspace, kind, script_path, script_hash, language, content, args,
                   tag, priority, timeout_s, created_by, scheduled_for,
                   concurrency_key, concurrent_limit, concurrency_time_window_s, notify_done)
SELECT $1::uuid, $2::text, $3::text, $4::text, $5::text, $6::text, $7::text, $8::jsonb,
       $9::text, $10::smallint, $11::real, $12::text, now() + make_interval(secs => $13::float8),
       $14::text, $15::integer, $16::integer, $17::boolean
 WHERE (SELECT hash FROM script WHERE workspace = $2 AND path = $4
         ORDER BY created_at DESC LIMIT 1) = $5
RETURNING id, scheduled_for,
          pg_notify('sandmill_queue', $9 || CASE WHEN $13 > 0
                     THEN '|' || extract(epoch FROM now() + make_interval(secs => $13))::text
                     ELSE '' END);


-- name: requeue
-- Put a running job back in the queue, give its concurrency slot back and wake its tag's workers; a row only if it was this worker's.
-- $1 job id, $2 worker, $3 count it as a restart (0 or 1; never for a job held ahead that never started).
WITH q AS (
    UPDATE queue SET running = false, worker = NULL, started_at = NULL, last_ping = NULL,
                     restarts = restarts + CASE WHEN started_at IS NULL THEN 0 ELSE $3::int END
     WHERE id = $1 AND worker = $2 AND running
    RETURNING id, tag, concurrency_key
), released AS (
    UPDATE concurrency_key ck SET running = array_remove(ck.running, q.id)
      FROM q WHERE ck.key = q.concurrency_key
)
SELECT pg_notify('sandmill_queue', tag) FROM q;


-- name: stale_jobs
-- Lock the running jobs whose heartbeat is older than $1 seconds (skipping those locked elsewhere).
-- $1 ping timeout in seconds (float).
SELECT id, worker, restarts, started_at IS NOT NULL AS started FROM queue WHERE running
   AND last_ping < now() - make_interval(secs => $1) FOR UPDATE SKIP LOCKED;


-- name: db_up_s
-- How long the database has been up (seconds since its postmaster started): heartbeats older than that are stale only because it was down.
-- No parameters.
SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8;


-- name: completed_among
-- The ids among $1 of jobs that have completed (for result waiters whose NOTIFY was missed while the server's LISTEN connection was down).
-- $1 job ids (uuid[]).
SELECT id FROM completed_job WHERE id = ANY($1::uuid[]);


-- name: count_restart
-- Count one more restart of a job (before it fails for its worker dying once too often).
-- $1 job id.
UPDATE queue SET restarts = restarts + 1 WHERE id = $1;


-- name: cancel_queued
-- Cancel a waiting job: move it to completed_job as canceled and notify its result waiters.
-- $1 job id, $2 workspace, $3 canceled by, $4 reason.
WITH q AS (
    DELETE FROM queue WHERE id = $1 AND workspace = $2 AND NOT running RETURNING *
)
INSERT INTO completed_job (id, workspace, kind, script_path, script_hash, language, content,
    args, tag, priority, created_by, created_at, scheduled_for, status, error, restarts,
    canceled_by, canceled_reason, concurrency_key, result)
SELECT id, workspace, kind, script_path, script_hash, language,
       CASE WHEN kind = 'script' THEN NULL ELSE content END, args, tag, priority, created_by,
       created_at, scheduled_for, 'canceled', 'canceled: ' || $4, restarts, $3, $4,
       concurrency_key, jsonb_build_object('error', jsonb_build_object(
           'name', 'Canceled', 'message', 'canceled by ' || $3 || ': ' || $4))
  FROM q
RETURNING id, pg_notify('sandmill_done', id::text);


-- name: cancel_running
-- Flag a running job canceled and tell its worker to kill it.
-- $1 job id, $2 workspace, $3 canceled by, $4 reason.
UPDATE queue SET canceled = true, canceled_by = $3, canceled_reason = $4
 WHERE id = $1 AND workspace = $2 AND running
RETURNING id, pg_notify('sandmill_cancel', id::text);


-- name: ping_job
-- Heartbeat of a running job; returns its canceled flag, no row when it is not this worker's any more.
-- $1 job id, $2 worker.
UPDATE queue SET last_ping = now() WHERE id = $1 AND worker = $2 AND running
RETURNING canceled;


-- name: append_log
-- Append one chunk of log text to a job.
-- $1 job id, $2 text.
INSERT INTO job_logs (job_id, chunk) VALUES ($1, $2);


-- name: insert_completed
-- Record a job a worker ran on its own (init or periodic script) directly as completed, with its logs, and notify its result waiters.
-- $1 id, $2 workspace, $3 kind, $4 language, $5 content, $6 tag, $7 worker (also created_by), $8 started_at (also created_at and scheduled_for), $9 status, $10 result, $11 error, $12 duration_ms, $13 cpu_ms, $14 mem_peak, $15 outcome, $16 log text ('' for none).
WITH j AS (
    INSERT INTO completed_job (id, workspace, kind, language, content, args, tag, created_by,
        created_at, scheduled_for, started_at, worker, status, result, error, duration_ms,
        cpu_ms, mem_peak, outcome)
    VALUES ($1, $2, $3, $4, $5, '{}', $6, $7, $8, $8, $8, $7, $9, $10, $11, $12, $13, $14, $15)
    RETURNING id
), l AS (
    INSERT INTO job_logs (job_id, chunk) SELECT $1, $16 WHERE $16 <> ''
)
SELECT id, pg_notify('sandmill_done', id::text) FROM j;
