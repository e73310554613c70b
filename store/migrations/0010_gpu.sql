-- GPU workers: each GPU a worker hands out and the jobs that hold it now, written by the
-- worker when an assignment changes ([{"index", "name", "jobs": [job id...]}]; empty for
-- workers without GPUs). `sandmill workers` and /api/workers/list show it.
ALTER TABLE worker ADD COLUMN gpu_jobs jsonb NOT NULL DEFAULT '[]';
