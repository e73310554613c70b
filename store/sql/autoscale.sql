-- The autoscaler's statements: the groups it knows, what each has to do (jobs waiting,
-- its workers' occupancy), the count it asks for, its events and its lock.


-- name: autoscale_try_lock
-- Take the autoscaler's session advisory lock if no other server holds it (held until the connection ends).
-- $1 the lock's key (bigint).
SELECT pg_try_advisory_lock($1);


-- name: autoscale_publish_group
-- A server publishes a group's profile (from its profile files) and the tags it serves; the count asked for is kept.
-- $1 group, $2 profile (jsonb), $3 enabled, $4 plain tags (text[]), $5 'tag(ws)' pairs (text[]).
INSERT INTO autoscale_group (worker_group, profile, enabled, plain_tags, pair_tags)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (worker_group) DO UPDATE SET profile = $2, enabled = $3, plain_tags = $4,
    pair_tags = $5, published_at = now();


-- name: autoscale_groups
-- Every published group with its state and the group's stored config (NULL if none).
-- No parameters.
SELECT g.worker_group, g.profile, g.desired, g.last_event_type,
       extract(epoch FROM now() - g.last_change_at)::float AS since_change_s, c.config
  FROM autoscale_group g LEFT JOIN config c ON c.name = 'worker__' || g.worker_group
 ORDER BY g.worker_group;


-- name: autoscale_config_only_groups
-- Groups whose stored config sets autoscaling but that no server published.
-- No parameters.
SELECT substr(c.name, 9) AS worker_group, c.config FROM config c
 WHERE c.name LIKE 'worker\_\_%' AND c.config ? 'autoscaling'
   AND NOT EXISTS (SELECT 1 FROM autoscale_group g WHERE 'worker__' || g.worker_group = c.name);


-- name: autoscale_jobs_waiting
-- Jobs due and not running for a group's tags.
-- $1 plain tags (text[]), $2 'tag(ws)' pairs (text[]).
SELECT count(*) FROM queue
 WHERE NOT running AND scheduled_for <= now()
   AND (tag = ANY($1::text[]) OR tag || '(' || workspace || ')' = ANY($2::text[]));


-- name: autoscale_group_workers
-- A group's live workers: how many, and their occupancy over 15 s, 5 min and 30 min weighted by their subworkers (NULL when none).
-- $1 group, $2 seconds since the last ping for a worker to count as live (float).
SELECT count(*)::int AS workers,
       sum(occupancy_15s * subworkers) / nullif(sum(subworkers), 0) AS occ_15s,
       sum(occupancy_5m * subworkers) / nullif(sum(subworkers), 0) AS occ_5m,
       sum(occupancy_30m * subworkers) / nullif(sum(subworkers), 0) AS occ_30m
  FROM worker WHERE worker_group = $1 AND last_ping > now() - make_interval(secs => $2);


-- name: autoscale_set_desired
-- Record the count asked for a group, and that it is autoscaled with these tags (its stored config may have turned it on, or be all that defines it).
-- $1 group, $2 plain tags (text[]), $3 'tag(ws)' pairs (text[]), $4 count, $5 event type.
INSERT INTO autoscale_group (worker_group, profile, plain_tags, pair_tags, desired, last_change_at, last_event_type)
VALUES ($1, '{}', $2, $3, $4, now(), $5)
ON CONFLICT (worker_group) DO UPDATE SET enabled = true, plain_tags = $2, pair_tags = $3, desired = $4,
    last_change_at = now(), last_event_type = $5;


-- name: autoscale_insert_event
-- Record one autoscaling event.
-- $1 group, $2 event type, $3 workers before, $4 workers asked for, $5 reason, $6 integration, $7 status, $8 output, $9 server.
INSERT INTO autoscale_event (worker_group, event_type, from_workers, desired_workers, reason,
    integration, status, output, server)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id;


-- name: autoscale_list_events
-- The latest events, newest first, of one group or all.
-- $1 group or NULL, $2 how many.
SELECT * FROM autoscale_event WHERE $1::text IS NULL OR worker_group = $1
 ORDER BY id DESC LIMIT $2;


-- name: autoscale_desired
-- The counts asked for the given groups (the `sandmill up` supervisor's poll).
-- $1 groups (text[]).
SELECT worker_group, desired FROM autoscale_group
 WHERE worker_group = ANY($1::text[]) AND desired IS NOT NULL;


-- name: autoscale_running_per_worker
-- A group's live workers with the jobs each has running or held (the supervisor stops an idle one first).
-- $1 group.
SELECT w.name, (SELECT count(*) FROM queue q WHERE q.running AND q.worker = w.name)::int AS running
  FROM worker w WHERE w.worker_group = $1;


-- name: autoscale_group_for_tag
-- The enabled autoscaled group serving a tag (for a workspace), if any: a job waiting there waits for a worker to start.
-- $1 tag, $2 workspace.
SELECT worker_group FROM autoscale_group
 WHERE enabled AND ($1 = ANY(plain_tags) OR $1 || '(' || $2 || ')' = ANY(pair_tags))
 ORDER BY worker_group LIMIT 1;


-- name: autoscale_list_groups
-- The autoscaled groups and the count each was last asked for.
-- No parameters.
SELECT worker_group, enabled, desired, last_event_type, last_change_at, plain_tags, pair_tags
  FROM autoscale_group ORDER BY worker_group;
