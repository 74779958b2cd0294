"""The zipapp: built by zipapp.sh, it runs a local cluster on a Python with no packages installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, URL_RE, Proc, http, wait_until, workers_alive

pytestmark = pytest.mark.backend_specific  # the zipapp carries SQLite only (no psycopg)


def _pids_running(needle: str) -> list[int]:
    """Processes (not zombies) whose command line mentions ``needle``: here, the test's own pyz path."""
    found = []
    if Path("/proc/self/cmdline").exists():
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                zombie = (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z"
            except OSError:  # gone meanwhile
                continue
            if needle in cmdline and not zombie:
                found.append(int(entry.name))
    else:
        out = subprocess.run(["ps", "-Ao", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            pid, stat, args = line.strip().split(None, 2)
            if needle in args and not stat.startswith("Z"):
                found.append(int(pid))
    return [pid for pid in found if pid != os.getpid()]


@pytest.mark.e2e
@pytest.mark.slow
def test_zipapp_runs_a_cluster_with_no_packages(tmp_path: Path, orch_env: dict[str, str]) -> None:
    pyz = tmp_path / "orch.pyz"
    # With the example plugin carried inside: its entry point must be found in the zip.
    build = subprocess.run(["bash", str(ROOT / "zipapp.sh"), str(pyz)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "ZIPAPP_BUILD_DIR": str(tmp_path / "build"),
                                "ZIPAPP_PLUGINS": str(ROOT / "examples" / "orch-hello-runner")})
    assert build.returncode == 0, f"zipapp.sh failed:\n{build.stdout}\n{build.stderr}"
    assert str(pyz) in build.stdout

    names = zipfile.ZipFile(pyz).namelist()
    assert "__main__.py" in names
    assert "orch/store/sql/migrations/0001_initial.sql" in names
    assert [n for n in names if n.endswith((".so", ".pyd", ".dylib"))] == []

    # A Python with nothing installed; -I also keeps PYTHONPATH and user site-packages out.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    python = str(bare / "bin" / "python")
    orch = [python, "-I", str(pyz)]
    data = tmp_path / "data"  # orch_env's data dir
    env = orch_env

    helped = subprocess.run([*orch, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "Usage" in helped.stdout

    up = Proc([*orch, "up", "--port", "0", "--data-dir", str(data)], tmp_path / "up.log", env)
    try:
        def url() -> str | None:
            if not up.alive():
                raise AssertionError(f"orch up exited {up.p.returncode}: {up.log()}")
            m = URL_RE.search(up.log())
            return m.group(1) if m else None

        server = wait_until(url, 60, "orch up to print its URL")
        assert server.startswith("http://127.0.0.1:")
        wait_until(lambda: http("GET", server + "/healthz", timeout=5)[0] == 200, 30, "healthz")
        wait_until(lambda: workers_alive(server) >= 1, 60, "a local worker to be alive")

        # The dashboard's files are in the zip: its sign-in page and its script are served from there.
        for path, kind in (("/ui/login", "text/html"), ("/ui/static/app.js", "text/javascript"),
                           ("/ui/static/app.css", "text/css")):
            with urllib.request.urlopen(server + path, timeout=10) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith(kind), path
                assert len(resp.read()) > 500, path

        hello = subprocess.run([*orch, "run", "--server", server, "echo", "hello", "--wait"],
                               env=env, capture_output=True, text=True, timeout=60)
        assert (hello.returncode, hello.stdout) == (0, "hello\n"), hello.stderr

        failed = subprocess.run([*orch, "run", "--server", server, "--wait", "--retries", "0", "--", "sh", "-c", "exit 3"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert failed.returncode == 3, failed.stdout + failed.stderr

        # Runners in the zipapp: the plugin by its entry point, inside the zip; a Python task (a stdlib function,
        # in a child interpreter importing the zipapp's orch); a plugin named by its file (no PYTHONPATH: -I).
        listed = subprocess.run([*orch, "plugins", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        runners = {r["name"]: r for r in json.loads(listed.stdout)["runners"]}
        assert runners["hello"]["source"] == "entry point of orch-hello-runner 0.1.0", runners
        assert runners["python"]["status"] == "available"
        (tmp_path / "greet.py").write_text((ROOT / "examples" / "orch-hello-runner" / "orch_hello.py").read_text()
                                           .replace('name = "hello"', 'name = "greet"'))
        by_file = subprocess.run([*orch, "plugins", "--json"], env={**env, "ORCH_PLUGINS": f"{tmp_path}/greet.py:HelloRunner"},
                                 capture_output=True, text=True, timeout=60)
        assert "greet" in {r["name"] for r in json.loads(by_file.stdout)["runners"]}, by_file.stdout
        for spec, value in (({"python": {"function": "json:dumps", "args": [[1, 2]]}}, "[1, 2]"),
                            ({"runner": "hello", "params": {"name": "zip"}}, {"greeted": "zip"})):
            status, body = http("POST", server + "/v1/jobs", {**spec, "max_attempts": 1})
            assert status == 201, body
            jid = body["id"]
            done = wait_until(lambda jid=jid: (j := http("GET", f"{server}/v1/jobs/{jid}")[1])["state"]
                              in ("succeeded", "failed") and j, 60, "the job")
            assert (done["state"], done["result"]["value"]) == ("succeeded", value), done

        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0, up.log()
        # `up` waits for its workers before it exits; nothing started from this pyz may outlive it.
        wait_until(lambda: not _pids_running(str(pyz)), 10, "no orch process left")
    finally:
        up.stop()
        for pid in _pids_running(str(pyz)):  # only if the test failed: workers run in their own sessions
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
