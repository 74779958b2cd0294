"""The dashboard's HTML: pure functions of the API's own JSON shapes (orch/scheduler/wire.py) to text.

Everything a user wrote (names, commands, labels, output, errors, reasons) goes through ``h`` on its way into
the page; URLs are built with ``urlencode`` and then escaped. The pages carry no inline script or style: the
Content-Security-Policy (views.py) allows only the two files of ``static/``, so markup that slipped through
would still not run. Charts and timelines are SVG, whose geometry is attributes, not styles.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from typing import Any, Mapping, Sequence
from urllib.parse import quote, urlencode

from orch import __version__
from orch.core.states import LIVE_WORKERS, REPLAYABLE, TERMINAL, JobState, WorkerState

NAV = (("overview", "/ui", "Overview"), ("jobs", "/ui/jobs", "Jobs"), ("workers", "/ui/workers", "Workers"),
       ("queues", "/ui/queues", "Queues"), ("schedules", "/ui/schedules", "Schedules"))
UNFINISHED = [s for s in JobState if s not in TERMINAL]
ENDED_VALUES = {s.value for s in TERMINAL}
REPLAYABLE_VALUES = {s.value for s in REPLAYABLE}
LIVE_VALUES = {s.value for s in LIVE_WORKERS}
LOG_SHOWN = 64 << 10  # characters of each stream's tail on the job page


def h(value: Any) -> str:
    """Text as HTML, quotes included (safe in an element and in a quoted attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def url(path: str, **query: Any) -> str:
    """A path with the query parameters that are not None, escaped for an attribute."""
    q = {k: v for k, v in query.items() if v is not None and v != ""}
    return h(path + ("?" + urlencode(q) if q else ""))


def seg(text: str) -> str:
    """A path segment of user text (a queue or schedule name)."""
    return quote(text, safe="")


def badge(state: str | None) -> str:
    s = h(state or "?")
    return f'<span class="badge st-{s}">{s}</span>'


def when(ts: str | None, now: float) -> str:
    """An ISO time as 'N s/min/h ago' (or 'in ...'), the exact time in its title."""
    if not ts:
        return '<span class="muted">-</span>'
    try:
        t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return h(ts)
    return f'<time datetime="{h(ts)}" title="{h(ts)}">{h(ago(now - t))}</time>'


def ago(seconds: float) -> str:
    future = seconds < 0
    s = abs(seconds)
    text = (f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.0f} h" if s < 172800
            else f"{s / 86400:.0f} d")
    return f"in {text}" if future else f"{text} ago"


def number(n: int | float) -> str:
    return f"{n:,}"


def page(title: str, active: str, body: str, *, session_role: str | None, csrf: str, live: str | None,
         auth: bool) -> str:
    """A whole page: the header, its navigation, and ``body`` in <main> (what a live update replaces)."""
    nav = "".join(f'<a href="{href}"{" aria-current=page" if key == active else ""}>{label}</a>'
                  for key, href, label in NAV)
    who = ""
    if session_role is not None:
        role = "read-only" if session_role == "read" else "admin"
        out = (f'<form method="post" action="/ui/logout" class="inline"><input type="hidden" name="csrf" '
               f'value="{h(csrf)}"><button type="submit" class="link">Sign out</button></form>') if auth else ""
        who = f'<span class="role role-{h(session_role)}" title="signed in as">{role}</span>{out}'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="color-scheme" content="light dark"><title>{h(title)} · orch</title>'
        f'<link rel="stylesheet" href="/ui/static/app.css?v={h(__version__)}">'
        f'<script src="/ui/static/app.js?v={h(__version__)}" defer></script>'
        f'<meta name="orch-csrf" content="{h(csrf)}">'
        + (f'<meta name="orch-live" content="{h(live)}">' if live else "")
        + '</head><body><a class="skip" href="#main">Skip to content</a>'
        f'<header><a class="brand" href="/ui">orch</a><nav aria-label="pages">{nav}</nav>'
        f'<span class="spacer"></span><span id="live" class="live" title="live updates" hidden>live</span>'
        '<button type="button" id="theme" class="link" aria-label="switch light or dark">◐</button>'
        f'{who}</header>'
        '<div id="notice" role="status" aria-live="polite"></div>'
        f'<main id="main" tabindex="-1">{body}</main></body></html>')


def login(error: str | None, auth_read: bool) -> str:
    err = f'<p class="error" role="alert">{h(error)}</p>' if error else ""
    hint = " or the read token" if auth_read else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light dark"><title>Sign in · orch</title>'
        f'<link rel="stylesheet" href="/ui/static/app.css?v={h(__version__)}">'
        f'<script src="/ui/static/app.js?v={h(__version__)}" defer></script></head>'
        '<body class="login"><main id="main"><h1>orch</h1>'
        f'<form method="post" action="/ui/login" class="card"><label for="token">Client token{hint}</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
        f'{err}<button type="submit">Sign in</button>'
        '<p class="muted">orch token show --client prints it; orch ui opens this dashboard signed in.</p>'
        '</form></main></body></html>')


def error_body(status: int, message: str) -> str:
    return f'<h1>{status}</h1><p class="error" role="alert">{h(message)}</p><p><a href="/ui">Overview</a></p>'


# --------------------------------------------------------------------------- overview


def overview(counts: Mapping[str, int], per_minute: Sequence[tuple[int, str, int]], queues: Sequence[dict[str, Any]],
             workers: Sequence[dict[str, Any]], schedules: Sequence[dict[str, Any]], now: float) -> str:
    total = sum(counts.values())
    tiles = "".join(
        f'<a class="tile" href="{url("/ui/jobs", state=s.value)}"><span class="n">{number(counts.get(s.value, 0))}</span>'
        f'{badge(s.value)}</a>' for s in JobState)
    ok = sum(n for _, s, n in per_minute if s == JobState.SUCCEEDED.value)
    failed = sum(n for _, s, n in per_minute if s == JobState.FAILED.value)
    ended = sum(n for _, _, n in per_minute)
    rate = f"{failed / (ok + failed):.1%}" if ok + failed else "-"
    live = [w for w in workers if w["state"] in LIVE_VALUES]
    slots = sum(w["concurrency"] for w in live)
    busy = sum(w["running"] for w in live)
    qrows = "".join(
        f'<tr><td><a href="{url("/ui/jobs", queue=q["name"])}">{h(q["name"])}</a>{" <span class=muted>paused</span>" if q["paused"] else ""}</td>'
        f'<td class="num">{number(q["queued"])}</td><td class="num">{number(q["running"])}</td>'
        f'<td class="num">{number(q["retrying"] + q["scheduled"])}</td></tr>'
        for q in sorted(queues, key=lambda q: -q["queued"])[:10])
    srows = "".join(
        f'<tr><td><a href="/ui/schedules#s-{h(s["name"])}">{h(s["name"])}</a></td><td><code>{h(s["cron"])}</code></td>'
        f'<td>{when(s["next_at"], now) if not s.get("paused") else "<span class=muted>paused</span>"}</td></tr>'
        for s in sorted((s for s in schedules if s["next_at"]), key=lambda s: s["next_at"])[:5])
    return (
        '<h1>Overview</h1>'
        f'<section aria-labelledby="by-state"><h2 id="by-state">Jobs by state <span class="muted">({number(total)} in all)</span></h2>'
        f'<div class="tiles">{tiles}</div></section>'
        '<div class="cols">'
        f'<section aria-labelledby="hour"><h2 id="hour">The last hour</h2>'
        f'<p><strong>{number(ended)}</strong> jobs ended ({ended / 60:.1f}/min), '
        f'<strong>{number(failed)}</strong> failed: failure rate <strong>{rate}</strong></p>'
        f'{chart(per_minute)}</section>'
        f'<section aria-labelledby="w"><h2 id="w">Workers</h2><p><a href="/ui/workers"><strong>{len(live)}</strong> live</a>, '
        f'<strong>{busy}</strong> of <strong>{slots}</strong> slots busy</p></section>'
        '</div><div class="cols">'
        f'<section aria-labelledby="q"><h2 id="q">Queue depths</h2>'
        + (f'<table><thead><tr><th>queue</th><th class="num">queued</th><th class="num">running</th>'
           f'<th class="num">waiting</th></tr></thead><tbody>{qrows}</tbody></table>' if qrows
           else '<p class="muted">No queue has unfinished jobs.</p>')
        + '</section>'
        '<section aria-labelledby="s"><h2 id="s">Schedules due next</h2>'
        + (f'<table><tbody>{srows}</tbody></table>' if srows else '<p class="muted">No schedule is due.</p>')
        + '</section></div>')


def chart(per_minute: Sequence[tuple[int, str, int]]) -> str:
    """Ends per minute over the hour as stacked SVG bars: succeeded below, failed and cancelled above."""
    by: dict[int, dict[str, int]] = {}
    for m, s, n in per_minute:
        by.setdefault(m, {})[s] = n
    top = max((sum(v.values()) for v in by.values()), default=0)
    if top == 0:
        return '<p class="muted">Nothing ended in the last hour.</p>'
    bars = []
    for m in range(60):
        y = 40.0
        for s in (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value):
            n = by.get(m, {}).get(s, 0)
            if n:
                hgt = 40.0 * n / top
                y -= hgt
                bars.append(f'<rect class="bar st-{s}" x="{m * 5}" y="{y:.2f}" width="4" height="{hgt:.2f}">'
                            f'<title>{number(n)} {s}, {59 - m} min ago</title></rect>')
    return (f'<svg class="chart" viewBox="0 0 300 40" preserveAspectRatio="none" role="img" '
            f'aria-label="jobs ended per minute, at most {number(top)}">{"".join(bars)}</svg>')


# --------------------------------------------------------------------------- jobs


def jobs(rows: Sequence[dict[str, Any]], filters: Mapping[str, str], next_cursor: str | None, now: float,
         may_act: bool, error: str | None, scanned: tuple[int, int] | None = None) -> str:
    state = filters.get("state", "")
    options = "".join(f'<option value="{s.value}"{" selected" if s.value == state else ""}>{s.value}</option>'
                      for s in JobState)
    form = (
        '<form class="filters" method="get" action="/ui/jobs" role="search">'
        f'<label>state <select name="state"><option value="">any</option>{options}</select></label>'
        f'<label>queue <input name="queue" value="{h(filters.get("queue", ""))}" size="10"></label>'
        f'<label>label <input name="label" value="{h(filters.get("label", ""))}" placeholder="key=value" size="12"></label>'
        f'<label>name <input name="name" value="{h(filters.get("name", ""))}" size="12"></label>'
        f'<label>text <input id="q" name="q" value="{h(filters.get("q", ""))}" placeholder="in name or command (/)" size="16"></label>'
        '<button type="submit">Filter</button>'
        + ('<a href="/ui/jobs" class="button secondary">Clear</a>' if filters else "") + '</form>')
    err = f'<p class="error" role="alert">{h(error)}</p>' if error else ""
    bulk = ""
    if may_act and not error:
        bulk = ('<div class="bulk" role="group" aria-label="act on every job the filter matches">'
                '<span class="muted">Every job this filter matches:</span>'
                '<button type="button" data-bulk="retry">Retry all failed or cancelled…</button>'
                '<button type="button" data-bulk="cancel" class="danger">Cancel all unfinished…</button></div>')
    body = "".join(job_row(j, now) for j in rows)
    searched = ""
    if scanned is not None and scanned[1] >= scanned[0]:
        searched = (f'<p class="muted">Searched jobs {number(scanned[0])} to {number(scanned[1])}, newest first'
                    + (': "Older" searches on.' if next_cursor else ".") + '</p>')
    table = (f'<table class="jobs"><thead><tr><th>id</th><th>state</th><th>name</th><th>queue</th><th>command</th>'
             f'<th class="num">attempt</th><th>created</th></tr></thead><tbody>{body}</tbody></table>'
             if rows else '<p class="muted">No job matches.</p>')
    first = "" if "cursor" not in filters else f'<a href="{url("/ui/jobs", **{k: v for k, v in filters.items() if k != "cursor"})}">« Newest</a>'
    more = (f'<a rel="next" href="{url("/ui/jobs", **{**filters, "cursor": next_cursor})}">Older »</a>'
            if next_cursor else "")
    pager = f'<nav class="pager" aria-label="pages of jobs">{first}{more}</nav>' if first or more else ""
    return f'<h1>Jobs</h1>{form}{err}{bulk}{searched}{table}{pager}'


def job_row(j: dict[str, Any], now: float) -> str:
    cmd = h(j["command"]) + ("…" if j.get("command_truncated") else "")
    return (f'<tr><td><a href="/ui/jobs/{int(j["id"])}">{int(j["id"])}</a></td><td>{badge(j["state"])}</td>'
            f'<td>{h(j["name"] or "")}</td><td>{h(j["queue"])}</td><td><code>{cmd}</code></td>'
            f'<td class="num">{int(j["attempt"])}/{int(j["max_attempts"])}</td><td>{when(j["created_at"], now)}</td></tr>')


def confirm_filters(filters: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in filters.items() if k != "cursor") or "no filter: every job"


# --------------------------------------------------------------------------- job


def job(j: dict[str, Any], events: Sequence[dict[str, Any]], why: dict[str, Any], now: float, may_act: bool) -> str:
    jid = int(j["id"])
    state = j["state"]
    buttons = []
    if may_act and state not in ENDED_VALUES:
        buttons.append(f'<button type="button" class="danger" data-act="cancel" data-job="{jid}">Cancel</button>')
    if may_act and state in REPLAYABLE_VALUES:
        buttons.append(f'<button type="button" data-act="retry" data-job="{jid}">Retry</button>')
    if j.get("workflow") is not None:
        buttons.append(f'<a class="button secondary" href="/ui/workflows/{int(j["workflow"])}">Workflow</a>')
    title = h(j["name"]) if j.get("name") else f"Job {jid}"
    res = j.get("result") or {}
    value = res.get("value")
    facts = [("state", badge(state) + (' <span class="muted">cancel asked</span>' if j.get("cancel_requested") else "")),
             ("queue", f'<a href="{url("/ui/jobs", queue=j["queue"])}">{h(j["queue"])}</a>'),
             ("attempt", f'{int(j["attempt"])} of {int(j["max_attempts"])}'),
             ("created", when(j["created_at"], now)), ("started", when(j["started_at"], now)),
             ("finished", when(j["finished_at"], now)), ("worker", h(j.get("worker") or "-")),
             ("exit code", h(j["exit_code"]) if j.get("exit_code") is not None else "-")]
    if j.get("retry_at"):
        facts.append(("retry", when(j["retry_at"], now)))
    if j.get("scheduled_for"):
        facts.append(("due", when(j["scheduled_for"], now)))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    err = f'<p class="error">{h(j["error"])}</p>' if j.get("error") else ""
    deps = ""
    if j.get("dependencies"):
        deps = ('<h2>Depends on</h2><ul>' + "".join(
            f'<li><a href="/ui/jobs/{int(d["job_id"])}">{int(d["job_id"])}</a>{" (" + h(d["ref"]) + ")" if d.get("ref") else ""} '
            f'{badge(d.get("state"))} {"met" if d.get("met") else "waiting"} ({h(d.get("on"))})</li>'
            for d in j["dependencies"]) + '</ul>')
    logs = ""
    for stream in ("stdout", "stderr"):
        text = res.get(stream) or ""
        if text or stream == "stdout":
            cut = len(text) > LOG_SHOWN
            shown = text[-LOG_SHOWN:]
            logs += (f'<h3>{stream}{" (the tail)" if cut or res.get(stream + "_truncated") else ""}</h3>'
                     f'<pre class="log" id="log-{stream}" tabindex="0" aria-label="{stream}">{h(shown)}</pre>')
    return (
        f'<h1>{title} <span class="muted">#{jid}</span></h1>'
        f'<div class="actions">{"".join(buttons)}</div>'
        f'<div class="cols"><section><dl class="facts">{dl}</dl>{err}'
        f'<h2>Why</h2><p class="why" data-reason="{h(why.get("reason"))}">{h(why.get("message"))}</p>{deps}</section>'
        f'<section><h2>Attempts</h2>{timeline(j, now)}{attempts_table(j["attempts"], now)}</section></div>'
        f'<h2>Output</h2><div id="output" data-state="{h(state)}">{logs}</div>'
        + (f'<h2>Result value</h2><pre class="value">{h(_json(value))}</pre>' if value is not None else "")
        + f'<h2>History</h2>{history(events, now)}'
        f'<h2>Spec</h2><pre class="spec">{h(_json(j.get("spec")))}</pre>')


def _json(v: Any) -> str:
    return json.dumps(v, indent=2, ensure_ascii=False, sort_keys=False)


def _epoch(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def timeline(j: dict[str, Any], now: float) -> str:
    """Each attempt as a bar on one time axis, from the job's creation to its end (or now)."""
    attempts = j["attempts"]
    if not attempts:
        return '<p class="muted">No attempt yet.</p>'
    t0 = _epoch(j["created_at"]) or now
    spans = [(a, _epoch(a["started_at"]) or t0, _epoch(a["finished_at"]) or now) for a in attempts]
    t1 = max(max(e for _, _, e in spans), t0 + 0.001)
    scale = 300.0 / (t1 - t0)
    bars = "".join(
        f'<g><rect class="bar st-{h(a["state"])}" x="{(s - t0) * scale:.2f}" y="{i * 14 + 2}" '
        f'width="{max(1.5, (e - s) * scale):.2f}" height="10"><title>attempt {int(a["attempt"])}: {h(a["state"])}, '
        f'{e - s:.2f} s{" on " + h(a["worker"]) if a.get("worker") else ""}</title></rect></g>'
        for i, (a, s, e) in enumerate(spans))
    height = len(spans) * 14 + 4
    return (f'<svg class="timeline" viewBox="0 0 300 {height}" preserveAspectRatio="none" role="img" '
            f'aria-label="attempts on a time line of {t1 - t0:.1f} s">{bars}</svg>')


def attempts_table(attempts: Sequence[dict[str, Any]], now: float) -> str:
    if not attempts:
        return ""
    rows = "".join(
        f'<tr><td class="num">{int(a["attempt"])}</td><td>{badge(a["state"])}</td><td>{h(a.get("worker") or "-")}</td>'
        f'<td>{when(a["started_at"], now)}</td><td class="num">{took(a.get("duration"))}</td>'
        f'<td>{h(a["exit_code"]) if a.get("exit_code") is not None else ""}</td><td>{h(a.get("error") or "")}</td></tr>'
        for a in attempts)
    return ('<table><thead><tr><th class="num">#</th><th>state</th><th>worker</th><th>started</th>'
            f'<th class="num">took</th><th>exit</th><th>error</th></tr></thead><tbody>{rows}</tbody></table>')


def took(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.2f} s"


def history(events: Sequence[dict[str, Any]], now: float) -> str:
    if not events:
        return '<p class="muted">No event.</p>'
    rows = "".join(
        f'<li>{when(e["at"], now)} {badge(e["from"]) if e["from"] else ""} → {badge(e["to"])} '
        f'<span class="muted">attempt {int(e["attempt"])}</span> {h(e.get("reason") or "")}</li>' for e in events)
    return f'<ol class="history">{rows}</ol>'


# --------------------------------------------------------------------------- workflow


def workflow(w: dict[str, Any], now: float) -> str:
    """The graph: each job in the column of its depth (its longest chain of dependencies), edges as lines."""
    jobs_ = w["jobs"]
    by_id = {int(j["id"]): j for j in jobs_}
    depth: dict[int, int] = {}

    def depth_of(jid: int, seen: frozenset[int] = frozenset()) -> int:
        if jid in depth:
            return depth[jid]
        deps = [int(d["job_id"]) for d in by_id[jid]["dependencies"] if int(d["job_id"]) in by_id and d["job_id"] not in seen]
        depth[jid] = 0 if not deps else 1 + max(depth_of(d, seen | {jid}) for d in deps)
        return depth[jid]

    for jid in by_id:
        depth_of(jid)
    columns: dict[int, list[int]] = {}
    for jid in sorted(by_id):
        columns.setdefault(depth[jid], []).append(jid)
    w_, h_, gx, gy = 150, 36, 60, 14
    pos = {jid: (c * (w_ + gx) + 8, r * (h_ + gy) + 8) for c, ids in columns.items() for r, jid in enumerate(ids)}
    width = (max(columns) + 1) * (w_ + gx) if columns else w_
    height = max((len(ids) for ids in columns.values()), default=1) * (h_ + gy) + 16
    edges = []
    for jid, j in by_id.items():
        x2, y2 = pos[jid]
        for d in j["dependencies"]:
            src = int(d["job_id"])
            if src in pos:
                x1, y1 = pos[src]
                edges.append(f'<line class="edge{" met" if d.get("met") else ""}" x1="{x1 + w_}" y1="{y1 + h_ / 2}" '
                             f'x2="{x2}" y2="{y2 + h_ / 2}" marker-end="url(#arrow)"/>')
    nodes = []
    for jid, (x, y) in pos.items():
        j = by_id[jid]
        label = j.get("ref") or j.get("name") or f"#{jid}"
        nodes.append(
            f'<a href="/ui/jobs/{jid}" class="node st-{h(j["state"])}" aria-label="job {jid} {h(label)}: {h(j["state"])}">'
            f'<rect x="{x}" y="{y}" width="{w_}" height="{h_}" rx="6"/>'
            f'<text x="{x + 8}" y="{y + 15}">{h(_clip(str(label), 20))}</text>'
            f'<text x="{x + 8}" y="{y + 29}" class="sub">#{jid} {h(j["state"])}</text></a>')
    counts = ", ".join(f"{number(n)} {h(s)}" for s, n in w["counts"].items())
    return (
        f'<h1>Workflow <span class="muted">#{int(w["id"])}</span> {badge(w["state"])}</h1><p>{counts}</p>'
        f'<div class="graph"><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="group" '
        f'aria-label="workflow graph"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        f'markerHeight="6" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"/></marker></defs>'
        f'{"".join(edges)}{"".join(nodes)}</svg></div>'
        f'<table><thead><tr><th>id</th><th>state</th><th>ref</th><th>command</th></tr></thead><tbody>'
        + "".join(f'<tr><td><a href="/ui/jobs/{int(j["id"])}">{int(j["id"])}</a></td><td>{badge(j["state"])}</td>'
                  f'<td>{h(j.get("ref") or "")}</td><td><code>{h(j["command"])}</code></td></tr>' for j in jobs_)
        + '</tbody></table>')


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------- workers, queues, schedules


def workers(rows: Sequence[dict[str, Any]], may_act: bool, show_all: bool) -> str:
    body = []
    for w in rows:
        metrics = (f'<a href="{h("http://" + w["metrics"] + "/metrics")}" rel="noreferrer">metrics</a>'
                   if w.get("metrics") else "-")
        drain = (f'<button type="button" data-act="drain" data-worker="{h(w["id"])}">Drain</button>'
                 if may_act and w["state"] == WorkerState.ALIVE.value else "")
        body.append(
            f'<tr><td>{h(w["name"])}<div class="muted">{h(w["id"])}</div></td><td>{badge(w["state"])}</td>'
            f'<td>{h(w["hostname"])}</td><td>{h(", ".join(w["queues"]))}</td><td>{h(", ".join(w.get("runners", [])))}</td>'
            f'<td class="num">{int(w["running"])}/{int(w["concurrency"])}</td>'
            f'<td class="num">{w["heartbeat_age"]:.1f} s</td><td>{metrics}</td><td>{drain}</td></tr>')
    table = ('<table><thead><tr><th>worker</th><th>state</th><th>host</th><th>queues</th><th>runners</th>'
             '<th class="num">running</th><th class="num">heartbeat</th><th>metrics</th><th></th></tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table>' if body else '<p class="muted">No worker.</p>')
    toggle = ('<a href="/ui/workers">Live and recent only</a>' if show_all
              else '<a href="/ui/workers?all=1">Every worker ever seen</a>')
    return f'<h1>Workers</h1><p>{toggle}</p>{table}'


def queues(rows: Sequence[dict[str, Any]], limits: Sequence[dict[str, Any]], may_act: bool) -> str:
    body = []
    for q in rows:
        name = q["name"]
        acts = ""
        if may_act:
            act = "resume" if q["paused"] else "pause"
            acts = (f'<button type="button" data-act="{act}-queue" data-queue="{h(name)}">{act.title()}</button>'
                    f'<form class="inline limit" data-queue="{h(name)}"><label>limit <input name="concurrency" '
                    f'type="number" min="1" value="{h(q["concurrency"] if q["concurrency"] is not None else "")}" '
                    f'placeholder="none" size="5"></label><button type="submit">Set</button></form>')
        body.append(
            f'<tr id="q-{h(name)}"><td><a href="{url("/ui/jobs", queue=name)}">{h(name)}</a></td>'
            f'<td>{"<strong>paused</strong>" if q["paused"] else "serving"}</td>'
            f'<td class="num">{number(q["queued"])}</td><td class="num">{number(q["running"])}</td>'
            f'<td class="num">{number(q["retrying"])}</td><td class="num">{number(q["scheduled"])}</td>'
            f'<td class="num">{h(q["concurrency"]) if q["concurrency"] is not None else "-"}</td><td>{acts}</td></tr>')
    table = ('<table><thead><tr><th>queue</th><th>state</th><th class="num">queued</th><th class="num">running</th>'
             '<th class="num">retrying</th><th class="num">scheduled</th><th class="num">limit</th><th></th></tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table>' if body else '<p class="muted">No queue.</p>')
    lrows = "".join(f'<tr><td>{h(x["name"])}</td><td><code>{h(x.get("rate"))}</code></td><td>{h(x.get("burst"))}</td></tr>'
                    for x in limits)
    lim = (f'<h2>Rate limits</h2><table><thead><tr><th>name</th><th>rate</th><th>burst</th></tr></thead>'
           f'<tbody>{lrows}</tbody></table>' if lrows else "")
    return f'<h1>Queues</h1>{table}{lim}'


def schedules(rows: Sequence[dict[str, Any]], now: float, may_act: bool) -> str:
    body = []
    for s in rows:
        name = s["name"]
        acts = ""
        if may_act:
            act = "resume" if s.get("paused") else "pause"
            acts = (f'<button type="button" data-act="{act}-schedule" data-schedule="{h(name)}">{act.title()}</button>'
                    f'<button type="button" data-act="trigger" data-schedule="{h(name)}">Run now</button>')
        nxt = "".join(f"<li>{when(t, now)}</li>" for t in s.get("next", [])[:3])
        last = s.get("last_job")
        last_cell = f'<a href="/ui/jobs/{int(last["id"])}">{int(last["id"])}</a> {badge(last.get("state"))}' if last else "-"
        runs = "<strong>paused</strong>" if s.get("paused") else f'<ul class="plain">{nxt}</ul>'
        missed = f'{number(s["missed"])}' + (f' (last {when(s["last_missed_at"], now)})' if s.get("last_missed_at") else "")
        body.append(
            f'<tr id="s-{h(name)}"><td>{h(name)}</td><td><code>{h(s["cron"])}</code> <span class="muted">{h(s.get("tz"))}</span></td>'
            f'<td>{runs}</td><td>{last_cell}</td>'
            f'<td class="num">{number(s["fired"])}</td><td class="num">{number(s["skipped"])}</td><td class="num">{missed}</td>'
            f'<td>{acts}</td></tr>')
    table = ('<table><thead><tr><th>schedule</th><th>cron</th><th>next runs</th><th>last job</th>'
             '<th class="num">fired</th><th class="num">skipped</th><th class="num">missed</th><th></th></tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table>' if body else '<p class="muted">No schedule.</p>')
    return f'<h1>Schedules</h1>{table}'
