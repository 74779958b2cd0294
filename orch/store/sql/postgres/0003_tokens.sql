-- Version 3: the client and join tokens every scheduler of the database accepts (store.cluster_tokens), so
-- `orch token rotate` on one machine takes effect on all. Only each token's SHA-256 (hex) is kept, never the token.
CREATE TABLE tokens (
    role       TEXT PRIMARY KEY CHECK (role = 'client' OR role = 'join'),
    digest     TEXT NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    changed_at DOUBLE PRECISION NOT NULL  -- when this digest was put (seconds since the epoch)
);
