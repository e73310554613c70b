-- Completion NOTIFYs (sandmill_done) only for jobs that someone waits on: a NOTIFY wakes
-- every listening backend of the database (each worker's listener, each server's), so a
-- NOTIFY per completed job costs every one of them a wake-up per completion batch.
ALTER TABLE queue ADD COLUMN notify_done boolean NOT NULL DEFAULT false;
