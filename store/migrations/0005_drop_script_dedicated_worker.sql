-- script.dedicated_worker was validated and stored, but nothing acted on it; a later
-- feature brings it back working. (Script hashes cover the columns: versions created from
-- now on hash without it; stored versions keep theirs.)
ALTER TABLE script DROP COLUMN dedicated_worker;
