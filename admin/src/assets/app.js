"use strict";
// The dashboard: polls the admin API beside this page and renders with textContent only, so
// nothing from the database is ever parsed as HTML.
(function () {
  const base = location.pathname.replace(/\/+$/, "");
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem("outbox-token") || "";
  let timer = null;
  let paused = false;
  let refreshMs = 5000;
  let canWrite = false;
  let lastChart = 0;
  // The tenant every call acts on ("" is the router's own database); from the URL, so a
  // link or a reload keeps it.
  let tenant = new URLSearchParams(location.search).get("tenant") || "";
  let tenantsLoaded = false;

  async function call(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    if (method !== "GET") headers["Content-Type"] = "application/json";
    if (tenant) path += (path.includes("?") ? "&" : "?") + "tenant=" + encodeURIComponent(tenant);
    const res = await fetch(base + path, {
      method, headers, credentials: "same-origin",
      body: method === "GET" ? undefined : JSON.stringify(body || {}),
    });
    let data = null;
    try { data = await res.json(); } catch (_) { /* not JSON */ }
    if (res.status === 401) { showLogin(); throw new Error("unauthorized"); }
    if (!res.ok) throw new Error((data && data.message) || res.status + " " + res.statusText);
    return data;
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function age(secs) {
    if (secs === null || secs === undefined) return "none";
    if (secs < 1) return "<1s";
    if (secs < 90) return Math.round(secs) + "s";
    if (secs < 5400) return Math.round(secs / 60) + "m";
    if (secs < 172800) return (secs / 3600).toFixed(1) + "h";
    return (secs / 86400).toFixed(1) + "d";
  }

  function when(t) { return t ? new Date(t).toLocaleString() : ""; }

  function showError(msg) {
    const e = $("error");
    e.textContent = msg || "";
    e.className = msg ? "open" : "";
  }

  function showLogin() {
    $("login").className = "card open";
    $("content").hidden = true;
  }

  function confirmThen(text, action) {
    $("confirm-text").textContent = text;
    $("confirm").className = "open";
    $("confirm-ok").onclick = async () => { $("confirm").className = ""; await act(action); };
    $("confirm-cancel").onclick = () => { $("confirm").className = ""; };
  }

  async function act(action) {
    try { await action(); showError(""); } catch (e) { showError(e.message); }
    await refresh();
  }

  function renderStats(s) {
    $("login").className = "card";
    $("content").hidden = false;
    const h = $("health");
    h.textContent = s.health.status;
    h.className = "badge " + s.health.status;
    const reasons = $("reasons");
    reasons.replaceChildren(...s.health.reasons.map((r) => el("li", r)));
    $("pending").textContent = s.pending;
    $("pending-split").textContent = s.pending_due + " due · " + s.pending_backoff + " backoff · " + s.pending_leased + " leased";
    $("oldest").textContent = age(s.oldest_pending_age_secs);
    $("oldest-at").textContent = s.oldest_pending_at ? when(s.oldest_pending_at) : "nothing pending";
    $("scheduled").textContent = s.scheduled;
    $("next-scheduled").textContent = s.next_scheduled_at ? "next " + when(s.next_scheduled_at) : "none";
    $("failed").textContent = s.failed;
    $("card-failed").className = "card" + (s.failed > 0 ? " alert" : "");
    $("published").textContent = s.published_last_hour;
    $("rate").textContent = (s.published_last_hour / 60).toFixed(1) + " / min";
    const inbox = s.inbox !== null;
    $("card-inbox").hidden = !inbox;
    $("inbox-section").hidden = !inbox;
    if (inbox) {
      $("inbox-failed").textContent = s.inbox.dead_letters;
      renderConsumers(s.inbox.consumers || []);
    }
    renderLogSlots(s.log);
    canWrite = s.caller.role === "write";
    $("caller").textContent = s.caller.name + " (" + s.caller.role + ")";
    document.querySelectorAll(".write").forEach((b) => { b.hidden = !canWrite; });
    const relays = $("relays");
    if (s.relays.length === 0) {
      const tr = el("tr"); const td = el("td", "No relay has sent a heartbeat recently.", "empty");
      td.colSpan = 7; tr.append(td); relays.replaceChildren(tr);
    } else {
      relays.replaceChildren(...s.relays.map((r) => {
        const tr = el("tr");
        tr.dataset.relay = r.name;
        const b = el("span", r.breaker.replace("_", "-"), "badge " + r.breaker);
        const breaker = el("td"); breaker.append(b);
        tr.append(el("td", r.name, "mono"), el("td", r.publisher),
          el("td", r.partitions ? r.partitions + " / 256" : "–", "num"), breaker,
          el("td", when(r.unavailable_since)), el("td", when(r.heartbeat_at)), el("td", r.last_error || "", "err"));
        return tr;
      }));
    }
    refreshMs = Math.max(1000, (s.refresh_secs || 5) * 1000);
  }

  function renderChart(minutes) {
    const svg = $("chart");
    const W = 1000, H = 180, top = 10, bottom = 20, left = 40;
    const ns = "http://www.w3.org/2000/svg";
    const mk = (tag, attrs, text) => {
      const e = document.createElementNS(ns, tag);
      for (const k in attrs) e.setAttribute(k, attrs[k]);
      if (text !== undefined) e.textContent = text;
      return e;
    };
    const n = minutes.length || 1;
    const maxPub = Math.max(1, ...minutes.map((m) => m.published));
    const maxBack = Math.max(1, ...minutes.map((m) => m.pending || 0));
    const max = Math.max(maxPub, maxBack);
    const bw = (W - left) / n;
    const y = (v) => top + (H - top - bottom) * (1 - v / max);
    const parts = [mk("line", { x1: left, y1: H - bottom, x2: W, y2: H - bottom, stroke: "#d0d7de" }),
      mk("text", { x: 2, y: top + 8 }, String(max)), mk("text", { x: 2, y: H - bottom }, "0"),
      mk("text", { x: left, y: H - 4 }, "-" + n + " min"), mk("text", { x: W - 30, y: H - 4 }, "now")];
    minutes.forEach((m, i) => {
      if (m.published > 0) {
        parts.push(mk("rect", { x: left + i * bw + 1, y: y(m.published), width: Math.max(1, bw - 2),
          height: H - bottom - y(m.published), fill: "#0b5cad", "data-published": m.published }));
      }
    });
    const pts = minutes.map((m, i) => m.pending === null ? null : [left + i * bw + bw / 2, y(m.pending)]).filter(Boolean);
    if (pts.length > 0) {
      parts.push(mk("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none",
        stroke: "#c62828", "stroke-width": 2, id: "backlog-line" }));
      // A dot per sample, so a single minute's sample (or a gap) still shows.
      pts.forEach((p) => parts.push(mk("circle", { cx: p[0], cy: p[1], r: 3, fill: "#c62828" })));
    }
    svg.replaceChildren(...parts);
  }

  function buttons(replay, discard) {
    const td = el("td");
    if (!canWrite) return td;
    const r = el("button", "Replay", "replay"); r.type = "button"; r.onclick = () => act(replay);
    const d = el("button", "Discard", "discard danger"); d.type = "button";
    d.onclick = () => confirmThen("Discard this dead letter for good?", discard);
    td.append(r, " ", d);
    return td;
  }

  function payloadCell(label, value) {
    const td = el("td");
    td.append(el("div", label, "mono"));
    const det = el("details"); det.append(el("summary", "payload"), el("pre", value));
    td.append(det);
    return td;
  }

  function renderDeadLetters(d) {
    $("dl-total").textContent = "(" + d.total + ")";
    $("replay-all").disabled = d.total === 0;
    $("replay-all").onclick = () => confirmThen("Replay all " + d.total + " dead letters?",
      () => call("POST", "/api/dead-letters/replay", { all: true }));
    const body = $("dead-letters");
    if (d.dead_letters.length === 0) {
      const tr = el("tr"); const td = el("td", "No dead letters.", "empty"); td.colSpan = 6;
      tr.append(td); body.replaceChildren(tr); return;
    }
    body.replaceChildren(...d.dead_letters.map((e) => {
      const tr = el("tr"); tr.dataset.id = e.id;
      // A UUIDv7 starts with its timestamp: the tail tells events apart.
      tr.append(payloadCell(e.event_type + " · …" + e.id.slice(-12), JSON.stringify(e.payload, null, 2)),
        el("td", e.aggregate_type + "/" + e.aggregate_id, "mono"), el("td", e.attempts),
        el("td", when(e.failed_at)), el("td", e.last_error || "", "err"),
        buttons(() => call("POST", "/api/dead-letters/" + e.id + "/replay"),
          () => call("DELETE", "/api/dead-letters/" + e.id)));
      return tr;
    }));
  }

  // The first page of scheduled events, soonest first; cancel takes one back (write role).
  function renderScheduled(total, d) {
    $("scheduled-section").hidden = total === 0;
    if (total === 0) return;
    $("sch-total").textContent = "(" + total + (d.next_offset !== null ? ", first " + d.events.length + " shown" : "") + ")";
    $("scheduled-events").replaceChildren(...d.events.map((e) => {
      const tr = el("tr"); tr.dataset.id = e.id;
      const actions = el("td");
      if (canWrite) {
        const c = el("button", "Cancel", "cancel danger"); c.type = "button";
        c.onclick = () => confirmThen("Cancel this scheduled event? It will not be sent.",
          () => call("DELETE", "/api/scheduled/" + e.id));
        actions.append(c);
      }
      tr.append(payloadCell(e.event_type + " · …" + e.id.slice(-12), JSON.stringify(e.payload, null, 2)),
        el("td", e.aggregate_type + "/" + e.aggregate_id, "mono"), el("td", when(e.deliver_at)),
        el("td", when(e.expires_at)), actions);
      return tr;
    }));
  }

  function bytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
    if (n < 1073741824) return (n / 1048576).toFixed(1) + " MiB";
    return (n / 1073741824).toFixed(1) + " GiB";
  }

  function renderLogSlots(log) {
    $("log-section").hidden = log === null;
    if (log === null) return;
    const lost = log.slots.filter((x) => x.wal_status === "lost").length;
    $("log-summary").textContent = "(" + log.slots.length + " slot" + (log.slots.length === 1 ? "" : "s")
      + (lost ? ", " + lost + " LOST" : "") + ")";
    const body = $("log-slots");
    if (log.slots.length === 0) {
      const tr = el("tr"); const td = el("td", "No log relay slot in this database.", "empty"); td.colSpan = 6;
      tr.append(td); body.replaceChildren(tr); return;
    }
    body.replaceChildren(...log.slots.map((x) => {
      const tr = el("tr"); tr.dataset.slot = x.name;
      if (x.wal_status === "lost") tr.className = "lost";
      const status = el("td");
      status.append(el("span", x.wal_status === "lost" ? "LOST: events after " + x.confirmed_lsn + " cannot be read" : x.wal_status,
        "badge " + (x.wal_status === "lost" ? "unhealthy" : x.wal_status === "reserved" ? "healthy" : "degraded")));
      const reader = x.active ? (x.reader || "a session (unnamed)") : "none (idle)";
      const lag = bytes(x.lag_bytes) + (x.lag_seconds !== null ? " · " + x.lag_seconds.toFixed(1) + " s" : "");
      tr.append(el("td", x.name, "mono"), el("td", reader, "reader"),
        el("td", lag, "num lag"), el("td", bytes(x.retained_bytes), "num"), status,
        el("td", x.confirmed_lsn, "mono"));
      return tr;
    }));
  }

  function renderLogDeadLetters(d) {
    $("ldl-total").textContent = "(" + d.total + ")";
    const body = $("log-dead-letters");
    if (d.dead_letters.length === 0) {
      const tr = el("tr"); const td = el("td", "No log dead letters.", "empty"); td.colSpan = 6;
      tr.append(td); body.replaceChildren(tr); return;
    }
    body.replaceChildren(...d.dead_letters.map((r) => {
      const tr = el("tr"); tr.dataset.id = r.id;
      const label = r.event ? r.event.event_type + " · " + r.event.aggregate_type + "/" + r.event.aggregate_id
        : "unreadable record";
      const payload = r.event ? JSON.stringify(r.event.payload, null, 2) : (r.raw || "");
      // A record that could not be read has no event to write back: discard only.
      const actions = buttons(() => call("POST", "/api/log/dead-letters/" + r.id + "/replay"),
        () => call("DELETE", "/api/log/dead-letters/" + r.id));
      if (!r.event) actions.querySelectorAll(".replay").forEach((b) => b.remove());
      tr.append(payloadCell(label, payload), el("td", r.slot, "mono"), el("td", r.attempts),
        el("td", when(r.failed_at)), el("td", r.error, "err"), actions);
      return tr;
    }));
  }

  // Every consumer process that wrote its heartbeat recently, whichever process serves this
  // page. A process with messages waiting longer than a minute is marked.
  function renderConsumers(rows) {
    const names = new Set(rows.map((c) => c.consumer));
    $("consumers-summary").textContent = "(" + names.size + " consumer" + (names.size === 1 ? "" : "s") + ", "
      + rows.length + " process" + (rows.length === 1 ? "" : "es") + ")";
    const body = $("consumers");
    if (rows.length === 0) {
      const tr = el("tr"); const td = el("td", "No consumer has sent a heartbeat recently.", "empty"); td.colSpan = 9;
      tr.append(td); body.replaceChildren(tr); return;
    }
    const rate = (n) => n >= 10 ? Math.round(n) : n.toFixed(1);
    body.replaceChildren(...rows.map((c) => {
      const tr = el("tr"); tr.dataset.consumer = c.consumer; tr.dataset.instance = c.instance;
      if (c.lag_secs !== null && c.lag_secs > 60) tr.className = "behind";
      tr.append(el("td", c.consumer, "mono"), el("td", c.instance, "mono"), el("td", c.broker),
        el("td", rate(c.applied_per_min), "num applied"), el("td", rate(c.duplicates_per_min), "num duplicates"),
        el("td", rate(c.dead_lettered_per_min), "num dead"), el("td", c.held, "num held"),
        el("td", c.lag_secs === null ? "none waiting" : age(c.lag_secs), "lag"), el("td", when(c.heartbeat_at)));
      return tr;
    }));
  }

  function renderInbox(d) {
    $("idl-total").textContent = "(" + d.total + ")";
    $("inbox-replay-all").disabled = d.total === 0;
    $("inbox-replay-all").onclick = () => confirmThen("Ask the consumers to replay all " + d.total + " inbox dead letters?",
      () => call("POST", "/api/inbox/dead-letters/replay", { all: true }));
    const body = $("inbox-dead-letters");
    if (d.dead_letters.length === 0) {
      const tr = el("tr"); const td = el("td", "No inbox dead letters.", "empty"); td.colSpan = 6;
      tr.append(td); body.replaceChildren(tr); return;
    }
    body.replaceChildren(...d.dead_letters.map((m) => {
      const tr = el("tr"); tr.dataset.id = m.id;
      const payload = m.payload.text !== undefined ? m.payload.text : JSON.stringify(m.payload.bytes);
      tr.append(el("td", m.consumer, "mono"), payloadCell(m.message_id || "(no id)", payload),
        el("td", m.attempts), el("td", when(m.failed_at) + (m.replay_requested_at ? " · replay requested" : "")),
        el("td", m.error, "err"),
        buttons(() => call("POST", "/api/inbox/dead-letters/" + m.id + "/replay"),
          () => call("DELETE", "/api/inbox/dead-letters/" + m.id)));
      return tr;
    }));
  }

  // The event browser: driven by the operator, never by the refresh timer, so a 10M-row table
  // is read only when asked. It pages by the API's keyset cursor; `pages` keeps each page's
  // cursor, so going back to newer events needs no OFFSET either.
  const browse = { filter: "limit=50", pages: [null], at: 0, open: null };
  const STATUS = { pending: "pending", published: "published", failed: "dead letter" };

  function filterQuery() {
    const q = new URLSearchParams();
    const put = (k, id) => { const v = $(id).value.trim(); if (v) q.set(k, v); };
    put("aggregate_type", "f-aggregate-type");
    put("aggregate_id", "f-aggregate-id");
    put("event_type", "f-type");
    put("status", "f-status");
    // The inputs are in the browser's time zone; the API takes instants.
    for (const [k, id] of [["since", "f-since"], ["until", "f-until"]]) {
      const v = $(id).value;
      if (v) q.set(k, new Date(v).toISOString());
    }
    // A time range or the backlog reads in occurrence order: that is what their indexes hold
    // (the time BRIN, the pending index); anything else pages by id over the primary key.
    if (q.has("since") || q.has("until") || q.get("status") === "pending") q.set("sort", "occurred");
    q.set("limit", "50");
    return q.toString();
  }

  function renderFound(events) {
    const body = $("found");
    if (events.length === 0) {
      const tr = el("tr"); const td = el("td", "No event matches.", "empty"); td.colSpan = 6;
      tr.append(td); body.replaceChildren(tr); return;
    }
    body.replaceChildren(...events.map((e) => {
      const tr = el("tr"); tr.dataset.id = e.id; tr.dataset.status = e.status;
      if (browse.open === e.id) tr.className = "open";
      tr.append(el("td", e.event_type + " · …" + e.id.slice(-12), "mono"),
        el("td", e.aggregate_type + "/" + e.aggregate_id, "mono"), el("td", STATUS[e.status] || e.status),
        el("td", when(e.occurred_at)), el("td", e.attempts, "num"), el("td", e.last_error || "", "err"));
      tr.onclick = () => act(() => openEvent(e.id));
      return tr;
    }));
  }

  async function showPage() {
    const q = new URLSearchParams(browse.filter);
    const after = browse.pages[browse.at];
    if (after) q.set("after", after);
    const d = await call("GET", "/api/events?" + q.toString());
    browse.pages.length = browse.at + 1;
    if (d.next) browse.pages.push(d.next);
    renderFound(d.events);
    $("page-no").textContent = "page " + (browse.at + 1);
    $("prev-page").disabled = browse.at === 0;
    $("next-page").disabled = !d.next;
    $("found-summary").textContent = "(" + d.events.length + (d.next ? "+" : "") + " shown)";
  }

  function closeEvent() {
    browse.open = null;
    $("event-detail").hidden = true;
    document.querySelectorAll("#found tr.open").forEach((tr) => tr.classList.remove("open"));
  }

  async function openEvent(id) {
    const e = await call("GET", "/api/events/" + encodeURIComponent(id));
    browse.open = e.id;
    const box = $("event-detail");
    box.hidden = false;
    box.dataset.id = e.id;
    box.dataset.status = e.status;
    $("d-id").textContent = e.id;
    const fields = [["Type", e.event_type], ["Aggregate", e.aggregate_type + "/" + e.aggregate_id],
      ["Status", STATUS[e.status] || e.status], ["Attempts", e.attempts], ["Occurred", when(e.occurred_at)],
      ["Written", when(e.created_at)], ["Deliver at", when(e.deliver_at)], ["Expires", when(e.expires_at)],
      ["Published", when(e.published_at)], ["Dead-lettered", when(e.failed_at)], ["Last error", e.last_error]];
    $("d-fields").replaceChildren(...fields.filter(([, v]) => v !== null && v !== undefined && v !== "")
      .flatMap(([k, v]) => { const dd = el("dd", v); dd.dataset.field = k; return [el("dt", k), dd]; }));
    $("d-headers").textContent = JSON.stringify(e.headers, null, 2);
    $("d-payload").textContent = JSON.stringify(e.payload, null, 2);
    const actions = $("d-actions");
    actions.replaceChildren();
    // Only a dead letter can be replayed or discarded, and only by a writer.
    if (e.status === "failed" && canWrite) {
      const r = el("button", "Replay", "replay"); r.type = "button";
      r.onclick = () => act(async () => {
        await call("POST", "/api/dead-letters/" + e.id + "/replay");
        await openEvent(e.id); await showPage();
      });
      const d = el("button", "Discard", "discard danger"); d.type = "button";
      d.onclick = () => confirmThen("Discard this dead letter for good?", async () => {
        await call("DELETE", "/api/dead-letters/" + e.id);
        closeEvent(); await showPage();
      });
      actions.append(r, " ", d);
    }
    document.querySelectorAll("#found tr[data-id]").forEach((tr) => tr.classList.toggle("open", tr.dataset.id === e.id));
  }

  $("find").onsubmit = (ev) => {
    ev.preventDefault();
    const id = $("f-id").value.trim();
    act(async () => {
      closeEvent();
      if (id) {
        // An id names one event: show it alone, opened.
        const e = await call("GET", "/api/events/" + encodeURIComponent(id));
        renderFound([e]);
        $("prev-page").disabled = true; $("next-page").disabled = true;
        $("page-no").textContent = ""; $("found-summary").textContent = "(by id)";
        await openEvent(e.id);
        return;
      }
      browse.filter = filterQuery();
      browse.pages = [null];
      browse.at = 0;
      await showPage();
    });
  };
  $("next-page").onclick = () => { browse.at += 1; act(showPage); };
  $("prev-page").onclick = () => { browse.at = Math.max(0, browse.at - 1); act(showPage); };
  $("d-close").onclick = closeEvent;

  // The tenant selector, shown when the router serves tenants.
  async function loadTenants() {
    const t = await call("GET", "/api/tenants");
    tenantsLoaded = true;
    const sel = $("tenant");
    if (!t.tenants.length) return;
    sel.replaceChildren();
    const own = el("option", "(default)");
    own.value = "";
    sel.appendChild(own);
    for (const id of t.tenants) {
      const o = el("option", id);
      o.value = id;
      sel.appendChild(o);
    }
    sel.value = tenant;
    sel.hidden = false;
  }

  $("tenant").onchange = () => {
    tenant = $("tenant").value;
    const u = new URL(location.href);
    if (tenant) u.searchParams.set("tenant", tenant); else u.searchParams.delete("tenant");
    history.replaceState(null, "", u);
    // Another database: its own event pages, chart and open event.
    browse.pages = [null];
    browse.at = 0;
    browse.loaded = false;
    lastChart = 0;
    closeEvent();
    refresh();
  };

  async function refresh() {
    clearTimeout(timer);
    try {
      if (!tenantsLoaded) await loadTenants();
      const s = await call("GET", "/api/stats");
      renderStats(s);
      // The chart moves by the minute: its history is read at most every 15 s.
      const chartDue = Date.now() - lastChart >= Math.max(refreshMs, 15000);
      const [h, d] = await Promise.all([chartDue ? call("GET", "/api/history?minutes=60") : null,
        call("GET", "/api/dead-letters?limit=100")]);
      if (h) { renderChart(h.minutes); lastChart = Date.now(); }
      renderDeadLetters(d);
      renderScheduled(s.scheduled, s.scheduled > 0 ? await call("GET", "/api/events?scheduled=true&limit=50") : null);
      if (s.inbox !== null) renderInbox(await call("GET", "/api/inbox/dead-letters?limit=100"));
      if (s.log !== null) renderLogDeadLetters(await call("GET", "/api/log/dead-letters?limit=100"));
      // The browser's first page once, on the first refresh that gets through; then on demand.
      if (!browse.loaded) { browse.loaded = true; await showPage(); }
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
      showError("");
    } catch (e) {
      if (e.message !== "unauthorized") showError("Refresh failed: " + e.message);
    }
    if (!paused) timer = setTimeout(refresh, refreshMs);
  }

  $("login-form").onsubmit = (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("outbox-token", token);
    refresh();
  };
  $("pause").onclick = () => {
    paused = !paused;
    $("pause").textContent = paused ? "Resume" : "Pause";
    if (!paused) refresh(); else clearTimeout(timer);
  };
  refresh();
})();
