"""A real PostgreSQL server for benchmarks and tests: Debian's initdb/pg_ctl run as a non-root user, on a
loopback port, with its own data directory; ``database()`` makes a fresh database."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def bindir() -> Path | None:
    """Where PostgreSQL's server programs are: Debian's /usr/lib/postgresql/N/bin (the newest), or PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("postgres")
    return Path(exe).parent if exe else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One server for the session; ``database()`` makes an empty database and returns its DSN."""

    def __init__(self) -> None:
        self.bin = bindir()
        self.root = Path(tempfile.mkdtemp(prefix="orch-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            user = "postgres" if _has_user("postgres") else None
            if user is None:
                raise RuntimeError("running as root and there is no 'postgres' user to run the server as")
            self.as_user = ["runuser", "-u", user, "--"]
            shutil.chown(self.root, user)
            os.chmod(self.root, 0o700)

    def _run(self, *args: str) -> None:
        assert self.bin is not None
        done = subprocess.run([*self.as_user, str(self.bin / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--locale=C")
        self.launch()

    def launch(self) -> None:
        """Start the server (again) on its data dir and port; return once it takes connections."""
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
                " -c max_connections=400 -c shared_buffers=64MB -c log_min_messages=warning")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "-t", "60", "start")

    def halt(self) -> None:
        """Stop the server at once (its clients' connections drop); ``launch`` brings it back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        try:
            self.halt()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def missing() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    if bindir() is None:
        return "PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)"
    return None


def pgbouncer_exe() -> str | None:
    """Debian's PgBouncer (in /usr/sbin, often not on PATH), or one on PATH; None where there is none."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None)


class PgBouncer:
    """Debian's PgBouncer in front of a ``PgServer``, pooling by transaction (each transaction, or statement
    outside one, may go to another server connection: no LISTEN, no session state), on a loopback port."""

    def __init__(self, server: PgServer, pool_size: int = 4) -> None:
        self.server = server
        exe = pgbouncer_exe()
        if exe is None:
            raise RuntimeError("PgBouncer is not installed (Debian: apt-get install pgbouncer)")
        self.exe = exe
        self.root = Path(tempfile.mkdtemp(prefix="orch-pgbouncer-"))
        self.port = _free_port()
        self.ini = self.root / "pgbouncer.ini"
        self.ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={server.port} user=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 400\n"
            f"logfile = {self.root / 'log'}\npidfile = {self.root / 'pid'}\n")
        self.as_user = server.as_user  # it refuses to run as root, like the server
        if self.as_user:
            shutil.chown(self.root, self.as_user[2])
            shutil.chown(self.ini, self.as_user[2])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([*self.as_user, self.exe, str(self.ini)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "log").read_text(errors="replace") if (self.root / "log").exists() else ""
                self.stop()
                raise RuntimeError(f"pgbouncer did not start ({self.proc.returncode}): {log[-2000:]}")
            time.sleep(0.05)

    def dsn(self, server_dsn: str) -> str:
        """The DSN of the same database, through the pooler."""
        return server_dsn.replace(f"127.0.0.1:{self.server.port}/", f"127.0.0.1:{self.port}/")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
