-- Agent workers: the secret that signs their tokens, revoked tokens, and the writes an
-- agent's requests make that check the job is the agent's own.


-- name: agent_secret
-- The secret that signs agent tokens: the stored one, else $1 stored now (the first server to ask wins a race).
-- $1 a new random secret.
WITH ins AS (
    INSERT INTO agent_key (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING RETURNING secret
)
SELECT secret FROM ins UNION ALL SELECT secret FROM agent_key WHERE id = 1 LIMIT 1;


-- name: blacklist_agent_token
-- Revoke an agent token by its JWT id (again: nothing changes).
-- $1 jti, $2 worker group, $3 expires_at (when the token would have expired).
INSERT INTO agent_token_blacklist (jti, worker_group, expires_at) VALUES ($1, $2, $3)
ON CONFLICT (jti) DO NOTHING;


-- name: agent_blacklist
-- The ids of the revoked agent tokens that have not expired yet (the servers' cache).
-- no parameters.
SELECT jti FROM agent_token_blacklist WHERE expires_at > now();


-- name: completed_by
-- Which of these jobs completed on this worker (a result sent again is acknowledged, not refused).
-- $1 job ids (uuid[]), $2 worker.
SELECT id FROM completed_job WHERE id = ANY($1::uuid[]) AND worker = $2;


-- name: append_log_if_held
-- Append one chunk of log text to a job, only while this worker runs it (an agent writes no other job's logs).
-- $1 job id, $2 text, $3 worker.
INSERT INTO job_logs (job_id, chunk)
SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM queue WHERE id = $1 AND worker = $3 AND running);


-- name: ping_workers
-- Heartbeats of many workers in one statement (the agents' pings, gathered by the server).
-- $1 names, $2 jobs done, $3 busy slots, $4 occupancy (arrays, one element per worker).
UPDATE worker w SET last_ping = now(), jobs_done = p.jobs_done, busy = p.busy, occupancy = p.occupancy
  FROM unnest($1::text[], $2::bigint[], $3::int[], $4::real[]) AS p(name, jobs_done, busy, occupancy)
 WHERE w.name = p.name;
