"""Settings: YAML file + ORCH_* environment + command-line flags, checked once, frozen.

Precedence: flag > environment > file > default. Every key is declared in KEYS
with its type, default and meaning; ``config/dev.yaml`` documents them all and
a test keeps the two in step. An unknown key or a bad value stops start-up
with a message naming the key and where it came from.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from orch.core.errors import ConfigError
from orch.core.retry import RetryPolicy
from orch.core.spec import NAME_RE


@dataclass(frozen=True)
class Key:
    kind: str  # int, float, str, bool, names, strs, codes, choice
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None


KEYS: dict[str, Key] = {
    "scheduler.host": Key("str", "127.0.0.1", "address the scheduler's API listens on"),
    "scheduler.port": Key("int", 8080, "port of the scheduler's API (0: any free port)", minimum=0),
    "scheduler.heartbeat_interval": Key("float", 2.0, "seconds between worker heartbeats (told to workers at registration)", minimum=0.05),
    "scheduler.lease_ttl": Key("float", 10.0, "seconds without a heartbeat after which a worker is lost and its leases expire", minimum=0.1),
    "scheduler.recovery_grace": Key("float", 10.0, "seconds every lease is extended by when the scheduler starts, so live workers can re-adopt their jobs", minimum=0),
    "scheduler.long_poll_timeout": Key("float", 30.0, "longest a lease or wait request is held open, in seconds", minimum=0.1),
    "scheduler.max_body_bytes": Key("int", 8 << 20, "largest request body accepted, in bytes", minimum=1024),
    "scheduler.output_limit_bytes": Key("int", 1 << 20, "output kept per attempt and stream (the tail; truncation is marked)", minimum=1024),
    "scheduler.max_result_bytes": Key("int", 64 << 10, "largest JSON value a job may write to $ORCH_RESULT_PATH (its result, its dependents' input)", minimum=16),
    "scheduler.max_spec_bytes": Key("int", 256 << 10, "largest job spec accepted, in bytes of JSON (large data belongs in files the job reads)", minimum=1024),
    "worker.host": Key("str", "", "host name a worker reports about itself (default: this machine's name)"),
    "worker.join": Key("str", "http://127.0.0.1:8080", "scheduler a worker joins when --join is not given; several, comma-separated (schedulers sharing a PostgreSQL database), are tried in turn"),
    "worker.name": Key("str", "", "worker name (default: host name and process id)"),
    "worker.concurrency": Key("int", 4, "jobs one worker runs at once", minimum=1),
    "worker.queues": Key("names", ["default"], "queues a worker takes jobs from"),
    "worker.kill_grace": Key("float", 5.0, "seconds between SIGTERM and SIGKILL when a job is timed out or cancelled", minimum=0),
    "worker.drain_grace": Key("float", 30.0, "seconds a stopping worker lets running jobs finish before handing them back", minimum=0),
    "concurrency": Key("int", None, "alias of worker.concurrency", minimum=1),
    "worker.imports": Key("strs", [], "Python modules the python runner's child interpreters import at their start (orch worker --import)"),
    "plugins": Key("strs", [], "plugin modules (pkg.mod or pkg.mod:attr) a worker loads runners from, beside the orch.runners entry points"),
    "python.pool": Key("int", 0, "child interpreters of a worker's python runner (0: the worker's concurrency)", minimum=0),
    "python.max_tasks": Key("int", 1000, "tasks a python child interpreter runs before it is replaced", minimum=1),
    "docker.host": Key("str", "", "the Docker engine the docker runner uses: unix:///path or tcp://host:port (default DOCKER_HOST, else unix:///var/run/docker.sock)"),
    "docker.volumes": Key("strs", [], "host directories docker jobs may mount (their subdirectories too); none by default"),
    "retry.max_attempts": Key("int", 3, "attempts a job gets unless it says otherwise (1: no retries)", minimum=1),
    "retry.backoff.base": Key("float", 1.0, "seconds before the first retry", minimum=0),
    "retry.backoff.factor": Key("float", 2.0, "growth of the delay per attempt", minimum=1),
    "retry.backoff.cap": Key("float", 300.0, "longest delay between attempts, in seconds", minimum=0),
    "retry.backoff.jitter": Key("float", 0.2, "random spread of each delay, as a fraction (0.2: +/-20%)", minimum=0),
    "retry.on_exit": Key("codes", None, "exit codes that earn a retry (empty/null: every non-zero code)"),
    "logging.level": Key("choice", "info", "log level", choices=("debug", "info", "warning", "error")),
    "logging.format": Key("choice", "text", "log line format", choices=("text", "json")),
    "metrics.host": Key("str", "127.0.0.1", "address the Prometheus metrics listeners (scheduler's and worker's) listen on"),
    "metrics.scheduler_port": Key("int", 9090, "port of the scheduler's Prometheus /metrics listener (0: none)", minimum=0),
    "metrics.worker_port": Key("int", 9091, "port of a worker's Prometheus /metrics listener (0: none)", minimum=0),
    "storage.backend": Key("choice", "sqlite", "where state is kept: sqlite (one file, the default) or postgres (storage.dsn; several schedulers may share it)", choices=("sqlite", "postgres")),
    "storage.dsn": Key("str", "", "PostgreSQL connection string for storage.backend postgres, e.g. postgresql://orch@db.example:5432/orch (a password is better kept in ~/.pgpass or PGPASSWORD)"),
    "storage.pool_size": Key("int", 8, "connections a scheduler keeps open to PostgreSQL", minimum=1),
    "storage.notify": Key("bool", True, "PostgreSQL: schedulers sharing the database wake each other's waiters with LISTEN/NOTIFY (false behind a PgBouncer in transaction mode: the poll alone, and no statement prepared on the server)"),
    "storage.poll_interval": Key("float", 2.0, "PostgreSQL: seconds between the polls that back up those wake-ups (the most a lost one delays a waiter)", minimum=0.05),
    "storage.data_dir": Key("str", "", "folder of all state (default: the platform's user data dir)"),
    "storage.path": Key("str", "", "SQLite database file (default: <data_dir>/orch.db)"),
    "storage.synchronous": Key("choice", "FULL", "SQLite synchronous level: FULL survives power loss, NORMAL only crashes", choices=("FULL", "NORMAL")),
    "client.server": Key("str", "http://127.0.0.1:8080", "scheduler the CLI talks to"),
    "auth.enabled": Key("bool", True, "demand a token on every /v1 route (false also needs the --no-auth flag)"),
    "auth.token": Key("str", "", "client token (submit, read, cancel); empty: the data dir's tokens.json"),
    "auth.join_token": Key("str", "", "worker join token (register); empty: the data dir's tokens.json"),
    "auth.read_token": Key("str", "", "a read-only token: the GET routes and a dashboard that shows but cannot act (empty: none)"),
    "ui.enabled": Key("bool", True, "serve the web dashboard at /ui on the API port"),
    "ui.session_ttl": Key("float", 43200.0, "seconds a dashboard sign-in lasts", minimum=60),
    "auth.metrics_open": Key("bool", False, "serve /metrics on the API port without a token"),
    "tls.cert": Key("str", "", "the scheduler's TLS certificate chain (PEM); with tls.key, the API speaks HTTPS"),
    "tls.key": Key("str", "", "the private key of tls.cert (PEM)"),
    "tls.ca": Key("str", "", "CA certificate (PEM) workers and clients trust for the scheduler (default: the system's)"),
    "scheduler.max_long_polls": Key("int", 64, "long-polls (lease) one worker may hold open at once; more get 429", minimum=1),
    "scheduler.max_client_long_polls": Key("int", 4096, "long-polls (wait, follow) all clients together may hold open at once; more get 429, which orch's CLI waits out", minimum=1),
    "scheduler.body_timeout": Key("float", 30.0, "seconds a request body may take to arrive; a slower sender gets 408", minimum=0.1),
    "scheduler.worker_retention": Key("float", 3600.0, "seconds a stopped or lost worker stays in orch workers after its last heartbeat (orch workers --all shows every one)", minimum=0),
    "retention.finished_jobs": Key("float", 604800.0, "seconds an ended job (succeeded, failed, cancelled) is kept after it ended, with its attempts, output and events; then it is purged (0: every job is kept)", minimum=0),
    "retention.interval": Key("float", 60.0, "seconds between two passes of retention", minimum=0.1),
    "scheduler.idle_timeout": Key("float", 75.0, "seconds a connection may sit idle (or without a complete request head) before it is closed", minimum=1),
}

# Environment names that are not simply ORCH_<KEY> upper-cased.
ENV_ALIASES = {"ORCH_SERVER": "client.server", "ORCH_DATA_DIR": "storage.data_dir",
               "ORCH_CONCURRENCY": "worker.concurrency",
               "ORCH_TOKEN": "auth.token", "ORCH_JOIN_TOKEN": "auth.join_token", "ORCH_READ_TOKEN": "auth.read_token"}


def env_name(key: str) -> str:
    return "ORCH_" + key.upper().replace(".", "_")


def _coerce(key: str, raw: Any, where: str, from_text: bool) -> Any:
    spec = KEYS[key]
    bad = f"{key} in {where}"
    if raw is None:
        if spec.default is None or spec.kind in ("codes", "str"):
            return None if spec.kind != "str" else ""
        raise ConfigError(f"{bad}: a value is required")
    kind = spec.kind
    try:
        if kind == "int":
            if isinstance(raw, bool) or (not from_text and not isinstance(raw, int)):
                raise ValueError
            value: Any = int(raw)
        elif kind == "float":
            if isinstance(raw, bool) or (not from_text and not isinstance(raw, (int, float))):
                raise ValueError
            value = float(raw)
            if not math.isfinite(value):
                # nan slips through every comparison with a minimum (a lease_ttl of nan never expires).
                raise ConfigError(f"{bad}: {raw!r} is not a finite number")
        elif kind == "bool":
            if from_text:
                if str(raw).lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = str(raw).lower() in ("1", "true", "yes", "on")
            elif not isinstance(raw, bool):
                raise ValueError
            else:
                value = raw
        elif kind == "str":
            if not isinstance(raw, (str, int)) or isinstance(raw, bool):
                raise ValueError
            value = str(raw)
        elif kind == "choice":
            value = str(raw)
            if key == "storage.synchronous":
                value = value.upper()
            elif key.startswith("logging."):
                value = value.lower()
            if value not in spec.choices:
                raise ConfigError(f"{bad}: {raw!r} is not one of {', '.join(spec.choices)}")
        elif kind == "names":
            items = raw.split(",") if from_text and isinstance(raw, str) else raw
            if not isinstance(items, list) or not items:
                raise ValueError
            value = [str(i).strip() for i in items]
            for v in value:
                if not NAME_RE.fullmatch(v):
                    raise ConfigError(f"{bad}: {v!r} is not a valid queue name")
        elif kind == "strs":
            items = [i.strip() for i in raw.split(",") if i.strip()] if from_text and isinstance(raw, str) else raw
            if not isinstance(items, list) or not all(isinstance(i, str) and i and "\x00" not in i for i in items):
                raise ValueError
            value = list(items)
        elif kind == "codes":
            items = [i for i in raw.split(",") if i.strip()] if from_text and isinstance(raw, str) else raw
            if not isinstance(items, list):
                raise ValueError
            value = tuple(int(i) for i in items) or None
            if value and not all(1 <= c <= 255 for c in value):
                raise ValueError
        else:  # pragma: no cover - KEYS only holds the kinds above
            raise ValueError
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinite float
        raise ConfigError(f"{bad}: {raw!r} is not a valid {kind}") from None
    if spec.minimum is not None and isinstance(value, (int, float)) and value < spec.minimum:
        raise ConfigError(f"{bad}: {value!r} is below the minimum {spec.minimum:g}")
    if key in ("scheduler.port", "metrics.scheduler_port", "metrics.worker_port") and value > 65535:
        raise ConfigError(f"{bad}: {value!r} is not a port number")
    return value


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not any(name == key for name in KEYS):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_config_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("orch")) / "config.yaml"


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("orch"))


class Settings:
    """Frozen settings: ``settings["worker.concurrency"]`` or ``settings.get(...)``."""

    def __init__(self, values: Mapping[str, Any], source: str | None, given: frozenset[str] = frozenset()) -> None:
        self._values = dict(values)
        self.source = source
        self._given = given

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def explicit(self, key: str) -> bool:
        """``key`` was set by a flag, the environment or the config file, not left to its default."""
        return key in self._given

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_values", "source", "_given") and name not in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            raise AttributeError("Settings are frozen")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @property
    def data_dir(self) -> Path:
        return Path(self["storage.data_dir"]).expanduser() if self["storage.data_dir"] else default_data_dir()

    @property
    def db_path(self) -> Path:
        return Path(self["storage.path"]).expanduser() if self["storage.path"] else self.data_dir / "orch.db"

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self["retry.max_attempts"],
            base=self["retry.backoff.base"],
            factor=self["retry.backoff.factor"],
            cap=self["retry.backoff.cap"],
            jitter=min(1.0, self["retry.backoff.jitter"]),
            retry_on_exit=self["retry.on_exit"],
        )

    @property
    def concurrency(self) -> int:
        return int(self["worker.concurrency"])

    @property
    def worker_host(self) -> str:
        return self["worker.host"] or socket.gethostname()


def load_settings(
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the Settings. ``overrides`` are flag values (None means "not given")."""
    env = os.environ if environ is None else environ
    values = {k: spec.default for k, spec in KEYS.items()}
    given: set[str] = set()
    path: Path | None = None
    if config is None and env.get("ORCH_CONFIG"):
        config = env["ORCH_CONFIG"]
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
    elif default_config_path().is_file():
        path = default_config_path()
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
        flat = _flatten(data)
        if "concurrency" in flat:  # the original README's short form of worker.concurrency
            if "worker.concurrency" in flat:
                raise ConfigError(f"both concurrency and worker.concurrency are set in {path}: keep one")
            flat["worker.concurrency"] = _coerce("concurrency", flat.pop("concurrency"), str(path), from_text=False)
        for key, raw in flat.items():
            if key not in KEYS:
                raise ConfigError(f"unknown key {key!r} in {path}")
            values[key] = _coerce(key, raw, str(path), from_text=False)
            given.add(key)
    names = {env_name(k): k for k in KEYS if k != "concurrency"} | ENV_ALIASES
    for name, key in names.items():
        if name in env and env[name] != "":
            values[key] = _coerce(key, env[name], f"environment variable {name}", from_text=True)
            given.add(key)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}")
        values[key] = _coerce(key, raw, "command-line flags", from_text=isinstance(raw, str))
        given.add(key)
    # With a private CA configured, a bare HOST:PORT means HTTPS.
    scheme = "https" if values.get("tls.ca") else "http"
    values["client.server"] = normalize_servers(values["client.server"], scheme, "client.server")
    values["worker.join"] = normalize_servers(values["worker.join"], scheme, "worker.join")
    return Settings(values, str(path) if path else None, frozenset(given))


_HOST_RE = re.compile(r"[\w.-]+|\[[0-9A-Fa-f:.]+\]")  # a name or IPv4 address, or [an IPv6 address]


def normalize_servers(addresses: str, scheme: str = "http", key: str = "the server address") -> str:
    """A comma-separated list of scheduler addresses (schedulers sharing one database), each normalized."""
    parts = [a for a in addresses.split(",")] if "," in addresses else [addresses]
    return ",".join(normalize_server(a, scheme, key) for a in parts)


def normalize_server(address: str, scheme: str = "http", key: str = "the server address") -> str:
    """``host:port``, ``:port`` or a URL to a base URL without a trailing slash (``scheme`` for bare addresses).

    Anything an HTTP client could not connect to is a ConfigError naming ``key``, here, before any request.
    """
    given = address
    address = address.strip().rstrip("/")
    if not address:
        raise ConfigError(f"{key}: the server address is empty")
    if "://" not in address:
        if address.startswith(":"):
            address = "127.0.0.1" + address
        address = f"{scheme}://" + address

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key}: {given!r} is not a scheduler address: {why}", field=key)

    given_scheme, _, rest = address.partition("://")
    if given_scheme.lower() not in ("http", "https"):
        raise bad(f"the scheme must be http:// or https://, not {given_scheme + '://'!r}")
    netloc, sep, path = rest.partition("/")
    if "?" in address or "#" in address:
        raise bad("it may hold no ? or #")
    if "@" in netloc:
        raise bad("it takes no user name or password (give the token with --token)")
    host, port = netloc, None
    if netloc.startswith("["):  # [IPv6]:port
        inside, bracket, after = netloc.partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise bad("an IPv6 address goes in brackets, then :PORT, as in [::1]:8080")
        host, port = inside + bracket, after[1:] if after else None
    elif ":" in netloc:
        host, _, port = netloc.rpartition(":")
    if not host:
        raise bad("it names no host")
    if not _HOST_RE.fullmatch(host):
        raise bad(f"{host!r} is not a host name or IP address")
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise bad(f"the port must be a number from 1 to 65535, not {port!r}")
    if not path.isprintable() or " " in path:
        raise bad("its path holds spaces or control characters")
    return f"{given_scheme.lower()}://{netloc}{sep}{path}".rstrip("/")
