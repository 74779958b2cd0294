"""The worker: join a scheduler, pull work into free slots, run it, report, heartbeat, drain."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import socket
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from orch.client import Client, retryable
from orch.core.errors import ApiError, OrchError
from orch.core.states import Outcome
from orch.metrics import WorkerMetrics
from orch.worker import outbox
from orch.worker.outbox import Output, Parcel
from orch.worker.runners import Context, Ended, Run, Runner

log = logging.getLogger("orch.worker")

OUTPUT_COALESCE = 0.05  # seconds output waits for more before it is sent while a job runs
MAX_PENDING_OUTPUT = 256 * 1024  # unsent output (bytes, all attempts) that is sent at once, without waiting
# While jobs run, reports go out at most this often, so each carries several results (and the
# scheduler commits them together); an idle worker reports a job's end at once.
REPORT_EVERY = 0.01
MAX_LEASE = 1000  # jobs one lease may ask for (the API's limit)
FINAL_REPORT_TIMEOUT = 10.0  # seconds a stopping worker keeps trying to deliver results
# Jobs shorter than this on average are worth holding a few of in hand: a slot that
# frees then starts the next one at once instead of after a lease round trip.
PREFETCH_BELOW = 0.05
PREFETCH_MAX = 16  # held jobs beyond the slots, at most this many times the concurrency
# What a scheduler that does not say (an older one) takes: its defaults.
DEFAULT_MAX_BODY = 8 << 20
DEFAULT_OUTPUT_LIMIT = 1 << 20
DEFAULT_MAX_RESULT = 64 << 10  # of a job's result value, until registration says (scheduler.max_result_bytes)
HELD_REF_BYTES = 64  # bytes of JSON one attempt listed in a heartbeat takes, at most (ids of 19 digits)
AUTH_REFUSALS = 3  # credential refusals in a row (each followed by a new registration) before giving up


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
    settings: Any = None  # the worker's settings (config.Settings or a mapping): the runners read theirs
    plugins: tuple[str, ...] = ()  # module paths of plugins (orch/plugins.py), beside the entry points
    runners: dict[str, Runner] | None = None  # made already (tests); else found by orch.plugins.discover


class Backoff:
    """Exponential backoff with full jitter for reconnecting to the scheduler."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap, self.n = base, cap, 0

    def next(self) -> float:
        self.n += 1
        return random.uniform(self.base, min(self.cap, self.base * 2 ** self.n))

    def reset(self) -> None:
        self.n = 0


class Refused(ApiError):
    """The scheduler refuses this worker for good: its join token (and so any new credential) is not accepted."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.http_status, error.code, error.message, error.field)


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
        # What the scheduler has not been told yet: each attempt's unsent output (orch/worker/outbox.py),
        # and ends (completions and hand-backs) in order. Ends on their way are in _sending.
        self.outputs: dict[tuple[int, int], Output] = {}
        self._unsent = 0  # bytes of unsent output, about (exact after each report)
        self._results: list[dict[str, Any]] = []
        self._sending: list[dict[str, Any]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._lease_task: asyncio.Task[Any] | None = None
        self._registered = asyncio.Event()
        self._register_lock = asyncio.Lock()
        self.lease_ttl = 10.0
        # What one request may carry (told at registration; smaller after a 413 or a refused request).
        self.max_body = DEFAULT_MAX_BODY
        self.output_limit = DEFAULT_OUTPUT_LIMIT
        self.max_result = DEFAULT_MAX_RESULT
        self._budget = DEFAULT_MAX_BODY
        self._max_items = outbox.MAX_ITEMS
        self._auth_refusals = 0
        self._bare: set[tuple[int, int]] = set()  # ends the scheduler refused once: sent again without output
        self.fatal: OrchError | None = None  # why the worker gave up (it then drains and run() raises it)
        self.metrics = WorkerMetrics(lambda: (len(self.runs), self.opt.concurrency))
        self.runners: dict[str, Runner] = {}  # those available here, by name (advertised at registration)
        self._all_runners: list[Runner] = []  # every one made (closed at the end)

    async def _start_runners(self) -> None:
        """Make and start each runner found; advertise those that are available. A broken plugin, or a runner
        whose start fails, is reported in one line and left out."""
        settings = self.opt.settings if self.opt.settings is not None else {}
        made = self.opt.runners
        if made is None:
            from orch.plugins import discover

            made = {}
            for found in discover(self.opt.plugins):
                if found.error is not None:
                    log.warning("%s", found.line())
                    continue
                try:
                    made[found.name] = found.runner(settings)
                except Exception as e:  # a plugin's constructor
                    log.warning("runner %s (%s) failed to load and is left out: %s", found.name, found.target, e)
        ctx = Context(self.opt.name or f"{self.opt.hostname or socket.gethostname()}-{os.getpid()}",
                      self.opt.hostname or socket.gethostname(), self.opt.concurrency, settings, log)
        for name, runner in made.items():
            self._all_runners.append(runner)
            try:
                await runner.start(ctx)
                why = runner.unavailable()
            except Exception as e:
                why = f"its start failed: {type(e).__name__}: {e}"
            if why is None:
                self.runners[name] = runner
            else:
                log.info("runner %s is unavailable here: %s", name, why)
        log.info("runners: %s", ", ".join(self.runners) or "none")

    async def _close_runners(self) -> None:
        for runner in self._all_runners:
            try:
                await runner.close()
            except Exception as e:
                log.warning("runner %s did not close cleanly: %s", runner.name, e)

    # ------------------------------------------------------------------ public

    async def run(self) -> None:
        """Work until drained (stop()) or, in burst mode, until there is no work left."""
        await self._start_runners()
        try:
            await self._run_registered()
        finally:
            await self._close_runners()

    async def _run_registered(self) -> None:
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
        if self.fatal is not None:
            raise self.fatal

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

    def _give_up(self, error: OrchError) -> None:
        """A definitive refusal: stop at once, handing back what we hold; run() then raises ``error``."""
        if self.fatal is None:
            self.fatal = error
            log.error("giving up: %s", error.message)
            self.stop_now()

    # ------------------------------------------------------------------ joining

    async def _register(self) -> None:
        """Join the scheduler; every transient failure is waited out. Refused (the join token): Refused."""
        backoff = Backoff()
        extra: dict[str, Any] = {"metrics": self.opt.metrics} if self.opt.metrics else {}
        extra["runners"] = list(self.runners) or ["exec"]
        while True:
            try:
                reply = await self.client.register(
                    name=self.opt.name or f"{self.opt.hostname or socket.gethostname()}-{os.getpid()}",
                    hostname=self.opt.hostname or socket.gethostname(),
                    queues=list(self.opt.queues), concurrency=self.opt.concurrency, **extra,
                )
                break
            except OrchError as e:
                if isinstance(e, ApiError) and e.http_status == 400 and e.field == "runners" and "runners" in extra:
                    # A scheduler of before runners: it hands out command lines only, which every worker runs.
                    log.warning("the scheduler does not know runners (%s); registering without them", e.message)
                    del extra["runners"]
                    continue
                if isinstance(e, ApiError) and "metrics" in extra and e.http_status == 400 and e.field == "metrics":
                    # An older scheduler, or an address it will not take: joining matters more than discovery.
                    log.warning("the scheduler refused this worker's metrics address (%s); registering without it",
                                e.message)
                    extra = {}
                    continue
                if isinstance(e, ApiError) and e.http_status in (401, 403):
                    raise Refused(e) from None
                if not retryable(e) or self.draining.is_set():
                    raise
                delay = backoff.next()
                log.warning("registering: %s; retrying in %.1fs", e.message, delay)
                await asyncio.sleep(delay)
        self.worker_id = reply["worker_id"]
        self.heartbeat_interval = float(reply["heartbeat_interval"])
        self.lease_ttl = float(reply["lease_ttl"])
        self.opt.long_poll = min(self.opt.long_poll, float(reply["long_poll_timeout"]))
        self.max_body = int(reply.get("max_body_bytes") or DEFAULT_MAX_BODY)
        self.output_limit = int(reply.get("output_limit_bytes") or DEFAULT_OUTPUT_LIMIT)
        self.max_result = int(reply.get("max_result_bytes") or DEFAULT_MAX_RESULT)
        self._budget = max(outbox.MIN_BUDGET, self.max_body)
        self._registered.set()
        log.info("worker %s joined %s (concurrency %d, queues %s)", self.worker_id, self.client.server,
                 self.opt.concurrency, ",".join(self.opt.queues))

    async def _reregister(self, stale_id: str | None) -> None:
        """The scheduler no longer knows ``stale_id`` (it marked us lost), or refused its credential: join
        again, once.

        Several loops can hear it for the same id; the first one joins and the others find the id
        already replaced. Attempts we still run belong to the old registration, so their results
        would be refused; they are stopped, and what we hold for them is let go.
        """
        async with self._register_lock:
            if self.worker_id != stale_id or self.fatal is not None:
                return
            log.warning("worker %s is unknown to the scheduler; registering again", stale_id)
            self._registered.clear()
            for run in list(self.runs.values()):
                run.request_stop(Outcome.CANCELLED, "superseded: this worker was marked lost")
            for key in list(self.waiting):
                self._drop_waiting(key, None, "")
            self._forget_reports()
            try:
                await self._register()
            except OrchError as e:  # refused, or not an error worth waiting out: nothing more to do here
                self._registered.set()  # nothing waits on a registration that will never come
                self._give_up(e if isinstance(e, Refused) else Refused(ApiError(403, e.code, e.message, e.field)))

    def _forget_reports(self) -> None:
        """What we hold for attempts of a registration that is gone would be refused: let it go."""
        self._results.clear()
        self.outputs.clear()
        self._unsent = 0

    async def _worker_call_failed(self, e: OrchError, wid: str | None) -> bool:
        """After a call on one of our own routes failed: True if it was dealt with here (we were unknown, or
        our credential was refused: registered again, or gave up), False if the caller should wait and retry."""
        if not isinstance(e, ApiError):
            return False
        if e.code == "unknown_worker":
            await self._reregister(wid)
            return True
        if e.http_status in (401, 403):
            self._auth_refusals += 1
            if self._auth_refusals >= AUTH_REFUSALS:
                self._give_up(Refused(e))
                return True
            log.warning("the scheduler refused worker %s's credential (%s); registering again", wid, e.message)
            await self._reregister(wid)
            return True
        return False

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
        """Every attempt this worker holds a lease on: running, waiting for a slot, or ended with the end
        not delivered yet (its lease must not run out while the report waits)."""
        refs = [r.ref for r in self.runs.values()] + [r.ref for r, _ in self.waiting.values()]
        return refs + [{"job_id": e["job_id"], "attempt": e["attempt"]} for e in (*self._sending, *self._results)]

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
            await self._registered.wait()
            wid = self.worker_id
            self._polling = True
            try:
                jobs = await self.client.lease(wid or "", self.opt.queues, free, wait)
                backoff.reset()
                self._auth_refusals = 0
            except OrchError as e:
                if await self._worker_call_failed(e, wid):
                    continue
                delay = backoff.next()
                log.warning("asking for work: %s; retrying in %.1fs", e.message, delay) if retryable(e) else \
                    log.error("the scheduler refused a lease request: %s; retrying in %.1fs", e.message, delay)
                await self._sleep_unless_draining(delay)
                continue
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
        run.max_result = self.max_result
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

    def _drop_ended(self, key: tuple[int, int]) -> bool:
        """Forget an undelivered end (its attempt was superseded: the scheduler would refuse it)."""
        before = len(self._results)
        self._results = [e for e in self._results if (e["job_id"], e["attempt"]) != key]
        self.outputs.pop(key, None)
        return len(self._results) != before

    async def _run(self, run: Run, waited: float) -> None:
        # Only the program: arguments (and the job's env) may carry secrets.
        log.debug("job %s attempt %s starting %s", run.job_id, run.attempt, run.argv[0] if run.argv else "?")
        key = (run.job_id, run.attempt)
        loop = asyncio.get_running_loop()

        def on_output(stream: str, text: str) -> None:
            out = self.outputs.get(key)
            if out is None:
                out = self.outputs[key] = Output(run.job_id, run.attempt, self.output_limit, loop.time())
            elif not out.chunks:
                out.since = loop.time()
            before = out.nbytes
            out.add(stream, text)  # bounded: the oldest unsent output of a stream goes beyond output_limit
            self._unsent += out.nbytes - before
            if self._unsent >= MAX_PENDING_OUTPUT:
                self._report_wake.set()
            elif self._flush_handle is None:
                self._flush_handle = loop.call_later(OUTPUT_COALESCE, self._flush_soon)

        runner = self.runners.get(run.runner)
        try:
            if runner is None:  # not advertised: the scheduler does not hand such jobs to this worker
                ended = Ended(Outcome.FAILED, None, f"this worker has no runner {run.runner}", 0.0)
            else:
                ended = await runner.execute(run, on_output, self.opt.kill_grace)
        except Exception as e:  # a bug of ours must not leave the attempt hanging
            log.exception("job %s attempt %s: runner failed", run.job_id, run.attempt)
            ended = Ended(Outcome.FAILED, None, f"worker error: {e}", 0.0)
        out = self.outputs.get(key)
        if out is not None and out.dropped:
            log.info("job %s attempt %s: %d bytes of output were not sent (written faster than the scheduler "
                     "took them; kept: the last %d bytes of each stream)", run.job_id, run.attempt, out.dropped,
                     self.output_limit)
        if ended.outcome is Outcome.HANDED_BACK:
            self._results.append({"hand_back": True, **run.ref})
        else:
            result = {**run.ref, "outcome": ended.outcome.value, "exit_code": ended.exit_code,
                      "error": ended.error, "duration": round(ended.duration, 6)}
            if waited > 0:
                result["waited"] = round(waited, 6)
            if ended.value is not None:
                result["value"] = ended.value
            self._results.append(result)
        d = ended.duration
        self.metrics.ended(run.queue, ended.outcome.value, d)
        self._avg_duration = d if self._avg_duration is None else 0.8 * self._avg_duration + 0.2 * d
        del self.runs[key]
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
            wid = self.worker_id
            try:
                await self._report_once()
                backoff.reset()
                self._report_failing = False
                self._auth_refusals = 0
                self._report_rtt = 0.8 * self._report_rtt + 0.2 * (loop.time() - sent)
            except OrchError as e:
                if await self._worker_call_failed(e, wid):
                    continue
                self._report_failing = True
                delay = backoff.next()
                log.warning("reporting: %s; keeping %d results and %d bytes of output, retrying in %.1fs",
                            e.message, len(self._results), self._unsent, delay)
                await asyncio.sleep(delay)
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

    async def _report_locked(self, everything: bool) -> None:
        wid = self.worker_id or ""
        loop = asyncio.get_running_loop()
        budget, max_items = self._budget, self._max_items
        ends = self._results[:max_items]
        del self._results[:len(ends)]
        completions = [e for e in ends if not e.get("hand_back")]
        backs = [e for e in ends if e.get("hand_back")]
        finished = {(e["job_id"], e["attempt"]) for e in completions}
        handed = {(e["job_id"], e["attempt"]) for e in backs}
        # Output of finished attempts rides with their end when both fit in one request (the scheduler
        # then stores it in the transaction that closes the attempt); otherwise it goes ahead on its own.
        # Output of running (or handed-back) attempts goes once it has waited a little.
        ride: list[tuple[dict[str, Any], Output | None]] = []
        ahead: list[Output] = []
        for e in completions:
            out = self.outputs.get((e["job_id"], e["attempt"]))
            if out is not None and not outbox.rides_along(e, out, budget, max_items):
                ahead.append(out)
            ride.append((e, out))
        ripe = loop.time() - OUTPUT_COALESCE
        over = self._unsent >= MAX_PENDING_OUTPUT
        live = [o for k, o in self.outputs.items() if k not in finished and o.chunks
                and (everything or over or k in handed or o.since <= ripe)]
        lease = ""
        if completions:
            wanted = self._wanted()
            if wanted > 0 and not self._polling and not self.draining.is_set():
                lease = f',"lease":{{"max":{wanted},"queues":{json.dumps(list(self.opt.queues))}}}'
        parcels = (outbox.output_parcels([*live, *ahead], budget, max_items)
                   + outbox.result_parcels(ride, budget, max_items, lease)
                   + outbox.back_parcels(backs, budget, max_items))
        self._sending = ends
        try:
            await self._deliver(wid, parcels)
        finally:
            self._sending = []
            self._unsent = sum(o.nbytes for o in self.outputs.values())
        young = [o.since for o in self.outputs.values() if o.chunks]
        if young and self._flush_handle is None:
            # Live output still too young to send: a report when the oldest of it is ripe.
            self._flush_handle = loop.call_at(min(young) + OUTPUT_COALESCE, self._flush_soon)

    async def _deliver(self, wid: str, parcels: list[Parcel]) -> None:
        """Send the parcels in order. When one fails, it and the rest go back (in front of what came since);
        a parcel the scheduler refuses (too large, or invalid) changes how the next ones are made, so no
        request is sent again unchanged and one bad item cannot hold up the others."""
        for i, p in enumerate(parcels):
            try:
                reply = await self.client.post_worker(wid, p.kind, p.body)
            except BaseException as e:
                self._results[:0] = outbox.restore(parcels[i:])
                if isinstance(e, ApiError) and self._refused(p, e):
                    self._report_wake.set()  # made differently now: try again at once
                    return
                raise
            self._delivered(p, reply)

    def _delivered(self, p: Parcel, reply: Any) -> None:
        if p.kind == "output":
            return  # chunks of attempts that are no longer current come back not accepted: nothing to keep
        if p.kind == "complete":
            for result, _, _ in p.results:
                key = (result["job_id"], result["attempt"])
                self.outputs.pop(key, None)
                self._bare.discard(key)
            if p.asks_lease and isinstance(reply, dict):
                for job in reply.get("jobs", []):
                    self._start(job)
            return
        for b in p.backs:
            self.outputs.pop((b["job_id"], b["attempt"]), None)

    def _refused(self, p: Parcel, e: ApiError) -> bool:
        """The scheduler (or something before it) refused a request for what it holds: make the next ones
        smaller, or give up on the one item it will not take. False: not that kind of refusal."""
        if e.http_status == 413 and self._budget > outbox.MIN_BUDGET:
            self._budget = max(outbox.MIN_BUDGET, self._budget // 2)
            log.warning("the scheduler refused a report of %d bytes as too large (%s); sending at most %d "
                        "bytes a request from now on", len(p.body), e.message, self._budget)
            return True
        if e.http_status != 413 and (retryable(e) or e.http_status in (401, 403) or e.code == "unknown_worker"):
            return False
        if p.items > 1:
            self._max_items = max(1, p.items // 2)
            log.warning("the scheduler refused a report (%s); sending at most %d items a request until it "
                        "takes one", e.message, self._max_items)
            return True
        # One item the scheduler will not take, even alone and as small as it can be.
        if p.chunks:
            out, chunk = p.chunks[0]
            if chunk in out.chunks:
                out.chunks.remove(chunk)
                out.unsent[chunk.stream] -= chunk.nbytes
            out.lose(chunk)
            log.error("the scheduler refused %d bytes of output of job %s attempt %s (%s); they are marked "
                      "as not kept", chunk.nbytes, out.job_id, out.attempt, e.message)
        elif p.results:
            result, _, _ = p.results[0]
            key = (result["job_id"], result["attempt"])
            if key not in self._bare:
                # Once more without its output and error text: the end itself is what matters most.
                self.outputs.pop(key, None)
                result["error"] = None
                self._bare.add(key)
                log.error("the scheduler refused the end of job %s attempt %s (%s); sending it without its "
                          "output", result["job_id"], result["attempt"], e.message)
            else:
                self._results = [r for r in self._results if r is not result]
                self.outputs.pop(key, None)
                self._bare.discard(key)
                log.error("the scheduler refused the end of job %s attempt %s (%s); it is dropped, and the "
                          "job runs again once its lease runs out", result["job_id"], result["attempt"], e.message)
        else:
            back = p.backs[0]
            self._results = [r for r in self._results if r is not back]
            log.error("the scheduler refused to take back job %s attempt %s (%s); it runs again once its lease "
                      "runs out", back["job_id"], back["attempt"], e.message)
        self._max_items = outbox.MAX_ITEMS
        return True

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
                reply = await self._beat(wid or "")
                backoff.reset()
                self._auth_refusals = 0
            except OrchError as e:
                if await self._worker_call_failed(e, wid):
                    continue
                if retryable(e):
                    log.warning("heartbeat failed: %s", e.message)
                else:
                    log.error("heartbeat refused: %s", e.message)
                await asyncio.sleep(backoff.next())
                continue
            if reply.get("drain") and not self.draining.is_set():
                log.info("the scheduler asked worker %s to drain", wid)
                self.stop()
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
                if self._drop_waiting(key, None, "") or self._drop_ended(key):
                    continue
                run = self.runs.get(key)
                if run:
                    log.warning("job %s attempt %s was superseded; stopping it", run.job_id, run.attempt)
                    run.request_stop(Outcome.CANCELLED, "superseded attempt")

    async def _beat(self, wid: str) -> dict[str, Any]:
        """One heartbeat, in as many requests as the body budget needs (each lists some of the attempts
        held; a worker holding thousands, or a small scheduler.max_body_bytes, sends several)."""
        held = self.held()
        per = max(1, (self._budget - outbox.OVERHEAD) // HELD_REF_BYTES)
        reply: dict[str, Any] = {"cancel": [], "stale": []}
        for at in range(0, max(1, len(held)), per):
            part = await self.client.heartbeat(wid, held[at:at + per], self.draining.is_set())
            reply["cancel"] += part.get("cancel", [])
            reply["stale"] += part.get("stale", [])
            reply["drain"] = reply.get("drain") or part.get("drain", False)
        return reply

    async def _tell_draining(self) -> None:
        with suppress(OrchError):
            if self.worker_id:
                await self.client.heartbeat(self.worker_id, self.held(), True)

    # ------------------------------------------------------------------ draining

    def _undelivered(self) -> bool:
        """Anything not told yet, or on its way (a report holds the lock: what it carries is out of the lists)."""
        return (self._report_lock.locked() or bool(self._results)
                or any(o.chunks for o in self.outputs.values()))

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
        loop = asyncio.get_running_loop()
        give_up = loop.time() + FINAL_REPORT_TIMEOUT
        while self._undelivered() and loop.time() < give_up:
            try:
                await self._report_once(everything=True)
            except OrchError as e:
                if not retryable(e):
                    break
                await asyncio.sleep(backoff.next())
        if self._undelivered():
            log.error("scheduler unreachable; %d results not delivered", len(self._results))
        with suppress(OrchError):
            if self.worker_id:
                await self.client.hand_back(self.worker_id, [], stop=True)
        log.info("worker %s stopped", self.worker_id)
