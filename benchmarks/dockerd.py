"""A Docker engine of the tests' and benchmarks' own, and the tiny image they run.

``Dockerd.start()`` uses the engine DOCKER_HOST names when one answers there; else it starts Debian's
``dockerd`` (package docker.io; it needs root) with a data root, exec root and socket under a temp dir of its own,
no iptables and no bridge (jobs run with ``network: none`` or ``host``), the storage driver its own choice
(overlay2, or vfs where overlay cannot be mounted), and stops it at the end. No image
registry is reachable: the image ``orch-test-busybox`` is built locally, ``FROM scratch`` with Debian's static
busybox (package busybox-static) and its applets.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from http.client import HTTPConnection
from pathlib import Path

IMAGE = "orch-test-busybox"
BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")


class _UnixHTTP(HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("docker", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def request(sock: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = _UnixHTTP(sock, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _answers(sock: str) -> bool:
    try:
        return request(sock, "GET", "/_ping", timeout=3)[0] == 200
    except OSError:
        return False


def missing() -> str | None:
    """Why no engine can be had here (None: one can)."""
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://") and _answers(host[len("unix://"):]):
        return None
    if shutil.which("dockerd") is None and not os.path.exists("/usr/sbin/dockerd"):
        return "no Docker engine: dockerd is not installed (Debian: apt-get install docker.io)"
    if os.geteuid() != 0:
        return "dockerd needs root to start, and DOCKER_HOST names no engine that answers"
    if not any(os.path.exists(b) for b in BUSYBOX):
        return "no static busybox to build the test image from (Debian: apt-get install busybox-static)"
    return None


class Dockerd:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock = ""

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def start(self, timeout: float = 90.0) -> Dockerd:
        host = os.environ.get("DOCKER_HOST", "")
        if host.startswith("unix://") and _answers(host[len("unix://"):]):
            self.sock = host[len("unix://"):]
        else:
            # Short paths: a unix socket's path is at most 107 bytes, and containerd's live under the exec root.
            self.dir = Path(tempfile.mkdtemp(prefix="orch-dockerd-", dir="/tmp"))
            self.sock = str(self.dir / "d.sock")
            exe = shutil.which("dockerd") or "/usr/sbin/dockerd"
            log = open(self.dir / "dockerd.log", "wb")
            self.proc = subprocess.Popen(
                [exe, "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "x"),
                 "--host", self.host, "--pidfile", str(self.dir / "d.pid"), "--iptables=false",
                 "--ip6tables=false", "--bridge=none"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            while not _answers(self.sock):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    text = (self.dir / "dockerd.log").read_text(errors="replace")[-3000:]
                    self.stop()
                    raise RuntimeError(f"dockerd did not start:\n{text}")
                time.sleep(0.1)
        self.build_image()
        return self

    def build_image(self) -> None:
        """``orch-test-busybox``: FROM scratch, busybox and its applets in /bin (through the engine's /build)."""
        if request(self.sock, "GET", f"/images/{IMAGE}/json")[0] == 200:
            return
        busybox = next(b for b in BUSYBOX if os.path.exists(b))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(busybox, arcname="busybox")
            docker_file = (b"FROM scratch\nCOPY busybox /bin/busybox\n"
                           b'RUN ["/bin/busybox", "--install", "-s", "/bin"]\nENV PATH=/bin\n')
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(docker_file)
            tar.addfile(info, io.BytesIO(docker_file))
        status, body = request(self.sock, "POST", f"/build?t={IMAGE}&rm=1&forcerm=1", buf.getvalue(),
                               {"Content-Type": "application/x-tar"}, timeout=300)
        if status != 200 or b'"error"' in body:
            raise RuntimeError(f"building {IMAGE} failed ({status}): {body[-2000:].decode(errors='replace')}")

    def containers(self, label: str) -> list[dict[str, object]]:
        import json
        from urllib.parse import quote

        filters = quote(json.dumps({"label": [label]}))
        status, body = request(self.sock, "GET", f"/containers/json?all=1&filters={filters}")
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if self.dir is not None:
            subprocess.run(["umount", "-R", str(self.dir)], capture_output=True)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
