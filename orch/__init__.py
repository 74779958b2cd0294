"""orch: a distributed job orchestrator in one executable."""

__version__ = "0.1.0"
