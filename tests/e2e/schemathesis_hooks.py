"""schemathesis hooks for tests/e2e/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

The scheduler under test has no workers, so no job ever ends: a wait holds until its timeout and a followed
stream (follow=1) never ends. Valid values stay valid but hold at most a moment: a wait's timeout (and a
submit's wait) becomes 0.1 s, and follow becomes 0. Values the document refuses are left as they are, so their refusal is tested.
The streams themselves are tested in tests/integration/test_api.py and test_observability_api.py.
"""

from __future__ import annotations

from typing import Any

import schemathesis

FOLLOW = ("1", "true", "yes")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    query = case.query
    if not query:
        return
    if query.get("follow") in FOLLOW:
        query["follow"] = "0"
    held = "timeout" if case.path.endswith("/wait") else "wait" if case.path == "/v1/jobs" else None
    if held in query:
        try:
            seconds = float(query[held])
        except (TypeError, ValueError):
            return
        if 0 <= seconds <= 3600:
            query[held] = "0.1"
