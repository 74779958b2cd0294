"""Several `orch scheduler` replicas on one PostgreSQL database, with workers joined to all of them, and the
tokens they share."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Proc,
    client_token,
    db_rows,
    free_port,
    http,
    orch_test_env,
    run_cli,
    start_scheduler,
    start_worker,
    wait_until,
    workers_alive,
)

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]  # PostgreSQL itself: the replicas need it

LEADS = re.compile(r"this scheduler runs the reaper")
TTL = 3.0


def counts(env: dict[str, str]) -> dict[str, int]:
    return {str(s): int(n) for s, n in db_rows(env, "SELECT state, count(*) FROM jobs GROUP BY state")}


def two_replicas(tmp_path: Path, env: dict[str, str], procs: list[Proc]) -> tuple[Proc, str, Proc, str]:
    """Schedulers replica-a and replica-b on the database ``env`` names (added to ``procs``), with their URLs."""
    a, url_a = start_scheduler(tmp_path, env, name="replica-a")
    procs.append(a)
    b, url_b = start_scheduler(tmp_path, env, name="replica-b")
    procs.append(b)
    return a, url_a, b, url_b


def leading(a: Proc, url_a: str, b: Proc, url_b: str) -> tuple[Proc, str, Proc, str]:
    """The replica that took the reaper and its URL, then the other and its URL."""
    return wait_until(lambda: (a, url_a, b, url_b) if LEADS.search(a.log()) else
                      (b, url_b, a, url_a) if LEADS.search(b.log()) else None, 30, "one replica to take the reaper")


def leader_gauge(url: str) -> float | None:
    """``orch_scheduler_leader`` as a scheduler's /metrics shows it."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {client_token()}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r"^orch_scheduler_leader\s+(\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def lease_woken_by_a_submit_elsewhere(data: Path, wait_on: str, submit_to: str, name: str) -> float:
    """A worker's lease long-polls on ``wait_on`` (still waiting after 1 s: an empty queue) when a job is
    submitted to ``submit_to``; the lease must get that job. Returns how long after the submit it did."""
    status, reg = http("POST", wait_on + "/v1/workers", {"name": name, "hostname": "h", "queues": ["q"],
                                                         "concurrency": 1}, token=client_token(data, "join"))
    assert status == 201, reg
    got: dict[str, Any] = {}

    def wait_for_work() -> None:
        got["reply"] = http("POST", f"{wait_on}/v1/workers/{reg['worker_id']}/lease",
                            {"max": 1, "queues": ["q"], "wait": 25}, token=reg["credential"], timeout=60)
        got["at"] = time.monotonic()

    t = threading.Thread(target=wait_for_work)
    t.start()
    t.join(1.0)
    assert t.is_alive(), f"the lease answered at once, on an empty queue: {got}"
    sent = time.monotonic()
    status, body = http("POST", submit_to + "/v1/jobs", {"command": ["true"], "queue": "q"})
    assert status == 201, body
    t.join(30)
    assert not t.is_alive(), f"the lease on {wait_on} was never given the job"
    status, reply = got["reply"]
    assert status == 200 and [j["job_id"] for j in reply["jobs"]] == [body["id"]], reply
    return float(got["at"] - sent)


def test_killing_the_leader_replica_mid_run_loses_nothing_and_the_other_takes_the_reaper(
        tmp_path: Path, postgres_server: Any) -> None:
    """Two replicas, two workers joined to both (the leader first), 2,000 jobs; the leader is killed with -9
    half-way: every job succeeds exactly once, none is left behind, the other replica runs the reaper within the
    lease TTL (its orch_scheduler_leader gauge goes to 1), and the workers go on through it."""
    data = tmp_path / "data"
    data.mkdir()
    env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres", ORCH_STORAGE_DSN=postgres_server.database(),
                        ORCH_SCHEDULER_LEASE_TTL=str(TTL), ORCH_SCHEDULER_HEARTBEAT_INTERVAL="0.5",
                        ORCH_SCHEDULER_RECOVERY_GRACE=str(TTL), ORCH_STORAGE_POLL_INTERVAL="0.5")
    procs: list[Proc] = []
    try:
        a, url_a, b, url_b = two_replicas(tmp_path, env, procs)
        leader, leader_url, other, other_url = leading(a, url_a, b, url_b)
        assert not LEADS.search(other.log()), "two leaders"
        assert (leader_gauge(leader_url), leader_gauge(other_url)) == (1.0, 0.0)
        # The leader first in the workers' lists: they talk to it until it dies, then must move to the other.
        for name in ("w1", "w2"):
            procs.append(start_worker(tmp_path, env, f"{leader_url},{other_url}", name, concurrency=8))
        wait_until(lambda: len(http("GET", url_b + "/v1/workers")[1]["workers"]) == 2, 30, "both workers")

        ids = []
        for _ in range(4):  # 2,000 jobs, in batches, through either replica
            status, body = http("POST", f"{url_a if len(ids) % 1000 else url_b}/v1/jobs/batch",
                                {"jobs": [{"shell": "sleep 0.05"}] * 500})
            assert status == 201, body
            ids += [j["id"] for j in body["jobs"]]
        wait_until(lambda: counts(env).get("succeeded", 0) >= 400, 120, "a fifth of the jobs to succeed")

        leader.kill9()
        killed = time.monotonic()
        # Counted at the kill, so that 1,600 jobs at least are still to come however fast the run goes.
        before = counts(env).get("succeeded", 0)
        took = wait_until(lambda: LEADS.search(other.log()) and time.monotonic(), 3 * TTL, "the other replica to lead")
        assert took - killed <= TTL + 1.5, f"took the reaper {took - killed:.1f}s after the kill"
        assert leader_gauge(other_url) == 1.0
        wait_until(lambda: counts(env).get("succeeded", 0) > before + 100, 60, "the workers to keep going")

        def all_ended() -> dict[str, int] | None:
            c = counts(env)
            return c if sum(c.values()) == 2000 and set(c) <= {"succeeded", "failed", "cancelled"} else None

        final = wait_until(all_ended, 240, "every job to end")
        assert final == {"succeeded": 2000}, final  # 0 lost, 0 stuck
        # 0 stale completions accepted: each job has exactly one succeeded attempt, and it is its last one.
        per_job = db_rows(env, "SELECT j.id, j.attempt, count(a.*) FILTER (WHERE a.state = 'succeeded'),"
                               " max(a.attempt) FILTER (WHERE a.state = 'succeeded') FROM jobs j"
                               " JOIN attempts a ON a.job_id = j.id GROUP BY j.id, j.attempt")
        assert len(per_job) == 2000
        assert all(n == 1 and last == attempt for _, attempt, n, last in per_job), [r for r in per_job if r[2] != 1][:5]
        workers = http("GET", other_url + "/v1/workers")[1]["workers"]
        assert sorted(w["state"] for w in workers) == ["alive", "alive"], workers
    finally:
        for p in procs:
            p.stop()


def test_while_the_database_is_down_the_scheduler_answers_503_and_the_worker_keeps_its_job(tmp_path: Path) -> None:
    """PostgreSQL stops under a running job: the API answers 503 storage_unavailable (and /healthz still 200),
    the worker runs the job to its end and keeps reporting it; once the server is back the job ends succeeded."""
    from pgserver import PgServer, need_postgres

    need_postgres()
    server = PgServer()  # its own, to be stopped and started
    server.start()
    procs: list[Proc] = []
    try:
        data = tmp_path / "data"
        data.mkdir()
        env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres", ORCH_STORAGE_DSN=server.database(),
                            ORCH_SCHEDULER_LEASE_TTL="5", ORCH_SCHEDULER_HEARTBEAT_INTERVAL="0.5",
                            ORCH_SCHEDULER_RECOVERY_GRACE="5")
        sched, url = start_scheduler(tmp_path, env)
        procs.append(sched)
        procs.append(start_worker(tmp_path, env, url, "w1", concurrency=2))
        wait_until(lambda: len(http("GET", url + "/v1/workers")[1]["workers"]) == 1, 30, "the worker")
        status, job = http("POST", url + "/v1/jobs", {"shell": "sleep 4; echo done"})
        assert status == 201, job
        wait_until(lambda: http("GET", f"{url}/v1/jobs/{job['id']}")[1]["state"] == "running", 30, "the job to run")

        server.halt()
        status, body = http("GET", f"{url}/v1/jobs/{job['id']}")
        assert status == 503 and body["error"]["code"] == "storage_unavailable", (status, body)
        assert http("GET", url + "/healthz")[0] == 200
        # The job ends meanwhile: the worker keeps its result and retries the report.
        wait_until(lambda: re.search(r"reporting: .*keeping [1-9]\d* results", (tmp_path / "w1.log").read_text()),
                   30, "the worker to hold the job's end while the database is down")
        server.launch()
        final = wait_until(lambda: (r := http("GET", f"{url}/v1/jobs/{job['id']}"))[0] == 200
                           and r[1]["state"] in ("succeeded", "failed") and r[1], 60, "the job to end")
        assert final["state"] == "succeeded" and final["attempt"] == 1, final
        assert final["result"]["stdout"] == "done\n"
    finally:
        for p in procs:
            p.stop()
        server.stop()



@pytest.mark.parametrize("notify", ["true", "false"])
def test_a_lease_long_polling_on_one_replica_is_woken_by_a_submit_on_the_other(
        tmp_path: Path, postgres_server: Any, notify: str) -> None:
    """A worker's lease waits on replica B; a job is submitted to replica A. With hints (LISTEN/NOTIFY) the lease
    gets it at once, far sooner than the poll would (every 30 s here); with ``storage.notify: false`` (behind a
    PgBouncer in transaction mode) the poll alone brings it, within its interval (2 s here)."""
    data = tmp_path / "data"
    data.mkdir()
    poll = "30" if notify == "true" else "2"
    env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres", ORCH_STORAGE_DSN=postgres_server.database(),
                        ORCH_STORAGE_NOTIFY=notify, ORCH_STORAGE_POLL_INTERVAL=poll)
    procs: list[Proc] = []
    try:
        a, url_a, b, url_b = two_replicas(tmp_path, env, procs)
        waited = lease_woken_by_a_submit_elsewhere(data, url_b, url_a, "w")
        if notify == "true":
            assert waited < 5.0, f"woken {waited:.1f}s after the submit: by the 30 s poll, not by the hint"
        else:
            assert waited < 2.0 + 3.0, f"woken {waited:.1f}s after the submit, with a 2 s poll"
    finally:
        for p in procs:
            p.stop()


def tokens_in(data: Path) -> dict[str, str]:
    return json.loads((data / "tokens.json").read_text())


def test_orch_token_rotate_on_one_replicas_machine_takes_effect_on_the_other(tmp_path: Path,
                                                                             postgres_server: Any) -> None:
    """Two replicas with data dirs of their own (two machines) on one database: the second accepts the tokens the
    first put there, not its own file's, and says so; `orch token rotate` with the first's data dir reaches the
    second within a few seconds, for the client token and the join token alike."""
    from orch.auth import digest

    dsn = postgres_server.database()
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    env_a, env_b = (orch_test_env(d, ORCH_STORAGE_BACKEND="postgres", ORCH_STORAGE_DSN=dsn)
                    for d in (data_a, data_b))
    procs: list[Proc] = []
    try:
        a, url_a = start_scheduler(tmp_path, env_a, name="replica-a")
        procs.append(a)
        first = tokens_in(data_a)
        # Only the digests are in the database.
        assert dict(db_rows(env_a, "SELECT role, digest FROM tokens")) == {r: digest(t) for r, t in first.items()}
        b, url_b = start_scheduler(tmp_path, env_b, name="replica-b")
        procs.append(b)
        own = tokens_in(data_b)  # made on b's machine at its first start: not the ones in effect
        assert own["client"] != first["client"]
        assert re.search(r"the client and join tokens of .*tokens\.json are not the ones in effect in the shared "
                         r"database.*Copy tokens\.json", b.log()), b.log()
        assert http("GET", url_b + "/v1/jobs", token=first["client"])[0] == 200
        assert http("GET", url_b + "/v1/jobs", token=own["client"])[0] == 401

        r = run_cli(["token", "rotate"], env_a)
        assert r.returncode == 0, r.stderr
        new = tokens_in(data_a)
        assert new["client"] != first["client"] and new["join"] != first["join"]
        assert new["client"] in r.stdout and new["join"] in r.stdout
        wait_until(lambda: (http("GET", url_b + "/v1/jobs", token=first["client"])[0],
                            http("GET", url_b + "/v1/jobs", token=new["client"])[0]) == (401, 200),
                   10, "replica b to refuse the old client token and accept the new one")
        wait_until(lambda: http("POST", url_b + "/v1/workers", {"name": "late"}, token=first["join"])[0] == 401,
                   10, "replica b to refuse the old join token")
        status, body = http("POST", url_b + "/v1/workers", {"name": "new"}, token=new["join"])
        assert status == 201, body
        assert "tokens rotated in the shared database: new client and join tokens in effect; the old ones are " \
               "refused" in b.log(), b.log()
        wait_until(lambda: http("GET", url_a + "/v1/jobs", token=first["client"])[0] == 401, 10,
                   "replica a to refuse the old client token too")
        # What the docs say to do on the second machine: copy the first one's tokens.json. Then a real worker
        # there finds the join token in effect, and `orch token show` shows it.
        shutil.copy(data_a / "tokens.json", data_b / "tokens.json")
        assert run_cli(["token", "show", "--worker"], env_b).stdout.strip() == new["join"]
        procs.append(start_worker(tmp_path, env_b, url_b, "w-b"))
        wait_until(lambda: workers_alive(url_b) == 1, 30, "a worker to join replica b with the copied join token")
        # Only the digests are in the database, never a token.
        kept = dict(db_rows(env_a, "SELECT role, digest FROM tokens"))
        assert kept == {r: digest(t) for r, t in new.items()}
    finally:
        for p in procs:
            p.stop()


def test_orch_token_rotate_with_the_database_away_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Nothing listens where storage.dsn points: one line naming the database, exit 2, tokens.json unchanged."""
    data = tmp_path / "data"
    data.mkdir()
    env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres",
                        ORCH_STORAGE_DSN=f"postgresql://orch@127.0.0.1:{free_port()}/orch")
    r = run_cli(["token", "rotate"], env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("orch: cannot connect to postgresql://orch@127.0.0.1:"), r.stderr
    assert r.stdout == "" and not (data / "tokens.json").exists()


def test_a_stalled_replica_extends_no_lease_of_the_cluster(tmp_path: Path, postgres_server: Any) -> None:
    """The leading replica is stopped (SIGSTOP) past its stall threshold but within its leader lease, then resumed.
    Its workers were heard by the other replica meanwhile, so it says so and extends no lease: a worker killed -9
    right after is lost within the lease TTL (10 s), not after the recovery grace (60 s), as a lone scheduler's
    stall would give it."""
    import signal

    ttl = 10.0
    data = tmp_path / "data"
    data.mkdir()
    env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres", ORCH_STORAGE_DSN=postgres_server.database(),
                        ORCH_SCHEDULER_LEASE_TTL=str(ttl), ORCH_SCHEDULER_HEARTBEAT_INTERVAL="0.5",
                        ORCH_SCHEDULER_RECOVERY_GRACE="60", ORCH_STORAGE_POLL_INTERVAL="0.5")
    procs: list[Proc] = []
    try:
        a, url_a, b, url_b = two_replicas(tmp_path, env, procs)
        leader, _, _, other_url = leading(a, url_a, b, url_b)
        worker = start_worker(tmp_path, env, other_url, "w1")  # it talks to the replica that keeps running
        procs.append(worker)
        status, job = http("POST", other_url + "/v1/jobs", {"shell": "sleep 120"})
        assert status == 201, job
        wait_until(lambda: http("GET", f"{other_url}/v1/jobs/{job['id']}")[1]["state"] == "running", 30,
                   "the job to run")

        leader.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        # The stall: longer than the threshold (tick + max(2 s, TTL / 2) = 5.25 s), shorter than the leader's
        # lease (the TTL), so the stopped replica still leads when it wakes.
        wait_until(lambda: time.monotonic() - stopped > 7.0, 10, "the stall to last 7 s", interval=0.1)
        leader.signal(signal.SIGCONT)
        wait_until(lambda: "scheduler stalled for" in leader.log(), 10, "the resumed replica to see its stall")
        assert re.search(r"scheduler stalled for [\d.]+s; the other schedulers of the database kept serving",
                         leader.log()), leader.log()
        assert "extending leases" not in leader.log()
        assert "no longer runs the reaper" not in leader.log()  # it still led: its sweeps would apply a grace

        worker.signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: http("GET", f"{other_url}/v1/jobs/{job['id']}")[1]["state"] != "running", 40,
                   "the killed worker's job to be taken back")
        took = time.monotonic() - killed
        assert took < ttl + 5, f"the dead worker's job was taken back {took:.1f}s after the kill: leases extended"
        workers = http("GET", other_url + "/v1/workers")[1]["workers"]
        assert [w["state"] for w in workers] == ["lost"], workers
    finally:
        for p in procs:
            p.signal(signal.SIGCONT) if p.alive() else None
            p.stop()


def test_replicas_behind_a_pgbouncer_pooling_by_transaction_run_every_job_in_poll_only_mode(
        tmp_path: Path, postgres_server: Any) -> None:
    """Two replicas reach the database only through a PgBouncer with ``pool_mode = transaction`` (4 server
    connections for the 16 of the schedulers), with ``storage.notify: false``: a worker joined to both runs 500
    jobs submitted to either, 200 of them by 16 clients at once, each job once; a lease waiting on one replica gets a job submitted to the other within
    the poll interval; nothing fails on a statement the pooler gave to another server connection."""
    from pgserver import PgBouncer, need_pgbouncer

    need_pgbouncer()
    bouncer = PgBouncer(postgres_server, pool_size=4)
    bouncer.start()
    procs: list[Proc] = []
    try:
        data = tmp_path / "data"
        data.mkdir()
        env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres",
                            ORCH_STORAGE_DSN=bouncer.dsn(postgres_server.database()), ORCH_STORAGE_NOTIFY="false",
                            ORCH_STORAGE_POLL_INTERVAL="1", ORCH_SCHEDULER_LEASE_TTL="5",
                            ORCH_SCHEDULER_HEARTBEAT_INTERVAL="0.5")
        a, url_a, b, url_b = two_replicas(tmp_path, env, procs)
        procs.append(start_worker(tmp_path, env, f"{url_a},{url_b}", "w1", concurrency=8))
        wait_until(lambda: workers_alive(url_b) == 1, 30, "the worker")
        ids = []
        for i in range(6):  # 300 jobs, one batch in two through each replica, each at least 5 statements
            status, body = http("POST", f"{(url_a, url_b)[i % 2]}/v1/jobs/batch",
                                {"jobs": [{"command": ["echo", str(i)]}] * 50})
            assert status == 201, body
            ids += [j["id"] for j in body["jobs"]]
        # And 200 single submits from 16 clients at once: the same statement again and again on each of the
        # schedulers' connections, while the pooler hands each to whichever server connection is free.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            singles = list(pool.map(lambda i: http("POST", f"{(url_a, url_b)[i % 2]}/v1/jobs",
                                                   {"command": ["echo", "single"]}), range(200)))
        assert [s for s, _ in singles] == [201] * 200, [r for r in singles if r[0] != 201][:3]
        ids += [body["id"] for _, body in singles]

        def ended() -> dict[str, int] | None:
            c = counts(env)
            return c if sum(c.values()) == len(ids) and "queued" not in c and "running" not in c else None

        final = wait_until(ended, 120, "every job to end")
        assert final == {"succeeded": len(ids)}, final
        once = db_rows(env, "SELECT count(*) FROM attempts GROUP BY job_id HAVING count(*) <> 1")
        assert once == [], once

        # A lease waiting on b is given a job submitted to a, by b's poll (no LISTEN through the pooler).
        waited = lease_woken_by_a_submit_elsewhere(data, url_b, url_a, "w2")
        assert waited < 1.0 + 3.0, f"given {waited:.1f}s after the submit, with a 1 s poll"
        for p in (a, b):
            assert "prepared statement" not in p.log() and "Traceback" not in p.log(), p.log()[-3000:]
    finally:
        for p in procs:
            p.stop()
        bouncer.stop()


def test_a_database_that_takes_the_connection_and_never_answers_is_given_up_after_the_connect_timeout(
        tmp_path: Path) -> None:
    """A listener that never answers (a dead host behind a live balancer): `orch token rotate` gives up after the
    connect timeout orch sets when storage.dsn sets none (10 s), in one line and exit 2, instead of hanging."""
    import socket

    data = tmp_path / "data"
    data.mkdir()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
        env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres",
                            ORCH_STORAGE_DSN=f"postgresql://orch@127.0.0.1:{silent.getsockname()[1]}/orch")
        began = time.monotonic()
        r = run_cli(["token", "rotate"], env, timeout=60)
        took = time.monotonic() - began
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert 9 < took < 30, f"gave up after {took:.1f}s"
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("orch: cannot connect to postgresql://orch@127.0.0.1:"), r.stderr


def test_a_role_that_may_not_create_the_schema_is_one_line_and_exit_2(tmp_path: Path, postgres_server: Any) -> None:
    """storage.dsn names a role that may connect but not create tables (PostgreSQL 15's public schema): the
    scheduler does not start, and says so in one line naming the database, with exit 2, not a traceback."""
    import uuid

    import psycopg

    dsn = postgres_server.database()
    role = "r_" + uuid.uuid4().hex[:12]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    data = tmp_path / "data"
    data.mkdir()
    env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres",
                        ORCH_STORAGE_DSN=dsn.replace("postgresql://postgres@", f"postgresql://{role}@"))
    r = run_cli(["scheduler", "--port", "0"], env, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert re.search(rf"^orch: cannot set up postgresql://{role}@127\.0\.0\.1:\d+/t_\w+ for orch: permission denied "
                     r"for schema public$", r.stderr, re.M), r.stderr


def test_the_dashboard_signs_in_on_one_replica_and_the_other_accepts_the_session_and_shows_its_changes_live(
        tmp_path: Path, postgres_server: Any) -> None:
    """A session made by replica a is good on replica b (their key is the shared client token's), b's pages show
    what a committed, and b's event stream tells a submit on a within a second."""
    data = tmp_path / "data"
    data.mkdir()
    env = orch_test_env(data, ORCH_STORAGE_BACKEND="postgres", ORCH_STORAGE_DSN=postgres_server.database())
    procs: list[Proc] = []
    try:
        a, url_a, b, url_b = two_replicas(tmp_path, env, procs)
        login = urllib.request.Request(url_a + "/ui/login", method="POST",
                                       data=f"token={client_token(data)}".encode(),
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kw: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(login, timeout=10)
            raise AssertionError("the sign-in did not redirect")
        except urllib.error.HTTPError as e:
            assert e.code == 303, e.read()
            cookie = e.headers["Set-Cookie"].split(";", 1)[0]
        status, job = http("POST", url_a + "/v1/jobs", {"command": ["true"], "name": "made-on-a"})
        assert status == 201
        page = urllib.request.Request(f"{url_b}/ui/jobs/{job['id']}", headers={"Cookie": cookie})
        with opener.open(page, timeout=10) as resp:
            assert resp.status == 200 and "made-on-a" in resp.read().decode()
        stream = urllib.request.Request(url_b + "/ui/events", headers={"Cookie": cookie})
        with opener.open(stream, timeout=10) as resp:
            assert resp.readline() == b"retry: 1000\n"
            resp.readline()
            http("POST", url_a + "/v1/jobs", {"command": ["true"]})
            line = resp.readline().decode()  # the change, heard from a through the database (10 s deadline)
            assert line.startswith("id: ") and resp.readline() == b"event: change\n", line
    finally:
        for p in reversed(procs):
            p.stop()
