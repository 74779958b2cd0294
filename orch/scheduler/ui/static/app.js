// orch dashboard: live updates (one EventSource per tab, closed while the tab is hidden), the buttons (calls of
// the JSON API with the session's CSRF token), bulk actions with a confirmation that says how many, the theme.
"use strict";
(function () {
  const meta = (name) => { const m = document.querySelector(`meta[name="${name}"]`); return m ? m.content : ""; };
  const csrf = meta("orch-csrf");
  const liveUrl = meta("orch-live");
  const main = document.getElementById("main");
  const notice = document.getElementById("notice");

  // ---- theme: auto (the system's), else what the toggle chose last
  const root = document.documentElement;
  const saved = localStorage.getItem("orch-theme");
  if (saved === "light" || saved === "dark") root.dataset.theme = saved;
  const themeButton = document.getElementById("theme");
  if (themeButton) themeButton.addEventListener("click", () => {
    const dark = root.dataset.theme ? root.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
    root.dataset.theme = dark ? "light" : "dark";
    localStorage.setItem("orch-theme", root.dataset.theme);
  });

  function tell(text, bad) {
    if (!notice) return;
    notice.textContent = text;
    notice.classList.toggle("bad", !!bad);
    clearTimeout(tell.timer);
    tell.timer = setTimeout(() => { notice.textContent = ""; }, 6000);
  }

  // ---- live: refetch <main> when the stream says something changed
  let source = null, lastId = "", refreshing = false, again = false;
  const liveBadge = document.getElementById("live");

  function busy() {
    const a = document.activeElement;
    return a && main.contains(a) && (a.tagName === "INPUT" || a.tagName === "SELECT" || a.tagName === "TEXTAREA");
  }

  async function refresh() {
    if (refreshing) { again = true; return; }
    if (busy()) { again = true; return; }  // not while the user types in a filter: after it loses focus
    refreshing = true;
    try {
      const logs = [...main.querySelectorAll("pre.log")].map((p) => [p.id, p.scrollHeight - p.scrollTop - p.clientHeight < 4]);
      const focused = document.activeElement && main.contains(document.activeElement) ? document.activeElement.id : null;
      const r = await fetch(location.href, { headers: { "X-Orch-Fragment": "1" }, credentials: "same-origin" });
      if (r.status === 401) { location.href = "/ui/login"; return; }
      const text = await r.text();
      main.innerHTML = text;
      for (const [id, atEnd] of logs) {
        const p = document.getElementById(id);
        if (p && atEnd) p.scrollTop = p.scrollHeight;
      }
      if (focused) { const f = document.getElementById(focused); if (f) f.focus(); }
      main.dataset.version = lastId;
    } catch (e) { /* the stream will say when to try again */ }
    finally {
      refreshing = false;
      if (again) { again = false; setTimeout(refresh, 50); }
    }
  }
  main && main.addEventListener("focusout", () => { if (again && !refreshing) { again = false; setTimeout(refresh, 0); } });

  function connect() {
    if (!liveUrl || source) return;
    const u = new URL(liveUrl, location.href);
    if (lastId) u.searchParams.set("last", lastId);
    source = new EventSource(u);
    source.addEventListener("open", () => { if (liveBadge) liveBadge.hidden = false; });
    source.addEventListener("change", (e) => { lastId = e.lastEventId || lastId; refresh(); });
    source.addEventListener("signout", () => { location.href = "/ui/login"; });
    source.addEventListener("error", () => { if (liveBadge) liveBadge.hidden = true; });
  }
  function disconnect() {
    if (source) { source.close(); source = null; }
    if (liveBadge) liveBadge.hidden = true;
  }
  document.addEventListener("visibilitychange", () => { if (document.hidden) disconnect(); else connect(); });
  if (!document.hidden) connect();

  // ---- actions
  async function call(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { "X-Orch-CSRF": csrf } };
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      const msg = data && data.error ? data.error.message : `HTTP ${r.status}`;
      throw new Error(msg);
    }
    return data;
  }
  const enc = encodeURIComponent;
  const ACTS = {
    cancel: (d) => ["POST", `/v1/jobs/${d.job}/cancel`, undefined, `Cancel job ${d.job}?`, `job ${d.job}: cancel asked`],
    retry: (d) => ["POST", `/v1/jobs/${d.job}/retry`, { by: "dashboard" }, null, `job ${d.job} queued again`],
    "pause-queue": (d) => ["POST", `/v1/queues/${enc(d.queue)}/pause`, undefined, null, `queue ${d.queue} paused`],
    "resume-queue": (d) => ["POST", `/v1/queues/${enc(d.queue)}/resume`, undefined, null, `queue ${d.queue} resumed`],
    "pause-schedule": (d) => ["POST", `/v1/schedules/${enc(d.schedule)}/pause`, undefined, null, `schedule ${d.schedule} paused`],
    "resume-schedule": (d) => ["POST", `/v1/schedules/${enc(d.schedule)}/resume`, undefined, null, `schedule ${d.schedule} resumed`],
    trigger: (d) => ["POST", `/v1/schedules/${enc(d.schedule)}/trigger`, undefined, null, `schedule ${d.schedule}: a job submitted`],
    drain: (d) => ["PATCH", `/v1/workers/${enc(d.worker)}`, { draining: true }, `Drain worker ${d.worker}? It takes no new jobs, finishes what it runs, and stops.`, `worker ${d.worker} draining`],
  };

  function filters() {
    const q = new URLSearchParams(location.search), out = {};
    for (const k of ["state", "queue", "label", "name", "q"]) if (q.get(k)) out[k] = q.get(k);
    return out;
  }

  document.addEventListener("click", async (e) => {
    // (A live refresh may have replaced the button since the click began: its data still says what to do.)
    const b = e.target.closest("button[data-act], button[data-bulk]");
    if (!b) return;
    e.preventDefault();
    try {
      if (b.dataset.bulk) {
        const action = b.dataset.bulk, f = filters();
        const counted = await call("POST", "/ui/bulk", { action, filters: f });
        if (counted.count === 0) { tell(`No job to ${action}: none matches (${counted.filters}).`); return; }
        const verb = action === "retry" ? "Retry" : "Cancel";
        if (!confirm(`${verb} ${counted.count.toLocaleString()} jobs (${counted.filters})?`)) return;
        const done = await call("POST", "/ui/bulk", { action, filters: f, confirm: counted.count });
        tell(`${verb}: ${done.done.toLocaleString()} done` + (done.refused ? `, ${done.refused} refused (they had moved on)` : ""));
      } else {
        const [method, path, body, ask, said] = ACTS[b.dataset.act](b.dataset);
        if (ask && !confirm(ask)) return;
        b.disabled = true;
        await call(method, path, body);
        tell(said);
      }
      refresh();
    } catch (err) { tell(err.message, true); b.disabled = false; }
  });

  document.addEventListener("submit", async (e) => {
    const form = e.target;
    if (!form.classList.contains("limit")) return;
    e.preventDefault();
    const raw = form.elements.concurrency.value.trim();
    try {
      await call("PATCH", `/v1/queues/${enc(form.dataset.queue)}`, { concurrency: raw === "" ? null : Number(raw) });
      tell(`queue ${form.dataset.queue}: limit ${raw === "" ? "lifted" : raw}`);
      form.elements.concurrency.blur();
      refresh();
    } catch (err) { tell(err.message, true); }
  });

  // ---- keyboard: "/" to the text filter, "g" then a letter to a page
  let g = false;
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) return;
    if (e.key === "/") { const q = document.getElementById("q"); if (q) { e.preventDefault(); q.focus(); } return; }
    if (g) {
      g = false;
      const to = { o: "/ui", j: "/ui/jobs", w: "/ui/workers", q: "/ui/queues", s: "/ui/schedules" }[e.key];
      if (to) { e.preventDefault(); location.href = to; }
      return;
    }
    if (e.key === "g") g = true;
  });
})();
