-- The first schema: scripts, the queue, completed jobs, logs, workers, group configs.

CREATE TABLE script (
    workspace                 text        NOT NULL,
    path                      text        NOT NULL,
    hash                      text        NOT NULL,
    language                  text        NOT NULL,
    content                   text        NOT NULL,
    summary                   text        NOT NULL DEFAULT '',
    tag                       text,
    priority                  smallint,
    timeout_s                 real,
    concurrent_limit          integer,
    concurrency_time_window_s integer,
    concurrency_key           text,
    dedicated_worker          boolean     NOT NULL DEFAULT false,
    created_at                timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, hash)
);
CREATE INDEX script_path_idx ON script (workspace, path, created_at DESC);

CREATE TABLE queue (
    id                        uuid        PRIMARY KEY,
    seq                       bigserial   NOT NULL,   -- submission order, the tie-breaker
    workspace                 text        NOT NULL,
    kind                      text        NOT NULL,   -- script | preview | init | periodic
    script_path               text,
    script_hash               text,
    language                  text        NOT NULL,
    content                   text        NOT NULL,
    args                      jsonb       NOT NULL DEFAULT '{}',
    tag                       text        NOT NULL,
    priority                  smallint    NOT NULL DEFAULT 0,
    timeout_s                 real,
    created_by                text        NOT NULL DEFAULT 'admin',
    created_at                timestamptz NOT NULL DEFAULT now(),
    scheduled_for             timestamptz NOT NULL DEFAULT now(),
    running                   boolean     NOT NULL DEFAULT false,
    started_at                timestamptz,
    worker                    text,
    last_ping                 timestamptz,
    restarts                  integer     NOT NULL DEFAULT 0,
    canceled                  boolean     NOT NULL DEFAULT false,
    canceled_by               text,
    canceled_reason           text,
    concurrency_key           text,
    concurrent_limit          integer,
    concurrency_time_window_s integer
);
-- The pull: waiting jobs of a tag, best priority first, then oldest.
CREATE INDEX queue_pull_idx ON queue (tag, priority DESC, scheduled_for, seq) WHERE NOT running;
CREATE INDEX queue_running_idx ON queue (last_ping) WHERE running;

CREATE TABLE completed_job (
    id                        uuid        PRIMARY KEY,
    workspace                 text        NOT NULL,
    kind                      text        NOT NULL,
    script_path               text,
    script_hash               text,
    language                  text        NOT NULL,
    content                   text,
    args                      jsonb       NOT NULL DEFAULT '{}',
    tag                       text        NOT NULL,
    priority                  smallint    NOT NULL DEFAULT 0,
    created_by                text        NOT NULL DEFAULT 'admin',
    created_at                timestamptz NOT NULL,
    scheduled_for             timestamptz NOT NULL,
    started_at                timestamptz,
    completed_at              timestamptz NOT NULL DEFAULT now(),
    worker                    text,
    status                    text        NOT NULL,   -- success | failure | canceled
    result                    jsonb,
    error                     text,
    duration_ms               integer     NOT NULL DEFAULT 0,
    cpu_ms                    integer     NOT NULL DEFAULT 0,
    mem_peak                  integer     NOT NULL DEFAULT 0,  -- KiB
    outcome                   jsonb,
    restarts                  integer     NOT NULL DEFAULT 0,
    canceled_by               text,
    canceled_reason           text,
    concurrency_key           text
);
CREATE INDEX completed_job_ws_idx ON completed_job (workspace, completed_at DESC);

CREATE TABLE job_logs (
    id      bigserial PRIMARY KEY,
    job_id  uuid      NOT NULL,
    chunk   text      NOT NULL
);
CREATE INDEX job_logs_job_idx ON job_logs (job_id, id);

CREATE TABLE worker (
    name          text        PRIMARY KEY,
    worker_group  text        NOT NULL,
    hostname      text        NOT NULL,
    tags          text[]      NOT NULL,
    backend       text        NOT NULL,
    subworkers    integer     NOT NULL DEFAULT 1,
    info          jsonb       NOT NULL DEFAULT '{}',  -- cpus, memory, gpus, version
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_ping     timestamptz NOT NULL DEFAULT now(),
    jobs_done     bigint      NOT NULL DEFAULT 0,
    busy          integer     NOT NULL DEFAULT 0,     -- subworkers busy at the last ping
    occupancy     real        NOT NULL DEFAULT 0      -- busy time / wall time since the last ping
);

CREATE TABLE config (
    name       text        PRIMARY KEY,   -- e.g. worker__default
    config     jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
