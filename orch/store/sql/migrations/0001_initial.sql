-- Version 1 of the schema. Migrations are applied in order by number; each
-- one moves PRAGMA user_version to its number. A fresh database is made by the
-- same files, so there is one road to every version.

CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            TEXT    NOT NULL,
    spec             TEXT    NOT NULL,            -- JSON, JobSpec.to_json()
    attempt          INTEGER NOT NULL DEFAULT 0,  -- number of the current/last attempt (fencing token)
    max_attempts     INTEGER NOT NULL,
    created_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    run_at           REAL,                        -- when a retrying job is due
    worker_id        TEXT,                        -- holder of the current lease
    lease_expires_at REAL,                        -- scheduler clock
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    exit_code        INTEGER,
    error            TEXT
);

-- Ready work, in dispatch order: only queued jobs are indexed.
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, id) WHERE state = 'queued';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'retrying';
CREATE INDEX jobs_state ON jobs (state, id);

CREATE TABLE attempts (
    job_id          INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt         INTEGER NOT NULL,
    worker_id       TEXT,
    state           TEXT    NOT NULL,             -- running or how it ended (models.Outcome)
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

CREATE TABLE output (
    id      INTEGER PRIMARY KEY,
    job_id  INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    stream  TEXT    NOT NULL,                     -- stdout or stderr
    data    TEXT    NOT NULL,
    size    INTEGER NOT NULL                      -- UTF-8 bytes of data
);
CREATE INDEX output_by_attempt ON output (job_id, attempt, id);

CREATE TABLE events (
    id         INTEGER PRIMARY KEY,
    job_id     INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    from_state TEXT,                              -- NULL for the submit
    to_state   TEXT    NOT NULL,
    at         REAL    NOT NULL,
    reason     TEXT    NOT NULL
);
CREATE INDEX events_by_job ON events (job_id, id);

CREATE TABLE workers (
    id             TEXT    PRIMARY KEY,
    name           TEXT    NOT NULL,
    hostname       TEXT    NOT NULL,
    queues         TEXT    NOT NULL,              -- JSON list
    concurrency    INTEGER NOT NULL,
    state          TEXT    NOT NULL,              -- alive, draining, lost, stopped
    registered_at  REAL    NOT NULL,
    last_heartbeat REAL    NOT NULL,
    running        INTEGER NOT NULL DEFAULT 0
);
