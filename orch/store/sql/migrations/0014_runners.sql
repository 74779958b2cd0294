-- Version 14: runners (orch/core/kinds.py). A job's runner is read off its spec, whose first key is what it runs
-- (core.spec.JobSpec.to_json writes the kind first): python, docker, runner (a plugin's, named in it), else the
-- exec runner's command, shell or task. A virtual column: nothing is stored, the claim reads it of the rows it
-- looks at. A worker names the runners it has at registration; a claim hands it only jobs of those.
ALTER TABLE jobs ADD COLUMN runner TEXT GENERATED ALWAYS AS (CASE substr(spec, 1, 10)
    WHEN '{"python":' THEN 'python' WHEN '{"docker":' THEN 'docker'
    WHEN '{"runner":' THEN json_extract(spec, '$.runner') ELSE 'exec' END) VIRTUAL;
ALTER TABLE workers ADD COLUMN runners TEXT NOT NULL DEFAULT '["exec"]';
