"""Shared pieces of the benchmark suite: real orch processes on loopback, CPU readings, statistics, HTTP."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks.chaos import Proc, http, new_tokens, use_tokens, wait_for

ROOT = Path(__file__).resolve().parent.parent
URL_RE = re.compile(r"listening on (http://[^\s]+)")
TERMINAL = ("succeeded", "failed", "cancelled", "skipped")
NON_TERMINAL = ("blocked", "scheduled", "queued", "running", "retrying")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table. ``higher_better`` says which way ``value`` should go against ``target``."""

    figure: str
    target: str
    value: float | None  # orch's figure, in ``unit``
    unit: str
    goal: float | None = None  # the number the target names, to judge ``met``
    higher_better: bool = True
    peer: float | None = None  # the comparison figure (Huey, raw, empty store), in ``unit``
    peer_label: str = ""
    peer_note: str = ""  # e.g. "peer unavailable"
    ratio_goal: float | None = None  # met means: advantage over the peer >= ratio_goal
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ratio(self) -> float | None:
        """orch's advantage over the peer: >1 means orch is better (faster, or quicker to answer)."""
        if self.value is None or self.peer is None or self.value == 0 or self.peer == 0:
            return None
        return self.value / self.peer if self.higher_better else self.peer / self.value

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        if self.ratio_goal is not None:
            r = self.ratio
            return None if r is None else r >= self.ratio_goal
        if self.goal is None:
            return None
        return self.value >= self.goal if self.higher_better else self.value <= self.goal

    def to_json(self) -> dict[str, Any]:
        return {"figure": self.figure, "target": self.target, "orch": self.value, "unit": self.unit,
                "peer": self.peer, "peer_label": self.peer_label, "peer_note": self.peer_note,
                "ratio": self.ratio, "met": self.met, "error": self.error or None, "detail": self.detail}


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "MB":
        return f"{value:,.0f} MB"
    return f"{value:g} {unit}".strip()


def render_table(rows: Sequence[Row]) -> str:
    lines = [["figure", "target", "orch", "peer", "ratio", "met"]]
    for r in rows:
        if r.error:
            lines.append([r.figure, r.target, "error", r.error[:60], "-", "no"])
            continue
        if r.peer is not None:
            peer = f"{r.peer_label} {fmt(r.peer, r.unit)}".strip()
        else:
            peer = r.peer_note.split(":")[0] if r.peer_note else "-"  # the reason is in the log and the JSON
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        met = {True: "yes", False: "no", None: "-"}[r.met]
        lines.append([r.figure, r.target, fmt(r.value, r.unit), peer, ratio, met])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def python_cmd() -> list[str]:
    return [sys.executable]


class Workdir:
    """A fresh temp dir for one benchmark run; removed afterwards unless kept."""

    def __init__(self, name: str, keep: bool = False, base: Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"orch-bench-{name}-", dir=base))
        self.keep = keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


class Cluster:
    """A real scheduler (and workers) on a free loopback port, all state under ``tmp``.

    Use as a context manager: every process it started is ended on exit,
    whatever happened.
    """

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, dsn: str = "", replicas: int = 1) -> None:
        """``dsn``: keep state in this PostgreSQL database instead of SQLite, with ``replicas`` schedulers."""
        self.tmp = tmp
        self.replicas = replicas if dsn else 1
        self.data = tmp / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        base.update(ORCH_DATA_DIR=str(self.data), XDG_CONFIG_HOME=str(tmp / "xdg-config"), PYTHONUNBUFFERED="1",
                    # No metrics listeners on their fixed default ports: runs must not collide.
                    ORCH_METRICS_SCHEDULER_PORT="0", ORCH_METRICS_WORKER_PORT="0",
                    **new_tokens())  # known tokens: the scheduler, its workers and our load generators share them
        # Make `python -m orch` and `python -m benchmarks.*` importable from a checkout too.
        base["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH", "")) if p)
        if dsn:
            base.update(ORCH_STORAGE_BACKEND="postgres", ORCH_STORAGE_DSN=dsn)
        base.update(env or {})
        use_tokens(base)
        self.env = base
        self.procs: list[Proc] = []
        self.scheduler: Proc | None = None
        self.schedulers: list[Proc] = []
        self.url = ""
        self.urls: list[str] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 3.0) -> None:
        # Load generators and workers first (nothing runs any more at this point), the scheduler last;
        # whatever has not exited after ``grace`` (a scheduler holding long-polls open) is killed.
        for p in reversed(self.procs):
            p.end(grace=grace)
        self.procs.clear()

    @property
    def db_path(self) -> Path:
        return self.data / "orch.db"

    def start_scheduler(self, extra: list[str] | None = None) -> str:
        """The scheduler (with PostgreSQL, every replica); returns the first one's URL (``urls``: all)."""
        for i in range(self.replicas):
            name = "scheduler" if i == 0 else f"scheduler-{i + 1}"
            p = Proc(name, [*python_cmd(), "-m", "orch", "scheduler", "--port", "0", *(extra or [])],
                     self.tmp / f"{name}.log", self.env)
            self.procs.insert(0, p)
            self.schedulers.append(p)

            def url(p: Proc = p) -> str | None:
                if not p.alive():
                    raise RuntimeError(f"scheduler exited {p.p.returncode}: {p.log()[-2000:]}")
                m = URL_RE.search(p.log())
                return m.group(1) if m else None

            u = wait_for(url, 30, "the scheduler to print its URL")
            wait_for(lambda u=u: http("GET", u + "/healthz", timeout=5)[0] == 200, 30, "the scheduler's /healthz")
            self.urls.append(u)
        self.scheduler = self.schedulers[0]
        self.url = self.urls[0]
        return self.url

    def stop_scheduler(self, grace: float = 60.0) -> None:
        """SIGTERM: the scheduler commits what is queued, checkpoints the WAL and exits."""
        if self.scheduler is not None:
            self.scheduler.end(grace=grace)
            if self.scheduler in self.procs:
                self.procs.remove(self.scheduler)

    def start_worker(self, name: str, concurrency: int, queues: Sequence[str] = ("default",),
                     extra: Sequence[str] = ()) -> Proc:
        args = [*python_cmd(), "-m", "orch", "worker", "--join", ",".join(self.urls or [self.url]), "--name", name,
                "--concurrency", str(concurrency), *extra]
        for q in queues:
            args += ["--queue", q]
        p = Proc(name, args, self.tmp / f"{name}.log", self.env)
        self.procs.append(p)
        return p

    def wait_workers(self, n: int, timeout: float = 30.0) -> None:
        def alive() -> bool:
            for p in self.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited {p.p.returncode}: {p.log()[-2000:]}")
            status, body = http("GET", self.url + "/v1/workers", timeout=10)
            return status == 200 and sum(1 for w in body["workers"] if w["state"] == "alive") >= n

        wait_for(alive, timeout, f"{n} workers to join")

    def spawn(self, name: str, args: list[str]) -> Proc:
        """Another process of ours (a load generator), ended with the cluster."""
        p = Proc(name, args, self.tmp / f"{name}.log", self.env)
        self.procs.append(p)
        return p


def read_json_line(proc: Proc, key: str, timeout: float) -> dict[str, Any]:
    """Wait for a JSON line holding ``key`` in a process's log (its stdout) and return it."""

    def find() -> dict[str, Any] | None:
        for line in proc.log().splitlines():
            line = line.strip()
            if line.startswith("{") and f'"{key}"' in line:
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited {proc.p.returncode}: {proc.log()[-3000:]}")
        return None

    return wait_for(find, timeout, f"{proc.name} to report {key!r}", interval=0.05)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
