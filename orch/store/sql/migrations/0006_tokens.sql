-- Version 6: the client and join tokens in effect (store.cluster_tokens), as the PostgreSQL store keeps them for
-- the schedulers that share it. A scheduler of this file reads its tokens from the data dir's tokens.json; the
-- table holds only what `put_tokens` wrote: each token's SHA-256 (hex), never the token.
CREATE TABLE tokens (
    role       TEXT PRIMARY KEY CHECK (role = 'client' OR role = 'join'),
    digest     TEXT NOT NULL CHECK (length(digest) = 64 AND digest NOT GLOB '*[^0-9a-f]*'),
    changed_at REAL NOT NULL  -- when this digest was put (Unix seconds)
) WITHOUT ROWID;
