-- Version 11: runners, as SQLite's version 14: a job's runner read off its spec's first key (a stored generated
-- column), and the runners a worker has.
ALTER TABLE jobs ADD COLUMN runner TEXT GENERATED ALWAYS AS (CASE left(spec, 10)
    WHEN '{"python":' THEN 'python' WHEN '{"docker":' THEN 'docker'
    WHEN '{"runner":' THEN spec::jsonb ->> 'runner' ELSE 'exec' END) STORED;
ALTER TABLE workers ADD COLUMN runners TEXT[] NOT NULL DEFAULT '{exec}';
