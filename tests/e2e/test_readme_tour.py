"""The README's quick tour, typed in order: every `$ ` command of its console blocks runs in a shell the way
the reader's would (the venv's bin on PATH, as after the install line's activation), against `orch up`
started as the README says, and prints what the README shows.

How the README's console blocks are read: a line `$ COMMAND` is typed; the lines under it are what the
terminal then shows (stdout and stderr as they interleave). A line `...` stands for any number of lines and
`...` inside a line (with the spaces and commas next to it) for any text; times, worker ids, elapsed times and other decimal numbers (durations,
rates) stand for any such value, and runs of spaces for any run of spaces (tables align to their content).
A command exits 0 unless the next one is `echo $?`, which shows its code. Other ```sh blocks are examples,
not typed here.

The README's example values stand for this test's: port 8080 for a free port, 9090 for a free metrics port,
/home/you/.local/share/orch for a temp data dir (given to orch as ORCH_DATA_DIR, the server as ORCH_SERVER
and the ports as ORCH_SCHEDULER_PORT and ORCH_METRICS_SCHEDULER_PORT, which the commands honour as written),
box1 for this machine's name (you@box1: the user and machine `orch retry` says asked). Between commands the test waits until no job is queued any more (a reader
types slower than a worker claims), never a fixed time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import ROOT, Proc, client_token, http, wait_until, workers_alive
from orch.cli import who_am_i

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.backend_specific]  # the README's tour is `orch up` on the SQLite default

README = ROOT / "README.md"
ANY_LINES = None  # a `...` line
TIME = r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\.\d{3}Z?"
VARIABLE = {  # what stands for any value of its kind, and the pattern of that kind
    r"[ ,]*\.\.\.[ ,]*": ".*",  # with the spaces and commas around it: `{"id":1, ...}` as any JSON object
    TIME: TIME,
    r"w-[0-9a-f]{12}": r"w-[0-9a-f]{12}",
    r"\d+:\d\d:\d\d": r"\d+:\d\d:\d\d",
    r"(?<![\d.])\d+\.\d+(?![\d.])": r"\d+(?:\.\d+)?",
    r" +": " +",
}


@dataclass
class Step:
    command: str
    shown: list[str] = field(default_factory=list)


def tour(text: str) -> list[list[Step]]:
    """The console blocks of the README's Quick tour section, as commands and what each shows."""
    section = text.split("\n## Quick tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for body in re.findall(r"^```console\n(.*?)^```", section, re.M | re.S):
        steps: list[Step] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:]))
            else:
                assert steps, f"a console block must start with a $ command: {body!r}"
                steps[-1].shown.append(line)
        blocks.append(steps)
    return blocks


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive loopback ports nobody listens on now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise AssertionError(f"no {n} consecutive free ports")


class Expect:
    """Lines as the README shows them, matched against what a command printed."""

    def __init__(self, examples: dict[str, str]) -> None:
        self.examples = examples
        kinds = [re.escape(k) for k in sorted(examples, key=len, reverse=True)] + list(VARIABLE)
        self.token = re.compile("|".join(f"({k})" for k in kinds))
        self.count = len(examples)

    def line(self, shown: str) -> re.Pattern[str] | None:
        if shown == "...":
            return ANY_LINES
        out, at = [], 0
        for m in self.token.finditer(shown):
            out.append(re.escape(shown[at:m.start()]))
            group = m.lastindex or 0
            if group <= self.count:
                out.append(re.escape(self.examples[m.group()]))
            else:
                out.append(list(VARIABLE.values())[group - self.count - 1])
            at = m.end()
        out.append(re.escape(shown[at:]))
        return re.compile("".join(out))

    def typed(self, command: str) -> str:
        """The command with the README's example values (curl's localhost:8080) made this test's."""
        for example, value in self.examples.items():
            command = command.replace(example, value)
        return command

    def matches(self, shown: list[str], printed: list[str]) -> bool:
        return _match([self.line(s) for s in shown], [p.rstrip() for p in printed])


def _match(want: list[re.Pattern[str] | None], got: list[str]) -> bool:
    if not want:
        return not got
    if want[0] is ANY_LINES:
        return any(_match(want[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and want[0].fullmatch(got[0]) is not None and _match(want[1:], got[1:])


def test_install_line_puts_orch_on_the_path() -> None:
    text = README.read_text(encoding="utf-8")
    install = re.search(r"^```sh\n(.*?)^```", text, re.M | re.S)
    assert install, "the README starts with an install line"
    words = install.group(1)
    assert re.search(r"(^|&& )(\.|source) \.venv/bin/activate && .*\borch up$", words.strip()), (
        "after the install line, `orch` must be a command the reader can type: " + words)


def test_quick_tour_does_what_it_shows(tmp_path: Path, orch_env: dict[str, str]) -> None:
    if not shutil.which("curl"):
        pytest.skip("the tour's last commands use curl")
    blocks = tour(README.read_text(encoding="utf-8"))
    assert blocks and blocks[0][0].command == "orch up", "the tour starts with `orch up` in a terminal of its own"
    port = free_ports(1)
    metrics = free_ports(2)  # the scheduler's, then its worker's (orch up gives worker i the port P+i)
    data = Path(orch_env["ORCH_DATA_DIR"])
    bin_dir = str(Path(sys.executable).parent)
    assert (Path(bin_dir) / "orch").exists(), "the tests run from the venv the README's install line makes"
    env = {**orch_env, "PATH": bin_dir + os.pathsep + orch_env.get("PATH", os.defpath),
           "VIRTUAL_ENV": str(Path(bin_dir).parent), "ORCH_SERVER": f"http://127.0.0.1:{port}"}
    env.pop("PYTHONHOME", None)
    expect = Expect({"127.0.0.1:8080": f"127.0.0.1:{port}", "localhost:8080": f"localhost:{port}",
                     "127.0.0.1:9090": f"127.0.0.1:{metrics}", "127.0.0.1:9091": f"127.0.0.1:{metrics + 1}",
                     "/home/you/.local/share/orch": str(data),
                     "you@box1": who_am_i(), "box1": socket.gethostname()})

    first = blocks[0][0]
    up_env = {**env, "ORCH_SCHEDULER_PORT": str(port), "ORCH_METRICS_SCHEDULER_PORT": str(metrics)}
    up = Proc(["bash", "-c", "exec " + first.command], tmp_path / "up.log", up_env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until(lambda: expect.matches(first.shown, up.log().splitlines()), 60,
                       f"`{first.command}` to print what the README shows:\n" + "\n".join(first.shown))
        except AssertionError as e:
            raise AssertionError(f"{e}\nit printed:\n{up.log()}") from None
        assert up.alive(), up.log()
        wait_until(lambda: workers_alive(url) == 1, 30, "orch up's worker")
        steps = [s for block in blocks for s in block][1:]
        code = 0
        token = client_token(data)
        for n, step in enumerate(steps):
            wait_until(lambda: http("GET", f"{url}/v1/jobs?state=queued&limit=1", token=token)[1]["jobs"] == [],
                       30, f"no job queued before `{step.command}`")
            done = subprocess.run(["bash", "-c", f"(exit {code}); {expect.typed(step.command)}"], cwd=ROOT, env=env, timeout=120,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            code = done.returncode
            shown_code = n + 1 < len(steps) and steps[n + 1].command.strip() == "echo $?"
            assert code == 0 or shown_code, f"`{step.command}` exited {code}:\n{done.stdout}"
            assert expect.matches(step.shown, done.stdout.splitlines()), (
                f"`{step.command}` printed\n{done.stdout}\nbut the README shows\n" + "\n".join(step.shown))
        up.signal(signal.SIGINT)  # Ctrl-C, as the README says
        assert up.wait(30) == 0, up.log()
    finally:
        up.stop()
