-- Version 11: concurrency limits by key (orch/core/concurrency.py). A job's key and limit are columns of its
-- own (ckey, climit); held marks a queued job kept back because its key is full. The invariant, per key:
--     running + queued-and-not-held <= limit
-- is kept here, by triggers, so that every path that moves a job keeps it (a submit, a claim, an end, a retry,
-- a lease the reaper takes back, a replay, a hand-back, and whatever comes later). The claim reads jobs_ready,
-- which now covers unheld queued jobs only: a full key costs it no row read, and never blocks its queue.
ALTER TABLE jobs ADD COLUMN ckey TEXT;
ALTER TABLE jobs ADD COLUMN climit INTEGER;
ALTER TABLE jobs ADD COLUMN held INTEGER NOT NULL DEFAULT 0 CHECK (held IN (0, 1));
DROP INDEX jobs_ready;
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, id) WHERE state = 'queued' AND held = 0;
-- The jobs taking a key's slots (running, or queued and not held: the states are read by IN), and the held
-- ones in the order they are let go (the claim's order: priority, then age).
CREATE INDEX jobs_ckey ON jobs (ckey, state) WHERE ckey IS NOT NULL AND held = 0;
CREATE INDEX jobs_held ON jobs (ckey, priority DESC, id) WHERE state = 'queued' AND held = 1;

-- A keyed job queued (at its submit, or again: a retry due, a scheduled job due, a replay, a hand-back) is held
-- when the other jobs of its key take all of its slots.
CREATE TRIGGER jobs_ckey_submit AFTER INSERT ON jobs
WHEN NEW.ckey IS NOT NULL AND NEW.state = 'queued'
BEGIN
    UPDATE jobs SET held = 1 WHERE id = NEW.id AND NEW.climit <= (
        SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE ckey = NEW.ckey AND held = 0
                              AND state IN ('queued', 'running') AND id <> NEW.id LIMIT NEW.climit));
END;
CREATE TRIGGER jobs_ckey_queued AFTER UPDATE OF state ON jobs
WHEN NEW.ckey IS NOT NULL AND NEW.state = 'queued' AND OLD.state <> 'queued'
BEGIN
    UPDATE jobs SET held = (NEW.climit <= (
        SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE ckey = NEW.ckey AND held = 0
                              AND state IN ('queued', 'running') AND id <> NEW.id LIMIT NEW.climit)))
    WHERE id = NEW.id;
END;
-- A keyed job that took a slot and no longer does (it ended, went to backoff, was taken back from a lost
-- worker; not a claim, which keeps its slot) lets the first held job of its key go, if its limit allows, and
-- writes which into unheld: the store reads (and empties) it at the end of each write batch, and wakes the
-- workers waiting on that job's queue. (Within a trigger, changes() and last_insert_rowid() are those of the
-- trigger's own statements: the UPDATE lets go the job the INSERT wrote down, if it wrote one.)
CREATE TABLE unheld (job_id INTEGER NOT NULL, queue TEXT NOT NULL, attempt INTEGER NOT NULL);
CREATE TRIGGER jobs_ckey_freed AFTER UPDATE OF state ON jobs
WHEN NEW.ckey IS NOT NULL AND NEW.state <> 'queued' AND NEW.state <> 'running'
     AND (OLD.state = 'running' OR (OLD.state = 'queued' AND OLD.held = 0))
BEGIN
    INSERT INTO unheld (job_id, queue, attempt)
    SELECT id, queue, attempt FROM jobs
    WHERE id = (SELECT id FROM jobs WHERE ckey = NEW.ckey AND state = 'queued' AND held = 1
                ORDER BY priority DESC, id LIMIT 1)
      AND climit > (SELECT COUNT(*) FROM jobs WHERE ckey = NEW.ckey AND held = 0 AND state IN ('queued', 'running'));
    UPDATE jobs SET held = 0
    WHERE changes() = 1 AND id = (SELECT job_id FROM unheld WHERE rowid = last_insert_rowid());
END;
