-- Script versions: one row per (workspace, hash); the newest version of a path is the live one.


-- name: create_script
-- Store a version of a script (a no-op but for its created_at when the same version exists); its columns after hash are scripts._COLUMNS, in order.
-- $1 workspace, $2 path, $3 hash, $4 language, $5 content, $6 summary, $7 tag, $8 priority, $9 timeout_s, $10 concurrent_limit, $11 concurrency_time_window_s, $12 concurrency_key, $13 dedicated_worker.
INSERT INTO script (workspace, path, hash, language, content, summary, tag, priority, timeout_s,
                    concurrent_limit, concurrency_time_window_s, concurrency_key, dedicated_worker)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (workspace, hash) DO UPDATE SET created_at = now();


-- name: script_by_path
-- The newest version of the script at a path.
-- $1 workspace, $2 path.
SELECT * FROM script WHERE workspace = $1 AND path = $2 ORDER BY created_at DESC LIMIT 1;


-- name: script_by_hash
-- A script version by its hash.
-- $1 workspace, $2 hash.
SELECT * FROM script WHERE workspace = $1 AND hash = $2;


-- name: list_scripts
-- The newest version of every script path of a workspace, by path.
-- $1 workspace.
SELECT DISTINCT ON (path) path, hash, language, summary, tag, created_at FROM script
 WHERE workspace = $1 ORDER BY path, created_at DESC;
