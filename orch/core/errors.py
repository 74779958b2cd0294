"""One error root for orch: each error knows its HTTP status, its code and its CLI exit code."""

from __future__ import annotations

from typing import Any


class OrchError(Exception):
    """Base of every error orch raises on purpose.

    The API middleware turns one into ``{"error": {"code", "message", "field"}}``
    with ``http_status``; the CLI prints ``message`` and exits with ``exit_code``.
    """

    http_status = 500
    code = "internal"
    exit_code = 1

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return {"error": body}


class ValidationError(OrchError):
    http_status = 400
    code = "invalid"
    exit_code = 2


class NotFound(OrchError):
    http_status = 404
    code = "not_found"
    exit_code = 4


class Conflict(OrchError):
    http_status = 409
    code = "conflict"
    exit_code = 5


class IdempotencyKeyReused(Conflict):
    """A submit named the idempotency key of a kept job with another spec."""

    code = "idempotency_key_reused"


class StaleAttempt(Conflict):
    """A worker spoke for an attempt that is no longer the job's current one."""

    code = "stale_attempt"


class UnknownWorker(Conflict):
    """A worker id the scheduler does not know, or has marked lost: it must register again."""

    code = "unknown_worker"


class PayloadTooLarge(OrchError):
    http_status = 413
    code = "too_large"
    exit_code = 2


class UnsupportedEncoding(OrchError):
    """A request body in a Content-Encoding the scheduler does not decode."""

    http_status = 415
    code = "unsupported_encoding"
    exit_code = 2


class Unauthorized(OrchError):
    """No credential, or one the scheduler does not know (wrong, revoked, rotated away)."""

    http_status = 401
    code = "unauthorized"
    exit_code = 6


class Forbidden(OrchError):
    """A known credential used where its role does not allow (a worker token submitting, a client leasing)."""

    http_status = 403
    code = "forbidden"
    exit_code = 6


class TooManyRequests(OrchError):
    """A client holds too many long-polls open at once; it may try again after a while."""

    http_status = 429
    code = "too_many_requests"
    exit_code = 1


class RequestTimeout(OrchError):
    """A request body did not arrive in time (a slow or stalled sender)."""

    http_status = 408
    code = "timeout"
    exit_code = 2


class IllegalTransition(OrchError):
    """A state change the transitions table does not allow: a bug in orch, never user input."""

    http_status = 500
    code = "illegal_transition"


class ConfigError(OrchError):
    code = "config"
    exit_code = 2


class StorageError(OrchError):
    """The data dir or the database cannot be used: unwritable, damaged, held by another scheduler.

    At start-up it stops the scheduler with one line (exit 2); on a route it is a 5xx.
    """

    code = "storage"
    exit_code = 2


class StorageFull(StorageError):
    """The disk holding the database has no space left: nothing more can be written until some is freed.

    Not a bug, and it passes by itself once space is back, so it has its own status (507 Insufficient Storage).
    """

    http_status = 507
    code = "storage_full"


class StorageUnavailable(StorageError):
    """The database server cannot be reached (PostgreSQL down, restarting, or the network to it cut).

    It passes by itself once the server is back: 503, which workers and the CLI retry.
    """

    http_status = 503
    code = "storage_unavailable"


class StorageCorrupt(StorageError):
    """The database file is damaged (SQLite: malformed, or not a database)."""

    code = "storage_corrupt"


class ServerUnavailable(OrchError):
    """The CLI or a worker could not reach the scheduler."""

    http_status = 503
    code = "unavailable"
    exit_code = 3


class ApiError(OrchError):
    """An error answer from the scheduler, seen by the client side."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.http_status = status
        self.code = code
        self.exit_code = {400: 2, 401: 6, 403: 6, 404: 4, 408: 2, 409: 5, 413: 2}.get(status, 1)
