"""Runners: how a worker runs each kind of job (orch/worker/runners/base.py has the interface).

One module per runner: ``exec`` (command lines), ``python`` (functions in long-lived child interpreters),
``docker`` (containers). Plugins add more (orch/plugins.py finds them); the built-ins are found the same way.
"""

from __future__ import annotations

from orch.worker.runners.base import Attempt, Context, Ended, Run, Runner, RunnerError, StartError, supervise
from orch.worker.runners.exec import ExecRunner, execute

__all__ = ["Attempt", "Context", "Ended", "ExecRunner", "Run", "Runner", "RunnerError", "StartError", "execute",
           "supervise"]
