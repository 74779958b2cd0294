"""The PostgreSQL store: the Store contract on a PostgreSQL database that several schedulers may share.

The hot paths (submit, claim, heartbeat, output, the end of attempts) are
single statements in autocommit, each a whole change (a round trip through
psycopg costs more of the scheduler's CPU than these statements cost the
server, and a transaction adds two); the rest are transactions on a connection
of a small pool. Every move is the core's decision (orch.core.decisions)
applied by a conditional UPDATE from the state the job was read in, with the
job locked (``FOR UPDATE``) by the statement or transaction that moves it, so
two schedulers never move one job twice; claims take their jobs with ``FOR
UPDATE SKIP LOCKED``, so concurrent claims on any number of replicas hand each
job to one worker without waiting on each other. A statement or transaction
that the server aborted for a deadlock or a serialization failure is run
again, a few times, from the start. Hints to the other schedulers are sent
after the commits by a task of their own (``_send_hints``).

Durability: a transaction that returns has committed, and PostgreSQL's commit
(``synchronous_commit`` on, its default) is on disk; ``synced()`` has nothing
to wait for.

Clocks: ``clock`` stamps what people read, ``lease_clock`` judges leases and
heartbeats, as in the SQLite store. With several schedulers the lease clock of
each is its monotonic clock anchored to its wall clock when it opened, so
their clocks must agree as closely as NTP keeps them (a skew of s shifts every
expiry by s; leases are tens of seconds).

Needs psycopg 3 (``pip install 'orch[postgres]'``), which this module imports
when a store opens: the zipapp and the SQLite default run without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from orch.core import dag, decisions
from orch.core.concurrency import Holder, OnLimit, skips, to_cancel
from orch.core.cron import Schedule
from orch.core.errors import (
    Conflict,
    IdempotencyKeyReused,
    NotFound,
    OrchError,
    StorageError,
    StorageUnavailable,
    UnknownWorker,
    ValidationError,
)
from orch.core.kinds import EXEC
from orch.core.policy import dispatch_order
from orch.core.rates import Rate
from orch.core.records import (
    Attempt,
    Credential,
    DepInfo,
    Event,
    Job,
    JobFacts,
    JobRecord,
    Leadership,
    Lease,
    LimitInfo,
    MetricsTarget,
    OutputPiece,
    QueueInfo,
    ScheduleInfo,
    Snapshot,
    Verdict,
    Worker,
    WorkerLoad,
    WorkflowNode,
)
from orch.core.retry import RetryPolicy, policy_for
from orch.core.spec import COMMAND_SHOWN, JobSpec, stored_spec
from orch.core.states import LIVE_WORKERS, JobState, Outcome, WorkerState, check_transition
from orch.store.base import (
    SCHEDULE_COLUMNS,
    SCHEDULE_FROM,
    SLOT_HOLDERS_SHOWN,
    AttemptResult,
    Change,
    HeartbeatReply,
    Hint,
    Links,
    OutputChunk,
    Store,
    Sweep,
    dep_info,
    freed_slots,
    key_reused,
    like_pattern,
    queue_infos,
    schedule_info,
    schedule_json_text,
    workflow_nodes,
)
from orch.store.base import (
    queue_depths as _depths,
)

log = logging.getLogger("orch.store")

T = TypeVar("T")
Conn = Any  # psycopg.AsyncConnection, imported when the store opens

MAX_QUEUES_PER_CLAIM = 32
HINT_BYTES = 7000  # of a NOTIFY payload (PostgreSQL takes up to 8,000)
RETRIES = 5  # runs of a transaction the server aborted for a deadlock or a serialization failure
UNHELD_NOTICE = "orch_unheld "  # a concurrency trigger's notice: [job id, queue, attempt] of the job it let go
# A dependency trigger's notice (sql/postgres/0009): [job id, state, queue, attempt, due, unblocked] of a job it moved
MOVED_NOTICE = "orch_moved "
_RETRY_STATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
MIGRATION_LOCK = 0x6F72636801  # the advisory lock schedulers take to migrate, one at a time

_QUEUED, _RUNNING, _RETRYING = JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRYING.value
_SCHEDULED, _BLOCKED = JobState.SCHEDULED.value, JobState.BLOCKED.value
_SUCCEEDED, _CANCELLED = JobState.SUCCEEDED.value, JobState.CANCELLED.value
_ALIVE, _DRAINING = WorkerState.ALIVE.value, WorkerState.DRAINING.value
_LOST, _STOPPED = WorkerState.LOST.value, WorkerState.STOPPED.value
_LIVE = [st.value for st in sorted(LIVE_WORKERS)]
_UNFINISHED = [st.value for st in JobState if not st.terminal]


def _lit(value: str) -> str:
    """A state's name as an SQL literal, for the statements whose plan must know it. psycopg prepares a
    statement it has run 5 times, and PostgreSQL then plans it once for any parameters: a ``state = $1``
    there cannot use the partial indexes (``jobs_ready``, of the queued jobs alone), so a claim read and
    sorted every queued job, and an end of attempts looked at every running one (measured: a claim of 8
    took 1 ms with 1,400 jobs queued). The names are the core's, never a user's."""
    if not value.replace("_", "").isalpha():
        raise ValueError(f"not a state name: {value!r}")
    return f"'{value}'"


Q_QUEUED, Q_RUNNING, Q_RETRYING, Q_SCHEDULED = _lit(_QUEUED), _lit(_RUNNING), _lit(_RETRYING), _lit(_SCHEDULED)
Q_ALIVE, Q_DRAINING = _lit(_ALIVE), _lit(_DRAINING)
Q_LIVE = "(" + ", ".join(_lit(v) for v in _LIVE) + ")"
Q_UNFINISHED = "(" + ", ".join(_lit(v) for v in _UNFINISHED) + ")"
Q_FINISHED = "(" + ", ".join(_lit(v) for v in (_SUCCEEDED, JobState.FAILED.value, _CANCELLED,
                                                 JobState.SKIPPED.value)) + ")"  # jobs_finished's

TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)  # those the index jobs_finished has


def _job_filter(state: JobState | None, queue: str | None, name: str | None, label: tuple[str, str] | None,
                text: str | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("state", state), ("queue", queue), ("name", name)):
        if value is not None:
            where.append(f"{column} = %s")
            params.append(str(value))
    if label is not None:
        key, value = label
        if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            # Written as it is in the spec's JSON text: a cheap test that skips most rows before one is parsed.
            where.append("strpos(spec, %s) > 0")
            params.append(value)
        where.append("(spec::jsonb -> 'labels' ->> %s) = %s")
        params += [key, value]
    if text is not None:
        where.append("(lower(name) LIKE %s ESCAPE '\\' OR lower(command) LIKE %s ESCAPE '\\')")
        params += [like_pattern(text)] * 2
    return where, params


SUMMARY_COLUMNS = ("id, state, queue, priority, name, command, attempt, max_attempts, created_at, started_at,"
                   " finished_at, run_at, worker_id, cancel_requested, exit_code, error")
_JOB_STATE = JobState._value2member_map_
_OUTCOME = Outcome._value2member_map_


def _text(v: str | None) -> str | None:
    """A string as PostgreSQL's text can hold it: a NUL (which a job's output or a worker's error may hold) is
    kept as U+FFFD, as the worker already keeps bytes that are not UTF-8; sizes still count the bytes sent."""
    return v.replace("\x00", "\ufffd") if v and "\x00" in v else v


def migrations() -> list[tuple[int, str]]:
    """Every PostgreSQL migration as (version, sql), in order (read from the package: works in a zipapp)."""
    folder = resources.files("orch.store").joinpath("sql", "postgres")
    return sorted((int(e.name.split("_", 1)[0]), e.read_text(encoding="utf-8"))
                  for e in folder.iterdir() if e.name.endswith(".sql"))


def job_of(r: Any) -> Job:
    return Job(r[0], _JOB_STATE[r[1]], r[2], r[3], r[4], r[5] or "", r[6], r[7], r[8], r[9],  # type: ignore[arg-type]
               r[10], r[11], r[12], bool(r[13]), r[14], r[15])


def attempt_of(r: Any) -> Attempt:
    return Attempt(r[0], r[1], _OUTCOME[r[2]], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10])  # type: ignore[arg-type]


_ATTEMPT_COLUMNS = ("attempt, worker_id, state, started_at, finished_at, exit_code, error, duration, stdout_bytes,"
                    " stderr_bytes, value")


def event_of(r: Any) -> Event:
    return Event(r[0], r[1], r[2], JobState(r[3]) if r[3] is not None else None, JobState(r[4]), r[5], r[6])


_EVENT_COLUMNS = "id, job_id, attempt, from_state, to_state, at, reason"


CONNECT_TIMEOUT = 10  # seconds a connection may take to be set up, unless storage.dsn says (connect_timeout=)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        *,
        output_limit: int = 1 << 20,
        pool_size: int = 8,
        notify: bool = True,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.dsn = dsn
        self.output_limit = output_limit
        self.pool_size = pool_size
        # LISTEN/NOTIFY hints between schedulers. Off is the poll-only mode for a PgBouncer that pools by
        # transaction, where a session is not ours from one statement to the next: no LISTEN, and no statement
        # prepared on the server either (psycopg prepares one it ran 5 times; another connection knows not it).
        self.notify = notify
        self._connect_args: dict[str, Any] = {"prepare_threshold": 5 if notify else None}
        self.ident = uuid.uuid4().hex[:12]  # this store's name in the hints it sends
        self._own = f'{{"f":"{self.ident}",'  # how its hints start (see _hints)
        self._sinks: dict[int, list[Change]] = {}  # id of a connection -> the changes of the op running on it
        self._limited: set[str] = set()  # queues with a concurrency limit, as the last claims of each saw them
        self._listener: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._told: list[Change] = []
        self._telling = asyncio.Event()
        self.clock = clock
        self.monotonic = monotonic
        self._anchor = clock() - monotonic()
        self.rand = rand
        self.on_commit: Callable[[list[Change]], None] | None = None
        self.on_remote: Callable[[Hint], None] | None = None
        self.shared = True
        self.batches = 0
        self.ops = 0
        self._pool: asyncio.Queue[Conn] | None = None
        self._conns: list[Conn] = []

    # ------------------------------------------------------------------ lifecycle

    def lease_clock(self) -> float:
        return self.monotonic() + self._anchor

    def _unavailable(self, e: BaseException) -> StorageUnavailable:
        return StorageUnavailable(f"the database {self.where()} cannot be used now: {_first_line(e)}")

    def where(self) -> str:
        """The database as a person names it (the DSN without its password)."""
        try:
            from psycopg.conninfo import conninfo_to_dict

            d = conninfo_to_dict(self.dsn)
            return f"postgresql://{d.get('user', '')}@{d.get('host', '')}:{d.get('port', '5432')}/{d.get('dbname', '')}"
        except Exception:
            return "the PostgreSQL database (storage.dsn)"

    async def _connect(self) -> Conn:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, **self._connect_args)
        # The concurrency triggers tell of the held jobs they let go in a notice (sql/postgres/0008): to the
        # changes of the op that runs on this connection, so its commit wakes the workers waiting for them.
        key = id(conn)
        conn.add_notice_handler(lambda diag: self._noticed(key, diag.message_primary))
        await conn.execute("SET client_min_messages = notice")
        return conn

    def _noticed(self, key: int, message: str | None) -> None:
        sink = self._sinks.get(key)
        if sink is None or not message:
            return
        try:
            if message.startswith(UNHELD_NOTICE):
                job_id, queue, attempt = json.loads(message[len(UNHELD_NOTICE):])
                sink.append(Change(int(job_id), _QUEUED, str(queue), int(attempt), unheld=True))
            elif message.startswith(MOVED_NOTICE):
                job_id, state, queue, attempt, due, unblocked = json.loads(message[len(MOVED_NOTICE):])
                sink.append(Change(int(job_id), JobState(state).value, str(queue), int(attempt),
                                   due=float(due) if due is not None else None, unblocked=bool(unblocked)))
        except (ValueError, TypeError):
            log.warning("ignored a malformed notice: %.80r", message)

    async def open(self) -> None:
        try:
            import psycopg
        except ImportError:
            raise StorageError("storage.backend is postgres but psycopg is not installed: "
                               "pip install 'orch[postgres]' (the zipapp carries SQLite only)") from None
        from psycopg.conninfo import conninfo_to_dict

        self._anchor = self.clock() - self.monotonic()
        try:
            given = conninfo_to_dict(self.dsn)
            # A server that takes the connection and never answers (a dead host behind a live balancer, a
            # firewall that drops) must not hang start-up, a reconnect or `orch token rotate` for ever.
            if "connect_timeout" not in given:
                self._connect_args["connect_timeout"] = CONNECT_TIMEOUT
            first = await self._connect()
        except psycopg.Error as e:
            raise StorageError(f"cannot connect to {self.where()}: {_first_line(e)}") from None
        self._conns.append(first)
        try:
            await self._migrate(first)
            self._pool = asyncio.LifoQueue()  # the last used first: few sessions warm, each plans once
            self._pool.put_nowait(first)
            for _ in range(self.pool_size - 1):
                conn = await self._connect()
                self._conns.append(conn)
                self._pool.put_nowait(conn)
            if self.notify:
                self._listener = asyncio.create_task(self._listen())
                self._sender = asyncio.create_task(self._send_hints())
        except psycopg.Error as e:  # a migration the role may not run, the server's connection limit...
            await self.close()
            raise StorageError(f"cannot set up {self.where()} for orch: {_first_line(e)}") from None
        except BaseException:
            await self.close()
            raise

    async def _migrate(self, conn: Conn) -> int:
        steps = migrations()
        newest = steps[-1][0]
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = await (await conn.execute("SELECT max(version) FROM schema_version")).fetchone()
            current = row[0] or 0
            if current > newest:
                raise ValidationError(f"{self.where()} is at schema version {current}, newer than this orch knows "
                                      f"({newest}): upgrade orch", field="storage.dsn")
            for version, sql in steps:
                if version > current:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        return newest

    async def close(self) -> None:
        for task in (self._listener, self._sender):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        self._listener = self._sender = None
        for conn in self._conns:
            try:
                await conn.close()
            except Exception:
                pass
        self._conns = []
        self._pool = None

    async def synced(self) -> None:
        """A returned transaction is on disk already (synchronous_commit)."""

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        pool = self._pool
        if pool is None:
            raise StorageError("the store is not open")
        conn = await pool.get()
        try:
            if conn.closed or conn.broken:
                conn = await self._reconnect(conn)
            yield conn
        finally:
            pool.put_nowait(conn)

    async def _reconnect(self, old: Conn) -> Conn:
        import psycopg

        try:
            conn = await self._connect()
        except psycopg.Error as e:
            raise self._unavailable(e) from None
        self._conns = [c for c in self._conns if c is not old] + [conn]
        self._sinks.pop(id(old), None)
        return conn

    async def _write(self, op: Callable[[Conn, list[Change]], Awaitable[T]]) -> T:
        """Run ``op`` in a transaction (again, from the start, after a deadlock); tell ``on_commit`` its changes."""
        return await self._run(op, transaction=True)

    async def _auto(self, op: Callable[[Conn, list[Change]], Awaitable[T]]) -> T:
        """Run ``op``, each of whose statements is a whole change on its own (autocommit: no BEGIN and COMMIT
        round trips, which cost more than the statement on these paths), and sends its own hints (``_hint``).
        A statement the server aborted for a deadlock changed nothing: ``op`` runs again from the start."""
        return await self._run(op, transaction=False)

    def _tell(self, changes: list[Change]) -> None:
        """Hand committed changes to the hint sender (``_send_hints``), which NOTIFYs them to the others."""
        self._told.extend(changes)
        self._telling.set()

    async def _send_hints(self) -> None:
        """NOTIFY the other schedulers of what committed here, on a connection of its own, after the commits:
        what committed while one NOTIFY was on its way goes in the next, so under load a hint costs next to
        nothing and no commit waits on PostgreSQL's NOTIFY lock (a NOTIFY in a transaction holds a lock of
        the whole database from its commit to its end: every notifying commit in turn, WAL flush included).
        A hint that cannot be sent is dropped, with a line: the others poll as well (``storage.poll_interval``)."""
        conn = None
        while True:
            await self._telling.wait()
            self._telling.clear()
            changes, self._told = self._told, []
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = await self._connect()
                await conn.execute("SELECT pg_notify('orch', p) FROM unnest(%s::text[]) AS p", (self._hints(changes),))
            except asyncio.CancelledError:
                if conn is not None:
                    with suppress(Exception):
                        await conn.close()
                raise
            except Exception as e:
                log.warning("could not tell the other schedulers of %d change%s (%s); they poll as well",
                            len(changes), "" if len(changes) == 1 else "s", _first_line(e))
                if conn is not None:
                    with suppress(Exception):
                        await conn.close()
                conn = None
                await asyncio.sleep(0.5)

    async def _run(self, op: Callable[[Conn, list[Change]], Awaitable[T]], *, transaction: bool) -> T:
        import psycopg

        for attempt in range(RETRIES):
            changes: list[Change] = []
            async with self._conn() as conn:
                self._sinks[id(conn)] = changes
                try:
                    if transaction:
                        async with conn.transaction():
                            value = await op(conn, changes)
                    else:
                        value = await op(conn, changes)
                except (psycopg.errors.OperationalError, psycopg.InterfaceError) as e:
                    if getattr(e, "sqlstate", None) in _RETRY_STATES and attempt < RETRIES - 1:
                        await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
                        continue
                    raise self._unavailable(e) from e
            self.batches += 1
            self.ops += 1
            if changes and self._limited:
                changes += freed_slots(changes, dict.fromkeys(self._limited, 0))
            if changes and self.notify:
                self._tell(changes)
            if changes and self.on_commit is not None:
                try:
                    self.on_commit(changes)
                except Exception:
                    log.exception("on_commit failed")
            return value
        raise AssertionError("unreachable")

    def _hints(self, changes: Sequence[Change]) -> list[str]:
        """The changes as NOTIFY payloads of at most HINT_BYTES: a hint for the other schedulers' waiters
        (``Hint``: jobs queued per queue, the changed jobs' ids, a retry scheduled), never the truth (they
        read the database when woken, and poll as well)."""
        out: list[str] = []
        queued: dict[str, int] = {}
        ids: list[str] = []
        retrying = 0
        due: float | None = math.inf  # the earliest due time of the retries and scheduled jobs (None: one unknown)
        size = 0

        def flush() -> None:
            # "d" only when every due time is known and some was told; a scheduler that knows no "d" ignores it.
            d = f',"d":{due!r}' if retrying and due is not None and due != math.inf else ""
            out.append(f'{{"f":"{self.ident}","q":{json.dumps(queued, separators=(",", ":"))},'
                       f'"j":[{",".join(ids)}],"r":{retrying}{d}}}')

        for c in changes:
            ident = str(c.job_id)
            grows = len(ident) + 1 + (len(c.queue) + 12 if c.state == _QUEUED and c.queue not in queued else 0)
            if size + grows > HINT_BYTES - 100 and ids:
                flush()
                queued, ids, retrying, due, size = {}, [], 0, math.inf, 0
            ids.append(ident)
            size += grows
            if c.state == _QUEUED:
                queued[c.queue] = queued.get(c.queue, 0) + 1
            elif c.state == _RETRYING or c.state == _SCHEDULED:
                # A retry or a delayed submit: the leader's reaper must look by its due time, maybe sooner than
                # it was going to (with no hints, storage.notify off, it looks at its tick: up to 1 s late).
                retrying = 1
                due = None if c.due is None or due is None else min(due, c.due)
        if ids:
            flush()
        return out

    async def _listen(self) -> None:
        """Hear the other schedulers' hints (LISTEN orch) and hand them to ``on_remote``; reconnect when the
        connection goes (what was missed meanwhile costs latency only: the scheduler polls too)."""
        delay = 0.1
        while True:
            try:
                conn = await self._connect()
                try:
                    await conn.execute("LISTEN orch")
                    delay = 0.1
                    async for note in conn.notifies():
                        self._heard(note.payload)
                finally:
                    with suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("not hearing other schedulers' changes (%s); trying again in %.1fs",
                            _first_line(e), delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    def _heard(self, payload: str) -> None:
        if payload.startswith(self._own) or self.on_remote is None:  # its own hint: no need to read it
            return
        try:
            got = json.loads(payload)
            d = got.get("d")
            hint = Hint({str(q): int(n) for q, n in got["q"].items()}, [int(j) for j in got["j"]], bool(got["r"]),
                        float(d) if isinstance(d, (int, float)) and math.isfinite(d) else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignored a malformed hint on the orch channel: %.80r", payload)
            return
        self.on_remote(hint)

    async def queued_in(self, queues: Sequence[str]) -> list[str]:
        # A paused queue's jobs are not to be had: its waiters are not woken for them.
        rows = await self._rows("SELECT q FROM unnest(%s::text[]) AS q WHERE EXISTS"
                                f" (SELECT 1 FROM jobs WHERE state = {Q_QUEUED} AND NOT held AND queue = q)"
                                " AND NOT EXISTS (SELECT 1 FROM queues p WHERE p.name = q AND p.paused)",
                                (list(queues),))
        return [r[0] for r in rows]

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        import psycopg

        async with self._conn() as conn:
            try:
                return await (await conn.execute(sql, params)).fetchall()
            except (psycopg.errors.OperationalError, psycopg.InterfaceError) as e:
                raise self._unavailable(e) from e

    async def recover(self, grace: float, worker_ttl: float) -> None:
        now = self.lease_clock()

        async def op(conn: Conn, out: list[Change]) -> None:
            await conn.execute(
                f"UPDATE jobs SET lease_expires_at = LEAST(GREATEST(lease_expires_at, %s), %s) WHERE state = {Q_RUNNING}",
                (now + grace, now + max(grace, worker_ttl)))
            await conn.execute("UPDATE workers SET last_heartbeat = %s WHERE state = ANY(%s)",
                               (now + max(0.0, grace - worker_ttl), _LIVE))

        await self._write(op)

    # ------------------------------------------------------------------ reads

    async def get_job(self, job_id: int, *, with_output: bool = True) -> JobRecord:
        rows = await self._rows(f"SELECT {SUMMARY_COLUMNS}, spec, workflow FROM jobs WHERE id = %s", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}", field="id")
        attempts = await self._rows(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE job_id = %s ORDER BY attempt", (job_id,))
        spec = json.loads(rows[0][16])
        rec = JobRecord(job_of(rows[0]), spec, [attempt_of(a) for a in attempts], workflow=rows[0][17])
        if "depends_on" in spec:
            rec.dependencies = await self._deps_of(job_id)
        if attempts and with_output:
            chunks = await self._rows(
                "SELECT id, attempt, stream, data, pos, size FROM output WHERE job_id = %s AND attempt = %s ORDER BY id",
                (job_id, attempts[-1][0]))
            rec.output = [OutputPiece(*c) for c in chunks]
        return rec

    async def _deps_of(self, job_id: int) -> list[DepInfo]:
        rows = await self._rows("SELECT d.dep_id, d.cond, d.met, d.ref, j.state FROM deps d LEFT JOIN jobs j"
                                " ON j.id = d.dep_id WHERE d.job_id = %s ORDER BY d.dep_id", (job_id,))
        return [dep_info(r) for r in rows]

    async def workflow(self, job_id: int) -> tuple[int, list[WorkflowNode]]:
        rows = await self._rows("SELECT workflow FROM jobs WHERE id = %s", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}", field="id")
        wf = rows[0][0]
        if wf is None:  # a job submitted alone, without refs or dependencies: a workflow of one
            rec = await self.get_job(job_id, with_output=False)
            return job_id, [WorkflowNode(rec.job, rec.spec.get("ref"), rec.dependencies)]
        jobs = await self._rows(f"SELECT {SUMMARY_COLUMNS}, spec FROM jobs WHERE workflow = %s ORDER BY id", (wf,))
        edges = await self._rows(
            "SELECT d.job_id, d.dep_id, d.cond, d.met, d.ref, j.state FROM jobs w JOIN deps d ON d.job_id = w.id"
            " LEFT JOIN jobs j ON j.id = d.dep_id WHERE w.workflow = %s ORDER BY d.job_id, d.dep_id", (wf,))
        return wf, workflow_nodes(((job_of(r), r[16]) for r in jobs), edges)

    async def _inputs(self, conn: Conn, job_ids: list[int]) -> dict[int, str]:
        """What the dependencies of each job left, as the JSON text its inputs file holds (see sqlite._inputs)."""
        parts: dict[int, list[str]] = {jid: [] for jid in job_ids}
        for jid, dep, ref, state, code, value in await _fetch(conn,
                "SELECT d.job_id, d.dep_id, d.ref, j.state, j.exit_code, a.value FROM deps d"
                " LEFT JOIN jobs j ON j.id = d.dep_id LEFT JOIN attempts a ON a.job_id = d.dep_id"
                " AND a.attempt = j.attempt WHERE d.job_id = ANY(%s) ORDER BY d.job_id, d.dep_id", (job_ids,)):
            parts[jid].append(dag.input_entry(ref or str(dep), state, code, value))
        return {jid: "{" + ",".join(p) + "}" for jid, p in parts.items()}

    async def job_state(self, job_id: int) -> tuple[JobState, int]:
        rows = await self._rows("SELECT state, attempt FROM jobs WHERE id = %s", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}", field="id")
        return JobState(rows[0][0]), rows[0][1]

    async def list_jobs(self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50,
                        cursor: int | None = None, name: str | None = None, label: tuple[str, str] | None = None,
                        text: str | None = None, floor: int | None = None) -> tuple[list[Job], int | None]:
        where, params = _job_filter(state, queue, name, label, text)
        if cursor is not None:
            where.append("id < %s")
            params.append(cursor)
        if floor is not None:
            where.append("id > %s")
            params.append(floor)
        rows = await self._rows(
            f"SELECT {SUMMARY_COLUMNS} FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id DESC LIMIT %s", (*params, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return [job_of(r) for r in rows], (rows[-1][0] if more and rows else None)

    async def ended_among(self, job_ids: Sequence[int]) -> tuple[list[Job], list[int]]:
        ids = sorted(set(job_ids))
        rows = await self._rows(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id = ANY(%s)", (ids,))
        found = {r[0] for r in rows}
        ended = [j for j in map(job_of, rows) if j.state.terminal]
        return ended, [i for i in ids if i not in found]

    async def count_jobs(self, *, state: JobState | None = None, queue: str | None = None, name: str | None = None,
                         label: tuple[str, str] | None = None, text: str | None = None) -> int:
        where, params = _job_filter(state, queue, name, label, text)
        rows = await self._rows("SELECT count(*) FROM jobs" + (" WHERE " + " AND ".join(where) if where else ""),
                                params)
        return int(rows[0][0])

    async def ended_per_minute(self, since: float) -> list[tuple[int, JobState, int]]:
        rows = await self._rows(
            "SELECT floor((finished_at - %s) / 60)::int AS m, state, count(*) FROM jobs"
            " WHERE state = ANY(%s) AND finished_at >= %s GROUP BY m, state ORDER BY m, state",
            (since, [s.value for s in TERMINAL_STATES], since))
        return [(m, JobState(st), n) for m, st, n in rows]

    async def count_by_state(self) -> dict[JobState, int]:
        return {JobState(s): n for s, n in await self._rows("SELECT state, count(*) FROM jobs GROUP BY state")}

    async def events(self, job_id: int, after: int = 0) -> list[Event]:
        rows = await self._rows(f"SELECT {_EVENT_COLUMNS} FROM events WHERE job_id = %s AND id > %s ORDER BY id",
                                (job_id, after))
        return [event_of(r) for r in rows]

    async def output_after(self, job_id: int, after: int = 0) -> list[OutputPiece]:
        rows = await self._rows(
            "SELECT id, attempt, stream, data, pos, size FROM output WHERE job_id = %s AND id > %s ORDER BY id",
            (job_id, after))
        return [OutputPiece(*r) for r in rows]

    async def _live_loads(self, steady: float, queue: str | None = None) -> list[WorkerLoad]:
        live = await self._rows(
            "SELECT w.id, w.name, w.state, w.queues, w.concurrency, w.last_heartbeat,"
            " (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = %s), w.runners"
            " FROM workers w WHERE w.state = ANY(%s) ORDER BY w.registered_at", (_RUNNING, _LIVE))
        return [WorkerLoad(r[0], r[1], WorkerState(r[2]), r[4], r[6], max(0.0, steady - r[5]), tuple(r[7]))
                for r in live if queue is None or queue in json.loads(r[3])]

    async def metrics_snapshot(self) -> Snapshot:
        steady = self.lease_clock()
        jobs = await self._rows("SELECT state, count(*) FROM jobs GROUP BY state")
        queues = await self._rows(
            "SELECT queue, state, count(*) FROM jobs WHERE state = ANY(%s) GROUP BY queue, state", (_UNFINISHED,))
        workers = await self._rows("SELECT state, count(*) FROM workers GROUP BY state")
        return Snapshot(
            jobs={JobState(s): n for s, n in jobs},
            queues={(q, JobState(s)): n for q, s, n in queues},
            workers={WorkerState(s): n for s, n in workers},
            live_workers=await self._live_loads(steady),
        )

    async def why_facts(self, job_id: int) -> JobFacts:
        now = self.clock()
        steady = self.lease_clock()
        rows = await self._rows(f"SELECT {SUMMARY_COLUMNS}, spec, lease_expires_at, held, ckey FROM jobs WHERE id = %s",
                                (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}", field="id")
        job = job_of(rows[0])
        lease = rows[0][17]
        last = await self._rows(f"SELECT {_EVENT_COLUMNS} FROM events WHERE job_id = %s ORDER BY id DESC LIMIT 1",
                                (job_id,))
        facts = JobFacts(now=now, record=JobRecord(job, json.loads(rows[0][16]), []),
                         lease_expires_at=now + lease - steady if lease is not None else None,
                         last_event=event_of(last[0]) if last else None)
        if not job.state.terminal and job.state is not JobState.RUNNING:
            facts.queue_paused = bool(await self._rows("SELECT 1 FROM queues WHERE name = %s AND paused", (job.queue,)))
        if job.state in (JobState.BLOCKED, JobState.SKIPPED):
            facts.dependencies = await self._deps_of(job_id)
        if job.state is JobState.QUEUED and rows[0][18]:
            facts.held = True
            facts.slot_holders = [r[0] for r in await self._rows(
                f"SELECT id FROM jobs WHERE ckey = %s AND NOT held AND state IN ({Q_QUEUED}, {Q_RUNNING})"
                f" ORDER BY id LIMIT {SLOT_HOLDERS_SHOWN}", (rows[0][19],))]
        if job.state is JobState.QUEUED:
            (ahead,), = await self._rows(  # the jobs to be had before it (not those held back by their key)
                f"SELECT count(*) FROM jobs WHERE state = {Q_QUEUED} AND NOT held AND queue = %s"
                " AND (priority > %s OR (priority = %s AND id < %s))", (job.queue, job.priority, job.priority, job_id))
            (total,), = await self._rows(f"SELECT count(*) FROM jobs WHERE state = {Q_QUEUED} AND queue = %s",
                                         (job.queue,))
            facts.position, facts.queued = ahead + 1, total
            limited = await self._rows(f"SELECT concurrency, (SELECT count(*) FROM jobs WHERE queue = %s AND state ="
                                       f" {Q_RUNNING}) FROM queues WHERE name = %s AND concurrency IS NOT NULL",
                                       (job.queue, job.queue))
            if limited:
                facts.queue_limit = (int(limited[0][0]), int(limited[0][1]))
            facts.workers = await self._live_loads(steady, job.queue)
        elif job.state is JobState.SCHEDULED:
            facts.workers = await self._live_loads(steady, job.queue)  # who will take it once it is queued
        elif job.state is JobState.RUNNING and job.worker_id:
            w = await self._rows("SELECT id, name, state, concurrency, last_heartbeat FROM workers WHERE id = %s",
                                 (job.worker_id,))
            if w:
                facts.worker = WorkerLoad(w[0][0], w[0][1], WorkerState(w[0][2]), w[0][3], 0, max(0.0, steady - w[0][4]))
        return facts

    async def queues(self) -> list[str]:
        jobs = await self._rows("SELECT DISTINCT queue FROM jobs")
        workers = await self._rows("SELECT queues FROM workers")
        return sorted({r[0] for r in jobs}.union(*(json.loads(r[0]) for r in workers)))

    async def worker_credentials(self) -> list[Credential]:
        rows = await self._rows("SELECT id, credential_hash, state, queues FROM workers WHERE credential_hash IS NOT NULL")
        return [Credential(r[0], r[1], WorkerState(r[2]), json.loads(r[3])) for r in rows]

    async def worker_credential(self, worker_id: str) -> Credential | None:
        rows = await self._rows("SELECT id, credential_hash, state, queues FROM workers WHERE id = %s"
                                " AND credential_hash IS NOT NULL", (worker_id,))
        return Credential(rows[0][0], rows[0][1], WorkerState(rows[0][2]), json.loads(rows[0][3])) if rows else None

    async def cluster_tokens(self) -> dict[str, str]:
        return {r[0]: r[1] for r in await self._rows("SELECT role, digest FROM tokens")}

    async def put_tokens(self, digests: dict[str, str], *, replace: bool) -> dict[str, str]:
        """One upsert: a scheduler that starts while another commits its set waits on the row locks, then keeps
        that set (DO NOTHING); the read after it, a statement of its own, sees what committed meanwhile."""
        from orch.store.base import checked_digests

        pairs = checked_digests(digests)
        now = self.clock()
        on_conflict = ("DO UPDATE SET digest = EXCLUDED.digest, changed_at = EXCLUDED.changed_at" if replace
                       else "DO NOTHING")

        async def op(conn: Conn, out: list[Change]) -> dict[str, str]:
            if pairs:
                await conn.execute("INSERT INTO tokens (role, digest, changed_at) SELECT r, d, %s"
                                   f" FROM unnest(%s::text[], %s::text[]) AS t (r, d) ON CONFLICT (role) {on_conflict}",
                                   (now, [r for r, _ in pairs], [d for _, d in pairs]))
            return {r[0]: r[1] for r in await (await conn.execute("SELECT role, digest FROM tokens")).fetchall()}

        return await self._write(op)

    async def list_workers(self, retention: float | None = None) -> list[Worker]:
        steady = self.lease_clock()
        old = "" if retention is None else " WHERE w.state = ANY(%s) OR w.last_heartbeat >= %s"
        params: tuple[Any, ...] = (_LIVE, _RUNNING) + (() if retention is None else (_LIVE, steady - retention))
        rows = await self._rows(
            "SELECT w.id, w.name, w.hostname, w.queues, w.concurrency, w.state, w.registered_at, w.last_heartbeat,"
            " CASE WHEN w.state = ANY(%s) THEN (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = %s)"
            " ELSE 0 END, w.metrics, w.runners FROM workers w" + old + " ORDER BY w.registered_at, w.id", params)
        return [Worker(r[0], r[1], r[2], json.loads(r[3]), r[4], WorkerState(r[5]), r[6], max(0.0, steady - r[7]),
                       r[8], r[9], tuple(r[10])) for r in rows]

    async def metrics_targets(self) -> list[MetricsTarget]:
        rows = await self._rows("SELECT id, name, metrics FROM workers WHERE state = ANY(%s) AND metrics IS NOT NULL"
                                " ORDER BY registered_at, id", (_LIVE,))
        return [MetricsTarget(*r) for r in rows]

    # ------------------------------------------------------------------ writes

    async def submit(self, specs: Sequence[JobSpec], defaults: RetryPolicy,
                     stored: Sequence[tuple[dict[str, Any], str]] | None = None) -> list[Job]:
        """Ids increase in the order given (several schedulers may submit at once: not always consecutive). A job
        due later (``JobSpec.due`` on this store's clock) starts scheduled, its due time in run_at."""
        if not specs:
            return []
        now = self.clock()
        links = _Links.of(specs)
        cols: list[list[Any]] = [[] for _ in range(14)]
        states: list[JobState] = []
        for i, spec in enumerate(specs):
            if stored is not None:
                spec_json, text = stored[i]
            else:
                spec_json = stored_spec(spec, defaults)
                text = json.dumps(spec_json, separators=(",", ":"))
            due = spec.due(now)
            state = decisions.submitted(due, now)
            if state is not JobState.SCHEDULED:
                due = None  # due already (a run_at past, a delay of 0): queued now, as if it had none
            if spec.depends_on:  # blocked until its dependencies are met, keeping the time it is due in run_at
                state = JobState.BLOCKED
            states.append(state)
            c = spec.concurrency
            for col, v in zip(cols, (spec.queue, spec.priority, text, spec_json["max_attempts"], spec.name,
                                     spec.command_text[:COMMAND_SHOWN + 1], len(text.encode()), i, state.value, due,
                                     c.key if c else None, c.limit if c else None, len(spec.depends_on),
                                     links is not None and i in links.targets),
                              strict=True):
                col.append(v)
        dues = [d if st is JobState.SCHEDULED else None for d, st in zip(cols[9], states, strict=True)]

        async def op(conn: Conn, out: list[Change]) -> tuple[list[int], dict[int, JobState]]:
            rows = await (await conn.execute(
                "WITH new AS (INSERT INTO jobs (queue, priority, state, spec, max_attempts, created_at, name, command,"
                " spec_bytes, run_at, ckey, climit, waiting, fanout) SELECT q, p, st, s, m, %s, n, c, b, d, k, l, w, f"
                " FROM unnest(%s::text[], %s::int[], %s::text[], %s::int[], %s::text[], %s::text[], %s::int[],"
                " %s::int[], %s::text[], %s::float8[], %s::text[], %s::int[], %s::int[], %s::bool[])"
                " AS u(q, p, s, m, n, c, b, o, st, d, k, l, w, f) ORDER BY o"
                " RETURNING id, state), ev AS (INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                " SELECT id, 0, NULL, state, %s, %s FROM new) SELECT id FROM new ORDER BY id",
                (now, *cols, now, decisions.SUBMITTED))
            ).fetchall()
            ids = [r[0] for r in rows]
            out.extend(Change(jid, states[i].value, specs[i].queue, 0, due=dues[i]) for i, jid in enumerate(ids))
            moved = await links.link(conn, ids, [True] * len(ids), now, out) if links is not None else {}
            return ids, moved

        if any(spec.idempotency_key is not None or spec.rate_keys or _decides_at_submit(spec) for spec in specs):
            return await self._submit_each(specs, cols, now, links)
        # In a transaction when it has dependencies: the rows, their dependencies and what they decide are one.
        ids, moved = await (self._write(op) if links is not None else self._auto(op))
        return [Job(jid, moved.get(jid, states[i]), cols[0][i], cols[1][i], cols[4][i], cols[5][i], 0, cols[3][i],
                    now, None, None, cols[9][i], None, False, None, None) for i, jid in enumerate(ids)]

    async def _submit_rated(self, specs: Sequence[JobSpec], cols: list[list[Any]], now: float,
                            named: list[str], links: _Links | None) -> list[Job]:
        """A submit naming rate limits and no idempotency key: the limits are locked and read once, every start
        reserved here in order, then the rows and their events go in a statement each, as an unkeyed submit's
        do; the limits are held for those few statements, not a round trip per job."""

        async def op(conn: Conn, out: list[Change]) -> tuple[list[int], list[JobState], list[float | None]]:
            limits, tats = await _locked_limits(conn, named)
            for name in named:
                if name not in limits:
                    raise NotFound(decisions.unknown_limit(name), field="rate_keys")
            states, dues, reasons = [], [], []
            for i, spec in enumerate(specs):
                state, due, reason = JobState(cols[8][i]), cols[9][i], decisions.SUBMITTED
                if spec.rate_keys:
                    state, due, reason, new = decisions.rated(spec.due(now), now, spec.rate_keys, limits, tats)
                    tats.update(new)
                states.append(state)
                dues.append(due)
                reasons.append(reason)
            rows = await _fetch(conn,
                "INSERT INTO jobs (queue, priority, state, spec, max_attempts, created_at, name, command,"
                " spec_bytes, run_at, ckey, climit, waiting, fanout) SELECT q, p, st, s, m, %s, n, c, b, d, k, l, w, f"
                " FROM unnest(%s::text[], %s::int[], %s::text[], %s::int[], %s::text[], %s::text[], %s::int[],"
                " %s::int[], %s::text[], %s::float8[], %s::text[], %s::int[], %s::int[], %s::bool[])"
                " AS u(q, p, s, m, n, c, b, o, st, d, k, l, w, f) ORDER BY o RETURNING id",
                (now, *cols[:8], [st.value for st in states], dues, cols[10], cols[11], cols[12], cols[13]))
            ids = sorted(r[0] for r in rows)  # ids increase in the order given (the insert's ORDER BY)
            await conn.execute(
                "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                " SELECT j, 0, NULL, st, %s, r FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS u(j, st, r)",
                (now, ids, [st.value for st in states], reasons))
            changed = {n: t for n, t in tats.items() if t is not None and n in limits}
            await conn.execute("UPDATE limits SET tat = u.tat FROM unnest(%s::text[], %s::float8[]) AS u(name, tat)"
                               " WHERE limits.name = u.name", (list(changed), list(changed.values())))
            out.extend(Change(jid, states[i].value, specs[i].queue, 0,
                              due=dues[i] if states[i] is JobState.SCHEDULED else None) for i, jid in enumerate(ids))
            if links is not None:
                moved = await links.link(conn, ids, [True] * len(ids), now, out)
                states = [moved.get(jid, st) for jid, st in zip(ids, states, strict=True)]
            return ids, states, dues

        ids, states, dues = await self._write(op)
        return [Job(jid, states[i], cols[0][i], cols[1][i], cols[4][i], cols[5][i], 0, cols[3][i], now, None, None,
                    dues[i], None, False, None, None) for i, jid in enumerate(ids)]

    async def _submit_each(self, specs: Sequence[JobSpec], cols: list[list[Any]], now: float,
                           links: _Links | None) -> list[Job]:
        """A submit where some jobs carry an idempotency key or name rate limits, in one transaction, a row at a
        time (which rows the index let in is known only so).

        A keyed row is inserted unless the unique index has its key (ON CONFLICT DO NOTHING waits for a
        concurrent insert of the key to commit or roll back); then the kept job with it is the answer when its
        spec is the same, or the submit is refused, whole (IdempotencyKeyReused). The rate limits named are
        locked (FOR UPDATE, by name: submits through any replica take turns on a bucket) and each job naming
        them reserves a start (decisions.rated): queued if they allow it now, else scheduled for the first time
        they do; a replayed keyed job takes nothing. A limit no one made refuses the submit, naming it."""
        named = sorted({n for spec in specs for n in spec.rate_keys})
        if all(spec.idempotency_key is None and not _decides_at_submit(spec) for spec in specs):
            return await self._submit_rated(specs, cols, now, named, links)

        async def op(conn: Conn, out: list[Change]) -> list[tuple[int, bool, JobState, float | None]]:
            limits, tats = await _locked_limits(conn, named)
            moved: dict[str, float] = {}
            got: list[tuple[int, bool, JobState, float | None]] = []
            for i, spec in enumerate(specs):
                key, text = spec.idempotency_key, cols[2][i]
                state, due, reason = JobState(cols[8][i]), cols[9][i], decisions.SUBMITTED
                new: dict[str, float] = {}
                if key is not None and spec.rate_keys:  # a replay takes no start, and needs no limit to exist now
                    found = await (await conn.execute("SELECT id, spec FROM jobs WHERE idempotency_key = %s",
                                                      (key,))).fetchone()
                    if found is not None:
                        if found[1] != text:
                            raise IdempotencyKeyReused(key_reused(key, found[0]), field="idempotency_key")
                        got.append((found[0], True, state, due))
                        continue
                for name in spec.rate_keys:
                    if name not in limits:
                        raise NotFound(decisions.unknown_limit(name), field="rate_keys")
                if spec.rate_keys:
                    state, due, reason, new = decisions.rated(spec.due(now), now, spec.rate_keys, limits, tats)
                crowd = await _crowd(conn, spec) if _decides_at_submit(spec) and state is JobState.QUEUED else None
                row = await (await conn.execute(
                    "INSERT INTO jobs (queue, priority, state, spec, max_attempts, created_at, name, command,"
                    " spec_bytes, run_at, ckey, climit, waiting, fanout, idempotency_key)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
                    (cols[0][i], cols[1][i], state.value, text, cols[3][i], now, cols[4][i], cols[5][i], cols[6][i],
                     due, cols[10][i], cols[11][i], cols[12][i], cols[13][i], key))).fetchone()
                if row is None:
                    old = await (await conn.execute("SELECT id, spec FROM jobs WHERE idempotency_key = %s",
                                                    (key,))).fetchone()
                    assert old is not None  # the conflict's row, committed (else the insert had gone in)
                    if old[1] != text:
                        raise IdempotencyKeyReused(key_reused(key, old[0]), field="idempotency_key")
                    got.append((old[0], True, state, due))
                    continue
                tats.update(new)
                moved.update(new)
                await conn.execute(
                    "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                    " VALUES (%s, 0, NULL, %s, %s, %s)", (row[0], state.value, now, reason))
                out.append(Change(row[0], state.value, spec.queue, 0, due=due if state is JobState.SCHEDULED else None))
                if crowd is not None:
                    state = await _make_room(conn, row[0], spec, crowd, now, out)
                got.append((row[0], False, state, due))
            if moved:
                await conn.execute("UPDATE limits SET tat = u.tat FROM unnest(%s::text[], %s::float8[]) AS u(name, tat)"
                                   " WHERE limits.name = u.name", (list(moved), list(moved.values())))
            if links is not None:
                after = await links.link(conn, [g[0] for g in got], [not g[1] for g in got], now, out)
                got = [(jid, again, after.get(jid, st), due) for jid, again, st, due in got]
            return got

        got = await self._write(op)
        again = sorted({jid for jid, replayed, _, _ in got if replayed})
        kept: dict[int, Job] = {}
        if again:
            found = await self._rows(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id = ANY(%s)", (again,))
            kept = {j.id: j._replace(replayed=True) for j in map(job_of, found)}
        return [kept[jid] if replayed else
                Job(jid, state, cols[0][i], cols[1][i], cols[4][i], cols[5][i], 0, cols[3][i], now, None, None,
                    due, None, False, None, None) for i, (jid, replayed, state, due) in enumerate(got)]

    async def cancel(self, job_id: int) -> tuple[JobRecord, list[Change]]:
        now = self.clock()
        got: list[Change] = []

        async def op(conn: Conn, out: list[Change]) -> None:
            row = await (await conn.execute("SELECT state, attempt, queue FROM jobs WHERE id = %s FOR UPDATE",
                                            (job_id,))).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}", field="id")
            state = JobState(row[0])
            if decisions.cancel(job_id, state) is decisions.CancelAction.ASK_WORKER:
                await conn.execute("UPDATE jobs SET cancel_requested = TRUE WHERE id = %s", (job_id,))
                out.append(Change(job_id, state.value, row[2], row[1]))
            else:
                await _move(conn, job_id, row[1], state, decisions.CANCELLED, now, run_at=None)
                out.append(Change(job_id, _CANCELLED, row[2], row[1]))
            got[:] = out

        await self._write(op)
        return await self.get_job(job_id, with_output=False), got

    async def replay(self, job_ids: Sequence[int], by: str) -> tuple[dict[int, OrchError], list[Change]]:
        """Queue failed and cancelled jobs again with a fresh set of attempts (see Store.replay); the rows are
        locked in id order, as every multi-job write here locks them."""
        now = self.clock()
        ids = sorted(set(job_ids))
        got: list[Change] = []

        async def op(conn: Conn, out: list[Change]) -> dict[int, OrchError]:
            refused: dict[int, OrchError] = {}
            rows = {r[0]: r for r in await (await conn.execute(
                "SELECT id, state, attempt, queue, spec, EXISTS (SELECT 1 FROM deps WHERE job_id = jobs.id) FROM jobs"
                " WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,))).fetchall()}
            for jid in ids:
                row = rows.get(jid)
                if row is None:
                    refused[jid] = NotFound(f"no job {jid}", field="id")
                    continue
                state = JobState(row[1])
                pending, broken = await _weigh(conn, jid) if row[5] else (0, None)
                try:
                    move = decisions.replay(jid, state, by, pending, broken)
                except Conflict as e:
                    refused[jid] = e
                    continue
                fresh = row[2] + int(json.loads(row[4])["max_attempts"])
                if row[5]:
                    await conn.execute("UPDATE jobs SET waiting = %s WHERE id = %s", (pending, jid))
                # run_at: its queue wait counts from now; (blocked) the time its dependents are decided at
                await _move(conn, jid, row[2], state, move, now, finished_at=None, run_at=now, worker_id=None,
                            lease_expires_at=None, exit_code=None, error=None, max_attempts=fresh,
                            cancel_requested=False)
                out.append(Change(jid, move.to.value, row[3], row[2], replay=True))
            got[:] = out
            return refused

        refused = await self._write(op)
        return refused, got

    async def pause_queue(self, queue: str, paused: bool) -> bool:
        """Pause or resume a queue (see Store.pause_queue): every replica's next claim statement sees it. A
        resume hints the others as a queued job would, so their long-polls on the queue look again."""
        now = self.clock()

        async def op(conn: Conn, out: list[Change]) -> bool:
            if paused:
                sql = ("INSERT INTO queues (name, paused, updated_at) VALUES (%s, TRUE, %s) ON CONFLICT (name)"
                       " DO UPDATE SET paused = TRUE, updated_at = EXCLUDED.updated_at WHERE NOT queues.paused"
                       " RETURNING name")
            else:
                sql = "UPDATE queues SET paused = FALSE, updated_at = %s WHERE name = %s AND paused RETURNING name"
            return bool(await _fetch(conn, sql, (queue, now) if paused else (now, queue)))

        changed = await self._write(op)
        if changed and not paused and self.notify:
            # No job changed: job 0 is no job, and its queue the wake, once for each job queued there (as many
            # long-polls as could take one, up to a few hundred; the rest hear at their next poll).
            (n,), = await self._rows(f"SELECT count(*) FROM (SELECT 1 FROM jobs WHERE state = {Q_QUEUED}"
                                     " AND queue = %s LIMIT 500) x", (queue,))
            self._tell([Change(0, _QUEUED, queue, 0)] * max(1, int(n)))
        return changed

    async def queue_stats(self, names: Sequence[str] | None = None) -> list[QueueInfo]:
        """Queues with unfinished jobs or a setting (or ``names``): counts by state, paused, oldest queued."""
        where, params = (" AND queue = ANY(%s)", [list(names)]) if names is not None else ("", [])
        async with self._conn() as conn:
            counts = await _fetch(conn, "SELECT queue, state, COUNT(*), MIN(COALESCE(run_at, created_at)),"
                                        " COUNT(*) FILTER (WHERE held) FROM jobs"
                                        f" WHERE state IN {Q_UNFINISHED}{where} GROUP BY queue, state", params)
            settings = await _fetch(conn, "SELECT name, paused, concurrency FROM queues")
        return queue_infos([(r[0], r[1], int(r[2]), r[3]) for r in counts], {r[0]: bool(r[1]) for r in settings},
                           names, {r[0]: r[2] for r in settings},
                           {r[0]: int(r[4]) for r in counts if r[1] == _QUEUED and r[4]})

    async def queue_depths(self) -> tuple[dict[JobState, int], list[QueueInfo]]:
        async with self._conn() as conn:
            counts = await _fetch(conn, "SELECT queue, state, count(*) FROM jobs GROUP BY queue, state")
            settings = await _fetch(conn, "SELECT name, paused, concurrency FROM queues")
        return _depths([(r[0], r[1], int(r[2])) for r in counts], [(r[0], bool(r[1]), r[2]) for r in settings])

    async def set_queue_concurrency(self, queue: str, limit: int | None) -> bool:
        """See Store.set_queue_concurrency: every replica's next claim from the queue sees it. A limit raised or
        lifted hints the others as queued jobs would, so their long-polls on the queue look again."""
        now = self.clock()

        async def op(conn: Conn, out: list[Change]) -> bool:
            old = await _fetch(conn, "SELECT concurrency FROM queues WHERE name = %s FOR UPDATE", (queue,))
            before = old[0][0] if old else None
            if old and before == limit:
                return False
            if not old and limit is None:
                return False
            await conn.execute("INSERT INTO queues (name, paused, concurrency, updated_at) VALUES (%s, FALSE, %s, %s)"
                               " ON CONFLICT (name) DO UPDATE SET concurrency = EXCLUDED.concurrency,"
                               " updated_at = EXCLUDED.updated_at", (queue, limit, now))
            if before is not None and (limit is None or limit > before):
                out.append(Change(0, _QUEUED, queue, 0, unheld=True))  # room made: its waiters look again
            return True

        changed = await self._write(op)
        if changed:
            self._limited = self._limited | {queue} if limit is not None else self._limited - {queue}
        return changed

    async def set_limit(self, name: str, rate: Rate) -> bool:
        now = self.clock()

        async def op(conn: Conn, out: list[Change]) -> bool:
            # xmax = 0: the row was inserted by this statement, not updated.
            (made,), = await _fetch(conn,
                "INSERT INTO limits (name, count, per, burst, updated_at) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET count = EXCLUDED.count, per = EXCLUDED.per,"
                " burst = EXCLUDED.burst, updated_at = EXCLUDED.updated_at RETURNING xmax = 0",
                (name, rate.count, rate.per, rate.burst, now))
            return bool(made)

        return await self._write(op)

    async def delete_limit(self, name: str) -> bool:
        async def op(conn: Conn, out: list[Change]) -> bool:
            return bool(await _fetch(conn, "DELETE FROM limits WHERE name = %s RETURNING name", (name,)))

        return await self._write(op)

    async def limits(self) -> list[LimitInfo]:
        rows = await self._rows("SELECT name, count, per, burst, tat FROM limits ORDER BY name")
        return [LimitInfo(r[0], Rate(r[1], r[2], r[3]), r[4]) for r in rows]

    async def purge(self, before: float, states: Sequence[JobState], limit: int) -> tuple[int, float]:
        """Delete up to ``limit`` ended jobs of ``states`` that ended before ``before``, oldest first, with their
        attempts, output and events, in one statement (see Store.purge); rows another transaction holds (a
        replay of one of them) are skipped, not waited for."""
        wanted = [s.value for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED)
                  if s in states]
        if not wanted:
            return 0, 0.0

        async def op(conn: Conn, out: list[Change]) -> tuple[int, float]:
            started = time.perf_counter()
            n = 0
            for state in wanted:  # a state at a time, each oldest first (the index is by state, then end time)
                n += len(await _fetch(conn,
                    f"WITH doomed AS (SELECT id FROM jobs WHERE state IN {Q_FINISHED} AND state = %s"
                    " AND finished_at < %s ORDER BY finished_at LIMIT %s FOR UPDATE SKIP LOCKED),"
                    " e AS (DELETE FROM events WHERE job_id IN (SELECT id FROM doomed)),"
                    " o AS (DELETE FROM output WHERE job_id IN (SELECT id FROM doomed)),"
                    " a AS (DELETE FROM attempts WHERE job_id IN (SELECT id FROM doomed))"
                    " DELETE FROM jobs WHERE id IN (SELECT id FROM doomed) RETURNING id", (state, before, limit - n)))
                if n >= limit:
                    break
            return n, time.perf_counter() - started

        return await self._auto(op)

    async def register_worker(self, *, name: str, hostname: str, queues: Sequence[str], concurrency: int,
                              credential_hash: str | None = None, metrics: str | None = None,
                              runners: Sequence[str] = (EXEC,)) -> str:
        now, heard = self.clock(), self.lease_clock()
        worker_id = "w-" + uuid.uuid4().hex[:12]

        async def op(conn: Conn, out: list[Change]) -> None:
            await conn.execute(
                "INSERT INTO workers (id, name, hostname, queues, concurrency, state, registered_at, last_heartbeat,"
                " credential_hash, metrics, runners) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (worker_id, name, hostname, json.dumps(list(queues)), concurrency, _ALIVE, now, heard,
                 credential_hash, metrics, list(runners)))

        await self._write(op)
        return worker_id

    async def deregister(self, worker_id: str) -> None:
        async def op(conn: Conn, out: list[Change]) -> None:
            await conn.execute("UPDATE workers SET state = %s WHERE id = %s AND state != %s",
                               (_STOPPED, worker_id, _LOST))

        await self._write(op)

    async def drain_worker(self, worker_id: str) -> bool:
        async def op(conn: Conn, out: list[Change]) -> bool:
            row = await (await conn.execute("SELECT state FROM workers WHERE id = %s FOR UPDATE", (worker_id,))
                         ).fetchone()
            if row is None or not WorkerState(row[0]).live:
                raise NotFound(f"no live worker {worker_id}", field="worker_id")
            if row[0] == _DRAINING:
                return False
            await conn.execute(f"UPDATE workers SET state = {Q_DRAINING} WHERE id = %s", (worker_id,))
            return True

        return await self._write(op)

    async def heartbeat(self, worker_id: str, running: Sequence[tuple[int, int]], lease_ttl: float,
                        draining: bool = False) -> HeartbeatReply:
        now = self.lease_clock()

        async def op(conn: Conn, out: list[Change]) -> HeartbeatReply:
            # One statement: the worker's row (no row: not live), and the leases of its running attempts.
            ids = [j for j, _ in running]
            rows = await _fetch(conn,
                "WITH w AS (UPDATE workers SET last_heartbeat = %s, running = %s,"
                f" state = CASE WHEN %s THEN {Q_DRAINING} ELSE state END WHERE id = %s AND state IN {Q_LIVE}"
                f" RETURNING id, state = {Q_DRAINING} AND NOT %s AS drain),"
                " j AS (UPDATE jobs j SET lease_expires_at = %s FROM unnest(%s::bigint[], %s::int[]) AS r(id, attempt)"
                f" WHERE j.id = r.id AND j.id = ANY(%s) AND j.attempt = r.attempt AND j.state = {Q_RUNNING}"
                " AND j.worker_id = %s AND EXISTS (SELECT 1 FROM w) RETURNING j.id, j.attempt, j.cancel_requested)"
                " SELECT j.id, j.attempt, j.cancel_requested, w.drain FROM w LEFT JOIN j ON TRUE",
                (now, len(running), draining, worker_id, draining, now + lease_ttl, ids, [a for _, a in running], ids,
                 worker_id))
            if not rows:
                raise _unknown(worker_id)
            reply = HeartbeatReply(drain=bool(rows[0][3]))
            rows = [r for r in rows if r[0] is not None]
            if not running:
                return reply
            held = {(r[0], r[1]): r[2] for r in rows}
            for ref in running:
                if ref not in held:
                    reply.stale.append(ref)
                elif held[ref]:
                    reply.cancel.append(ref)
            return reply

        return await self._auto(op)

    async def _claim(self, conn: Conn, out: list[Change], worker_id: str, queues: Sequence[str], limit: int,
                     lease_ttl: float, now: float) -> list[Lease]:
        check_transition(JobState.QUEUED, JobState.RUNNING)
        steady = self.lease_clock()
        qs = list(dict.fromkeys(queues))[:MAX_QUEUES_PER_CLAIM]
        tail = (worker_id, steady + lease_ttl, now, worker_id, now, now, decisions.claimed(worker_id).reason)
        found = await _fetch(conn, _CLAIM, (worker_id, qs, limit, limit, *tail, qs))
        if not found or not WorkerState(found[0][6]).live:
            raise _unknown(worker_id)
        rows = [r for r in found if r[0] is not None]
        limited: list[str] = sorted(found[0][7] or ())
        self._limited = (self._limited - set(qs)) | set(limited)
        if limited and len(rows) < limit and found[0][6] == _ALIVE:
            # Queues with a concurrency limit were left out above: claimed from here, each under its advisory
            # lock (in name order), by a statement that counts what runs there after the locks are held, so two
            # claims through any replicas never both take a queue's last slot.
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(28531, hashtext(q)) FROM unnest(%s::text[]) AS q"
                                   " ORDER BY q", (limited,))
                rows += [r for r in await _fetch(conn, _CLAIM_LIMITED,
                                                 (worker_id, limited, limit - len(rows), limit - len(rows), *tail))
                         if r[0] is not None]
        rows.sort(key=lambda r: dispatch_order(r[4], r[0]))
        out.extend(Change(r[0], _RUNNING, r[3], r[1], worker=worker_id,
                          queue_wait=max(0.0, now - r[5]) if r[1] == 1 else None) for r in rows)
        wanting = [r[0] for r in rows if '"depends_on":' in r[2]]
        inputs = await self._inputs(conn, wanting) if wanting else {}
        return [Lease(r[0], r[1], r[2], r[3], r[5], r[4], inputs.get(r[0])) for r in rows]

    async def claim(self, worker_id: str, queues: Sequence[str], limit: int,
                    lease_ttl: float) -> tuple[list[Lease], list[Change]]:
        now = self.clock()
        got: list[Change] = []

        async def op(conn: Conn, out: list[Change]) -> list[Lease]:
            leases = await self._claim(conn, out, worker_id, queues, limit, lease_ttl, now)
            got[:] = out
            return leases

        return await self._auto(op), got

    async def append_output(self, worker_id: str, chunks: Sequence[OutputChunk]) -> list[bool]:
        limit = self.output_limit

        async def op(conn: Conn, out: list[Change]) -> list[bool]:
            return await _append_many(conn, worker_id, chunks, limit)

        return await self._auto(op)

    async def _complete(self, conn: Conn, out: list[Change], worker_id: str, results: Sequence[AttemptResult],
                        defaults: RetryPolicy, now: float) -> list[Verdict]:
        """End the reported attempts with their last output, in one statement whatever their number (two
        when an outcome needs the job's spec: see ``_end_attempts``)."""
        ends = await _end_attempts(conn, [Ending(r.job_id, r.attempt, worker_id, r.outcome, r.exit_code, r.error,
                                                 r.duration, r.waited, r.output, r.value) for r in results], now, defaults,
                                   self.rand, self.output_limit)
        out.extend(c for c in ends if c is not None)
        return [Verdict(r.job_id, r.attempt, JobState(c.state) if c else None) for r, c in zip(results, ends, strict=True)]

    async def complete(self, worker_id: str, results: Sequence[AttemptResult],
                       defaults: RetryPolicy) -> tuple[list[Verdict], list[Change]]:
        now = self.clock()
        got: list[Change] = []

        async def op(conn: Conn, out: list[Change]) -> list[Verdict]:
            verdicts = await self._complete(conn, out, worker_id, results, defaults, now)
            got[:] = out
            return verdicts

        return await self._auto(op), got

    async def complete_and_claim(self, worker_id: str, results: Sequence[AttemptResult], defaults: RetryPolicy,
                                 queues: Sequence[str], limit: int, lease_ttl: float) -> tuple[list[Verdict], list[Lease]]:
        """The results ended, then the claim: each a statement of its own (the results stay ended if the claim
        then fails; the worker reports nothing twice: it asks for work again)."""
        now = self.clock()

        async def op(conn: Conn, out: list[Change]) -> tuple[list[Verdict], list[Lease]]:
            verdicts = await self._complete(conn, out, worker_id, results, defaults, now)
            return verdicts, await self._claim(conn, out, worker_id, queues, limit, lease_ttl, now)

        return await self._auto(op)

    async def hand_back(self, worker_id: str, attempts: Sequence[tuple[int, int]], stop: bool) -> list[Change]:
        now = self.clock()
        back = decisions.handed_back(worker_id)
        got: list[Change] = []

        async def op(conn: Conn, out: list[Change]) -> None:
            await _live_worker(conn, worker_id)
            for job_id, attempt in sorted(attempts):
                await conn.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
                row = await (await conn.execute(
                    "UPDATE attempts SET state = %s, finished_at = %s, error = %s WHERE job_id = %s AND attempt = %s"
                    " AND state = %s AND worker_id = %s RETURNING job_id",
                    (Outcome.HANDED_BACK.value, now, decisions.HANDED_BACK_ERROR, job_id, attempt, _RUNNING,
                     worker_id))).fetchone()
                if row is None:
                    continue
                q = await _move(conn, job_id, attempt, JobState.RUNNING, back, now, worker_id=None,
                                lease_expires_at=None)
                out.append(Change(job_id, _QUEUED, q, attempt, worker=worker_id, outcome=Outcome.HANDED_BACK.value))
            if stop:
                await conn.execute("UPDATE workers SET state = %s WHERE id = %s", (_STOPPED, worker_id))
            got[:] = out

        await self._write(op)
        return got

    # ---- cron schedules

    async def save_schedule(self, sch: Schedule, *, create: bool, last_tick: float | None,
                            next_at: float | None) -> None:
        now = self.clock()
        text = schedule_json_text(sch)

        async def op(conn: Conn, out: list[Change]) -> None:
            if create:
                row = await (await conn.execute(
                    "INSERT INTO schedules (name, definition, paused, created_at, updated_at, last_tick, next_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING name",
                    (sch.name, text, sch.paused, now, now, last_tick if last_tick is not None else now,
                     next_at))).fetchone()
                if row is None:
                    raise Conflict(f"a schedule {sch.name!r} exists already: change it (PATCH, orch schedule apply)"
                                   " or delete it first", field="name")
                return
            row = await (await conn.execute(
                "UPDATE schedules SET definition = %s, paused = %s, updated_at = %s, next_at = %s,"
                " last_tick = COALESCE(%s, last_tick) WHERE name = %s RETURNING name",
                (text, sch.paused, now, next_at, last_tick, sch.name))).fetchone()
            if row is None:
                raise NotFound(f"no schedule {sch.name!r}", field="name")

        await self._auto(op)

    async def delete_schedule(self, name: str) -> bool:
        async def op(conn: Conn, out: list[Change]) -> bool:
            return bool(await _fetch(conn, "DELETE FROM schedules WHERE name = %s RETURNING name", (name,)))

        return bool(await self._auto(op))

    async def schedules(self, name: str | None = None) -> list[ScheduleInfo]:
        if name is None:
            rows = await self._rows(f"SELECT {SCHEDULE_COLUMNS} FROM {SCHEDULE_FROM} ORDER BY s.name")
        else:
            rows = await self._rows(f"SELECT {SCHEDULE_COLUMNS} FROM {SCHEDULE_FROM} WHERE s.name = %s", (name,))
            if not rows:
                raise NotFound(f"no schedule {name!r}", field="name")
        return [schedule_info(r) for r in rows]

    async def due_schedules(self, now: float, limit: int) -> list[ScheduleInfo]:
        rows = await self._rows(f"SELECT {SCHEDULE_COLUMNS} FROM {SCHEDULE_FROM} WHERE NOT s.paused"
                                " AND s.next_at IS NOT NULL AND s.next_at <= %s ORDER BY s.next_at LIMIT %s",
                                (now, limit))
        return [schedule_info(r) for r in rows]

    async def next_schedule_at(self) -> float | None:
        rows = await self._rows("SELECT min(next_at) FROM schedules WHERE NOT paused AND next_at IS NOT NULL")
        return rows[0][0] if rows else None

    async def schedule_ticked(self, name: str, frm: float, last_tick: float, next_at: float | None,
                              last_job: int | None, fired: int, skipped: int, missed: int,
                              missed_at: float | None) -> bool:
        async def op(conn: Conn, out: list[Change]) -> bool:
            return bool(await _fetch(conn,
                "UPDATE schedules SET last_tick = %s, next_at = %s, last_job = COALESCE(%s, last_job),"
                " fired = fired + %s, skipped = skipped + %s, missed = missed + %s,"
                " last_missed_at = COALESCE(%s, last_missed_at) WHERE name = %s AND last_tick = %s RETURNING name",
                (last_tick, next_at, last_job, fired, skipped, missed, missed_at, name, frm)))

        return bool(await self._auto(op))

    async def lead(self, holder: str, ttl: float) -> Leadership:
        """A lease on the reaper's role in the ``leader`` table, on the database server's clock."""

        async def op(conn: Conn, out: list[Change]) -> Leadership:
            (now,), = await (await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")).fetchall()
            row = await (await conn.execute("SELECT holder, expires_at FROM leader WHERE role = 'reaper' FOR UPDATE")
                         ).fetchone()
            if row is None:
                taken = await (await conn.execute(
                    "INSERT INTO leader (role, holder, expires_at, since) VALUES ('reaper', %s, %s, %s)"
                    " ON CONFLICT (role) DO NOTHING RETURNING holder", (holder, now + ttl, now))).fetchone()
                return Leadership(taken is not None)
            if row[0] == holder:  # its own lease: kept, or taken again after it ran out (this scheduler stalled)
                await conn.execute("UPDATE leader SET expires_at = %s WHERE role = 'reaper'", (now + ttl,))
                return Leadership(True, now - row[1] if row[1] <= now else None)
            if row[1] > now:
                return Leadership(False)
            await conn.execute("UPDATE leader SET holder = %s, expires_at = %s, since = %s WHERE role = 'reaper'",
                               (holder, now + ttl, now))
            return Leadership(True, max(0.0, now - row[1]))

        return await self._write(op)

    async def resign(self, holder: str) -> None:
        async def op(conn: Conn, out: list[Change]) -> None:
            await conn.execute("UPDATE leader SET expires_at = extract(epoch FROM clock_timestamp())::float8"
                               " WHERE role = 'reaper' AND holder = %s", (holder,))

        await self._write(op)

    async def sweep(self, worker_ttl: float, defaults: RetryPolicy) -> Sweep:
        now = self.clock()
        steady = self.lease_clock()

        async def op(conn: Conn, changes: list[Change]) -> Sweep:
            out = Sweep()
            lost = await (await conn.execute(
                "UPDATE workers SET state = %s WHERE state = ANY(%s) AND last_heartbeat < %s RETURNING id",
                (_LOST, _LIVE, steady - worker_ttl))).fetchall()
            out.lost_workers = sorted(r[0] for r in lost)
            gone = set(out.lost_workers)
            ended = await (await conn.execute(
                f"SELECT id, attempt, worker_id FROM jobs WHERE state = {Q_RUNNING}"
                " AND (lease_expires_at < %s OR worker_id = ANY(%s)) ORDER BY id FOR UPDATE SKIP LOCKED",
                (steady, list(gone)))).fetchall()
            ends = await _end_attempts(conn, [Ending(job_id, attempt, wid, Outcome.LOST, None,
                                                     decisions.lost(wid, wid in gone)) for job_id, attempt, wid in ended],
                                       now, defaults, self.rand)
            out.changes += [c for c in ends if c is not None]
            check_transition(JobState.RETRYING, decisions.BACKOFF_OVER.to)
            check_transition(JobState.SCHEDULED, decisions.DUE.to)
            due = await (await conn.execute(
                f"WITH due AS (SELECT id FROM jobs WHERE state = {Q_RETRYING} AND run_at <= %s ORDER BY id"
                f" FOR UPDATE SKIP LOCKED), moved AS (UPDATE jobs j SET state = {Q_QUEUED}, run_at = NULL FROM due"
                " WHERE j.id = due.id RETURNING j.id, j.attempt, j.queue),"
                " ev AS (INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                f" SELECT id, attempt, {Q_RETRYING}, {Q_QUEUED}, %s, %s FROM moved)"
                " SELECT id, attempt, queue FROM moved ORDER BY id",
                (now, now, decisions.BACKOFF_OVER.reason))).fetchall()
            out.changes += [Change(r[0], _QUEUED, r[2], r[1]) for r in due]
            # Scheduled jobs whose time came (by jobs_scheduled): queued, keeping in run_at when they were due.
            ready = await (await conn.execute(
                f"WITH due AS (SELECT id FROM jobs WHERE state = {Q_SCHEDULED} AND run_at <= %s ORDER BY id"
                f" FOR UPDATE SKIP LOCKED), moved AS (UPDATE jobs j SET state = {Q_QUEUED} FROM due"
                " WHERE j.id = due.id RETURNING j.id, j.attempt, j.queue, j.run_at),"
                " ev AS (INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                f" SELECT id, attempt, {Q_SCHEDULED}, {Q_QUEUED}, %s, %s FROM moved ORDER BY id)"
                " SELECT id, attempt, queue, run_at FROM moved ORDER BY id",
                (now, now, decisions.DUE.reason))).fetchall()
            out.changes += [Change(r[0], _QUEUED, r[2], r[1], due=r[3]) for r in ready]
            # The next pass is due at the earliest of both (each min one step down its partial index).
            nxt = await (await conn.execute(
                f"SELECT (SELECT min(run_at) FROM jobs WHERE state = {Q_RETRYING}),"
                f" (SELECT min(run_at) FROM jobs WHERE state = {Q_SCHEDULED})")).fetchone()
            out.next_due = min((t for t in nxt if t is not None), default=None)
            changes.extend(out.changes)
            return out

        return await self._write(op)


# --------------------------------------------------------------------------- in-transaction helpers

_MOVE_COLUMNS = frozenset({"finished_at", "run_at", "worker_id", "lease_expires_at", "exit_code", "error", "max_attempts",
                           "cancel_requested"})


def _claim_statement(limited: bool) -> str:
    """The claim: the worker's state (no row: not registered) and what it claimed (nothing if draining), in one
    statement. Each queue's first jobs by the order of its index (jobs_ready: no queued job is read past them,
    however many wait), then the first of those: the order of one index over every queue. A paused queue hands
    out nothing: its name is left out before its jobs are looked at. ``limited``: the statement for queues
    with a concurrency limit, each giving at most its room (its limit less what runs there), run under their
    locks; else those are left out too, and the last column names them."""
    if limited:
        queues = (" picked AS (SELECT x.id FROM unnest(%s::text[]) AS q(name) JOIN queues p ON p.name = q.name"
                  " AND NOT p.paused AND p.concurrency IS NOT NULL CROSS JOIN LATERAL")
        room = (f"GREATEST(0, LEAST(%s, p.concurrency - (SELECT count(*) FROM jobs r WHERE r.queue = q.name"
                f" AND r.state = {Q_RUNNING})))")
        left_out, named = "", "NULL::text[]"
    else:
        queues = " picked AS (SELECT x.id FROM unnest(%s::text[]) AS q(name) CROSS JOIN LATERAL"
        room = "%s"
        left_out = (" AND NOT EXISTS (SELECT 1 FROM queues p WHERE p.name = q.name"
                    " AND (p.paused OR p.concurrency IS NOT NULL))")
        named = ("(SELECT array_agg(name) FROM queues WHERE name = ANY(%s) AND concurrency IS NOT NULL"
                 " AND NOT paused)")
    return (
        "WITH w AS (SELECT state, runners FROM workers WHERE id = %s)," + queues +
        f" (SELECT id, priority FROM jobs WHERE state = {Q_QUEUED} AND NOT held AND queue = q.name"
        " AND runner IN (SELECT unnest(runners) FROM w)"
        f" AND EXISTS (SELECT 1 FROM w WHERE w.state = {Q_ALIVE}){left_out}"
        f" ORDER BY priority DESC, id LIMIT {room} FOR UPDATE SKIP LOCKED) x ORDER BY x.priority DESC, x.id"
        " LIMIT %s),"
        f" claimed AS (UPDATE jobs j SET state = {Q_RUNNING}, attempt = j.attempt + 1, worker_id = %s,"
        " lease_expires_at = %s, started_at = %s, exit_code = NULL, error = NULL"
        # A job queued once its scheduled time came keeps that time in run_at: it has waited since then.
        " FROM picked WHERE j.id = picked.id RETURNING j.id, j.attempt, j.spec, j.queue, j.priority,"
        " COALESCE(j.run_at, j.created_at) AS created_at),"
        " a AS (INSERT INTO attempts (job_id, attempt, worker_id, state, started_at)"
        f" SELECT id, attempt, %s, {Q_RUNNING}, %s FROM claimed),"
        " e AS (INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
        f" SELECT id, attempt, {Q_QUEUED}, {Q_RUNNING}, %s, %s FROM claimed)"
        f" SELECT c.id, c.attempt, c.spec, c.queue, c.priority, c.created_at, w.state, {named}"
        " FROM w LEFT JOIN claimed c ON TRUE"
    )


_CLAIM, _CLAIM_LIMITED = _claim_statement(False), _claim_statement(True)


def _decides_at_submit(spec: JobSpec) -> bool:
    """A keyed job whose submit weighs its key's slots itself (on_limit skip_new, cancel_running): a row at a time."""
    return spec.concurrency is not None and spec.concurrency.on_limit is not OnLimit.QUEUE


async def _crowd(conn: Conn, spec: JobSpec) -> list[Holder]:
    """The jobs of the spec's key that hold a slot (running, queued) or wait for one (held; cancel_running only),
    read under the key's lock (the one its insert's trigger takes: taken first here, it is held already then)."""
    c = spec.concurrency
    assert c is not None
    await conn.execute("SELECT pg_advisory_xact_lock(28530, hashtext(%s))", (c.key,))
    got = [Holder(r[0], r[1] == _RUNNING, False, bool(r[2])) for r in await _fetch(conn,
        f"SELECT id, state, cancel_requested FROM jobs WHERE ckey = %s AND NOT held AND state IN ({Q_QUEUED},"
        f" {Q_RUNNING})", (c.key,))]
    if c.on_limit is OnLimit.CANCEL_RUNNING:
        got += [Holder(r[0], False, True) for r in await _fetch(conn,
            f"SELECT id FROM jobs WHERE ckey = %s AND state = {Q_QUEUED} AND held", (c.key,))]
    return got


class _Links(Links):
    """A submit's dependencies, written by this backend (base.Links)."""

    async def link(self, conn: Conn, ids: list[int], fresh: list[bool], now: float,
                   out: list[Change]) -> dict[int, JobState]:
        """Write the new jobs' dependencies, mark the jobs they name (locked, in id order: an end of one of them
        through another replica either commits first, and is read ended here, or waits, and then sees its new
        dependents), give the new jobs their workflow, and decide the dependencies on jobs that have ended."""
        named = {jid for i, row in enumerate(self.deps) if fresh[i] for jid, _, _ in row if jid is not None}
        named |= {ids[k] for k in self.targets if not fresh[k]}
        order = sorted(named)
        known: dict[int, tuple[str, int | None]] = {}
        if order:
            known = {r[0]: (r[1], r[2]) for r in await _fetch(conn,
                "WITH lk AS (SELECT id FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE)"
                " UPDATE jobs SET fanout = TRUE FROM lk WHERE jobs.id = lk.id RETURNING jobs.id, jobs.state,"
                " jobs.workflow", (order,))}
        edges: list[list[Any]] = [[], [], [], []]
        for i, row in enumerate(self.deps):
            if not fresh[i]:
                continue
            for j, (jid, k, on) in enumerate(row):
                if jid is not None and jid not in known:
                    raise NotFound(f"no job {jid} to depend on", field=f"jobs[{i}].depends_on[{j}]")
                for col, v in zip(edges, (ids[i], jid if jid is not None else ids[k or 0], on.value,
                                          self.specs[k].ref if k is not None else None), strict=True):
                    col.append(v)
        if edges[0]:
            await conn.execute("INSERT INTO deps (job_id, dep_id, cond, ref)"
                               " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::text[])", edges)
        new = [ids[i] for i in range(len(ids)) if fresh[i]]
        if new:
            workflow = min((w for _, w in known.values() if w is not None), default=new[0])
            await conn.execute("UPDATE jobs SET workflow = %s WHERE id = ANY(%s)", (workflow, new))
        ended = [x for x in order if JobState(known[x][0]).terminal]
        mark = len(out)
        if ended:  # the trigger's notices land in ``out`` as the statement runs
            await conn.execute("SELECT orch_settle(x, %s) FROM unnest(%s::bigint[]) AS x", (now, ended))
        return {c.job_id: JobState(c.state) for c in out[mark:]}


async def _weigh(conn: Conn, jid: int) -> tuple[int, tuple[int, str] | None]:
    """A job's dependencies weighed afresh (see sqlite._weigh), each locked for share: an end of one racing this
    through another replica commits first (and is read here) or waits for this one (and then sees the job)."""
    rows = await _fetch(conn,
        "WITH lk AS (SELECT id, state FROM jobs WHERE id IN (SELECT dep_id FROM deps WHERE job_id = %s) ORDER BY id"
        " FOR SHARE) SELECT d.dep_id, d.cond, d.met, lk.state FROM deps d LEFT JOIN lk ON lk.id = d.dep_id"
        " WHERE d.job_id = %s ORDER BY d.dep_id", (jid, jid))
    pending = 0
    broken: tuple[int, str] | None = None
    flips: list[tuple[int, int, bool]] = []
    for dep, cond, met, state in rows:
        m = dag.met(cond, state) if state is not None else bool(met)
        if m is None:
            pending += 1
            if met:
                flips.append((jid, dep, False))
        elif m:
            if not met:
                flips.append((jid, dep, True))
        elif broken is None:
            broken = (dep, state or "purged")
    if broken is None and flips:
        await conn.execute("UPDATE deps SET met = u.met FROM unnest(%s::bigint[], %s::bigint[], %s::bool[])"
                           " AS u(j, d, met) WHERE deps.job_id = u.j AND deps.dep_id = u.d",
                           ([f[0] for f in flips], [f[1] for f in flips], [f[2] for f in flips]))
    return pending, broken


async def _make_room(conn: Conn, jid: int, spec: JobSpec, crowd: list[Holder], now: float,
                     out: list[Change]) -> JobState:
    """As SQLite's: skip_new ends the new job skipped when its key was full; cancel_running cancels the jobs
    it takes the place of (queued ones now, held first; running ones are told at their worker's heartbeat)."""
    c = spec.concurrency
    assert c is not None
    if c.on_limit is OnLimit.SKIP_NEW:
        if not skips(c.limit, crowd):
            return JobState.QUEUED
        await _move(conn, jid, 0, JobState.QUEUED, decisions.skipped(c, sum(1 for h in crowd if not h.held)), now,
                    run_at=None)
        out.append(Change(jid, JobState.SKIPPED.value, spec.queue, 0))
        return JobState.SKIPPED
    move = decisions.replaced(c.key, jid)
    for h in sorted(to_cancel(c.limit, crowd), key=lambda h: (h.running, not h.held, h.id)):
        (state, attempt, queue), = await _fetch(conn, "SELECT state, attempt, queue FROM jobs WHERE id = %s", (h.id,))
        if state == _RUNNING:
            await conn.execute("UPDATE jobs SET cancel_requested = TRUE WHERE id = %s", (h.id,))
            out.append(Change(h.id, _RUNNING, queue, attempt))
        else:
            await _move(conn, h.id, attempt, JobState(state), move, now, run_at=None)
            out.append(Change(h.id, _CANCELLED, queue, attempt))
    return JobState.QUEUED


async def _move(conn: Conn, job_id: int, attempt: int, frm: JobState, move: decisions.Move, now: float,
                **sets: Any) -> str:
    """The one way a job changes state (see sqlite._move): checked, conditional, with its event row."""
    check_transition(frm, move.to)
    assert set(sets) <= _MOVE_COLUMNS, sets
    if move.ends:
        sets["finished_at"] = now
    if move.retry_in is not None:
        sets["run_at"] = now + move.retry_in
    assignments = "".join(f", {col} = %s" for col in sets)
    if move.refund:
        assignments += ", max_attempts = max_attempts + 1"
    row = await (await conn.execute(
        f"UPDATE jobs SET state = %s{assignments} WHERE id = %s AND state = %s AND attempt = %s RETURNING queue",
        (move.to.value, *sets.values(), job_id, frm.value, attempt))).fetchone()
    if row is None:
        raise Conflict(f"job {job_id} is no longer {frm} at attempt {attempt}")
    await conn.execute(
        "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason) VALUES (%s, %s, %s, %s, %s, %s)",
        (job_id, attempt, frm.value, move.to.value, now, move.reason))
    return str(row[0])


def _unknown(worker_id: str) -> UnknownWorker:
    return UnknownWorker(f"worker {worker_id} is not registered (or was marked lost): register again",
                         field="worker_id")


async def _live_worker(conn: Conn, worker_id: str) -> WorkerState:
    """The worker's state, alive or draining; UnknownWorker if it is lost, stopped or unknown."""
    row = await (await conn.execute("SELECT state FROM workers WHERE id = %s", (worker_id,))).fetchone()
    state = WorkerState(row[0]) if row is not None else None
    if state is None or not state.live:
        raise _unknown(worker_id)
    return state


_CHUNKS = (
    "c AS (SELECT *, sum(size + skipped) OVER (PARTITION BY job_id, attempt, stream ORDER BY o) AS upto"
    " FROM unnest(%s::bigint[], %s::int[], %s::text[], %s::text[], %s::bigint[], %s::bigint[])"
    " WITH ORDINALITY AS c(job_id, attempt, stream, data, size, skipped, o)),"
    " tot AS (SELECT job_id, attempt,"
    " sum(CASE WHEN stream = 'stdout' THEN size + skipped ELSE 0 END)::bigint AS o_all,"
    " sum(CASE WHEN stream = 'stdout' THEN size ELSE 0 END)::bigint AS o_kept,"
    " sum(CASE WHEN stream = 'stderr' THEN size + skipped ELSE 0 END)::bigint AS e_all,"
    " sum(CASE WHEN stream = 'stderr' THEN size ELSE 0 END)::bigint AS e_kept FROM c GROUP BY job_id, attempt)")
# The counts an UPDATE of attempts t (joined LEFT to tot) adds, and the rows it RETURNs for _INSERT_CHUNKS.
_COUNTS = ("stdout_bytes = t.stdout_bytes + coalesce(tot.o_all, 0), stdout_kept = t.stdout_kept + coalesce(tot.o_kept, 0),"
           " stderr_bytes = t.stderr_bytes + coalesce(tot.e_all, 0), stderr_kept = t.stderr_kept + coalesce(tot.e_kept, 0)")
_COUNTED = ("t.job_id, t.attempt, t.stdout_bytes - coalesce(tot.o_all, 0) AS o_base,"
            " t.stderr_bytes - coalesce(tot.e_all, 0) AS e_base, t.stdout_kept, t.stderr_kept")


def _insert_chunks(counted: str) -> str:
    """A CTE that stores the chunks of ``c`` whose attempt is in ``counted``, each at its place in its stream."""
    return (" ins AS (INSERT INTO output (job_id, attempt, stream, data, size, pos)"
            " SELECT c.job_id, c.attempt, c.stream, c.data, c.size,"
            " CASE WHEN c.stream = 'stdout' THEN k.o_base ELSE k.e_base END + c.upto - c.size"
            f" FROM c JOIN {counted} k ON k.job_id = c.job_id AND k.attempt = c.attempt WHERE c.size > 0 ORDER BY c.o)")


def _chunk_columns(chunks: Sequence[OutputChunk]) -> list[list[Any]]:
    cols: list[list[Any]] = [[], [], [], [], [], []]
    for c in chunks:
        if c.stream in ("stdout", "stderr"):
            for col, v in zip(cols, (c.job_id, c.attempt, c.stream, _text(c.data), len(c.data.encode("utf-8")),
                                     c.skipped), strict=True):
                col.append(v)
    return cols


async def _trim_over(conn: Conn, rows: Sequence[Any], limit: int) -> None:
    """Trim each (job id, attempt, stdout kept, stderr kept) over the limit."""
    for job_id, attempt, out_kept, err_kept in rows:
        for stream, n in (("stdout", out_kept), ("stderr", err_kept)):
            if n is not None and n > limit:
                await _trim(conn, job_id, attempt, stream, n, limit)


async def _append_many(conn: Conn, worker_id: str, chunks: Sequence[OutputChunk], limit: int) -> list[bool]:
    """Add output chunks to their running attempts in one statement, whatever their number: each attempt's
    byte counts grow by what its chunks bring, and each chunk's place in its stream follows from them (the
    counts before, plus what the chunks before it in the list brought). A chunk is kept when its attempt is
    still running on this worker; then each stream over the limit loses its oldest chunks."""
    cols = _chunk_columns(chunks)
    if not cols[0]:
        return [False] * len(chunks)
    rows = await _fetch(conn,
        f"WITH {_CHUNKS}, u AS (UPDATE attempts t SET {_COUNTS} FROM tot"
        f" WHERE t.job_id = tot.job_id AND t.attempt = tot.attempt AND t.state = {Q_RUNNING} AND t.worker_id = %s"
        f" RETURNING {_COUNTED}),{_insert_chunks('u')}"
        " SELECT job_id, attempt, stdout_kept, stderr_kept FROM u",
        (*cols, worker_id))
    kept = {(r[0], r[1]) for r in rows}
    await _trim_over(conn, rows, limit)
    return [c.stream in ("stdout", "stderr") and (c.job_id, c.attempt) in kept for c in chunks]


async def _trim(conn: Conn, job_id: int, attempt: int, stream: str, kept: int, limit: int) -> None:
    """Drop an attempt's oldest chunks of ``stream`` while what is left still covers the limit: the tail stays.
    The count kept falls by what this statement deleted (two trims at once never count a chunk twice)."""
    dropped, ids = 0, []
    for chunk_id, size in await _fetch(
            conn, "SELECT id, size FROM output WHERE job_id = %s AND attempt = %s AND stream = %s ORDER BY id",
            (job_id, attempt, stream)):
        if kept - dropped - size < limit:
            break
        ids.append(chunk_id)
        dropped += size
    if ids:
        await _fetch(conn, f"WITH d AS (DELETE FROM output WHERE id = ANY(%s) RETURNING size)"
                     f" UPDATE attempts SET {stream}_kept = {stream}_kept - (SELECT coalesce(sum(size), 0) FROM d)"
                     " WHERE job_id = %s AND attempt = %s RETURNING 1", (ids, job_id, attempt))


@dataclass(frozen=True)
class Ending:
    """An attempt to end: whose, how, and what the worker said of it."""

    job_id: int
    attempt: int
    worker_id: str | None
    outcome: Outcome
    exit_code: int | None = None
    error: str | None = None
    duration: float | None = None
    waited: float = 0.0
    output: Sequence[OutputChunk] = ()  # its last chunks, kept with its end (in the same statement)
    value: str | None = None  # the JSON text it wrote to $ORCH_RESULT_PATH


async def _end_attempts(conn: Conn, endings: Sequence[Ending], now: float, defaults: RetryPolicy,
                        rand: Callable[[], float], output_limit: int = 1 << 20) -> list[Change | None]:
    """End running attempts and move their jobs on (decisions.attempt_ended): a Change for each ending, None
    where the attempt was stale (its job no longer running that attempt, or the attempt not this worker's).

    One statement ends them all, whatever their number, and moves exactly the jobs whose attempt row it
    ended: it locks the jobs (in id order, as every writer does) that are still running the attempt and
    still as they were read, ends their attempt rows (fenced by state and worker), moves the jobs and
    writes their event rows, and keeps each ending's last output
    chunks with it (so an end that fails keeps none of them: the worker sends them again). A success needs nothing read first (it
    ends the job succeeded whatever else is true); any other outcome is decided by the core from the job's
    spec and cancel flag, read first without a lock: a job changed meanwhile (a cancel asked) is read and
    decided again, so this works the same in autocommit and inside a transaction.
    """
    firsts: dict[tuple[int, int], Ending] = {}
    for e in endings:
        firsts.setdefault((e.job_id, e.attempt), e)  # a result reported twice in one batch counts once
    todo = list(firsts.values())
    changes: dict[tuple[int, int], Change] = {}
    for _ in range(RETRIES + 1):
        if not todo:
            break
        now_, later = _one_per_job(todo)  # two attempts of one job in one report: the other waits a round
        moves: dict[int, tuple[decisions.Move, bool | None]] = {}
        weighed = {e.job_id: e for e in now_ if e.outcome is not Outcome.SUCCEEDED}
        if weighed:
            for job_id, max_attempts, spec_text, cancel_requested in await _fetch(
                    conn, "SELECT j.id, j.max_attempts, j.spec, j.cancel_requested FROM jobs j"
                    " JOIN unnest(%s::bigint[], %s::int[]) AS r(id, attempt) ON j.id = r.id AND j.attempt = r.attempt"
                    f" WHERE j.id = ANY(%s) AND j.state = {Q_RUNNING}",
                    (list(weighed), [e.attempt for e in weighed.values()], list(weighed))):
                e = weighed[job_id]
                move = decisions.attempt_ended(
                    e.outcome, e.exit_code, _text(e.error), e.attempt, cancel_requested=bool(cancel_requested),
                    policy=partial(_policy_of, spec_text, defaults, max_attempts), rand=rand)
                moves[job_id] = (move, bool(cancel_requested))
        for e in now_:
            if e.outcome is Outcome.SUCCEEDED:
                moves[e.job_id] = (decisions.SUCCEEDED, None)
        go = [e for e in now_ if e.job_id in moves]
        if not go:
            todo = later
            continue
        for e in go:
            check_transition(JobState.RUNNING, moves[e.job_id][0].to)
        chunks = _chunk_columns([c for e in go for c in e.output if c.job_id == e.job_id and c.attempt == e.attempt])
        rows = await _fetch(conn,
            f"WITH {_CHUNKS}, r AS (SELECT * FROM unnest(%s::bigint[], %s::int[], %s::text[], %s::text[], %s::int[], %s::text[],"
            " %s::float8[], %s::float8[], %s::text[], %s::text[], %s::float8[], %s::float8[], %s::int[], %s::bool[],"
            " %s::text[]) AS r(id, attempt, worker, outcome, exit_code, error, duration, waited, to_state, reason,"
            " finished_at, run_at, refund, cancel_seen, value)),"
            " lk AS (SELECT j.id FROM jobs j JOIN r ON j.id = r.id AND j.attempt = r.attempt"
            f" WHERE j.id = ANY(%s) AND j.state = {Q_RUNNING}"
            " AND (r.cancel_seen IS NULL OR j.cancel_requested = r.cancel_seen) ORDER BY j.id FOR UPDATE OF j),"
            " a AS (UPDATE attempts t SET state = r.outcome, finished_at = %s, exit_code = r.exit_code, error = r.error,"
            f" duration = r.duration, started_at = LEAST(t.started_at + r.waited, %s), value = r.value, {_COUNTS}"
            " FROM r JOIN lk ON lk.id = r.id LEFT JOIN tot ON tot.job_id = r.id AND tot.attempt = r.attempt"
            f" WHERE t.job_id = r.id AND t.attempt = r.attempt AND t.state = {Q_RUNNING}"
            " AND t.worker_id IS NOT DISTINCT FROM r.worker"
            f" RETURNING t.started_at, {_COUNTED}),{_insert_chunks('a')},"
            " u AS (UPDATE jobs j SET state = r.to_state, finished_at = COALESCE(r.finished_at, j.finished_at),"
            " run_at = COALESCE(r.run_at, j.run_at), lease_expires_at = NULL, exit_code = r.exit_code, error = r.error,"
            " max_attempts = j.max_attempts + r.refund,"
            " started_at = CASE WHEN r.waited > 0 THEN a.started_at ELSE j.started_at END"
            f" FROM a JOIN r ON r.id = a.job_id WHERE j.id = a.job_id AND j.state = {Q_RUNNING} AND j.attempt = r.attempt"
            " RETURNING j.id, j.state, j.queue, j.attempt),"
            " ev AS (INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
            f" SELECT u.id, u.attempt, {Q_RUNNING}, u.state, %s, r.reason FROM u JOIN r ON r.id = u.id ORDER BY u.id)"
            " SELECT r.id, u.queue, a.started_at, lk.id IS NOT NULL, a.stdout_kept, a.stderr_kept"
            " FROM r LEFT JOIN lk ON lk.id = r.id LEFT JOIN a ON a.job_id = r.id LEFT JOIN u ON u.id = r.id",
            (*chunks, [e.job_id for e in go], [e.attempt for e in go], [e.worker_id for e in go], [e.outcome.value for e in go],
             [e.exit_code for e in go], [_text(e.error) for e in go], [e.duration for e in go],
             [e.waited for e in go], [moves[e.job_id][0].to.value for e in go],
             [moves[e.job_id][0].reason for e in go],
             [now if moves[e.job_id][0].ends else None for e in go],
             [now + m.retry_in if (m := moves[e.job_id][0]).retry_in is not None else None for e in go],
             [1 if moves[e.job_id][0].refund else 0 for e in go], [moves[e.job_id][1] for e in go],
             [e.value for e in go], [e.job_id for e in go], now, now, now))
        again = []
        by_id = {e.job_id: e for e in go}
        await _trim_over(conn, [(r[0], by_id[r[0]].attempt, r[4], r[5]) for r in rows if r[4] is not None],
                         output_limit)
        for job_id, queue, started_at, locked, *_ in rows:
            e = by_id[job_id]
            if queue is not None:
                move = moves[job_id][0]
                changes[(e.job_id, e.attempt)] = Change(
                    e.job_id, move.to.value, queue, e.attempt, worker=e.worker_id, outcome=e.outcome.value,
                    duration=e.duration if e.duration is not None else max(0.0, now - started_at),
                    due=now + move.retry_in if move.retry_in is not None else None)
            elif not locked and moves[job_id][1] is not None:
                again.append(e)  # not as read (its cancel flag changed, or it moved on): read and weigh it again
        todo = again + later
    seen: set[tuple[int, int]] = set()
    answers: list[Change | None] = []
    for e in endings:
        key = (e.job_id, e.attempt)
        answers.append(changes.get(key) if key not in seen else None)
        seen.add(key)
    return answers


def _policy_of(spec_text: str, defaults: RetryPolicy, max_attempts: int) -> RetryPolicy:
    return policy_for(json.loads(spec_text), defaults, max_attempts)


def _one_per_job(endings: Sequence[Ending]) -> tuple[list[Ending], list[Ending]]:
    first: dict[int, Ending] = {}
    rest = []
    for e in endings:
        if e.job_id in first:
            rest.append(e)
        else:
            first[e.job_id] = e
    return list(first.values()), rest


async def _locked_limits(conn: Conn, names: Sequence[str]) -> tuple[dict[str, Rate], dict[str, float | None]]:
    """The rate limits ``names`` that exist, and their buckets' tat, their rows locked for the transaction (in name
    order: submits through every replica take turns on a bucket, and never deadlock over two)."""
    limits: dict[str, Rate] = {}
    tats: dict[str, float | None] = {}
    if names:
        for r in await _fetch(conn, "SELECT name, count, per, burst, tat FROM limits WHERE name = ANY(%s)"
                                    " ORDER BY name FOR UPDATE", (sorted(names),)):
            limits[r[0]], tats[r[0]] = Rate(r[1], r[2], r[3]), r[4]
    return limits, tats


async def _fetch(conn: Conn, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Run one statement and return its rows. Outside a transaction (autocommit: the statement is the whole
    change) a statement the server aborted for a deadlock changed nothing, and runs again."""
    import psycopg
    from psycopg.pq import TransactionStatus

    for attempt in range(RETRIES):
        try:
            cur = await conn.execute(sql, params)
            return await cur.fetchall() if cur.description is not None else []
        except psycopg.errors.OperationalError as e:
            if (getattr(e, "sqlstate", None) in _RETRY_STATES and attempt < RETRIES - 1
                    and conn.info.transaction_status == TransactionStatus.IDLE):
                await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
                continue
            raise
    raise AssertionError("unreachable")


def _check(store: PostgresStore) -> Store:
    """Never called: mypy checks here that PostgresStore implements the whole Store contract."""
    return store
