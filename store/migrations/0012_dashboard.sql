-- The dashboard's paged lists and the Prometheus metrics' reads.
--
-- Completed jobs newest first, across workspaces (the dashboard's job list pages by
-- (completed_at, id); the metrics fold completed jobs by completed_at).
CREATE INDEX completed_job_completed_idx ON completed_job (completed_at DESC, id DESC);
-- A worker's init and periodic runs, newest first (the workers page: its last init run).
-- Partial: the jobs of scripts, nearly every row, cost this index nothing.
CREATE INDEX completed_job_admin_idx ON completed_job (worker, kind, completed_at DESC)
    WHERE kind IN ('init', 'periodic');

-- A worker's group and backend, kept after it unregisters (its `worker` row goes): the
-- metrics label a completed job by the group and backend of the worker that ran it.
-- Written by a trigger on `worker` when a worker registers (not on its pings).
CREATE TABLE worker_history (
    name          text        PRIMARY KEY,
    worker_group  text        NOT NULL,
    backend       text        NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO worker_history (name, worker_group, backend)
SELECT name, worker_group, backend FROM worker ON CONFLICT DO NOTHING;

CREATE FUNCTION sandmill_worker_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO worker_history (name, worker_group, backend)
    VALUES (NEW.name, NEW.worker_group, NEW.backend)
    ON CONFLICT (name) DO UPDATE SET worker_group = EXCLUDED.worker_group,
                                     backend = EXCLUDED.backend;
    RETURN NULL;
END $$;

CREATE TRIGGER worker_history_insert AFTER INSERT ON worker
    FOR EACH ROW EXECUTE FUNCTION sandmill_worker_history();
CREATE TRIGGER worker_history_update AFTER UPDATE OF worker_group, backend ON worker
    FOR EACH ROW EXECUTE FUNCTION sandmill_worker_history();
