"""The scheduler's gate: who may call which route, and limits that keep one client from starving the rest.

Roles (``Authorization: Bearer <token>``):

* open: ``GET /healthz`` (and ``GET /metrics`` with ``auth.metrics_open``);
* join token: ``POST /v1/workers`` (registration) only;
* worker credential: ``/v1/workers/{worker_id}/...``, and only that worker's;
* client token: every other route (so a route added later is protected by default).

Tokens are kept here as SHA-256 digests and compared in constant time with the
digest of the one presented. The client and join tokens come from the
configuration or the data dir's ``tokens.json``; the file is looked at (one
``stat``) at most once a second and re-read when it changed, so
``orch token rotate`` takes effect without a restart. When the database is
shared (PostgreSQL) the tokens in effect are the database's instead
(``store.cluster_tokens``): each scheduler puts its own there at start-up unless
some are in effect already, takes those, and reads them again once a second
(``share``, ``take``), so a rotation on any machine reaches every scheduler; a
token in the configuration still wins on the scheduler it is set on. Worker
credentials are kept as SHA-256 digests in the store and in memory here:
checking one costs a hash and a dict lookup, never a query. So are the queues
each worker registered: a worker leases only from those (``check_queues``).

Limits: a request body must arrive within ``scheduler.body_timeout`` (and is
read only after the caller is authenticated); one client address (or one
worker) may hold at most ``scheduler.max_long_polls`` long-polls (wait,
follow, lease) at once, beyond which it gets 429; query parameters a route
does not document are refused. A body's ``Content-Encoding`` (gzip, deflate)
is undone here, within ``scheduler.max_body_bytes`` once decoded; any other
coding is 415.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
import zlib
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterable, Iterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from orch import auth
from orch.config import Settings
from orch.core.errors import (
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    UnknownWorker,
    UnsupportedEncoding,
    ValidationError,
)
from orch.core.records import Credential
from orch.core.spec import NAME_RE
from orch.scheduler import routes
from orch.scheduler.openapi import query_names
from orch.scheduler.ui import session as ui_session

log = logging.getLogger("orch.scheduler")

WORKER_PREFIX = "/v1/workers/{worker_id}/"
# Routes that may hold a request open, and the query flag that makes them do so ("" = always).
LONG_POLLS = routes.LONG_POLLS
_NO = ("0", "", "false", "no")
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="orch"'}


class Guard:
    """Tokens, worker credentials and long-poll counts of one scheduler."""

    def __init__(self, settings: Settings) -> None:
        self.enabled: bool = settings["auth.enabled"]
        self.metrics_open: bool = settings["auth.metrics_open"]
        self.configured = auth.Tokens(client=settings["auth.token"].strip() or None,
                                      join=settings["auth.join_token"].strip() or None)
        self.data_dir = settings.data_dir
        self.path = auth.token_path(self.data_dir)
        self.local = auth.Tokens()  # this scheduler's own tokens: configured, else its token file's
        self.client: str | None = None  # the digests (auth.digest) of the tokens in effect
        self.join: str | None = None
        self.shared = False  # the tokens in effect are the shared database's (share), not the file's
        self.created = False  # the token file was made (or completed) at this start
        self._sig: tuple[int, int, int] | None = None
        self._next_check = 0.0
        # worker id -> (credential digest, alive, the queues it registered)
        self.workers: dict[str, tuple[str, bool, frozenset[str]]] = {}
        self.owner: dict[str, str] = {}  # credential digest -> worker id
        self.max_long_polls: int = settings["scheduler.max_long_polls"]
        self.max_client_long_polls: int = settings["scheduler.max_client_long_polls"]
        self.long_polls: dict[str, int] = {}
        self.body_timeout: float = settings["scheduler.body_timeout"]
        self.max_body: int = settings["scheduler.max_body_bytes"]
        self.query = query_names(routes.document())
        read = settings["auth.read_token"].strip()
        self.read: str | None = auth.digest(read) if read else None  # the read-only token's digest
        # Dashboard sessions, signed with a key made from the client token in effect (without auth: this
        # process's own random key, so sessions and their CSRF tokens still hold).
        own = secrets.token_bytes(32)
        self.sessions = ui_session.Sessions(
            lambda: ui_session.key_from(self.client) if self.enabled else own, settings["ui.session_ttl"])

    # ------------------------------------------------------------------ tokens

    @property
    def uses_file(self) -> bool:
        return not (self.configured.client and self.configured.join)

    def load(self) -> None:
        """Read (or make) the token file; called once at start-up, before serving."""
        if not self.enabled:
            return
        tokens = None
        if self.uses_file:
            tokens, self.created = auth.ensure_tokens(self.data_dir)
            self._sig = auth.file_signature(self.path)
        self._apply(tokens)
        self._next_check = time.monotonic() + 1.0

    def _apply(self, tokens: auth.Tokens | None) -> None:
        self.local = auth.Tokens(client=self.configured.client or (tokens.client if tokens else None),
                                 join=self.configured.join or (tokens.join if tokens else None))
        self.client = auth.digest(self.local.client) if self.local.client else None
        self.join = auth.digest(self.local.join) if self.local.join else None

    def refresh(self, now: float) -> None:
        """Notice a rewritten token file (``orch token rotate``): one stat at most once a second."""
        if now < self._next_check or not self.uses_file or self.shared:
            return
        self._next_check = now + 1.0
        sig = auth.file_signature(self.path)
        if sig == self._sig:
            return
        try:
            tokens = auth.read_tokens(self.data_dir)
        except auth.TokenFileError as e:
            log.error("keeping the current tokens: %s", e)
            return
        self._sig = sig
        if tokens is None:
            log.warning("token file %s is gone; keeping the current tokens", self.path)
            return
        old = (self.client, self.join)
        self._apply(tokens)
        self._changed(old, "token file changed")

    def _changed(self, old: tuple[str | None, str | None], why: str) -> None:
        changed = [name for name, before, now_ in (("client", old[0], self.client), ("join", old[1], self.join))
                   if before != now_]
        if changed:
            log.warning("%s: new %s token%s in effect; the old one%s refused", why,
                        " and ".join(changed), "s" if len(changed) > 1 else "",
                        "s are" if len(changed) > 1 else " is")

    async def share(self, put: Callable[..., Awaitable[dict[str, str]]]) -> None:
        """The database is shared (``store.put_tokens``): put this scheduler's tokens there unless others are in
        effect already, and accept those from now on (a configured token still wins here). Once, after ``load``."""
        if not self.enabled:
            return
        mine = {role: auth.digest(token) for role in auth.ROLES if (token := self.local.get(role))}
        in_effect = await put(mine, replace=False)
        self.shared = True
        self.take(in_effect, quiet=True)
        differ = [role for role in auth.ROLES if role in in_effect and in_effect[role] != mine.get(role)]
        from_file = [role for role in differ if not self.configured.get(role)]
        if from_file:
            log.warning("the %s of %s %s not the one%s in effect in the shared database, which every scheduler "
                        "of it accepts: so does this one. Copy tokens.json from the data dir of the scheduler that "
                        "started first to %s (so orch token show here shows them), or run orch token rotate to "
                        "make new ones for all", _tokens(from_file), self.path,
                        *(("are", "s") if len(from_file) > 1 else ("is", "")), self.data_dir)
        configured = [role for role in differ if self.configured.get(role)]
        if configured:
            keys = " and ".join("auth.token" if role == "client" else "auth.join_token" for role in configured)
            log.warning("%s (configuration) %s not the %s in effect in the shared database: this scheduler "
                        "accepts %s instead, the others the database's; set the same value on every scheduler",
                        keys, "are" if len(configured) > 1 else "is", _tokens(configured), keys)

    def take(self, digests: dict[str, str], quiet: bool = False) -> None:
        """The digests in effect in the shared database (``store.cluster_tokens``, read once a second); a
        configured token wins over its role's."""
        old = (self.client, self.join)
        if not self.configured.client and digests.get("client"):
            self.client = digests["client"]
        if not self.configured.join and digests.get("join"):
            self.join = digests["join"]
        if not quiet:
            self._changed(old, "tokens rotated in the shared database")

    # ------------------------------------------------------------------ worker credentials

    # Set when the database is shared: finds a worker another scheduler registered (store.worker_credential).
    lookup: Callable[[str], Awaitable[Credential | None]] | None = None

    def load_workers(self, rows: Iterable[Credential]) -> None:
        """``store.worker_credentials()``: each worker's credential digest, state and queues."""
        for c in rows:
            self.workers[c.worker_id] = (c.digest, c.state.live, frozenset(c.queues))
            self.owner[c.digest] = c.worker_id

    def worker_registered(self, worker_id: str, digest: str, queues: list[str]) -> None:
        self.workers[worker_id] = (digest, True, frozenset(queues))
        self.owner[digest] = worker_id

    def worker_gone(self, worker_id: str) -> None:
        """The worker was marked lost or stopped: its credential now only earns 409 unknown_worker."""
        entry = self.workers.get(worker_id)
        if entry is not None and entry[1]:
            self.workers[worker_id] = (entry[0], False, entry[2])

    def check_queues(self, worker_id: str, queues: list[str], prefix: str = "") -> None:
        """Forbidden, naming the first queue (``queues[i]``) the worker did not register.

        Refused rather than filtered: a worker asking for a queue it did not register is
        misconfigured or is not the worker it claims to be. A worker unknown here (one
        registered before credentials existed, served with auth off) is left to the store.
        """
        entry = self.workers.get(worker_id)
        if entry is None:
            return
        allowed = entry[2]
        for i, queue in enumerate(queues):
            if queue not in allowed:
                raise Forbidden(f"worker {worker_id} registered for queues {', '.join(sorted(allowed))}; it may "
                                f"not lease from queue {queue!r} (register a worker for it)",
                                field=f"{prefix}queues[{i}]")

    # ------------------------------------------------------------------ checks

    def _is(self, digest: str, expected: str | None) -> bool:
        return expected is not None and hmac.compare_digest(digest, expected)

    def _wrong_role(self, digest: str, want: str) -> None:
        """Raise Forbidden if the token of ``digest`` is a real credential of another role, else Unauthorized.
        (Called once the token is known not to be the one the route wants.)"""
        if self._is(digest, self.client):
            raise Forbidden(f"the client token cannot be used here: this route needs {want}")
        if self._is(digest, self.join):
            raise Forbidden(f"the worker join token only registers workers (POST /v1/workers): this route needs {want}")
        wid = self.owner.get(digest)
        if wid is not None:
            raise Forbidden(f"a worker credential (of {wid}) cannot be used here: this route needs {want}")
        raise Unauthorized(f"unknown or revoked token: this route needs {want} (orch token show)")

    def session_of(self, request: web.Request) -> ui_session.Session | None:
        """The dashboard session of the request's cookie (signed, not expired), or None."""
        return self.sessions.read(request.cookies.get(ui_session.COOKIE))

    def authenticate(self, request: web.Request, kind: str, worker_id: str | None) -> None:
        header = request.headers.get("Authorization")
        token = auth.bearer(header)
        want = {"client": "the client token", "join": "the join token",
                "worker": f"the credential worker {worker_id} got at registration"}[kind]
        reads = request.method in ("GET", "HEAD")
        if token is None and not header and kind == "client" and ui_session.COOKIE in request.cookies:
            # The dashboard's own calls: its session cookie, with the session's CSRF token in a header that
            # no page of another site can send.
            found = self.session_of(request)
            if found is None:
                raise Unauthorized("the dashboard session has expired or was ended: sign in again at /ui/login")
            if not self.sessions.csrf_ok(found, request.headers.get(ui_session.CSRF_HEADER)):
                raise Forbidden(f"a dashboard session needs its CSRF token in the {ui_session.CSRF_HEADER} header",
                                field=ui_session.CSRF_HEADER)
            if not reads and not found.may_act:
                raise Forbidden("this dashboard session is read-only (signed in with the read token)")
            return
        if token is None:
            how = "missing" if not header else "malformed"
            raise Unauthorized(f"{how} credential: send 'Authorization: Bearer <token>' with {want} (orch token show)")
        digest = auth.digest(token)
        if kind == "client":
            if not self._is(digest, self.client):
                if self._is(digest, self.read):
                    if reads:
                        return
                    raise Forbidden("the read token may only read (GET): this route needs the client token")
                self._wrong_role(digest, want)
            return
        if kind == "join":
            if not self._is(digest, self.join):
                self._wrong_role(digest, want)
            return
        assert worker_id is not None
        entry = self.workers.get(worker_id)
        if entry is not None and hmac.compare_digest(entry[0], digest):
            if not entry[1]:
                raise UnknownWorker(f"worker {worker_id} is not registered (or was marked lost): register again",
                                    field="worker_id")
            return
        if (entry is None or not entry[1]) and (self._is(digest, self.join) or token.startswith(auth.PREFIX["worker"])):
            # A worker whose registration is gone (lost, stopped, or unknown here): it must join again.
            raise UnknownWorker(f"worker {worker_id} is not registered (or was marked lost): register again",
                                field="worker_id")
        other = self.owner.get(digest)
        if other is not None:
            raise Forbidden(f"this credential belongs to worker {other}, not {worker_id}", field="worker_id")
        self._wrong_role(digest, want)

    def kind_of(self, method: str, path: str) -> str:
        """Who may call the route (orch/scheduler/routes.py); a worker's path always needs its credential."""
        if path == "/ui" or path.startswith("/ui/"):
            return routes.OPEN  # the dashboard signs in with its own session cookie (orch/scheduler/ui/views.py)
        kind = routes.access_of(method, path, self.metrics_open)
        return routes.WORKER if path.startswith(WORKER_PREFIX) else kind

    @contextmanager
    def long_poll(self, key: str, who: str, cap: int, setting: str) -> Iterator[None]:
        n = self.long_polls.get(key, 0)
        if n >= cap:
            raise TooManyRequests(f"{who} already hold{'s' if key != 'client' else ''} {n} long-polls open "
                                  f"({setting}); try again when one has ended")
        self.long_polls[key] = n + 1
        try:
            yield
        finally:
            left = self.long_polls.get(key, 1) - 1
            if left > 0:
                self.long_polls[key] = left
            else:
                self.long_polls.pop(key, None)


def _tokens(roles: list[str]) -> str:
    return " and ".join(roles) + (" tokens" if len(roles) > 1 else " token")


GUARD = web.AppKey("guard", Guard)


async def guard_request(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Who may call this route, its query parameters, its body within a deadline, its long-poll count;
    then the handler. Called by the scheduler's one middleware (orch/scheduler/app.py)."""
    guard = request.app[GUARD]
    resource = request.match_info.route.resource
    if resource is None:  # no such route or method: the 404/405 is answered as it is
        return await handler(request)
    path = resource.canonical
    method = request.method
    worker_id = None
    if path.startswith(WORKER_PREFIX):
        worker_id = request.match_info.get("worker_id", "")
        if not NAME_RE.fullmatch(worker_id):
            raise NotFound("no such worker", field="worker_id")
    if guard.enabled:
        kind = guard.kind_of(method, path)
        if kind != "open":
            guard.refresh(time.monotonic())
            if worker_id and guard.lookup is not None and worker_id not in guard.workers:
                # Registered with another scheduler of the shared database: its credential's digest is there.
                found = await guard.lookup(worker_id)
                if found is not None:
                    guard.load_workers([found])
            guard.authenticate(request, kind, worker_id)  # a 401 gets CHALLENGE from the middleware
    allowed = guard.query.get((method, path))
    if allowed is not None and request.query:
        for name, value in request.query.items():
            if name not in allowed:
                raise ValidationError(f"unknown query parameter {name[:80]!r}", field=name[:80])
            choices = allowed[name]
            if choices is not None and value not in choices:
                raise ValidationError(f"{name} must be one of {', '.join(sorted(choices))}", field=name)
    if request.body_exists:
        await _read_body(request, guard)
    flag = LONG_POLLS.get((method, path))
    try:
        if flag is not None and (flag == "" or _asks(request.query.get(flag, "0"))):
            # Counted per credential: each worker's own, and the client token's (every CLI and program
            # that holds it, on any host: a count per address made unrelated CLIs on one host share a cap).
            if worker_id:
                poll = guard.long_poll(f"worker:{worker_id}", f"worker {worker_id}", guard.max_long_polls,
                                       "scheduler.max_long_polls")
            else:
                poll = guard.long_poll("client", "clients", guard.max_client_long_polls,
                                       "scheduler.max_client_long_polls")
            with poll:
                return await handler(request)
        return await handler(request)
    except UnknownWorker:
        if worker_id:
            guard.worker_gone(worker_id)
        raise


def _asks(value: str) -> bool:
    """Whether a long-poll flag's value asks for one: not a no (follow=0, false), nor a zero (a submit's wait=0.0)."""
    if value in _NO:
        return False
    try:
        return float(value) != 0
    except ValueError:
        return True


async def _read_body(request: web.Request, guard: Guard) -> None:
    """The body, read once the caller is known, and decoded (see ``decode_body``) into ``request[BODY]``."""
    try:
        if request.content.is_eof():
            raw = await request.read()  # all of it has arrived already: nothing to wait for, no deadline to arm
        else:
            # Within a deadline: a stalled sender holds one coroutine, never a thread, and gives up its
            # connection after body_timeout.
            try:
                async with asyncio.timeout(guard.body_timeout):
                    raw = await request.read()
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {guard.body_timeout:g}s "
                                     "(scheduler.body_timeout)", field="body") from None
    except web.RequestPayloadError as e:  # a bad chunk of a chunked body, a body cut short
        raise ValidationError(f"the request body could not be read: {_first_line(e)}", field="body") from None
    coding = request.headers.get("Content-Encoding")
    request[BODY] = decode_body(raw, coding, guard.max_body) if coding is not None else raw


# The body as the handlers read it (orch.scheduler.app.read_json): decoded from its Content-Encoding.
BODY = web.RequestKey("body", bytes) if hasattr(web, "RequestKey") else "orch.body"  # RequestKey: aiohttp 3.13+

# The codings of RFC 9110 that the standard library decodes, and their zlib window bits. aiohttp's own decoding
# is off (build_app): it read an unknown coding as if none had been applied, answered br (without the Brotli
# package) in text/plain, and turned a corrupt gzip body into an exception in the handler, a 500.
CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_body(raw: bytes, header: str, limit: int) -> bytes:
    """``raw`` with the codings of a Content-Encoding header undone, last applied first.

    415 for a coding not in CODINGS, 400 for data that does not decode, 413 when the decoded body
    is larger than ``limit``: a small compressed body cannot make the scheduler hold a large one.
    """
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    for coding in codings:
        if coding != "identity" and coding not in CODINGS:
            raise UnsupportedEncoding(
                f"Content-Encoding {coding[:40]!r} is not supported: send the body as gzip, deflate or identity",
                field="Content-Encoding")
    for coding in reversed(codings):
        if coding != "identity":
            raw = _inflate(raw, coding, limit)
    return raw


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    wbits = CODINGS[coding]
    if coding == "deflate" and not (len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0):
        wbits = -zlib.MAX_WBITS  # deflate without its zlib header: what some clients send for "deflate"
    out: list[bytes] = []
    size = 0
    while True:  # a gzip body may hold several members, one after the other
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(data, limit + 1 - size)
        except zlib.error as e:
            raise ValidationError(f"the request body is not valid {coding} data ({e})", field="body") from None
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes once decoded ({coding})", field="body")
        out.append(chunk)
        if not d.eof:
            raise ValidationError(f"the request body ends inside its {coding} data", field="body")
        data = d.unused_data
        if not data:
            return b"".join(out)
        if wbits != CODINGS["gzip"]:
            raise ValidationError(f"the request body has bytes after its {coding} data", field="body")


def _first_line(e: BaseException) -> str:
    """An exception's message on one line, short, with what a client sent shown escaped."""
    text = str(e).replace("400, message:", "").strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200].encode("ascii", "backslashreplace").decode()


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger of aiohttp's HTTP protocol (``build_app`` hands it over in ``handler_args``).

    aiohttp logs every request its parser refuses (no Host, a bad chunk size, Content-Length with
    Transfer-Encoding, a NUL in a header, a body that breaks off) as an ERROR with a traceback, before
    any token is checked: whoever reaches the port could fill the log. Those become one short WARNING
    line at most every ``interval`` seconds, saying how many were refused in between; anything else
    aiohttp reports is a bug and keeps its traceback.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logger, {})
        self.interval = interval
        self.clock = clock
        self._next = float("-inf")
        self._quiet = 0  # refused since the last line

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            # aiohttp's call is ("Error handling request from %s", request.remote)
            self.refused(exc, args[0] if args and isinstance(args[0], str) else None)
        elif isinstance(exc, ConnectionError):  # the client hung up, in the middle of its body maybe: not a bug
            self.logger.debug("a client hung up: %s", exc)
        else:
            self.logger.error(msg, *args, exc_info=exc_info, **kwargs)

    def refused(self, exc: BaseException, remote: str | None) -> None:
        now = self.clock()
        if now < self._next:
            self._quiet += 1
            return
        self._next = now + self.interval
        more = f" ({self._quiet} more since the last such line)" if self._quiet else ""
        self._quiet = 0
        self.logger.warning("refused a malformed HTTP request%s: %s%s", f" from {remote}" if remote else "",
                            _first_line(exc), more)


def exposure_warnings(host: str, tls: bool, auth_enabled: bool) -> list[str]:
    """What a listening scheduler exposes that its operator should hear about at start-up."""
    from orch.tls import is_loopback

    out = []
    if not auth_enabled:
        out.append("AUTHENTICATION IS OFF (--no-auth): anyone who can reach this port can run any command "
                   "as this user")
    if not is_loopback(host) and not tls:
        out.append(f"listening on {host} without TLS: tokens, job specs and output cross the network in clear "
                   "text; set tls.cert and tls.key (orch certs init makes them)")
    return out


def unencodable_field(data: object, path: str = "") -> str | None:
    """The first string (key or value) in decoded JSON that is not valid Unicode (a lone surrogate)."""
    stack: list[tuple[object, str]] = [(data, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                sub = f"{where}.{k}" if where else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "body"
                stack.append((v, sub))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None
