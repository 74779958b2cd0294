"""The peer: Huey, installed into a virtualenv of its own under a cache dir, driven through peer_huey.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "peer_huey.py"


def cache_dir() -> Path:
    base = os.environ.get("ORCH_BENCH_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "orch-bench"


class Huey:
    """Huey's Python, once its virtualenv exists; ``unavailable`` says why not."""

    def __init__(self, venv: Path | None = None) -> None:
        self.venv = venv or cache_dir() / "huey-venv"
        self.python: Path | None = None
        self.version = ""
        self.unavailable = ""

    def ensure(self, log: Any = None) -> bool:
        if self.python is not None:
            return True
        if self.unavailable:
            return False
        py = self.venv / "bin" / "python"
        if not self._works(py):
            tmp = self.venv.with_name(f"{self.venv.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                if log:
                    log(f"installing Huey into {self.venv} (once)")
                tmp.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["python3" if shutil.which("python3") else sys.executable, "-m", "venv", str(tmp)],
                               check=True, capture_output=True, timeout=300)
                subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q",
                                "--disable-pip-version-check", "huey"],
                               check=True, capture_output=True, timeout=600)
                shutil.rmtree(self.venv, ignore_errors=True)
                os.replace(tmp, self.venv)
            except (OSError, subprocess.SubprocessError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                detail = getattr(e, "stderr", b"") or b""
                self.unavailable = f"peer unavailable: cannot install huey ({_last_line(detail) or e})"
                return False
            if not self._works(py):
                self.unavailable = "peer unavailable: huey does not import in its virtualenv"
                return False
        self.python = py
        return True

    def _works(self, py: Path) -> bool:
        if not py.exists():
            return False
        try:
            out = subprocess.run([str(py), str(SCRIPT), "check"], capture_output=True, text=True, timeout=60,
                                 cwd=tempfile.gettempdir())
        except (OSError, subprocess.SubprocessError):
            return False
        if out.returncode != 0:
            return False
        self.version = json.loads(out.stdout.strip().splitlines()[-1]).get("huey", "")
        return True

    def run(self, mode: str, workdir: Path, args: list[str], timeout: float) -> list[dict[str, Any]]:
        """Run peer_huey.py in ``mode``; its JSON lines. Raises RuntimeError with its output if it fails."""
        assert self.python is not None
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PEER_HUEY_DB"] = str(workdir / "huey.db")
        p = subprocess.Popen([str(self.python), str(SCRIPT), mode, "--dir", str(workdir), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(workdir),
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(p.pid)
            out, err = p.communicate()
            raise RuntimeError(f"huey {mode} timed out after {timeout:g}s: {err[-1000:]}") from None
        finally:
            _killpg(p.pid)
        if p.returncode != 0:
            raise RuntimeError(f"huey {mode} exited {p.returncode}: {err[-2000:]}")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def start(self, mode: str, workdir: Path, args: list[str]) -> subprocess.Popen[str]:
        """Start peer_huey.py in the background (its stdout is a pipe of JSON lines)."""
        assert self.python is not None
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PEER_HUEY_DB"] = str(workdir / "huey.db")
        return subprocess.Popen([str(self.python), str(SCRIPT), mode, "--dir", str(workdir), *args],
                                stdout=subprocess.PIPE, stderr=open(workdir / "peer.err", "w"), text=True, env=env,
                                cwd=str(workdir), start_new_session=True)


def _killpg(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(raw: bytes | str) -> str:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
