"""Integration tests of the job runner: execute() on real processes, on the fast path and the thread path."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import until, wait_until
from orch.core.states import Outcome
from orch.worker.runners import Ended, Run
from orch.worker.runners import exec as runners

FAST_AVAILABLE = runners.FAST_SPAWN


@pytest.fixture(params=["fast", "thread"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run the test on one path, and check afterwards that it was that path that ran."""
    if request.param == "fast" and not FAST_AVAILABLE:
        pytest.skip("no posix_spawn/pidfd_open here")
    threads: list[Run] = []
    real = runners._run_blocking

    def spy(run: Run, *args: Any) -> int:
        threads.append(run)
        return real(run, *args)

    monkeypatch.setattr(runners, "_run_blocking", spy)
    monkeypatch.setattr(runners, "FAST_SPAWN", request.param == "fast")
    yield request.param
    if request.param == "fast":
        assert not threads, "the fast path fell back to a thread"
    else:
        assert threads, "the thread path did not run"


class Out:
    """An on_output that keeps what it was given."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, str]] = []

    def __call__(self, stream: str, text: str) -> None:
        assert stream in ("stdout", "stderr")
        self.chunks.append((stream, text))

    def text(self, stream: str = "stdout") -> str:
        return "".join(t for s, t in self.chunks if s == stream)


def make_run(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
             timeout: float | None = None) -> Run:
    return Run(job_id=7, attempt=2, argv=argv, env=env or {}, cwd=cwd, timeout=timeout)


def sh(script: str, **kw: Any) -> Run:
    return make_run(["sh", "-c", script], **kw)


def execute(run: Run, kill_grace: float = 5.0) -> tuple[Ended, Out]:
    out = Out()
    ended = asyncio.run(asyncio.wait_for(runners.execute(run, out, kill_grace), 30))
    return ended, out


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is alive (zombies waiting for a reaper count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------ results


def test_echo_output_and_exit_0(path: str) -> None:
    run = make_run(["echo", "hello"])
    ended, out = execute(run)
    assert (ended.outcome, ended.exit_code, ended.error) == (Outcome.SUCCEEDED, 0, None)
    assert out.text() == "hello\n" and out.text("stderr") == ""
    assert 0 < ended.duration < 10
    assert run.pid is not None


def test_exit_code_3(path: str) -> None:
    ended, _ = execute(sh("exit 3"))
    assert (ended.outcome, ended.exit_code, ended.error) == (Outcome.FAILED, 3, None)


def test_killed_by_a_signal_is_128_plus_signal(path: str) -> None:
    ended, _ = execute(sh("kill -KILL $$"))
    assert (ended.outcome, ended.exit_code, ended.error) == (Outcome.FAILED, 137, "killed by SIGKILL")


def test_stderr_is_separate_from_stdout(path: str) -> None:
    ended, out = execute(sh("echo out; echo err >&2; echo out2"))
    assert ended.outcome is Outcome.SUCCEEDED
    assert out.text() == "out\nout2\n"
    assert out.text("stderr") == "err\n"


def test_command_not_found_is_127(path: str) -> None:
    ended, out = execute(make_run(["orch-no-such-command-xyz", "a"]))
    assert (ended.outcome, ended.exit_code) == (Outcome.FAILED, 127)
    assert ended.error == "command not found: orch-no-such-command-xyz"
    assert out.chunks == []
    # A path that is not there fails at exec.
    ended, _ = execute(make_run(["/nonexistent/orch-prog"]))
    assert ended.exit_code == 127
    assert ended.error is not None and ended.error.startswith("command not found: /nonexistent/orch-prog (")


def test_not_executable_is_126(path: str, tmp_path: Path) -> None:
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\necho hi\n")
    prog.chmod(0o644)
    ended, out = execute(make_run([str(prog)]))
    assert (ended.outcome, ended.exit_code) == (Outcome.FAILED, 126)
    assert ended.error is not None and ended.error.startswith(f"permission denied: {prog} (")
    assert out.chunks == []


def test_job_env_has_its_ids(path: str) -> None:
    ended, out = execute(sh('echo "$ORCH_JOB_ID $ORCH_ATTEMPT $FOO"', env={"FOO": "bar"}))
    assert ended.outcome is Outcome.SUCCEEDED
    assert out.text() == "7 2 bar\n"


def test_invalid_utf8_is_replaced_and_split_characters_are_whole(path: str) -> None:
    # \377 is never UTF-8; the euro sign (\342\202\254) arrives in two writes.
    ended, out = execute(sh(r"printf 'a\377b\n'; printf '\342\202'; sleep 0.05; printf '\254\n'; printf '\342' >&2"))
    assert ended.outcome is Outcome.SUCCEEDED
    assert out.text() == "a\ufffdb\n\u20ac\n"
    assert out.text("stderr") == "\ufffd"  # a truncated character at the end is flushed, replaced


def test_output_streams_before_the_exit(path: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    run = sh(f"echo first; while [ ! -e {go} ]; do sleep 0.01; done; echo second")

    async def body() -> tuple[Ended, Out]:
        out = Out()
        task = asyncio.create_task(runners.execute(run, out, 5.0))
        await until(lambda: out.text() == "first\n", 10, "the first line while the job runs")
        assert not task.done()
        go.touch()
        return await asyncio.wait_for(task, 10), out

    ended, out = asyncio.run(body())
    assert ended.outcome is Outcome.SUCCEEDED
    assert out.text() == "first\nsecond\n"


def test_a_working_directory_runs_on_a_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    threads: list[Run] = []
    real = runners._run_blocking
    monkeypatch.setattr(runners, "_run_blocking", lambda run, *a: threads.append(run) or real(run, *a))
    ended, out = execute(make_run(["pwd"], cwd=str(tmp_path)))
    assert ended.outcome is Outcome.SUCCEEDED
    assert out.text() == f"{tmp_path}\n"
    assert len(threads) == 1
    ended, _ = execute(make_run(["pwd"], cwd=str(tmp_path / "missing")))
    assert (ended.outcome, ended.exit_code) == (Outcome.FAILED, 127)
    assert ended.error == f"working directory not found: {tmp_path / 'missing'}"


# ------------------------------------------------------------------ the child's lot


def test_sigpipe_is_at_its_default(path: str) -> None:
    # sh passes on what it was started with ignored (and nothing else).
    ended, out = execute(sh("yes | head -n 1; grep '^SigIgn:' /proc/self/status", timeout=10))
    assert ended.outcome is Outcome.SUCCEEDED
    lines = out.text().splitlines()
    assert lines[0] == "y"
    status = dict(line.split(":\t") for line in lines[1:])
    assert not int(status["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1)), status
    assert not int(status["SigIgn"], 16) & (1 << (signal.SIGXFSZ - 1)), status
    assert out.text("stderr") == ""  # `yes` died of SIGPIPE, not of a write error


@pytest.mark.skipif(not FAST_AVAILABLE, reason="no posix_spawn/pidfd_open here")
def test_fast_path_child_gets_an_empty_signal_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast path only: Popen passes on the mask of the thread it runs on.
    monkeypatch.setattr(runners, "_run_blocking", None)  # must not be called
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        ended, out = execute(make_run(["grep", "^SigBlk:", "/proc/self/status"]))  # sh would unblock all
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert ended.outcome is Outcome.SUCCEEDED
    assert int(out.text().split()[1], 16) == 0, out.text()


def test_no_extra_fds_in_the_child(path: str) -> None:
    async def body() -> list[tuple[Ended, Out]]:
        outs = [Out() for _ in range(6)]  # at once: no attempt's pipes may reach another's process
        ended = await asyncio.gather(*(runners.execute(make_run(["ls", "/proc/self/fd"]), o, 5.0) for o in outs))
        return list(zip(ended, outs, strict=True))

    for ended, out in asyncio.run(body()):
        assert ended.outcome is Outcome.SUCCEEDED
        assert sorted(out.text().split()) == ["0", "1", "2", "3"]  # 3: the directory ls reads


def test_stdin_is_dev_null(path: str) -> None:
    ended, out = execute(sh("cat; readlink /proc/self/fd/0"))
    assert ended.outcome is Outcome.SUCCEEDED
    assert out.text() == "/dev/null\n"


def test_own_session_and_process_group(path: str) -> None:
    run = sh("cat /proc/self/stat")
    ended, out = execute(run)
    assert ended.outcome is Outcome.SUCCEEDED
    _state, ppid, pgrp, session = out.text().rsplit(")", 1)[1].split()[:4]
    assert int(ppid) == run.pid == int(pgrp) == int(session)  # cat, in the group and session sh leads


# ------------------------------------------------------------------ ends


def test_timeout_kills_the_whole_group(path: str) -> None:
    run = sh("sleep 30 & echo $!; wait", timeout=0.5)
    ended, out = execute(run, kill_grace=5.0)
    assert ended.outcome is Outcome.TIMED_OUT
    assert ended.error == "timed out after 0.5s"
    assert ended.exit_code == 143  # SIGTERM was enough
    assert 0.5 <= ended.duration < 5
    assert run.pid is not None
    wait_until(lambda: not group_alive(run.pid), 5, "the job's process group to be gone")
    assert not pid_alive(int(out.text()))


def test_stop_sends_sigterm_then_sigkill_after_the_grace(path: str) -> None:
    run = sh("trap 'echo got-term' TERM; echo ready; while :; do sleep 0.05; done")

    async def body() -> tuple[Ended, Out, float]:
        out = Out()
        task = asyncio.create_task(runners.execute(run, out, 0.3))
        await until(lambda: "ready" in out.text(), 10, "the job to start")
        t0 = time.monotonic()
        run.request_stop(Outcome.CANCELLED, "cancelled by test")
        return await asyncio.wait_for(task, 10), out, time.monotonic() - t0

    ended, out, took = asyncio.run(body())
    assert (ended.outcome, ended.error, ended.exit_code) == (Outcome.CANCELLED, "cancelled by test", 137)
    assert "got-term" in out.text()  # it had SIGTERM first, and lived on
    assert 0.3 <= took < 5
    assert run.pid is not None
    wait_until(lambda: not group_alive(run.pid), 5, "the job's process group to be gone")


def test_stop_outcome_is_the_stoppers(path: str) -> None:
    run = sh("echo ready; exec sleep 30")

    async def body() -> Ended:
        out = Out()
        task = asyncio.create_task(runners.execute(run, out, 5.0))
        await until(lambda: "ready" in out.text(), 10, "the job to start")
        run.request_stop(Outcome.HANDED_BACK, "draining")
        return await asyncio.wait_for(task, 10)

    ended = asyncio.run(body())
    assert (ended.outcome, ended.error, ended.exit_code) == (Outcome.HANDED_BACK, "draining", 143)


def test_a_signal_asked_for_before_the_start_is_sent(path: str) -> None:
    run = make_run(["sleep", "30"])
    run.signal(signal.SIGTERM)  # no process yet: remembered
    ended, _ = execute(run)
    assert (ended.outcome, ended.exit_code, ended.error) == (Outcome.FAILED, 143, "killed by SIGTERM")
    assert ended.duration < 10


def test_output_of_children_left_behind_is_read_until_they_let_go(path: str) -> None:
    ended, out = execute(sh("(sleep 0.2; echo late) & echo early"))
    assert ended.outcome is Outcome.SUCCEEDED
    assert out.text() == "early\nlate\n"
    assert ended.duration < runners.DRAIN_AFTER_EXIT


def test_a_child_left_holding_the_pipes_does_not_hang_it(path: str) -> None:
    run = sh("sleep 30 & echo done")
    ended, out = execute(run)
    assert (ended.outcome, ended.exit_code) == (Outcome.SUCCEEDED, 0)
    assert out.text() == "done\n"
    assert runners.DRAIN_AFTER_EXIT <= ended.duration < runners.DRAIN_AFTER_EXIT + 2
    assert run.pid is not None
    wait_until(lambda: not group_alive(run.pid), 5, "the left-over sleep to be killed")


def test_a_child_escaped_from_the_group_is_let_go(path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runners, "DRAIN_AFTER_EXIT", 0.2)
    monkeypatch.setattr(runners, "READ_AFTER_KILL", 0.3)
    pidfile = tmp_path / "escaped"
    escape = f"import os, time; os.setsid(); open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    script = f'{sys.executable} -c "$1" & while [ ! -s {pidfile} ]; do sleep 0.01; done; echo done'
    run = make_run(["sh", "-c", script, "sh", escape])
    try:
        ended, out = execute(run)
        assert (ended.outcome, ended.exit_code) == (Outcome.SUCCEEDED, 0)
        assert out.text() == "done\n"
        assert ended.duration < 0.5 + 3
    finally:
        wait_until(lambda: pidfile.read_text(), 5, "the escaped child's pid")
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_cancelling_execute_kills_the_group_and_frees_everything(path: str) -> None:
    run = sh("sleep 30 & echo ready; wait")

    async def body() -> None:
        loop = asyncio.get_running_loop()
        await runners.execute(make_run(["true"]), Out(), 1.0)  # the loop's own fds (its job poller) exist now
        fds = open_fds()
        watched = len(loop._selector.get_map())  # type: ignore[attr-defined]
        out = Out()
        task = asyncio.create_task(runners.execute(run, out, 5.0))
        await until(lambda: "ready" in out.text(), 10, "the job to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if path == "fast":  # at once: nothing is left to the loop
            assert open_fds() == fds
            assert len(loop._selector.get_map()) == watched  # type: ignore[attr-defined]
            assert runners._pollers[loop].callbacks == {}  # no pipe or pidfd of it is watched any more
        assert run.pid is not None
        await until(lambda: not group_alive(run.pid), 5, "the job's process group to be gone")
        # The thread path's thread lets go of its fds once the process is gone.
        await until(lambda: open_fds() == fds, 5, "the attempt's fds to be closed")
        assert len(loop._selector.get_map()) == watched  # type: ignore[attr-defined]

    asyncio.run(body())


def test_fds_are_closed_after_every_end(path: str, tmp_path: Path) -> None:
    async def body() -> None:
        await runners.execute(make_run(["true"]), Out(), 1.0)  # the loop's own fds (its job poller) exist now
        fds = open_fds()
        for run in (make_run(["echo", "x"]), make_run(["orch-no-such-command-xyz"]), make_run(["/nonexistent/x"]),
                    sh("sleep 5", timeout=0.1), sh("sleep 30 & exit 0")):
            await runners.execute(run, Out(), 0.2)
        await until(lambda: open_fds() == fds, 5, "every attempt's fds to be closed")

    asyncio.run(body())


# ------------------------------------------------------------------ falling back


@pytest.mark.skipif(not FAST_AVAILABLE, reason="no posix_spawn/pidfd_open here")
def test_without_pidfds_the_exit_is_awaited_on_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[Run] = []
    real = runners._run_blocking
    monkeypatch.setattr(runners, "_run_blocking", lambda run, *a: threads.append(run) or real(run, *a))
    monkeypatch.setattr(runners, "FAST_SPAWN", True)
    failure = [errno.EMFILE]

    def pidfd_open(pid: int, flags: int = 0) -> int:
        raise OSError(failure[0], os.strerror(failure[0]))

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    # Out of fds for once: this one is waited for on a thread, the next ones still start on the loop.
    ended, out = execute(sh("echo hi; exit 4"))
    assert (ended.outcome, ended.exit_code, out.text()) == (Outcome.FAILED, 4, "hi\n")
    assert runners.FAST_SPAWN and not threads
    # A kernel without pidfds: this one is waited for on a thread, the next ones start on threads.
    failure[0] = errno.ENOSYS
    ended, out = execute(sh("echo hi; exit 5"))
    assert (ended.outcome, ended.exit_code, out.text()) == (Outcome.FAILED, 5, "hi\n")
    assert not runners.FAST_SPAWN and not threads
    ended, out = execute(sh("echo hi"))
    assert (ended.outcome, out.text()) == (Outcome.SUCCEEDED, "hi\n")
    assert len(threads) == 1
