-- Concurrency limits: one row per concurrency key, updated only by the pull (to take a
-- slot) and by completion (to give it back). Its WHERE is re-checked on the row's newest
-- version when pullers race (INSERT .. ON CONFLICT DO UPDATE .. WHERE), so the limit holds
-- without table locks. Times are clock_timestamp(), not now(): a puller that waited for
-- the key row must count from when it got it, not from when its statement began.

CREATE TABLE concurrency_key (
    key      text               PRIMARY KEY,
    running  uuid[]             NOT NULL DEFAULT '{}',  -- jobs of the key now running
    starts   double precision[] NOT NULL DEFAULT '{}'   -- epochs of starts, kept within the window
);

-- Starts still inside a window of `win` seconds (none kept when win is 0).
CREATE FUNCTION sandmill_live_starts(starts double precision[], win integer)
RETURNS double precision[] LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(s ORDER BY s), '{}')
      FROM unnest(starts) s
     WHERE win > 0 AND s > extract(epoch FROM clock_timestamp()) - win
$$;

-- May one more job of the key start now? Window 0: fewer than `lim` running.
-- Window w: fewer than `lim` starts within the last w seconds.
CREATE FUNCTION sandmill_has_slot(running uuid[], starts double precision[], lim integer, win integer)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN win > 0 THEN cardinality(sandmill_live_starts(starts, win)) < lim
                ELSE cardinality(running) < lim END
$$;

-- When the next job of the key may start: now() if it may, the time the oldest start
-- that matters leaves the window, or NULL when it waits for a running job to end.
CREATE FUNCTION sandmill_slot_free_at(running uuid[], starts double precision[], lim integer, win integer)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN sandmill_has_slot(running, starts, lim, win) THEN clock_timestamp()
        WHEN win > 0 THEN to_timestamp((
            SELECT s FROM unnest(sandmill_live_starts(starts, win)) s ORDER BY s
            OFFSET greatest(0, cardinality(sandmill_live_starts(starts, win)) - lim) LIMIT 1) + win)
        ELSE NULL END
$$;
