-- Version 13: cron schedules (orch/core/cron.py). A schedule's definition is its JSON (cron, tz, overlap, catchup,
-- job, paused); what its ticks did is kept beside it: the last tick decided (fired, skipped or missed: the ticks
-- after it are ahead), when the next one falls (NULL: never again), the newest job a tick submitted, and counts.
-- A fired tick's job carries the idempotency key schedule:NAME:TIME (core.cron.tick_key): the unique index of
-- 0008 makes it one job per (schedule, time), in the transaction that submits it, however often it is fired.
CREATE TABLE schedules (
    name           TEXT    PRIMARY KEY,
    definition     TEXT    NOT NULL,
    paused         INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    created_at     REAL    NOT NULL,
    updated_at     REAL    NOT NULL,
    last_tick      REAL    NOT NULL,
    next_at        REAL,
    last_job       INTEGER,
    fired          INTEGER NOT NULL DEFAULT 0,
    skipped        INTEGER NOT NULL DEFAULT 0,
    missed         INTEGER NOT NULL DEFAULT 0,
    last_missed_at REAL
) WITHOUT ROWID;
CREATE INDEX schedules_due ON schedules (next_at) WHERE paused = 0 AND next_at IS NOT NULL;
