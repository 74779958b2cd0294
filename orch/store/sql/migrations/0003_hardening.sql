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
