"""The worker: join a scheduler, pull work into free slots, run it, report, heartbeat, drain."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from orch.client import Client
from orch.errors import ApiError, OrchError, ServerUnavailable
from orch.metrics import WorkerMetrics
from orch.models import Outcome
from orch.worker.runners import Ended, Run, execute

log = logging.getLogger("orch.worker")

OUTPUT_COALESCE = 0.05  # seconds output waits for more before it is sent while a job runs
MAX_PENDING_OUTPUT = 256 * 1024
# While jobs run, reports go out at most this often, so each carries several results (and the
# scheduler commits them together); an idle worker reports a job's end at once.
REPORT_EVERY = 0.01
MAX_LEASE = 1000  # jobs one lease may ask for (the API's limit)
REPORT_RESULTS = 1000  # results in one report, at most
REPORT_OUTPUT_BYTES = 2 << 20  # output carried by one report's completions, about (the rest goes next)
FINAL_REPORT_TIMEOUT = 10.0  # seconds a stopping worker keeps trying to deliver results
# Jobs shorter than this on average are worth holding a few of in hand: a slot that
# frees then starts the next one at once instead of after a lease round trip.
PREFETCH_BELOW = 0.05
PREFETCH_MAX = 4  # held jobs beyond the slots, at most this many times the concurrency


@dataclass
class WorkerOptions:
    concurrency: int = 4
    queues: tuple[str, ...] = ("default",)
    name: str = ""
    hostname: str = ""
    kill_grace: float = 5.0
    drain_grace: float = 30.0
    long_poll: float = 30.0
    burst: bool = False  # exit once the queue is empty and nothing runs (tests, batch use)
    metrics: str = ""  # host:port of this worker's /metrics listener, told to the scheduler ("": none)


class Backoff:
    """Exponential backoff with full jitter for reconnecting to the scheduler."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap, self.n = base, cap, 0

    def next(self) -> float:
        self.n += 1
        return random.uniform(self.base, min(self.cap, self.base * 2 ** self.n))

    def reset(self) -> None:
        self.n = 0


class Agent:
    def __init__(self, client: Client, options: WorkerOptions) -> None:
        self.client = client
        self.opt = options
        self.worker_id: str | None = None
        self.heartbeat_interval = 2.0
        self.runs: dict[tuple[int, int], Run] = {}
        self.waiting: dict[tuple[int, int], tuple[Run, float]] = {}  # leased, not started: (run, leased at)
        self._avg_duration: float | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = asyncio.Event()
        self.stopped = asyncio.Event()
        # Set when what the lease loop decides on changes: a slot freed, results reported.
        self._lease_wake = asyncio.Event()
        self._report_wake = asyncio.Event()
        self._polling = False  # the lease loop's request is open (a long-poll, maybe)
        self._reporting = False  # a report is on its way
        self._report_failing = False  # the last report did not get through
        self._report_lock = asyncio.Lock()  # one report at a time (the report loop's, the drain's)
        self._last_report = -1e9  # loop time the last report was sent
        self._report_rtt = 0.002  # seconds a report takes to be answered (moving average)
        self._output: dict[tuple[int, int], list[dict[str, Any]]] = {}  # chunks waiting to be sent
        self._output_since: dict[tuple[int, int], float] = {}  # loop time of each attempt's oldest unsent chunk
        self._output_bytes = 0
        self._results: list[dict[str, Any]] = []  # completions waiting to be sent
        self._flush_handle: asyncio.TimerHandle | None = None
        self._lease_task: asyncio.Task[Any] | None = None
        self._registered = asyncio.Event()
        self._register_lock = asyncio.Lock()
        self.lease_ttl = 10.0
        self.metrics = WorkerMetrics(lambda: (len(self.runs), self.opt.concurrency))

    # ------------------------------------------------------------------ public

    async def run(self) -> None:
        """Work until drained (stop()) or, in burst mode, until there is no work left."""
        await self._register()
        loops = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._report_loop(), name="report"),
        ]
        self._lease_task = asyncio.create_task(self._lease_loop(), name="lease")
        try:
            await self._lease_task
            await self._drain()
        finally:
            for t in loops:
                t.cancel()
            for t in loops:
                with suppress(asyncio.CancelledError):
                    await t
            self.stopped.set()

    def stop(self) -> None:
        """Begin draining: take no new work; running jobs get drain_grace to finish."""
        if not self.draining.is_set():
            log.info("worker %s draining", self.worker_id)
            self.draining.set()
            for key in list(self.waiting):  # never started: straight back to the queue
                self._drop_waiting(key, Outcome.HANDED_BACK, "")
            self._lease_wake.set()
            asyncio.ensure_future(self._tell_draining())

    def stop_now(self) -> None:
        """Second signal: hand running jobs back without waiting for them."""
        self.opt.drain_grace = 0
        self.stop()
        for run in list(self.runs.values()):
            run.request_stop(Outcome.HANDED_BACK, "worker stopping")

    # ------------------------------------------------------------------ joining

    async def _register(self) -> None:
        backoff = Backoff()
        extra = {"metrics": self.opt.metrics} if self.opt.metrics else {}
        while True:
            try:
                reply = await self.client.register(
                    name=self.opt.name or f"{self.opt.hostname or socket.gethostname()}-{os.getpid()}",
                    hostname=self.opt.hostname or socket.gethostname(),
                    queues=list(self.opt.queues), concurrency=self.opt.concurrency, **extra,
                )
                break
            except ApiError as e:
                if not (extra and e.http_status == 400 and e.field == "metrics"):
                    raise
                # An older scheduler, or an address it will not take: joining matters more than discovery.
                log.warning("the scheduler refused this worker's metrics address (%s); registering without it",
                            e.message)
                extra = {}
            except ServerUnavailable as e:
                if self.draining.is_set():
                    raise
                delay = backoff.next()
                log.warning("%s; retrying in %.1fs", e.message, delay)
                await asyncio.sleep(delay)
        self.worker_id = reply["worker_id"]
        self.heartbeat_interval = float(reply["heartbeat_interval"])
        self.lease_ttl = float(reply["lease_ttl"])
        self.opt.long_poll = min(self.opt.long_poll, float(reply["long_poll_timeout"]))
        self._registered.set()
        log.info("worker %s joined %s (concurrency %d, queues %s)", self.worker_id, self.client.server,
                 self.opt.concurrency, ",".join(self.opt.queues))

    async def _reregister(self, stale_id: str | None) -> None:
        """The scheduler no longer knows ``stale_id`` (it marked us lost): join again, once.

        Several loops can hear "unknown worker" for the same id; the first one
        joins and the others find the id already replaced. Attempts we still run
        were ended as lost when we were marked lost, so their results would be
        refused; they are stopped.
        """
        async with self._register_lock:
            if self.worker_id != stale_id:
                return
            log.warning("worker %s is unknown to the scheduler; registering again", stale_id)
            self._registered.clear()
            for run in list(self.runs.values()):
                run.request_stop(Outcome.CANCELLED, "superseded: this worker was marked lost")
            for key in list(self.waiting):
                self._drop_waiting(key, None, "")
            await self._register()

    # ------------------------------------------------------------------ pulling work

    def free_slots(self) -> int:
        return self.opt.concurrency - len(self.runs)

    def _prefetch(self) -> int:
        """How many leased jobs to hold beyond the free slots: none for long jobs; for short ones,
        enough to keep every slot busy through one report cycle (the report asks for the next ones)."""
        avg = self._avg_duration
        if self.opt.burst or self.draining.is_set() or avg is None or avg >= PREFETCH_BELOW:
            return 0
        cycle = REPORT_EVERY + self._report_rtt
        return min(PREFETCH_MAX * self.opt.concurrency, math.ceil(self.opt.concurrency * cycle / max(avg, 1e-4)))

    def _wanted(self) -> int:
        return min(MAX_LEASE, self.free_slots() + self._prefetch() - len(self.waiting))

    def held(self) -> list[dict[str, int]]:
        """Every attempt this worker holds a lease on: running or waiting for a slot."""
        return [r.ref for r in self.runs.values()] + [r.ref for r, _ in self.waiting.values()]

    def _deferring(self) -> bool:
        """Results are due or on their way: their report asks for work as it goes, so the lease loop waits
        (unless reports are failing: then it asks on its own)."""
        return (bool(self._results) or self._reporting) and not self._report_failing

    async def _lease_loop(self) -> None:
        backoff = Backoff()
        while not self.draining.is_set():
            free = self._wanted()
            if free <= 0 or self._deferring():
                self._lease_wake.clear()
                if self._wanted() <= 0 or self._deferring():
                    await self._lease_wake.wait()
                continue
            wait = 0.0 if self.opt.burst else self.opt.long_poll
            wid = self.worker_id
            self._polling = True
            try:
                jobs = await self.client.lease(wid or "", self.opt.queues, free, wait)
                backoff.reset()
            except ServerUnavailable as e:
                delay = backoff.next()
                log.warning("%s; retrying in %.1fs", e.message, delay)
                await self._sleep_unless_draining(delay)
                continue
            except ApiError as e:
                if e.code == "unknown_worker":
                    await self._reregister(wid)
                    continue
                raise
            finally:
                self._polling = False
            for job in jobs:
                self._start(job)
            if self.opt.burst and not jobs:
                if not self.runs and not self._deferring():
                    return
                self._lease_wake.clear()
                await self._lease_wake.wait()

    async def _sleep_unless_draining(self, delay: float) -> None:
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.draining.wait(), delay)

    def _start(self, job: dict[str, Any]) -> None:
        run = Run.from_lease(job)
        if self.draining.is_set():  # claimed while we began to stop: straight back to the queue
            self._results.append({"hand_back": True, **run.ref})
            self._report_wake.set()
            return
        if self.free_slots() > 0:
            self._launch(run, 0.0)
        else:
            self.waiting[(run.job_id, run.attempt)] = (run, asyncio.get_running_loop().time())

    def _fill_slots(self) -> None:
        now = asyncio.get_running_loop().time()
        while self.waiting and self.free_slots() > 0:
            key = next(iter(self.waiting))
            run, leased_at = self.waiting.pop(key)
            self._launch(run, now - leased_at)

    def _launch(self, run: Run, waited: float) -> None:
        self.runs[(run.job_id, run.attempt)] = run
        task = asyncio.create_task(self._run(run, waited), name=f"job-{run.job_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _drop_waiting(self, key: tuple[int, int], outcome: Outcome | None, reason: str) -> bool:
        """Take a job that never started out of hand; report it with ``outcome`` (None: just forget it)."""
        item = self.waiting.pop(key, None)
        if item is None:
            return False
        run = item[0]
        if outcome is Outcome.HANDED_BACK:
            self._results.append({"hand_back": True, **run.ref})
        elif outcome is not None:
            self._results.append({**run.ref, "outcome": outcome.value, "exit_code": None, "error": reason,
                                  "duration": 0.0})
        self._report_wake.set()
        return True

    async def _run(self, run: Run, waited: float) -> None:
        # Only the program: arguments (and the job's env) may carry secrets.
        log.debug("job %s attempt %s starting %s", run.job_id, run.attempt, run.argv[0] if run.argv else "?")

        def on_output(stream: str, text: str) -> None:
            key = (run.job_id, run.attempt)
            chunks = self._output.get(key)
            if chunks is None:
                chunks = self._output[key] = []
                self._output_since[key] = asyncio.get_running_loop().time()
            chunks.append({"job_id": run.job_id, "attempt": run.attempt, "stream": stream, "data": text})
            self._output_bytes += len(text)
            if self._output_bytes >= MAX_PENDING_OUTPUT:
                self._report_wake.set()
            elif self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(OUTPUT_COALESCE, self._flush_soon)

        try:
            ended = await execute(run, on_output, self.opt.kill_grace)
        except Exception as e:  # a bug of ours must not leave the attempt hanging
            log.exception("job %s attempt %s: runner failed", run.job_id, run.attempt)
            ended = Ended(Outcome.FAILED, None, f"worker error: {e}", 0.0)
        if ended.outcome is Outcome.HANDED_BACK:
            self._results.append({"hand_back": True, **run.ref})
        else:
            result = {**run.ref, "outcome": ended.outcome.value, "exit_code": ended.exit_code,
                      "error": ended.error, "duration": round(ended.duration, 6)}
            if waited > 0:
                result["waited"] = round(waited, 6)
            self._results.append(result)
        d = ended.duration
        self.metrics.ended(run.queue, ended.outcome.value, d)
        self._avg_duration = d if self._avg_duration is None else 0.8 * self._avg_duration + 0.2 * d
        del self.runs[(run.job_id, run.attempt)]
        self._fill_slots()
        self._lease_wake.set()
        self._report_wake.set()

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self._report_wake.set()

    # ------------------------------------------------------------------ reporting

    async def _report_loop(self) -> None:
        """Send output and completions, in order, batched; keep them while the scheduler is away."""
        await self._registered.wait()
        backoff = self._retry_backoff()
        loop = asyncio.get_running_loop()
        while True:
            await self._report_wake.wait()
            self._report_wake.clear()
            if (self.runs or self.waiting) and not self.draining.is_set():
                # Busy: let the next few ends join this report. Idle: the end goes out at once.
                due = self._last_report + REPORT_EVERY - loop.time()
                if due > 0:
                    await asyncio.sleep(due)
            self._reporting = True
            self._last_report = sent = loop.time()
            try:
                await self._report_once()
                backoff.reset()
                self._report_failing = False
                self._report_rtt = 0.8 * self._report_rtt + 0.2 * (loop.time() - sent)
            except ServerUnavailable as e:
                self._report_failing = True
                delay = backoff.next()
                log.warning("%s; keeping %d results and %d output chunks, retrying in %.1fs",
                            e.message, len(self._results), len(self._output), delay)
                await asyncio.sleep(delay)
                self._report_wake.set()
            except ApiError as e:
                if e.code == "unknown_worker":
                    # Our attempts were ended as lost; what we hold for them would be refused.
                    self._results.clear()
                    self._output.clear()
                    self._output_since.clear()
                    self._output_bytes = 0
                    continue
                self._report_failing = True
                log.error("scheduler refused a report: %s", e.message)
                await asyncio.sleep(backoff.next())
                self._report_wake.set()
            finally:
                self._reporting = False
                self._lease_wake.set()

    async def _report_once(self, everything: bool = False) -> None:
        """One report: live output that has waited long enough, then completions (asking for more work
        when the lease loop is not already asking), then hand-backs. ``everything``: all live output too.

        One at a time: the drain's final reports wait for the report loop's, so nothing goes twice.
        """
        await self._registered.wait()
        async with self._report_lock:
            await self._report_locked(everything)
        if self._results:  # more than one report could carry
            self._report_wake.set()

    def _next_results(self) -> list[dict[str, Any]]:
        """The oldest results, as many as one report may carry."""
        out: list[dict[str, Any]] = []
        size = 0
        for r in self._results[:REPORT_RESULTS]:
            size += sum(len(c["data"]) for c in self._output.get((r["job_id"], r["attempt"]), ()))
            if out and size > REPORT_OUTPUT_BYTES:
                break
            out.append(r)
        return out

    async def _report_locked(self, everything: bool) -> None:
        wid = self.worker_id or ""
        loop = asyncio.get_running_loop()
        # Output of attempts that are still running (or handed back) goes first and
        # alone; output of finished attempts rides with their completion, so it is
        # stored before the attempt is closed. Nothing leaves the buffers until the
        # scheduler has taken it.
        results = self._next_results()
        finished = {(r["job_id"], r["attempt"]) for r in results if not r.get("hand_back")}
        handed = {(r["job_id"], r["attempt"]) for r in results if r.get("hand_back")}
        now = loop.time()
        ripe = now - OUTPUT_COALESCE
        live_keys = [k for k in self._output if k not in finished
                     and (everything or k in handed or self._output_bytes >= MAX_PENDING_OUTPUT
                          or self._output_since[k] <= ripe)]
        if live_keys:
            sent = {k: len(self._output[k]) for k in live_keys}
            await self.client.send_output(wid, [c for k in live_keys for c in self._output[k]])
            for k, n in sent.items():  # more may have come in while we sent
                del self._output[k][:n]
                if not self._output[k]:
                    del self._output[k]
                    del self._output_since[k]
                else:
                    self._output_since[k] = now
        self._output_bytes = sum(len(c["data"]) for cs in self._output.values() for c in cs)
        done = [dict(r, output=self._output.get((r["job_id"], r["attempt"]), []))
                for r in results if not r.get("hand_back")]
        if done:
            wanted = self._wanted()
            if wanted > 0 and not self._polling and not self.draining.is_set():
                _, jobs = await self.client.complete_and_lease(wid, done, self.opt.queues, wanted)
                for job in jobs:
                    self._start(job)
            else:
                await self.client.complete(wid, done)
            for r in done:
                key = (r["job_id"], r["attempt"])
                self._output.pop(key, None)
                self._output_since.pop(key, None)
        backs = [{"job_id": r["job_id"], "attempt": r["attempt"]} for r in results if r.get("hand_back")]
        if backs:
            await self.client.hand_back(wid, backs, stop=False)
        del self._results[:len(results)]
        if self._output and self._flush_handle is None:
            # Live output still too young to send: a report when the oldest of it is ripe.
            oldest = min(self._output_since.values())
            self._flush_handle = loop.call_at(oldest + OUTPUT_COALESCE, self._flush_soon)

    # ------------------------------------------------------------------ heartbeats

    def _retry_backoff(self) -> Backoff:
        # Never wait longer than a heartbeat interval between tries: a scheduler that
        # comes back gives us only the lease TTL to be heard from.
        return Backoff(base=min(0.1, self.heartbeat_interval / 4), cap=self.heartbeat_interval)

    async def _heartbeat_loop(self) -> None:
        await self._registered.wait()
        backoff = self._retry_backoff()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await self._registered.wait()
            wid = self.worker_id
            try:
                reply = await self.client.heartbeat(wid or "", self.held(), self.draining.is_set())
                backoff.reset()
            except ServerUnavailable as e:
                log.warning("heartbeat failed: %s", e.message)
                await asyncio.sleep(backoff.next())
                continue
            except ApiError as e:
                if e.code == "unknown_worker":
                    await self._reregister(wid)
                    continue
                log.error("heartbeat refused: %s", e.message)
                continue
            for ref in reply.get("cancel", []):
                key = (ref["job_id"], ref["attempt"])
                if self._drop_waiting(key, Outcome.CANCELLED, "cancelled by user"):
                    continue
                run = self.runs.get(key)
                if run:
                    log.info("job %s attempt %s cancelled", run.job_id, run.attempt)
                    run.request_stop(Outcome.CANCELLED, "cancelled by user")
            for ref in reply.get("stale", []):
                key = (ref["job_id"], ref["attempt"])
                if self._drop_waiting(key, None, ""):
                    continue
                run = self.runs.get(key)
                if run:
                    log.warning("job %s attempt %s was superseded; stopping it", run.job_id, run.attempt)
                    run.request_stop(Outcome.CANCELLED, "superseded attempt")

    async def _tell_draining(self) -> None:
        with suppress(OrchError):
            if self.worker_id:
                await self.client.heartbeat(self.worker_id, self.held(), True)

    # ------------------------------------------------------------------ draining

    async def _drain(self) -> None:
        if self.runs:
            log.info("waiting up to %.0fs for %d running jobs", self.opt.drain_grace, len(self.runs))
            if self.tasks and self.opt.drain_grace > 0:
                await asyncio.wait(set(self.tasks), timeout=self.opt.drain_grace)
        for run in list(self.runs.values()):
            run.request_stop(Outcome.HANDED_BACK, "worker stopping")
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        # Deliver everything that is left, then say goodbye.
        # Bounded: if the scheduler stays away, the leases of what we could not report
        # expire there and those jobs run again (at-least-once).
        backoff = Backoff(cap=2.0)
        give_up = asyncio.get_running_loop().time() + FINAL_REPORT_TIMEOUT
        while self._results or self._output:
            try:
                await self._report_once(everything=True)
                break
            except ServerUnavailable:
                if asyncio.get_running_loop().time() > give_up:
                    log.error("scheduler unreachable; %d results not delivered", len(self._results))
                    break
                await asyncio.sleep(backoff.next())
            except ApiError:
                break
        with suppress(OrchError):
            if self.worker_id:
                await self.client.hand_back(self.worker_id, [], stop=True)
        log.info("worker %s stopped", self.worker_id)
