"""The SQLite store: one WAL file, one writer connection that group-commits, readers beside it.

Writes are functions of a ``sqlite3.Connection`` queued for the writer. Every
write queued during one turn of the event loop goes into the same batch, and
whatever is queued while a batch commits goes into the next one, so concurrent
submits, claims, heartbeats and completions share one ``BEGIN IMMEDIATE ...
COMMIT``. Each operation runs inside its own SAVEPOINT, so one that fails is
rolled back alone and nothing of it is half-written. A caller's await returns
only after the batch holding its operation has committed.

Where a batch runs. A thread hop costs more than a small transaction (~0.1 ms
of CPU and latency each way, against ~20-50 us for a claim of a few jobs), so a
batch that touches at most ``INLINE_WEIGHT`` jobs runs on the event loop
thread itself; a bigger one (a batch submit of thousands) runs on the writer
thread, so the loop keeps serving while SQLite works. Batches never overlap:
one connection, one batch at a time, in order. SQLite's own auto-checkpoint is
off for inline batches (a checkpoint fsyncs, which must not stall the loop);
a checkpoint thread runs PASSIVE checkpoints instead, and big batches on the
writer thread checkpoint as they commit, so the WAL stays bounded under load.

Committed changes. Operations report the job state changes they make
(``store.base.Change``); once a batch has committed, all of its changes go to
``on_commit`` in one call (the scheduler wakes long-polls and counts metrics
there), before any caller's answer (the fsync below, which durable answers wait for, is started
just before it: it is the last step of their way).

Durability (``storage.synchronous``). With FULL, an operation whose answer
promises durability (a submit, a completion, a cancel, a hand-back) is answered
only after the WAL has been fsynced past its commit. The fsync runs on a
thread of its own, once for everything committed since the last one, while the
writer goes on with the next batch: the connection itself runs with
synchronous=NORMAL (crash-safe) and the flusher supplies the per-answer
durability. ``synced()`` lets a reader wait for the same point (a waiter told
that its job ended is told only once that end is on disk). Claims, heartbeats
and output need no fsync of their own: they survive a crash of the process
either way, and a power loss that takes one back is covered by fencing (a lease
names its worker as well as its attempt). With NORMAL, nothing waits for an
fsync.

Reads. Point reads (one job, its events, its output) run on a read connection
on the loop thread: an index lookup is cheaper than the hop to a thread. Reads
that can scan (job lists, counts for metrics and ``why``) go through aiosqlite's
thread so a big table never stalls the loop.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import json
import logging
import os
import random
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import aiosqlite

from orch.core import dag, decisions
from orch.core.concurrency import Holder, OnLimit, skips, to_cancel
from orch.core.cron import Schedule
from orch.core.errors import (
    Conflict,
    IdempotencyKeyReused,
    NotFound,
    OrchError,
    StorageCorrupt,
    StorageError,
    StorageFull,
    UnknownWorker,
    ValidationError,
)
from orch.core.kinds import EXEC, RUNNER_RE
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
    checked_digests,
    dep_info,
    freed_slots,
    like_pattern,
    queue_infos,
    schedule_info,
    schedule_json_text,
    workflow_nodes,
)
from orch.store.base import (
    key_reused as _key_reused,
)
from orch.store.base import (
    queue_depths as _depths,
)
from orch.store.files import db_folder, private_files

log = logging.getLogger("orch.store")

T = TypeVar("T")
# A write: runs in the writer's transaction, appends the job state changes it made to its list.
Op = Callable[[sqlite3.Connection, list[Change]], Any]

_SYNCED = object()  # the value of a synced() caller's place among the answers waiting for an fsync
MAX_QUEUES_PER_CLAIM = 32
INLINE_WEIGHT = 64  # batches touching at most this many jobs commit on the loop thread
CHECKPOINT_EVERY = 200  # committed inline batches between PASSIVE checkpoints (~SQLite's 1,000 pages)
AUTOCHECKPOINT_PAGES = 1000  # SQLite's default, for batches on the writer thread
# A WAL this many frames long after a background checkpoint: under a steady stream of inline
# commits that checkpoint never catches up, and the WAL only restarts from its beginning after
# one that did. The next batch then runs on the writer thread and checkpoints as it commits.
WAL_RESTART_FRAMES = 4000
WAL_SIZE_LIMIT = 32 << 20  # bytes the WAL file is cut back to when it restarts (journal_size_limit)
BIG_READ_BYTES = 128 << 10  # a job's output beyond this is read on the reader thread, not the loop
SMALL_SPEC = 16 << 10  # bytes of spec a claim returns in its own statement; bigger ones are read after it

# State names as SQL text reads them (the names themselves live in orch.core.states only).
_QUEUED, _RUNNING, _RETRYING = JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRYING.value
_SCHEDULED, _BLOCKED, _SKIPPED = JobState.SCHEDULED.value, JobState.BLOCKED.value, JobState.SKIPPED.value
_SUCCEEDED, _FAILED, _CANCELLED = JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value
_ALIVE, _DRAINING = WorkerState.ALIVE.value, WorkerState.DRAINING.value
_LOST, _STOPPED = WorkerState.LOST.value, WorkerState.STOPPED.value


def _sql_set(states: Iterable[enum.Enum]) -> str:
    return "(" + ", ".join(f"'{st.value}'" for st in states) + ")"


_LIVE = _sql_set(sorted(LIVE_WORKERS))
_UNFINISHED = _sql_set(st for st in JobState if not st.terminal)
# The ended states in the order of the partial index jobs_finished (migration 10): a query names them so to use it.
_FINISHED = _sql_set((JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED))


def migrations() -> list[tuple[int, str]]:
    """Every migration as (version, sql), in order; read from the package (works inside a zipapp)."""
    folder = resources.files("orch.store").joinpath("sql", "migrations")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns that version."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    steps = migrations()
    newest = steps[-1][0] if steps else 0
    if current > newest:
        raise ValidationError(
            f"the database is at schema version {current}, newer than this orch knows ({newest}): "
            "upgrade orch", field="storage.path"
        )
    # A migration may make a table again (SQLite adds a constraint no other way): with foreign keys off, as
    # SQLite's procedure for it says, and checked before each commit. (The pragma is a no-op in a transaction.)
    fks = conn.execute("PRAGMA foreign_keys").fetchone()[0]
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        for version, sql in steps:
            if version <= current:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(sql):
                    conn.execute(statement)
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StorageError(f"migration {version} would leave {len(broken)} rows without their job "
                                       f"(first: {tuple(broken[0])}); nothing was changed")
                conn.execute(f"PRAGMA user_version = {int(version)}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        conn.execute(f"PRAGMA foreign_keys={'ON' if fks else 'OFF'}")
    return newest


def _split_sql(script: str) -> list[str]:
    """Statements of a script; sqlite3.complete_statement knows about comments and string literals."""
    statements: list[str] = []
    buf: list[str] = []
    for line in script.splitlines():
        buf.append(line)
        text = "\n".join(buf)
        if sqlite3.complete_statement(text):
            statements.append(text.strip())
            buf = []
    rest = "\n".join(buf).strip()
    if rest and sqlite3.complete_statement(rest + ";"):
        statements.append(rest)
    return [s for s in statements if s.strip(" \n;")]


def _connect(path: Path, synchronous: str, busy_ms: int = 10000) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")  # the first read of the file: a damaged one fails here
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


# SQLite's primary result codes (an exception's sqlite_errorcode & 0xFF) that say something about the files.
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT = 3, 8, 10, 11
_SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 13, 14, 26
_NEARLY_FULL = 256 << 10  # bytes free below which an I/O error is taken for a full disk


def _disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (next to) no space left.

    SQLite says SQLITE_FULL only when a write of the database or WAL itself
    runs out of space; growing the -shm on a full disk is an I/O error
    (SQLITE_IOERR_SHMSIZE), and so is an fsync that found no space.
    """
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return free * st.f_frsize < _NEARLY_FULL


def storage_error(e: BaseException, path: Path) -> BaseException:
    """What a failure of the database's files means to a caller.

    A full disk is StorageFull (507: it passes once space is freed), a damaged
    file StorageCorrupt, another I/O or permission failure StorageError. An
    orch error (an op's Conflict, NotFound, ...) and anything else (a bug) are
    returned as they are.
    """
    if isinstance(e, OrchError):
        return e
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT) or _disk_full(path):
            return StorageFull(f"no space left on the disk of the database {path} ({e.strerror or e}); free some "
                               "space there: the scheduler carries on by itself once there is")
        return StorageError(f"cannot write the database {path}: {e.strerror or e}")
    if not isinstance(e, sqlite3.Error):
        return e
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    if code == _SQLITE_FULL or (code == _SQLITE_IOERR and _disk_full(path)):
        return StorageFull(f"no space left on the disk of the database {path} ({e}); free some space there: "
                           "the scheduler carries on by itself once there is")
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        # The old -wal must go with the old file: SQLite would replay it into the recovered one.
        return StorageCorrupt(f"the database {path} is damaged ({e}); stop orch and save what it holds with "
                              f"`sqlite3 {path} .recover | sqlite3 {path}.recovered`, then move {path} and its "
                              f"-wal and -shm files away and put {path}.recovered in its place")
    if code in (_SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN):
        return StorageError(f"cannot use the database {path}: {e}")
    return e


# --------------------------------------------------------------------------- rows to records


# What a listing reads of a job: never its spec, which may be large (scheduler.max_spec_bytes).
TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)  # those the index jobs_finished has


def _job_filter(state: JobState | None, queue: str | None, name: str | None, label: tuple[str, str] | None,
                text: str | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if state is not None:
        where.append("state = ?")
        params.append(str(state))
    if queue is not None:
        where.append("queue = ?")
        params.append(queue)
    if name is not None:
        where.append("name = ?")
        params.append(name)
    if label is not None:
        # A label key is a NAME (letters, digits, . _ -): quoted as a JSON path member it cannot break out.
        where.append("json_extract(spec, ?) = ?")
        params += ['$.labels."' + label[0] + '"', label[1]]
    if text is not None:
        where.append("(lower(name) LIKE ? ESCAPE '\\' OR lower(command) LIKE ? ESCAPE '\\')")
        params += [like_pattern(text)] * 2
    return where, params


SUMMARY_COLUMNS = ("id, state, queue, priority, name, command, attempt, max_attempts, created_at, started_at,"
                   " finished_at, run_at, worker_id, cancel_requested, exit_code, error")
_JOB_STATE = JobState._value2member_map_  # a state by its stored name, without the enum's call machinery
_OUTCOME = Outcome._value2member_map_


def job_of(r: sqlite3.Row) -> Job:
    """A row holding SUMMARY_COLUMNS (by name) as a Job."""
    return Job(r["id"], _JOB_STATE[r["state"]], r["queue"], r["priority"], r["name"],  # type: ignore[arg-type]
               r["command"] or "", r["attempt"], r["max_attempts"], r["created_at"], r["started_at"],
               r["finished_at"], r["run_at"], r["worker_id"], bool(r["cancel_requested"]), r["exit_code"],
               r["error"])


def _summary(r: sqlite3.Row) -> Job:
    """A row of exactly SUMMARY_COLUMNS, by position (a listing makes a thousand of these)."""
    return Job(r[0], _JOB_STATE[r[1]], r[2], r[3], r[4], r[5] or "", r[6], r[7], r[8], r[9],  # type: ignore[arg-type]
               r[10], r[11], r[12], bool(r[13]), r[14], r[15])


def attempt_of(r: sqlite3.Row) -> Attempt:
    return Attempt(r["attempt"], r["worker_id"], _OUTCOME[r["state"]], r["started_at"],  # type: ignore[arg-type]
                   r["finished_at"], r["exit_code"], r["error"], r["duration"], r["stdout_bytes"],
                   r["stderr_bytes"], r["value"])


def event_of(r: sqlite3.Row) -> Event:
    frm = r["from_state"]
    return Event(r["id"], r["job_id"], r["attempt"], JobState(frm) if frm is not None else None,
                 JobState(r["to_state"]), r["at"], r["reason"])


# --------------------------------------------------------------------------- the store


class SqliteStore:
    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        output_limit: int = 1 << 20,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``clock`` stamps what people read (created_at, events, started_at, retry times);
        ``monotonic`` measures liveness (see ``lease_clock``), so a step of the wall clock
        (NTP, a VM resumed) neither expires leases nor marks workers lost."""
        self.path = Path(path)
        self.synchronous = synchronous
        self.output_limit = output_limit
        self.clock = clock
        self.monotonic = monotonic
        self._anchor = clock() - monotonic()  # set again at open()
        self.rand = rand
        # Called on the loop with every job state change of a batch, once it has committed.
        self.on_commit: Callable[[list[Change]], None] | None = None
        self.on_remote: Callable[[Hint], None] | None = None  # never called: one scheduler per file
        self.shared = False  # orch.db.lock keeps a second scheduler away
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None  # the writer thread, for big batches
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None  # point reads, on the loop thread
        self._reader: aiosqlite.Connection | None = None  # reads that may scan, on their own thread
        self._pending: list[tuple[Op, asyncio.Future[Any], bool]] = []
        self._pending_weight = 0
        # The paused queues: the claim leaves them out. The queues table is the truth; this copy is made at open
        # and changed by pause_queue in the writer's transaction (one scheduler per database: no one else writes).
        self._paused: frozenset[str] = frozenset()
        self._queue_limits: dict[str, int] = {}  # queue -> how many of its jobs may run at once (the queues table's)
        self._kick_handle: asyncio.Handle | None = None
        self._busy = False  # a batch is running on the writer thread
        self._idle_waiters: list[asyncio.Future[None]] = []  # synced() callers waiting for that batch
        self._autockpt = False  # the writer connection's auto-checkpoint is on (thread batches only)
        # fsync of the WAL (FULL): commits are numbered; answers wait until the flushed number reaches theirs.
        self._flusher: ThreadPoolExecutor | None = None
        self._wal_fd: int | None = None
        self._commit_seq = 0
        self._flushed_seq = 0
        self._unflushed: list[tuple[int, asyncio.Future[Any], Any]] = []  # (commit, future, value)
        self._flushing = False
        self.flushes = 0
        # Checkpoints, off the loop.
        self._ckpt_pool: ThreadPoolExecutor | None = None
        self._ckpt_conn: sqlite3.Connection | None = None
        self._ckpt_running: asyncio.Future[Any] | None = None
        self._since_ckpt = 0
        self._writer_checkpoint = False  # the next batch checkpoints on the writer thread (see WAL_RESTART_FRAMES)
        self.batches = 0  # committed write batches, for tests and metrics
        self.ops = 0
        self.inline_batches = 0  # of which ran on the loop thread
        self.checkpoints = 0  # background ones
        self.writer_checkpoints = 0  # ones the writer thread did after a commit, to let the WAL restart

    # ------------------------------------------------------------------ lifecycle

    def lease_clock(self) -> float:
        """The clock of lease expiries and workers' last heartbeats: monotonic, anchored to the wall clock
        when the store opened.

        Values an earlier process stored are then roughly comparable with it (and readable as times),
        though not exactly: that process's wall clock may have stepped, and a reboot restarts the
        monotonic clock. ``recover()`` at start-up brings them into range.
        """
        return self.monotonic() + self._anchor

    async def open(self) -> None:
        """Open (and make or migrate) the database; a failure leaves nothing open and says what is wrong."""
        try:
            await self._open()
        except BaseException as e:
            # Whatever did open must not outlive the failure: the reader's and executors' threads
            # would keep the process alive after its error.
            await self.close()
            mapped = storage_error(e, self.path)
            if mapped is e and isinstance(e, sqlite3.Error):  # another program's database, say
                mapped = StorageError(f"cannot use the database {self.path}: {e}")
            if mapped is e:
                raise
            raise mapped from e

    async def _open(self) -> None:
        self._anchor = self.clock() - self.monotonic()
        db_folder(self.path)
        private_files(self.path)
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orch-writer")

        def setup() -> None:
            # FULL durability comes from our own flusher (see the module doc); the connection
            # needs only NORMAL's crash safety.
            self._wconn = _connect(self.path, "NORMAL")
            try:
                migrate(self._wconn)
            except ValidationError as e:
                raise ValidationError(f"{self.path}: {e.message}", field=e.field) from None
            self._paused = frozenset(r[0] for r in self._wconn.execute("SELECT name FROM queues WHERE paused = 1"))
            self._queue_limits = dict(self._wconn.execute(
                "SELECT name, concurrency FROM queues WHERE concurrency IS NOT NULL").fetchall())
            self._wconn.execute("PRAGMA wal_autocheckpoint=0")
            self._wconn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._wconn.execute("PRAGMA temp_store=MEMORY")
            if self.synchronous == "FULL":
                self._wal_fd = os.open(str(self.path) + "-wal", os.O_RDONLY)
                dir_fd = os.open(str(self.path.parent), os.O_RDONLY)
                try:
                    os.fsync(dir_fd)  # the WAL file's own directory entry
                finally:
                    os.close(dir_fd)
                os.fsync(self._wal_fd)
            # A read connection that must never keep the loop waiting on a lock: it gives up
            # after 50 ms and the read goes to the reader thread instead.
            self._rconn = _connect(self.path, "NORMAL", busy_ms=50)
            self._rconn.execute("PRAGMA query_only=1")

        await self._loop.run_in_executor(self._executor, setup)
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orch-fsync")
        self._ckpt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orch-checkpoint")
        self._reader = await aiosqlite.connect(str(self.path), isolation_level=None)
        self._reader.row_factory = sqlite3.Row
        await self._reader.execute("PRAGMA busy_timeout=10000")

    async def close(self) -> None:
        # Let queued writes finish (and reach the disk) before the threads go away.
        while self._busy or self._pending or self._flushing or self._unflushed or self._kick_handle:
            if self._loop is None:
                break
            try:
                await self._write(lambda c, out: None, durable=True)
            except Exception as e:  # a full disk, say: the threads must go all the same
                log.error("closing the store: the last writes may not be on disk: %s", e)
                break
        if self._ckpt_running is not None:
            with suppress(Exception):
                await asyncio.shield(self._ckpt_running)
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None
        if self._ckpt_pool is not None:
            conn = self._ckpt_conn

            def close_ckpt() -> None:
                if conn is not None:
                    conn.close()

            await asyncio.get_running_loop().run_in_executor(self._ckpt_pool, close_ckpt)
            self._ckpt_pool.shutdown(wait=True)
            self._ckpt_pool = None
            self._ckpt_conn = None
        if self._executor is not None:
            conn = self._wconn

            def shutdown() -> None:
                if conn is not None:
                    try:
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except sqlite3.Error:
                        pass
                    conn.close()

            await asyncio.get_running_loop().run_in_executor(self._executor, shutdown)
            self._executor.shutdown(wait=True)
            self._executor = None
            self._wconn = None
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
            self._flusher = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    # ------------------------------------------------------------------ group commit

    async def _write(self, op: Callable[[sqlite3.Connection, list[Change]], T], durable: bool = False,
                     weight: int = 1) -> T:
        """Run ``op`` in the next batch; with ``durable`` its answer also waits for the fsync.

        ``weight``: about how many jobs the op touches; it decides where the batch runs.
        """
        loop = self._loop
        assert loop is not None, "store is not open"
        fut: asyncio.Future[T] = loop.create_future()
        self._pending.append((op, fut, durable))
        self._pending_weight += weight
        if not self._busy and self._kick_handle is None:
            # At the end of this turn of the loop: every write queued in this turn shares the batch.
            self._kick_handle = loop.call_soon(self._kick)
        return await fut

    def _kick(self) -> None:
        self._kick_handle = None
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        weight, self._pending_weight = self._pending_weight, 0
        ops = [op for op, _, _ in batch]
        if weight <= INLINE_WEIGHT and not self._writer_checkpoint:
            self.inline_batches += 1
            try:
                results = self._run_batch(ops, False)
            except Exception as e:  # as the writer thread's failure does: every caller hears of it
                self._abort()
                results = self._all_failed(e, len(batch))
            self._batch_done(batch, results)
            return
        assert self._executor is not None and self._loop is not None
        self._busy = True
        loop = self._loop
        checkpoint, self._writer_checkpoint = self._writer_checkpoint, False
        cf = self._executor.submit(self._run_batch, ops, True, checkpoint)
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._thread_batch_done, batch, f))

    def _run_batch(self, ops: list[Op], on_thread: bool,
                   checkpoint: bool = False) -> list[tuple[bool, Any, list[Change]]]:
        conn = self._wconn
        assert conn is not None
        out: list[tuple[bool, Any, list[Change]]] = []
        try:
            if conn.in_transaction:
                # A failed batch whose ROLLBACK failed too (a full disk can do that) left its transaction
                # open: end it, or no batch could ever BEGIN again.
                conn.execute("ROLLBACK")
            if on_thread != self._autockpt:
                # Checkpoint as it commits on the writer thread (it may take a while there), never inline.
                conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES if on_thread else 0}")
                self._autockpt = on_thread
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            return self._all_failed(e, len(ops))
        # An op alone in its batch needs no savepoint: if it fails, the batch's transaction is rolled back, which
        # undoes it as alone (two statements less for each lone write: most of them, at low load).
        alone = len(ops) == 1
        for op in ops:
            changes: list[Change] = []
            try:
                if not alone:
                    conn.execute("SAVEPOINT op")
            except sqlite3.Error as e:
                self._abort()
                return self._all_failed(e, len(ops))
            try:
                value = op(conn, changes)
                if not alone:
                    conn.execute("RELEASE op")
                out.append((True, value, changes))
            except Exception as e:  # the op's own error goes back to its caller
                if alone:  # its transaction held nothing else: rolled back, it is undone
                    self._abort()  # (if even that fails, the next batch rolls back first: never a COMMIT of it)
                    out.append((False, storage_error(e, self.path), []))
                    break
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                except sqlite3.Error:
                    # SQLite rolled the whole transaction back itself (a full disk, an I/O error):
                    # nothing of the batch is written, and every caller hears why.
                    self._abort()
                    return self._all_failed(e, len(ops))
                # A full disk may fail one statement only; its op is undone alone and says so (507).
                out.append((False, storage_error(e, self.path), []))
        try:
            if not alone or out[0][0]:  # (not after a lone op that failed: rolled back already)
                # The dependents of the jobs some op ended (sql/migrations/0012) that no op looked at itself.
                last = next((cs for ok, _, cs in reversed(out) if ok), None)
                if last is not None:
                    _decide(conn, self.clock(), last)
                # The keys whose jobs freed a slot in this batch (sql/migrations/0011): their first held jobs are let
                # go, as many as have room, and their queues' waiters woken (one statement on an empty table, mostly).
                freed = conn.execute("DELETE FROM freed_keys RETURNING ckey").fetchall()
                if freed:  # with the changes of an op that went in (what the others did was rolled back)
                    next(cs for ok, _, cs in reversed(out) if ok).extend(_let_go(conn, {r[0] for r in freed}))
                conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._abort()
            return self._all_failed(e, len(ops))
        if checkpoint:  # nothing can commit meanwhile: this one catches up, and the WAL restarts after it
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.writer_checkpoints += 1
            except sqlite3.Error as e:
                log.warning("WAL checkpoint failed: %s", e)
        return out

    def _all_failed(self, e: BaseException, n: int) -> list[tuple[bool, Any, list[Change]]]:
        """A batch that failed as a whole: every caller gets the same error, in what it means to them."""
        return [(False, storage_error(e, self.path), [])] * n

    def _abort(self) -> None:
        """Roll back whatever is left of a failed batch's transaction."""
        conn = self._wconn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                log.error("could not roll back a failed write batch: %s", e)

    def _thread_batch_done(self, batch: list[tuple[Op, asyncio.Future[Any], bool]], f: Any) -> None:
        self._busy = False
        try:
            results = f.result()
        except BaseException as e:  # the thread itself failed: every caller hears of it
            results = self._all_failed(e, len(batch))
        self._batch_done(batch, results)
        idle, self._idle_waiters = self._idle_waiters, []
        for w in idle:
            _settle(w, True, None)

    def _batch_done(self, batch: list[tuple[Op, asyncio.Future[Any], bool]],
                    results: list[tuple[bool, Any, list[Change]]]) -> None:
        self.batches += 1
        self.ops += len(batch)
        self._commit_seq += 1
        seq = self._commit_seq
        settle_now = []
        for (_, fut, durable), (ok, value, _) in zip(batch, results, strict=True):
            if durable and ok and self._wal_fd is not None:
                self._unflushed.append((seq, fut, value))
            else:
                settle_now.append((fut, ok, value))
        if self._unflushed and not self._flushing:
            # The fsync starts before the listener runs: the answers waiting for it are given on a later turn
            # of the loop (after the listener either way), and the fsync is the last step of their path.
            self._flush()
        changes = [c for ok, _, cs in results if ok for c in cs]
        if changes and self._queue_limits:
            changes += freed_slots(changes, self._queue_limits)
        if changes and self.on_commit is not None:
            try:
                self.on_commit(changes)
            except Exception:  # a listener's bug must not keep the callers from their answers
                log.exception("on_commit listener failed")
        for fut, ok, value in settle_now:
            _settle(fut, ok, value)
        self._since_ckpt += 1
        if self._since_ckpt >= CHECKPOINT_EVERY and self._ckpt_running is None:
            self._checkpoint()
        if self._pending and not self._busy and self._kick_handle is None:
            assert self._loop is not None
            self._kick_handle = self._loop.call_soon(self._kick)

    def _flush(self) -> None:
        """fsync the WAL once for every durable answer committed so far, then give the answers."""
        assert self._flusher is not None and self._loop is not None and self._wal_fd is not None
        self._flushing = True
        seq = self._commit_seq
        waiting, self._unflushed = self._unflushed, []
        loop = self._loop
        cf = self._flusher.submit(os.fdatasync, self._wal_fd)
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._flushed, seq, waiting, f))

    def _flushed(self, seq: int, waiting: list[tuple[int, asyncio.Future[Any], Any]], f: Any) -> None:
        self.flushes += 1
        error = f.exception()
        if error is not None:  # an fsync that found no space is a full disk like any other
            error = storage_error(error, self.path)
        if error is None:
            self._flushed_seq = max(self._flushed_seq, seq)
            # Who began to wait while this fsync ran, for a commit it covers, need not wait for another.
            covered = [w for w in self._unflushed if w[0] <= seq]
            if covered:
                waiting = waiting + covered
                self._unflushed = [w for w in self._unflushed if w[0] > seq]
        # Readers first (synced(): a client waiting to be told a job ended), then the writers' own answers (a
        # worker's completion): the callbacks run in this order, and the reader's answer is on a round trip's path.
        for _, fut, value in sorted(waiting, key=lambda w: w[2] is not _SYNCED):
            if error is not None:  # committed but not known to be on disk: do not claim it is
                _settle(fut, False, error)
            else:
                _settle(fut, True, None if value is _SYNCED else value)
        self._flushing = False
        if self._unflushed:
            self._flush()

    async def synced(self) -> None:
        """Wait until everything committed so far is on disk (at once with NORMAL, or when it already is).

        A batch on the writer thread may have committed before the loop hears of it (and numbers it):
        a reader may already see its changes, so it is waited for first.
        """
        if self._wal_fd is None or self._loop is None:
            return
        while self._busy:
            idle: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(idle)
            await idle
        if self._flushed_seq >= self._commit_seq:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._unflushed.append((self._commit_seq, fut, _SYNCED))
        if not self._flushing:
            self._flush()
        await fut

    def _checkpoint(self) -> None:
        """A PASSIVE checkpoint on its own thread and connection: it never blocks the writer."""
        assert self._ckpt_pool is not None and self._loop is not None
        self._since_ckpt = 0

        def run() -> int:
            """The WAL's length in frames, as the checkpoint found it."""
            if self._ckpt_conn is None:
                self._ckpt_conn = _connect(self.path, "NORMAL")
            try:
                return int(self._ckpt_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
            except sqlite3.Error as e:
                log.warning("WAL checkpoint failed: %s", e)
                return 0

        self._ckpt_running = asyncio.wrap_future(self._ckpt_pool.submit(run), loop=self._loop)
        self._ckpt_running.add_done_callback(self._checkpointed)

    def _checkpointed(self, f: asyncio.Future[Any]) -> None:
        self._ckpt_running = None
        self.checkpoints += 1
        if f.cancelled():
            return
        if f.exception() is not None:
            log.warning("WAL checkpoint failed: %s", f.exception())
        elif f.result() >= WAL_RESTART_FRAMES:
            self._writer_checkpoint = True

    # ------------------------------------------------------------------ reads

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read that may scan: on the reader thread."""
        assert self._reader is not None, "store is not open"
        return list(await self._reader.execute_fetchall(sql, params))

    async def _point(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read by key: on the loop thread, unless the file is locked (then on the reader thread)."""
        conn = self._rconn
        assert conn is not None, "store is not open"
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return await self._read(sql, params)

    async def get_job(self, job_id: int, *, with_output: bool = True) -> JobRecord:
        rows = await self._point("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}", field="id")
        row = rows[0]
        attempts = await self._point(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt", (job_id,)
        )
        spec = json.loads(row["spec"])
        rec = JobRecord(job_of(row), spec, [attempt_of(a) for a in attempts], workflow=row["workflow"])
        if "depends_on" in spec:
            rec.dependencies = await self._deps_of(job_id)
        if attempts and with_output:
            last = attempts[-1]
            # A lot of output is read on the reader thread: reading 2 MiB took ~8 ms of the loop.
            read = self._read if last["stdout_kept"] + last["stderr_kept"] > BIG_READ_BYTES else self._point
            chunks = await read(
                "SELECT id, attempt, stream, data, pos, size FROM output WHERE job_id = ? AND attempt = ?"
                " ORDER BY id", (job_id, last["attempt"]),
            )
            rec.output = [OutputPiece(*c) for c in chunks]
        return rec

    async def _deps_of(self, job_id: int) -> list[DepInfo]:
        rows = await self._point(
            "SELECT d.dep_id, d.cond, d.met, d.ref, j.state FROM deps d LEFT JOIN jobs j ON j.id = d.dep_id"
            " WHERE d.job_id = ? ORDER BY d.dep_id", (job_id,))
        return [dep_info(r) for r in rows]

    async def workflow(self, job_id: int) -> tuple[int, list[WorkflowNode]]:
        """The workflow ``job_id`` is part of (its id, and every job of it with its dependencies, by id); NotFound
        if there is no such job, or it is part of no workflow."""
        rows = await self._point("SELECT workflow FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}", field="id")
        wf = rows[0][0]
        if wf is None:  # a job submitted alone, without refs or dependencies: a workflow of one
            rec = await self.get_job(job_id, with_output=False)
            return job_id, [WorkflowNode(rec.job, rec.spec.get("ref"), rec.dependencies)]
        jobs = await self._read(f"SELECT {SUMMARY_COLUMNS}, spec FROM jobs WHERE workflow = ? ORDER BY id", (wf,))
        edges = await self._read(
            "SELECT d.job_id, d.dep_id, d.cond, d.met, d.ref, j.state FROM jobs w JOIN deps d ON d.job_id = w.id"
            " LEFT JOIN jobs j ON j.id = d.dep_id WHERE w.workflow = ? ORDER BY d.job_id, d.dep_id", (wf,))
        return wf, workflow_nodes(((_summary(r), r["spec"]) for r in jobs), edges)

    async def job_state(self, job_id: int) -> tuple[JobState, int]:
        rows = await self._point("SELECT state, attempt FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}", field="id")
        return JobState(rows[0]["state"]), rows[0]["attempt"]

    async def list_jobs(
        self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50,
        cursor: int | None = None, name: str | None = None, label: tuple[str, str] | None = None,
        text: str | None = None, floor: int | None = None,
    ) -> tuple[list[Job], int | None]:
        """Newest first; ``cursor`` is the id below which the next page starts. Summaries, not specs.

        Only the filters given go into the WHERE clause, so each combination has an index that
        gives its rows in id order: (state, id), (queue, state, id), or the table's own.
        """
        below = "" if cursor is None else " AND id < ?"
        params: list[Any]
        if queue is not None and state is None and name is None and label is None and text is None and floor is None:
            # A queue alone: a page from each state's run of (queue, state, id), merged in id order. An
            # index of (queue, id) would give it in one run, but it cost every submit ~4 us more.
            part = f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE queue = ? AND state = ?{below} ORDER BY id DESC LIMIT ?"
            parts = " UNION ALL ".join(f"SELECT * FROM ({part})" for _ in JobState)
            params = []
            for st in JobState:
                params += [queue, st.value, *(() if cursor is None else (cursor,)), limit + 1]
            rows = await self._read(f"SELECT * FROM ({parts}) ORDER BY id DESC LIMIT ?", (*params, limit + 1))
        else:
            # The dashboard's filters (name, label, text) have no index: the scan goes newest first (on the index
            # of the state, or the table's own) and stops at the page's end.
            where, params = _job_filter(state, queue, name, label, text)
            if cursor is not None:
                where.append("id < ?")
                params.append(cursor)
            if floor is not None:
                where.append("id > ?")
                params.append(floor)
            rows = await self._read(
                f"SELECT {SUMMARY_COLUMNS} FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
                + " ORDER BY id DESC LIMIT ?", (*params, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return [_summary(r) for r in rows], (rows[-1]["id"] if more and rows else None)

    async def ended_among(self, job_ids: Sequence[int]) -> tuple[list[Job], list[int]]:
        """Of ``job_ids``: those that have ended, and the ids no job has."""
        ended: list[Job] = []
        found: set[int] = set()
        ids = sorted(set(job_ids))
        for at in range(0, len(ids), 500):  # SQLite's limit on bound values, with room to spare
            part = ids[at:at + 500]
            rows = await self._read(
                f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id IN ({','.join('?' * len(part))})", part)
            for r in rows:
                found.add(r["id"])
                job = _summary(r)
                if job.state.terminal:
                    ended.append(job)
        return ended, [i for i in ids if i not in found]

    async def count_jobs(self, *, state: JobState | None = None, queue: str | None = None, name: str | None = None,
                         label: tuple[str, str] | None = None, text: str | None = None) -> int:
        where, params = _job_filter(state, queue, name, label, text)
        rows = await self._read("SELECT COUNT(*) AS n FROM jobs" + (" WHERE " + " AND ".join(where) if where else ""),
                                params)
        return int(rows[0]["n"])

    async def ended_per_minute(self, since: float) -> list[tuple[int, JobState, int]]:
        out: list[tuple[int, JobState, int]] = []
        for st in TERMINAL_STATES:  # a range of the partial index (state, finished_at) each
            rows = await self._read(
                "SELECT CAST((finished_at - ?) / 60 AS INTEGER) AS m, COUNT(*) AS n FROM jobs"
                " WHERE state = ? AND finished_at >= ? GROUP BY m", (since, st.value, since))
            out += [(r["m"], st, r["n"]) for r in rows]
        return sorted(out, key=lambda t: (t[0], t[1].value))

    async def count_by_state(self) -> dict[JobState, int]:
        rows = await self._read("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {JobState(r["state"]): r["n"] for r in rows}

    # ---- observability: aggregates read once per /metrics scrape, facts for one job's `why`

    async def _busy_by_worker(self, worker_ids: Sequence[str] | None = None) -> dict[str, int]:
        """Running jobs per worker (all workers, or only ``worker_ids``)."""
        if worker_ids is not None and not worker_ids:
            return {}
        sql = "SELECT worker_id, COUNT(*) AS n FROM jobs WHERE state = ?"
        params: tuple[Any, ...] = (JobState.RUNNING.value,)
        if worker_ids is not None:
            sql += " AND worker_id IN (" + ",".join("?" * len(worker_ids)) + ")"
            params += tuple(worker_ids)
        rows = await self._read(sql + " GROUP BY worker_id", params)
        return {r["worker_id"]: r["n"] for r in rows}

    async def _live_loads(self, steady: float, queue: str | None = None) -> list[WorkerLoad]:
        """Live workers (those serving ``queue``, when given) with their running jobs and heartbeat ages."""
        live = await self._read(
            f"SELECT id, name, state, queues, concurrency, last_heartbeat, runners FROM workers WHERE state IN {_LIVE}")
        if queue is not None:
            live = [r for r in live if queue in json.loads(r["queues"])]
        busy = await self._busy_by_worker([r["id"] for r in live]) if live else {}
        return [WorkerLoad(r["id"], r["name"], WorkerState(r["state"]), r["concurrency"], busy.get(r["id"], 0),
                           max(0.0, steady - r["last_heartbeat"]), tuple(json.loads(r["runners"]))) for r in live]

    async def metrics_snapshot(self) -> Snapshot:
        """Jobs by state, unfinished jobs by queue and state, workers by state, live workers' slots and heartbeat ages.

        A handful of GROUP BY reads on the reader connection: meant for a
        scrape every few seconds, never for each job.
        """
        steady = self.lease_clock()  # heartbeat ages: they must not jump with the wall clock
        jobs = await self._read("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        queues = await self._read(
            f"SELECT queue, state, COUNT(*) AS n FROM jobs WHERE state IN {_UNFINISHED} GROUP BY queue, state")
        workers = await self._read("SELECT state, COUNT(*) AS n FROM workers GROUP BY state")
        return Snapshot(
            jobs={JobState(r["state"]): r["n"] for r in jobs},
            queues={(r["queue"], JobState(r["state"])): r["n"] for r in queues},
            workers={WorkerState(r["state"]): r["n"] for r in workers},
            live_workers=await self._live_loads(steady),
        )

    async def why_facts(self, job_id: int) -> JobFacts:
        """What `orch why` needs about one job: its row, its last event and, by state, its queue
        position and the live workers serving its queue, or the worker holding its lease.

        Times are on the wall clock (``now``); the lease's expiry, kept on ``lease_clock``, is
        given as the wall time it falls at if the wall clock does not step meanwhile."""
        now = self.clock()
        steady = self.lease_clock()
        rows = await self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}", field="id")
        row = rows[0]
        job = job_of(row)
        last = await self._read("SELECT * FROM events WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,))
        facts = JobFacts(
            now=now, record=JobRecord(job, json.loads(row["spec"]), []),
            lease_expires_at=(now + row["lease_expires_at"] - steady if row["lease_expires_at"] is not None else None),
            last_event=event_of(last[0]) if last else None,
        )
        facts.queue_paused = not job.state.terminal and job.state is not JobState.RUNNING and job.queue in self._paused
        if job.state in (JobState.BLOCKED, JobState.SKIPPED):
            facts.dependencies = await self._deps_of(job_id)
        if job.state is JobState.QUEUED and row["held"]:
            facts.held = True
            facts.slot_holders = [r[0] for r in await self._read(
                f"SELECT id FROM jobs WHERE ckey = ? AND held = 0 AND state IN ('{_QUEUED}', '{_RUNNING}')"
                f" ORDER BY id LIMIT {SLOT_HOLDERS_SHOWN}", (row["ckey"],))]
        if job.state is JobState.QUEUED:
            ahead = await self._read(  # the jobs to be had before it (not those held back by their key)
                "SELECT COUNT(*) AS n FROM jobs WHERE state = ? AND held = 0 AND queue = ?"
                " AND (priority > ? OR (priority = ? AND id < ?))",
                (JobState.QUEUED.value, job.queue, job.priority, job.priority, job_id),
            )
            total = await self._read("SELECT COUNT(*) AS n FROM jobs WHERE state = ? AND queue = ?",
                                     (JobState.QUEUED.value, job.queue))
            facts.position = ahead[0]["n"] + 1
            facts.queued = total[0]["n"]
            if job.queue in self._queue_limits:
                running = await self._read(f"SELECT COUNT(*) AS n FROM jobs WHERE queue = ? AND state = '{_RUNNING}'",
                                           (job.queue,))
                facts.queue_limit = (self._queue_limits[job.queue], running[0]["n"])
            facts.workers = await self._live_loads(steady, job.queue)
        elif job.state is JobState.SCHEDULED:
            facts.workers = await self._live_loads(steady, job.queue)  # who will take it once it is queued
        elif job.state is JobState.RUNNING and job.worker_id:
            w = await self._read("SELECT id, name, state, concurrency, last_heartbeat FROM workers WHERE id = ?",
                                 (job.worker_id,))
            if w:
                facts.worker = WorkerLoad(w[0]["id"], w[0]["name"], WorkerState(w[0]["state"]), w[0]["concurrency"],
                                          0, max(0.0, steady - w[0]["last_heartbeat"]))
        return facts

    async def events(self, job_id: int, after: int = 0) -> list[Event]:
        rows = await self._point(
            "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
        )
        return [event_of(r) for r in rows]

    async def output_after(self, job_id: int, after: int = 0) -> list[OutputPiece]:
        """Output chunks after chunk ``after``, in the order they were stored."""
        rows = await self._point(
            "SELECT id, attempt, stream, data, pos, size FROM output WHERE job_id = ? AND id > ? ORDER BY id",
            (job_id, after),
        )
        return [OutputPiece(*r) for r in rows]

    async def list_workers(self, retention: float | None = None) -> list[Worker]:
        """Workers in the order they registered. With ``retention``, stopped and lost ones whose last
        heartbeat is older than that many seconds are left out. Only a live worker shows running jobs: a job
        still marked running under a stopped or lost worker is not being run by it."""
        steady = self.lease_clock()
        old = "" if retention is None else f" WHERE w.state IN {_LIVE} OR w.last_heartbeat >= ?"
        rows = await self._read(
            f"SELECT w.*, CASE WHEN w.state IN {_LIVE} THEN (SELECT COUNT(*) FROM jobs j"
            f" WHERE j.worker_id = w.id AND j.state = '{JobState.RUNNING}') ELSE 0 END AS running_jobs FROM workers w"
            + old + " ORDER BY w.registered_at",
            () if retention is None else (steady - retention,),  # last_heartbeat is on lease_clock
        )
        return [Worker(r["id"], r["name"], r["hostname"], json.loads(r["queues"]), r["concurrency"],
                       WorkerState(r["state"]), r["registered_at"], max(0.0, steady - r["last_heartbeat"]),
                       r["running_jobs"], r["metrics"], tuple(json.loads(r["runners"]))) for r in rows]

    async def metrics_targets(self) -> list[MetricsTarget]:
        """Live workers that serve metrics: id, name and the URL they registered, oldest first."""
        rows = await self._read(
            f"SELECT id, name, metrics FROM workers WHERE state IN {_LIVE} AND metrics IS NOT NULL"
            " ORDER BY registered_at"
        )
        return [MetricsTarget(*r) for r in rows]

    async def queues(self) -> list[str]:
        """Every queue name the store knows: its jobs' and those workers registered for (once, at start:
        the DISTINCT scans the jobs table on the reader thread, ~0.4 s for a million jobs)."""
        jobs = await self._read("SELECT DISTINCT queue FROM jobs")
        workers = await self._read("SELECT queues FROM workers")
        return sorted({r["queue"] for r in jobs}.union(*(json.loads(r["queues"]) for r in workers)))

    # ------------------------------------------------------------------ writes

    async def submit(self, specs: Sequence[JobSpec], defaults: RetryPolicy,
                     stored: Sequence[tuple[dict[str, Any], str]] | None = None) -> list[Job]:
        """Queue jobs (or schedule those due later: ``JobSpec.due`` on this store's clock, ``decisions.submitted``;
        or block those with dependencies until they are met); their ids are consecutive, in the order given.
        ``stored``: each spec's stored form and its JSON text, when the caller made them already
        (core.spec.stored_spec)."""
        if not specs:
            return []
        now = self.clock()
        links = _Links.of(specs)
        rows = []
        states: list[JobState] = []
        dues: list[float | None] = []
        for i, spec in enumerate(specs):
            if stored is not None:
                spec_json, text = stored[i]
            else:
                spec_json = stored_spec(spec, defaults)
                text = json.dumps(spec_json, separators=(",", ":"))
            command = spec.command_text[:COMMAND_SHOWN + 1]
            due = spec.due(now)
            state = decisions.submitted(due, now)
            if state is not JobState.SCHEDULED:
                due = None  # due already (a run_at past, a delay of 0): queued now, as if it had none
            waiting = len(spec.depends_on)
            if waiting:  # blocked until its dependencies are met, keeping the time it is due (if it is) in run_at
                state = JobState.BLOCKED
            states.append(state)
            dues.append(due if state is JobState.SCHEDULED else None)
            c = spec.concurrency
            rows.append((spec.queue, spec.priority, text, spec_json["max_attempts"], now, spec.name, command,
                         len(text), state.value, due, c.key if c else None, c.limit if c else None, waiting,
                         int(links is not None and i in links.targets)))
            if i & 1023 == 1023:
                await asyncio.sleep(0)  # a batch of thousands: let the loop serve others meanwhile

        def op(conn: sqlite3.Connection, out: list[Change]) -> tuple[int, dict[int, JobState]]:
            # One statement for all the rows, one for all their events. With AUTOINCREMENT and a
            # single writer the new ids are consecutive, ending at last_insert_rowid().
            conn.executemany(
                "INSERT INTO jobs (queue, priority, spec, max_attempts, created_at, name, command, spec_bytes, state,"
                " run_at, ckey, climit, waiting, fanout, held) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,"
                f" ?12, ?13, ?14, {_HELD_AT_INSERT})", rows)
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            first = last - len(rows) + 1
            conn.execute(
                "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                " SELECT id, 0, NULL, state, ?, ? FROM jobs WHERE id BETWEEN ? AND ? ORDER BY id",
                (now, decisions.SUBMITTED, first, last))
            out.extend(Change(first + i, states[i].value, spec.queue, 0, due=dues[i]) for i, spec in enumerate(specs))
            moved = links.link(conn, list(range(first, last + 1)), [True] * len(rows), now, out) if links else {}
            return first, moved

        if any(spec.idempotency_key is not None or spec.rate_keys or _decides_at_submit(spec) for spec in specs):
            return await self._submit_each(specs, rows, now, links)
        first, moved = await self._write(op, durable=True, weight=len(specs))
        return [Job(first + i, moved.get(first + i, states[i]), r[0], r[1], r[5], r[6], 0, r[3], now, None, None,
                    r[9], None, False, None, None) for i, r in enumerate(rows)]

    async def _submit_each(self, specs: Sequence[JobSpec], rows: list[tuple[Any, ...]], now: float,
                           links: _Links | None) -> list[Job]:
        """A submit where some jobs carry an idempotency key or name rate limits, a row at a time.

        A keyed row is inserted unless the unique index has its key already; then the kept job with it is the
        answer (when its spec is the same) or the submit is refused, whole (IdempotencyKeyReused). A job naming
        rate limits reserves a start on each (decisions.rated): queued if they allow it now, else scheduled for
        the first time they do; a replayed keyed job takes nothing from them. A limit no one made refuses the
        submit, naming it."""
        named = sorted({n for spec in specs for n in spec.rate_keys})

        def op(conn: sqlite3.Connection, out: list[Change]) -> list[tuple[int, bool, JobState, float | None]]:
            limits: dict[str, Rate] = {}
            tats: dict[str, float | None] = {}
            if named:
                for r in conn.execute(f"SELECT name, count, per, burst, tat FROM limits WHERE name IN"
                                      f" ({', '.join('?' * len(named))})", named):
                    limits[r[0]], tats[r[0]] = Rate(r[1], r[2], r[3]), r[4]
            moved: dict[str, float] = {}
            got: list[tuple[int, bool, JobState, float | None]] = []
            for i, spec in enumerate(specs):
                row, state, due, reason = rows[i], JobState(rows[i][8]), rows[i][9], decisions.SUBMITTED
                new: dict[str, float] = {}
                key = spec.idempotency_key
                if key is not None and spec.rate_keys:  # a replay takes no start, and needs no limit to exist now
                    old = conn.execute("SELECT id, spec FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
                    if old is not None:
                        if old["spec"] != row[2]:
                            raise IdempotencyKeyReused(_key_reused(key, old["id"]), field="idempotency_key")
                        got.append((old["id"], True, state, due))
                        continue
                for name in spec.rate_keys:
                    if name not in limits:
                        raise NotFound(decisions.unknown_limit(name), field="rate_keys")
                if spec.rate_keys:
                    state, due, reason, new = decisions.rated(spec.due(now), now, spec.rate_keys, limits, tats)
                    row = (*row[:8], state.value, due, *row[10:])
                crowd = _crowd(conn, spec) if _decides_at_submit(spec) and state is JobState.QUEUED else None
                cur = conn.execute(
                    "INSERT INTO jobs (queue, priority, spec, max_attempts, created_at, name, command, spec_bytes,"
                    " state, run_at, ckey, climit, waiting, fanout, idempotency_key, held) VALUES (?1, ?2, ?3, ?4,"
                    f" ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, {_HELD_AT_INSERT})"
                    " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING", (*row, key))
                if cur.rowcount == 0:
                    old = conn.execute("SELECT id, spec FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
                    if old["spec"] != row[2]:
                        raise IdempotencyKeyReused(_key_reused(key, old["id"]), field="idempotency_key")
                    got.append((old["id"], True, state, due))
                    continue
                jid = cur.lastrowid
                assert jid is not None
                tats.update(new)
                moved.update(new)
                _event(conn, jid, 0, None, state, now, reason)
                out.append(Change(jid, state.value, spec.queue, 0, due=due if state is JobState.SCHEDULED else None))
                if crowd is not None:
                    state = _make_room(conn, jid, spec, crowd, now, out)
                got.append((jid, False, state, due))
            if moved:
                conn.executemany("UPDATE limits SET tat = ? WHERE name = ?", [(t, n) for n, t in moved.items()])
            if links is not None:
                after = links.link(conn, [g[0] for g in got], [not g[1] for g in got], now, out)
                got = [(jid, again, after.get(jid, state), due) for jid, again, state, due in got]
            return got

        got = await self._write(op, durable=True, weight=len(specs))
        again = sorted({jid for jid, replayed, _, _ in got if replayed})
        kept: dict[int, Job] = {}
        if again:
            marks = ", ".join("?" * len(again))
            found = await self._read(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id IN ({marks})", again)
            kept = {j.id: j._replace(replayed=True) for j in map(_summary, found)}
        return [kept[jid] if replayed else
                Job(jid, state, r[0], r[1], r[5], r[6], 0, r[3], now, None, None, due, None, False, None, None)
                for (jid, replayed, state, due), r in zip(got, rows, strict=True)]

    async def cancel(self, job_id: int) -> tuple[JobRecord, list[Change]]:
        """Cancel a job: one not running ends cancelled now; a running one is marked, its worker told at its
        next heartbeat, and it ends when the worker reports (or its lease expires). Conflict if it has ended."""
        now = self.clock()

        def op(conn: sqlite3.Connection, out: list[Change]) -> list[Change]:
            row = conn.execute("SELECT state, attempt, queue FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}", field="id")
            state = JobState(row["state"])
            if decisions.cancel(job_id, state) is decisions.CancelAction.ASK_WORKER:
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                out.append(Change(job_id, state.value, row["queue"], row["attempt"]))
            else:
                _move(conn, job_id, row["attempt"], state, decisions.CANCELLED, now, run_at=None)
                out.append(Change(job_id, _CANCELLED, row["queue"], row["attempt"]))
            return list(out)

        changes = await self._write(op, durable=True)
        return await self.get_job(job_id, with_output=False), changes

    async def replay(self, job_ids: Sequence[int], by: str) -> tuple[dict[int, OrchError], list[Change]]:
        """Queue failed and cancelled jobs again with a fresh set of attempts (see Store.replay)."""
        now = self.clock()
        ids = sorted(set(job_ids))

        def op(conn: sqlite3.Connection, out: list[Change]) -> tuple[dict[int, OrchError], list[Change]]:
            refused: dict[int, OrchError] = {}
            rows: dict[int, sqlite3.Row] = {}
            for at in range(0, len(ids), 500):
                part = ids[at:at + 500]
                rows.update((r["id"], r) for r in conn.execute(
                    "SELECT id, state, attempt, queue, spec, EXISTS (SELECT 1 FROM deps WHERE job_id = jobs.id) AS has_deps"
                    f" FROM jobs WHERE id IN ({', '.join('?' * len(part))})",
                    part))
            for jid in ids:
                row = rows.get(jid)
                if row is None:
                    refused[jid] = NotFound(f"no job {jid}", field="id")
                    continue
                state = JobState(row["state"])
                pending, broken = _weigh(conn, jid) if row["has_deps"] else (0, None)
                try:
                    move = decisions.replay(jid, state, by, pending, broken)
                except Conflict as e:
                    refused[jid] = e
                    continue
                fresh = row["attempt"] + int(json.loads(row["spec"])["max_attempts"])
                if row["has_deps"]:
                    conn.execute("UPDATE jobs SET waiting = ? WHERE id = ?", (pending, jid))
                # run_at: its queue wait counts from now (blocked: a release counts it from then)
                _move(conn, jid, row["attempt"], state, move, now, finished_at=None, run_at=now, worker_id=None,
                      lease_expires_at=None, exit_code=None, error=None, max_attempts=fresh, cancel_requested=0)
                out.append(Change(jid, move.to.value, row["queue"], row["attempt"], replay=True))
            _decide(conn, now, out)  # the jobs they had skipped wait on them again
            return refused, list(out)

        return await self._write(op, durable=True, weight=len(ids))

    async def pause_queue(self, queue: str, paused: bool) -> bool:
        """Pause or resume a queue (see Store.pause_queue); the claim reads the paused set this op leaves."""
        now = self.clock()

        def op(conn: sqlite3.Connection, out: list[Change]) -> bool:
            row = conn.execute("SELECT paused FROM queues WHERE name = ?", (queue,)).fetchone()
            if bool(row and row[0]) is paused:
                return False
            conn.execute("INSERT INTO queues (name, paused, updated_at) VALUES (?, ?, ?) ON CONFLICT (name)"
                         " DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at",
                         (queue, int(paused), now))
            self._paused = self._paused | {queue} if paused else self._paused - {queue}
            return True

        try:
            return await self._write(op, durable=True)
        except BaseException:
            # The batch may have failed after the op changed the copy (its commit did not happen): read the truth.
            with suppress(Exception):
                self._paused = frozenset(r[0] for r in await self._read("SELECT name FROM queues WHERE paused = 1"))
            raise

    async def queue_stats(self, names: Sequence[str] | None = None) -> list[QueueInfo]:
        """Queues with unfinished jobs or a setting (or ``names``): counts by state, paused, oldest queued."""
        where, params = "", list(names or ())
        if names is not None:
            where = f" AND queue IN ({', '.join('?' * len(params))})" if params else " AND 0"
        counts = await self._read(
            f"SELECT queue, state, COUNT(*) AS n, MIN(COALESCE(run_at, created_at)) AS oldest, SUM(held) AS held"
            f" FROM jobs WHERE state IN {_UNFINISHED}{where} GROUP BY queue, state", params)
        settings = await self._read("SELECT name, paused, concurrency FROM queues")  # a few rows: queues' settings
        return queue_infos([(r["queue"], r["state"], r["n"], r["oldest"]) for r in counts],
                           {r["name"]: bool(r["paused"]) for r in settings}, names,
                           {r["name"]: r["concurrency"] for r in settings},
                           {r["queue"]: r["held"] for r in counts if r["state"] == _QUEUED and r["held"]})

    async def queue_depths(self) -> tuple[dict[JobState, int], list[QueueInfo]]:
        counts = await self._read("SELECT queue, state, COUNT(*) AS n FROM jobs INDEXED BY jobs_queue_state"
                                  " GROUP BY queue, state")
        settings = await self._read("SELECT name, paused, concurrency FROM queues")
        return _depths([(r["queue"], r["state"], r["n"]) for r in counts],
                       [(r["name"], bool(r["paused"]), r["concurrency"]) for r in settings])

    async def set_queue_concurrency(self, queue: str, limit: int | None) -> bool:
        """See Store.set_queue_concurrency; the claim reads the limits this op leaves (as the paused set)."""
        now = self.clock()

        def op(conn: sqlite3.Connection, out: list[Change]) -> bool:
            row = conn.execute("SELECT concurrency FROM queues WHERE name = ?", (queue,)).fetchone()
            if (row[0] if row else None) == limit:
                return False
            conn.execute("INSERT INTO queues (name, paused, concurrency, updated_at) VALUES (?, 0, ?, ?)"
                         " ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency,"
                         " updated_at = excluded.updated_at", (queue, limit, now))
            limits = dict(self._queue_limits)
            if limit is None:
                limits.pop(queue, None)
            else:
                limits[queue] = limit
            self._queue_limits = limits
            if row is not None and row[0] is not None and (limit is None or limit > row[0]):
                out.append(Change(0, _QUEUED, queue, 0, unheld=True))  # room made: its waiters look again
            return True

        try:
            return await self._write(op, durable=True)
        except BaseException:  # as pause_queue: the copy may be ahead of a batch that did not commit
            with suppress(Exception):
                self._queue_limits = {r[0]: r[1] for r in await self._read(
                    "SELECT name, concurrency FROM queues WHERE concurrency IS NOT NULL")}
            raise

    async def set_limit(self, name: str, rate: Rate) -> bool:
        now = self.clock()

        def op(conn: sqlite3.Connection, out: list[Change]) -> bool:
            made = conn.execute("SELECT 1 FROM limits WHERE name = ?", (name,)).fetchone() is None
            conn.execute("INSERT INTO limits (name, count, per, burst, updated_at) VALUES (?, ?, ?, ?, ?)"
                         " ON CONFLICT (name) DO UPDATE SET count = excluded.count, per = excluded.per,"
                         " burst = excluded.burst, updated_at = excluded.updated_at",
                         (name, rate.count, rate.per, rate.burst, now))
            return made

        return await self._write(op, durable=True)

    async def delete_limit(self, name: str) -> bool:
        def op(conn: sqlite3.Connection, out: list[Change]) -> bool:
            return conn.execute("DELETE FROM limits WHERE name = ?", (name,)).rowcount > 0

        return await self._write(op, durable=True)

    async def limits(self) -> list[LimitInfo]:
        rows = await self._read("SELECT name, count, per, burst, tat FROM limits ORDER BY name")
        return [LimitInfo(r[0], Rate(r[1], r[2], r[3]), r[4]) for r in rows]

    async def purge(self, before: float, states: Sequence[JobState], limit: int) -> tuple[int, float]:
        """Delete up to ``limit`` ended jobs of ``states`` that ended before ``before``, oldest first, with their
        attempts, output and events (see Store.purge). A batch is one write, on the writer thread."""
        wanted = [s.value for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED)
                  if s in states]

        def op(conn: sqlite3.Connection, out: list[Change]) -> tuple[int, float]:
            started = time.perf_counter()
            ids: list[int] = []
            for state in wanted:  # a state at a time, each oldest first (the index is by state, then end time)
                ids += [r[0] for r in conn.execute(
                    f"SELECT id FROM jobs INDEXED BY jobs_finished WHERE state IN {_FINISHED} AND state = ?"
                    " AND finished_at < ? ORDER BY finished_at LIMIT ?", (state, before, limit - len(ids)))]
                if len(ids) >= limit:
                    break
            if ids:
                marks = ", ".join("?" * len(ids))
                for table, column in (("events", "job_id"), ("output", "job_id"), ("attempts", "job_id"),
                                      ("deps", "job_id"), ("jobs", "id")):
                    conn.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)
            return len(ids), time.perf_counter() - started

        if not wanted:
            return 0, 0.0
        return await self._write(op, durable=True, weight=max(limit, INLINE_WEIGHT + 1))

    async def register_worker(
        self, *, name: str, hostname: str, queues: Sequence[str], concurrency: int,
        credential_hash: str | None = None, metrics: str | None = None, runners: Sequence[str] = (EXEC,),
    ) -> str:
        """A new worker, alive; ``credential_hash`` is the SHA-256 of the credential it was issued,
        ``metrics`` the URL of its Prometheus /metrics listener (None: it has none), ``runners`` those it has."""
        now = self.clock()
        heard = self.lease_clock()
        worker_id = "w-" + uuid.uuid4().hex[:12]

        def op(conn: sqlite3.Connection, out: list[Change]) -> None:
            conn.execute(
                "INSERT INTO workers (id, name, hostname, queues, concurrency, state, registered_at,"
                f" last_heartbeat, credential_hash, metrics, runners) VALUES (?, ?, ?, ?, ?, '{_ALIVE}', ?, ?, ?, ?, ?)",
                (worker_id, name, hostname, json.dumps(list(queues)), concurrency, now, heard, credential_hash,
                 metrics, json.dumps(list(runners))),
            )

        await self._write(op)
        return worker_id

    async def worker_credentials(self) -> list[Credential]:
        """Every worker that was issued a credential, with the credential's digest."""
        rows = await self._read(
            "SELECT id, credential_hash, state, queues FROM workers WHERE credential_hash IS NOT NULL")
        return [Credential(r["id"], r["credential_hash"], WorkerState(r["state"]), json.loads(r["queues"]))
                for r in rows]

    async def queued_in(self, queues: Sequence[str]) -> list[str]:
        found = []
        for q in queues:
            if q in self._paused:  # its jobs are not to be had
                continue
            if await self._point(f"SELECT 1 FROM jobs WHERE state = '{_QUEUED}' AND held = 0 AND queue = ? LIMIT 1",
                                 (q,)):
                found.append(q)
        return found

    async def worker_credential(self, worker_id: str) -> Credential | None:
        rows = await self._point("SELECT id, credential_hash, state, queues FROM workers WHERE id = ?"
                                 " AND credential_hash IS NOT NULL", (worker_id,))
        return Credential(rows[0][0], rows[0][1], WorkerState(rows[0][2]), json.loads(rows[0][3])) if rows else None

    async def cluster_tokens(self) -> dict[str, str]:
        return {r[0]: r[1] for r in await self._point("SELECT role, digest FROM tokens")}

    async def put_tokens(self, digests: dict[str, str], *, replace: bool) -> dict[str, str]:
        """One writer: the puts of one file never race (a scheduler of it reads tokens.json instead)."""
        pairs = checked_digests(digests)
        now = self.clock()
        on_conflict = ("DO UPDATE SET digest = excluded.digest, changed_at = excluded.changed_at" if replace
                       else "DO NOTHING")

        def op(conn: sqlite3.Connection, out: list[Change]) -> dict[str, str]:
            conn.executemany(f"INSERT INTO tokens (role, digest, changed_at) VALUES (?, ?, ?) ON CONFLICT (role)"
                             f" {on_conflict}", [(role, d, now) for role, d in pairs])
            return {r[0]: r[1] for r in conn.execute("SELECT role, digest FROM tokens")}

        return await self._write(op)

    async def drain_worker(self, worker_id: str) -> bool:
        def op(conn: sqlite3.Connection, out: list[Change]) -> bool:
            try:
                state = _live_worker(conn, worker_id)
            except UnknownWorker:
                raise NotFound(f"no live worker {worker_id}", field="worker_id") from None
            if state is WorkerState.DRAINING:
                return False
            conn.execute(f"UPDATE workers SET state = '{_DRAINING}' WHERE id = ?", (worker_id,))
            return True

        return await self._write(op)

    async def heartbeat(
        self, worker_id: str, running: Sequence[tuple[int, int]], lease_ttl: float,
        draining: bool = False,
    ) -> HeartbeatReply:
        now = self.lease_clock()  # a heartbeat stamps only liveness: nothing here is shown as a wall time

        def op(conn: sqlite3.Connection, out: list[Change]) -> HeartbeatReply:
            was = _live_worker(conn, worker_id)
            conn.execute(
                "UPDATE workers SET last_heartbeat = ?, running = ?,"
                f" state = CASE WHEN ? THEN '{_DRAINING}' ELSE state END WHERE id = ?",
                (now, len(running), draining, worker_id),
            )
            reply = HeartbeatReply(drain=was is WorkerState.DRAINING and not draining)
            for job_id, attempt in running:
                row = conn.execute(
                    "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND attempt = ?"
                    f" AND state = '{_RUNNING}' AND worker_id = ? RETURNING cancel_requested",
                    (now + lease_ttl, job_id, attempt, worker_id),
                ).fetchone()
                if row is None:
                    reply.stale.append((job_id, attempt))
                elif row[0]:
                    reply.cancel.append((job_id, attempt))
            return reply

        return await self._write(op, weight=max(1, len(running)))

    def _claim_op(self, worker_id: str, queues: Sequence[str], limit: int, lease_ttl: float, now: float,
                  steady: float) -> Op:
        """``now``: the wall clock, for the attempt's start and the events; ``steady``: ``lease_clock()``."""
        check_transition(JobState.QUEUED, JobState.RUNNING)
        qs = list(dict.fromkeys(queues))[:MAX_QUEUES_PER_CLAIM]
        reason = decisions.claimed(worker_id).reason

        def op(conn: sqlite3.Connection, out: list[Change]) -> list[sqlite3.Row]:
            state, runners = _live_worker_runners(conn, worker_id)
            if state is WorkerState.DRAINING:  # it said it is stopping: no new work for it
                return []
            paused, limits = self._paused, self._queue_limits  # as of this op: a change earlier in the batch holds
            if (paused and not paused.isdisjoint(qs)) or (limits and not limits.keys().isdisjoint(qs)):
                # Paused queues are left out; a limited one is asked for no more than it has room for now
                # (counted here: the single writer orders claims, so no other can take that room meanwhile).
                room = {q: limits[q] - conn.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE queue = ? AND state = '{_RUNNING}'", (q,)).fetchone()[0]
                    for q in qs if q in limits and q not in paused}
                served = [q for q in qs if q not in paused and room.get(q, 1) > 0]
                if not served:
                    return []
                some, some_picks = _claim_sql(tuple(served), limit, runners, tuple(sorted(room.items())))
                rows = conn.execute(some, (worker_id, steady + lease_ttl, now, *some_picks)).fetchall()
            else:
                sql, picks = _claim_sql(tuple(qs), limit, runners)
                rows = conn.execute(sql, (worker_id, steady + lease_ttl, now, *picks)).fetchall()
            if rows:
                conn.executemany(
                    "INSERT INTO attempts (job_id, attempt, worker_id, state, started_at)"
                    f" VALUES (?, ?, ?, '{_RUNNING}', ?)",
                    [(r[0], r[1], worker_id, now) for r in rows],
                )
                conn.executemany(
                    "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                    f" VALUES (?, ?, '{_QUEUED}', '{_RUNNING}', ?, ?)",
                    [(r[0], r[1], now, reason) for r in rows],
                )
                out.extend(Change(r[0], _RUNNING, r[3], r[1], worker=worker_id,
                                  queue_wait=max(0.0, now - r[5]) if r[1] == 1 else None) for r in rows)
            return rows

        return op

    async def _leases(self, rows: list[sqlite3.Row]) -> list[Lease]:
        """Claimed rows as the worker gets them, in dispatch order.

        The claim returned the specs of up to SMALL_SPEC bytes; bigger ones are read here, off the loop (a
        spec never changes, so reading it after the commit that claimed its job reads what was claimed)."""
        rows = sorted(rows, key=lambda r: dispatch_order(r[4], r[0]))
        big = [r[0] for r in rows if r[2] is None]
        specs: dict[int, str] = {}
        for at in range(0, len(big), 500):
            part = big[at:at + 500]
            specs.update((r[0], r[1]) for r in await self._read(
                f"SELECT id, spec FROM jobs WHERE id IN ({','.join('?' * len(part))})", part))
        texts = {r[0]: r[2] if r[2] is not None else specs[r[0]] for r in rows}
        wanting = [jid for jid, text in texts.items() if '"depends_on":' in text]
        inputs = await self._inputs(wanting) if wanting else {}
        return [Lease(r[0], r[1], texts[r[0]], r[3], r[5], r[4], inputs.get(r[0])) for r in rows]

    async def _inputs(self, job_ids: list[int]) -> dict[int, str]:
        """What the dependencies of each job left, as the JSON text its inputs file holds:
        ``{ref or id: {"state", "exit_code", "value"}}`` (a value is the JSON text its attempt wrote)."""
        parts: dict[int, list[str]] = {jid: [] for jid in job_ids}
        for at in range(0, len(job_ids), 500):
            part = job_ids[at:at + 500]
            for jid, dep, ref, state, code, value in await self._read(
                    "SELECT d.job_id, d.dep_id, d.ref, j.state, j.exit_code, a.value FROM deps d"
                    " LEFT JOIN jobs j ON j.id = d.dep_id LEFT JOIN attempts a ON a.job_id = d.dep_id"
                    f" AND a.attempt = j.attempt WHERE d.job_id IN ({','.join('?' * len(part))})"
                    " ORDER BY d.job_id, d.dep_id", part):
                parts[jid].append(dag.input_entry(ref or str(dep), state, code, value))
        return {jid: "{" + ",".join(p) + "}" for jid, p in parts.items()}

    async def claim(
        self, worker_id: str, queues: Sequence[str], limit: int, lease_ttl: float,
    ) -> tuple[list[Lease], list[Change]]:
        """Hand up to ``limit`` queued jobs from ``queues`` to the worker, each exactly once.

        A look on the read connection first counts what there is for the worker (up to INLINE_WEIGHT + 1): with
        nothing, it is told so without a write transaction (an idle worker's long-poll asks again after each
        job: that took the loop ~0.15 ms, and the next job's end waited behind it); with a few, the claim weighs
        what it will take, not what it asks for, and commits on the loop (a worker of short jobs asks for a
        hundred and more: its claim of the one job there went to the writer thread, two thread hops on the
        job's way). Nothing is missed by the look: whoever asks has its waiter registered first (the
        scheduler's lease loop), so a job committed after the look wakes it."""
        there = self._claimable(worker_id, queues)
        if there == 0:
            return [], []
        now = self.clock()
        op = self._claim_op(worker_id, queues, limit, lease_ttl, now, self.lease_clock())

        def claiming(conn: sqlite3.Connection, out: list[Change]) -> tuple[list[sqlite3.Row], list[Change]]:
            return op(conn, out), list(out)

        weight = limit if there is None or there > INLINE_WEIGHT else min(limit, there)
        rows, changes = await self._write(claiming, weight=weight)
        return await self._leases(rows), changes

    def _claimable(self, worker_id: str, queues: Sequence[str]) -> int | None:
        """How many jobs the claim may find, up to INLINE_WEIGHT + 1: none if the worker is draining (UnknownWorker
        if it is not live, as the claim says), else the queued jobs of its queues. At least what the claim takes
        (runners, paused queues, limits and held jobs are the claim's to weigh); None when the file cannot be
        read (the claim then decides, and its write reports the error)."""
        conn = self._rconn
        assert conn is not None, "store is not open"
        qs = list(dict.fromkeys(queues))[:MAX_QUEUES_PER_CLAIM]
        try:
            state = _live_worker(conn, worker_id)
            if state is WorkerState.DRAINING:
                return 0
            # Not by runner: the index does not hold it, and a queue of 100,000 jobs of a runner the worker lacks
            # took 40 ms of the loop to count past. (Their claim reads past them on the writer thread, as it did.)
            return int(conn.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state = '{_QUEUED}' AND held = 0 AND queue IN"
                f" ({','.join('?' * len(qs))}) LIMIT ?)", (*qs, INLINE_WEIGHT + 1)).fetchone()[0])
        except sqlite3.Error:  # locked, or worse: the claim's own write says what (StorageCorrupt, ...)
            return None

    async def append_output(self, worker_id: str, chunks: Sequence[OutputChunk]) -> list[bool]:
        limit = self.output_limit

        def op(conn: sqlite3.Connection, out: list[Change]) -> list[bool]:
            return [_append(conn, worker_id, c, limit) for c in chunks]

        return await self._write(op, weight=max(1, len(chunks) // 4, _output_weight(chunks)))

    def _complete_op(self, worker_id: str, results: Sequence[AttemptResult], defaults: RetryPolicy,
                     now: float) -> Callable[[sqlite3.Connection, list[Change]], list[Verdict]]:
        limit = self.output_limit
        rand = self.rand
        check_transition(JobState.RUNNING, JobState.SUCCEEDED)

        def op(conn: sqlite3.Connection, out: list[Change]) -> list[Verdict]:
            answers: list[Verdict] = []
            events: list[tuple[Any, ...]] = []
            for r in results:
                if r.outcome is Outcome.SUCCEEDED:
                    change = _succeed(conn, worker_id, r, now, limit, events)
                else:
                    for c in r.output:
                        if c.job_id == r.job_id and c.attempt == r.attempt:
                            _append(conn, worker_id, c, limit)
                    change = _end_attempt(
                        conn, r.job_id, r.attempt, worker_id, r.outcome, r.exit_code, r.error,
                        r.duration, now, defaults, rand, r.waited, r.value,
                    )
                if change is None:
                    answers.append(Verdict(r.job_id, r.attempt, None))
                else:
                    answers.append(Verdict(r.job_id, r.attempt, _JOB_STATE[change.state]))  # type: ignore[arg-type]
                    out.append(change)
            if events:
                conn.executemany(
                    "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                    f" VALUES (?, ?, '{_RUNNING}', '{_SUCCEEDED}', ?, ?)", events)
            _decide(conn, now, out)  # the dependents these ends let go: a claim in the same op may take them
            return answers

        return op

    async def complete(
        self, worker_id: str, results: Sequence[AttemptResult], defaults: RetryPolicy
    ) -> tuple[list[Verdict], list[Change]]:
        """Record how attempts ended: a verdict for each, with the job's new state, or stale."""
        op = self._complete_op(worker_id, results, defaults, self.clock())

        def completing(conn: sqlite3.Connection, out: list[Change]) -> tuple[list[Verdict], list[Change]]:
            return op(conn, out), list(out)

        return await self._write(completing, durable=True,
                                 weight=len(results) + _output_weight(c for r in results for c in r.output))

    async def complete_and_claim(
        self, worker_id: str, results: Sequence[AttemptResult], defaults: RetryPolicy,
        queues: Sequence[str], limit: int, lease_ttl: float,
    ) -> tuple[list[Verdict], list[Lease]]:
        """``complete`` then ``claim`` in one operation (one savepoint, one commit): the answers and the new jobs.

        A worker that is no longer registered gets UnknownWorker for both: its attempts were
        ended as lost with it, so its completions would all be stale anyway.
        """
        now = self.clock()
        complete = self._complete_op(worker_id, results, defaults, now)
        claim = self._claim_op(worker_id, queues, limit, lease_ttl, now, self.lease_clock())

        def op(conn: sqlite3.Connection, out: list[Change]) -> tuple[list[Verdict], list[sqlite3.Row]]:
            # The claim checks the worker; its UnknownWorker undoes the completions with it.
            return complete(conn, out), claim(conn, out)

        answers, rows = await self._write(
            op, durable=True, weight=len(results) + limit + _output_weight(c for r in results for c in r.output))
        return answers, await self._leases(rows)

    async def hand_back(
        self, worker_id: str, attempts: Sequence[tuple[int, int]], stop: bool
    ) -> list[Change]:
        """A draining worker gives attempts back: they are queued again at once.

        A handed-back attempt does not count against the job's max_attempts.
        With ``stop`` the worker is also marked stopped.
        """
        now = self.clock()
        back = decisions.handed_back(worker_id)

        def op(conn: sqlite3.Connection, out: list[Change]) -> list[Change]:
            _live_worker(conn, worker_id)
            for job_id, attempt in attempts:
                row = conn.execute(
                    "UPDATE attempts SET state = ?, finished_at = ?, error = ? WHERE job_id = ?"
                    f" AND attempt = ? AND state = '{_RUNNING}' AND worker_id = ? RETURNING job_id",
                    (Outcome.HANDED_BACK.value, now, decisions.HANDED_BACK_ERROR, job_id, attempt, worker_id),
                ).fetchone()
                if row is None:
                    continue
                q = _move(conn, job_id, attempt, JobState.RUNNING, back, now, worker_id=None, lease_expires_at=None)
                out.append(Change(job_id, _QUEUED, q, attempt, worker=worker_id,
                                  outcome=Outcome.HANDED_BACK.value))
            if stop:
                conn.execute(f"UPDATE workers SET state = '{_STOPPED}' WHERE id = ?", (worker_id,))
            return list(out)

        return await self._write(op, durable=True, weight=max(1, len(attempts)))

    async def sweep(self, worker_ttl: float, defaults: RetryPolicy) -> Sweep:
        """One reaper pass: mark silent workers lost, end expired leases, queue due retries.

        Silence and leases are judged on ``lease_clock``; retries are due by the wall clock.
        """
        now = self.clock()
        steady = self.lease_clock()
        rand = self.rand

        def op(conn: sqlite3.Connection, changes: list[Change]) -> Sweep:
            out = Sweep()
            lost = conn.execute(
                f"UPDATE workers SET state = '{_LOST}' WHERE state IN ('{_ALIVE}', '{_DRAINING}')"
                " AND last_heartbeat < ? RETURNING id",
                (steady - worker_ttl,),
            ).fetchall()
            out.lost_workers = [r[0] for r in lost]
            expired = conn.execute(
                f"SELECT id, attempt, worker_id FROM jobs WHERE state = '{_RUNNING}'"
                " AND lease_expires_at < ?",
                (steady,),
            ).fetchall()
            orphaned = []
            for wid in out.lost_workers:
                orphaned += conn.execute(
                    f"SELECT id, attempt, worker_id FROM jobs WHERE state = '{_RUNNING}' AND worker_id = ?",
                    (wid,),
                ).fetchall()
            seen = set()
            for row in [*orphaned, *expired]:
                if row["id"] in seen:
                    continue
                seen.add(row["id"])
                why = decisions.lost(row["worker_id"], row["worker_id"] in out.lost_workers)
                change = _end_attempt(conn, row["id"], row["attempt"], row["worker_id"], Outcome.LOST,
                                      None, why, None, now, defaults, rand)
                if change is not None:
                    out.changes.append(change)
            check_transition(JobState.RETRYING, decisions.BACKOFF_OVER.to)
            check_transition(JobState.SCHEDULED, decisions.DUE.to)
            due = conn.execute(
                f"UPDATE jobs INDEXED BY jobs_due SET state = '{_QUEUED}', run_at = NULL, held = {_HELD_NOW}"
                f" WHERE state = '{_RETRYING}'"
                " AND run_at <= ? RETURNING id, attempt, queue",
                (now,),
            ).fetchall()
            if due:
                conn.executemany(
                    "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                    f" VALUES (?, ?, '{_RETRYING}', '{_QUEUED}', ?, ?)",
                    [(r["id"], r["attempt"], now, decisions.BACKOFF_OVER.reason) for r in due],
                )
                out.changes += [Change(r["id"], _QUEUED, r["queue"], r["attempt"]) for r in due]
            # Scheduled jobs whose time came (by jobs_scheduled): queued, keeping in run_at when they were due.
            ready = conn.execute(
                f"UPDATE jobs INDEXED BY jobs_scheduled SET state = '{_QUEUED}', held = {_HELD_NOW}"
                f" WHERE state = '{_SCHEDULED}'"
                " AND run_at <= ?"
                " RETURNING id, attempt, queue, run_at",
                (now,),
            ).fetchall()
            if ready:
                ready.sort(key=lambda r: r[0])
                conn.executemany(
                    "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                    f" VALUES (?, ?, '{_SCHEDULED}', '{_QUEUED}', ?, ?)",
                    [(r[0], r[1], now, decisions.DUE.reason) for r in ready],
                )
                out.changes += [Change(r[0], _QUEUED, r[2], r[1], due=r[3]) for r in ready]
            # The next pass is due at the earliest of both: each MIN one step down its partial index. INDEXED BY,
            # here and above: without statistics SQLite takes jobs_state (state, id) instead and reads every
            # retrying or scheduled job (48 ms a pass for 200,000 jobs scheduled ahead, against 25 us).
            nxt = [conn.execute(f"SELECT MIN(run_at) FROM jobs INDEXED BY {index} WHERE state = '{st}'").fetchone()[0]
                   for st, index in ((_RETRYING, "jobs_due"), (_SCHEDULED, "jobs_scheduled"))]
            out.next_due = min((t for t in nxt if t is not None), default=None)
            changes.extend(out.changes)
            return out

        # It may expire thousands of leases at once (a lost worker, a stall): on the writer thread.
        return await self._write(op, weight=INLINE_WEIGHT + 1)

    # ---- cron schedules

    async def save_schedule(self, sch: Schedule, *, create: bool, last_tick: float | None,
                            next_at: float | None) -> None:
        now = self.clock()
        text = schedule_json_text(sch)

        def op(conn: sqlite3.Connection, out: list[Change]) -> None:
            if create:
                cur = conn.execute(
                    "INSERT INTO schedules (name, definition, paused, created_at, updated_at, last_tick, next_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                    (sch.name, text, int(sch.paused), now, now, last_tick if last_tick is not None else now, next_at))
                if cur.rowcount == 0:
                    raise Conflict(f"a schedule {sch.name!r} exists already: change it (PATCH, orch schedule apply)"
                                   " or delete it first", field="name")
                return
            cur = conn.execute(
                "UPDATE schedules SET definition = ?, paused = ?, updated_at = ?, next_at = ?,"
                " last_tick = COALESCE(?, last_tick) WHERE name = ?",
                (text, int(sch.paused), now, next_at, last_tick, sch.name))
            if cur.rowcount == 0:
                raise NotFound(f"no schedule {sch.name!r}", field="name")

        await self._write(op, durable=True)

    async def delete_schedule(self, name: str) -> bool:
        def op(conn: sqlite3.Connection, out: list[Change]) -> bool:
            return conn.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount > 0

        return bool(await self._write(op, durable=True))

    async def schedules(self, name: str | None = None) -> list[ScheduleInfo]:
        if name is None:
            rows = await self._read(f"SELECT {SCHEDULE_COLUMNS} FROM {SCHEDULE_FROM} ORDER BY s.name")
        else:
            rows = await self._point(f"SELECT {SCHEDULE_COLUMNS} FROM {SCHEDULE_FROM} WHERE s.name = ?", (name,))
            if not rows:
                raise NotFound(f"no schedule {name!r}", field="name")
        return [schedule_info(r) for r in rows]

    async def due_schedules(self, now: float, limit: int) -> list[ScheduleInfo]:
        rows = await self._read(f"SELECT {SCHEDULE_COLUMNS} FROM {SCHEDULE_FROM}"
                                " WHERE s.paused = 0 AND s.next_at IS NOT NULL AND s.next_at <= ?"
                                " ORDER BY s.next_at LIMIT ?", (now, limit))
        return [schedule_info(r) for r in rows]

    async def next_schedule_at(self) -> float | None:
        rows = await self._point("SELECT MIN(next_at) FROM schedules INDEXED BY schedules_due"
                                 " WHERE paused = 0 AND next_at IS NOT NULL")
        return rows[0][0] if rows else None

    async def schedule_ticked(self, name: str, frm: float, last_tick: float, next_at: float | None,
                              last_job: int | None, fired: int, skipped: int, missed: int,
                              missed_at: float | None) -> bool:
        def op(conn: sqlite3.Connection, out: list[Change]) -> bool:
            return conn.execute(
                "UPDATE schedules SET last_tick = ?, next_at = ?, last_job = COALESCE(?, last_job),"
                " fired = fired + ?, skipped = skipped + ?, missed = missed + ?,"
                " last_missed_at = COALESCE(?, last_missed_at) WHERE name = ? AND last_tick = ?",
                (last_tick, next_at, last_job, fired, skipped, missed, missed_at, name, frm)).rowcount > 0

        return bool(await self._write(op, durable=True))

    async def lead(self, holder: str, ttl: float) -> Leadership:
        """The one scheduler of the file leads."""
        return Leadership(True)

    async def resign(self, holder: str) -> None:
        pass

    async def recover(self, grace: float, worker_ttl: float) -> None:
        """After a scheduler start or a stall, give every live lease and worker ``grace`` seconds.

        Workers whose heartbeats were not heard because the scheduler was not
        listening must not be declared dead for it: a worker is lost only after
        ``worker_ttl`` of silence, so its last heartbeat is moved to where that
        silence ends no sooner than the grace does.

        At start-up this also re-bases what an earlier process left on its own
        ``lease_clock``, which may run ahead of ours (its wall clock was stepped
        back, or was wrong before a reboot): no lease is left further ahead than
        one this process could have granted (``max(grace, worker_ttl)``) and no
        heartbeat later than now, so a worker that died meanwhile is still
        found lost within ``max(grace, worker_ttl)``. Within one process both
        bounds hold already.
        """
        now = self.lease_clock()

        def op(conn: sqlite3.Connection, out: list[Change]) -> None:
            conn.execute(
                f"UPDATE jobs SET lease_expires_at = MIN(MAX(lease_expires_at, ?), ?) WHERE state = '{_RUNNING}'",
                (now + grace, now + max(grace, worker_ttl)),
            )
            conn.execute(
                f"UPDATE workers SET last_heartbeat = ? WHERE state IN ('{_ALIVE}', '{_DRAINING}')",
                (now + max(0.0, grace - worker_ttl),),
            )

        await self._write(op, weight=INLINE_WEIGHT + 1)  # every running job: on the writer thread

    async def deregister(self, worker_id: str) -> None:
        def op(conn: sqlite3.Connection, out: list[Change]) -> None:
            conn.execute(f"UPDATE workers SET state = '{_STOPPED}' WHERE id = ? AND state != '{_LOST}'", (worker_id,))

        await self._write(op)


OUTPUT_WEIGHT_BYTES = 2048  # output bytes that weigh as much as one job in a write batch


def _output_weight(chunks: Iterable[OutputChunk]) -> int:
    """How much a write's output weighs: storing 1 MiB took 12 ms here, so a batch holding more than about
    INLINE_WEIGHT * 2 KiB (128 KiB, ~0.7 ms) of output commits on the writer thread, not on the loop."""
    return sum(len(c.data) for c in chunks) // OUTPUT_WEIGHT_BYTES


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


# --------------------------------------------------------------------------- writer-thread helpers
# These run inside the writer's transaction; they never await.


@functools.lru_cache(maxsize=256)
def _claim_sql(qs: tuple[str, ...], limit: int, runners: tuple[str, ...],
               rooms: tuple[tuple[str, int], ...] = ()) -> tuple[str, list[Any]]:
    """The claim's statement over queues ``qs`` and its parameters after the worker's, lease's and start's; a
    queue in ``rooms`` gives at most that many jobs; only jobs of the worker's ``runners`` (checked names,
    written into the statement: it is made once per worker's kind of claim)."""
    room = dict(rooms)
    # Each queue's first jobs in the order of its index (jobs_ready), then the first of those: no queued
    # job is read past them, however many wait (``queue IN (...)`` read and sorted every queued job of
    # the queues as soon as there were two: 20 ms a claim with 100,000 in one of them). Jobs of a runner
    # the worker lacks are passed over (the runner column is read off the rows the index walk meets).
    has = ", ".join(f"'{r}'" for r in runners if RUNNER_RE.fullmatch(r)) or "''"
    one = (f"SELECT id, priority FROM jobs WHERE state = '{_QUEUED}' AND held = 0 AND queue = ?"
           f" AND runner IN ({has}) ORDER BY priority DESC, id LIMIT ?")
    if len(qs) == 1:
        picked, picks = one.replace("id, priority", "id", 1), [qs[0], min(limit, room.get(qs[0], limit))]
    else:
        firsts = " UNION ALL ".join(f"SELECT * FROM ({one})" for _ in qs)
        picked, picks = f"SELECT id FROM ({firsts}) ORDER BY priority DESC, id LIMIT ?", [
            *(v for q in qs for v in (q, min(limit, room.get(q, limit)))), limit]
    sql = (
        f"UPDATE jobs SET state = '{_RUNNING}', attempt = attempt + 1, worker_id = ?,"
        " lease_expires_at = ?, started_at = ?, exit_code = NULL, error = NULL"
        f" WHERE id IN ({picked})"
        # A big spec is read after the commit, on the reader thread (claims commit on the loop). A job queued
        # once its scheduled time came keeps that time in run_at: it has waited in its queue since then.
        f" RETURNING id, attempt, CASE WHEN spec_bytes <= {SMALL_SPEC} THEN spec END, queue, priority,"
        " COALESCE(run_at, created_at)"
    )
    return sql, picks


# Whether a keyed job that becomes queued is held: the others of its key take all of its slots. At its insert
# (parameters ?9 state, ?11 key, ?12 limit: the row is not there yet) and in an UPDATE that queues it (a row
# updated before it by the same statement counts: SQLite's UPDATE goes a row at a time).
_TAKEN = f"held = 0 AND state IN ('{_QUEUED}', '{_RUNNING}')"
# A job of a key that has held jobs waits behind them, even if a slot came free earlier in the same write batch
# (they are let go, in order, as the batch commits: _let_go).
_HELD_AT_INSERT = (f"CASE WHEN ?11 IS NULL OR ?9 <> '{_QUEUED}' THEN 0 ELSE"
                   f" (SELECT COUNT(*) FROM jobs WHERE ckey = ?11 AND {_TAKEN}) >= ?12"
                   f" OR EXISTS (SELECT 1 FROM jobs WHERE ckey = ?11 AND state = '{_QUEUED}' AND held = 1) END")
_OTHERS_TAKE = (f"(SELECT COUNT(*) FROM jobs k WHERE k.ckey = jobs.ckey AND k.held = 0"
                f" AND k.state IN ('{_QUEUED}', '{_RUNNING}') AND k.id <> jobs.id) >= climit")
# A hand-back keeps the slot its job had (_HELD_BACK: the count alone).
_HELD_BACK = f"CASE WHEN ckey IS NULL THEN 0 ELSE {_OTHERS_TAKE} END"
_HELD_NOW = (f"CASE WHEN ckey IS NULL THEN 0 ELSE {_OTHERS_TAKE} OR EXISTS (SELECT 1 FROM jobs k"
             f" WHERE k.ckey = jobs.ckey AND k.state = '{_QUEUED}' AND k.held = 1 AND k.id <> jobs.id) END")


def _let_go(conn: sqlite3.Connection, keys: set[str]) -> list[Change]:
    """Let the first held jobs of ``keys`` go (dispatch order), each one whose limit has room: running and
    unheld queued jobs of its key fewer than it. Returns a wake-up for each (its queue's waiters)."""
    out: list[Change] = []
    for key in sorted(keys):
        (taken,), = conn.execute(f"SELECT COUNT(*) FROM jobs WHERE ckey = ? AND {_TAKEN}", (key,))
        go = []
        for r in conn.execute(f"SELECT id, queue, attempt, climit FROM jobs WHERE ckey = ? AND state = '{_QUEUED}'"
                              " AND held = 1 ORDER BY priority DESC, id LIMIT 1000", (key,)):
            if taken >= r[3]:
                continue  # its own limit (a key's jobs may name different ones) is full: the next may have room
            taken += 1
            go.append(r)
        if go:
            conn.executemany("UPDATE jobs SET held = 0 WHERE id = ?", [(r[0],) for r in go])
            out += [Change(r[0], _QUEUED, r[1], r[2], unheld=True) for r in go]
    return out


class _Links(Links):
    """A submit's dependencies, written by this backend (base.Links)."""

    def link(self, conn: sqlite3.Connection, ids: list[int], fresh: list[bool], now: float,
             out: list[Change]) -> dict[int, JobState]:
        """Write the dependencies of the new jobs (``fresh``; ``ids``: each job's id, a replayed one's the kept
        job's), mark the jobs they name as having dependents, give the new jobs their workflow, and decide at
        once the dependencies on jobs that have ended already. Returns the state of each new job that moved."""
        named = {jid for i, row in enumerate(self.deps) if fresh[i] for jid, _, _ in row if jid is not None}
        named |= {ids[k] for k in self.targets if not fresh[k]}  # a replayed job of the batch: it is an old one
        known: dict[int, tuple[str, int | None]] = {}
        order = sorted(named)
        for at in range(0, len(order), 500):
            part = order[at:at + 500]
            known.update((r[0], (r[1], r[2])) for r in conn.execute(
                f"SELECT id, state, workflow FROM jobs WHERE id IN ({', '.join('?' * len(part))})", part))
        edges = []
        for i, row in enumerate(self.deps):
            if not fresh[i]:
                continue  # a replayed job has its dependencies since its first submit
            for j, (jid, k, on) in enumerate(row):
                if jid is not None and jid not in known:
                    raise NotFound(f"no job {jid} to depend on", field=f"jobs[{i}].depends_on[{j}]")
                edges.append((ids[i], jid if jid is not None else ids[k or 0], on.value,
                              self.specs[k].ref if k is not None else None))
        conn.executemany("INSERT INTO deps (job_id, dep_id, cond, ref) VALUES (?, ?, ?, ?)", edges)
        if named:
            conn.executemany("UPDATE jobs SET fanout = 1 WHERE id = ? AND fanout = 0", [(x,) for x in order])
        new = [ids[i] for i in range(len(ids)) if fresh[i]]
        if new:
            # The workflow of a job added to an earlier one's (it depends on a job of it) is that one's.
            workflow = min((w for _, w in known.values() if w is not None), default=new[0])
            if new[-1] - new[0] + 1 == len(new):
                conn.execute("UPDATE jobs SET workflow = ? WHERE id BETWEEN ? AND ?", (workflow, new[0], new[-1]))
            else:
                conn.executemany("UPDATE jobs SET workflow = ? WHERE id = ?", [(workflow, x) for x in new])
        ended = [x for x in order if JobState(known[x][0]).terminal]
        if ended:
            conn.executemany("INSERT INTO settled (job_id) VALUES (?)", [(x,) for x in ended])
        mark = len(out)
        _decide(conn, now, out)
        return {c.job_id: JobState(c.state) for c in out[mark:]}


def _decide(conn: sqlite3.Connection, now: float, out: list[Change]) -> None:
    """Look at the dependents of the jobs in ``settled`` (sql/migrations/0012: they ended, or a replay queued
    them again), and theirs in turn, until nothing is left to decide: a blocked job whose dependency is met
    counts it, and is queued at its last; one whose dependency can never be met is skipped; a dependency queued
    again is undecided again, and the jobs it had skipped wait on it once more (core.dag). The dependents of one
    end are moved a statement per kind of move (a fan-out of 10,000 is a few statements, not 40,000)."""
    while True:
        ids = sorted({r[0] for r in conn.execute("DELETE FROM settled RETURNING job_id")})
        if not ids:
            return
        for x in ids:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (x,)).fetchone()
            if row is None:
                continue
            st: JobState = _JOB_STATE[row[0]]  # type: ignore[assignment]
            if st.terminal:
                _decided_by_end(conn, x, st, now, out)
                continue
            for jid, met, jstate, attempt, queue, run_at in conn.execute(
                    "SELECT d.job_id, d.met, j.state, j.attempt, j.queue, j.run_at FROM deps d"
                    " JOIN jobs j ON j.id = d.job_id WHERE d.dep_id = ? ORDER BY d.job_id", (x,)).fetchall():
                if jstate == _BLOCKED and met:  # what it met is undecided again
                    conn.execute("UPDATE deps SET met = 0 WHERE job_id = ? AND dep_id = ?", (jid, x))
                    conn.execute("UPDATE jobs SET waiting = waiting + 1 WHERE id = ?", (jid,))
                elif jstate == _SKIPPED:
                    pending, broken = _weigh(conn, jid)
                    if broken is None:  # nothing else it depends on skips it: it waits on them again
                        move = decisions.unskipped(pending, x, run_at, now)
                        conn.execute("UPDATE jobs SET waiting = ? WHERE id = ?", (pending, jid))
                        _move(conn, jid, attempt, JobState.SKIPPED, move, now, finished_at=None,
                              run_at=now if move.to is JobState.QUEUED else run_at)
                        out.append(Change(jid, move.to.value, queue, attempt, unblocked=True))


_IN_JSON = "IN (SELECT value FROM json_each(?))"  # ids given as one JSON array: no limit on how many


def _decided_by_end(conn: sqlite3.Connection, x: int, st: JobState, now: float, out: list[Change]) -> None:
    """Job ``x`` ended ``st``: its blocked dependents whose dependency on it is met count it (and those with no
    other left are released: queued, or scheduled while their due time is ahead), the others are skipped."""
    rows = conn.execute(
        "SELECT d.job_id, d.cond, j.attempt, j.queue, j.run_at FROM deps d JOIN jobs j ON j.id = d.job_id"
        f" WHERE d.dep_id = ? AND d.met = 0 AND j.state = '{_BLOCKED}' ORDER BY d.job_id", (x,)).fetchall()
    if not rows:
        return
    good = [r for r in rows if dag.met(r[1], st)]
    bad = [r for r in rows if not dag.met(r[1], st)]
    if good:
        marks = json.dumps([r[0] for r in good])
        conn.execute(f"UPDATE deps SET met = 1 WHERE dep_id = ? AND job_id {_IN_JSON}", (x, marks))
        left = dict(conn.execute(f"UPDATE jobs SET waiting = waiting - 1 WHERE id {_IN_JSON} RETURNING id, waiting",
                                 (marks,)).fetchall())
        go = [r for r in good if left.get(r[0]) == 0]
        for to in (JobState.QUEUED, JobState.SCHEDULED):
            group = [r for r in go if decisions.dependencies_met(r[4], now).to is to]
            if not group:
                continue
            check_transition(JobState.BLOCKED, to)
            queued = to is JobState.QUEUED  # its wait counts from now; a scheduled one keeps its due time
            conn.execute(f"UPDATE jobs SET state = '{to.value}'" + (f", run_at = ?, held = {_HELD_NOW}" if queued else "")
                         + f" WHERE id {_IN_JSON} AND state = '{_BLOCKED}'",
                         ((now,) if queued else ()) + (json.dumps([r[0] for r in group]),))
            conn.executemany("INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                             f" VALUES (?, ?, '{_BLOCKED}', '{to.value}', ?, ?)",
                             [(r[0], r[2], now, dag.DEPS_MET) for r in group])
            out.extend(Change(r[0], to.value, r[3], r[2], due=None if queued else r[4], unblocked=True) for r in group)
    if bad:
        check_transition(JobState.BLOCKED, JobState.SKIPPED)
        conn.execute(f"UPDATE jobs SET state = '{_SKIPPED}', finished_at = ? WHERE id {_IN_JSON}"
                     f" AND state = '{_BLOCKED}'", (now, json.dumps([r[0] for r in bad])))
        conn.executemany("INSERT INTO events (job_id, attempt, from_state, to_state, at, reason)"
                         f" VALUES (?, ?, '{_BLOCKED}', '{_SKIPPED}', ?, ?)",
                         [(r[0], r[2], now, decisions.dependency_failed(x, st, dag.On(r[1])).reason) for r in bad])
        out.extend(Change(r[0], _SKIPPED, r[3], r[2]) for r in bad)


def _weigh(conn: sqlite3.Connection, jid: int) -> tuple[int, tuple[int, str] | None]:
    """A job's dependencies weighed afresh: how many are undecided, and the first that can never be met (its id
    and state; None if none), with each one's ``met`` brought up to date unless one is."""
    pending = 0
    broken: tuple[int, str] | None = None
    flips: list[tuple[int, int, int]] = []
    for dep, cond, met, state in conn.execute(
            "SELECT d.dep_id, d.cond, d.met, j.state FROM deps d LEFT JOIN jobs j ON j.id = d.dep_id"
            " WHERE d.job_id = ? ORDER BY d.dep_id", (jid,)):
        m = dag.met(cond, state) if state is not None else bool(met)  # a purged dependency: as it was decided
        if m is None:
            pending += 1
            if met:
                flips.append((0, jid, dep))
        elif m:
            if not met:
                flips.append((1, jid, dep))
        elif broken is None:
            broken = (dep, state or "purged")
    if broken is None and flips:
        conn.executemany("UPDATE deps SET met = ? WHERE job_id = ? AND dep_id = ?", flips)
    return pending, broken


def _decides_at_submit(spec: JobSpec) -> bool:
    """A keyed job whose submit weighs its key's slots itself (on_limit skip_new, cancel_running): a row at a time."""
    return spec.concurrency is not None and spec.concurrency.on_limit is not OnLimit.QUEUE


def _crowd(conn: sqlite3.Connection, spec: JobSpec) -> list[Holder]:
    """The jobs of the spec's key that hold a slot (running, queued) or wait for one (held; cancel_running only)."""
    c = spec.concurrency
    assert c is not None
    got = [Holder(r[0], r[1] == _RUNNING, False, bool(r[2])) for r in conn.execute(
        f"SELECT id, state, cancel_requested FROM jobs WHERE ckey = ? AND held = 0 AND state IN ('{_QUEUED}',"
        f" '{_RUNNING}')", (c.key,))]
    if c.on_limit is OnLimit.CANCEL_RUNNING:
        got += [Holder(r[0], False, True) for r in conn.execute(
            f"SELECT id FROM jobs WHERE ckey = ? AND state = '{_QUEUED}' AND held = 1", (c.key,))]
    return got


def _make_room(conn: sqlite3.Connection, jid: int, spec: JobSpec, crowd: list[Holder], now: float,
               out: list[Change]) -> JobState:
    """After the insert of job ``jid`` (held by the trigger if its key is full): on_limit skip_new ends it
    skipped when the key was full; cancel_running cancels the jobs it takes the place of (queued ones now,
    held first; running ones are told at their worker's heartbeat). Returns the new job's state."""
    c = spec.concurrency
    assert c is not None
    if c.on_limit is OnLimit.SKIP_NEW:
        if not skips(c.limit, crowd):
            return JobState.QUEUED
        _move(conn, jid, 0, JobState.QUEUED, decisions.skipped(c, sum(1 for h in crowd if not h.held)), now,
              run_at=None)
        out.append(Change(jid, _SKIPPED, spec.queue, 0))
        return JobState.SKIPPED
    victims = sorted(to_cancel(c.limit, crowd), key=lambda h: (h.running, not h.held, h.id))
    move = decisions.replaced(c.key, jid)
    for h in victims:
        row = conn.execute("SELECT state, attempt, queue FROM jobs WHERE id = ?", (h.id,)).fetchone()
        if row[0] == _RUNNING:
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (h.id,))
            out.append(Change(h.id, _RUNNING, row[2], row[1]))
        else:
            _move(conn, h.id, row[1], JobState(row[0]), move, now, run_at=None)
            out.append(Change(h.id, _CANCELLED, row[2], row[1]))
    return JobState.QUEUED


def _event(conn: sqlite3.Connection, job_id: int, attempt: int, frm: JobState | None, to: JobState,
           at: float, reason: str) -> None:
    conn.execute(
        "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason) VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, attempt, frm.value if frm else None, to.value, at, reason),
    )


_MOVE_COLUMNS = frozenset({"finished_at", "run_at", "worker_id", "lease_expires_at", "exit_code", "error", "max_attempts",
                           "cancel_requested"})


def _move(conn: sqlite3.Connection, job_id: int, attempt: int, frm: JobState, move: decisions.Move, now: float,
          **sets: Any) -> str:
    """The one way a job changes state: checked against the table, conditional, with its event row.

    ``move`` is what the core decided (orch.core.decisions); an ending move stamps finished_at, a retry
    its due time, a refund gives the attempt back to max_attempts. Returns the job's queue. Raises
    Conflict if the job was not in ``frm`` at ``attempt``.
    """
    check_transition(frm, move.to)
    assert set(sets) <= _MOVE_COLUMNS, sets
    if move.ends:
        sets["finished_at"] = now
    if move.retry_in is not None:
        sets["run_at"] = now + move.retry_in
    assignments = "".join(f", {col} = ?" for col in sets)
    if move.refund:
        assignments += ", max_attempts = max_attempts + 1"
    if move.to is JobState.QUEUED:  # queued again: held if its concurrency key is full (or others wait on it)
        assignments += f", held = {_HELD_BACK if frm is JobState.RUNNING else _HELD_NOW}"
    row = conn.execute(
        f"UPDATE jobs SET state = ?{assignments} WHERE id = ? AND state = ? AND attempt = ? RETURNING queue",
        (move.to.value, *sets.values(), job_id, frm.value, attempt),
    ).fetchone()
    if row is None:
        raise Conflict(f"job {job_id} is no longer {frm} at attempt {attempt}")
    _event(conn, job_id, attempt, frm, move.to, now, move.reason)
    return row[0]


def _live_worker_runners(conn: sqlite3.Connection, worker_id: str) -> tuple[WorkerState, tuple[str, ...]]:
    """The worker's state, alive or draining, and the runners it has; UnknownWorker if it is not live."""
    row = conn.execute("SELECT state, runners FROM workers WHERE id = ?", (worker_id,)).fetchone()
    state = WorkerState(row[0]) if row is not None else None
    if state is None or not state.live:
        raise UnknownWorker(f"worker {worker_id} is not registered (or was marked lost): register again",
                            field="worker_id")
    return state, tuple(json.loads(row[1]))


def _live_worker(conn: sqlite3.Connection, worker_id: str) -> WorkerState:
    """The worker's state, alive or draining; UnknownWorker if it is lost, stopped or unknown."""
    row = conn.execute("SELECT state FROM workers WHERE id = ?", (worker_id,)).fetchone()
    state = WorkerState(row[0]) if row is not None else None
    if state is None or not state.live:
        raise UnknownWorker(f"worker {worker_id} is not registered (or was marked lost): register again",
                            field="worker_id")
    return state


def _append(conn: sqlite3.Connection, worker_id: str, c: OutputChunk, limit: int) -> bool:
    """Store one output chunk of a current attempt, keeping at most ~limit bytes per stream.

    The stream's byte count grows by what the worker dropped before the chunk as well, so the
    chunk's ``pos`` says where it starts and a reader can mark the hole.
    """
    if c.stream not in ("stdout", "stderr"):
        return False
    size = len(c.data.encode("utf-8"))
    row = conn.execute(
        f"UPDATE attempts SET {c.stream}_bytes = {c.stream}_bytes + ?, {c.stream}_kept = {c.stream}_kept + ?"
        f" WHERE job_id = ? AND attempt = ? AND state = '{_RUNNING}' AND worker_id = ?"
        f" RETURNING {c.stream}_bytes, {c.stream}_kept",
        (c.skipped + size, size, c.job_id, c.attempt, worker_id),
    ).fetchone()
    if row is None:
        return False
    if size:
        conn.execute(
            "INSERT INTO output (job_id, attempt, stream, data, size, pos) VALUES (?, ?, ?, ?, ?, ?)",
            (c.job_id, c.attempt, c.stream, c.data, size, row[0] - size),
        )
    if row[1] > limit:
        _trim(conn, c.job_id, c.attempt, c.stream, row[1], limit)
    return True


def _trim(conn: sqlite3.Connection, job_id: int, attempt: int, stream: str, kept: int, limit: int) -> None:
    """Drop an attempt's oldest chunks of ``stream`` while what is left still covers the limit: the tail stays."""
    dropped = 0
    for old in conn.execute(
        "SELECT id, size FROM output WHERE job_id = ? AND attempt = ? AND stream = ? ORDER BY id",
        (job_id, attempt, stream),
    ).fetchall():
        if kept - dropped - old["size"] < limit:
            break
        conn.execute("DELETE FROM output WHERE id = ?", (old["id"],))
        dropped += old["size"]
    if dropped:
        conn.execute(
            f"UPDATE attempts SET {stream}_kept = {stream}_kept - ? WHERE job_id = ? AND attempt = ?",
            (dropped, job_id, attempt),
        )


def _succeed(conn: sqlite3.Connection, worker_id: str, r: AttemptResult, now: float, limit: int,
             events: list[tuple[Any, ...]]) -> Change | None:
    """The common end, done in two statements: the attempt (with its output's byte counts) and the job.

    What ``_end_attempt`` + ``_append`` would do for a success, without the reads a
    failure needs (its retry policy): a success ends the job whatever else holds
    (a cancel that came too late included). The job's event row is left in
    ``events`` for the caller to insert with the batch's others.
    """
    chunks = []
    sizes = {"stdout": 0, "stderr": 0}  # bytes stored
    grown = {"stdout": 0, "stderr": 0}  # bytes the stream grew by: stored, and dropped by the worker
    for c in r.output:
        if c.job_id == r.job_id and c.attempt == r.attempt and c.stream in sizes:
            size = len(c.data.encode("utf-8"))
            grown[c.stream] += c.skipped
            if size:
                chunks.append([c.job_id, c.attempt, c.stream, c.data, size, grown[c.stream]])
            sizes[c.stream] += size
            grown[c.stream] += size
    ob, eb = sizes["stdout"], sizes["stderr"]
    row = conn.execute(
        f"UPDATE attempts SET state = '{_SUCCEEDED}', finished_at = ?, exit_code = ?, error = ?, duration = ?,"
        " started_at = MIN(started_at + ?, ?), stdout_bytes = stdout_bytes + ?, stdout_kept = stdout_kept + ?,"
        " stderr_bytes = stderr_bytes + ?, stderr_kept = stderr_kept + ?, value = ?"
        f" WHERE job_id = ? AND attempt = ? AND state = '{_RUNNING}' AND worker_id IS ?"
        " RETURNING started_at, stdout_kept, stderr_kept, stdout_bytes, stderr_bytes",
        (now, r.exit_code, r.error, r.duration, r.waited, now, grown["stdout"], ob, grown["stderr"], eb, r.value,
         r.job_id, r.attempt, worker_id),
    ).fetchone()
    if row is None:
        return None
    started_at = row[0]
    if chunks:
        # Each chunk starts where its stream stood before this report plus what came before it in the
        # report, its own dropped bytes included (the offset held in its last element).
        base = {"stdout": row[3] - grown["stdout"], "stderr": row[4] - grown["stderr"]}
        for ch in chunks:
            ch[5] += base[ch[2]]  # type: ignore[index]  # (ch[2] is the stream's name)
        conn.executemany("INSERT INTO output (job_id, attempt, stream, data, size, pos) VALUES (?, ?, ?, ?, ?, ?)",
                         chunks)
        if row[1] > limit:
            _trim(conn, r.job_id, r.attempt, "stdout", row[1], limit)
        if row[2] > limit:
            _trim(conn, r.job_id, r.attempt, "stderr", row[2], limit)
    job = conn.execute(
        f"UPDATE jobs SET state = '{_SUCCEEDED}', finished_at = ?, lease_expires_at = NULL, exit_code = ?, error = ?,"
        " started_at = CASE WHEN ? THEN ? ELSE started_at END"
        f" WHERE id = ? AND state = '{_RUNNING}' AND attempt = ? RETURNING queue",
        (now, r.exit_code, r.error, r.waited > 0, started_at, r.job_id, r.attempt),
    ).fetchone()
    if job is None:
        # The attempt row said running but the job has moved on (see _end_attempt): the
        # attempt stays ended, the job is not touched.
        return None
    events.append((r.job_id, r.attempt, now, decisions.SUCCEEDED.reason))
    return Change(r.job_id, _SUCCEEDED, job[0], r.attempt, worker=worker_id,
                  outcome=Outcome.SUCCEEDED.value,
                  duration=r.duration if r.duration is not None else max(0.0, now - started_at))


def _end_attempt(
    conn: sqlite3.Connection, job_id: int, attempt: int, worker_id: str | None, outcome: Outcome,
    exit_code: int | None, error: str | None, duration: float | None, now: float,
    defaults: RetryPolicy, rand: Callable[[], float], waited: float = 0.0, value: str | None = None,
) -> Change | None:
    """End a running attempt and move its job on; None if the attempt was not current (stale).

    ``waited``: the worker held the job that long before starting it, so the
    attempt (and the job) really started that much after the claim.
    """
    row = conn.execute(
        "UPDATE attempts SET state = ?, finished_at = ?, exit_code = ?, error = ?, duration = ?,"
        " started_at = MIN(started_at + ?, ?), value = ?"
        f" WHERE job_id = ? AND attempt = ? AND state = '{_RUNNING}' AND worker_id IS ?"
        " RETURNING started_at",
        (outcome.value, now, exit_code, error, duration, waited, now, value, job_id, attempt, worker_id),
    ).fetchone()
    if row is None:
        return None
    if waited:
        conn.execute("UPDATE jobs SET started_at = ? WHERE id = ? AND attempt = ?", (row[0], job_id, attempt))
    job = conn.execute(
        "SELECT queue, max_attempts, spec, cancel_requested FROM jobs WHERE id = ?"
        f" AND state = '{_RUNNING}' AND attempt = ?",
        (job_id, attempt),
    ).fetchone()
    if job is None:
        # The attempt row said running but the job has moved on (an invariant broken
        # elsewhere). The attempt stays ended; the job is not touched. Raising here
        # would roll back a whole reaper pass, again on every tick.
        return None
    spec_text = job["spec"]
    move = decisions.attempt_ended(
        outcome, exit_code, error, attempt, cancel_requested=bool(job["cancel_requested"]),
        policy=lambda: policy_for(json.loads(spec_text), defaults, job["max_attempts"]), rand=rand)
    to = move.to
    _move(conn, job_id, attempt, JobState.RUNNING, move, now, lease_expires_at=None, exit_code=exit_code, error=error)
    return Change(job_id, to.value, job["queue"], attempt, worker=worker_id, outcome=outcome.value,
                  duration=duration if duration is not None else max(0.0, now - row[0]),
                  due=now + move.retry_in if move.retry_in is not None else None)


def _check(store: SqliteStore) -> Store:
    """Never called: mypy checks here that SqliteStore implements the whole Store contract."""
    return store
