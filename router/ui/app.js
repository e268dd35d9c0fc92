// The kvrouter dashboard. Plain JS, no build step, no third-party code: it
// reads the router's own API (the same answers any client gets) and draws them.
//
// The first picture comes from one fetch of /health/all, drawn before the load
// event; only then does the page open its event stream and start polling.
//
// Truth comes from two sources: a poll of /health/all and /traffic/stats every
// POLL_MS (complete, but up to POLL_MS old) and /events (immediate, but only
// changes). An event's state wins over a poll that was sent before the event
// arrived, so a slow poll never shows a model going back in time.
"use strict";

const POLL_MS = 2000;
const USAGE_MS = 10000;        // the usage panel's hour changes slowly: GET /usage every 10 s
const HISTORY = 90;            // chart samples kept per model (3 minutes at POLL_MS)
const MAX_EVENTS = 60;         // event list length
const MAX_LOG_LINES = 2000;    // log pane length
const KEY_STORE = "kvrouter.adminKey";
const LIVE_STATES = new Set(["RUNNING", "STARTING"]);

const ui = {
  health: null,                // last /health/all, patched by events
  traffic: {},                 // model -> last /traffic/stats entry
  history: new Map(),          // model -> [{t, rate}]
  lastTotals: new Map(),       // model -> {t, total} of the previous poll
  eventAt: new Map(),          // model -> performance.now() of its last state event
  cards: new Map(),            // model -> card view
  admin: false,
  keyConfigured: false,
  caps: { residency: false },
  residency: null,
  busy: new Set(),             // models with an action in flight
  log: null,                   // {name, controller}
  usage: null,                 // {model, key}: the last hour's GET /usage by each, or {error}
  usageAt: -Infinity,          // performance.now() of the last /usage fetch
};

// ------------------------------------------------------------------ helpers

/** A DOM element from a tag, attributes and children; text is always text, never markup. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined && c !== false) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

/** Replace a node's children only when what they show changed, so clicks and selections survive polls. */
function renderInto(node, signature, build) {
  if (node.dataset.sig === signature) return;
  node.dataset.sig = signature;
  node.replaceChildren(...build());
}

function adminKey() { return sessionStorage.getItem(KEY_STORE); }

function authHeaders() {
  const key = adminKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function getJSON(path, auth) {
  const r = await fetch(path, { headers: auth ? authHeaders() : {}, cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

/** The OpenAI-shaped error message of a failed answer, or its status. */
async function errorText(r) {
  try {
    const body = await r.json();
    return (body.error && body.error.message) || body.message || `HTTP ${r.status}`;
  } catch (_) {
    return `HTTP ${r.status}`;
  }
}

function notice(text, bad) {
  const n = document.getElementById("notice");
  n.textContent = text;
  n.hidden = !text;
  n.classList.toggle("bad", !!bad);
}

function fmtRate(r) { return r >= 10 ? r.toFixed(0) : r >= 1 ? r.toFixed(1) : r.toFixed(2); }

function fmtDuration(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d`;
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

/** Model names may hold slashes: the router takes them raw or as %2F; send them encoded. */
function modelPath(prefix, model) { return prefix + encodeURIComponent(model); }

// -------------------------------------------------------------- admin rule

/** Ask the router whether this browser (its address, or the key it holds) passes the admin rule. */
async function whoami() {
  try {
    const me = await getJSON("/ui/whoami", true);
    ui.admin = me.admin;
    ui.keyConfigured = me.admin_key_configured;
    if (!me.admin && adminKey()) {
      sessionStorage.removeItem(KEY_STORE);
      notice("The router refused that admin key.", true);
    }
    const role = document.getElementById("role");
    role.textContent = me.admin ? "admin" : "viewer";
    role.classList.toggle("on", me.admin);
    role.title = me.admin ? "sleep, wake and logs are enabled" : (me.reason || "");
    document.getElementById("key").hidden = me.admin || !me.admin_key_configured;
    document.getElementById("key-use").hidden = me.admin || !me.admin_key_configured;
    document.getElementById("key-forget").hidden = !adminKey();
  } catch (e) {
    ui.admin = false;
  }
  renderAll();
}

function setupAdminForm() {
  const form = document.getElementById("admin");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("key");
    const key = input.value.trim();
    input.value = "";
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    notice("");
    ui.usageAt = -Infinity;  // the usage panel asks again at the next poll, with the key
    whoami();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    ui.usageAt = -Infinity;
    whoami();
  });
}

async function act(action, model) {
  ui.busy.add(model);
  renderAll();
  notice(`${action} ${model}…`);
  try {
    const r = await fetch(modelPath(`/action/${action}/`, model), { method: "POST", headers: authHeaders() });
    notice(r.ok ? "" : `${action} ${model} failed: ${await errorText(r)}`, !r.ok);
  } catch (e) {
    notice(`${action} ${model} failed: ${e.message}`, true);
  } finally {
    ui.busy.delete(model);
    refresh();
  }
}

// ------------------------------------------------------------------ polling

async function refresh() {
  const sent = performance.now();
  let health, traffic;
  try {
    [health, traffic] = await Promise.all([getJSON("/health/all"), getJSON(`/traffic/stats?window=60`)]);
  } catch (e) {
    notice(`The router does not answer: ${e.message}`, true);
    return;
  }
  if (document.getElementById("notice").textContent.startsWith("The router does not answer")) notice("");
  keepNewerEvents(health, sent);
  ui.health = health;
  ui.traffic = traffic.traffic_stats || {};
  sample(sent);
  if (ui.caps.residency) ui.residency = await getJSON("/residency").catch(() => null);
  if (performance.now() - ui.usageAt >= USAGE_MS) {
    ui.usageAt = performance.now();
    ui.usage = await fetchUsage();
  }
  renderAll();
}

/** The last hour's GET /usage by model and by key (an admin endpoint: the typed key is sent). */
async function fetchUsage() {
  try {
    const [model, key] = await Promise.all(["model", "key"].map((by) => getJSON(`/usage?window=3600&by=${by}`, true)));
    return { model, key };
  } catch (e) {
    return { error: e.message };
  }
}

/** A model whose state event arrived after this poll was sent keeps the event's state. */
function keepNewerEvents(health, sent) {
  if (!ui.health) return;
  for (const [name, report] of Object.entries(health.models)) {
    const old = ui.health.models[name];
    if (old && (ui.eventAt.get(name) || 0) > sent) {
      report.status = old.status;
      if (report.sleep && old.sleep) report.sleep.state = old.sleep.state;
    }
  }
}

/** One chart point per model: requests since the previous poll over the time between them. */
function sample(now) {
  for (const [name, stats] of Object.entries(ui.traffic)) {
    const prev = ui.lastTotals.get(name);
    const total = stats.total_requests;
    ui.lastTotals.set(name, { t: now, total });
    if (!prev) continue;
    const rate = Math.max(0, total - prev.total) / Math.max(0.001, (now - prev.t) / 1000);
    const h = ui.history.get(name) || [];
    h.push(rate);
    if (h.length > HISTORY) h.shift();
    ui.history.set(name, h);
  }
}

async function probeResidency() {
  try {
    const r = await fetch("/residency", { cache: "no-store" });
    ui.residency = r.ok ? await r.json() : null;
    // The memory panel is for budgets: a router without a residency block reports none.
    const budgets = ui.residency ? [ui.residency.host, ...Object.values(ui.residency.gpus || {})] : [];
    ui.caps.residency = budgets.some((b) => b && b.budget_gb != null);
  } catch (_) {
    ui.caps.residency = false;
  }
}

// ------------------------------------------------------------------- events

function followEvents() {
  const live = document.getElementById("live");
  const source = new EventSource("/events");
  source.onopen = () => { live.textContent = "live"; live.className = "pill on"; };
  source.onerror = () => { live.textContent = "reconnecting"; live.className = "pill off"; };
  source.onmessage = (msg) => {
    let ev;
    try { ev = JSON.parse(msg.data); } catch (_) { return; }
    showEvent(ev);
    applyEvent(ev);
  };
}

/** Patch the last poll with one event, so the page changes now rather than at the next poll. */
function applyEvent(ev) {
  const report = ui.health && ev.model ? ui.health.models[ev.model] : null;
  if (ev.kind === "reload") { refresh(); whoami(); return; }
  if (!report) return;
  if (ev.kind === "model" && !ev.state.endsWith("_failed")) {
    ui.eventAt.set(ev.model, performance.now());
    if (report.sleep) report.sleep.state = ev.state;
    report.status = ev.state === "awake" ? "unknown" : ev.state;
    if (ev.state === "awake") setTimeout(refresh, 100);  // its health comes from a probe
  } else if (ev.kind === "model") {
    setTimeout(refresh, 100);
  }
  const ep = (report.endpoints || []).find((e) => e.instance === ev.instance);
  if (ep && ev.kind === "health") ep.routing_state = ev.state;
  if (ep && ev.kind === "process") ep.process = Object.assign({}, ep.process, { state: ev.state });
  renderAll();
}

function showEvent(ev) {
  const list = document.getElementById("events");
  const bad = /failed|unhealthy|refused|FATAL|BACKOFF|EXITED/.test(ev.state);
  const who = [ev.model, ev.instance].filter(Boolean).join(" / ");
  list.prepend(el("li", { class: bad ? "bad" : "" },
    el("time", {}, fmtTime(ev.time)), " ", el("b", {}, ev.kind), " ", el("span", { class: "state" }, ev.state),
    who ? el("span", { class: "who" }, " " + who) : null));
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

// ---------------------------------------------------------------- rendering

function renderAll() {
  if (!ui.health) return;
  const models = Object.entries(ui.health.models);
  const container = document.getElementById("models");
  const seen = new Set();
  for (const [name, report] of models) {
    seen.add(name);
    let card = ui.cards.get(name);
    if (!card) {
      card = makeCard(name);
      ui.cards.set(name, card);
    }
    container.append(card.root);  // keeps the router's order; moving a node keeps its state
    updateCard(card, report, ui.traffic[name] || {});
  }
  for (const [name, card] of ui.cards) {
    if (!seen.has(name)) { card.root.remove(); ui.cards.delete(name); }
  }
  renderSummary(models);
  renderLogChoices(models);
  renderResidency();
  renderUsage();
}

const USAGE_FIELDS = [["requests", "requests"], ["prompt_tokens", "prompt tokens"],
  ["completion_tokens", "completion tokens"], ["errors", "errors"], ["rate_limited", "429s"]];

/** Tokens per model and per key over the last hour, as GET /usage answers them. */
function renderUsage() {
  const body = document.getElementById("usage-body");
  const usage = ui.usage;
  renderInto(body, JSON.stringify(usage), () => {
    if (!usage) return ["loading…"];
    if (usage.error) return [el("p", {}, `usage unavailable (${usage.error}); GET /usage is an admin endpoint`)];
    return ["model", "key"].map((by) => {
      const rows = Object.entries(usage[by].usage);
      return el("table", { class: "usage-table", dataset: { by } },
        el("thead", {}, el("tr", {}, el("th", {}, by), ...USAGE_FIELDS.map(([, label]) => el("th", {}, label)))),
        el("tbody", {}, rows.length ? rows.map(([name, counts]) => el("tr", { dataset: { name } },
          el("th", {}, name), ...USAGE_FIELDS.map(([f]) => el("td", { dataset: { field: f } }, counts[f]))))
          : el("tr", {}, el("td", { colspan: USAGE_FIELDS.length + 1 }, "no requests"))),
        el("tfoot", {}, el("tr", { dataset: { name: "total" } }, el("th", {}, "total"),
          ...USAGE_FIELDS.map(([f]) => el("td", { dataset: { field: f } }, usage[by].total[f])))));
    });
  });
}

function renderSummary(models) {
  const asleep = models.filter(([, r]) => r.sleep && r.sleep.state !== "awake").length;
  const rate = Object.values(ui.traffic).reduce((s, t) => s + (t.request_rate || 0), 0);
  document.getElementById("summary").textContent =
    `${models.length} model${models.length === 1 ? "" : "s"} · ${asleep} asleep · ${fmtRate(rate)} req/s`;
}

function makeCard(name) {
  const field = (label, role) => {
    const value = el("dd", { dataset: { role } });
    return { value, nodes: [el("dt", {}, label), value] };
  };
  const f = {
    inflight: field("in flight", "in-flight"), waiting: field("waiting", "waiting"),
    rate: field("req/s (60 s)", "rate"), total: field("requests", "total"),
  };
  const canvas = el("canvas", { class: "chart", height: "56", "aria-label": `request rate of ${name}` });
  const card = {
    name,
    state: el("span", { class: "badge" }),
    health: el("span", { class: "badge" }),
    actions: el("div", { class: "actions" }),
    replicas: el("tbody", {}),
    residency: el("div", { class: "bars" }),
    canvas,
    fields: f,
  };
  card.root = el("article", { class: "card", dataset: { model: name } },
    el("header", {}, el("h2", { title: name }, name), card.state, card.health),
    el("dl", { class: "stats" }, Object.values(f).map((x) => x.nodes)),
    canvas,
    card.residency,
    el("table", { class: "replicas" },
      el("thead", {}, el("tr", {}, ["replica", "health", "process", "in flight", ""].map((h) => el("th", {}, h)))),
      card.replicas),
    card.actions);
  return card;
}

function updateCard(card, report, stats) {
  const sleep = report.sleep || {};
  const state = sleep.state || "awake";
  card.root.dataset.state = state;
  card.state.textContent = state;
  card.state.className = `badge state-${state}`;
  const health = state === "awake" ? report.status : "";
  card.health.textContent = health;
  card.health.hidden = !health;
  card.health.className = `badge health-${health}`;
  card.fields.inflight.value.textContent = sleep.in_flight ?? "–";
  card.fields.waiting.value.textContent = sleep.waiting ?? "–";
  card.fields.rate.value.textContent = fmtRate(stats.request_rate || 0);
  card.fields.total.value.textContent = stats.total_requests ?? 0;
  drawChart(card.canvas, ui.history.get(card.name) || []);
  renderReplicas(card, report.endpoints || []);
  renderActions(card, report, state);
  const res = report.residency;
  card.residency.hidden = !res;
  if (res) renderInto(card.residency, JSON.stringify(res), () => budgetBars(res, ""));
}

function renderReplicas(card, endpoints) {
  renderInto(card.replicas, JSON.stringify([endpoints, ui.log && ui.log.name]), () => endpoints.map((ep) => {
    const p = ep.process;
    const procText = p ? [p.state, p.pid ? `pid ${p.pid}` : "", fmtDuration(p.uptime_seconds)].filter(Boolean).join(" ") : "–";
    const following = ui.log && ui.log.name === ep.instance;
    return el("tr", { dataset: { instance: ep.instance } },
      el("td", { title: ep.endpoint }, ep.instance),
      el("td", {}, el("span", { class: `dot health-${ep.status} state-${ep.status}` }), ep.status),
      el("td", { title: p ? p.description || "" : "not supervised", class: p && !LIVE_STATES.has(p.state) ? "bad" : "" }, procText),
      el("td", {}, ep.outstanding),
      el("td", {}, el("button", {
        class: "link" + (following ? " on" : ""), type: "button", title: "follow this engine's log",
        onclick: () => followLog(ep.instance),
      }, "log")));
  }));
}

function renderActions(card, report, state) {
  const busy = ui.busy.has(card.name);
  const sleep = report.sleep || {};
  const procs = (report.endpoints || []).map((e) => e.process).filter(Boolean);
  const running = procs.length ? procs.some((p) => LIVE_STATES.has(p.state)) : null;
  const button = (action, label, enabled, title) => el("button", {
    type: "button", dataset: { action }, disabled: busy || !enabled, title,
    onclick: () => act(action, card.name),
  }, label);
  const buttons = [];
  if (ui.admin) {
    if (state === "sleeping") buttons.push(button("wakeup", "Wake", true, "wake every replica"));
    else buttons.push(button("sleep", "Sleep", state === "awake" && sleep.sleepable !== false,
      sleep.sleepable === false ? "a replica is sleep: false or has no sleep API" : "drain, then sleep every replica"));
    if (sleep.stoppable) {  // the router runs this model's engines under supervisord: it can start and stop them
      if (running !== true) buttons.push(button("start", "Start", true, "start the engines"));
      if (running !== false) buttons.push(button("stop", "Stop", true, "stop the engines"));
    }
  }
  renderInto(card.actions, JSON.stringify([ui.admin, sleep.stoppable, state, busy, running, sleep.sleepable]),
    () => buttons);
  card.actions.hidden = !buttons.length;
}

/** A sparkline of the request rate, scaled to the canvas's CSS size and the screen's pixel density. */
function drawChart(canvas, points) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
  if (canvas.height !== Math.round(h * dpr)) canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const css = getComputedStyle(canvas);
  const max = Math.max(1, ...points) * 1.15;
  const step = w / (HISTORY - 1);
  const x0 = w - (points.length - 1) * step;
  const y = (v) => h - 2 - (v / max) * (h - 14);
  // The baseline spans the whole width, so a page opened a moment ago does not draw a sliver.
  ctx.beginPath();
  ctx.moveTo(0, y(0));
  ctx.lineTo(w, y(0));
  ctx.strokeStyle = css.getPropertyValue("--line");
  ctx.lineWidth = 1;
  ctx.stroke();
  if (points.length > 1) {
    ctx.beginPath();
    ctx.moveTo(x0, y(0));
    points.forEach((v, i) => ctx.lineTo(x0 + i * step, y(v)));
    ctx.lineTo(w, y(0));
    ctx.closePath();
    ctx.fillStyle = css.getPropertyValue("--chart-fill");
    ctx.fill();
    ctx.beginPath();
    points.forEach((v, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x0 + i * step, y(v)));
    ctx.strokeStyle = css.getPropertyValue("--chart-line");
    ctx.lineWidth = 1.5;
    ctx.stroke();
  }
  ctx.fillStyle = css.getPropertyValue("--muted");
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.fillText(`${fmtRate(points.length ? points[points.length - 1] : 0)} req/s now · peak ${fmtRate(Math.max(0, ...points))}`, 4, 2);
}

// ------------------------------------------------------- memory and budgets

const USED = /^(used|resident|allocated|usage)(_|$)|_used(_|$)/;
const BUDGET = /^(budget|limit|capacity|total)(_|$)|_(budget|limit|capacity|total)(_|$)/;

/**
 * Bars for every object in `data` that has a "used" number and a "budget" number, named by its path.
 * The residency API is young: reading it by field-name shape keeps the page working as it grows.
 */
function budgetBars(data, path) {
  if (!data || typeof data !== "object") return [];
  const nums = Object.entries(data).filter(([, v]) => typeof v === "number");
  const used = nums.find(([k]) => USED.test(k));
  const budget = nums.find(([k]) => BUDGET.test(k));
  const bars = [];
  if (used && budget) bars.push(bar(path || "total", used, budget));
  for (const [k, v] of Object.entries(data)) {
    if (v && typeof v === "object") bars.push(...budgetBars(v, path ? `${path} / ${k}` : k));
  }
  return bars;
}

function bar(label, [usedKey, used], [budgetKey, budget]) {
  const asBytes = (k, v) => /bytes/.test(k) || v > 1e6 ? fmtBytes(v) : /gib|gb/.test(k) ? `${v} GiB` :
    /mib|mb/.test(k) ? `${v} MiB` : String(v);
  const pct = budget > 0 ? Math.min(100, (100 * used) / budget) : 0;
  const over = budget > 0 && used > budget;
  const fill = el("span", { class: "bar-fill" });
  fill.style.width = `${pct.toFixed(1)}%`;  // through the CSSOM: the page's CSP refuses style attributes
  return el("div", { class: "bar" + (over ? " over" : "") },
    el("span", { class: "bar-label" }, label),
    el("span", { class: "bar-track" }, fill),
    el("span", { class: "bar-value" }, `${asBytes(usedKey, used)} / ${asBytes(budgetKey, budget)}`));
}

function renderResidency() {
  const panel = document.getElementById("residency");
  panel.hidden = !(ui.caps.residency && ui.residency);
  if (!panel.hidden) {
    renderInto(document.getElementById("residency-body"), JSON.stringify(ui.residency),
      () => { const b = budgetBars(ui.residency, ""); return b.length ? b : [el("p", {}, "no budgets reported")]; });
  }
}

// --------------------------------------------------------------------- logs

function renderLogChoices(models) {
  const pick = document.getElementById("log-pick");
  const names = models.flatMap(([m, r]) => (r.endpoints || []).map((e) => [e.instance, `${m} / ${e.instance}`]));
  renderInto(pick, JSON.stringify([names, ui.log && ui.log.name]), () => [
    el("option", { value: "" }, "(choose an engine)"),
    ...names.map(([value, label]) => el("option", { value, selected: ui.log && ui.log.name === value }, label)),
  ]);
}

/** Follow one engine's log over GET /logs/{name}/stream (SSE read by fetch, so the admin key can be sent). */
async function followLog(name) {
  if (ui.log) ui.log.controller.abort();
  const pane = document.getElementById("log");
  if (!name) { ui.log = null; pane.textContent = "Choose an engine to follow its log."; renderAll(); return; }
  const controller = new AbortController();
  ui.log = { name, controller };
  renderAll();
  pane.textContent = `following ${name}…\n`;
  let r;
  try {
    r = await fetch(`/logs/${encodeURIComponent(name)}/stream`,
      { headers: authHeaders(), signal: controller.signal, cache: "no-store" });
  } catch (e) {
    if (!controller.signal.aborted) pane.textContent = `logs unavailable: ${e.message}`;
    return;
  }
  const type = r.headers.get("content-type") || "";
  if (!r.ok || !type.startsWith("text/event-stream")) {
    pane.textContent = `logs unavailable (${r.ok ? "not a log stream" : await errorText(r)})`;
    return;
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const frames = buffer.split(/\r?\n\r?\n/);
      buffer = frames.pop();
      appendLog(pane, frames.map(logText).filter((t) => t !== null));
    }
    appendLog(pane, ["— log stream ended —"]);
  } catch (e) {
    if (!controller.signal.aborted) appendLog(pane, [`— log stream broke: ${e.message} —`]);
  }
}

/** The text of one SSE frame: a JSON payload's line/text field, or the raw data. */
function logText(frame) {
  const data = frame.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
  if (!data.length) return null;
  const raw = data.join("\n");
  try {
    const obj = JSON.parse(raw);
    if (obj && typeof obj === "object") return obj.line ?? obj.text ?? obj.message ?? raw;
  } catch (_) { /* plain text */ }
  return raw;
}

function appendLog(pane, lines) {
  if (!lines.length) return;
  const atBottom = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
  pane.append(lines.join("\n") + "\n");
  const text = pane.textContent.split("\n");
  if (text.length > MAX_LOG_LINES) pane.textContent = text.slice(-MAX_LOG_LINES).join("\n");
  if (atBottom) pane.scrollTop = pane.scrollHeight;
}

// -------------------------------------------------------------------- start

/** A 1x1 transparent GIF: an image that loads from memory, allowed by the page's img-src. */
const PIXEL = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";

/**
 * Hold the page's load event until `promise` settles. A loading image holds it; each one starts
 * the next from its own load handler, before the browser lets go of the last, so there is never
 * a moment with none. Whatever waits for "loaded" (a headless --screenshot, a test) then sees
 * what the promise drew.
 */
function holdLoadEvent(promise) {
  let settled = false;
  promise.finally(() => { settled = true; });
  let n = 0;
  const next = () => {
    if (settled) return;
    const img = new Image();
    img.onload = img.onerror = next;
    img.src = `${PIXEL}#${n++}`;
  };
  next();
  return promise;
}

/**
 * The first picture, from one fetch of /health/all, drawn before the page asks for anything
 * else or opens its event stream, and before its load event: the models show as soon as the
 * page has loaded (a slow link, a headless screenshot) rather than an empty frame.
 */
async function firstSnapshot() {
  try {
    ui.health = await getJSON("/health/all");
  } catch (e) {
    notice(`The router does not answer: ${e.message}`, true);
    return;
  }
  renderAll();
}

/** Everything after the first picture: the event stream, then the full poll, then the admin rule. */
async function follow() {
  followEvents();
  await probeResidency();
  await refresh();
  await whoami();
  setInterval(refresh, POLL_MS);
}

setupAdminForm();
document.getElementById("log-pick").addEventListener("change", (ev) => followLog(ev.target.value));
window.addEventListener("resize", () => renderAll());
holdLoadEvent(firstSnapshot()).then(follow);
