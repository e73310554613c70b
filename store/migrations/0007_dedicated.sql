-- Dedicated workers (issue 18): a script created with dedicated_worker: true has its jobs
-- routed to the worker group dedicated to it (tag '<workspace>:<path>'). Versions created
-- without it hash as before (scripts.script_hash covers the field only when true).
ALTER TABLE script ADD COLUMN dedicated_worker boolean NOT NULL DEFAULT false;
