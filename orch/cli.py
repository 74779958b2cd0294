"""The `orch` command: scheduler, worker and client verbs, and their output."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import zipfile
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional, TypeVar

import typer

from orch import __version__
from orch.config import Settings, load_settings, normalize_server
from orch.errors import ConfigError, OrchError, ValidationError

T = TypeVar("T")
log = logging.getLogger("orch")

app = typer.Typer(
    name="orch",
    help="orch: a distributed job orchestrator in one executable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---- shared options

ConfigOpt = typer.Option(None, "--config", help="YAML config file (default: the user config dir's orch/config.yaml).")
ServerOpt = typer.Option(None, "--server", help="Scheduler URL or HOST:PORT (else ORCH_SERVER, the config file, http://127.0.0.1:8080).")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder of all state (else ORCH_DATA_DIR, the config file, the user data dir).")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"orch: {message}", err=True)
    raise typer.Exit(code)


def settings_for(config: Optional[Path], **overrides: Any) -> Settings:
    try:
        return load_settings(config, overrides)
    except OrchError as e:
        fail(e.message, e.exit_code)
        raise  # unreachable


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine; turn orch errors into one line and an exit code, never a traceback."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except ValidationError as e:
        where = f" ({e.field})" if e.field and e.field not in e.message else ""
        fail(f"{e.message}{where}", e.exit_code)
    except OrchError as e:
        fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    raise AssertionError("unreachable")


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def client_for(settings: Settings) -> Any:
    from orch.client import Client

    return Client(settings["client.server"])


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"orch {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """orch: a distributed job orchestrator in one executable."""


# =========================================================================== server side


def orch_argv() -> list[str]:
    """How to start this same orch again as a child process (pip install or zipapp)."""
    import orch

    flags = ["-I"] if sys.flags.isolated else []
    here = Path(orch.__file__).resolve()
    for parent in here.parents:
        if parent.is_file() and zipfile.is_zipfile(parent):
            return [sys.executable, *flags, str(parent)]
    return [sys.executable, *flags, "-m", "orch"]


def _logging(settings: Settings, log_format: Optional[str]) -> None:
    from orch.logs import setup_logging

    setup_logging(settings["logging.level"], log_format or settings["logging.format"])


async def _start_scheduler(settings: Settings) -> tuple[Any, str]:
    from aiohttp import web

    from orch.scheduler.app import build_app

    application = build_app(settings)
    runner = web.AppRunner(application, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings["scheduler.host"], settings["scheduler.port"], reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on {settings['scheduler.host']}:{settings['scheduler.port']}: {e.strerror}",
            field="scheduler.port",
        ) from None
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{port}"


def _signals(on_signal: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


@app.command()
def scheduler(
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port to listen on (default 8080; 0: any free port)."),
    data_dir: Optional[Path] = DataDirOpt,
    log_format: Optional[str] = typer.Option(None, "--log-format", help="text or json."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Run the scheduler alone: the API, the store, the reaper."""
    settings = settings_for(config, **{"scheduler.host": host, "scheduler.port": port,
                                       "storage.data_dir": str(data_dir) if data_dir else None,
                                       "logging.format": log_format})
    _logging(settings, log_format)

    async def main() -> None:
        runner, url = await _start_scheduler(settings)
        print(f"orch scheduler listening on {url}", flush=True)
        print(f"database: {settings.db_path}", flush=True)
        stop = asyncio.Event()
        _signals(lambda sig: stop.set())
        await stop.wait()
        log.info("scheduler stopping")
        await runner.cleanup()

    run_async(main())


def _worker_options(settings: Settings, concurrency: Optional[int], name: Optional[str],
                    queues: Optional[List[str]], burst: bool) -> Any:
    from orch.worker.agent import WorkerOptions

    return WorkerOptions(
        concurrency=concurrency or settings.concurrency,
        queues=tuple(queues or settings["worker.queues"]),
        name=name or settings["worker.name"],
        hostname=settings.worker_host,
        kill_grace=settings["worker.kill_grace"],
        drain_grace=settings["worker.drain_grace"],
        burst=burst,
    )


@app.command()
def worker(
    join: Optional[str] = typer.Option(None, "--join", help="Scheduler to join: HOST:PORT or URL (default worker.join)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="Jobs run at once (default worker.concurrency)."),
    name: Optional[str] = typer.Option(None, "--name", help="Worker name (default host-pid)."),
    queue: Optional[List[str]] = typer.Option(None, "--queue", help="Queue to take jobs from (repeatable; default: default)."),
    burst: bool = typer.Option(False, "--burst", help="Exit when no work is left."),
    stop_on_stdin_eof: bool = typer.Option(False, "--stop-on-stdin-eof", hidden=True),
    data_dir: Optional[Path] = DataDirOpt,
    log_format: Optional[str] = typer.Option(None, "--log-format", help="text or json."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Join a scheduler and run its jobs. SIGTERM drains: running jobs finish, the rest go back."""
    settings = settings_for(config, **{"worker.join": join, "worker.concurrency": concurrency,
                                       "storage.data_dir": str(data_dir) if data_dir else None,
                                       "logging.format": log_format})
    _logging(settings, log_format)
    options = _worker_options(settings, concurrency, name, queue, burst)

    async def main() -> None:
        from orch.client import Client
        from orch.worker.agent import Agent

        async with Client(settings["worker.join"]) as client:
            agent = Agent(client, options)
            signals = 0

            def on_signal(sig: int) -> None:
                nonlocal signals
                signals += 1
                agent.stop() if signals == 1 else agent.stop_now()

            _signals(on_signal)
            if stop_on_stdin_eof:
                _watch_stdin(agent.stop)
            await agent.run()

    run_async(main())


def _watch_stdin(callback: Callable[[], None]) -> None:
    """Call back when our stdin pipe closes: the parent `orch up` is gone."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            callback()

    loop.add_reader(fd, readable)


@app.command()
def up(
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="API port (default 8080; 0: any free port)."),
    workers: int = typer.Option(1, "--workers", min=0, help="Local workers to start."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="Jobs each worker runs at once."),
    data_dir: Optional[Path] = DataDirOpt,
    log_format: Optional[str] = typer.Option(None, "--log-format", help="text or json."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Start a local cluster: the scheduler and N workers, in the foreground. Ctrl-C stops it cleanly."""
    settings = settings_for(config, **{"scheduler.host": host, "scheduler.port": port,
                                       "worker.concurrency": concurrency,
                                       "storage.data_dir": str(data_dir) if data_dir else None,
                                       "logging.format": log_format})
    _logging(settings, log_format)

    async def main() -> None:
        runner, url = await _start_scheduler(settings)
        print(f"orch is up: API {url}", flush=True)
        print(f"database: {settings.db_path}", flush=True)
        argv = orch_argv()
        me = "orch" if argv[-1] == "orch" else " ".join(argv[1:])
        print(f"try: {me} run --server {url} echo hello --wait", flush=True)
        children: list[asyncio.subprocess.Process] = []
        for i in range(workers):
            args = [*argv, "worker", "--join", url, "--stop-on-stdin-eof",
                    "--concurrency", str(settings.concurrency), "--name", f"local-{i + 1}"]
            if config:
                args += ["--config", str(config)]
            if log_format:
                args += ["--log-format", log_format]
            children.append(await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, start_new_session=True))
        stop = asyncio.Event()
        signals = 0

        def on_signal(sig: int) -> None:
            nonlocal signals
            signals += 1
            stop.set()
            for child in children:  # the first signal drains each worker, a second hurries it
                if child.returncode is None:
                    child.send_signal(signal.SIGTERM)

        _signals(on_signal)
        await stop.wait()
        log.info("stopping: draining %d workers", len(children))
        for child in children:
            await child.wait()
        await runner.cleanup()
        print("orch stopped", flush=True)

    run_async(main())


# =========================================================================== client verbs


def _parse_env(pairs: Optional[List[str]]) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValidationError(f"--env takes KEY=VALUE, not {pair!r}", field="env")
        env[key] = value
    return env


@app.command(context_settings={"allow_interspersed_args": True, "ignore_unknown_options": True})
def run(
    command: List[str] = typer.Argument(..., help="The command and its arguments (put them after -- if they look like options)."),
    wait: bool = typer.Option(False, "--wait", help="Stream the output and exit with the job's exit code."),
    as_json: bool = JsonOpt,
    shell: bool = typer.Option(False, "--shell", help="Run the words as one line through /bin/sh -c."),
    env: Optional[List[str]] = typer.Option(None, "--env", help="KEY=VALUE for the job's environment (repeatable)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds before the job is killed."),
    retries: Optional[int] = typer.Option(None, "--retries", min=0, max=99, help="Retries after a failure (default from retry.max_attempts)."),
    retry_on_exit: Optional[str] = typer.Option(None, "--retry-on-exit", help="Only these exit codes retry, e.g. 75,111."),
    queue: Optional[str] = typer.Option(None, "--queue", help="Queue (default: default)."),
    priority: Optional[int] = typer.Option(None, "--priority", help="Higher runs first (-1000..1000)."),
    name: Optional[str] = typer.Option(None, "--name", help="A name for the job."),
    cwd: Optional[str] = typer.Option(None, "--cwd", help="Working directory on the worker."),
    server: Optional[str] = ServerOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Submit a job: orch run echo hello --wait; orch run --wait -- ls -la."""
    settings = settings_for(config, **{"client.server": server})
    spec: dict[str, Any] = {"shell": " ".join(command)} if shell else {"command": list(command)}
    extra = {"env": _parse_env(env) or None, "timeout": timeout, "queue": queue, "priority": priority,
             "name": name, "cwd": cwd, "max_attempts": retries + 1 if retries is not None else None}
    spec.update({k: v for k, v in extra.items() if v is not None})
    if retry_on_exit is not None:
        try:
            spec["retry_on_exit"] = [int(c) for c in retry_on_exit.split(",") if c.strip()]
        except ValueError:
            fail(f"--retry-on-exit takes exit codes like 1,75, not {retry_on_exit!r}", 2)

    async def main() -> int:
        async with client_for(settings) as client:
            job = await client.submit(spec)
            if not wait:
                emit_json(job) if as_json else typer.echo(job["id"])
                return 0
            if as_json:
                while True:
                    job = await client.wait(job["id"], 30)
                    if job["state"] in ("succeeded", "failed", "cancelled"):
                        emit_json(job)
                        return _exit_code(job)
            return await _stream(client, job["id"])

    raise typer.Exit(run_async(main()))


def _exit_code(job: dict[str, Any]) -> int:
    if job["state"] == "succeeded":
        return 0
    code = job.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


async def _stream(client: Any, job_id: int) -> int:
    """Print a job's output as it comes; return the exit code to leave with."""
    shown_attempt = None
    end: dict[str, Any] = {}
    async for item in client.follow(job_id):
        if item.get("end"):
            end = item
            break
        if shown_attempt is not None and item["attempt"] != shown_attempt:
            typer.echo(f"orch: job {job_id} attempt {item['attempt']}", err=True)
        shown_attempt = item["attempt"]
        out = sys.stdout if item["stream"] == "stdout" else sys.stderr
        out.write(item["data"])
        out.flush()
    if end.get("state") != "succeeded" and end.get("error"):
        typer.echo(f"orch: job {job_id} {end.get('state')}: {end['error']}", err=True)
    return _exit_code(end) if end else 1


def _job_ref(job: str) -> str:
    if not job.isdigit():
        fail(f"a job id is a number, not {job!r}", 2)
    return job


@app.command()
def status(
    job: str = typer.Argument(..., help="Job id."),
    as_json: bool = JsonOpt,
    server: Optional[str] = ServerOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Show a job: its state, result, attempts and the history of its state changes."""
    settings = settings_for(config, **{"client.server": server})

    async def main() -> None:
        async with client_for(settings) as client:
            data = await client.job(_job_ref(job))
            events = await client.events(job)
        if as_json:
            emit_json({**data, "events": events})
            return
        typer.echo(format_status(data, events))

    run_async(main())


def _short(ts: Optional[str]) -> str:
    return ts.replace("T", " ").rstrip("Z") if ts else "-"


def _command_text(spec: dict[str, Any]) -> str:
    import shlex

    if spec.get("kind") == "shell":
        return str(spec.get("shell"))
    return shlex.join(spec.get("argv", []))


def format_status(job: dict[str, Any], events: list[dict[str, Any]]) -> str:
    lines = [
        f"job {job['id']}  {job['state']}" + (f"  (cancel requested)" if job.get("cancel_requested") and job["state"] == "running" else ""),
        f"  command:   {_command_text(job['spec'])}",
        f"  queue:     {job['queue']}  priority {job['priority']}  attempt {job['attempt']}/{job['max_attempts']}",
        f"  created:   {_short(job['created_at'])}",
        f"  started:   {_short(job['started_at'])}",
        f"  finished:  {_short(job['finished_at'])}",
    ]
    if job.get("retry_at"):
        lines.append(f"  retry at:  {_short(job['retry_at'])}")
    if job.get("worker"):
        lines.append(f"  worker:    {job['worker']}")
    if job.get("exit_code") is not None or job.get("error"):
        lines.append(f"  exit code: {job.get('exit_code')}" + (f"  error: {job['error']}" if job.get("error") else ""))
    if job.get("attempts"):
        lines.append("attempts:")
        for a in job["attempts"]:
            dur = f"{a['duration']:.3f}s" if a.get("duration") is not None else "-"
            lines.append(
                f"  #{a['attempt']:<3} {a['state']:<11} worker {a['worker'] or '-':<16} "
                f"{_short(a['started_at'])} -> {_short(a['finished_at'])}  {dur}  exit {a['exit_code']}"
                + (f"  {a['error']}" if a.get("error") else "")
            )
    if events:
        lines.append("history:")
        for e in events:
            lines.append(f"  {_short(e['at'])}  #{e['attempt']}  {e['from'] or '-'} -> {e['to']}  {e['reason']}")
    return "\n".join(lines)


@app.command()
def jobs(
    state: Optional[str] = typer.Option(None, "--state", help="Only jobs in this state."),
    queue: Optional[str] = typer.Option(None, "--queue", help="Only jobs of this queue."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="At most this many (newest first)."),
    cursor: Optional[str] = typer.Option(None, "--cursor", help="Start after this page cursor."),
    as_json: bool = JsonOpt,
    server: Optional[str] = ServerOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """List jobs, newest first."""
    settings = settings_for(config, **{"client.server": server})

    async def main() -> None:
        async with client_for(settings) as client:
            page = await client.jobs(state=state, queue=queue, limit=limit, cursor=cursor)
        if as_json:
            emit_json(page)
            return
        rows = [["ID", "STATE", "QUEUE", "ATTEMPT", "EXIT", "CREATED", "COMMAND"]]
        for j in page["jobs"]:
            rows.append([str(j["id"]), j["state"], j["queue"], f"{j['attempt']}/{j['max_attempts']}",
                         "" if j["exit_code"] is None else str(j["exit_code"]), _short(j["created_at"]),
                         _command_text(j["spec"])[:60]])
        typer.echo(table(rows))
        if page.get("next_cursor"):
            typer.echo(f"more: --cursor {page['next_cursor']}")

    run_async(main())


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@app.command()
def logs(
    job: str = typer.Argument(..., help="Job id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing output until the job ends."),
    server: Optional[str] = ServerOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Print a job's output (stdout to stdout, stderr to stderr)."""
    settings = settings_for(config, **{"client.server": server})

    async def main() -> int:
        async with client_for(settings) as client:
            if follow:
                return await _stream(client, int(_job_ref(job)))
            out = await client.output(_job_ref(job))
        sys.stdout.write(out["stdout"])
        sys.stdout.flush()
        sys.stderr.write(out["stderr"])
        if out.get("stdout_truncated") or out.get("stderr_truncated"):
            typer.echo("orch: output was truncated; only its tail is kept", err=True)
        return 0

    raise typer.Exit(run_async(main()))


@app.command()
def cancel(
    job: str = typer.Argument(..., help="Job id."),
    as_json: bool = JsonOpt,
    server: Optional[str] = ServerOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Cancel a job: queued and retrying jobs at once, running ones at the worker's next heartbeat."""
    settings = settings_for(config, **{"client.server": server})

    async def main() -> None:
        async with client_for(settings) as client:
            data = await client.cancel(_job_ref(job))
        if as_json:
            emit_json(data)
        elif data["state"] == "cancelled":
            typer.echo(f"job {data['id']} cancelled")
        else:
            typer.echo(f"job {data['id']} is running; its worker will stop it")

    run_async(main())


@app.command()
def workers(
    as_json: bool = JsonOpt,
    server: Optional[str] = ServerOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """List workers: state, last heartbeat, running jobs."""
    settings = settings_for(config, **{"client.server": server})

    async def main() -> None:
        async with client_for(settings) as client:
            items = await client.workers()
        if as_json:
            emit_json({"workers": items})
            return
        rows = [["ID", "NAME", "STATE", "HOST", "QUEUES", "RUNNING", "HEARTBEAT"]]
        for w in items:
            rows.append([w["id"], w["name"], w["state"], w["hostname"], ",".join(w["queues"]),
                         f"{w['running']}/{w['concurrency']}", f"{w['heartbeat_age']:.1f}s ago"])
        typer.echo(table(rows))

    run_async(main())


def main() -> None:
    app()


__all__ = ["app", "main", "normalize_server"]
