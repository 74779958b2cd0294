"""What a job runs beyond a command line: a Python function, a container, or a plugin runner's job.

A job names exactly one of ``command``, ``shell``, ``task`` (the built-in ``exec`` runner), ``python`` (the
``python`` runner: a function run in a worker's long-lived child interpreter), ``docker`` (the ``docker``
runner: a container) or ``runner`` (a runner a plugin brings, with its ``params``). The scheduler hands a job
only to a worker that has its runner; this module checks the parts it can check without one (the shapes
of the built-ins' objects, a plugin runner's name and the size of its parameters)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from orch.core.errors import ValidationError

EXEC, PYTHON, DOCKER = "exec", "python", "docker"
BUILT_IN = (EXEC, PYTHON, DOCKER)
RUNNER_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # a runner's name (a plugin's too)
# pkg.mod:attr.attr — what `import pkg.mod` then getattr finds
FUNCTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
                         r"(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")
KWARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
NETWORK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?$")
# a size in MiB (6m at least: the engine's smallest) or GiB; or an integer of bytes
MEMORY_RE = re.compile(r"^(?:([6-9]|[1-9][0-9]{1,8})([mM])|([1-9][0-9]{0,5})([gG]))$")
# host:container[:ro|rw], both absolute paths without a colon
VOLUME_RE = re.compile(r"^(/[^:\x00]*):(/[^:\x00]*)(?::(ro|rw))?$")
PULL = ("never", "missing", "always")
MAX_PARAMS_BYTES = 64 << 10  # of a python job's arguments, or a plugin job's params, as compact JSON
MAX_VOLUMES = 64
MIN_MEMORY = 6 << 20  # the engine refuses less than 6 MiB
MAX_MEMORY = 1 << 50
DOCKER_FIELDS = frozenset({"image", "command", "env", "volumes", "network", "memory", "cpus", "user", "pull"})
PYTHON_FIELDS = frozenset({"function", "args", "kwargs"})


def runner_of(stored: Mapping[str, Any]) -> str:
    """The runner a stored (or submitted) spec needs."""
    if PYTHON in stored:
        return PYTHON
    if DOCKER in stored:
        return DOCKER
    runner = stored.get("runner")
    return runner if isinstance(runner, str) else EXEC


def _compact_size(value: Any, field: str) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), allow_nan=False))
    except (ValueError, TypeError, RecursionError):
        raise ValidationError("must be plain JSON (no NaN or infinity)", field=field) from None


def _object(body: Any, field: str, known: frozenset[str], what: str) -> dict[str, Any]:
    """``body`` as an object of ``known`` fields only, or a ValidationError naming the field."""
    if not isinstance(body, dict):
        raise ValidationError(what, field=field)
    for k in body:
        if k not in known:
            raise ValidationError(f"unknown field {k!r}", field=f"{field}.{k}")
    return body


def check_python(body: Any, field: str) -> dict[str, Any]:
    """``{"function": "pkg.mod:name", "args": [...], "kwargs": {...}}``: the function a worker imports and calls."""
    body = _object(body, field, PYTHON_FIELDS, "python must be an object with 'function' (and 'args', 'kwargs')")
    fn = body.get("function")
    if not isinstance(fn, str) or len(fn) > 512 or not FUNCTION_RE.fullmatch(fn):
        raise ValidationError("python.function must be 'package.module:function' (what the worker imports)",
                              field=f"{field}.function")
    args = body.get("args", [])
    if not isinstance(args, list):
        raise ValidationError("python.args must be a list", field=f"{field}.args")
    kwargs = body.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValidationError("python.kwargs must be an object", field=f"{field}.kwargs")
    for k in kwargs:
        if not KWARG_RE.fullmatch(k):
            raise ValidationError(f"python.kwargs: {k[:40]!r} is not a Python identifier", field=f"{field}.kwargs")
    if _compact_size(args, f"{field}.args") + _compact_size(kwargs, f"{field}.kwargs") > MAX_PARAMS_BYTES:
        raise ValidationError(f"python.args and kwargs are over {MAX_PARAMS_BYTES:,} bytes of JSON (large data "
                              "belongs in files the task reads)", field=f"{field}.args")
    out: dict[str, Any] = {"function": fn}
    if args:
        out["args"] = args
    if kwargs:
        out["kwargs"] = kwargs
    return out


def memory_bytes(value: int | str) -> int:
    """A docker memory limit in bytes (an int, or a string like ``256m``)."""
    if isinstance(value, int):
        return value
    m = MEMORY_RE.fullmatch(value)
    assert m is not None
    return int(m.group(1)) << 20 if m.group(1) else int(m.group(3)) << 30


def check_docker(body: Any, field: str) -> dict[str, Any]:
    """``{"image", "command", "env", "volumes", "network", "memory", "cpus", "user", "pull"}`` (only image is
    required). Which volumes a worker mounts is the worker's to allow (its docker.volumes)."""
    body = _object(body, field, DOCKER_FIELDS, "docker must be an object with at least 'image'")
    image = body.get("image")
    if not isinstance(image, str) or not IMAGE_RE.fullmatch(image):
        raise ValidationError("docker.image must be an image reference (name[:tag] or name@digest)",
                              field=f"{field}.image")
    out: dict[str, Any] = {"image": image}
    if "command" in body:
        cmd = body["command"]
        if (not isinstance(cmd, list) or not cmd or len(cmd) > 4096
                or not all(isinstance(a, str) and "\x00" not in a and len(a) <= 128 << 10 for a in cmd)):
            raise ValidationError("docker.command must be a non-empty list of strings", field=f"{field}.command")
        out["command"] = cmd
    if "env" in body:
        env = body["env"]
        if not isinstance(env, dict) or len(env) > 256 or not all(
                isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", k) and isinstance(v, str)
                and "\x00" not in v for k, v in env.items()):
            raise ValidationError("docker.env must map variable names to strings", field=f"{field}.env")
        out["env"] = env
    if "volumes" in body:
        vols = body["volumes"]
        if not isinstance(vols, list) or len(vols) > MAX_VOLUMES or not all(
                isinstance(v, str) and len(v) <= 4096 and VOLUME_RE.fullmatch(v) for v in vols):
            raise ValidationError("docker.volumes must be a list of 'HOST_PATH:CONTAINER_PATH[:ro|rw]'",
                                  field=f"{field}.volumes")
        out["volumes"] = vols
    if "network" in body:
        net = body["network"]
        if not isinstance(net, str) or not NETWORK_RE.fullmatch(net):
            raise ValidationError("docker.network must be a network name (none, host, bridge, ...)",
                                  field=f"{field}.network")
        out["network"] = net
    if "memory" in body:
        mem = body["memory"]
        if isinstance(mem, float) and mem.is_integer() and abs(mem) < 2 ** 53:  # 2.0 counts as the integer 2
            mem = int(mem)
        ok = (isinstance(mem, int) and not isinstance(mem, bool) and MIN_MEMORY <= mem <= MAX_MEMORY) or (
            isinstance(mem, str) and MEMORY_RE.fullmatch(mem))
        if not ok:
            raise ValidationError("docker.memory must be bytes (an integer) or a size like '256m', at least 6m",
                                  field=f"{field}.memory")
        out["memory"] = mem
    if "cpus" in body:
        cpus = body["cpus"]
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not math.isfinite(cpus) \
                or not 0.01 <= cpus <= 1024:
            raise ValidationError("docker.cpus must be a number from 0.01 to 1024", field=f"{field}.cpus")
        out["cpus"] = cpus
    if "user" in body:
        user = body["user"]
        if not isinstance(user, str) or not USER_RE.fullmatch(user):
            raise ValidationError("docker.user must be 'user' or 'uid:gid'", field=f"{field}.user")
        out["user"] = user
    if "pull" in body:
        if body["pull"] not in PULL:
            raise ValidationError(f"docker.pull must be one of {', '.join(PULL)}", field=f"{field}.pull")
        out["pull"] = body["pull"]
    return out


def check_runner(name: Any, params: Any, field: str) -> tuple[str, dict[str, Any]]:
    """A plugin runner's job: its runner's name and its parameters (an object the runner checks itself, on the
    worker, when it starts the job)."""
    if not isinstance(name, str) or not RUNNER_RE.fullmatch(name):
        raise ValidationError("runner must be a runner's name (lower-case letters, digits, _ and -; at most 32)",
                              field=field)
    if name in BUILT_IN:
        hint = "command, shell or task" if name == EXEC else name
        raise ValidationError(f"runner {name!r} is built in: give '{hint}' instead", field=field)
    if not isinstance(params, dict):  # null too: an optional field is left out, never null
        raise ValidationError("params must be an object", field=field[:-len("runner")] + "params")
    if _compact_size(params, field[:-len("runner")] + "params") > MAX_PARAMS_BYTES:
        raise ValidationError(f"params is over {MAX_PARAMS_BYTES:,} bytes of JSON", field=field[:-len("runner")] + "params")
    return name, params


def python_text(body: Mapping[str, Any]) -> str:
    """A python job as a person reads it: ``pkg.mod:fn('a', width=640)``."""
    parts = [json.dumps(a, ensure_ascii=False) for a in body.get("args", ())]
    parts += [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in body.get("kwargs", {}).items()]
    return f"{body['function']}({', '.join(parts)})"


def docker_text(body: Mapping[str, Any]) -> str:
    import shlex

    return " ".join(["docker", body["image"], *(shlex.quote(a) for a in body.get("command", ()))])


def runner_text(name: str, params: Mapping[str, Any]) -> str:
    return f"{name} {json.dumps(params, ensure_ascii=False, separators=(',', ':'))}" if params else name
