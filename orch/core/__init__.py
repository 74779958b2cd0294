"""The pure core: job and worker states, job specs, the retry policy, the scheduling policy and the lifecycle
decisions. It imports nothing of orch outside itself (checked by import-linter, pyproject.toml)."""
