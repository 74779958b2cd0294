-- Version 3. Where each output chunk starts in its stream (in bytes), so that a hole (output
-- a worker dropped, the head the store trimmed) is marked where it is. Chunks kept from before
-- start where the bytes trimmed from their stream end.

ALTER TABLE output ADD COLUMN pos INTEGER NOT NULL DEFAULT 0;

UPDATE output SET pos =
    COALESCE((SELECT CASE output.stream WHEN 'stdout' THEN a.stdout_bytes - a.stdout_kept
                                        ELSE a.stderr_bytes - a.stderr_kept END
              FROM attempts a WHERE a.job_id = output.job_id AND a.attempt = output.attempt), 0)
  + COALESCE((SELECT SUM(o.size) FROM output o WHERE o.job_id = output.job_id AND o.attempt = output.attempt
              AND o.stream = output.stream AND o.id < output.id), 0);

-- What a listing shows of a job, kept apart from its spec (which may be large): its name and the
-- start of its command as a person reads it.
ALTER TABLE jobs ADD COLUMN name TEXT;
ALTER TABLE jobs ADD COLUMN command TEXT;

UPDATE jobs SET name = json_extract(spec, '$.name'),
    command = substr(CASE json_extract(spec, '$.kind') WHEN 'shell' THEN json_extract(spec, '$.shell')
                     ELSE (SELECT group_concat(value, ' ') FROM json_each(jobs.spec, '$.argv')) END, 1, 257);

-- Specs keep the form they were submitted in (command, shell, or task and args), not kind and argv,
-- and the attempts they were given.
UPDATE jobs SET spec = json_remove(
    CASE json_extract(spec, '$.kind')
        WHEN 'command' THEN json_set(spec, '$.command', json(json_extract(spec, '$.argv')))
        WHEN 'task' THEN json_set(spec, '$.task', json_extract(spec, '$.argv[0]'),
                                  '$.args', json(json_remove(json_extract(spec, '$.argv'), '$[0]')))
        ELSE spec END,
    '$.kind', '$.argv')
  WHERE json_extract(spec, '$.kind') IS NOT NULL;

UPDATE jobs SET spec = json_set(spec, '$.max_attempts', max_attempts)
  WHERE json_extract(spec, '$.max_attempts') IS NULL;

-- The size of each spec, so that a claim returns the small ones in its own statement and the big ones
-- are read after it, outside the write transaction.
ALTER TABLE jobs ADD COLUMN spec_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET spec_bytes = length(spec);

-- Listings filtered by queue and state read this in id order (state alone: jobs_state; a queue alone:
-- a page from each of its states, merged).
CREATE INDEX jobs_queue_state ON jobs (queue, state, id);
