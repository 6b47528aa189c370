// FedMoE live dashboard: plain JS and hand-drawn SVG, no build step, no third-party code.
// Data comes from the authenticated API (/v1/status, /v1/metrics/...) with the token the
// page asks for (kept in sessionStorage, i.e. for this tab only). Every text from the
// network is inserted with textContent, never as HTML.
"use strict";

const REFRESH_MS = 3000;
const WINDOW_S = 300; // rates (updates/min, tokens/s) over the last 5 minutes
const ACTIVE_S = 60;
const MAX_ROWS = 20000;
const TOKEN_KEY = "fedmoe-token";
const SVG = "http://www.w3.org/2000/svg";
const KINDS = ["expert", "gateway", "routed"];

const state = { status: null, updates: [], evals: [], rejections: [], lastSeq: 0, lastEval: null };
const $ = (id) => document.getElementById(id);
let timer = null;

class Unauthorized extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized("token refused");
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// --- data ------------------------------------------------------------------------------------

async function refresh() {
  const evalSince = state.lastEval === null ? "" : `&since=${state.lastEval}`;
  const [status, updates, evals, rejections] = await Promise.all([
    api("/v1/status"),
    api(`/v1/metrics/updates?after=${state.lastSeq}&limit=5000`),
    api(`/v1/metrics/history?limit=5000${evalSince}`),
    api("/v1/metrics/rejections?limit=30"),
  ]);
  state.status = status;
  state.rejections = rejections;
  if (updates.length) {
    state.updates = state.updates.concat(updates.reverse()).slice(-MAX_ROWS);
    state.lastSeq = state.updates[state.updates.length - 1].seq;
  }
  const known = new Set(state.evals.map((row) => row.seq));
  const fresh = evals.filter((row) => !known.has(row.seq)).reverse();
  if (fresh.length) {
    state.evals = state.evals.concat(fresh).slice(-MAX_ROWS);
    state.lastEval = state.evals[state.evals.length - 1].created_at;
  }
}

function latestEval(expert, kind) {
  // token-weighted over each worker's latest report, as /metrics computes it
  const latest = new Map();
  for (const row of state.evals) {
    if (row.expert === expert && row.kind === kind) latest.set(row.worker_id, row);
  }
  let loss = 0, tokens = 0;
  for (const row of latest.values()) { loss += row.loss * row.tokens; tokens += row.tokens; }
  return tokens ? loss / tokens : null;
}

function federatedSeries(expert, kind) {
  // after each report: the token-weighted mean of every worker's latest loss (one worker:
  // its own losses), so several workers per domain draw one line, not a zigzag
  const latest = new Map();
  const points = [];
  for (const row of state.evals) {
    if (row.expert !== expert || row.kind !== kind) continue;
    latest.set(row.worker_id, row);
    let loss = 0, tokens = 0;
    for (const r of latest.values()) { loss += r.loss * r.tokens; tokens += r.tokens; }
    points.push([row.created_at, loss / tokens]);
  }
  return points;
}

function recentUpdates(now) {
  return state.updates.filter((row) => row.accepted && row.created_at >= now - WINDOW_S);
}

// --- rendering -------------------------------------------------------------------------------

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "" : Number(value).toFixed(digits);
}

function ago(seconds) {
  if (seconds < 90) return `${Math.max(0, Math.round(seconds))} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function fillTable(id, rows) {
  const body = $(id).querySelector("tbody");
  const fragment = document.createDocumentFragment();
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      const { text, cls, title } = typeof cell === "object" && cell !== null ? cell : { text: cell };
      td.textContent = text === null || text === undefined ? "" : String(text);
      if (cls) td.className = cls;
      if (title) td.title = title;
      tr.appendChild(td);
    }
    fragment.appendChild(tr);
  }
  body.replaceChildren(fragment);
}

function renderSummary(status, now) {
  const gateway = status.gateway;
  const workers = Object.values(status.workers);
  const active = workers.filter((w) => now - w.last_seen < ACTIVE_S).length;
  $("summary").textContent =
    `${Object.keys(status.experts).length} experts · gateway v${gateway.version} ` +
    `(${gateway.merge_method}, rank ${gateway.lora_rank}) · ${active}/${workers.length} ` +
    `workers active · base ${status.base_model}`;
  $("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function renderExperts(status, now) {
  const recent = recentUpdates(now);
  // per minute over the window, or over the time since the first update seen if shorter
  const first = state.updates.length ? state.updates[0].created_at : now;
  const minutes = Math.max(Math.min(WINDOW_S, now - first), 10) / 60;
  const rows = Object.entries(status.experts).map(([name, expert]) => {
    const count = recent.filter((row) => row.expert === name).length;
    const active = expert.workers.filter(
      (id) => status.workers[id] && now - status.workers[id].last_seen < ACTIVE_S).length;
    return [name, { text: expert.version, cls: "num" }, { text: expert.updates_applied, cls: "num" },
      { text: expert.updates_rejected, cls: "num" }, { text: fmt(count / minutes, 1), cls: "num" },
      `${active} / ${expert.workers.length}`, { text: fmt(latestEval(name, "expert")), cls: "num" },
      { text: fmt(latestEval(name, "gateway")), cls: "num" }];
  });
  fillTable("experts", rows);
}

function renderWorkers(status, now) {
  const recent = recentUpdates(now);
  const rows = Object.entries(status.workers).map(([id, w]) => {
    const mine = recent.filter((row) => row.worker_id === id);
    let rate = null;
    if (mine.length >= 2) {
      const span = mine[mine.length - 1].created_at - mine[0].created_at;
      const tokens = mine.slice(1).reduce((sum, row) => sum + row.num_tokens, 0);
      rate = span > 0 ? tokens / span : null;
    }
    const seen = now - w.last_seen;
    const cls = seen < ACTIVE_S ? "live" : seen < 5 * ACTIVE_S ? "idle" : "gone";
    return [id, w.specialty, { text: ago(seen), cls }, { text: fmt(rate, 0), cls: "num" },
      { text: fmt(w.last_train_loss), cls: "num" }, { text: w.last_staleness ?? "", cls: "num" },
      { text: w.updates, cls: "num" }, { text: w.tokens, cls: "num" },
      { text: w.dp_epsilon == null ? "no DP" : fmt(w.dp_epsilon), cls: "num" }];
  });
  rows.sort((a, b) => (a[1] + a[0]).localeCompare(b[1] + b[0]));
  fillTable("workers", rows);
}

function renderRejections(now) {
  if (!state.rejections.length) {
    fillTable("rejections", [["none since the coordinator started", "", "", "", "", ""]]);
    return;
  }
  fillTable("rejections", state.rejections.map((r) => [
    ago(now - r.time), r.expert, r.worker_id, r.status, r.reason,
    { text: r.detail, cls: "detail", title: r.detail }]));
}

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

function label(parent, x, y, text, anchor = "start") {
  el("text", { x, y, "text-anchor": anchor }, parent).textContent = text;
}

function lineChart(series, t0, t1) {
  // series: [{cls, points: [[t, y], ...], dots}]
  const W = 290, H = 150, L = 34, R = 6, T = 6, B = 18;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const values = series.flatMap((s) => s.points.map((p) => p[1]));
  if (!values.length) {
    label(svg, W / 2, H / 2, "no data yet", "middle");
    return svg;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.05; lo -= pad; hi += pad;
  const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, svg);
  el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }, svg);
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    label(svg, L - 3, y(v) + 3, v.toFixed(2), "end");
  }
  const span = t1 - t0;
  label(svg, L, H - 5, span < 120 ? `−${Math.round(span)} s` : `−${Math.round(span / 60)} min`);
  label(svg, W - R, H - 5, "now", "end");
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
    el("path", { d: d.join(""), class: s.cls }, svg);
    if (s.dots) for (const p of s.points) el("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.2, class: s.cls }, svg);
  }
  return svg;
}

function renderCharts(status, now) {
  const times = state.updates.map((r) => r.created_at).concat(state.evals.map((r) => r.created_at));
  const t0 = times.length ? Math.min(...times) : now - 60;
  const fragment = document.createDocumentFragment();
  for (const name of Object.keys(status.experts)) {
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.expert = name;
    const title = document.createElement("h3");
    title.textContent = name;
    box.appendChild(title);
    const train = state.updates
      .filter((r) => r.expert === name && r.accepted && r.train_loss !== null)
      .map((r) => [r.created_at, r.train_loss]);
    const series = [{ cls: "train", points: train, dots: false }];
    for (const kind of KINDS) {
      series.push({ cls: kind, points: federatedSeries(name, kind), dots: true });
    }
    const svg = lineChart(series, t0, now);
    svg.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
    box.appendChild(svg);
    fragment.appendChild(box);
  }
  $("charts").replaceChildren(fragment);
}

function renderStaleness() {
  const svg = $("staleness");
  svg.replaceChildren();
  const CAP = 20;
  const counts = new Array(CAP + 1).fill(0);
  const accepted = state.updates.filter((r) => r.accepted);
  for (const row of accepted) counts[Math.min(row.staleness, CAP)] += 1;
  const W = 360, H = 170, L = 30, B = 20, T = 8, R = 4;
  const top = Math.max(1, ...counts);
  const slot = (W - L - R) / counts.length;
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, svg);
  label(svg, L - 3, T + 8, String(top), "end");
  label(svg, L - 3, H - B, "0", "end");
  counts.forEach((count, tau) => {
    const h = (count / top) * (H - B - T);
    el("rect", { x: L + tau * slot + 1, y: H - B - h, width: slot - 2, height: h, class: "bar" }, svg)
      .appendChild(el("title", {})).textContent = `τ=${tau}${tau === CAP ? "+" : ""}: ${count}`;
    if (tau % 5 === 0) label(svg, L + (tau + 0.5) * slot, H - 6, tau === CAP ? `${CAP}+` : String(tau), "middle");
  });
  const mean = accepted.length ? accepted.reduce((s, r) => s + r.staleness, 0) / accepted.length : 0;
  $("staleness-note").textContent =
    `${accepted.length} accepted updates, mean τ ${mean.toFixed(2)}`;
}

function render() {
  const status = state.status;
  const now = Date.now() / 1000;
  renderSummary(status, now);
  renderExperts(status, now);
  renderCharts(status, now);
  renderStaleness();
  renderWorkers(status, now);
  renderRejections(now);
}

// --- control ---------------------------------------------------------------------------------

async function tick() {
  try {
    await refresh();
    render();
    $("error").hidden = true;
    $("dashboard").hidden = false;
    $("login").hidden = true;
    timer = setTimeout(tick, REFRESH_MS);
  } catch (error) {
    if (error instanceof Unauthorized) {
      sessionStorage.removeItem(TOKEN_KEY);
      askForToken("That token was refused. Enter a valid bearer token.");
      return;
    }
    $("error").textContent = `cannot reach the coordinator (${error.message}); retrying`;
    $("error").hidden = false;
    timer = setTimeout(tick, REFRESH_MS);
  }
}

function askForToken(message) {
  clearTimeout(timer);
  if (message) $("login-message").textContent = message;
  $("dashboard").hidden = true;
  $("login").hidden = false;
  $("token").focus();
}

async function start() {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    tick();
  });
  $("change-token").addEventListener("click", () => askForToken(null));
  const config = await (await fetch("auth.json", { cache: "no-store" })).json();
  $("change-token").hidden = !config.token_required;
  if (config.token_required && !sessionStorage.getItem(TOKEN_KEY)) askForToken(null);
  else tick();
}

start();
