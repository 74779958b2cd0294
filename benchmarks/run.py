"""Run the benchmark suite and print one table: figure, target, orch, peer, ratio, met.

    python -m benchmarks [--size full|smoke] [--only NAME,...] [--json FILE] [--keep]
    python -m benchmarks --backend postgres [--size full|smoke]   (SQLite and PostgreSQL x1, x2 side by side)

Every benchmark starts real `orch scheduler` / `orch worker` processes (this
Python's `-m orch`) on free loopback ports, each run in fresh temp dirs, and
ends them. The peer, Huey, is installed once into a virtualenv of its own
under ~/.cache/orch-bench (ORCH_BENCH_CACHE overrides); if it cannot be
installed, its cells say "peer unavailable". `--size smoke` runs everything
once and tiny, to keep the suite working (CI); its figures mean nothing.
See docs/performance.md for what each benchmark measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/run.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Row, render_table  # noqa: E402
from benchmarks.peer import Huey  # noqa: E402
from benchmarks.suite import BENCHMARKS, SIZES, Context  # noqa: E402

# The figure each benchmark's rows stand for, to name them when a benchmark fails outright.
TITLES = {
    "shell": ("shell throughput", ">= 1.6x Huey"),
    "control": ("control plane", ">= 10,000/s"),
    "submits": ("single submits", ">= 3,000/s"),
    "latency": ("latency at idle", "p50 <= 4 ms, p99 <= 10 ms"),
    "scale": ("scale", "within 2x of empty, <= 1 KiB/job"),
    "workers": ("many workers", "< 30 % CPU, p99 <= 50 ms"),
    "big": ("big requests", "/healthz p99 <= 10 ms, <= 300 MB"),
    "delayed": ("delayed jobs", "due -> queued p99 <= 100 ms"),
    "purge": ("retention", "no submit over 50 ms during a purge"),
}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--only", default="", help=f"comma-separated benchmarks to run: {','.join(BENCHMARKS)}")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure and its details here")
    ap.add_argument("--keep", action="store_true", help="keep each run's temp dir (logs, databases)")
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite",
                    help="postgres: the control plane, single submits, shell throughput and idle latency on SQLite "
                         "and on PostgreSQL with one and two schedulers, side by side (benchmarks/backends.py)")
    args = ap.parse_args(argv)
    if args.backend == "postgres":
        from benchmarks.backends import bench_backends

        BENCHMARKS["backends"] = bench_backends
        TITLES["backends"] = ("backends", "PostgreSQL x1 >= 50 % of SQLite's control plane, >= 90 % of its shell")
        args.only = args.only or "backends"
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")

    ctx = Context(sizes=SIZES[args.size], size_name=args.size, huey=Huey(), keep=args.keep)
    info = machine()
    ctx.log(f"orch benchmarks, size {args.size}: {', '.join(names)}; {info['cores']} cores ({info['cpu']}), "
            f"Python {info['python']}, load average {info['load_avg']}")
    if ctx.huey.ensure(ctx.log):
        ctx.log(f"peer: Huey {ctx.huey.version} ({ctx.huey.python})")
    else:
        ctx.log(ctx.huey.unavailable)
    rows: list[Row] = []
    failed = []
    timings = {}
    started = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        try:
            rows += BENCHMARKS[name](ctx)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            title, target = TITLES[name]
            rows.append(Row(title, target, None, "", error=f"{type(e).__name__}: {e}"))
            failed.append(name)
        timings[name] = round(time.monotonic() - t0, 1)
        ctx.log(f"{name}: done in {timings[name]:.0f} s")
    table = render_table(rows)
    print(f"orch benchmarks ({args.size}; {info['cores']} cores, {info['cpu']}, Python {info['python']})")
    print(table, flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "size": args.size, "machine": info, "huey": ctx.huey.version or ctx.huey.unavailable,
            "seconds": timings, "total_seconds": round(time.monotonic() - started, 1),
            "benchmarks": names, "failed": failed, "rows": [r.to_json() for r in rows], "table": table,
        }, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
