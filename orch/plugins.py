"""Plugins: runners (and later other hooks) that come from outside orch.

Found in three places, in this order, the first of a name winning:

- the built-ins (exec, python, docker), by the same loader as the rest;
- installed distributions' entry points of the group ``orch.runners`` (``name = "pkg.mod:RunnerClass"``);
- the ``plugins`` setting (config file, ``ORCH_PLUGINS``, ``orch worker --plugin``): ``pkg.mod`` or ``pkg.mod:attr``
  (importable: on PYTHONPATH), or a file, ``/path/to/mod.py[:attr]``. Inside a zipapp, where installing a
  distribution means rebuilding it (``ZIPAPP_PLUGINS=... ./zipapp.sh`` carries it, entry points and all), a
  file is the way that needs nothing else: ``python3 -I orch.pyz`` reads no PYTHONPATH.

What a target names is a Runner subclass, a list of them, or a module whose ``RUNNERS`` lists them. A target
that cannot be imported, or names nothing of the kind, is reported (one line, at the worker's start and by
``orch plugins``) and left out: a broken plugin never takes a worker down.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from orch.core.kinds import RUNNER_RE

GROUP = "orch.runners"
BUILT_IN = (("exec", "orch.worker.runners.exec:ExecRunner"),
            ("python", "orch.worker.runners.python:PythonRunner"),
            ("docker", "orch.worker.runners.docker:DockerRunner"))
TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*(?::[A-Za-z_][\w.]*)?$")

log = logging.getLogger("orch.plugins")


@dataclass
class Found:
    """One runner found, or one target that failed (``error``)."""

    name: str  # the runner's name (for a failed target: what it was listed as, or the target)
    source: str  # "built in", "entry point of DIST VERSION", "plugins setting"
    target: str  # module[:attr]
    runner: Any = None  # the Runner subclass
    error: str | None = None

    def line(self) -> str:
        if self.error is not None:
            return f"plugin {self.target} ({self.source}) is broken and left out: {self.error}"
        return f"runner {self.name} from {self.target} ({self.source})"


def _resolve(target: str) -> Any:
    module_name, _, attr = target.rpartition(":") if target.count(":") and not TARGET_RE.fullmatch(target) \
        else target.partition(":")
    if module_name.endswith(".py") and os.path.isabs(module_name):  # a file: a zipapp's isolated Python has no
        if attr and not re.fullmatch(r"[A-Za-z_][\w.]*", attr):    # PYTHONPATH, but can load one by its path
            raise ValueError("not a module path (pkg.mod, pkg.mod:attr, /path/to/mod.py[:attr])")
        name = os.path.basename(module_name)[:-3]
        spec = importlib.util.spec_from_file_location(name, module_name)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load {module_name}")
        obj: Any = importlib.util.module_from_spec(spec)
        sys.modules[name] = obj
        spec.loader.exec_module(obj)
    elif not TARGET_RE.fullmatch(target):
        raise ValueError("not a module path (pkg.mod, pkg.mod:attr, /path/to/mod.py[:attr])")
    else:
        obj = importlib.import_module(module_name)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _runners_in(obj: Any) -> list[Any]:
    from orch.worker.runners.base import Runner

    if inspect.ismodule(obj):
        obj = getattr(obj, "RUNNERS", None)
        if obj is None:
            raise ValueError("the module has no RUNNERS list (name a runner class as module:Class)")
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    out = []
    for item in items:
        if not (inspect.isclass(item) and issubclass(item, Runner)):
            raise ValueError(f"{getattr(item, '__name__', repr(item))[:80]} is not a Runner subclass")
        if not isinstance(item.name, str) or not RUNNER_RE.fullmatch(item.name):
            raise ValueError(f"{item.__name__}.name {item.name!r} is not a runner name (lower-case letters, "
                             "digits, _ and -)")
        out.append(item)
    return out


def _load(target: str, source: str, listed_as: str | None = None) -> list[Found]:
    try:
        runners = _runners_in(_resolve(target))
    except Exception as e:  # anything a plugin's import raises: reported, never fatal
        return [Found(listed_as or target, source, target, error=f"{type(e).__name__}: {str(e)[:300]}")]
    return [Found(r.name, source, target, runner=r) for r in runners]


def discover(paths: Sequence[str] = (), *, entry_points: bool = True) -> list[Found]:
    """Every runner found, and every target that failed; of two runners with one name the first is kept (a later
    one is reported as left out)."""
    found: list[Found] = []
    for name, target in BUILT_IN:
        found += _load(target, "built in", name)
    if entry_points:
        try:
            eps = list(importlib.metadata.entry_points(group=GROUP))
        except Exception as e:  # a broken distribution's metadata
            eps = []
            found.append(Found(GROUP, "entry points", GROUP, error=f"cannot read entry points: {e}"))
        for ep in eps:
            dist = getattr(ep, "dist", None)
            where = f"entry point of {dist.name} {dist.version}" if dist is not None else "entry point"
            if any(f.target == ep.value and f.source == "built in" for f in found):
                continue  # orch's own entry points name the built-ins
            found += _load(ep.value, where, ep.name)
    for target in paths:
        found += _load(target, "plugins setting")
    seen: set[str] = set()
    out: list[Found] = []
    for f in found:
        if f.error is None:
            if f.name in seen:
                f.error = f"a runner named {f.name} was found before it"
            else:
                seen.add(f.name)
        out.append(f)
    return out
