"use strict";
// corral serve's page: the models table (GET /v1/status every second), load and unload
// buttons. Plain JS; the token (when the API needs one) is kept in this tab only.
const TOKEN_KEY = "corral.token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";
const $ = (id) => document.getElementById(id);

async function call(method, path) {
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch(path, { method, headers });
  if (r.status === 401 || r.status === 403) {
    $("auth").hidden = false;
    throw new Error("token needed");
  }
  return r.json();
}

function cell(text, attrs) {
  const td = document.createElement("td");
  td.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) td.setAttribute(k, v);
  return td;
}

function badge(state) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = "badge small";
  span.dataset.state = { loaded: "RUNNING", loading: "STARTING", unloading: "STOPPING",
    failed: "FATAL" }[state] || "UNKNOWN";
  span.textContent = state;
  td.appendChild(span);
  return td;
}

function button(model, action) {
  const b = document.createElement("button");
  b.textContent = action;
  b.dataset.model = model;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await call("POST", "/v1/models/" + encodeURIComponent(model) + "/" + action); }
    catch (e) { /* shown by the next refresh */ }
    refresh();
  });
  return b;
}

function render(s) {
  const body = $("models").querySelector("tbody");
  body.replaceChildren(...s.models.map((m) => {
    const tr = document.createElement("tr");
    tr.dataset.model = m.id;
    tr.append(cell(m.id + (m.aliases.length ? " (" + m.aliases.join(", ") + ")" : "")),
      badge(m.state), cell(m.pid || "–"),
      cell(m.memory_mib ? (m.memory_mib / 1024).toFixed(1) + " GiB" : "–"),
      cell(m.idle_s === null ? "–" : m.idle_s + " s"), cell(m.in_flight), cell(m.held),
      cell(m.loads));
    const actions = document.createElement("td");
    actions.append(button(m.id, m.state === "loaded" ? "unload" : "load"));
    tr.append(actions);
    if (m.reason) tr.title = m.reason;
    return tr;
  }));
  const l = s.limits;
  const memory = Object.entries(l.max_memory_mib).map(([d, mib]) => d + " " +
    (mib / 1024).toFixed(1) + " GiB").join(", ");
  $("limits").textContent = (memory || "memory unknown") +
    (l.max_models ? " · at most " + l.max_models + " loaded" : "") +
    " · max wait " + l.max_wait_s + " s";
  $("evictions").textContent = s.evictions.length ? s.evictions.map((e) =>
    e.model + ": " + e.count + " × " + e.reason).join(" · ") : "none yet";
}

async function refresh() {
  try {
    render(await call("GET", "/v1/status"));
    $("live").dataset.live = "live";
    $("live").textContent = "live";
    $("error").hidden = true;
  } catch (e) {
    $("live").dataset.live = "down";
    $("live").textContent = "not reachable";
  }
}

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("auth").hidden = true;
  refresh();
});
refresh();
setInterval(refresh, 1000);
