-- Version 10: cron schedules, as SQLite's version 13. Only the scheduler holding the reaper's role fires them;
-- the idempotency key of each tick's job (schedule:NAME:TIME) makes a tick one job even if two fire it (a
-- leadership handed over mid-tick), and schedule_ticked only moves last_tick on from the value it read.
CREATE TABLE schedules (
    name           TEXT             PRIMARY KEY,
    definition     TEXT             NOT NULL,
    paused         BOOLEAN          NOT NULL DEFAULT FALSE,
    created_at     DOUBLE PRECISION NOT NULL,
    updated_at     DOUBLE PRECISION NOT NULL,
    last_tick      DOUBLE PRECISION NOT NULL,
    next_at        DOUBLE PRECISION,
    last_job       BIGINT,
    fired          BIGINT           NOT NULL DEFAULT 0,
    skipped        BIGINT           NOT NULL DEFAULT 0,
    missed         BIGINT           NOT NULL DEFAULT 0,
    last_missed_at DOUBLE PRECISION
);
CREATE INDEX schedules_due ON schedules (next_at) WHERE NOT paused AND next_at IS NOT NULL;
