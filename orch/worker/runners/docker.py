"""The docker runner: a job's container, run through the Docker Engine API.

A job ``{"docker": {"image", "command", "env", "volumes", "network", "memory", "cpus", "user", "pull"}}`` is a
container named ``orch-JOB-ATTEMPT-XXXXXX`` and labelled with its job, attempt, worker, host and the worker's
process, created, started, followed (its output streams as any job's does), waited for, and removed. A timeout
or a cancel sends SIGTERM to it, then SIGKILL ``worker.kill_grace`` seconds later; it is removed either way. A
container the kernel killed for its memory limit ends saying so (exit 137, "out of memory"). Volumes are
mounted only from under the worker's ``docker.volumes`` (an empty list: none).

The engine is spoken to directly (aiohttp over its unix socket, or tcp://), not through the docker CLI: no
process per call, and each step is one request. ``docker.host`` (else DOCKER_HOST, else
unix:///var/run/docker.sock) names it. Where no engine answers, the runner says it is unavailable at the
worker's start: the worker does not advertise it, the scheduler hands it no docker job, and `orch why` says no
live worker has runner docker. Nothing else changes.

At its start the runner removes the containers that a worker process on this host, now dead, left behind (a
worker killed mid-job): their attempts' leases are gone with their worker, and the jobs run again elsewhere.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import secrets
import struct
from typing import Any
from urllib.parse import quote

import aiohttp

from orch.core.kinds import memory_bytes
from orch.core.states import Outcome
from orch.worker.runners.base import Attempt, Context, Ended, OnOutput, Run, Runner, RunnerError

log = logging.getLogger("orch.worker")

DEFAULT_HOST = "unix:///var/run/docker.sock"
LABEL = "org.orch"  # labels: org.orch.job, .attempt, .worker, .host, .pid, .started
PING_TIMEOUT = 5.0


def _proc_started(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if it is gone:
    with the pid, it names one process (a pid is reused, a start time with it is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


class EngineError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Engine:
    """A few Docker Engine API calls."""

    def __init__(self, host: str) -> None:
        if host.startswith("unix://"):
            self.base = "http://docker"
            self.connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=host[len("unix://"):], limit=0)
        elif host.startswith(("tcp://", "http://")):
            self.base = "http://" + host.split("://", 1)[1].rstrip("/")
            self.connector = aiohttp.TCPConnector(limit=0)
        else:
            raise RunnerError(f"docker.host {host!r}: give unix:///path/to/docker.sock or tcp://HOST:PORT")
        self.session = aiohttp.ClientSession(connector=self.connector,
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200, 201, 204),
                   timeout: float | None = 120.0) -> Any:
        async with self.session.request(method, self.base + path, json=body,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.read()
            if resp.status not in ok:
                try:
                    message = json.loads(raw).get("message") or raw.decode(errors="replace")
                except (ValueError, AttributeError):
                    message = raw.decode(errors="replace")
                raise EngineError(resp.status, message.strip()[:500])
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                return raw.decode(errors="replace")

    async def pull(self, image: str) -> None:
        name, tag = image, "latest"
        if "@" not in image:
            head, _, last = image.rpartition("/")
            if ":" in last:
                last, tag = last.split(":", 1)
                name = f"{head}/{last}" if head else last
        async with self.session.post(f"{self.base}/images/create?fromImage={quote(name)}&tag={quote(tag)}",
                                     timeout=aiohttp.ClientTimeout(total=3600)) as resp:
            if resp.status != 200:
                raise EngineError(resp.status, (await resp.text())[:500])
            async for line in resp.content:  # progress, then an error or nothing
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and msg.get("error"):
                        raise EngineError(500, str(msg["error"])[:500])

    async def close(self) -> None:
        await self.session.close()


class _Container(Attempt):
    def __init__(self, runner: DockerRunner, cid: str, name: str, on_output: OnOutput, memory: Any) -> None:
        self.runner, self.cid, self.name, self.on_output, self.memory = runner, cid, name, on_output, memory
        self.follow: asyncio.Task[None] | None = None

    async def _follow(self) -> None:
        """The container's output, from its start to its end (the engine's multiplexed frames)."""
        engine = self.runner.engine
        assert engine is not None
        decoders = {1: codecs.getincrementaldecoder("utf-8")(errors="replace"),
                    2: codecs.getincrementaldecoder("utf-8")(errors="replace")}
        names = {1: "stdout", 2: "stderr"}
        buf = b""
        async with engine.session.get(f"{engine.base}/containers/{self.cid}/logs?follow=1&stdout=1&stderr=1",
                                      timeout=aiohttp.ClientTimeout(total=None)) as resp:
            if resp.status != 200:
                return
            async for chunk in resp.content.iter_any():
                buf += chunk
                while len(buf) >= 8:
                    stream, size = buf[0], struct.unpack(">I", buf[4:8])[0]
                    if len(buf) < 8 + size:
                        break
                    data, buf = buf[8:8 + size], buf[8 + size:]
                    text = decoders.get(stream, decoders[1]).decode(data)
                    if text:
                        self.on_output(names.get(stream, "stdout"), text)
        for stream, d in decoders.items():
            text = d.decode(b"", final=True)
            if text:
                self.on_output(names[stream], text)

    async def wait(self) -> Ended:
        engine = self.runner.engine
        assert engine is not None
        try:
            reply = await engine.call("POST", f"/containers/{self.cid}/wait", timeout=None)
            if self.follow is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.follow, 10)  # the rest of its output
            code = int(reply.get("StatusCode", 1)) if isinstance(reply, dict) else 1
            state = (await engine.call("GET", f"/containers/{self.cid}/json")).get("State", {})
            if state.get("OOMKilled"):
                return Ended(Outcome.FAILED, code or 137, f"killed: out of memory (docker.memory {self.memory})", 0.0)
            if code == 0:
                return Ended(Outcome.SUCCEEDED, 0, None, 0.0)
            error = f"killed by signal {code - 128}" if code > 128 else None
            return Ended(Outcome.FAILED, code, error, 0.0)
        except (aiohttp.ClientError, EngineError, OSError) as e:
            return Ended(Outcome.FAILED, None, f"docker: {e}", 0.0)
        finally:
            if self.follow is not None and not self.follow.done():
                self.follow.cancel()
            await self.runner.remove(self.cid)

    def _signal(self, sig: str) -> None:
        engine = self.runner.engine
        if engine is not None:
            async def send() -> None:
                with contextlib.suppress(Exception):
                    await engine.call("POST", f"/containers/{self.cid}/kill?signal={sig}", ok=(204, 404, 409))

            asyncio.ensure_future(send())

    def terminate(self) -> None:
        self._signal("SIGTERM")

    def kill(self) -> None:
        self._signal("SIGKILL")


class DockerRunner(Runner):
    """Containers (``docker``), through the Docker Engine API."""

    name = "docker"
    summary = "containers, through the Docker Engine API (docker.host)"

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.host = str(self.settings.get("docker.host") or os.environ.get("DOCKER_HOST") or DEFAULT_HOST)
        self.allowed = [os.path.realpath(p) for p in self.settings.get("docker.volumes") or ()]
        self.engine: Engine | None = None
        self.problem: str | None = "not started"
        self.ctx: Context | None = None
        self.pulled: set[str] = set()

    def unavailable(self) -> str | None:
        return self.problem

    async def start(self, ctx: Context) -> None:
        self.ctx = ctx
        try:
            self.engine = Engine(self.host)
            await self.engine.call("GET", "/_ping", timeout=PING_TIMEOUT)
        except (TimeoutError, aiohttp.ClientError, EngineError, OSError, RunnerError) as e:
            self.problem = f"no Docker engine answers at {self.host} ({str(e) or type(e).__name__})"
            if self.engine is not None:
                await self.engine.close()
                self.engine = None
            return
        self.problem = None
        await self.recover()

    async def recover(self) -> int:
        """Remove the containers a dead worker process on this host left; how many."""
        assert self.engine is not None and self.ctx is not None
        filters = json.dumps({"label": [f"{LABEL}.host={self.ctx.hostname}"]})
        gone = 0
        try:
            found = await self.engine.call("GET", f"/containers/json?all=1&filters={quote(filters)}")
        except (aiohttp.ClientError, EngineError, OSError) as e:
            log.warning("docker runner: cannot list containers left by earlier workers: %s", e)
            return 0
        for c in found or ():
            labels = c.get("Labels") or {}
            try:
                pid = int(labels.get(f"{LABEL}.pid", ""))
            except ValueError:
                continue
            if _proc_started(pid) == labels.get(f"{LABEL}.started"):
                continue  # its worker lives: another worker on this host
            await self.remove(c["Id"])
            gone += 1
            log.info("docker runner: removed container %s of job %s attempt %s, left by a worker that is gone",
                     (c.get("Names") or ["?"])[0].lstrip("/"), labels.get(f"{LABEL}.job"),
                     labels.get(f"{LABEL}.attempt"))
        return gone

    async def remove(self, cid: str) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                await self.engine.call("DELETE", f"/containers/{cid}?force=1&v=1", ok=(204, 404, 409))

    def check(self, run: Run) -> None:
        body = run.spec.get("docker")
        if not isinstance(body, dict) or "image" not in body:
            raise RunnerError("the docker runner needs a spec with docker.image")
        for v in body.get("volumes", ()):
            host = os.path.realpath(v.split(":", 1)[0])
            if not any(host == a or host.startswith(a.rstrip("/") + "/") for a in self.allowed):
                raise RunnerError(f"volume {v.split(':', 1)[0]} is not allowed on this worker (its docker.volumes "
                                  f"{'allow ' + ', '.join(self.allowed) if self.allowed else 'allow none'})")

    async def _image(self, image: str, pull: str) -> None:
        assert self.engine is not None
        if pull == "always" and image not in self.pulled:
            await self.engine.pull(image)
            self.pulled.add(image)
            return
        try:
            await self.engine.call("GET", f"/images/{quote(image, safe='/:@')}/json")
        except EngineError as e:
            if e.status != 404:
                raise
            if pull == "never":
                raise RunnerError(f"image {image} is not on this machine (docker.pull is never)") from None
            await self.engine.pull(image)

    async def begin(self, run: Run, on_output: OnOutput) -> Attempt:
        if self.engine is None or self.ctx is None:
            raise RunnerError(f"the docker runner is unavailable: {self.problem}")
        body = run.spec["docker"]
        try:
            await self._image(body["image"], body.get("pull", "missing"))
        except (EngineError, aiohttp.ClientError, OSError) as e:
            raise RunnerError(f"image {body['image']}: {e}") from None
        env = {**run.env, **body.get("env", {}), "ORCH_JOB_ID": str(run.job_id), "ORCH_ATTEMPT": str(run.attempt)}
        host: dict[str, Any] = {"Binds": list(body.get("volumes", ())), "Init": False}
        if "network" in body:
            host["NetworkMode"] = body["network"]
        if "memory" in body:
            host["Memory"] = memory_bytes(body["memory"])
            host["MemorySwap"] = host["Memory"]  # no swap beyond it: the limit is the limit
        if "cpus" in body:
            host["NanoCpus"] = int(body["cpus"] * 1e9)
        ctx = self.ctx
        labels = {f"{LABEL}.job": str(run.job_id), f"{LABEL}.attempt": str(run.attempt),
                  f"{LABEL}.worker": ctx.worker_name, f"{LABEL}.host": ctx.hostname,
                  f"{LABEL}.pid": str(os.getpid()), f"{LABEL}.started": _proc_started(os.getpid()) or ""}
        create: dict[str, Any] = {"Image": body["image"], "Env": [f"{k}={v}" for k, v in env.items()],
                                  "Labels": labels, "HostConfig": host, "AttachStdout": False,
                                  "AttachStderr": False, "Tty": False, "OpenStdin": False}
        if "command" in body:
            create["Cmd"] = body["command"]
        if run.cwd:
            create["WorkingDir"] = run.cwd
        if "user" in body:
            create["User"] = body["user"]
        name = f"orch-{run.job_id}-{run.attempt}-{secrets.token_hex(3)}"
        try:
            made = await self.engine.call("POST", f"/containers/create?name={name}", create)
            cid = made["Id"]
        except (EngineError, aiohttp.ClientError, OSError) as e:
            raise RunnerError(f"docker: cannot create the container: {e}") from None
        container = _Container(self, cid, name, on_output, body.get("memory"))
        try:
            await self.engine.call("POST", f"/containers/{cid}/start")
        except (EngineError, aiohttp.ClientError, OSError) as e:
            await self.remove(cid)
            raise RunnerError(f"docker: cannot start the container: {e}") from None
        container.follow = asyncio.ensure_future(container._follow())
        return container

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
            self.engine = None
