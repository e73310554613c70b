-- Python dependencies: a script version's lock, resolved by a dependency job.


-- name: pydeps_mark_pending
-- Mark a script version's lock to be resolved, unless it is resolved or being resolved already (a failed one is tried again); returns the hash when a dependency job is to be pushed.
-- $1 workspace, $2 hash, $3 requirements (one a line).
UPDATE script SET requirements = $3, lock = NULL, lock_status = 'pending', lock_error = NULL
 WHERE workspace = $1 AND hash = $2 AND lock_status IS DISTINCT FROM 'ready'
       AND lock_status IS DISTINCT FROM 'pending'
RETURNING hash;


-- name: pydeps_set_lock_job
-- Record which dependency job resolves a script version's lock (its logs are the resolver's).
-- $1 workspace, $2 hash, $3 the dependency job's id.
UPDATE script SET lock_job = $3 WHERE workspace = $1 AND hash = $2;


-- name: pydeps_script_lock
-- A script version's requirements and lock state, as the worker reads them before running one of its jobs.
-- $1 workspace, $2 hash.
SELECT requirements, lock, lock_status, lock_error, lock_job FROM script
 WHERE workspace = $1 AND hash = $2;


-- name: pydeps_store_lock
-- Record a script version's resolved lock (status ready) or the resolver's failure (status failed), only while it is pending: the first resolution wins, so every job of the version uses the same lock.
-- $1 workspace, $2 hash, $3 lock text or NULL, $4 status (ready | failed), $5 error or NULL.
UPDATE script SET lock = $3, lock_status = $4, lock_error = $5
 WHERE workspace = $1 AND hash = $2 AND lock_status = 'pending'
RETURNING hash;
