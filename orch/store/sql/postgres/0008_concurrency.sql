-- Version 8: concurrency limits by key (orch/core/concurrency.py), as SQLite's version 11. A job's key and
-- limit are columns of its own (ckey, climit); held marks a queued job kept back because its key is full. The
-- invariant, per key:   running + queued-and-not-held <= limit
-- is kept by triggers, so that every path that moves a job keeps it, through every replica. The claim reads
-- jobs_ready, which covers unheld queued jobs only: a full key costs it no row read, and never blocks its queue.
ALTER TABLE jobs ADD COLUMN ckey TEXT, ADD COLUMN climit INTEGER, ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;
-- A queue-wide limit (orch queue set Q --concurrency N): at most N of its jobs run at once. A claim from such a
-- queue takes the queue's advisory lock first, then counts what runs there (store/postgres.py).
ALTER TABLE queues ADD COLUMN concurrency INTEGER CHECK (concurrency IS NULL OR concurrency >= 1);
DROP INDEX jobs_ready;
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, id) WHERE state = 'queued' AND NOT held;
CREATE INDEX jobs_ckey ON jobs (ckey, state) WHERE ckey IS NOT NULL AND NOT held;
CREATE INDEX jobs_held ON jobs (ckey, priority DESC, id) WHERE state = 'queued' AND held;

-- Before a keyed job takes or gives up a slot (its insert, any change of its state but a claim, which keeps the
-- slot its queued job had), the key's lock is taken for the rest of the transaction: the changes of one key
-- through any replica take turns, and each sees what the one before it committed (every statement of a
-- function reads a new snapshot). A job that is queued is held if the others of its key take all its slots.
CREATE FUNCTION orch_ckey_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(28530, hashtext(NEW.ckey));
    IF NEW.state = 'queued' AND (TG_OP = 'INSERT' OR OLD.state <> 'queued') THEN
        NEW.held := NEW.climit <= (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE ckey = NEW.ckey AND NOT held
                                   AND state IN ('queued', 'running') AND id <> NEW.id LIMIT NEW.climit) s);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_ckey_submit BEFORE INSERT ON jobs FOR EACH ROW
    WHEN (NEW.ckey IS NOT NULL) EXECUTE FUNCTION orch_ckey_slot();
CREATE TRIGGER jobs_ckey_move BEFORE UPDATE OF state ON jobs FOR EACH ROW
    WHEN (NEW.ckey IS NOT NULL AND OLD.state IS DISTINCT FROM NEW.state
          AND NOT (OLD.state = 'queued' AND NEW.state = 'running'))
    EXECUTE FUNCTION orch_ckey_slot();

-- A keyed job that took a slot and no longer does (it ended, went to backoff, was taken back from a lost
-- worker) lets the first held job of its key go, if its limit allows, and says which in a notice to the
-- session (store/postgres.py makes it a change: the scheduler wakes the workers waiting on that queue, and hints
-- the other schedulers as for a submit). A held job another transaction has locked (a cancel of it) is passed
-- over: the next one is let go; when all are, the first is waited for.
CREATE FUNCTION orch_ckey_freed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    next_id BIGINT;
    next_queue TEXT;
    next_limit INTEGER;
    next_attempt INTEGER;
BEGIN
    SELECT id, queue, climit, attempt INTO next_id, next_queue, next_limit, next_attempt FROM jobs
        WHERE ckey = NEW.ckey AND state = 'queued' AND held ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF next_id IS NULL THEN
        -- Every held job is locked by another transaction (a replay reading it, a cancel that may roll back):
        -- wait for the first (a deadlock with a cancel of it is broken by the server, and the store runs again).
        SELECT id, queue, climit, attempt INTO next_id, next_queue, next_limit, next_attempt FROM jobs
            WHERE ckey = NEW.ckey AND state = 'queued' AND held ORDER BY priority DESC, id LIMIT 1 FOR UPDATE;
    END IF;
    IF next_id IS NOT NULL AND next_limit > (SELECT count(*) FROM jobs WHERE ckey = NEW.ckey AND NOT held
                                            AND state IN ('queued', 'running')) THEN
        UPDATE jobs SET held = FALSE WHERE id = next_id;
        RAISE NOTICE USING MESSAGE = 'orch_unheld ' || json_build_array(next_id, next_queue, next_attempt)::text;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_ckey_freed AFTER UPDATE OF state ON jobs FOR EACH ROW
    WHEN (NEW.ckey IS NOT NULL AND NEW.state <> 'queued' AND NEW.state <> 'running'
          AND (OLD.state = 'running' OR (OLD.state = 'queued' AND NOT OLD.held)))
    EXECUTE FUNCTION orch_ckey_freed();
