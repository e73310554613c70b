-- Workspace tokens: create, authenticate (one primary-key lookup), list, delete.


-- name: create_token
-- Store a new token (its hash only); nothing when the prefix is taken (the caller draws another).
-- $1 prefix, $2 token_hash (sha256 of the whole token), $3 label, $4 workspace, $5 scopes, $6 expires_at (NULL: never).
INSERT INTO token (prefix, token_hash, label, workspace, scopes, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (prefix) DO NOTHING
RETURNING prefix, label, workspace, scopes, created_at, expires_at;


-- name: auth_token
-- The token with this prefix and hash, and whether it has expired; stamps last_used_at at most once a minute (a write per request would cost every request a commit).
-- $1 prefix, $2 token_hash.
WITH t AS (
    SELECT prefix, label, workspace, scopes, expires_at,
           (expires_at IS NOT NULL AND expires_at <= now()) AS expired
      FROM token WHERE prefix = $1 AND token_hash = $2
), used AS (
    UPDATE token SET last_used_at = now()
     WHERE prefix = $1 AND token_hash = $2
       AND (expires_at IS NULL OR expires_at > now())
       AND (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds')
)
SELECT * FROM t;


-- name: list_tokens
-- Every token, or a workspace's, oldest first; never the hash.
-- $1 workspace (NULL: all).
SELECT prefix, label, workspace, scopes, created_at, expires_at, last_used_at,
       (expires_at IS NOT NULL AND expires_at <= now()) AS expired
  FROM token WHERE $1::text IS NULL OR workspace = $1
 ORDER BY created_at, prefix;


-- name: delete_token
-- Revoke a token: its next request is refused (no cache holds it).
-- $1 prefix.
DELETE FROM token WHERE prefix = $1 RETURNING prefix, label, workspace;
