-- Version 12: job dependencies (orch/core/dag.py). Two new states, 'blocked' (waits on its dependencies) and
-- 'skipped' (a dependency ended so that it can never be met, or a full concurrency key skipped it): the state
-- column's CHECK takes them, so the table is made again as in 0005 and 0007 (foreign keys off, every row and the
-- id counter kept). New columns of a job:
--   waiting   its dependencies not met yet (0 for a job without any); it is queued when the last is met
--   fanout    1 when some job depends on it: its end is looked at by its dependents (the trigger below)
--   workflow  the id of the first job of the batch it came in, when that batch is a workflow (refs, depends_on)
-- deps holds one row per dependency: the job, the job it waits on, what end of it meets it (cond), whether it
-- is met, and the ref the dependency had in the workflow (its key in the dependent's inputs).

CREATE TABLE jobs_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            TEXT    NOT NULL CHECK (state = 'blocked' OR state = 'scheduled' OR state = 'queued' OR state = 'running' OR state = 'retrying' OR state = 'succeeded' OR state = 'failed' OR state = 'cancelled' OR state = 'skipped'),
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
    spec_bytes       INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT,
    ckey             TEXT,                        -- its concurrency key (0011)
    climit           INTEGER,
    held             INTEGER NOT NULL DEFAULT 0 CHECK (held IN (0, 1)),
    waiting          INTEGER NOT NULL DEFAULT 0,
    fanout           INTEGER NOT NULL DEFAULT 0 CHECK (fanout IN (0, 1)),
    workflow         INTEGER
);
INSERT INTO jobs_new (id, queue, priority, state, spec, attempt, max_attempts, created_at, started_at, finished_at, run_at, worker_id, lease_expires_at, cancel_requested, exit_code, error, name, command, spec_bytes, idempotency_key, ckey, climit, held)
    SELECT id, queue, priority, state, spec, attempt, max_attempts, created_at, started_at, finished_at, run_at, worker_id, lease_expires_at, cancel_requested, exit_code, error, name, command, spec_bytes, idempotency_key, ckey, climit, held
    FROM jobs;
UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0))
    WHERE name = 'jobs_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'jobs_new', seq FROM sqlite_sequence WHERE name = 'jobs'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'jobs_new');
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'retrying';
CREATE INDEX jobs_scheduled ON jobs (run_at) WHERE state = 'scheduled';
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_queue_state ON jobs (queue, state, id);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (state, finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled', 'skipped');
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, id) WHERE state = 'queued' AND held = 0;
CREATE INDEX jobs_ckey ON jobs (ckey, state) WHERE ckey IS NOT NULL AND held = 0;
CREATE INDEX jobs_held ON jobs (ckey, priority DESC, id) WHERE state = 'queued' AND held = 1;
CREATE INDEX jobs_workflow ON jobs (workflow, id) WHERE workflow IS NOT NULL;
CREATE TRIGGER jobs_ckey_freed AFTER UPDATE OF state ON jobs
WHEN NEW.ckey IS NOT NULL AND NEW.state <> 'queued' AND NEW.state <> 'running'
     AND (OLD.state = 'running' OR (OLD.state = 'queued' AND OLD.held = 0))
BEGIN
    INSERT INTO freed_keys (ckey) VALUES (NEW.ckey);
END;

CREATE TABLE deps (
    job_id  INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    dep_id  INTEGER NOT NULL,
    cond    TEXT    NOT NULL CHECK (cond = 'success' OR cond = 'failure' OR cond = 'completion'),
    met     INTEGER NOT NULL DEFAULT 0 CHECK (met IN (0, 1)),
    ref     TEXT,
    PRIMARY KEY (job_id, dep_id)
) WITHOUT ROWID;
CREATE INDEX deps_by_dep ON deps (dep_id);

-- A job some job depends on that ends (or, replayed, ends no longer) writes its id into settled; before each
-- write batch commits, the store looks at its dependents (store/sqlite.py: _settle): those it meets are queued
-- once nothing else holds them, those it can never meet are skipped, and so on down the graph. (Not a trigger
-- that UPDATEs jobs itself: in a write batch's savepoints that costs more with every row, see 0011.)
CREATE TABLE settled (job_id INTEGER NOT NULL);
CREATE TRIGGER jobs_settled AFTER UPDATE OF state ON jobs
WHEN NEW.fanout = 1
     AND (NEW.state = 'succeeded' OR NEW.state = 'failed' OR NEW.state = 'cancelled' OR NEW.state = 'skipped')
      <> (OLD.state = 'succeeded' OR OLD.state = 'failed' OR OLD.state = 'cancelled' OR OLD.state = 'skipped')
BEGIN
    INSERT INTO settled (job_id) VALUES (NEW.id);
END;

-- A job's result: the JSON value its attempt wrote to $ORCH_RESULT_PATH (its dependents read it as inputs).
ALTER TABLE attempts ADD COLUMN value TEXT;
