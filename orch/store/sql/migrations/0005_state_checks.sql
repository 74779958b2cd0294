-- Version 5: the state columns accept only the names of the states (orch/core/states.py), so a write of
-- anything else fails in the database itself, whatever wrote it. SQLite adds a CHECK only by making the
-- table again: each table is copied into a new one with the constraint, and takes its place. migrate()
-- runs this with foreign keys off, as SQLite's own procedure for changing a table says. Each CHECK is a chain of
-- ORs, not an IN list: SQLite builds an IN list's lookup table again for every row a statement writes, which
-- cost every submit ~3 us a job (measured with 40 batches of 1,000); the ORs cost next to nothing.

CREATE TABLE jobs_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            TEXT    NOT NULL CHECK (state = 'queued' OR state = 'running' OR state = 'retrying' OR state = 'succeeded' OR state = 'failed' OR state = 'cancelled'),
    spec             TEXT    NOT NULL,            -- JSON: the submitted form (core.spec.stored_spec)
    attempt          INTEGER NOT NULL DEFAULT 0,  -- number of the current/last attempt (fencing token)
    max_attempts     INTEGER NOT NULL,
    created_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    run_at           REAL,                        -- when a retrying job is due
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
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_queue_state ON jobs (queue, state, id);

CREATE TABLE attempts_new (
    job_id          INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt         INTEGER NOT NULL,
    worker_id       TEXT,
    state           TEXT    NOT NULL CHECK (state = 'running' OR state = 'succeeded' OR state = 'failed' OR state = 'timed_out' OR state = 'lost' OR state = 'cancelled' OR state = 'handed_back'),
    started_at      REAL    NOT NULL,
    finished_at     REAL,
    exit_code       INTEGER,
    error           TEXT,
    duration        REAL,
    stdout_bytes    INTEGER NOT NULL DEFAULT 0,   -- every byte received
    stderr_bytes    INTEGER NOT NULL DEFAULT 0,
    stdout_kept     INTEGER NOT NULL DEFAULT 0,   -- bytes still stored (the tail)
    stderr_kept     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt)
) WITHOUT ROWID;
INSERT INTO attempts_new SELECT job_id, attempt, worker_id, state, started_at, finished_at, exit_code, error, duration,
    stdout_bytes, stderr_bytes, stdout_kept, stderr_kept FROM attempts;
DROP TABLE attempts;
ALTER TABLE attempts_new RENAME TO attempts;

CREATE TABLE workers_new (
    id              TEXT    PRIMARY KEY,
    name            TEXT    NOT NULL,
    hostname        TEXT    NOT NULL,
    queues          TEXT    NOT NULL,             -- JSON list
    concurrency     INTEGER NOT NULL,
    state           TEXT    NOT NULL CHECK (state = 'alive' OR state = 'draining' OR state = 'lost' OR state = 'stopped'),
    registered_at   REAL    NOT NULL,
    last_heartbeat  REAL    NOT NULL,             -- on the store's lease clock
    running         INTEGER NOT NULL DEFAULT 0,
    credential_hash TEXT,
    metrics         TEXT
);
INSERT INTO workers_new SELECT id, name, hostname, queues, concurrency, state, registered_at, last_heartbeat, running,
    credential_hash, metrics FROM workers;
DROP TABLE workers;
ALTER TABLE workers_new RENAME TO workers;
