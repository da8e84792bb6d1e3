// Corral's page: status, config, logs, changes and a form to change llama-server.
// Plain JS, no framework. Streams use fetch() (EventSource cannot send the token) and a
// small SSE parser; they reconnect with Last-Event-ID. Every /v1 call carries the token.
"use strict";

const TOKEN_KEY = "corral.token";
const MAX_LOG_LINES = 500;
const MAX_EVENTS = 50;

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let session = null; // an AbortController: aborted when the token changes
let status = null;
let statusAt = 0;   // performance.now() when status was fetched (the uptime ticks from it)

class AuthError extends Error {}

// ---- HTTP ---------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (r.status === 401 || (r.status === 403 && !options.method)) {
    const body = await r.json().catch(() => ({}));
    askToken(r.status === 401 ? "This supervisor needs its API token."
      : "The token was refused (" + (body.error || "HTTP 403") + "): enter it again.");
    throw new AuthError(String(r.status));
  }
  return r;
}

async function getJSON(path, signal) {
  const r = await api(path, { signal });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

// ---- SSE over fetch -----------------------------------------------------------------

// Calls onEvent({id, event, data}) for each event of the stream at `path`, reconnecting
// (with Last-Event-ID, from `after` if given) until `signal` aborts. onState("live" |
// "down") reports the link. The server sends `event: gap` when some were missed.
async function stream(path, signal, onEvent, onState, after = null) {
  let lastId = after === null ? null : String(after);
  let delay = 500;
  while (!signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const r = await api(path, { headers, signal });
      if (!r.ok || !r.body) throw new Error(path + ": HTTP " + r.status);
      onState("live");
      delay = 500;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        // Normalise line ends, keeping a trailing \r that may start a \r\n.
        const keep = buf.endsWith("\r") ? "\r" : "";
        buf = buf.slice(0, buf.length - keep.length).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const ev = parseEvent(buf.slice(0, end));
          buf = buf.slice(end + 2);
          if (ev === null) continue;
          if (ev.id !== null) lastId = ev.id;
          if (ev.data !== null) onEvent(ev);
        }
        buf += keep;
      }
    } catch (e) {
      if (signal.aborted || e instanceof AuthError) return;
    }
    onState("down");
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 10000);
  }
}

function parseEvent(block) {
  const ev = { id: null, event: "message", data: null };
  let data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") ev.event = value;
    else if (field === "id") ev.id = value;
  }
  if (data.length) ev.data = data.join("\n");
  return ev.id === null && ev.data === null ? null : ev;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

// ---- small DOM helpers --------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function setText(id, value) {
  $(id).textContent = value === null || value === undefined || value === "" ? "–" : value;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
  const m = Math.floor(s / 60) % 60, sec = s % 60;
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + m + " min";
  if (m) return m + " min " + sec + " s";
  return sec + " s";
}

function clock(t) {
  if (t === null || t === undefined) return "";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  return isNaN(d) ? String(t) : d.toLocaleTimeString();
}

function show(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

// ---- status -------------------------------------------------------------------------

let statusBusy = false, statusAgain = false;

// Fetch /v1/status and render it; calls made while one is in flight coalesce into one.
async function refreshStatus() {
  if (statusBusy) { statusAgain = true; return; }
  statusBusy = true;
  statusAgain = false;
  try {
    status = await getJSON("v1/status", session && session.signal);
    statusAt = performance.now();
    renderStatus(status);
  } catch (e) {
    if (!(e instanceof AuthError) && e.name !== "AbortError") {
      setLive("off", "status unavailable");
    }
  } finally {
    statusBusy = false;
    if (statusAgain) refreshStatus();
  }
}

function renderStatus(s) {
  document.title = "Corral · " + s.state;
  setText("name", s.name);
  const badge = $("state");
  badge.textContent = s.state;
  badge.dataset.state = s.state;
  const args = (s.config && s.config.args) || {};
  const model = args["--model"] || args["-m"] || args["--hf-repo"] || "";
  setText("model", String(model).split("/").pop());
  $("model").title = model;
  tickUptime();
  setText("restarts", s.restarts);
  setText("pid", s.pid);
  setText("port", s.port);
  setText("generation", s.generation);
  setText("pending", s.pending_changes);
  setText("failures", s.consecutive_failures
    + (s.retry_in_s ? " (retry in " + s.retry_in_s.toFixed(1) + " s)" : ""));
  setText("strategy", s.last_strategy);
  setText("store", s.store + (s.store_connected ? "" : " (unreachable)"));
  const err = $("last-error");
  err.hidden = !s.last_error;
  err.textContent = s.last_error ? "last error: " + s.last_error : "";

  const cfg = s.config || {};
  const rows = [el("tr", {}, el("th", { scope: "row" }, "binary"),
    el("td", { class: "wrap" }, cfg.binary || "–"))];
  for (const [flag, value] of Object.entries(args)) {
    rows.push(el("tr", { "data-flag": flag }, el("th", { scope: "row" }, flag),
      el("td", { class: "wrap" }, value === true ? "(set)" : String(value))));
  }
  for (const [name, value] of Object.entries(cfg.env || {})) {
    rows.push(el("tr", {}, el("th", { scope: "row" }, "env " + name),
      el("td", { class: "wrap" }, value)));
  }
  fill($("config").tBodies[0], rows);
  $("argv").textContent = (cfg.argv || []).join(" ");
  renderFront(s.front);
  renderFleet(s.fleet);
}

function tickUptime() {
  if (!status || status.uptime_s === null || status.uptime_s === undefined) {
    setText("uptime", status && status.state !== "RUNNING" ? "not running" : null);
    return;
  }
  const running = ["RUNNING", "APPLYING"].includes(status.state);
  const extra = running ? (performance.now() - statusAt) / 1000 : 0;
  setText("uptime", duration(status.uptime_s + extra));
}

function renderFront(front) {
  $("front-card").hidden = !front;
  if (!front) return;
  const facts = [];
  for (const [k, v] of Object.entries(front)) {
    let value = v;
    if (v && typeof v === "object") {
      const parts = Object.entries(v).map(([a, b]) => a + ": " + show(b));
      value = parts.length ? parts.join(", ") : "–";
    }
    facts.push(el("dt", {}, k.replace(/_/g, " ")), el("dd", { class: "wrap" }, show(value)));
  }
  $("front").replaceChildren(...facts);
}

function renderFleet(fleet) {
  $("fleet-card").hidden = !fleet;
  if (!fleet) return;
  const facts = [];
  const add = (k, v) => facts.push(el("dt", {}, k), el("dd", { class: "wrap" }, show(v)));
  add("instance", fleet.instance_id);
  add("in sync", fleet.in_sync ? "yes" : "no");
  if (fleet.divergence) add("divergence", fleet.divergence);
  add("revision", fleet.revision);
  $("fleet").replaceChildren(...facts);
  const r = fleet.rollout;
  const box = $("rollout");
  if (!r) { box.replaceChildren(el("p", { class: "muted" }, "no rollout")); return; }
  const head = el("p", {}, "rollout of revision ", el("strong", {}, show(r.revision)), ": ",
    el("span", { class: "badge small", "data-state": String(r.phase).toUpperCase() }, r.phase),
    r.canary ? " (canary " + r.canary + ")" : "");
  const rows = Object.entries(r.progress || {}).map(([inst, p]) =>
    el("tr", {}, el("th", { scope: "row", class: "wrap" }, inst),
      el("td", { class: p === "failed" ? "bad" : "good" }, p),
      el("td", { class: "wrap" }, (r.reasons || {})[inst] || "")));
  const lists = ["applying", "queued", "live"].filter((k) => (r[k] || []).length)
    .map((k) => el("p", { class: "wrap" }, el("span", { class: "muted" }, k + ": "),
      r[k].join(", ")));
  box.replaceChildren(head,
    el("div", { class: "scroll" }, el("table", {}, el("tbody", {}, ...rows))),
    ...lists, r.reason ? el("p", { class: "error" }, r.reason) : "");
}

// ---- change history -----------------------------------------------------------------

async function refreshChanges() {
  const note = $("changes-note");
  try {
    const r = await api("v1/changes?limit=20", { signal: session && session.signal });
    if (!r.ok) {
      note.hidden = false;
      note.textContent = r.status === 404 ? "This supervisor keeps no change history."
        : "Change history unavailable (HTTP " + r.status + ").";
      return;
    }
    note.hidden = true;
    const body = await r.json();
    fill($("changes").tBodies[0], (body.changes || []).map(changeRow));
  } catch (e) { /* shown by the token prompt or retried on the next event */ }
}

function changeRow(c) {
  const diff = Object.entries(c.diff || {}).map(([flag, v]) =>
    el("div", {}, el("code", {}, flag), " ",
      Array.isArray(v) ? show(v[0]) + " → " + show(v[1]) : show(v)));
  return el("tr", { "data-outcome": c.outcome || "" },
    el("td", {}, clock(c.time)), el("td", {}, c.id || c.change || ""),
    el("td", {}, el("span", { class: "badge small", "data-outcome": c.outcome }, c.outcome),
      c.error ? el("div", { class: "error wrap" }, c.error) : null),
    el("td", { class: "wrap" }, ...(diff.length ? diff : ["–"])),
    el("td", { class: "wrap" }, [c.source, c.client].filter(Boolean).join(" ")),
    el("td", {}, c.strategy || (c.restarted === false ? "no restart" : "–")),
    el("td", {}, c.duration_s === null || c.duration_s === undefined ? "–"
      : Number(c.duration_s).toFixed(2) + " s"));
}

// ---- events and logs ----------------------------------------------------------------

function describe(kind, e) {
  switch (kind) {
    case "state": return e.from + " → " + e.to + (e.error ? ": " + e.error : "");
    case "change": return "change " + (e.change || "") + " " + (e.outcome || "")
      + (e.error ? ": " + e.error : "");
    case "crash": return "llama-server " + (e.pid || "") + " " + (e.reason || "crashed")
      + (e.code !== undefined && e.code !== null ? " (code " + e.code + ")" : "")
      + (e.error ? ": " + e.error : "");
    case "ready": return "llama-server " + (e.pid || "") + " ready"
      + (e.load_s !== undefined ? " after " + Number(e.load_s).toFixed(1) + " s" : "");
    case "rollout": return "rollout " + (e.revision || "") + " " + (e.step || "")
      + " " + (e.phase || "");
    case "gap": return gapText(e, "events");
    default: return JSON.stringify(e);
  }
}

function gapText(gap, what) {
  if (gap.reset) return "the supervisor restarted: " + what + " from its start";
  return gap.missed ? gap.missed + " " + what + " missed" : "some " + what + " missed";
}

function onEvent(ev) {
  let data = {};
  try { data = JSON.parse(ev.data); } catch (e) { data = { text: ev.data }; }
  const kind = ev.event === "gap" ? "gap" : data.kind || ev.event;
  const list = $("events");
  list.prepend(el("li", { "data-kind": kind },
    el("time", {}, clock(data.time)), " ", el("span", { class: "kind" }, kind), " ",
    describe(kind, data)));
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  refreshStatus();
  if (kind === "change" || kind === "gap") refreshChanges();
}

let lastLogId = -1;

function addLogs(lines) {
  const pre = $("logs");
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  for (const l of lines) {
    if (typeof l.id === "number") {
      if (l.id <= lastLogId) continue;
      lastLogId = l.id;
    }
    pre.append(el("span", { class: "line", "data-source": l.source || "" },
      el("span", { class: "src" }, l.source === "corral" ? "corral " : ""), l.text, "\n"));
  }
  while (pre.childNodes.length > MAX_LOG_LINES) pre.firstChild.remove();
  if ($("follow").checked && atEnd) pre.scrollTop = pre.scrollHeight;
}

async function followLogs(signal) {
  try {
    const r = await api("v1/logs?tail=200", { signal });
    if (r.ok) addLogs(await r.json());
    else if (r.status === 404) {
      $("logs").textContent = "This supervisor serves no log stream.";
      return;
    }
  } catch (e) {
    if (e instanceof AuthError || signal.aborted) return;
  }
  // Resume after the tail's last line (the server would send its own tail otherwise).
  stream("v1/logs?follow=1", signal, (ev) => {
    let data;
    try { data = JSON.parse(ev.data); } catch (e) { data = { text: ev.data }; }
    if (ev.event === "gap") {
      if (data.reset) lastLogId = -1; // a new supervisor numbers its lines from 1 again
      addLogs([{ source: "corral", text: "… " + gapText(data, "lines") + " …" }]);
    } else {
      addLogs(Array.isArray(data) ? data : [data]);
    }
  }, () => {}, lastLogId >= 0 ? lastLogId : null);
}

function setLive(state, text) {
  const live = $("live");
  live.dataset.live = state;
  live.textContent = text;
}

// ---- the change form ----------------------------------------------------------------

function addRow(key = "", value = "") {
  const row = el("div", { class: "row kv" },
    el("input", { class: "key", placeholder: "flag, e.g. -np", "aria-label": "flag" }),
    el("input", { class: "value", placeholder: "value", "aria-label": "value" }),
    el("button", { type: "button", class: "remove", "aria-label": "remove row" }, "×"));
  row.querySelector(".key").value = key;
  row.querySelector(".value").value = value;
  row.querySelector(".remove").addEventListener("click", () => {
    row.remove();
    if (!$("rows").children.length) addRow();
  });
  $("rows").append(row);
}

function parseValue(text) {
  const t = text.trim();
  if (t === "true") return true;
  if (t === "false") return false;
  if (t === "null") return null;
  if (/^-?\d+$/.test(t)) return Number(t);
  return t;
}

function formBody() {
  if ($("as-json").checked) {
    const body = JSON.parse($("raw").value);
    if (!body || typeof body !== "object" || Array.isArray(body)) {
      throw new Error("give a JSON object like {\"args\": {\"-np\": 2}}");
    }
    return body.args ? body : { args: body };
  }
  const args = {};
  for (const row of $("rows").children) {
    const key = row.querySelector(".key").value.trim();
    if (!key) continue;
    args[key] = parseValue(row.querySelector(".value").value);
  }
  if (!Object.keys(args).length) throw new Error("give at least one flag");
  return { args };
}

async function submitChange(dryRun) {
  const out = $("outcome");
  let body;
  try {
    body = formBody();
  } catch (e) {
    showOutcome("error", "Not sent: " + e.message, []);
    return;
  }
  $("apply").disabled = $("dry-run").disabled = true;
  showOutcome("pending", dryRun ? "checking…" : "applying…", []);
  try {
    const r = await api("v1/params" + (dryRun ? "?dry_run=1" : ""), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const result = await r.json().catch(() => ({ error: "HTTP " + r.status }));
    const kind = result.status || (r.ok ? "applied" : "error");
    const lines = [];
    if (result.error) lines.push(result.error);
    if (kind === "applied") {
      lines.push(result.restarted ? "llama-server restarted (" + (result.strategy || "") + ")"
        : "nothing to restart");
      if (result.change_id) lines.push("change " + result.change_id);
    }
    for (const w of result.warnings || []) lines.push("warning: " + w);
    if (result.fit && result.fit.reason) lines.push("memory: " + result.fit.reason);
    if (result.strategy_reason) lines.push("swap: " + result.strategy_reason);
    showOutcome(kind, kind + (r.ok ? "" : " (HTTP " + r.status + ")"), lines,
      result.log || []);
    refreshStatus();
    if (!dryRun) refreshChanges();
  } catch (e) {
    if (!(e instanceof AuthError)) showOutcome("error", "failed: " + e.message, []);
    else out.hidden = true;
  } finally {
    $("apply").disabled = $("dry-run").disabled = false;
  }
}

function showOutcome(kind, title, lines, log = []) {
  const out = $("outcome");
  out.hidden = false;
  out.dataset.outcome = kind;
  out.replaceChildren(el("strong", { class: "verdict" }, title),
    ...lines.map((l) => el("p", { class: "wrap reason" }, l)),
    log.length ? el("pre", { class: "logs tail" }, log.join("\n")) : "");
}

// ---- token --------------------------------------------------------------------------

function askToken(why) {
  $("auth-why").textContent = why + " It is kept in this tab only (sessionStorage).";
  $("auth").hidden = false;
  $("main").classList.add("locked");
  setLive("off", "needs token");
  $("token").focus();
}

function saveToken(ev) {
  ev.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("auth").hidden = true;
  $("main").classList.remove("locked");
  start();
}

// ---- start --------------------------------------------------------------------------

function start() {
  if (session) session.abort();
  session = new AbortController();
  const signal = session.signal;
  lastLogId = -1;
  $("logs").replaceChildren();
  refreshStatus();
  refreshChanges();
  followLogs(signal);
  let first = true;
  stream("v1/events", signal, onEvent, (state) => {
    if (state === "live") {
      setLive("live", "live");
      // Anything may have happened while the stream was down.
      if (!first) { refreshStatus(); refreshChanges(); }
      first = false;
    } else {
      setLive("down", "reconnecting…");
      refreshStatus(); // without events, keep polling at the reconnect pace
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  addRow();
  $("add-row").addEventListener("click", () => addRow());
  $("as-json").addEventListener("change", () => {
    const json = $("as-json").checked;
    $("raw").hidden = !json;
    $("rows").hidden = json;
    $("add-row").disabled = json;
    if (json) {
      try { $("raw").value = JSON.stringify(formBody(), null, 1); } catch (e) { /* keep */ }
    }
  });
  $("change").addEventListener("submit", (ev) => { ev.preventDefault(); submitChange(false); });
  $("dry-run").addEventListener("click", () => submitChange(true));
  $("auth").addEventListener("submit", saveToken);
  setInterval(tickUptime, 1000);
  start();
});
