"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright (no browser download),
against real orch processes. Sign in, watch a job go from queued to succeeded without a reload, follow a running
job's log, cancel, retry, bulk-cancel with the count confirmed, pause a queue, open a workflow graph, drain a
worker, sign in read-only, keyboard and dark mode, and hostile strings that must not run. A screenshot of each
page is kept under test-artifacts/dashboard/ (ORCH_TEST_ARTIFACTS moves it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import (
    client_token,
    http,
    job,
    orch_test_env,
    run_cli,
    start_scheduler,
    start_worker,
    submit,
    wait_until,
    workers_alive,
)
from orch.core.cron import LABEL

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("ORCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
SHOTS = ARTIFACTS / "dashboard"
READ = "read-token-for-the-browser"
DIALOGS: list[str] = []  # what the page's confirmations asked (each is accepted)
LIVE = 10_000  # ms: how long a page may take to show a change by itself (it takes well under a second)


def need_browser() -> Any:
    """Playwright's sync API with Debian's chromium, or a skip (a failure under CI=true: CI installs both)."""
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -e '.[test]')"
    if why is None and not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(why + "; .ci/run installs it")
        pytest.skip(why)
    return sync_playwright


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dashboard")
    data = tmp / "data"
    data.mkdir()
    env = orch_test_env(data, ORCH_READ_TOKEN=READ)
    sched, url = start_scheduler(tmp, env)
    worker = start_worker(tmp, env, url, "browser-w", concurrency=4)
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        yield {"tmp": tmp, "env": env, "url": url, "sched": sched, "worker": worker, "token": client_token(data)}
    finally:
        worker.stop()
        sched.stop()


@pytest.fixture(scope="module")
def browser(cluster: dict[str, Any]) -> Iterator[Any]:
    sync_playwright = need_browser()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, cluster: dict[str, Any]) -> Iterator[Any]:
    """A fresh context (no cookie), signed in through the login form; script errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    DIALOGS.clear()
    pg.on("dialog", lambda d: (DIALOGS.append(d.message), d.accept()))
    pg.goto(cluster["url"] + "/ui")
    assert pg.url.endswith("/ui/login")
    pg.fill("#token", cluster["token"])
    pg.click("button[type=submit]")
    pg.wait_for_url(cluster["url"] + "/ui")
    try:
        yield pg
    finally:
        context.close()
        assert errors == [], errors


def shot(pg: Any, name: str) -> None:
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def mark(pg: Any) -> None:
    """A flag in the page's window: still there later means the page was never reloaded."""
    pg.evaluate("window.__orchNotReloaded = true")


def not_reloaded(pg: Any) -> None:
    assert pg.evaluate("window.__orchNotReloaded === true"), "the page was reloaded"


def test_sign_in_and_every_page_renders(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    run_cli(["run", "--name", "hello", "echo", "hello"], {**cluster["env"], "ORCH_SERVER": url})
    http("POST", f"{url}/v1/schedules", {"name": "nightly-report", "cron": "0 3 * * *", "job": {"command": ["true"]}})
    for name, path, heading in (("overview", "/ui", "Overview"), ("jobs", "/ui/jobs", "Jobs"),
                                ("workers", "/ui/workers", "Workers"), ("queues", "/ui/queues", "Queues"),
                                ("schedules", "/ui/schedules", "Schedules")):
        page.goto(url + path)
        assert page.locator("h1").first.inner_text().startswith(heading)
        shot(page, name)
    assert page.locator("text=nightly-report").count() == 1
    page.goto(url + "/ui")
    overview = page.locator("main").inner_text()
    for part in ("Jobs by state", "The last hour", "failure rate", "Workers", "slots busy", "Queue depths",
                 "Schedules due next", "nightly-report"):
        assert part in overview, part
    assert page.locator(".tiles .tile").count() == 9  # one per state
    page.goto(url + "/ui/workers")
    assert page.locator("text=browser-w").count() == 1
    signed_out = page.context.browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        login_page = signed_out.new_page()
        login_page.goto(url + "/ui/jobs")  # signed out: sent to the sign-in
        assert login_page.url.endswith("/ui/login")
        shot(login_page, "login")
    finally:
        signed_out.close()
    # The session cookie as the browser holds it.
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "orch_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > 0


def test_a_job_goes_from_queued_to_succeeded_on_its_page_without_a_reload(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    status, _ = http("POST", f"{url}/v1/queues/held/pause")
    assert status == 200
    jid = submit(url, {"command": ["echo", "done"], "queue": "held", "name": "watched"})
    # A worker of the held queue, so the job runs once the queue is resumed.
    w = start_worker(cluster["tmp"], cluster["env"], url, "held-w", extra=["--queue", "held"])
    try:
        wait_until(lambda: workers_alive(url) == 2, 30, "the held queue's worker")
        page.goto(f"{url}/ui/jobs/{jid}")
        page.wait_for_selector("#live:not([hidden])")  # the event stream is open
        assert page.locator(".facts .badge").first.inner_text() == "queued"
        mark(page)
        http("POST", f"{url}/v1/queues/held/resume")
        page.wait_for_selector(".facts .badge.st-succeeded", timeout=LIVE)
        not_reloaded(page)
        assert "done" in page.locator("#log-stdout").inner_text()
        assert page.locator("ol.history li").count() >= 3  # submitted, claimed, exited 0
        shot(page, "job")
    finally:
        w.stop()


def test_a_running_jobs_log_grows_on_its_page(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    gate = cluster["tmp"] / "log-gate"
    jid = submit(url, {"shell": f"echo first line; while [ ! -e {gate} ]; do sleep 0.05; done; echo second line",
                       "name": "chatty"})
    wait_until(lambda: job(url, jid)["state"] == "running", 30, "the job to run")
    page.goto(f"{url}/ui/jobs/{jid}")
    page.locator("#log-stdout", has_text="first line").wait_for(timeout=LIVE)
    mark(page)
    gate.touch()
    page.locator("#log-stdout", has_text="second line").wait_for(timeout=LIVE)
    page.wait_for_selector(".facts .badge.st-succeeded", timeout=LIVE)
    not_reloaded(page)


def test_cancel_a_running_job_and_retry_a_failed_one(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    long = submit(url, {"command": ["sleep", "600"], "name": "long"})
    wait_until(lambda: job(url, long)["state"] == "running", 30, "the long job to run")
    page.goto(f"{url}/ui/jobs/{long}")
    page.click("button[data-act=cancel]")  # the confirmation is accepted (the page fixture's dialog handler)
    page.wait_for_selector(".facts .badge.st-cancelled", timeout=LIVE)
    assert job(url, long)["state"] == "cancelled"

    failing = submit(url, {"shell": "echo nope >&2; exit 3", "max_attempts": 1, "name": "failing"})
    wait_until(lambda: job(url, failing)["state"] == "failed", 30, "the job to fail")
    page.goto(f"{url}/ui/jobs/{failing}")
    assert "1 of 1" in page.locator(".facts").inner_text()
    page.click("button[data-act=retry]")
    page.locator(".facts", has_text="2 of 2").wait_for(timeout=LIVE)
    wait_until(lambda: job(url, failing)["attempt"] == 2 and job(url, failing)["state"] == "failed", 30,
               "the replayed attempt to fail again")
    page.wait_for_selector(".timeline rect:nth-of-type(1)", state="attached")
    assert page.locator(".timeline rect").count() == 2  # both attempts on the timeline
    assert "nope" in page.locator("#log-stderr").inner_text()


def test_bulk_cancel_confirms_how_many_then_cancels_them(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    status, _ = http("POST", f"{url}/v1/queues/bulk/pause")
    ids = [submit(url, {"command": ["true"], "queue": "bulk", "labels": {"batch": "b7"}}) for _ in range(6)]
    other = submit(url, {"command": ["true"], "queue": "bulk", "labels": {"batch": "b8"}})
    page.goto(f"{url}/ui/jobs?queue=bulk&label=batch%3Db7")
    assert page.locator("table.jobs tbody tr").count() == 6
    page.click("button[data-bulk=cancel]")
    # (A Playwright wait, so that the confirmation is answered meanwhile: sync Playwright handles a dialog only
    # while one of its calls runs.)
    page.locator("#notice", has_text="6 done").wait_for(timeout=LIVE)
    assert all(job(url, i)["state"] == "cancelled" for i in ids)
    assert any(m.startswith("Cancel 6 jobs") and "label batch=b7" in m for m in DIALOGS), DIALOGS
    assert job(url, other)["state"] == "queued"  # the filter's, and only those
    http("POST", f"{url}/v1/queues/bulk/resume")


def test_pause_a_queue_from_its_page(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    submit(url, {"command": ["true"], "queue": "pausable"})
    page.goto(f"{url}/ui/queues")
    row = page.locator("#q-pausable")
    row.locator("button[data-act=pause-queue]").click()
    page.wait_for_selector("#q-pausable >> text=paused", timeout=LIVE)
    status, queues = http("GET", f"{url}/v1/queues")
    assert {q["name"]: q["paused"] for q in queues["queues"]}["pausable"] is True
    page.locator("#q-pausable button[data-act=resume-queue]").click()
    page.wait_for_selector("#q-pausable >> text=serving", timeout=LIVE)
    shot(page, "queues")


def test_a_queue_limit_and_a_schedules_pause_resume_and_run_now(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    submit(url, {"command": ["true"], "queue": "limited"})
    page.goto(f"{url}/ui/queues")
    form = page.locator("#q-limited form.limit")
    form.locator("input[name=concurrency]").fill("3")
    form.locator("button[type=submit]").click()
    page.locator("#notice", has_text="limit 3").wait_for(timeout=LIVE)
    status, queues = http("GET", f"{url}/v1/queues")
    assert {q["name"]: q["concurrency"] for q in queues["queues"]}["limited"] == 3
    page.locator("#q-limited form.limit input[name=concurrency]").fill("")
    page.locator("#q-limited form.limit button[type=submit]").click()
    page.locator("#notice", has_text="limit lifted").wait_for(timeout=LIVE)
    assert {q["name"]: q["concurrency"] for q in http("GET", f"{url}/v1/queues")[1]["queues"]}["limited"] is None

    http("POST", f"{url}/v1/schedules", {"name": "hourly-sync", "cron": "0 * * * *", "job": {"command": ["true"]}})
    page.goto(f"{url}/ui/schedules")
    row = "#s-hourly-sync"
    assert page.locator(f"{row} ul.plain li").count() == 3  # its next three runs
    page.locator(f"{row} button[data-act=pause-schedule]").click()
    page.locator(row, has_text="paused").wait_for(timeout=LIVE)
    assert http("GET", f"{url}/v1/schedules/hourly-sync")[1]["paused"] is True
    page.locator(f"{row} button[data-act=resume-schedule]").click()
    page.locator(f"{row} button[data-act=pause-schedule]").wait_for(timeout=LIVE)
    page.locator(f"{row} button[data-act=trigger]").click()
    page.locator("#notice", has_text="hourly-sync: a job submitted").wait_for(timeout=LIVE)
    # The job it ran now, found on the jobs page by the schedule's label.
    page.goto(f"{url}/ui/jobs?label={LABEL}%3Dhourly-sync")
    assert page.locator("table.jobs tbody tr").count() == 1


def test_the_stream_closes_while_the_tab_is_hidden_and_catches_up_when_shown(page: Any,
                                                                             cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    page.goto(f"{url}/ui/jobs?queue=hidden-tab")
    page.wait_for_selector("#live:not([hidden])")
    mark(page)
    hide = """(hidden) => { Object.defineProperty(document, 'hidden', {value: hidden, configurable: true});
                            document.dispatchEvent(new Event('visibilitychange')); }"""
    page.evaluate(hide, True)
    page.wait_for_selector("#live[hidden]", state="attached")  # the EventSource is closed
    jid = submit(url, {"command": ["true"], "queue": "hidden-tab"})  # while hidden: nothing is told
    page.evaluate(hide, False)  # shown again: the stream resumes from its last id and catches up
    page.locator(f"table.jobs a[href='/ui/jobs/{jid}']").wait_for(timeout=LIVE)
    page.wait_for_selector("#live:not([hidden])")
    not_reloaded(page)


def test_a_workflow_graph_shows_each_job_in_its_state(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    status, batch = http("POST", f"{url}/v1/jobs/batch", {"jobs": [
        {"ref": "fetch", "command": ["true"]},
        {"ref": "resize", "command": ["true"], "depends_on": ["fetch"]},
        {"ref": "publish", "command": ["true"], "depends_on": ["resize"]}]})
    assert status == 201, batch
    first = batch["jobs"][0]["id"]
    wait_until(lambda: job(url, batch["jobs"][2]["id"])["state"] == "succeeded", 30, "the workflow to finish")
    page.goto(f"{url}/ui/workflows/{first}")
    nodes = page.locator(".graph a.node")
    assert nodes.count() == 3
    assert page.locator(".graph line.edge").count() == 2
    assert page.locator(".graph a.node.st-succeeded").count() == 3
    shot(page, "workflow")
    page.locator(".graph a.node", has_text="publish").click()
    page.wait_for_url(f"{url}/ui/jobs/{batch['jobs'][2]['id']}")


def test_hostile_strings_show_as_text_and_never_run(browser: Any, cluster: dict[str, Any]) -> None:
    """With the Content-Security-Policy bypassed, so that only the escaping stands between the payload and the
    page (the policy would stop inline script on its own: that is its job, not this test's)."""
    url = cluster["url"]
    payload = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    jid = submit(url, {"shell": f"printf '%s' '{payload}'; exit 1", "name": payload, "max_attempts": 1,
                       "labels": {"note": payload}})
    wait_until(lambda: job(url, jid)["state"] == "failed", 30, "the hostile job to end")
    context = browser.new_context(bypass_csp=True)
    try:
        pg = context.new_page()
        pg.goto(url + "/ui/login")
        pg.fill("#token", cluster["token"])
        pg.click("button[type=submit]")
        pg.wait_for_url(url + "/ui")
        for path in (f"/ui/jobs/{jid}", "/ui/jobs", f"/ui/jobs?q={payload[:10]}", "/ui"):
            pg.goto(url + path)
            assert pg.evaluate("window.__pwned") is None, path
            assert pg.locator("img[src=x]").count() == 0, path
        pg.goto(f"{url}/ui/jobs/{jid}")
        assert payload in pg.locator("h1").inner_text()  # shown as the text it is
        assert payload in pg.locator("#log-stdout").inner_text()
        assert pg.evaluate("window.__pwned") is None
    finally:
        context.close()


def test_keyboard_and_dark_mode(page: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    submit(url, {"command": ["true"], "name": "findme-by-keyboard"})
    page.goto(f"{url}/ui/jobs")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("findme")
    page.keyboard.press("Enter")
    page.wait_for_url("**/ui/jobs?*q=findme*")
    assert page.locator("table.jobs tbody tr").count() >= 1
    # Tab from the top: the skip link first, then the navigation, each reachable and followed by Enter.
    page.keyboard.press("Escape")
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    for _ in range(3):
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('href')") == "/ui/jobs"
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/ui/workers")
    page.keyboard.press("g")
    page.keyboard.press("q")
    page.wait_for_url(f"{url}/ui/queues")

    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light != dark and _luma(dark) < 60 < 200 < _luma(light), (light, dark)
    page.goto(f"{url}/ui")
    shot(page, "overview-dark")
    page.click("#theme")  # the toggle: light again, remembered
    assert _luma(page.evaluate("getComputedStyle(document.body).backgroundColor")) > 200
    page.reload()
    assert _luma(page.evaluate("getComputedStyle(document.body).backgroundColor")) > 200


def _luma(css: str) -> float:
    r, g, b = (float(x) for x in css[css.index("(") + 1:css.index(")")].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_a_read_only_sign_in_shows_everything_and_no_button(browser: Any, cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    jid = submit(url, {"command": ["sleep", "600"], "name": "read-only-view"})
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(url + "/ui/login")
        pg.fill("#token", READ)
        pg.click("button[type=submit]")
        pg.wait_for_url(url + "/ui")
        assert "read-only" in pg.locator("header").inner_text()
        for path in (f"/ui/jobs/{jid}", "/ui/jobs", "/ui/queues", "/ui/workers", "/ui/schedules"):
            pg.goto(url + path)
            assert pg.locator("button[data-act], button[data-bulk]").count() == 0, path
        # Its session cannot act even by hand.
        status = pg.evaluate("""async (id) => (await fetch(`/v1/jobs/${id}/cancel`, {method: 'POST',
            headers: {'X-Orch-CSRF': document.querySelector('meta[name=orch-csrf]').content}})).status""", jid)
        assert status == 403
    finally:
        context.close()
        http("POST", f"{url}/v1/jobs/{jid}/cancel")


def test_orch_ui_link_signs_in_once_and_drain_stops_a_real_worker(browser: Any, cluster: dict[str, Any]) -> None:
    url, env = cluster["url"], {**cluster["env"], "ORCH_SERVER": cluster["url"]}
    r = run_cli(["ui", "--no-open"], env)
    assert r.returncode == 0, r.stderr
    link = r.stdout.strip()
    assert link.startswith(url + "/ui/link?code=")
    w = start_worker(cluster["tmp"], cluster["env"], url, "to-drain", extra=["--queue", "drainq"])
    context = browser.new_context()
    try:
        wait_until(lambda: any(x["name"] == "to-drain" and x["state"] == "alive"
                               for x in http("GET", f"{url}/v1/workers")[1]["workers"]), 30, "the worker to drain")
        pg = context.new_page()
        pg.on("dialog", lambda d: d.accept())
        pg.goto(link)
        pg.wait_for_url(url + "/ui")
        pg.goto(url + "/ui/workers")
        row = pg.locator("tr", has_text="to-drain")
        row.locator("button[data-act=drain]").click()
        pg.locator("#notice", has_text="draining").wait_for(timeout=LIVE)
        assert w.wait(30) == 0  # the worker process drained and exited by itself
        pg.wait_for_selector("tr:has-text('to-drain') .badge.st-stopped", timeout=LIVE)
        shot(pg, "workers")
        other = browser.new_context()
        try:
            again = other.new_page()
            again.goto(link)  # taken already
            assert "used already or has expired" in again.content()
        finally:
            other.close()
    finally:
        context.close()
        w.stop()


def test_the_readme_picture_is_a_screenshot_these_tests_take() -> None:
    """docs/dashboard.png, which the README shows, is test-artifacts/dashboard/overview.png of a run of these tests
    (ORCH_UPDATE_PICTURE=1 copies the new one over it)."""
    picture = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
    if (SHOTS / "overview.png").exists() and os.environ.get("ORCH_UPDATE_PICTURE"):
        shutil.copyfile(SHOTS / "job.png", picture)
    head = picture.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert int.from_bytes(head[16:20], "big") == 1280  # the tests' viewport width
    assert "docs/dashboard.png" in (picture.parents[1] / "README.md").read_text(encoding="utf-8")
