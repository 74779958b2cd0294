-- Version 5: idempotency keys. A job may carry a key (its spec's idempotency_key, or the Idempotency-Key header of
-- its submit); a second submit with the key of a kept job is that job, not a new one. The unique index is what
-- makes it so across every scheduler of the database: a submit inserts with ON CONFLICT DO NOTHING (which waits
-- for a concurrent insert of the same key to commit or roll back) and reads the winner, never checks first.
-- Partial: jobs without a key (most) cost the index nothing.
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
