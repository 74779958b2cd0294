-- Version 9: job dependencies (orch/core/dag.py), as SQLite's version 12. Two new states, 'blocked' (waits on its
-- dependencies) and 'skipped' (a dependency ended so that it can never be met, or a full concurrency key skipped
-- it). New columns of a job:
--   waiting   its dependencies not met yet (0 for a job without any); it is queued when the last is met
--   fanout    some job depends on it: its end is looked at by its dependents (the trigger below)
--   workflow  the id of the first job of the batch it came in, when that batch is a workflow (refs, depends_on)
-- deps holds one row per dependency: the job, the job it waits on, what end of it meets it (cond), whether it
-- is met, and the ref the dependency had in the workflow (its key in the dependent's inputs).
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check CHECK (state IN ('blocked', 'scheduled', 'queued', 'running',
    'retrying', 'succeeded', 'failed', 'cancelled', 'skipped'));
ALTER TABLE jobs ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0, ADD COLUMN fanout BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN workflow BIGINT;
DROP INDEX jobs_finished;
CREATE INDEX jobs_finished ON jobs (state, finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled', 'skipped');
CREATE INDEX jobs_workflow ON jobs (workflow, id) WHERE workflow IS NOT NULL;
-- A job's result: the JSON value its attempt wrote to $ORCH_RESULT_PATH (its dependents read it as inputs).
ALTER TABLE attempts ADD COLUMN value TEXT;
CREATE TABLE deps (
    job_id BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    dep_id BIGINT  NOT NULL,
    cond   TEXT    NOT NULL CHECK (cond IN ('success', 'failure', 'completion')),
    met    BOOLEAN NOT NULL DEFAULT FALSE,
    ref    TEXT,
    PRIMARY KEY (job_id, dep_id)
);
CREATE INDEX deps_by_dep ON deps (dep_id);

-- Whether a dependency ``cond`` is met by its job being in state ``st``: TRUE, FALSE (never), or NULL (it has
-- not ended). core.dag.met says the same.
CREATE FUNCTION orch_dep_met(cond TEXT, st TEXT) RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN st IS NULL OR st NOT IN ('succeeded', 'failed', 'cancelled', 'skipped') THEN NULL
                WHEN cond = 'completion' THEN TRUE
                WHEN cond = 'success' THEN st = 'succeeded'
                ELSE st = 'failed' END
$$;

-- The dependents of job ``start``, which ended or (replayed) ends no longer, decided at ``now``, and theirs in
-- turn, as store/sqlite.py's _decide does (the reasons are core.dag's): a blocked job whose dependency is met
-- counts it, and is queued at its last (scheduled while its due time is ahead); one whose dependency can never
-- be met is skipped; a dependency queued again is undecided again, and the jobs it had skipped wait on it once
-- more. Each dependent is locked before it is looked at (in id order), and the dependencies of one being
-- un-skipped are locked for share, so that an end racing this transaction through another replica is seen by
-- one of the two. Each move is told in a notice (store/postgres.py makes it a change). The moves it makes fire
-- the trigger again: those calls return at once (orch.settling), and the graph is walked here, a job at a time.
CREATE FUNCTION orch_settle(start BIGINT, now DOUBLE PRECISION) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    todo BIGINT[] := ARRAY[start];
    x BIGINT;
    x_state TEXT;
    d RECORD;
    j RECORD;
    m BOOLEAN;
    left_ INTEGER;
    pending INTEGER;
    broken BOOLEAN;
    to_state TEXT;
BEGIN
    IF current_setting('orch.settling', TRUE) = 'on' THEN
        RETURN;
    END IF;
    PERFORM set_config('orch.settling', 'on', TRUE);
    WHILE cardinality(todo) > 0 LOOP
        x := todo[1];
        todo := todo[2:];
        SELECT state INTO x_state FROM jobs WHERE id = x;
        CONTINUE WHEN NOT FOUND;
        FOR d IN SELECT job_id, cond FROM deps WHERE dep_id = x ORDER BY job_id LOOP
            SELECT state, attempt, queue, run_at, fanout INTO j FROM jobs WHERE id = d.job_id FOR UPDATE;
            SELECT met INTO m FROM deps WHERE job_id = d.job_id AND dep_id = x;
            IF x_state IN ('succeeded', 'failed', 'cancelled', 'skipped') THEN
                CONTINUE WHEN j.state <> 'blocked' OR m;
                IF orch_dep_met(d.cond, x_state) THEN
                    UPDATE deps SET met = TRUE WHERE job_id = d.job_id AND dep_id = x;
                    UPDATE jobs SET waiting = waiting - 1 WHERE id = d.job_id RETURNING waiting INTO left_;
                    IF left_ = 0 THEN
                        to_state := CASE WHEN j.run_at > now THEN 'scheduled' ELSE 'queued' END;
                        UPDATE jobs SET state = to_state, run_at = CASE WHEN to_state = 'queued' THEN now ELSE run_at END
                            WHERE id = d.job_id;
                        INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)
                            VALUES (d.job_id, j.attempt, 'blocked', to_state, now, 'dependencies met');
                        RAISE NOTICE USING MESSAGE = 'orch_moved ' || json_build_array(d.job_id, to_state, j.queue,
                            j.attempt, CASE WHEN to_state = 'scheduled' THEN j.run_at END, TRUE)::text;
                    END IF;
                ELSE
                    UPDATE jobs SET state = 'skipped', finished_at = now WHERE id = d.job_id;
                    INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)
                        VALUES (d.job_id, j.attempt, 'blocked', 'skipped', now, 'dependency ' || x || ' ended ' ||
                                x_state || ', not ' || CASE d.cond WHEN 'success' THEN 'succeeded'
                                                                   WHEN 'failure' THEN 'failed' ELSE 'ended' END);
                    RAISE NOTICE USING MESSAGE = 'orch_moved ' || json_build_array(d.job_id, 'skipped', j.queue,
                        j.attempt, NULL, FALSE)::text;
                    IF j.fanout THEN
                        todo := todo || d.job_id;
                    END IF;
                END IF;
            ELSIF j.state = 'blocked' AND m THEN
                UPDATE deps SET met = FALSE WHERE job_id = d.job_id AND dep_id = x;
                UPDATE jobs SET waiting = waiting + 1 WHERE id = d.job_id;
            ELSIF j.state = 'skipped' THEN
                PERFORM 1 FROM jobs WHERE id IN (SELECT dep_id FROM deps WHERE job_id = d.job_id) ORDER BY id FOR SHARE;
                SELECT count(*) FILTER (WHERE s.m IS NULL), coalesce(bool_or(NOT s.m), FALSE) INTO pending, broken
                    FROM (SELECT CASE WHEN k.id IS NULL THEN dd.met ELSE orch_dep_met(dd.cond, k.state) END AS m
                          FROM deps dd LEFT JOIN jobs k ON k.id = dd.dep_id WHERE dd.job_id = d.job_id) s;
                IF NOT broken THEN
                    UPDATE deps dd SET met = coalesce(orch_dep_met(dd.cond, k.state), FALSE) FROM jobs k
                        WHERE k.id = dd.dep_id AND dd.job_id = d.job_id;
                    to_state := CASE WHEN pending > 0 THEN 'blocked' WHEN j.run_at > now THEN 'scheduled'
                                     ELSE 'queued' END;
                    UPDATE jobs SET state = to_state, waiting = pending, finished_at = NULL,
                                    run_at = CASE WHEN to_state = 'queued' THEN now ELSE run_at END WHERE id = d.job_id;
                    INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)
                        VALUES (d.job_id, j.attempt, 'skipped', to_state, now, 'dependency replayed: ' || x);
                    RAISE NOTICE USING MESSAGE = 'orch_moved ' || json_build_array(d.job_id, to_state, j.queue,
                        j.attempt, CASE WHEN to_state = 'scheduled' THEN j.run_at END, TRUE)::text;
                    IF j.fanout THEN
                        todo := todo || d.job_id;
                    END IF;
                END IF;
            END IF;
        END LOOP;
    END LOOP;
    PERFORM set_config('orch.settling', 'off', TRUE);
END $$;

-- A job some job depends on that ends, or (replayed) ends no longer: its dependents are decided in the same
-- transaction, at the time the move stamped (its finished_at; a replay's run_at).
CREATE FUNCTION orch_settled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM orch_settle(NEW.id, coalesce(NEW.finished_at, NEW.run_at, extract(epoch FROM clock_timestamp())));
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_settled AFTER UPDATE OF state ON jobs FOR EACH ROW
    WHEN (NEW.fanout AND (NEW.state IN ('succeeded', 'failed', 'cancelled', 'skipped'))
          IS DISTINCT FROM (OLD.state IN ('succeeded', 'failed', 'cancelled', 'skipped')))
    EXECUTE FUNCTION orch_settled();
