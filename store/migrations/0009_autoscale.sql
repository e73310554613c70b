-- Autoscaling (issue 20): each worker's occupancy over three windows, the groups the
-- autoscaler knows with the count it last asked for, and its events.

ALTER TABLE worker
    ADD COLUMN occupancy_15s real NOT NULL DEFAULT 0,  -- busy slot-seconds / slot-seconds, last 15 s
    ADD COLUMN occupancy_5m  real NOT NULL DEFAULT 0,  -- ... last 5 minutes
    ADD COLUMN occupancy_30m real NOT NULL DEFAULT 0;  -- ... last 30 minutes

-- One row per autoscaled group: its profile as a server published it (from its profile
-- files), the tags whose jobs it counts, and the worker count the autoscaler asked for
-- (what the `sandmill up` supervisor starts and stops processes to match).
CREATE TABLE autoscale_group (
    worker_group    text        PRIMARY KEY,
    profile         jsonb       NOT NULL,
    enabled         boolean     NOT NULL DEFAULT true,
    plain_tags      text[]      NOT NULL DEFAULT '{}',  -- tags served for every workspace
    pair_tags       text[]      NOT NULL DEFAULT '{}',  -- 'tag(ws)': tags served for one workspace
    desired         integer,                            -- NULL: no decision yet
    last_change_at  timestamptz,                        -- the last change of `desired`
    last_event_type text,
    published_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE autoscale_event (
    id              bigserial   PRIMARY KEY,
    worker_group    text        NOT NULL,
    event_type      text        NOT NULL,  -- full_scale_out | scale_out | scale_in | clamp
    from_workers    integer     NOT NULL,
    desired_workers integer     NOT NULL,
    reason          text        NOT NULL,
    integration     text        NOT NULL,  -- local | script | kubernetes | dryrun
    status          text        NOT NULL,  -- requested | recorded | exit <n> | applied | failed: ...
    output          text        NOT NULL DEFAULT '',
    server          text        NOT NULL,  -- the server whose autoscaler acted
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX autoscale_event_group_idx ON autoscale_event (worker_group, id DESC);
