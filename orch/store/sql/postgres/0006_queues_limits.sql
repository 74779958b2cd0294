-- Version 6: queue settings and rate limits. A queue exists by its jobs naming it; a row here only holds what
-- was set on it: paused (a paused queue hands out no job; its running jobs go on). No row: not paused.
-- Every claim reads it (a primary key probe per queue asked for), so a pause holds for every replica at once.
CREATE TABLE queues (
    name TEXT PRIMARY KEY,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at DOUBLE PRECISION NOT NULL
);

-- Rate limits (orch limit set NAME --rate 100/m): a token bucket kept as one number, tat, the theoretical
-- arrival time of the next start (orch/core/rates.py); NULL: never used, full. A submit naming the limit locks its
-- row (FOR UPDATE, in name order), reads and moves tat, so submits through every replica share one bucket.
CREATE TABLE limits (
    name TEXT PRIMARY KEY,
    count INTEGER NOT NULL CHECK (count >= 1),
    per DOUBLE PRECISION NOT NULL CHECK (per > 0),
    burst INTEGER NOT NULL DEFAULT 1 CHECK (burst >= 1),
    tat DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL
);
