-- A dedicated worker's statements (worker/dedicated.py): claims of many jobs of one served
-- script in one statement, completions of many (with their logs) in one, one heartbeat for
-- every job a worker holds, and the give-back of jobs it never started. Jobs with a
-- concurrency key are never claimed here (a dedicated script takes no concurrency limit).


-- name: dedicated_claim
-- Claim up to $3 due jobs of one dedicated tag, best first (priority, due time, push order); they are the worker's, not started (started_at is stamped when the runtime starts each).
-- $1 tag, $2 worker, $3 how many.
WITH cand AS (
    SELECT q.id FROM queue q
     WHERE NOT q.running AND q.tag = $1 AND q.scheduled_for <= now() AND q.concurrency_key IS NULL
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
     LIMIT $3
     FOR UPDATE OF q SKIP LOCKED
)
UPDATE queue q SET running = true, worker = $2, last_ping = now()
  FROM cand WHERE q.id = cand.id
RETURNING q.id, q.seq, q.workspace, q.script_path, q.script_hash, q.language, q.content,
          q.args::text AS args, q.priority, q.timeout_s, q.scheduled_for, q.restarts,
          q.canceled, q.notify_done;


-- name: dedicated_complete
-- Complete a batch of a worker's jobs as complete does, and append each job's log text (one row per job that printed) in the same statement; a waiter's NOTIFY carries the result when it fits ('<id> <1|0><result JSON>': success, then the result), so the API need not read it.
-- $1..$10 one array each, an element per job: id, worker, status, result (JSON text), error, duration_ms, cpu_ms, mem_peak, outcome (JSON text), started (worker's clock); $11 log texts ('' for none).
WITH i AS (
    SELECT id, worker, status, result::jsonb AS result, error, duration_ms, cpu_ms, mem_peak,
           outcome::jsonb AS outcome, started
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                  $6::int[], $7::int[], $8::int[], $9::text[], $10::timestamptz[])
        AS t(id, worker, status, result, error, duration_ms, cpu_ms, mem_peak, outcome, started)
), gone AS (
    DELETE FROM queue USING i
     WHERE queue.id = ANY($1::uuid[]) AND queue.id = i.id AND queue.worker = i.worker
    RETURNING queue.*
), logs AS (
    INSERT INTO job_logs (job_id, chunk)
    SELECT l.id, l.chunk FROM unnest($1::uuid[], $11::text[]) AS l(id, chunk)
     WHERE l.chunk <> '' AND l.id IN (SELECT id FROM gone)
), done AS (
    INSERT INTO completed_job (id, workspace, kind, script_path, script_hash, language, content,
        args, tag, priority, created_by, created_at, scheduled_for, started_at, worker, status,
        result, error, duration_ms, cpu_ms, mem_peak, outcome, restarts, canceled_by,
        canceled_reason, concurrency_key)
    SELECT q.id, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
           CASE WHEN q.kind = 'script' THEN NULL ELSE q.content END,
           q.args, q.tag, q.priority, q.created_by, q.created_at, q.scheduled_for,
           coalesce(i.started, q.started_at, now() - make_interval(secs => i.duration_ms / 1000.0)),
           q.worker, CASE WHEN q.canceled THEN 'canceled' ELSE i.status END, i.result,
           CASE WHEN q.canceled THEN coalesce('canceled: ' || q.canceled_reason, 'canceled')
                ELSE i.error END,
           i.duration_ms, i.cpu_ms, i.mem_peak, i.outcome, q.restarts, q.canceled_by,
           q.canceled_reason, q.concurrency_key
      FROM gone q JOIN i ON i.id = q.id
    RETURNING id, status, result
)
SELECT d.id, d.status,
       -- after the insert: the status is the final one (a canceled job's); a payload is under 8000 bytes
       CASE WHEN g.notify_done THEN pg_notify('sandmill_done', d.id::text || CASE
           WHEN octet_length(r.text) < 7900
           THEN ' ' || CASE WHEN d.status = 'success' THEN '1' ELSE '0' END || r.text
           ELSE '' END) END AS notified
  FROM done d JOIN gone g ON g.id = d.id
 CROSS JOIN LATERAL (SELECT coalesce(d.result::text, 'null') AS text) r;


-- name: dedicated_ping
-- Heartbeat of every job a worker holds, stamping the start of those that started since; returns the ids it still holds and, of those, the canceled ones.
-- $1 worker, $2 ids of jobs started since the last ping (uuid[]), $3 their starts (timestamptz[]).
WITH u AS (
    UPDATE queue q SET last_ping = now(),
           started_at = coalesce(q.started_at, (SELECT s.at FROM unnest($2::uuid[], $3::timestamptz[])
                                                  AS s(id, at) WHERE s.id = q.id))
     WHERE q.worker = $1 AND q.running
    RETURNING q.id, q.canceled
)
SELECT coalesce(array_agg(id), '{}') AS held,
       coalesce(array_agg(id) FILTER (WHERE canceled), '{}') AS canceled FROM u;


-- name: dedicated_give_back
-- Put jobs a worker claimed but never started back in the queue (no restart counted) and wake their tags' workers.
-- $1 job ids (uuid[]), $2 worker.
WITH q AS (
    UPDATE queue SET running = false, worker = NULL, started_at = NULL, last_ping = NULL
     WHERE id = ANY($1::uuid[]) AND worker = $2 AND running
    RETURNING tag
)
SELECT pg_notify('sandmill_queue', tag) FROM (SELECT DISTINCT tag FROM q) t;
