"""Durable state. All SQL of orch lives in this package."""
