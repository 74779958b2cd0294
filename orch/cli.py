"""The `orch` command: scheduler, worker and client verbs, and their output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import zipfile
from contextlib import suppress
from pathlib import Path
from typing import Any, Awaitable, Callable, List, TypeVar

import typer

from orch import __version__
from orch.config import Settings, load_settings, normalize_server
from orch.core.errors import ApiError, ConfigError, OrchError, ValidationError
from orch.core.states import REPLAYABLE, TERMINAL, JobState
from orch.text import visible

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
TokenOpt = typer.Option(None, "--token", help="Client token (else ORCH_TOKEN, auth.token, the data dir's tokens.json).")
CaOpt = typer.Option(None, "--ca", help="CA certificate (PEM) to trust for an https:// scheduler (else ORCH_TLS_CA, tls.ca, the system's CAs).")


def client_overrides(token: str | None, ca: Path | None, data_dir: Path | None) -> dict[str, Any]:
    """Settings overrides of the --token, --ca and --data-dir flags of a client verb."""
    return {"auth.token": token, "tls.ca": str(ca) if ca else None,
            "storage.data_dir": str(data_dir) if data_dir else None}


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"orch: {message}", err=True)
    raise typer.Exit(code)


def settings_for(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, overrides)
    except OrchError as e:
        fail(e.message, e.exit_code)
        raise  # unreachable


# Exit codes of the commands that exit with a job's own exit code (run --wait, logs --follow, submit --wait),
# when the job did not decide them: orch itself failed (docker run's convention: no job is likely to exit
# 125 on its own), or the wait was interrupted (128 + SIGINT, as a shell reports it).
ORCH_FAILED = 125
INTERRUPTED = 130


def run_async(coro: Awaitable[T], failure_code: int | None = None) -> T:
    """Run a coroutine; turn orch errors into one line and an exit code, never a traceback.

    ``failure_code``: the exit code of any orch error (for commands whose other exit codes are a job's).
    """
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except ValidationError as e:
        where = f" ({e.field})" if e.field and e.field not in e.message else ""
        fail(f"{e.message}{where}", failure_code or e.exit_code)
    except OrchError as e:
        fail(e.message, failure_code or e.exit_code)
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED) from None
    raise AssertionError("unreachable")


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def client_for(settings: Settings) -> Any:
    """A client of the scheduler with the client token: --token, ORCH_TOKEN, auth.token, else the data dir's file."""
    from orch.auth import pick
    from orch.client import Client

    return Client(settings["client.server"], token=pick(None, settings["auth.token"], settings.data_dir, "client"),
                  ca=settings["tls.ca"] or None)


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


def database_name(settings: Settings) -> str:
    """Where state is kept, as a person names it (a PostgreSQL DSN without its password)."""
    from orch.compose import database_name as name

    return name(settings)


def _logging(settings: Settings, log_format: str | None) -> None:
    from orch.logs import setup_logging

    setup_logging(settings["logging.level"], log_format or settings["logging.format"])


async def _start_scheduler(settings: Settings) -> tuple[Any, str]:
    from aiohttp import web

    from orch.compose import build_app
    from orch.scheduler.app import STORE
    from orch.scheduler.security import GUARD, exposure_warnings
    from orch.store.files import DatabaseLock, private_dir

    ssl_context = None
    if settings["tls.cert"] or settings["tls.key"]:
        from orch.tls import server_context

        ssl_context = server_context(settings["tls.cert"], settings["tls.key"])
    # Before anything is written: a private data dir, and no other scheduler on this database (two would
    # both serve it). The lock goes with the process, however it ends.
    private_dir(settings.data_dir)
    lock = DatabaseLock(settings.db_path, settings.data_dir)
    if settings["storage.backend"] == "sqlite":  # PostgreSQL: several schedulers share the database by design
        lock.acquire()
    _more_open_files()
    _one_malloc_arena()
    application = build_app(settings)
    metrics_runners: list[Any] = []

    async def unlock(_app: Any) -> None:  # after the store has closed (cleanup_ctx runs first)
        lock.release()

    application.on_cleanup.append(unlock)

    async def stop_metrics(_app: Any) -> None:  # before the store closes
        for r in metrics_runners:
            await r.cleanup()

    application.on_shutdown.append(stop_metrics)
    runner = web.AppRunner(application, handle_signals=False, access_log=None, shutdown_timeout=5.0,
                           keepalive_timeout=settings["scheduler.idle_timeout"])
    try:
        await runner.setup()
    except BaseException as e:
        # Start-up failed half-way (a damaged database, a broken token file): what opened must close, or its
        # threads keep the process alive after the error.
        await application[STORE].close()
        lock.release()
        mapped = _startup_error(e, settings)
        if mapped is e:
            raise
        raise mapped from e
    site = web.TCPSite(runner, settings["scheduler.host"], settings["scheduler.port"], reuse_address=True,
                       ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on {settings['scheduler.host']}:{settings['scheduler.port']}: {e.strerror}",
            field="scheduler.port",
        ) from None
    if settings["metrics.scheduler_port"]:
        from orch.metrics import metrics_url, serve_metrics
        from orch.scheduler.app import API

        try:
            metrics_runners.append(await serve_metrics(
                settings["metrics.host"], settings["metrics.scheduler_port"], application[API].render_metrics,
                "metrics.scheduler_port"))
        except ConfigError:
            await runner.cleanup()
            raise
        application[API].metrics_listener = metrics_runners[0].addresses[0][:2]  # for GET /v1/metrics/targets
        print(f"metrics: {metrics_url(metrics_runners[0])}", flush=True)
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if ssl_context else 'http'}://{shown}:{port}"
    _quiet_gc()
    guard = application[GUARD]
    for warning in exposure_warnings(settings["scheduler.host"], ssl_context is not None, guard.enabled):
        typer.echo(f"orch: WARNING: {warning}", err=True)
        log.warning(warning)
    if guard.enabled:
        where = guard.path if guard.uses_file else "auth.token and auth.join_token (configuration)"
        print(f"tokens: {where} (orch token show; the CLI on this machine finds them)", flush=True)
    return runner, url


def _startup_error(e: BaseException, settings: Settings) -> BaseException:
    """A failure of the files at start-up as one line (an OrchError); anything else (a bug) as it is."""
    from orch.compose import startup_error

    return startup_error(e, settings)


def _more_open_files() -> None:
    """Raise the soft open-files limit to the hard one: each connection (an idle one too) holds a descriptor."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


def _one_malloc_arena() -> None:
    """Ask glibc for one malloc arena, unless MALLOC_ARENA_MAX says otherwise; before any thread starts.

    glibc gives each thread that allocates while another holds the lock an arena of its own (up to
    8 per core) and rarely hands their freed pages back. The scheduler's reader, writer and fsync
    threads each grew one while big specs and outputs passed through (the ``big`` benchmark: 160-177 MB
    peak against 133-147 MB with one arena). Those threads spend their time in SQLite and the loop
    holds the GIL, so one arena costs no measurable throughput (the ``control`` benchmark, equal).
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX, from glibc's malloc.h; musl ignores it
    except (OSError, AttributeError):
        pass


def _auth_switch(settings: Settings, no_auth: bool) -> None:
    """auth.enabled: false needs the --no-auth flag as well: no scheduler opens up by a stray config line."""
    if not settings["auth.enabled"] and not no_auth:
        fail("auth.enabled is false, but authentication is turned off only with the --no-auth flag as well "
             "(see docs/security.md)", 2)


def _quiet_gc() -> None:
    """Keep the cyclic garbage collector off the latency path of a long-running process.

    Measured: with 500 workers connected, a full collection of the scheduler's
    heap took ~90 ms and freed nothing, stalling every request at once. What
    exists after start-up (modules, app, routes) is frozen out of collections,
    and young-generation collections run less often.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _signals(on_signal: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


@app.command()
def scheduler(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port to listen on (default 8080; 0: any free port)."),
    data_dir: Path | None = DataDirOpt,
    log_format: str | None = typer.Option(None, "--log-format", help="text or json."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", min=0, max=65535, help="Port of the Prometheus /metrics listener (default 9090; 0: none)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without authentication (logged loudly; see docs/security.md)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Run the scheduler alone: the API, the store, the reaper."""
    settings = settings_for(config, **{"scheduler.host": host, "scheduler.port": port,
                                       "storage.data_dir": str(data_dir) if data_dir else None,
                                       "logging.format": log_format, "metrics.scheduler_port": metrics_port,
                                       "auth.enabled": False if no_auth else None})
    _auth_switch(settings, no_auth)
    _logging(settings, log_format)

    async def main() -> None:
        runner, url = await _start_scheduler(settings)
        print(f"orch scheduler listening on {url}", flush=True)
        print(f"database: {database_name(settings)}", flush=True)
        stop = asyncio.Event()
        _signals(lambda sig: stop.set())
        await stop.wait()
        log.info("scheduler stopping")
        await runner.cleanup()

    run_async(main())


def _worker_options(settings: Settings, concurrency: int | None, name: str | None,
                    queues: List[str] | None, burst: bool) -> Any:
    from orch.worker.agent import WorkerOptions

    return WorkerOptions(
        concurrency=concurrency or settings.concurrency,
        queues=tuple(queues or settings["worker.queues"]),
        name=name or settings["worker.name"],
        hostname=settings.worker_host,
        kill_grace=settings["worker.kill_grace"],
        drain_grace=settings["worker.drain_grace"],
        burst=burst,
        settings={**settings.as_dict(), "worker.concurrency": concurrency or settings.concurrency},
        plugins=tuple(settings["plugins"]),
    )


@app.command()
def worker(
    join: str | None = typer.Option(None, "--join", help="Scheduler to join: HOST:PORT or URL (default worker.join)."),
    concurrency: int | None = typer.Option(None, "--concurrency", min=1, help="Jobs run at once (default worker.concurrency)."),
    name: str | None = typer.Option(None, "--name", help="Worker name (default host-pid)."),
    queue: List[str] | None = typer.Option(None, "--queue", help="Queue to take jobs from (repeatable; default: default)."),
    burst: bool = typer.Option(False, "--burst", help="Exit when no work is left."),
    stop_on_stdin_eof: bool = typer.Option(False, "--stop-on-stdin-eof", hidden=True),
    imports: List[str] | None = typer.Option(None, "--import", help="Python module the python runner's child interpreters preload (repeatable; default worker.imports)."),
    plugin: List[str] | None = typer.Option(None, "--plugin", help="Plugin module to load runners from, pkg.mod or pkg.mod:attr (repeatable; beside the plugins setting)."),
    data_dir: Path | None = DataDirOpt,
    log_format: str | None = typer.Option(None, "--log-format", help="text or json."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", min=0, max=65535, help="Port of this worker's Prometheus /metrics listener (default 9091; 0: none)."),
    token: str | None = typer.Option(None, "--token", help="Join token (else ORCH_JOIN_TOKEN, auth.join_token, the data dir's tokens.json)."),
    ca: Path | None = CaOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Join a scheduler and run its jobs. SIGTERM drains: running jobs finish, the rest go back."""
    settings = settings_for(config, **{"worker.join": join, "worker.concurrency": concurrency,
                                       "storage.data_dir": str(data_dir) if data_dir else None,
                                       "logging.format": log_format, "metrics.worker_port": metrics_port,
                                       "auth.join_token": token, "tls.ca": str(ca) if ca else None,
                                       "worker.imports": list(imports) if imports else None})
    _logging(settings, log_format)
    options = _worker_options(settings, concurrency, name, queue, burst)
    options.plugins = (*options.plugins, *(plugin or ()))

    async def main() -> None:
        from orch.auth import pick
        from orch.client import Client
        from orch.core.errors import ApiError
        from orch.worker.agent import Agent

        join_token = pick(None, settings["auth.join_token"], settings.data_dir, "join")
        async with Client(settings["worker.join"], token=join_token, ca=settings["tls.ca"] or None) as client:
            agent = Agent(client, options)
            _quiet_gc()
            metrics = await _worker_metrics(settings, agent)
            if metrics is not None:  # told to the scheduler at registration, for its service discovery
                options.metrics = _metrics_address(settings, metrics)
            signals = 0

            def on_signal(sig: int) -> None:
                nonlocal signals
                signals += 1
                agent.stop() if signals == 1 else agent.stop_now()

            _signals(on_signal)
            if stop_on_stdin_eof:
                _watch_stdin(agent.stop)
            try:
                await agent.run()
            except ApiError as e:
                if e.http_status not in (401, 403):
                    raise
                raise ApiError(e.http_status, e.code, f"the scheduler refused this worker: {e.message}; pass the "
                               "join token with --token or ORCH_JOIN_TOKEN (orch token show --worker, on the "
                               "scheduler's machine)") from None
            finally:
                if metrics is not None:
                    await metrics.cleanup()

    run_async(main())


async def _worker_metrics(settings: Settings, agent: Any) -> Any:
    """The worker's /metrics listener (None when metrics.worker_port is 0).

    A port the user chose (flag, environment, config file) must be had; the default one, when taken
    (by `orch up`'s worker, say), gives way to the next free port: the scheduler's service discovery
    tells Prometheus where each worker is.
    """
    port = settings["metrics.worker_port"]
    if not port:
        return None
    from orch.metrics import metrics_url, serve_metrics

    async def render(accept: str) -> tuple[bytes, str]:
        return agent.metrics.render_for(accept)

    runner = await serve_metrics(settings["metrics.host"], port, render, "metrics.worker_port",
                                 next_free=not settings.explicit("metrics.worker_port"))
    got = runner.addresses[0][1]
    if got != port:
        log.info("metrics port %d is taken; worker metrics on %s instead", port, metrics_url(runner))
    else:
        log.info("worker metrics on %s", metrics_url(runner))
    return runner


def _metrics_address(settings: Settings, runner: Any) -> str:
    """host:port where others reach this worker's metrics listener: its own name when it listens everywhere
    ("" when that name is not one the scheduler takes: the worker then joins without telling it)."""
    from orch.scheduler.openapi import METRICS_ADDRESS_RE

    host, port = runner.addresses[0][:2]
    if host in ("", "0.0.0.0", "::"):
        host = settings.worker_host
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not METRICS_ADDRESS_RE.fullmatch(address):
        log.warning("not telling the scheduler where this worker's metrics are: %r is not host:port (set worker.host)",
                    address)
        return ""
    return address


def _local_worker_env(settings: Settings, runner: Any) -> dict[str, str]:
    """The environment of `orch up`'s workers: the join token rides here, not in argv (which `ps` shows);
    with TLS, the CA to trust (tls.ca, else the ca.pem `orch certs init` put next to tls.cert, else tls.cert)."""
    from orch.scheduler.security import GUARD

    env = dict(os.environ)
    guard = runner.app[GUARD]
    if guard.enabled and guard.local.join:
        env["ORCH_JOIN_TOKEN"] = guard.local.join
    if settings["tls.cert"]:
        ca = settings["tls.ca"]
        if not ca:
            beside = Path(settings["tls.cert"]).expanduser().parent / "ca.pem"
            ca = str(beside) if beside.is_file() else settings["tls.cert"]
        env["ORCH_TLS_CA"] = str(Path(ca).expanduser())
    return env


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


def _runnable_orch(argv: list[str]) -> str:
    """How the reader of `orch up`'s try: line can run this orch: `orch` if that is on PATH, else the exact
    interpreter and module or zipapp file (a bare `orch.pyz run` or `-I orch.pyz run` runs nothing)."""
    import shlex
    import shutil

    if argv[-1] == "orch" and shutil.which("orch"):
        return "orch"
    return shlex.join(argv)


@app.command()
def up(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="API port (default 8080; 0: any free port)."),
    workers: int = typer.Option(1, "--workers", min=0, help="Local workers to start."),
    concurrency: int | None = typer.Option(None, "--concurrency", min=1, help="Jobs each worker runs at once."),
    data_dir: Path | None = DataDirOpt,
    log_format: str | None = typer.Option(None, "--log-format", help="text or json."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", min=0, max=65535, help="Scheduler's Prometheus /metrics port P (default 9090); worker i gets P+i; 0: none."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without authentication (logged loudly; see docs/security.md)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Start a local cluster: the scheduler and N workers, in the foreground. Ctrl-C stops it cleanly."""
    settings = settings_for(config, **{"scheduler.host": host, "scheduler.port": port,
                                       "worker.concurrency": concurrency,
                                       "storage.data_dir": str(data_dir) if data_dir else None,
                                       "logging.format": log_format, "metrics.scheduler_port": metrics_port,
                                       "auth.enabled": False if no_auth else None})
    _auth_switch(settings, no_auth)
    _logging(settings, log_format)

    async def main() -> None:
        runner, url = await _start_scheduler(settings)
        children: list[asyncio.subprocess.Process] = []
        stop = asyncio.Event()
        signals = 0

        def on_signal(sig: int) -> None:
            nonlocal signals
            signals += 1
            stop.set()
            for child in children:  # the first signal drains each worker, a second hurries it
                if child.returncode is None:
                    child.send_signal(signal.SIGTERM)

        _signals(on_signal)  # before anything is printed: a stop asked for at once is a clean one too
        print(f"orch is up: API {url}", flush=True)
        if settings["ui.enabled"]:
            print(f"dashboard: {url}/ui (orch ui opens it signed in)", flush=True)
        print(f"database: {database_name(settings)}", flush=True)
        argv = orch_argv()
        me = _runnable_orch(argv)
        child_env = _local_worker_env(settings, runner)
        ca = f" --ca {child_env['ORCH_TLS_CA']}" if "ORCH_TLS_CA" in child_env else ""
        print(f"try: {me} run --server {url}{ca} echo hello --wait", flush=True)
        for i in range(workers):
            if stop.is_set():
                break
            args = [*argv, "worker", "--join", url, "--stop-on-stdin-eof",
                    "--concurrency", str(settings.concurrency), "--name", f"local-{i + 1}"]
            if config:
                args += ["--config", str(config)]
            if log_format:
                args += ["--log-format", log_format]
            mport = settings["metrics.scheduler_port"]
            args += ["--metrics-port", str(mport + i + 1 if mport else 0)]
            children.append(await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, start_new_session=True, env=child_env))
        await stop.wait()
        log.info("stopping: draining %d workers", len(children))
        for child in children:
            await child.wait()
        await runner.cleanup()
        print("orch stopped", flush=True)

    run_async(main())


# =========================================================================== tokens and certificates

token_app = typer.Typer(help="Show or rotate the scheduler's tokens (kept in the data dir's tokens.json; with "
                        "storage.backend postgres, in effect for every scheduler of the database).",
                        no_args_is_help=True)
certs_app = typer.Typer(help="Make TLS certificates: a small CA and a server certificate.", no_args_is_help=True)
app.add_typer(token_app, name="token")
queue_app = typer.Typer(help="Pause, resume or limit a queue (`orch queues` lists them).", no_args_is_help=True)
limit_app = typer.Typer(help="Make, change or delete a rate limit (`orch limits` lists them).", no_args_is_help=True)
app.add_typer(certs_app, name="certs")
app.add_typer(queue_app, name="queue")
app.add_typer(limit_app, name="limit")


def _roles(client: bool, worker: bool) -> tuple[str, ...]:
    if client and worker:
        fail("give --client or --worker, not both", 2)
    return ("client",) if client else ("join",) if worker else ("client", "join")


@token_app.command("show")
def token_show(
    client: bool = typer.Option(False, "--client", help="Print only the client token (for scripts)."),
    worker: bool = typer.Option(False, "--worker", help="Print only the worker join token (for scripts)."),
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Print the tokens a scheduler on this machine uses: the client token and the worker join token."""
    from orch.auth import TokenFileError, pick, read_tokens, token_path

    roles = _roles(client, worker)
    settings = settings_for(config, **{"storage.data_dir": str(data_dir) if data_dir else None})
    path = token_path(settings.data_dir)
    try:
        read_tokens(settings.data_dir)  # a broken file is reported, not skipped
    except TokenFileError as e:
        fail(str(e), 2)
    found = {"client": pick(None, settings["auth.token"], settings.data_dir, "client"),
             "join": pick(None, settings["auth.join_token"], settings.data_dir, "join")}
    missing = [r for r in roles if not found[r]]
    if missing:
        fail(f"no {' or '.join(missing)} token: {path} does not exist yet; start the scheduler once (orch up, "
             "orch scheduler) with this data dir, or pass --data-dir", 2)
    if len(roles) == 1:
        typer.echo(found[roles[0]])
        return
    typer.echo(f"client token: {found['client']}")
    typer.echo(f"join token:   {found['join']}")
    typer.echo(f"file: {path}")
    typer.echo("clients: ORCH_TOKEN=... or --token (found here on this machine without either)")
    typer.echo("workers: orch worker --join HOST:PORT --token $(orch token show --worker)")


@token_app.command("rotate")
def token_rotate(
    client: bool = typer.Option(False, "--client", help="Rotate only the client token."),
    worker: bool = typer.Option(False, "--worker", help="Rotate only the worker join token."),
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Replace tokens with new ones; a running scheduler (every one of a shared database) takes them within a
    second, the old ones are refused."""
    from orch.auth import TokenFileError, rotate, token_path

    roles = _roles(client, worker)
    settings = settings_for(config, **{"storage.data_dir": str(data_dir) if data_dir else None})
    if settings["storage.backend"] == "postgres":
        _rotate_shared(settings, roles)
        return
    try:
        new = rotate(settings.data_dir, roles)
    except (TokenFileError, OSError) as e:
        fail(f"cannot rotate the tokens in {token_path(settings.data_dir)}: {e}", 2)
    _tell_rotated(settings, roles, new, "the file")
    typer.echo(f"written to {token_path(settings.data_dir)}; a running scheduler with this data dir takes the new "
               "token within a second. Workers keep their own credentials; give new workers the new join token.")


_TOKEN_NAMES = {"client": "client token", "join": "join token"}


def _tell_rotated(settings: Settings, roles: tuple[str, ...], new: Any, instead: str) -> None:
    """Print the new tokens, and where a configured token wins over them (``instead``: what it wins over)."""
    for role in roles:
        typer.echo(f"new {_TOKEN_NAMES[role]}: {new.get(role)}")
        key = "auth.token" if role == "client" else "auth.join_token"
        if settings[key]:
            typer.echo(f"orch: note: {key} is set in the configuration or environment; a scheduler started with "
                       f"it uses that value, not {instead}", err=True)


def _rotate_shared(settings: Settings, roles: tuple[str, ...]) -> None:
    """``orch token rotate`` with a shared database: the new tokens' digests go to the database first (the truth
    for every scheduler of it), then the tokens to this machine's tokens.json."""
    from orch.auth import ROLES, TokenFileError, digest, read_tokens, token_path, write_tokens
    from orch.compose import database_name, rotate_shared

    path = token_path(settings.data_dir)
    try:
        read_tokens(settings.data_dir)  # a broken file is reported before anything changes
    except TokenFileError as e:
        fail(f"cannot rotate the tokens: {e}", 2)
    new, in_effect = run_async(rotate_shared(settings, roles), failure_code=2)
    _tell_rotated(settings, roles, new, "the database's")
    try:
        write_tokens(settings.data_dir, new)
    except TokenFileError as e:
        fail(f"{e}; the new tokens above are in effect all the same: keep them", 2)
    for role in ROLES:
        kept = new.get(role)
        if role not in roles and (not kept or digest(kept) != in_effect.get(role)):
            typer.echo(f"orch: note: the {_TOKEN_NAMES[role]} in {path} is not the one in effect in the database; rotate "
                       f"it too (orch token rotate --{'client' if role == 'client' else 'worker'}) or copy tokens.json "
                       "from the machine of the scheduler that made it", err=True)
    typer.echo(f"put in the database {database_name(settings)} and written to {path}; every scheduler of the "
               "database takes the new token within a second. Workers keep their own credentials; give new workers "
               "the new join token.")


@certs_app.command("init")
def certs_init(
    dir: Path | None = typer.Option(None, "--dir", help="Folder for the files (default: the data dir's tls/)."),
    host: List[str] | None = typer.Option(None, "--host", help="Host name or IP address the scheduler is reached by (repeatable; localhost, 127.0.0.1 and ::1 are always added)."),
    days: int = typer.Option(825, "--days", min=1, max=3650, help="Days the certificates are valid."),
    force: bool = typer.Option(False, "--force", help="Replace certificates already in the folder."),
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Make a small CA and a server certificate for the given hosts, to turn TLS on in one step."""
    from orch.tls import make_certs

    settings = settings_for(config, **{"storage.data_dir": str(data_dir) if data_dir else None})
    folder = (dir or settings.data_dir / "tls").expanduser().resolve()
    try:
        files = make_certs(folder, list(host or []), days=days, force=force)
    except OrchError as e:
        fail(e.message, e.exit_code)
    typer.echo(f"CA certificate:     {files.ca}  (give this to workers and clients: --ca or tls.ca)")
    typer.echo(f"CA key:             {files.ca_key}  (keep it secret; it signs certificates)")
    typer.echo(f"server certificate: {files.cert}")
    typer.echo(f"server key:         {files.key}")
    typer.echo("scheduler config:")
    typer.echo(f"  tls:\n    cert: {files.cert}\n    key: {files.key}")
    typer.echo(f"workers and clients: --ca {files.ca} (or tls.ca), and https://HOST:PORT")


# =========================================================================== client verbs


def _parse_env(pairs: List[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env takes KEY=VALUE, not {pair!r}", 2)  # outside run_async: raising would be a traceback
        env[key] = value
    return env


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?",
                       re.ASCII)


def parse_duration(text: str) -> float | None:
    """``10m``, ``90s``, ``1h30m``, ``2d``, ``1.5h`` or plain seconds (``45``) as seconds; None if it is none."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text, re.ASCII):
        return float(text)
    m = _DURATION.fullmatch(text)
    if not text or m is None:
        return None
    return sum(float(part) * unit for part, unit in zip(m.groups(), (86400, 3600, 60, 1), strict=True) if part)


def _when(in_: str | None, at: str | None) -> dict[str, Any]:
    """The spec fields of ``orch run --in`` or ``--at`` (checked here, so a bad one is one line and exit 2)."""
    from orch.core.spec import MAX_DELAY, parse_time

    if in_ is not None and at is not None:
        fail("--in and --at are exclusive: give one of them", 2)
    if in_ is not None:
        seconds = parse_duration(in_)
        if seconds is None:
            fail(f"--in takes a duration like 90s, 10m, 1h30m or 2d, not {in_!r}", 2)
        elif seconds > MAX_DELAY:
            fail(f"--in {in_} is more than 366 days", 2)
        else:
            return {"delay": int(seconds) if seconds.is_integer() else seconds}
    if at is not None:
        try:
            parse_time(at, "--at")
        except ValidationError as e:
            fail(e.message, 2)
        return {"run_at": at}
    return {}


@app.command(context_settings={"allow_interspersed_args": True, "ignore_unknown_options": True})
def run(
    command: List[str] = typer.Argument(..., help="The command and its arguments (put them after -- if they look like options)."),
    wait: bool = typer.Option(False, "--wait", help="Stream the output and exit with the job's exit code."),
    as_json: bool = JsonOpt,
    shell: bool = typer.Option(False, "--shell", help="Run the words as one line through /bin/sh -c."),
    env: List[str] | None = typer.Option(None, "--env", help="KEY=VALUE for the job's environment (repeatable)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds before the job is killed."),
    retries: int | None = typer.Option(None, "--retries", min=0, max=99, help="Retries after a failure (default from retry.max_attempts)."),
    retry_on_exit: str | None = typer.Option(None, "--retry-on-exit", help="Only these exit codes retry, e.g. 75,111."),
    queue: str | None = typer.Option(None, "--queue", help="Queue (default: default)."),
    priority: int | None = typer.Option(None, "--priority", help="Higher runs first (-1000..1000)."),
    name: str | None = typer.Option(None, "--name", help="A name for the job."),
    cwd: str | None = typer.Option(None, "--cwd", help="Working directory on the worker."),
    cancel_on_interrupt: bool = typer.Option(False, "--cancel-on-interrupt", help="With --wait: Ctrl-C cancels the job (else it keeps running; a second Ctrl-C within 2 s cancels it)."),
    in_: str | None = typer.Option(None, "--in", help="Run it no sooner than this long from now: 90s, 10m, 1h30m, 2d (scheduled until then)."),
    at: str | None = typer.Option(None, "--at", help="Run it no sooner than this time, RFC 3339 with its offset: 2026-12-24T08:00:00+01:00 or ...Z."),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key", help="Run it once per key: a submit with the key of a kept job is that job, not a second run."),
    rate_key: List[str] | None = typer.Option(None, "--rate-key", help="A rate limit (orch limit set) its start counts against (repeatable); one that is used up puts the start off."),
    concurrency_key: str | None = typer.Option(None, "--concurrency-key", help="At most --concurrency-limit jobs with this key run at once, across the cluster."),
    concurrency_limit: int | None = typer.Option(None, "--concurrency-limit", min=1, max=100000, help="How many jobs of --concurrency-key may run at once (default 1)."),
    on_limit: str | None = typer.Option(None, "--on-limit", help="When the key is full: queue (wait, the default), skip_new (end this job skipped) or cancel_running (cancel the oldest to make room)."),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Submit a job: orch run echo hello --wait; orch run --wait -- ls -la; orch run --in 10m -- ./report.sh."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})
    spec: dict[str, Any] = {"shell": " ".join(command)} if shell else {"command": list(command)}
    spec.update(_when(in_, at))
    extra = {"env": _parse_env(env) or None, "timeout": timeout, "queue": queue, "priority": priority,
             "name": name, "cwd": cwd, "max_attempts": retries + 1 if retries is not None else None,
             "idempotency_key": idempotency_key, "rate_keys": list(rate_key) if rate_key else None}
    spec.update({k: v for k, v in extra.items() if v is not None})
    if concurrency_key is not None:
        spec["concurrency"] = {"key": concurrency_key, "limit": concurrency_limit or 1,
                               **({"on_limit": on_limit} if on_limit is not None else {})}
    elif concurrency_limit is not None or on_limit is not None:
        fail("--concurrency-limit and --on-limit go with --concurrency-key KEY", 2)
    if retry_on_exit is not None:
        try:
            spec["retry_on_exit"] = [int(c) for c in retry_on_exit.split(",") if c.strip()]
        except ValueError:
            fail(f"--retry-on-exit takes exit codes like 1,75, not {retry_on_exit!r}", 2)

    async def main() -> int:
        async with client_for(settings) as client:
            job = await client.submit(spec)
            if job.get("idempotent_replay"):  # said on stderr: stdout stays the id (or the job's output)
                typer.echo(f"orch: job {job['id']} was submitted before with idempotency key {idempotency_key!r} "
                           f"({job['state']}): not run again", err=True)
            if not wait:
                emit_json(job) if as_json else typer.echo(job["id"])
                return 0
            job_id = job["id"]

            async def to_the_end() -> int:
                if not as_json:
                    return await _stream(client, job_id)
                while True:
                    done = await client.wait(job_id, 30)
                    if done["state"] in _ENDED:
                        emit_json(done)
                        return _exit_code(done)

            # The id goes to stderr at once (stdout is the job's): a Ctrl-C never leaves it nameless.
            later = f", scheduled for {_short(job['scheduled_for'])}" if job.get("scheduled_for") else ""
            return await _interruptible(client, job_id, to_the_end(), cancel_on_interrupt,
                                        announce=f"orch: job {job_id}{later}")

    raise typer.Exit(run_async(main(), ORCH_FAILED if wait else None))


async def _interruptible(client: Any, job_id: int, waiting: Awaitable[int], cancel: bool, announce: str) -> int:
    """Wait for a job's end; on Ctrl-C stop waiting and leave the job running, saying so (a second Ctrl-C
    within 2 s, or ``cancel``, cancels it). ``announce`` is printed on stderr once Ctrl-C is ours.
    The exit code: the job's, or INTERRUPTED."""
    loop = asyncio.get_running_loop()
    hits: asyncio.Queue[None] = asyncio.Queue()
    try:
        loop.add_signal_handler(signal.SIGINT, hits.put_nowait, None)
    except (NotImplementedError, RuntimeError):  # no signal handlers here: Ctrl-C is KeyboardInterrupt
        typer.echo(announce, err=True)
        return await waiting
    typer.echo(announce, err=True)
    task = asyncio.ensure_future(waiting)
    hit = asyncio.ensure_future(hits.get())
    try:
        await asyncio.wait({task, hit}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with suppress(asyncio.CancelledError, OrchError):
            await task
        if not cancel:
            typer.echo(f"orch: job {job_id} is still running; orch cancel {job_id} stops it, "
                       f"orch logs -f {job_id} follows it", err=True)
            try:
                await asyncio.wait_for(hits.get(), 2.0)
            except TimeoutError:
                return INTERRUPTED
        try:
            job = await client.cancel(job_id)
        except ApiError as e:
            if e.http_status != 409:
                raise
            typer.echo(f"orch: job {job_id} had already ended", err=True)
            return INTERRUPTED
        if job["state"] == JobState.CANCELLED:
            typer.echo(f"orch: job {job_id} cancelled", err=True)
        else:
            typer.echo(f"orch: job {job_id} is being cancelled: its worker stops it", err=True)
        return INTERRUPTED
    finally:
        hit.cancel()
        loop.remove_signal_handler(signal.SIGINT)


def _exit_code(job: dict[str, Any]) -> int:
    if job["state"] == JobState.SUCCEEDED:
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
    if end.get("state") != JobState.SUCCEEDED and end.get("error"):
        typer.echo(visible(f"orch: job {job_id} {end.get('state')}: {end['error']}"), err=True)
    return _exit_code(end) if end else 1


def _job_ref(job: str) -> str:
    if not (job.isascii() and job.isdigit()):
        fail(f"a job id is a number, not {job!r}", 2)
    return job


@app.command()
def status(
    job: str = typer.Argument(..., help="Job id."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Show a job: its state, result, attempts and the history of its state changes."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            data = await client.job(_job_ref(job))
            events = await client.events(job)
        if as_json:
            emit_json({**data, "events": events})
            return
        typer.echo(format_status(data, events))

    run_async(main())


def _short(ts: str | None, zone: bool = True) -> str:
    """An API time (ISO 8601, UTC) as people read it, saying its zone unless a table header does."""
    if not ts:
        return "-"
    return ts.replace("T", " ").rstrip("Z") + (" UTC" if zone else "")


def _command_text(spec: dict[str, Any]) -> str:
    import shlex

    from orch.core.spec import argv_of

    if "shell" in spec:
        return str(spec["shell"])
    try:
        return shlex.join(argv_of(spec))
    except (KeyError, TypeError):
        return "?"


def format_status(job: dict[str, Any], events: list[dict[str, Any]]) -> str:
    lines = [
        f"job {job['id']}  {job['state']}" + ("  (cancel requested)" if job.get("cancel_requested") and job["state"] == JobState.RUNNING else ""),
        *([f"  name:      {job['name']}"] if job.get("name") else []),
        f"  command:   {_command_text(job['spec'])}",
        f"  queue:     {job['queue']}  priority {job['priority']}  attempt {job['attempt']}/{job['max_attempts']}",
        f"  created:   {_short(job['created_at'])}",
        f"  started:   {_short(job['started_at'])}",
        f"  finished:  {_short(job['finished_at'])}",
    ]
    if job.get("retry_at"):
        lines.append(f"  retry at:  {_short(job['retry_at'])}")
    if job.get("scheduled_for"):
        lines.append(f"  due at:    {_short(job['scheduled_for'])}  (scheduled: then it is queued)")
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
        lines += [f"  {format_event(e)}" for e in events]
    # Each line escaped whole: whatever field the server filled in, it cannot end the line or move the cursor.
    return "\n".join(visible(line) for line in lines)


@app.command()
def jobs(
    state: str | None = typer.Option(None, "--state", help=f"Only jobs in this state: {', '.join(JobState)}."),
    queue: str | None = typer.Option(None, "--queue", help="Only jobs of this queue."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="At most this many (newest first)."),
    cursor: str | None = typer.Option(None, "--cursor", help="Start after this page cursor."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """List jobs, newest first."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            page = await client.jobs(state=state, queue=queue, limit=limit, cursor=cursor)
        if as_json:
            emit_json(page)
            return
        rows = [["ID", "STATE", "QUEUE", "ATTEMPT", "EXIT", "CREATED (UTC)", "COMMAND"]]
        for j in page["jobs"]:
            rows.append([str(j["id"]), j["state"], j["queue"], f"{j['attempt']}/{j['max_attempts']}",
                         "" if j["exit_code"] is None else str(j["exit_code"]), _short(j["created_at"], zone=False),
                         j["command"][:60]])
        typer.echo(table(rows))
        if page.get("next_cursor"):
            typer.echo(f"more: --cursor {page['next_cursor']}")

    run_async(main())


def table(rows: list[list[str]]) -> str:
    rows = [[visible(c) for c in r] for r in rows]  # before the widths: an escape is wider than its character
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@app.command()
def logs(
    job: str = typer.Argument(..., help="Job id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing output until the job ends."),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Print a job's output (stdout to stdout, stderr to stderr)."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> int:
        async with client_for(settings) as client:
            if follow:
                return await _stream(client, int(_job_ref(job)))
            out = await client.output(_job_ref(job))
        sys.stdout.write(out["stdout"])
        sys.stdout.flush()
        sys.stderr.write(out["stderr"])  # what was not kept is marked where it is missing (orch/output.py)
        return 0

    raise typer.Exit(run_async(main(), ORCH_FAILED if follow else None))


@app.command()
def ui(
    no_open: bool = typer.Option(False, "--no-open", help="Print the link; do not start a browser."),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Open the web dashboard signed in: a one-time link, good for a minute (the client token signs it)."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> str:
        async with client_for(settings) as client:
            data = await client.request("POST", "/v1/ui/link")
            return str(client.server) + str(data["path"])

    link = run_async(main())
    typer.echo(link)
    if not no_open:
        import webbrowser

        if not webbrowser.open(link):
            typer.echo("(no browser found here: open the link above within a minute)", err=True)


@app.command()
def cancel(
    job: str = typer.Argument(..., help="Job id."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Cancel a job: scheduled, queued and retrying jobs at once, running ones at the worker's next heartbeat."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            data = await client.cancel(_job_ref(job))
        if as_json:
            emit_json(data)
        elif data["state"] == JobState.CANCELLED:
            typer.echo(f"job {data['id']} cancelled")
        else:
            typer.echo(f"job {data['id']} is running; its worker will stop it")

    run_async(main())


@app.command()
def purge(
    older_than: str = typer.Option(..., "--older-than", help="Jobs that ended longer ago than this: 90s, 10m, 12h, 7d (0: every ended job)."),
    state: str | None = typer.Option(None, "--state", help="Only jobs that ended so: succeeded, failed or cancelled."),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Delete ended jobs with their attempts, output and events (retention.finished_jobs does it on its own)."""
    seconds = parse_duration(older_than)
    if seconds is None:
        fail(f"--older-than takes a duration like 90s, 10m, 12h or 7d, not {older_than!r}", 2)
    if state is not None and state not in TERMINAL:
        fail(f"--state is {', '.join(sorted(TERMINAL))}, not {state!r}", 2)
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            n = await client.purge(seconds, state)
        what = f"{state} " if state else "ended "
        typer.echo(f"purged {n} {what}job{'' if n == 1 else 's'} that ended more than {older_than.strip()} ago")

    run_async(main())


def who_am_i() -> str:
    """user@host, as a replay's event records who asked (the scheduler adds the address it came from)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no login name and no passwd entry (a container's numeric user)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return visible(f"{user}@{socket.gethostname()}")[:128] or "unknown"


@app.command()
def retry(
    jobs: List[str] = typer.Argument(None, help="Job ids (or use --state)."),
    state: str | None = typer.Option(None, "--state", help="Replay every job in this state: failed or cancelled."),
    queue: str | None = typer.Option(None, "--queue", help="With --state: only this queue's jobs."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Replay failed or cancelled jobs: each is queued again with a fresh set of attempts (its max_attempts), and
    its history keeps every earlier attempt. `orch retry 17 18`, or `orch retry --state failed [--queue Q]` for a
    whole dead-letter set (`orch jobs --state failed` lists it). Exits 5 if a job named could not be replayed for its
    state, 4 if one named does not exist."""
    if bool(jobs) == (state is not None):
        fail(f"name the jobs to replay: job ids, or --state {'|'.join(sorted(REPLAYABLE))}", 2)
    if queue is not None and state is None:
        fail("--queue goes with --state (job ids name their jobs already)", 2)
    if state is not None and state not in REPLAYABLE:
        fail(f"--state is {' or '.join(sorted(REPLAYABLE))}, not {state!r}", 2)
    ids = [int(_job_ref(j)) for j in jobs or []]
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> int:
        async with client_for(settings) as client:
            if len(ids) == 1:
                job = await client.retry(ids[0], by=who_am_i())
                data = {"replayed": [job["id"]], "refused": []}
            else:
                data = await client.retry_many(ids=ids or None, state=state, queue=queue, by=who_am_i())
        if as_json:
            emit_json(data)
        else:
            replayed = data["replayed"]
            if len(ids) == 1:
                typer.echo(f"job {ids[0]} queued again")
            elif state is not None:
                where = f" of queue {queue}" if queue else ""
                typer.echo(f"{len(replayed)} {state} job{'s' if len(replayed) != 1 else ''}{where} queued again"
                           + (f": {_id_list(replayed)}" if replayed else ""))
            else:
                typer.echo(f"{len(replayed)} of {len(set(ids))} jobs queued again"
                           + (f": {_id_list(replayed)}" if replayed else ""))
            for r in data["refused"]:
                typer.echo(f"orch: {visible(r['error']['message'])}", err=True)
        if not data["refused"] or not ids:
            return 0
        # 5 if a job named could not be replayed for its state, else 4: one named is not there.
        return 5 if any(r["error"]["code"] != "not_found" for r in data["refused"]) else 4

    raise typer.Exit(run_async(main()))


def _id_list(ids: List[int], most: int = 20) -> str:
    shown = " ".join(str(i) for i in ids[:most])
    return shown + (f" ... (+{len(ids) - most})" if len(ids) > most else "")


@app.command()
def workers(
    show_all: bool = typer.Option(False, "--all", help="Also stopped and lost workers not heard from for longer than scheduler.worker_retention (1 h)."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """List workers: state, last heartbeat, running jobs."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            items = await client.workers(show_all=show_all)
        if as_json:
            emit_json({"workers": items})
            return
        rows = [["ID", "NAME", "STATE", "HOST", "QUEUES", "RUNNING", "HEARTBEAT", "METRICS"]]
        for w in items:
            rows.append([w["id"], w["name"], w["state"], w["hostname"], ",".join(w["queues"]),
                         f"{w['running']}/{w['concurrency']}", f"{w['heartbeat_age']:.1f}s ago",
                         w.get("metrics") or "-"])
        typer.echo(table(rows))

    run_async(main())


@app.command()
def plugins(
    plugin: List[str] | None = typer.Option(None, "--plugin", help="Also load this plugin module, as orch worker --plugin does (repeatable)."),
    as_json: bool = JsonOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """List the runners a worker on this machine would have, where each comes from, and whether it is available
    here; broken plugins are listed with why. Exits 1 if a plugin is broken."""
    settings = settings_for(config)
    found_paths = (*settings["plugins"], *(plugin or ()))

    async def main() -> list[dict[str, Any]]:
        import socket

        from orch.plugins import discover
        from orch.worker.runners import Context

        ctx = Context("orch-plugins", settings.worker_host or socket.gethostname(), settings.concurrency,
                      {**settings.as_dict(), "worker.imports": []})
        items: list[dict[str, Any]] = []
        for f in discover(found_paths):
            item: dict[str, Any] = {"name": f.name, "source": f.source, "target": f.target}
            if f.error is not None:
                item.update(status="broken", detail=f.error)
            else:
                runner = None
                try:
                    runner = f.runner(ctx.settings)
                    await runner.start(ctx)
                    why = runner.unavailable()
                except Exception as e:  # a plugin's own failure: shown, not raised
                    why = f"its start failed: {type(e).__name__}: {e}"
                finally:
                    if runner is not None:
                        with contextlib.suppress(Exception):
                            await runner.close()
                item.update(status="unavailable" if why else "available", detail=why or f.runner.summary)
            items.append(item)
        return items

    items = run_async(main())
    if as_json:
        emit_json({"runners": items})
    else:
        rows = [["RUNNER", "STATUS", "FROM", "TARGET", "DETAIL"]]
        rows += [[i["name"], i["status"], i["source"], i["target"], i["detail"] or ""] for i in items]
        typer.echo(table(rows))
    if any(i["status"] == "broken" for i in items):
        raise typer.Exit(1)


@app.command()
def queues(
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """List queues: jobs queued (the depth), running, scheduled and retrying, whether paused, the oldest wait."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            items = await client.queues()
        if as_json:
            emit_json({"queues": items})
            return
        rows = [["QUEUE", "STATE", "QUEUED", "RUNNING", "SCHEDULED", "RETRYING", "LIMIT", "HELD", "OLDEST QUEUED"]]
        for q in items:
            age = q["oldest_queued_age"]
            rows.append([visible(q["name"]), "paused" if q["paused"] else "active", str(q["queued"]), str(q["running"]),
                         str(q["scheduled"]), str(q["retrying"]),
                         str(q["concurrency"]) if q.get("concurrency") is not None else "-", str(q.get("held", 0)),
                         f"{age:.1f}s ago" if age is not None else "-"])
        typer.echo(table(rows))

    run_async(main())


def _pause(queue: str, paused: bool, as_json: bool, settings: Settings) -> None:
    async def main() -> None:
        async with client_for(settings) as client:
            q = await client.pause_queue(queue, paused)
        if as_json:
            emit_json(q)
            return
        word = "paused" if paused else "resumed"
        if not q["changed"]:
            typer.echo(f"queue {q['name']} was {word if paused else 'not paused'} already")
        elif paused:
            typer.echo(f"queue {q['name']} paused: none of its {q['queued']} queued jobs will start until "
                       f"`orch queue resume {q['name']}`; {q['running']} running go on")
        else:
            typer.echo(f"queue {q['name']} resumed ({q['queued']} queued)")

    run_async(main())


@queue_app.command("pause")
def queue_pause(
    queue: str = typer.Argument(..., help="Queue name."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Pause a queue: no job of it is handed out until it is resumed (jobs may still be submitted to it); its
    running jobs go on."""
    _pause(queue, True, as_json, settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)}))


@queue_app.command("resume")
def queue_resume(
    queue: str = typer.Argument(..., help="Queue name."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Resume a paused queue: its queued jobs are handed out again."""
    _pause(queue, False, as_json, settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)}))


@queue_app.command("set")
def queue_set(
    queue: str = typer.Argument(..., help="Queue name."),
    concurrency: int | None = typer.Option(None, "--concurrency", min=1, max=100000, help="At most this many of its jobs run at once, across the cluster."),
    unlimited: bool = typer.Option(False, "--unlimited", help="Lift its concurrency limit."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Set a queue's concurrency limit: orch queue set email --concurrency 4 (or --unlimited)."""
    if (concurrency is None) == (not unlimited):
        fail("give --concurrency N or --unlimited", 2)
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            q = await client.set_queue(queue, concurrency)
        if as_json:
            emit_json(q)
            return
        limit = f"at most {q['concurrency']} of its jobs run at once" if q["concurrency"] is not None else "no limit"
        typer.echo(f"queue {q['name']}: {limit}" + ("" if q["changed"] else " (as it was)"))

    run_async(main())


@app.command()
def limits(
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """List rate limits: each one's rate, burst and when its next start is allowed."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            items = await client.limits()
        if as_json:
            emit_json({"limits": items})
            return
        rows = [["LIMIT", "RATE", "BURST", "NEXT START (UTC)"]]
        rows += [[x["name"], x["rate"], str(x["burst"]), _short(x["next_start_at"], zone=False)] for x in items]
        typer.echo(table(rows))

    run_async(main())


@limit_app.command("set")
def limit_set(
    name: str = typer.Argument(..., help="The limit's name, as jobs name it in --rate-key / rate_keys."),
    rate: str = typer.Option(..., "--rate", help="Starts allowed: COUNT/UNIT, e.g. 100/m, 10/s, 5/10s (units s, m, h, d)."),
    burst: int | None = typer.Option(None, "--burst", help="Starts a bucket left unused may let through at once (default 1: evenly spaced)."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Make a rate limit, or change its rate: the jobs naming it start at most at that rate, cluster-wide."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            x = await client.set_limit(name, rate, burst)
        if as_json:
            emit_json(x)
        else:
            typer.echo(f"rate limit {x['name']}: {x['rate']}, burst {x['burst']}")

    run_async(main())


@limit_app.command("delete")
def limit_delete(
    name: str = typer.Argument(..., help="The limit's name."),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Delete a rate limit: jobs it put off keep their times; a submit naming it is refused from now on."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            await client.delete_limit(name)
        typer.echo(f"rate limit {name} deleted")

    run_async(main())


def format_event(e: dict[str, Any]) -> str:
    return visible(f"{_short(e['at'])}  #{e['attempt']}  {e['from'] or '-'} -> {e['to']}  {e['reason']}")


@app.command()
def events(
    job: str = typer.Argument(..., help="Job id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing state changes until the job ends."),
    as_json: bool = typer.Option(False, "--json", help="Print each event as one JSON object per line."),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Print a job's state changes (when, attempt, from, to, why); --follow streams them until it ends."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    def show(e: dict[str, Any]) -> None:
        typer.echo(json.dumps(e, separators=(",", ":")) if as_json else format_event(e))
        sys.stdout.flush()

    async def main() -> None:
        async with client_for(settings) as client:
            if not follow:
                for e in await client.events(_job_ref(job)):
                    show(e)
                return
            async for e in client.follow_events(_job_ref(job)):
                if e.get("end"):
                    break
                show(e)

    run_async(main())


@app.command()
def why(
    job: str = typer.Argument(..., help="Job id."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Explain why a job is not running (yet): no worker, waiting for a slot, backoff, a quiet worker's lease, ..."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            data = await client.why(_job_ref(job))
        if as_json:
            emit_json(data)
        else:
            typer.echo(visible(f"{data['reason']}: {data['message']}"))

    run_async(main())


# =========================================================================== orch submit: many jobs from a file

_ENDED = tuple(s.value for s in JobState if s.terminal)
WAIT_IDS = 10_000  # ids in one POST /v1/jobs/wait, at most (the API's limit)
_PACE_ABOVE, _PACE = 64, 0.1  # with more jobs left than this, at most one wait request per _PACE seconds


def _read_specs(file: str) -> tuple[list[dict[str, Any]], bool]:
    """Job specs of a JSON-lines file, or of a workflow file (YAML: ``jobs:`` by name with ``needs:``, see
    orch/workflow.py), ``-`` reading stdin; every one checked before anything is submitted. True: a workflow."""
    from orch.core.spec import parse_spec

    name = "stdin" if file == "-" else file
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {name}: {getattr(e, 'strerror', None) or e}", 2)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
    if file.endswith((".yaml", ".yml")) or (first and not first.startswith("{")):
        return _read_workflow(text, name), True
    specs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            spec = json.loads(line)
        except (ValueError, RecursionError) as e:
            fail(f"{name} line {n}: not valid JSON: {e}", 2)
        try:
            parse_spec(spec)
        except ValidationError as e:
            where = f" ({e.field})" if e.field and e.field not in e.message else ""
            fail(f"{name} line {n}: {e.message}{where}", 2)
        specs.append(spec)
    if not specs:
        fail(f"{name} holds no job specs", 2)
    return specs, False


def _read_workflow(text: str, name: str) -> list[dict[str, Any]]:
    import yaml

    from orch.workflow import specs_of

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        fail(f"{name}: not valid YAML: {e}", 2)
    try:
        specs = specs_of(doc)
    except OrchError as e:
        where = f" ({e.field})" if e.field and e.field not in e.message else ""
        fail(f"{name}: {e.message}{where}", 2)
    if len(specs) > 10_000:
        fail(f"{name}: a workflow is one batch of at most 10,000 jobs, not {len(specs):,}", 2)
    return specs


async def _wait_for_jobs(client: Any, ids: list[int], on_progress: Callable[[int, dict[str, int]], None]) -> dict[str, int]:
    """Wait until every job in ``ids`` has ended; the count per end state.

    One long-poll at a time (POST /v1/jobs/wait, up to WAIT_IDS ids): it answers as soon as any of
    them has ended, with all that have. With many jobs left, asks at most a few times a second, so a
    stream of ends is taken in batches rather than one round trip each.
    """
    left = list(dict.fromkeys(ids))
    counts = {s: 0 for s in _ENDED}
    loop = asyncio.get_running_loop()
    while left:
        began = loop.time()
        reply = await client.wait_many(left[:WAIT_IDS], 30)
        done = {j["id"]: j["state"] for j in reply["ended"]}
        for state in done.values():
            counts[state] += 1
        left = [i for i in left if i not in done]
        on_progress(len(ids) - len(left), counts)
        if len(left) > _PACE_ABOVE:
            rest = _PACE - (loop.time() - began)
            if rest > 0:
                await asyncio.sleep(rest)
    return counts


@app.command()
def submit(
    file: str = typer.Option(..., "--file", "-f", help="Job specs, one JSON object per line ('-' reads stdin; # comments), or a workflow file (YAML: jobs by name with needs:)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for every job to end (progress on stderr); exit 0 only if all succeeded (a workflow: if it succeeded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the new ids as a JSON list."),
    batch_size: int = typer.Option(1000, "--batch-size", min=1, max=10_000, help="Jobs per request (up to 10,000)."),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Submit many jobs from a JSON-lines file, in batches: orch submit --file jobs.jsonl --wait; or a workflow, in
    one batch: orch submit --file pipeline.yaml --wait."""
    import time

    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})
    specs, is_workflow = _read_specs(file)
    if is_workflow:
        batch_size = len(specs)  # all or nothing: its jobs name each other

    async def main() -> int:
        async with client_for(settings) as client:
            started = time.monotonic()
            ids: list[int] = []
            try:
                for i in range(0, len(specs), batch_size):
                    ids += [j["id"] for j in await client.submit_many(specs[i:i + batch_size])]
            except OrchError as e:
                if ids:
                    e.message += f" ({len(ids)} of {len(specs)} jobs were submitted before: ids {ids[0]}..{ids[-1]})"
                raise
            if as_json:
                typer.echo(json.dumps(ids))
            else:
                typer.echo("\n".join(str(i) for i in ids))
            if not wait:
                return 0
            counts = await _wait_with_progress(client, ids)
            graph = await client.workflow(ids[0]) if is_workflow else None
        elapsed = time.monotonic() - started
        ok = counts["succeeded"]
        if graph is not None:
            typer.echo(_workflow_text(graph), err=as_json)
        typer.echo(f"succeeded {ok}, failed {counts['failed']}, cancelled {counts['cancelled']}"
                   + (f", skipped {counts['skipped']}" if counts["skipped"] else "")
                   + f", elapsed {elapsed:.2f} s, {len(ids) / elapsed:,.1f} jobs/s", err=as_json)
        if graph is not None:
            return 0 if graph["state"] == JobState.SUCCEEDED.value else 1
        return 0 if ok == len(ids) else 1

    raise typer.Exit(run_async(main(), ORCH_FAILED if wait else None))


async def _wait_with_progress(client: Any, ids: list[int]) -> dict[str, int]:
    from rich.console import Console  # imported here: rich costs every other command ~0.3 s of start-up
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("jobs ended", total=len(ids), detail="")

        def on_progress(done: int, ended: dict[str, int]) -> None:
            bad = ended["failed"] + ended["cancelled"]
            skipped = f", {ended['skipped']} skipped" if ended["skipped"] else ""
            progress.update(task, completed=done, detail=f"({bad} failed or cancelled{skipped})" if bad or skipped
                            else "")

        counts = await _wait_for_jobs(client, ids, on_progress)
        progress.update(task, completed=len(ids), detail="")
    return counts


# =========================================================================== orch workflow


workflow_app = typer.Typer(help="Show a workflow: the jobs of one batch that name each other (depends_on, needs:).",
                           no_args_is_help=True)
app.add_typer(workflow_app, name="workflow")


def _workflow_text(graph: dict[str, Any]) -> str:
    """A workflow as a table in the order its jobs may run (each after what it needs), with each job's state and
    what it waits on; a header with its state and its jobs by state."""
    jobs = {j["id"]: j for j in graph["jobs"]}
    order: list[int] = []
    placed: set[int] = set()
    depth: dict[int, int] = {}

    def place(jid: int, seen: tuple[int, ...] = ()) -> int:
        if jid in depth or jid not in jobs or jid in seen:
            return depth.get(jid, 0)
        d = 1 + max((place(x["job_id"], (*seen, jid)) for x in jobs[jid]["dependencies"] if x["job_id"] in jobs),
                    default=-1)
        depth[jid] = d
        return d

    for jid in jobs:
        place(jid)
    for jid in sorted(jobs, key=lambda i: (depth.get(i, 0), i)):
        if jid not in placed:
            placed.add(jid)
            order.append(jid)
    counts = ", ".join(f"{n} {s}" for s, n in graph["counts"].items())
    rows = [["ID", "JOB", "STATE", "NEEDS"]]
    for jid in order:
        j = jobs[jid]
        needs = []
        for d in j["dependencies"]:
            who = visible(d["ref"]) if d["ref"] else str(d["job_id"])
            mark = "" if d["on"] == "success" else f" ({d['on']})"
            needs.append(who + mark + ("" if d["met"] or d["state"] not in _ENDED else " x"))
        rows.append([str(jid), "  " * depth.get(jid, 0) + visible(j.get("ref") or j.get("name") or "-"), j["state"],
                     ", ".join(needs) or "-"])
    return f"workflow {graph['id']}: {graph['state']} ({counts})\n" + table(rows)


@workflow_app.command("show")
def workflow_show(
    job: str = typer.Argument(..., help="The id of any job of the workflow."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Print a workflow's graph: each job (indented by how deep it is), its state, and the jobs it needs."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            graph = await client.workflow(_job_ref(job))
        if as_json:
            emit_json(graph)
        else:
            typer.echo(_workflow_text(graph))

    run_async(main())


# =========================================================================== orch schedule

schedule_app = typer.Typer(help="Cron schedules: jobs submitted at times a cron expression names.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


def _schedule_line(x: dict[str, Any]) -> list[str]:
    last = x.get("last_job")
    return [visible(x["name"]), x["cron"], x["tz"], x["overlap"], "paused" if x["paused"] else _short(x["next_at"]),
            f"{last['id']} {last['state']}" if last else "-", str(x["fired"]), str(x["skipped"]), str(x["missed"])]


_SCHEDULE_HEAD = ["NAME", "CRON", "TZ", "OVERLAP", "NEXT", "LAST JOB", "FIRED", "SKIPPED", "MISSED"]


@schedule_app.command("add", context_settings={"allow_interspersed_args": True, "ignore_unknown_options": True})
def schedule_add(
    name: str = typer.Argument(..., help="The schedule's name (1-64 of letters, digits, _ . : -)."),
    command: List[str] = typer.Argument(..., help="The command and its arguments, after --."),
    cron_expr: str = typer.Option(..., "--cron", help="Five fields (minute hour day month weekday), or six with seconds first: '*/5 * * * *'."),
    tz: str = typer.Option("UTC", "--tz", help="IANA time zone of the expression, e.g. Europe/Berlin."),
    overlap: str = typer.Option("skip", "--overlap", help="While the previous job runs: skip, allow, cancel_running or queue_one."),
    catchup: str = typer.Option("60s", "--catchup", help="How late a tick may still fire (after downtime): 90s, 10m, 1h; older ones are missed."),
    paused: bool = typer.Option(False, "--paused", help="Make it paused."),
    shell: bool = typer.Option(False, "--shell", help="Run the words as one line through /bin/sh -c."),
    env: List[str] | None = typer.Option(None, "--env", help="KEY=VALUE for the job's environment (repeatable)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds before the job is killed."),
    retries: int | None = typer.Option(None, "--retries", min=0, max=99, help="Retries after a failure."),
    queue: str | None = typer.Option(None, "--queue", help="Queue (default: default)."),
    priority: int | None = typer.Option(None, "--priority", help="Higher runs first (-1000..1000)."),
    job_name: str | None = typer.Option(None, "--name", help="A name for its jobs."),
    cwd: str | None = typer.Option(None, "--cwd", help="Working directory on the worker."),
    concurrency_key: str | None = typer.Option(None, "--concurrency-key", help="At most --concurrency-limit jobs with this key run at once."),
    concurrency_limit: int | None = typer.Option(None, "--concurrency-limit", min=1, max=100000, help="How many jobs of --concurrency-key may run at once (default 1)."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Make a schedule: orch schedule add nightly --cron '30 2 * * *' --tz Europe/Berlin -- ./backup.sh."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})
    job: dict[str, Any] = {"shell": " ".join(command)} if shell else {"command": list(command)}
    extra = {"env": _parse_env(env) or None, "timeout": timeout, "queue": queue, "priority": priority,
             "name": job_name, "cwd": cwd, "max_attempts": retries + 1 if retries is not None else None}
    job.update({k: v for k, v in extra.items() if v is not None})
    if concurrency_key is not None:
        job["concurrency"] = {"key": concurrency_key, "limit": concurrency_limit or 1}
    seconds = parse_duration(catchup)
    if seconds is None:
        fail(f"--catchup takes a duration such as 90s, 10m or 1h, not {catchup!r}", 2)
    body = {"name": name, "cron": cron_expr, "tz": tz, "overlap": overlap, "catchup": seconds, "job": job,
            "paused": paused}

    async def main() -> None:
        async with client_for(settings) as client:
            made = await client.create_schedule(body)
        if as_json:
            emit_json(made)
        else:
            typer.echo(f"schedule {visible(made['name'])}: {made['cron']} ({made['tz']}), next "
                       f"{'never (paused)' if made['paused'] else _short(made['next_at'])}")

    run_async(main())


@schedule_app.command("list")
def schedule_list(
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """List the schedules: expression, zone, next run, last job, and how many ticks fired, were skipped, missed."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        async with client_for(settings) as client:
            items = await client.schedules()
        if as_json:
            emit_json({"schedules": items})
        else:
            typer.echo(table([_SCHEDULE_HEAD, *(_schedule_line(x) for x in items)]))

    run_async(main())


@schedule_app.command("next")
def schedule_next(
    name: str = typer.Argument(..., help="The schedule."),
    n: int = typer.Option(5, "-n", min=1, max=100, help="How many next run times."),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Print a schedule's next run times (UTC and in its zone)."""
    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

    async def main() -> None:
        from datetime import datetime
        from zoneinfo import ZoneInfo

        async with client_for(settings) as client:
            x = await client.schedule(name, n)
        if as_json:
            emit_json(x["next"])
            return
        zone = ZoneInfo(x["tz"]) if x["tz"] != "UTC" else None
        for t in x["next"]:
            when = datetime.fromisoformat(t.replace("Z", "+00:00"))
            local = f"  ({when.astimezone(zone).isoformat()} {x['tz']})" if zone else ""
            typer.echo(f"{t}{local}")

    run_async(main())


def _schedule_verb(verb: str, doc: str) -> None:
    @schedule_app.command(verb, help=doc)
    def command(
        name: str = typer.Argument(..., help="The schedule."),
        as_json: bool = JsonOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        ca: Path | None = CaOpt,
        data_dir: Path | None = DataDirOpt,
        config: Path | None = ConfigOpt,
    ) -> None:
        settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})

        async def main() -> None:
            async with client_for(settings) as client:
                if verb == "delete":
                    got = await client.delete_schedule(name)
                else:
                    got = await client.schedule_action(name, verb)
            if as_json:
                emit_json(got)
            elif verb == "trigger":
                typer.echo(got["id"])
            elif verb == "delete":
                typer.echo(f"schedule {visible(name)} deleted")
            else:
                typer.echo(f"schedule {visible(name)} {verb}d" + ("" if verb == "pause" else
                                                              f": next {_short(got['next_at'])}"))

        run_async(main())


_schedule_verb("pause", "Pause a schedule: its ticks do not fire until it is resumed.")
_schedule_verb("resume", "Resume a paused schedule: its ticks count from now.")
_schedule_verb("trigger", "Run a schedule's job now, once (prints the job's id).")
_schedule_verb("delete", "Delete a schedule (the jobs it submitted stay).")


@schedule_app.command("apply")
def schedule_apply(
    file: Path = typer.Option(..., "--file", "-f", help="YAML: schedules: {NAME: {cron, tz, overlap, catchup, job, paused}}."),
    prune: bool = typer.Option(False, "--prune", help="Delete the schedules the file does not name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would change; change nothing."),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    data_dir: Path | None = DataDirOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Make the cluster's schedules what a file says: create, change, and with --prune delete."""
    import yaml

    from orch.core.cron import check_schedule

    settings = settings_for(config, **{"client.server": server, **client_overrides(token, ca, data_dir)})
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        fail(f"cannot read {file}: {getattr(e, 'strerror', None) or e}", 2)
    if not isinstance(doc, dict) or not isinstance(doc.get("schedules"), dict) or set(doc) - {"schedules"}:
        fail(f"{file}: a schedules file is a map with 'schedules': a map of names to schedules", 2)
    wanted: dict[str, dict[str, Any]] = {}
    for name, body in doc["schedules"].items():
        if isinstance(body, dict) and isinstance(body.get("catchup"), str):
            seconds = parse_duration(body["catchup"])
            if seconds is None:
                fail(f"{file}: schedules.{name}.catchup is a duration such as 90s, 10m or 1h", 2)
            body = {**body, "catchup": seconds}
        try:
            check_schedule(str(name), body, prefix=f"schedules.{name}.")
        except ValidationError as e:
            fail(f"{file}: {e.message} ({e.field})", 2)
        wanted[str(name)] = body

    async def main() -> None:
        async with client_for(settings) as client:
            have = {x["name"]: x for x in await client.schedules(0)}
            for name, body in wanted.items():
                if name not in have:
                    typer.echo(f"create {visible(name)}")
                    if not dry_run:
                        await client.create_schedule({"name": name, **body})
                    continue
                old = have[name]
                changed = {k: v for k, v in body.items() if old.get(k) != v}
                if changed:
                    typer.echo(f"change {visible(name)}: {', '.join(sorted(changed))}")
                    if not dry_run:
                        await client.change_schedule(name, changed)
                else:
                    typer.echo(f"keep {visible(name)}")
            for name in sorted(set(have) - set(wanted)):
                if prune:
                    typer.echo(f"delete {visible(name)}")
                    if not dry_run:
                        await client.delete_schedule(name)
                else:
                    typer.echo(f"leave {visible(name)} (not in {file}; --prune deletes it)")

    run_async(main())


def main() -> None:
    app()


__all__ = ["app", "main", "normalize_server"]
