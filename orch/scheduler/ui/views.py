"""The dashboard's routes: sign-in, the pages, their live event stream, bulk actions, and the static files.

Pages are rendered here from the store on every request (nothing is remembered between requests, so every
replica of a shared database serves the same dashboard). A page asked for with ``X-Orch-Fragment: 1`` answers
only what goes in its <main>: the script swaps that in when the event stream says something changed.

Single actions (cancel, retry, pause, drain...) are calls of the JSON API made by the page's script with the
session cookie and its CSRF header (security.Guard.authenticate). Bulk actions are here: they act on every job a
filter matches, a page of ids at a time, after a first call that counts them for the confirmation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib import resources
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from orch import auth
from orch.core.errors import Conflict, NotFound, OrchError, ValidationError
from orch.core.spec import NAME_RE, validate_name
from orch.core.states import REPLAYABLE, TERMINAL, JobState
from orch.scheduler import wire
from orch.scheduler.security import GUARD, Guard
from orch.scheduler.ui import pages
from orch.scheduler.ui.session import ADMIN, COOKIE, CSRF_HEADER, READ, Session
from orch.scheduler.why import explain

log = logging.getLogger("orch.scheduler")

FRAGMENT = "X-Orch-Fragment"
BULK_PAGE = 500
SCAN_WINDOW = 100_000  # ids a page of jobs filtered by name, label or text reads at most
MAX_FILTER = 200  # characters of a name or text filter
FILTER_KEYS = ("state", "queue", "label", "name", "q", "cursor")
STATIC = {"app.css": "text/css", "app.js": "text/javascript"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
                    "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
BOOT = f"{int(time.time() * 1000):x}"  # event ids of this process's stream: BOOT-version


class Filters:
    """The jobs page's filters, from its query: checked, with the store's arguments and the URL's text."""

    def __init__(self, query: Any) -> None:
        self.text: dict[str, str] = {}
        self.state: JobState | None = None
        self.queue: str | None = None
        self.name: str | None = None
        self.label: tuple[str, str] | None = None
        self.q: str | None = None
        self.cursor: int | None = None
        for key in FILTER_KEYS:
            value = query.get(key, "")
            if not isinstance(value, str) or not value.strip():
                continue
            value = value.strip()
            if len(value) > MAX_FILTER:
                raise ValidationError(f"{key} is at most {MAX_FILTER} characters", field=key)
            self.text[key] = value
            if key == "state":
                found = JobState._value2member_map_.get(value)
                if found is None:
                    raise ValidationError(f"state must be one of {', '.join(s.value for s in JobState)}", field="state")
                self.state = JobState(found.value)
            elif key == "queue":
                self.queue = validate_name(value, "queue")
            elif key == "label":
                k, eq, v = value.partition("=")
                if not eq or not NAME_RE.fullmatch(k.strip()):
                    raise ValidationError("label is key=value, the key a name (letters, digits, . _ -)", field="label")
                self.label = (k.strip(), v.strip())
            elif key == "name":
                self.name = value
            elif key == "q":
                self.q = value
            elif key == "cursor":
                if not (value.isascii() and value.isdigit()) or len(value) > 18:
                    raise ValidationError("cursor must be a value from a previous page's link", field="cursor")
                self.cursor = int(value)

    def store_args(self, state: JobState | None = None) -> dict[str, Any]:
        return {"state": state if state is not None else self.state, "queue": self.queue, "name": self.name,
                "label": self.label, "text": self.q}


class Ui:
    def __init__(self, api: Any, guard: Guard) -> None:
        self.api = api
        self.store = api.store
        self.hub = api.hub
        self.guard = guard
        self.settings = api.settings
        self.secure = bool(api.settings["tls.cert"] and api.settings["tls.key"])
        self.retention = api.settings["scheduler.worker_retention"]

    # ------------------------------------------------------------------ sessions

    def session(self, request: web.Request) -> Session | None:
        if not self.guard.enabled:
            found = self.guard.session_of(request)
            return found if found is not None else Session(ADMIN, time.time() + self.guard.sessions.ttl, "")
        return self.guard.session_of(request)

    def _cookie(self, resp: web.StreamResponse, role: str, value: str | None = None) -> None:
        value = value or self.guard.sessions.issue(role)
        if value is None:
            raise Conflict("the scheduler has no client token yet: no session can be signed")
        resp.set_cookie(COOKIE, value, max_age=int(self.guard.sessions.ttl), path="/", httponly=True,
                        samesite="Strict", secure=self.secure)

    def _same_origin(self, request: web.Request) -> bool:
        """A form post from a page of this scheduler (the Origin header, when the browser sends one)."""
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return origin is None
        return urlsplit(origin).netloc == request.host

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if self.session(request) is not None:
            raise web.HTTPSeeOther("/ui")
        return self._html(pages.login(None, self.guard.read is not None))

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not self._same_origin(request):
            return self._html(pages.login("This sign-in came from another site.", self.guard.read is not None), 403)
        form = await request.post()
        token = str(form.get("token", "")).strip()
        role = None
        if token and len(token) <= auth.MAX_TOKEN_LEN:
            digest = auth.digest(token)
            if self.guard.client and auth.same(digest, self.guard.client):
                role = ADMIN
            elif self.guard.read and auth.same(digest, self.guard.read):
                role = READ
        if role is None:
            if not self.guard.enabled:
                role = ADMIN
            else:
                log.warning("dashboard sign-in refused from %s", request.remote)
                return self._html(pages.login("That is not the client token (nor the read token).",
                                              self.guard.read is not None), 401)
        raise self._signed_in(request, role, "")

    async def logout(self, request: web.Request) -> web.StreamResponse:
        found = self.guard.session_of(request)
        form = await request.post()
        if found is not None and not self.guard.sessions.csrf_ok(found, str(form.get("csrf", ""))):
            return self._page(request, "Sign out", "", pages.error_body(403, "missing or wrong CSRF token"), 403)
        resp = web.HTTPSeeOther("/ui/login")
        resp.del_cookie(COOKIE, path="/")
        raise resp

    async def link(self, request: web.Request) -> web.StreamResponse:
        """A one-time sign-in link (orch ui): sets the session, then sends the browser on without the code."""
        role = self.guard.sessions.redeem(request.query.get("code"))
        if role is None:
            return self._html(pages.login("That sign-in link was used already or has expired: run orch ui again.",
                                          self.guard.read is not None), 401)
        raise self._signed_in(request, role, " by a one-time link")

    def _signed_in(self, request: web.Request, role: str, how: str) -> web.HTTPSeeOther:
        """On to the overview with a new session of ``role``."""
        resp = web.HTTPSeeOther("/ui")
        self._cookie(resp, role)
        log.info("dashboard signed in (%s)%s from %s", role, how, request.remote)
        return resp

    # ------------------------------------------------------------------ rendering

    def _html(self, text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

    def _page(self, request: web.Request, title: str, active: str, body: str, status: int = 200,
              live: str | None = None) -> web.Response:
        if request.headers.get(FRAGMENT) == "1":
            return self._html(body, status)
        found = self.session(request)
        fresh = None
        if found is not None and not found.nonce:
            # Without auth, every visitor is an admin: a session of its own all the same, for its CSRF token.
            fresh = self.guard.sessions.issue(ADMIN)
            found = self.guard.sessions.read(fresh)
        csrf = self.guard.sessions.csrf(found) if found is not None else ""
        if live is not None:
            # What the page shows is as of this version: a change before its stream opens is told at once.
            live += ("&" if "?" in live else "?") + f"last={BOOT}-{self.hub.version}"
        resp = self._html(pages.page(title, active, body, session_role=found.role if found else None, csrf=csrf,
                                     live=live, auth=self.guard.enabled), status)
        if fresh is not None:
            self._cookie(resp, ADMIN, fresh)
        return resp

    def page(title: str, active: str) -> Callable[..., Any]:  # type: ignore[misc]
        """A page handler: signed in (else to the login page), errors as a page of their own."""

        def wrap(render: Callable[[Ui, web.Request, Session], Awaitable[tuple[str, str | None, int] | str]]) -> Any:
            async def handler(self: Ui, request: web.Request) -> web.StreamResponse:
                found = self.session(request)
                if found is None:
                    if request.headers.get(FRAGMENT) == "1":
                        return self._html(pages.error_body(401, "signed out"), 401)
                    raise web.HTTPSeeOther("/ui/login")
                try:
                    got = await render(self, request, found)
                except OrchError as e:
                    return self._page(request, title, active, pages.error_body(e.http_status, e.message), e.http_status)
                body, live, status = got if isinstance(got, tuple) else (got, "/ui/events", 200)
                return self._page(request, title, active, body, status, live=live)

            handler.__name__ = render.__name__
            return handler

        return wrap

    @page("Overview", "overview")
    async def overview(self, request: web.Request, s: Session) -> str:
        now = self.store.clock()
        (counts, queues), per_minute, workers, schedules = await asyncio.gather(
            self.store.queue_depths(), self.store.ended_per_minute(now - 3600),
            self.store.list_workers(self.retention), self.store.schedules())
        return pages.overview({k.value: v for k, v in counts.items()},
                              [(m, st.value, n) for m, st, n in per_minute],
                              [wire.queue_json(q, now) for q in queues], [wire.worker_json(w, now) for w in workers],
                              [wire.schedule_json(x) for x in schedules], now)

    @page("Jobs", "jobs")
    async def jobs(self, request: web.Request, s: Session) -> str | tuple[str, str | None, int]:
        now = self.store.clock()
        try:
            f = Filters(request.query)
        except ValidationError as e:  # the form again, with what was typed and what is wrong with it
            given = {k: v[:MAX_FILTER] for k, v in request.query.items() if k in FILTER_KEYS}
            return pages.jobs([], given, None, now, False, e.message), "/ui/events", 400
        scanned = None
        if f.name is None and f.label is None and f.q is None:
            found, nxt = await self.store.list_jobs(limit=50, cursor=f.cursor, **f.store_args())
        else:
            # No index has these: a page reads at most SCAN_WINDOW ids below its cursor, so a filter that matches
            # rarely answers as fast as one that matches often, and "Older" searches on from where it stopped.
            top = f.cursor
            if top is None:
                newest, _ = await self.store.list_jobs(limit=1)
                top = newest[0].id + 1 if newest else 1
            floor = max(0, top - 1 - SCAN_WINDOW)
            found, nxt = await self.store.list_jobs(limit=50, cursor=top, floor=floor, **f.store_args())
            if nxt is None and floor > 0:
                nxt = floor + 1
            scanned = (floor + 1, top - 1)
        return pages.jobs([wire.job_summary(j) for j in found], f.text, str(nxt) if nxt is not None else None,
                          now, s.may_act, None, scanned)

    @page("Job", "jobs")
    async def job(self, request: web.Request, s: Session) -> tuple[str, str | None, int]:
        job_id = int(request.match_info["job_id"])
        rec = await self.store.get_job(job_id)
        view = self.api.view(rec)
        events, facts = await asyncio.gather(self.store.events(job_id), self.store.why_facts(job_id))
        why = explain(facts, self.settings["scheduler.heartbeat_interval"])
        body = pages.job(view, [wire.event_json(e) for e in events], why, self.store.clock(), s.may_act)
        return body, f"/ui/events?job={job_id}", 200

    @page("Workflow", "jobs")
    async def workflow(self, request: web.Request, s: Session) -> str:
        workflow, nodes = await self.store.workflow(int(request.match_info["job_id"]))
        return pages.workflow(wire.workflow_json(workflow, nodes[:500]), self.store.clock())

    @page("Workers", "workers")
    async def workers(self, request: web.Request, s: Session) -> str:
        show_all = request.query.get("all", "") == "1"
        now = self.store.clock()
        rows = await self.store.list_workers(None if show_all else self.retention)
        return pages.workers([wire.worker_json(w, now) for w in rows], s.may_act, show_all)

    @page("Queues", "queues")
    async def queues(self, request: web.Request, s: Session) -> str:
        now = self.store.clock()
        (_, rows), limits = await asyncio.gather(self.store.queue_depths(), self.store.limits())
        return pages.queues([wire.queue_json(q, now) for q in rows], [wire.limit_json(x, now) for x in limits],
                            s.may_act)

    @page("Schedules", "schedules")
    async def schedules(self, request: web.Request, s: Session) -> str:
        rows = [self.api._schedule_view(x, 3) for x in await self.store.schedules()]
        return pages.schedules(rows, self.store.clock(), s.may_act)

    # ------------------------------------------------------------------ live

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: ``change`` (id BOOT-version) whenever something a page shows may have changed, at
        most a few a second; a stream resumed (Last-Event-ID) behind the current version gets one at once."""
        found = self.session(request)
        if found is None:
            return web.Response(status=401, text="signed out\n")
        job_raw = request.query.get("job", "")
        job_id = int(job_raw) if job_raw.isascii() and job_raw.isdigit() and len(job_raw) <= 18 else None
        last = request.headers.get("Last-Event-ID") or request.query.get("last") or ""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        with self.guard.long_poll("client", "clients", self.guard.max_client_long_polls,
                                  "scheduler.max_client_long_polls"):
            await resp.prepare(request)
            hub = self.hub
            sent = hub.version
            boot, _, seen = last.rpartition("-")
            try:
                await resp.write(b"retry: 1000\n\n")
                if last and (boot != BOOT or not seen.isdigit() or int(seen) < hub.version or job_id is not None):
                    # Missed something while away (or it is another replica's id). A job page also gets one at
                    # once: its output moves no version, and some may have come since the page was rendered.
                    await self._send(resp, hub.version)
                quiet_since = time.monotonic()
                while True:
                    waits = [hub.watch()] + ([hub.job_event(job_id)] if job_id is not None else [])
                    tasks = [asyncio.ensure_future(e.wait()) for e in waits]
                    done, pending = await asyncio.wait(tasks, timeout=15.0, return_when=asyncio.FIRST_COMPLETED)
                    for t in pending:
                        t.cancel()
                    if self.session(request) is None:
                        await resp.write(b"event: signout\ndata: \n\n")
                        break
                    if not done:
                        await resp.write(b": keep-alive\n\n")  # a closed connection shows itself here
                        continue
                    # At most ~3 a second, so a busy cluster does not re-render pages without end.
                    wait = 0.3 - (time.monotonic() - quiet_since)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if hub.version != sent or job_id is not None:
                        sent = hub.version
                        await self._send(resp, sent)
                    quiet_since = time.monotonic()
            except (ConnectionResetError, ConnectionError):
                pass
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, version: int) -> None:
        await resp.write(f"id: {BOOT}-{version}\nevent: change\ndata: {version}\n\n".encode())

    # ------------------------------------------------------------------ bulk

    async def bulk(self, request: web.Request) -> web.Response:
        """Act on every job a filter matches: ``{"action": "cancel"|"retry", "filters": {...}}`` counts them;
        with ``"confirm": N`` too, acts (a page at a time) and says how many it did."""
        found = self.session(request)
        if found is None:
            return _json({"error": {"code": "unauthorized", "message": "signed out"}}, 401)
        if not found.nonce or not self.guard.sessions.csrf_ok(found, request.headers.get(CSRF_HEADER)):
            return _json({"error": {"code": "forbidden", "message": "missing or wrong CSRF token",
                                    "field": CSRF_HEADER}}, 403)
        if not found.may_act:
            return _json({"error": {"code": "forbidden", "message": "this session is read-only"}}, 403)
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _json({"error": {"code": "invalid", "message": "the body must be JSON", "field": "body"}}, 400)
        if not isinstance(data, dict):
            return _json({"error": {"code": "invalid", "message": "the body must be a JSON object", "field": "body"}}, 400)
        action = data.get("action")
        if action not in ("cancel", "retry"):
            return _json({"error": {"code": "invalid", "message": "action must be cancel or retry", "field": "action"}}, 400)
        raw = data.get("filters", {})
        try:
            if not isinstance(raw, dict):
                raise ValidationError("filters must be an object", field="filters")
            f = Filters(raw)
        except ValidationError as e:
            return _json(e.to_json(), 400)
        states = [s for s in (JobState if f.state is None else [f.state])
                  if (s in REPLAYABLE if action == "retry" else s not in TERMINAL)]
        counts = await asyncio.gather(*(self.store.count_jobs(**f.store_args(s)) for s in states))
        total = sum(counts)
        what = pages.confirm_filters(f.text)
        if "confirm" not in data:
            return _json({"action": action, "count": total, "filters": what})
        done = refused = 0
        by = "dashboard"
        for st in states:
            cursor: int | None = None
            while True:
                page, cursor = await self.store.list_jobs(limit=BULK_PAGE, cursor=cursor, **f.store_args(st))
                ids = [j.id for j in page]
                if action == "retry" and ids:
                    no, changes = await self.store.replay(ids, by)
                    done += sum(1 for c in changes if c.replay)
                    refused += len(no)
                else:
                    for jid in ids:
                        try:
                            await self.store.cancel(jid)
                            done += 1
                        except (Conflict, NotFound):
                            refused += 1
                if cursor is None:
                    break
        log.info("dashboard: %s of %d jobs (%s): %d done, %d refused", action, total, what, done, refused)
        return _json({"action": action, "count": total, "done": done, "refused": refused})

    # ------------------------------------------------------------------ files

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        kind = STATIC.get(name)
        if kind is None:
            raise web.HTTPNotFound()
        data = resources.files("orch.scheduler.ui").joinpath("static", name).read_bytes()
        return web.Response(body=data, headers={"Content-Type": f"{kind}; charset=utf-8",
                                                "Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    async def root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("/ui")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def setup(app: web.Application, api: Any) -> None:
    """The dashboard's routes on ``app`` (build_app, when ui.enabled)."""
    ui = Ui(api, app[GUARD])
    r = app.router
    r.add_get("/ui", ui.overview)
    r.add_get("/ui/", ui.root)
    r.add_get("/ui/login", ui.login_page)
    r.add_post("/ui/login", ui.login)
    r.add_post("/ui/logout", ui.logout)
    r.add_get("/ui/link", ui.link)
    r.add_get("/ui/jobs", ui.jobs)
    r.add_get("/ui/jobs/{job_id:[0-9]{1,18}}", ui.job)
    r.add_get("/ui/workflows/{job_id:[0-9]{1,18}}", ui.workflow)
    r.add_get("/ui/workers", ui.workers)
    r.add_get("/ui/queues", ui.queues)
    r.add_get("/ui/schedules", ui.schedules)
    r.add_get("/ui/events", ui.events)
    r.add_post("/ui/bulk", ui.bulk)
    r.add_get("/ui/static/{name}", ui.static)
