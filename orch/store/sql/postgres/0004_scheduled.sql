-- Version 4: delayed jobs. A job submitted with a run_at or a delay still ahead starts in the new state
-- 'scheduled' (orch/core/states.py) and the reaper queues it once due; run_at holds when it is due, as it holds a
-- retrying job's. The state column's CHECK takes the new name, and a partial index of the scheduled jobs by due
-- time, beside jobs_due of the retrying ones, lets the reaper find the due ones and the earliest one without
-- reading the others.
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('scheduled', 'queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled'));
CREATE INDEX jobs_scheduled ON jobs (run_at) WHERE state = 'scheduled';
