-- Version 11: concurrency limits by key (orch/core/concurrency.py). A job's key and limit are columns of its
-- own (ckey, climit); held marks a queued job kept back because its key is full. The invariant, per key:
--     running + queued-and-not-held <= limit
-- is kept by the statements that queue a job and by a trigger on the moves that free a slot (below). The
-- claim reads jobs_ready, which now covers unheld queued jobs only: a full key costs it no row read, and never
-- blocks its queue.
ALTER TABLE jobs ADD COLUMN ckey TEXT;
ALTER TABLE jobs ADD COLUMN climit INTEGER;
ALTER TABLE jobs ADD COLUMN held INTEGER NOT NULL DEFAULT 0 CHECK (held IN (0, 1));
-- A queue-wide limit (orch queue set Q --concurrency N): at most N of its jobs run at once. The claim weighs it
-- (SQLite's single writer orders the claims: no two can both see a last free slot).
ALTER TABLE queues ADD COLUMN concurrency INTEGER CHECK (concurrency IS NULL OR concurrency >= 1);
DROP INDEX jobs_ready;
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, id) WHERE state = 'queued' AND held = 0;
-- The jobs taking a key's slots (running, or queued and not held: the states are read by IN), and the held
-- ones in the order they are let go (the claim's order: priority, then age).
CREATE INDEX jobs_ckey ON jobs (ckey, state) WHERE ckey IS NOT NULL AND held = 0;
CREATE INDEX jobs_held ON jobs (ckey, priority DESC, id) WHERE state = 'queued' AND held = 1;

-- A keyed job that becomes queued (its submit, a retry or a scheduled job due, a replay, a hand-back) is held
-- when the others of its key take all of its slots: the statements that queue a job say so themselves
-- (store/sqlite.py: _HELD_AT_INSERT, _HELD_NOW), as a column they set.
--
-- A keyed job that took a slot and no longer does (it ended, went to backoff, was taken back from a lost
-- worker; not a claim, which keeps its slot) writes its key into freed_keys; before each write batch commits,
-- the store lets the first held jobs of those keys go, as many as have room, and wakes the workers waiting on
-- their queues. (A trigger that UPDATEs jobs itself would do it in the statement, but SQLite makes such a
-- trigger cost more and more in a long transaction with savepoints, as every write batch is: 0.4 ms a row
-- after 10,000 of them. An INSERT into a small table costs what any INSERT does.)
CREATE TABLE freed_keys (ckey TEXT NOT NULL);
CREATE TRIGGER jobs_ckey_freed AFTER UPDATE OF state ON jobs
WHEN NEW.ckey IS NOT NULL AND NEW.state <> 'queued' AND NEW.state <> 'running'
     AND (OLD.state = 'running' OR (OLD.state = 'queued' AND OLD.held = 0))
BEGIN
    INSERT INTO freed_keys (ckey) VALUES (NEW.ckey);
END;
