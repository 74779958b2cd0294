-- Version 9: queue settings and rate limits. A queue exists by its jobs naming it; a row here only holds what
-- was set on it: paused (a paused queue hands out no job; its running jobs go on). No row: not paused.
CREATE TABLE queues (
    name TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    updated_at REAL NOT NULL
) WITHOUT ROWID;

-- Rate limits (orch limit set NAME --rate 100/m): a token bucket kept as one number, tat, the theoretical
-- arrival time of the next start (orch/core/rates.py); NULL: never used, full. A submit naming the limit reads and
-- moves it in its transaction, and a start it does not allow yet is scheduled for the first time it does.
CREATE TABLE limits (
    name TEXT PRIMARY KEY,
    count INTEGER NOT NULL CHECK (count >= 1),
    per REAL NOT NULL CHECK (per > 0),
    burst INTEGER NOT NULL DEFAULT 1 CHECK (burst >= 1),
    tat REAL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
