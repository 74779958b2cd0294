-- Version 7: delayed jobs. A job submitted with a run_at or a delay still ahead starts in the new state
-- 'scheduled' (orch/core/states.py) and the reaper queues it once due; run_at holds when it is due, as it holds a
-- retrying job's. The state column's CHECK takes the new name: SQLite changes a CHECK only by making the table
-- again (as 0005 did, with foreign keys off: migrate() sees to that), every row and the id counter kept. A partial
-- index of the scheduled jobs by due time, beside jobs_due of the retrying ones, lets the reaper find the due ones
-- and the earliest one without reading the others.

CREATE TABLE jobs_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            TEXT    NOT NULL CHECK (state = 'scheduled' OR state = 'queued' OR state = 'running' OR state = 'retrying' OR state = 'succeeded' OR state = 'failed' OR state = 'cancelled'),
    spec             TEXT    NOT NULL,            -- JSON: the submitted form (core.spec.stored_spec)
    attempt          INTEGER NOT NULL DEFAULT 0,  -- number of the current/last attempt (fencing token)
    max_attempts     INTEGER NOT NULL,
    created_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    run_at           REAL,                        -- when a scheduled or retrying job is due (a queued one: was due)
    worker_id        TEXT,                        -- holder of the current lease
    lease_expires_at REAL,                        -- on the store's lease clock
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    exit_code        INTEGER,
    error            TEXT,
    name             TEXT,
    command          TEXT,
    spec_bytes       INTEGER NOT NULL DEFAULT 0
);
INSERT INTO jobs_new (id, queue, priority, state, spec, attempt, max_attempts, created_at, started_at, finished_at,
                      run_at, worker_id, lease_expires_at, cancel_requested, exit_code, error, name, command, spec_bytes)
    SELECT id, queue, priority, state, spec, attempt, max_attempts, created_at, started_at, finished_at,
           run_at, worker_id, lease_expires_at, cancel_requested, exit_code, error, name, command, spec_bytes
    FROM jobs;
-- Ids are never given twice, even those of jobs that are gone: the new table's counter starts where the old one was.
UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0))
    WHERE name = 'jobs_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'jobs_new', seq FROM sqlite_sequence WHERE name = 'jobs'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'jobs_new');
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, id) WHERE state = 'queued';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'retrying';
CREATE INDEX jobs_scheduled ON jobs (run_at) WHERE state = 'scheduled';
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_queue_state ON jobs (queue, state, id);
