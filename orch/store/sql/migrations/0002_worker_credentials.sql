-- Version 2: per-worker credentials. Each worker gets its own secret when it
-- registers; only its SHA-256 (hex) is kept here, never the secret itself.
-- Workers registered before this version have none and must register again.

ALTER TABLE workers ADD COLUMN credential_hash TEXT;
