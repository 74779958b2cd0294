"""orch: a distributed job orchestrator in one executable.

The Python SDK (orch/sdk.py) is here: ``from orch import Client, AsyncClient, task``. It is imported on first
use, so that the CLI and the workers' child interpreters do not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SDK = ("AsyncClient", "AsyncJob", "Client", "Job", "JobFailed", "Task", "WaitTimeout", "task")

if TYPE_CHECKING:
    from orch.sdk import AsyncClient, AsyncJob, Client, Job, JobFailed, Task, WaitTimeout, task


def __getattr__(name: str) -> Any:
    if name in _SDK:
        from orch import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'orch' has no attribute {name!r}")


__all__ = ["AsyncClient", "AsyncJob", "Client", "Job", "JobFailed", "Task", "WaitTimeout", "__version__", "task"]
