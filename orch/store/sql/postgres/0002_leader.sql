-- Version 2: the reaper's role, held by one scheduler at a time for a lease of some seconds (store.lead).
-- Times are the database server's clock, so the schedulers' own clocks cannot disagree about who holds it.
CREATE TABLE leader (
    role       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,  -- seconds since the epoch, by the server's clock_timestamp()
    since      DOUBLE PRECISION NOT NULL   -- when this holder took the role
);
