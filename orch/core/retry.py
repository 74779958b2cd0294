"""Retry policy: whether an ended attempt earns another, and how long to wait before it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from orch.core.states import Outcome


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: float = 0.2
    retry_on_exit: tuple[int, ...] | None = None  # None: every non-zero exit retries

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based); rand in [0, 1)."""
        raw = min(self.cap, self.base * self.factor ** max(0, attempt - 1))
        return max(0.0, raw * (1.0 + self.jitter * (2.0 * rand - 1.0)))

    def retries(self, outcome: Outcome, exit_code: int | None, attempt: int) -> bool:
        """Whether an attempt that ended with ``outcome`` earns another attempt."""
        if attempt >= self.max_attempts:
            return False
        if outcome in (Outcome.TIMED_OUT, Outcome.LOST):
            return True
        if outcome is Outcome.FAILED:
            if self.retry_on_exit is None or exit_code is None:
                return True
            return exit_code in self.retry_on_exit
        return False


def policy_for(spec: Mapping[str, Any], defaults: RetryPolicy, max_attempts: int) -> RetryPolicy:
    """The policy a job runs under: its stored spec's own backoff and exit codes over this scheduler's
    defaults, and the attempts fixed for it (``max_attempts``, which a hand-back raises)."""
    b = spec.get("backoff") or {}
    roe = spec.get("retry_on_exit")
    return RetryPolicy(
        max_attempts=max_attempts,
        base=b.get("base", defaults.base),
        factor=b.get("factor", defaults.factor),
        cap=b.get("cap", defaults.cap),
        jitter=b.get("jitter", defaults.jitter),
        retry_on_exit=tuple(roe) if roe is not None else defaults.retry_on_exit,
    )
