-- The worker table (register, heartbeat, list) and the stored configs of worker groups.


-- name: register_worker
-- Register a worker process, or refresh the row of one with the same name (a restart).
-- $1 name, $2 worker group, $3 hostname, $4 tags (text[]), $5 backend, $6 subworkers, $7 info (jsonb).
INSERT INTO worker (name, worker_group, hostname, tags, backend, subworkers, info)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (name) DO UPDATE SET worker_group = $2, hostname = $3, tags = $4,
    backend = $5, subworkers = $6, info = $7, started_at = now(), last_ping = now();


-- name: ping_worker
-- Heartbeat of a worker process, with its counters, its occupancy over 15 s, 5 min and 30 min, and its claim and completion statements' latency (merged into info as statement_latency; NULL leaves info as it is).
-- $1 name, $2 tags (text[]), $3 jobs done, $4 busy slots, $5 occupancy since the last ping, $6 15 s, $7 5 min, $8 30 min occupancy, $9 statement latency (jsonb or NULL).
UPDATE worker SET last_ping = now(), tags = $2, jobs_done = $3, busy = $4, occupancy = $5,
    occupancy_15s = $6, occupancy_5m = $7, occupancy_30m = $8,
    info = CASE WHEN $9::jsonb IS NULL THEN info ELSE info || jsonb_build_object('statement_latency', $9::jsonb) END
 WHERE name = $1;


-- name: unregister_worker
-- Remove a worker process's row (it stopped).
-- $1 name.
DELETE FROM worker WHERE name = $1;


-- name: list_workers
-- The workers that pinged within $1 seconds, with the seconds since their last ping, by group and name.
-- $1 seconds (float).
SELECT *, extract(epoch FROM now() - last_ping)::float AS last_ping_s_ago FROM worker
 WHERE last_ping > now() - make_interval(secs => $1) ORDER BY worker_group, name;


-- name: get_config
-- A stored config (jsonb), by name.
-- $1 name.
SELECT config FROM config WHERE name = $1;


-- name: put_config
-- Store a config and, for a worker group's ('worker__<group>'), tell its running workers in the same statement (NOTIFY sandmill_config with the group name).
-- $1 name, $2 config (jsonb).
WITH c AS (INSERT INTO config (name, config) VALUES ($1, $2)
 ON CONFLICT (name) DO UPDATE SET config = $2, updated_at = now() RETURNING name)
 SELECT pg_notify('sandmill_config', substr(name, 9)) FROM c WHERE name LIKE 'worker\_\_%';


-- name: set_worker_gpu_jobs
-- A GPU worker's GPUs and the jobs holding each now (written when an assignment changes).
-- $1 name, $2 GPUs (jsonb: [{"index", "name", "jobs": [job id...]}]).
UPDATE worker SET gpu_jobs = $2 WHERE name = $1;
