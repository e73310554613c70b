-- Reads of jobs and the small gauges of the API and the monitor.


-- name: next_due
-- When the earliest waiting job of a worker's tags may start: its due time, or later when its concurrency key is full (NULL if none can start before a job ends).
-- $1 base tags, $2 plain tags, $3 'tag(ws)' pairs (as split_tags gives them).
SELECT min(CASE WHEN q.concurrency_key IS NULL OR ck.key IS NULL THEN q.scheduled_for
       ELSE greatest(q.scheduled_for, sandmill_slot_free_at(ck.running, ck.starts,
            q.concurrent_limit, coalesce(q.concurrency_time_window_s, 0))) END)
  FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
 WHERE NOT q.running AND q.tag = ANY($1::text[])
   AND (q.tag = ANY($2::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($3::text[]));


-- name: get_queued
-- A waiting or running job, whole.
-- $1 job id, $2 workspace.
SELECT * FROM queue WHERE id = $1 AND workspace = $2;


-- name: get_completed_whole
-- A completed job, whole.
-- $1 job id, $2 workspace.
SELECT * FROM completed_job WHERE id = $1 AND workspace = $2;


-- name: get_completed
-- A completed job's outcome: id, status, result, error.
-- $1 job id, $2 workspace.
SELECT id, status, result, error FROM completed_job WHERE id = $1 AND workspace = $2;


-- name: job_state
-- Cheap state for result polling: completed, started, success, result (one row, none for no such job).
-- $1 job id, $2 workspace.
SELECT true AS completed, true AS started, status = 'success' AS success, result
  FROM completed_job WHERE id = $1 AND workspace = $2
 UNION ALL
SELECT false, started_at IS NOT NULL, NULL, NULL FROM queue WHERE id = $1 AND workspace = $2;


-- name: get_logs
-- A job's log text appended after log row $2, and the last row id (the next offset; $2 when none).
-- $1 job id, $2 last log row id read.
SELECT coalesce(string_agg(chunk, '' ORDER BY id), '') AS text, coalesce(max(id), $2) AS last
  FROM job_logs WHERE job_id = $1 AND id > $2;


-- name: list_jobs
-- Recent jobs of a workspace, queued and completed, newest first, with optional filters (NULL: any).
-- $1 workspace, $2 script_path, $3 success, $4 running, $5 limit.
SELECT * FROM (
  SELECT 'QueuedJob' AS type, id, workspace, kind, script_path, language, tag, priority,
         created_at, started_at, NULL::timestamptz AS completed_at, running, worker,
         NULL::text AS status, NULL::int AS duration_ms, NULL::int AS mem_peak
    FROM queue WHERE workspace = $1
  UNION ALL
  SELECT 'CompletedJob', id, workspace, kind, script_path, language, tag, priority,
         created_at, started_at, completed_at, false, worker, status, duration_ms, mem_peak
    FROM completed_job WHERE workspace = $1
) j
WHERE ($2::text IS NULL OR script_path = $2)
  AND ($3::bool IS NULL OR (status = 'success') = $3)
  AND ($4::bool IS NULL OR running = $4)
ORDER BY created_at DESC
LIMIT $5;


-- name: key_has_slot
-- Could this waiting job's concurrency key let it start now (NULL: no such job)?
-- $1 job id.
SELECT ck.key IS NULL OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
       coalesce(q.concurrency_time_window_s, 0))
  FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key WHERE q.id = $1;


-- name: queued_tags_without_workers
-- Of the tags $1, those no worker that pinged in the last 60 s serves (for workspace $2 when not NULL: a worker tag 't(ws1+ws2)' serves t for those workspaces only).
-- $1 tags (text[]), $2 workspace or NULL.
SELECT t FROM unnest($1::text[]) t WHERE NOT EXISTS (
 SELECT 1 FROM worker w WHERE w.last_ping > now() - interval '60 seconds'
   AND (t = ANY(w.tags) OR EXISTS (SELECT 1 FROM unnest(w.tags) wt
     WHERE left(wt, length(t) + 1) = t || '(' AND right(wt, 1) = ')'
       AND ($2::text IS NULL OR $2 = ANY(string_to_array(
             substr(wt, length(t) + 2, length(wt) - length(t) - 2), '+'))))));


-- name: counts
-- Jobs waiting and running, and workers alive (pinged in the last 60 s).
-- No parameters.
SELECT (SELECT count(*) FROM queue WHERE NOT running) AS queued,
 (SELECT count(*) FROM queue WHERE running) AS running,
 (SELECT count(*) FROM worker WHERE last_ping > now() - interval '60 seconds') AS workers;


-- name: is_future
-- Is a time still to come by the database's clock (the one scheduled_for is set by)?
-- $1 the time (timestamptz).
SELECT $1::timestamptz > now();
