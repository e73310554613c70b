-- Agent workers (workers that reach the server over HTTP only, issue 19).
-- agent_key: the secret that signs agent tokens (HS256 JWTs), one row, made by the first
-- server that needs it, so that every server of one database accepts the same tokens.
CREATE TABLE agent_key (
    id         smallint    PRIMARY KEY CHECK (id = 1),
    secret     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Revoked agent tokens, by their JWT id; kept until the token would have expired anyway.
CREATE TABLE agent_token_blacklist (
    jti          text        PRIMARY KEY,
    worker_group text        NOT NULL,
    revoked_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
