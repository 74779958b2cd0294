-- Version 10: retention. Finished jobs are purged oldest first (retention.finished_jobs, orch purge): this index
-- finds them by the time they ended without reading the others. Partial: unfinished jobs cost it nothing.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
