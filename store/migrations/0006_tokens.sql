-- Workspace tokens: a token a user can be given for one workspace, with scopes. Only the
-- sha256 of the whole token is kept; the prefix (also inside the token) names it for
-- listing and revoking, and is the key of the one lookup an authenticated request costs.
CREATE TABLE token (
    prefix       text        PRIMARY KEY,
    token_hash   bytea       NOT NULL,
    label        text        NOT NULL,
    workspace    text        NOT NULL,
    scopes       text[]      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX token_workspace_idx ON token (workspace, created_at);
