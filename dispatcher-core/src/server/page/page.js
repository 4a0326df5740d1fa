// The job page: polls the server's own /status once a second (an answer up
// to a second old will do, so any number of open pages cost the server one
// answer a second) and shows it. Everything it shows is set as text, never
// as markup: worker names and failed lines come from outside.
"use strict";

const POLL_MS = 1000;
const HISTORY_EVERY = 15; // polls between fetches of the whole history

let token = null; // kept in this tab's memory only
let history = []; // [{secs, lines_done, tokens}]
let polls = 0;
// Bumped by each start and stop: a polling loop runs while it is its own.
let generation = 0;

const $ = (id) => document.getElementById(id);
const text = (id, value) => { $(id).textContent = value; };

function fmtInt(n) {
  return Number(n || 0).toLocaleString("en-US");
}

function fmtNum(x) {
  if (x >= 100) return fmtInt(Math.round(x));
  if (x >= 10) return x.toFixed(1);
  return x.toFixed(2);
}

function fmtDuration(secs) {
  if (secs == null || !isFinite(secs)) return "–";
  secs = Math.round(secs);
  const d = Math.floor(secs / 86400), h = Math.floor(secs / 3600) % 24;
  const m = Math.floor(secs / 60) % 60, s = secs % 60;
  if (d > 0) return `${d} d ${h} h`;
  if (h > 0) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m > 0) return `${m} min ${String(s).padStart(2, "0")} s`;
  return `${s} s`;
}

function fmtMoney(x) {
  return x < 1 ? x.toFixed(4) : x.toFixed(2);
}

async function fetchStatus(withHistory) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const url = "/status?max_age=1" + (withHistory ? "&history=1" : "");
  const response = await fetch(url, { headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    return { unauthorized: true };
  }
  if (!response.ok) {
    throw new Error(`the server answered ${response.status}`);
  }
  return { status: await response.json() };
}

function showLogin(message) {
  $("job").hidden = true;
  $("login").hidden = false;
  text("headline", "access token needed");
  text("login-error", message || "");
  $("token").focus();
}

async function poll() {
  const withHistory = polls % HISTORY_EVERY === 0;
  let answer;
  try {
    answer = await fetchStatus(withHistory);
  } catch (e) {
    text("headline", `server not reachable (${e.message}); trying again`);
    return;
  }
  if (answer.unauthorized) {
    stop();
    showLogin(token ? "The server refused this token." : "");
    return;
  }
  polls += 1;
  $("login").hidden = true;
  $("job").hidden = false;
  const s = answer.status;
  if (s.history) {
    history = s.history;
  } else {
    history.push({ secs: s.uptime_secs, lines_done: s.lines_done, tokens: s.tokens });
  }
  render(s);
}

function render(s) {
  const total = s.lines_total;
  const done = s.lines_done;
  text("headline", s.complete ? "complete" : `running · ${fmtInt(s.in_flight)} lines in flight`);
  document.title = total ? `${Math.floor((100 * done) / Math.max(total, 1))}% · dispatcher` : "dispatcher";
  text("done", fmtInt(done));
  text("total", total == null ? "?" : fmtInt(total));
  $("bar").style.width = total ? `${(100 * done) / Math.max(total, 1)}%` : "0";
  const r = s.rates || {};
  text("rate", `${fmtNum(r.lines_per_sec || 0)} lines/s`);
  text("eta", s.complete ? "done" : fmtDuration(s.eta_secs));
  text("uptime", fmtDuration(s.uptime_secs));
  text("inflight", fmtInt(s.in_flight));
  text("reorder", fmtInt(s.reorder_buffer));

  const t = s.tokens || {};
  text("tokens-total", `${fmtInt((t.prompt_tokens || 0) + (t.completion_tokens || 0))} tokens`);
  text("tok-in", `${fmtInt(t.prompt_tokens)} · ${fmtNum(r.prompt_tokens_per_sec || 0)}/s`);
  text("tok-out", `${fmtInt(t.completion_tokens)} · ${fmtNum(r.completion_tokens_per_sec || 0)}/s`);
  text("tok-req", fmtInt(t.requests));
  const hasCost = !!s.cost;
  $("cost-label").hidden = !hasCost;
  $("cost").hidden = !hasCost;
  if (hasCost) {
    const projected = s.cost.projected == null ? "" : ` of ~${fmtMoney(s.cost.projected)} projected`;
    text("cost", `${fmtMoney(s.cost.so_far)}${projected}`);
  }
  text("journal", `${fmtInt(s.journal_replayed)} requests · ${fmtInt(s.journal_tokens_saved)} tokens saved`);

  renderChart();
  renderShards(s.shards || []);
  renderWorkers(s.workers || [], s.workers_unlisted || 0);
  renderFailures(s.failed_by_kind || {}, s.failure_examples || {}, s.failed_unlisted || 0);

  const re = s.reissues || {};
  text("re-timeout", fmtInt(re.timeout));
  text("re-release", fmtInt(re.release));
  text("re-retry", fmtInt(re.retry));
  text("tombstones", fmtInt(s.tombstones));
  text("backups", fmtInt(s.backups_issued));
  const b = s.blocking;
  const waiting = b && b.waiting_lines === 1 ? "1 line" : b && `${fmtInt(b.waiting_lines)} lines`;
  text("blocking", b ? `line ${b.work_id} (${b.state}, ${fmtDuration(b.age_secs)}) holds back ${waiting}` : "none");
}

function cell(row, value, className) {
  const td = document.createElement("td");
  td.textContent = value;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

// Every live worker and the last 100 gone (the server leaves out the
// others, counted in `unlisted`).
function renderWorkers(workers, unlisted) {
  const body = document.createElement("tbody");
  body.id = "workers";
  const counts = {};
  for (const w of workers) {
    counts[w.state] = (counts[w.state] || 0) + 1;
    const hello = w.hello || {};
    const row = document.createElement("tr");
    row.dataset.worker = w.worker;
    // Long names are cut (in full on hover), so that `state` stays in view.
    for (const value of [hello.host || w.worker, hello.task, hello.model, hello.engine]) {
      cell(row, value || "–", "cut").title = value || "";
    }
    cell(row, fmtInt(w.lines_done), "num");
    cell(row, fmtInt(w.in_flight), "num");
    cell(row, w.tokens_per_sec == null ? "–" : fmtNum(w.tokens_per_sec), "num");
    cell(row, `${fmtDuration(w.last_contact_secs)} ago`, "num");
    cell(row, w.state || "–", `st-${w.state}`);
    body.appendChild(row);
  }
  $("workers").replaceWith(body);
  const summary = Object.entries(counts).map(([k, v]) => `${fmtInt(v)} ${k}`).join(", ");
  const more = unlisted ? `; ${fmtInt(unlisted)} more gone, not listed` : "";
  text("worker-count", workers.length || unlisted ? `(${summary}${more})` : "(none yet)");
}

// Shards being written first, then those not started, then finished ones;
// at most SHARD_ROWS rows.
const SHARD_ROWS = 100;

function renderShards(shards) {
  $("shards-section").hidden = shards.length === 0;
  if (shards.length === 0) return;
  const rank = (sh) => (sh.done === sh.lines ? 2 : sh.done > 0 ? 0 : 1);
  const shown = shards
    .map((sh, i) => ({ ...sh, i }))
    .sort((a, b) => rank(a) - rank(b) || a.i - b.i)
    .slice(0, SHARD_ROWS);
  const body = document.createElement("tbody");
  body.id = "shards";
  for (const sh of shown) {
    const row = document.createElement("tr");
    cell(row, sh.path);
    cell(row, fmtInt(sh.done), "num");
    cell(row, fmtInt(sh.lines), "num");
    const td = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${sh.lines ? (100 * sh.done) / sh.lines : 100}%`;
    bar.appendChild(fill);
    td.appendChild(bar);
    row.appendChild(td);
    body.appendChild(row);
  }
  $("shards").replaceWith(body);
  const complete = shards.filter((sh) => sh.done === sh.lines).length;
  const more = shards.length > SHARD_ROWS ? `; ${shards.length - SHARD_ROWS} not listed` : "";
  text("shard-count", `(${complete} of ${shards.length} complete${more})`);
}

function renderFailures(byKind, examples, unlisted) {
  const body = document.createElement("tbody");
  body.id = "failures";
  const kinds = Object.keys(byKind).sort((a, b) => byKind[b] - byKind[a]);
  for (const kind of kinds) {
    const row = document.createElement("tr");
    row.dataset.kind = kind;
    const name = document.createElement("td");
    name.textContent = kind;
    const example = examples[kind];
    if (example) {
      const div = document.createElement("div");
      div.className = "example";
      div.textContent = `line ${example.work_id}: ${example.line}`;
      name.appendChild(div);
    }
    row.appendChild(name);
    cell(row, fmtInt(byKind[kind]), "num");
    body.appendChild(row);
  }
  $("failures").replaceWith(body);
  $("no-failures").hidden = kinds.length > 0;
  text("failure-count", unlisted ? `(and ${fmtInt(unlisted)} lines of other kinds, not listed)` : "");
}

function renderChart() {
  const svg = $("chart");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const points = [];
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i];
    const dt = b.secs - a.secs;
    if (dt > 0.5) points.push([b.secs, Math.max(0, b.lines_done - a.lines_done) / dt]);
  }
  if (points.length < 2) {
    text("chart-note", "the chart starts after a few seconds of work");
    return;
  }
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  const top = Math.max(...points.map((p) => p[1]), 1e-9);
  const x = (t) => ((t - t0) / Math.max(t1 - t0, 1e-9)) * 600;
  const y = (v) => 115 - (v / top) * 110;
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2f6fde");
  line.setAttribute("stroke-width", "2");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.appendChild(line);
  text("chart-note", `over the last ${fmtDuration(t1 - t0)}; peak ${fmtNum(top)} lines/s`);
}

// One poll at a time, a second apart from start to start: a slow or
// unreachable server never gets a second request from this page before it
// answered the first.
async function pollLoop(mine) {
  while (mine === generation) {
    const next = Date.now() + POLL_MS;
    try {
      await poll();
    } catch (e) {
      // An answer the page could not show: the next one may do.
      text("headline", `could not show the status (${e.message}); trying again`);
    }
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, next - Date.now())));
  }
}

function start() {
  generation += 1;
  polls = 0;
  pollLoop(generation);
}

function stop() {
  generation += 1;
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim() || null;
  $("token").value = "";
  start();
});

start();
