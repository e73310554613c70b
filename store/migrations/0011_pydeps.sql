-- Python scripts with dependencies: a script version's requirements and the lock resolved
-- from them (exact versions and hashes) by a dependency job on a worker.

ALTER TABLE script
    ADD COLUMN requirements text,           -- one requirement a line; NULL: needs nothing
    ADD COLUMN lock         text,           -- the resolved lock (uv pip compile --generate-hashes)
    ADD COLUMN lock_status  text,           -- NULL (no requirements) | pending | ready | failed
    ADD COLUMN lock_error   text,           -- the resolver's message when failed
    ADD COLUMN lock_job     uuid;           -- the dependency job that resolves (resolved) it
