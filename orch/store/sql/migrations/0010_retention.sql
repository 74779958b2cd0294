-- Version 10: retention. Finished jobs are purged oldest first (retention.finished_jobs, orch purge): this index
-- finds them by state and the time they ended without reading the others (a purge of one state reads no
-- other's), a state at a time. Partial: unfinished jobs cost it nothing.
CREATE INDEX jobs_finished ON jobs (state, finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
