-- Reads of the web dashboard and the Prometheus metrics: the queue per tag, recent
-- throughput, paged job lists, what the workers run, and the completed jobs folded into
-- the metrics' counters and histograms.


-- name: queue_by_tag
-- Per tag of the queue: jobs waiting (not running), jobs running (started), and how long the oldest due waiting job has waited (seconds, 0 when none is due).
-- No parameters.
SELECT tag,
       count(*) FILTER (WHERE NOT running) AS waiting,
       count(*) FILTER (WHERE running AND started_at IS NOT NULL) AS running,
       coalesce(extract(epoch FROM now() - min(scheduled_for)
                FILTER (WHERE NOT running AND scheduled_for <= now())), 0)::float8 AS oldest_wait_s
  FROM queue GROUP BY tag ORDER BY tag;


-- name: throughput
-- Completed jobs per minute over the last $1 seconds, by status (reads completed_job_completed_idx).
-- $1 seconds (float).
SELECT extract(epoch FROM date_trunc('minute', completed_at))::float8 AS minute,
       count(*) FILTER (WHERE status = 'success') AS success,
       count(*) FILTER (WHERE status = 'failure') AS failure,
       count(*) FILTER (WHERE status = 'canceled') AS canceled
  FROM completed_job WHERE completed_at > now() - make_interval(secs => $1)
 GROUP BY 1 ORDER BY 1;


-- name: active_jobs
-- A page of the queue's jobs (waiting, held or running), newest first, with optional filters (NULL: any).
-- $1 workspace, $2 script_path, $3 tag, $4 state ('queued' or 'running'), $5 limit.
SELECT id, workspace, kind, script_path, language, tag, created_at, scheduled_for, started_at,
       NULL::timestamptz AS completed_at, worker,
       CASE WHEN running AND started_at IS NOT NULL THEN 'running' ELSE 'queued' END AS state,
       NULL::int AS duration_ms
  FROM queue
 WHERE ($1::text IS NULL OR workspace = $1) AND ($2::text IS NULL OR script_path = $2)
   AND ($3::text IS NULL OR tag = $3)
   AND ($4::text IS NULL OR $4 = CASE WHEN running AND started_at IS NOT NULL THEN 'running' ELSE 'queued' END)
 ORDER BY created_at DESC, id DESC LIMIT $5;


-- name: completed_jobs
-- A page of completed jobs, newest completion first, after the keyset cursor ($1, $2), with optional filters (NULL: any); reads completed_job_completed_idx in order.
-- $1 completed_at of the cursor ('infinity' for the first page), $2 id of the cursor, $3 workspace, $4 script_path, $5 tag, $6 status, $7 limit.
SELECT id, workspace, kind, script_path, language, tag, created_at, scheduled_for, started_at,
       completed_at, worker, status AS state, duration_ms
  FROM completed_job
 WHERE (completed_at, id) < ($1::timestamptz, $2::uuid)
   AND ($3::text IS NULL OR workspace = $3) AND ($4::text IS NULL OR script_path = $4)
   AND ($5::text IS NULL OR tag = $5) AND ($6::text IS NULL OR status = $6)
 ORDER BY completed_at DESC, id DESC LIMIT $7;


-- name: running_jobs_of
-- The jobs the workers $1 are running now (started; not those held ahead).
-- $1 worker names (text[]).
SELECT worker, id, workspace, script_path, language, started_at FROM queue
 WHERE running AND started_at IS NOT NULL AND worker = ANY($1::text[])
 ORDER BY worker, started_at;


-- name: last_admin_runs
-- Each worker's last run of its init (or periodic) script (reads completed_job_admin_idx).
-- $1 worker names (text[]), $2 kind ('init' or 'periodic').
SELECT w AS worker, j.id, j.status, j.completed_at, j.duration_ms, j.error
  FROM unnest($1::text[]) w, LATERAL (
       SELECT id, status, completed_at, duration_ms, error FROM completed_job
        WHERE worker = w AND kind = $2 AND kind IN ('init', 'periodic')
        ORDER BY completed_at DESC LIMIT 1) j;


-- name: group_names
-- The worker groups known: those with a worker row and those with a stored config.
-- No parameters.
SELECT worker_group AS name FROM worker
 UNION SELECT substr(name, 9) FROM config WHERE name LIKE 'worker\_\_%'
 ORDER BY 1;


-- name: db_now
-- The database's clock (the one completed_at is stamped by).
-- No parameters.
SELECT now();


-- name: fold_completed
-- Completed jobs with completed_at in [$1, $2), counted per group, language, backend, status and histogram bucket: the bucket of the duration and of the queue wait (due to start) is the number of bounds below it (in ms); NULL for a job that never started.
-- $1 from (timestamptz), $2 until (timestamptz), $3 bucket bounds in ms (int[], ascending).
SELECT coalesce(h.worker_group, 'none') AS worker_group, c.language,
       coalesce(h.backend, 'none') AS backend, c.status,
       CASE WHEN c.started_at IS NULL THEN NULL
            ELSE width_bucket(c.duration_ms - 1, $3::int[]) END AS dur_b,
       CASE WHEN c.started_at IS NULL THEN NULL
            ELSE width_bucket(greatest(0, ceil(extract(epoch FROM c.started_at - c.scheduled_for)
                                               * 1000))::int - 1, $3::int[]) END AS wait_b,
       count(*) AS n,
       coalesce(sum(c.duration_ms) FILTER (WHERE c.started_at IS NOT NULL), 0)::float8 AS dur_ms,
       coalesce(sum(greatest(0, extract(epoch FROM c.started_at - c.scheduled_for) * 1000)), 0)::float8 AS wait_ms
  FROM completed_job c LEFT JOIN worker_history h ON h.name = c.worker
 WHERE c.completed_at >= $1 AND c.completed_at < $2
 GROUP BY 1, 2, 3, 4, 5, 6;


-- name: running_started
-- Jobs running now (started), per group, language and backend of their worker.
-- No parameters.
SELECT coalesce(h.worker_group, 'none') AS worker_group, q.language,
       coalesce(h.backend, 'none') AS backend, count(*) AS n
  FROM queue q LEFT JOIN worker_history h ON h.name = q.worker
 WHERE q.running AND q.started_at IS NOT NULL
 GROUP BY 1, 2, 3;
