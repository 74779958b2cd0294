"""Unit tests of answers the scheduler renders itself instead of through json.dumps: same JSON, byte for byte in meaning."""

from __future__ import annotations

import json

from orch.core.records import Lease
from orch.core.spec import parse_spec
from orch.scheduler.wire import leases_json


def test_leases_json_is_what_json_dumps_would_say() -> None:
    specs = [parse_spec({"command": ["echo", "h\u00e9llo \"quoted\"\n"], "env": {"A": "\u2603"}, "name": "n\\x"}),
             parse_spec({"shell": "exit 3", "queue": "q.1:x-y", "priority": -5, "timeout": 1.5})]
    jobs = [Lease(7 + i, i + 1, json.dumps(s.to_json(), separators=(",", ":")), s.queue, 1_800_000_000.123456 + i,
                  s.priority) for i, s in enumerate(specs)]
    parsed = [{"job_id": j.job_id, "attempt": j.attempt, "spec": json.loads(j.spec), "queue": j.queue,
               "queued_at": j.queued_at} for j in jobs]
    assert json.loads(leases_json(jobs)) == parsed
    assert leases_json([]) == "[]"
