"""Workflow files: a YAML map of jobs by name, each with the jobs it ``needs``, as GitHub Actions users write them.

    defaults:            # optional: spec fields every job gets (a job's own win)
      queue: etl
    jobs:
      extract:
        run: ./extract.sh                 # run: a shell line (or command: [argv...], or task: + args:)
      transform:
        needs: extract                    # a name, or a list of them
        command: [python, transform.py]
      load:
        needs: [transform]
        run: ./load.sh
      alert:
        needs: [load]
        if: failure()                     # success() (the default), failure(), always()
        run: ./page-someone.sh

Each job becomes one spec of a batch: its name is its ``ref`` (and its ``name``, unless it gives one), its
``needs`` its ``depends_on`` (``if:`` saying on which end of them), and every other key a spec field as for
``POST /v1/jobs`` (checked by the same code). The batch is submitted atomically; a cycle or an unknown name is
refused before anything runs.
"""

from __future__ import annotations

from typing import Any

from orch.core.dag import On, resolve
from orch.core.errors import OrchError, ValidationError
from orch.core.spec import parse_spec

_IF = {"success()": On.SUCCESS, "success": On.SUCCESS, "failure()": On.FAILURE, "failure": On.FAILURE,
       "always()": On.COMPLETION, "always": On.COMPLETION, "completion": On.COMPLETION}
_OWN = ("needs", "if", "run")  # a workflow file's own keys of a job (the rest are spec fields)


def specs_of(doc: Any) -> list[dict[str, Any]]:
    """The job specs of a parsed workflow file, in the order it names them, each checked (a ValidationError names
    the place: ``jobs.transform.needs[0]``)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), dict) or not doc["jobs"]:
        raise ValidationError("a workflow file is a map with 'jobs': a map of job names to jobs", field="jobs")
    unknown = sorted(set(doc) - {"jobs", "defaults", "name"})
    if unknown:
        raise ValidationError(f"unknown key {unknown[0]!r} (a workflow file has jobs, defaults and name)",
                              field=str(unknown[0]))
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ValidationError("defaults must be a map of spec fields", field="defaults")
    specs: list[dict[str, Any]] = []
    for name, job in doc["jobs"].items():
        at = f"jobs.{name}"
        if not isinstance(job, dict):
            raise ValidationError(f"{at} must be a map (run:, command: or task:, needs:, ...)", field=at)
        spec = {k: v for k, v in defaults.items() if k not in ("command", "shell", "task", "args") or
                not any(x in job for x in ("command", "shell", "task", "run"))}
        spec.update({k: v for k, v in job.items() if k not in _OWN})
        if "run" in job:
            if any(x in job for x in ("command", "shell", "task")):
                raise ValidationError(f"{at} gives run: and command:, shell: or task:; give one", field=f"{at}.run")
            spec["shell"] = job["run"]
        spec["ref"] = str(name)
        spec.setdefault("name", str(name))
        on = On.SUCCESS
        if "if" in job:
            cond = job["if"]
            if not isinstance(cond, str) or cond.strip().replace("${{", "").replace("}}", "").strip() not in _IF:
                raise ValidationError(f"{at}.if is success(), failure() or always()", field=f"{at}.if")
            on = _IF[cond.strip().replace("${{", "").replace("}}", "").strip()]
        needs = job.get("needs", [])
        if isinstance(needs, str):
            needs = [needs]
        if not isinstance(needs, list):
            raise ValidationError(f"{at}.needs is a job name or a list of them", field=f"{at}.needs")
        deps: list[Any] = []
        for i, need in enumerate(needs):
            if isinstance(need, dict):  # {job: NAME, on: ...}: as depends_on writes it
                deps.append(need)
            elif isinstance(need, (str, int)) and not isinstance(need, bool):
                deps.append(str(need) if on is On.SUCCESS else {"job": str(need), "on": on.value})
            else:
                raise ValidationError(f"{at}.needs[{i}] is the name of a job of this file", field=f"{at}.needs[{i}]")
        if deps:
            spec["depends_on"] = deps
        try:
            parse_spec(spec)
        except ValidationError as e:
            e.field = f"{at}.{e.field}" if e.field else at
            e.args = (f"{at}: {e.message}",)
            e.message = f"{at}: {e.message}"
            raise
        specs.append(spec)
    names = list(doc["jobs"])
    try:
        resolve([s["ref"] for s in specs], [parse_spec(s).depends_on for s in specs])
    except OrchError as e:  # jobs[i].depends_on[j] -> jobs.NAME.needs[j]
        if e.field and e.field.startswith("jobs["):
            i = int(e.field[5:e.field.index("]")])
            e.field = f"jobs.{names[i]}.needs" + e.field[e.field.index("]") + 1:].replace(".depends_on", "")
        raise
    return specs
