-- The pull of a worker with several base tags (the native group has three): its
-- `tag = ANY(...)` cannot read queue_pull_idx in order, so without this index PostgreSQL
-- reads and sorts every waiting row of those tags per claim. Here it reads waiting rows in
-- pull order and stops at the first free ones of its tags.
CREATE INDEX queue_pull_order_idx ON queue (priority DESC, scheduled_for, seq) WHERE NOT running;
