// The dashboard: reads the serving layer's JSON API and draws it, every
// REFRESH_MS. Plain JavaScript and hand-written SVG: no library, no CDN.
// Text from the API is only ever set through textContent (never HTML).
"use strict";

const REFRESH_MS = 15000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#0969da", "#cf222e", "#1f883d", "#8250df", "#bf8700", "#1b7c83", "#bc4c00", "#6e7781", "#e85aad", "#4d2d00"];

const $ = (id) => document.getElementById(id);

// Signing in: a dashboard key, posted once, buys an HttpOnly session
// cookie; the key itself is never stored by the page. A link may carry the
// key in its fragment (`/#key=…`), which browsers never send to a server.
async function signIn(key) {
  const response = await fetch("/session", {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: `key=${encodeURIComponent(key)}`,
    credentials: "same-origin",
  });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || `sign-in failed (${response.status})`);
  }
}

function showSignIn(message) {
  $("signin").hidden = false;
  $("signin-message").textContent = message || "";
  document.body.dataset.signedIn = "false";
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    showSignIn("Sign in with a dashboard key.");
    throw new Error("not signed in");
  }
  if (!response.ok) {
    throw new Error(`${path}: ${body.error || response.status}`);
  }
  document.body.dataset.signedIn = "true";
  return body;
}

function el(tag, attrs, text) {
  const node = tag === "svg" || ["g", "path", "line", "text", "title", "circle"].includes(tag)
    ? document.createElementNS(SVG, tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatNumber(value, measure) {
  if (measure === "revenue_cents") return (value / 100).toLocaleString(undefined, { maximumFractionDigits: 0 });
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: 1 });
}

function hourLabel(date, rangeHours) {
  const hh = String(date.getUTCHours()).padStart(2, "0") + ":00";
  if (rangeHours <= 24) return hh;
  return `${date.getUTCMonth() + 1}/${date.getUTCDate()} ${hh}`;
}

// A nice round step for about `ticks` axis ticks up to `max`.
function niceStep(max, ticks) {
  const raw = max / ticks;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const residual = raw / magnitude;
  const nice = residual > 5 ? 10 : residual > 2 ? 5 : residual > 1 ? 2 : 1;
  return nice * magnitude;
}

function drawChart(rows, measure, fromMs, toMs) {
  const container = $("chart");
  const legend = $("legend");
  container.replaceChildren();
  legend.replaceChildren();
  if (rows.length === 0) {
    container.append(el("p", { class: "empty", "data-testid": "chart-empty" }, "no demand in this range"));
    return;
  }
  const series = new Map();
  for (const row of rows) {
    if (!series.has(row.category)) series.set(row.category, []);
    series.get(row.category).push({ t: Date.parse(row.hour), v: Number(row[measure]) });
  }
  const width = 960, height = 300, left = 56, right = 28, top = 10, bottom = 28;
  const hourMs = 3600 * 1000;
  const x0 = Math.floor(fromMs / hourMs) * hourMs;
  const x1 = Math.max(x0 + hourMs, Math.floor((toMs - 1) / hourMs) * hourMs);
  const maxValue = Math.max(1, ...rows.map((r) => Number(r[measure])));
  const step = niceStep(maxValue, 5);
  const yMax = Math.ceil(maxValue / step) * step;
  const x = (t) => left + ((t - x0) / (x1 - x0)) * (width - left - right);
  const y = (v) => top + (1 - v / yMax) * (height - top - bottom);

  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "data-testid": "demand-chart",
    "aria-label": `hourly ${measure} by category` });
  const axis = el("g", { class: "axis" });
  for (let v = 0; v <= yMax + step / 2; v += step) {
    axis.append(el("line", { x1: left, x2: width - right, y1: y(v), y2: y(v) }));
    axis.append(el("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, formatNumber(v, measure)));
  }
  const rangeHours = Math.round((x1 - x0) / hourMs);
  const every = Math.max(1, Math.ceil(rangeHours / 8));
  for (let t = x0; t <= x1; t += every * hourMs) {
    axis.append(el("text", { x: x(t), y: height - 8, "text-anchor": "middle" }, hourLabel(new Date(t), rangeHours)));
  }
  svg.append(axis);

  let i = 0;
  for (const [category, points] of [...series.entries()].sort((a, b) => a[0].localeCompare(b[0]))) {
    const color = COLORS[i++ % COLORS.length];
    // Hours without a row had no demand: draw them at zero.
    const byHour = new Map(points.map((p) => [p.t, p.v]));
    const d = [];
    for (let t = x0; t <= x1; t += hourMs) {
      d.push(`${d.length ? "L" : "M"}${x(t).toFixed(1)},${y(byHour.get(t) || 0).toFixed(1)}`);
    }
    const path = el("path", { d: d.join(" "), fill: "none", stroke: color, "stroke-width": 2,
      "data-testid": "demand-series", "data-category": category, "data-points": points.length });
    path.append(el("title", {}, category));
    svg.append(path);
    const item = el("span", { style: `--c: ${color}` }, category);
    legend.append(item);
  }
  container.append(svg);
}

function cell(text, cls) {
  const td = el("td", cls ? { class: cls } : {}, text);
  return td;
}

function fillTable(tbodyId, rows, rowTestId, toCells, emptyText, columns) {
  const tbody = $(tbodyId);
  tbody.replaceChildren();
  if (rows.length === 0) {
    const tr = el("tr", { "data-testid": `${rowTestId}-empty` });
    const td = el("td", { colspan: columns, class: "empty" }, emptyText);
    tr.append(td);
    tbody.append(tr);
    return;
  }
  for (const row of rows) {
    const tr = el("tr", { "data-testid": rowTestId, "data-product-id": row.product_id });
    tr.append(...toCells(row));
    tbody.append(tr);
  }
}

function sinceLabel(iso) {
  const hours = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 3600000));
  return hours === 0 ? "this hour" : `${hours} h ago`;
}

function showFreshness(layers) {
  for (const badge of document.querySelectorAll("[data-layer]")) {
    const layer = layers.find((l) => l.layer === badge.dataset.layer);
    const status = layer ? layer.status : "unknown";
    badge.className = `badge ${status}`;
    badge.dataset.status = status;
    let text = `${badge.dataset.layer}: ${status}`;
    if (layer && layer.update_age_seconds !== null) {
      const age = layer.update_age_seconds;
      text += age < 120 ? ` (${Math.round(age)} s)` : age < 7200 ? ` (${Math.round(age / 60)} min)` : ` (${Math.round(age / 3600)} h)`;
    }
    badge.textContent = text;
    if (layer && layer.last_event_time) badge.title = `last event ${layer.last_event_time}`;
  }
}

async function refresh() {
  const measure = $("measure").value;
  const rangeHours = Number($("range").value);
  const toMs = Date.now();
  const fromMs = toMs - rangeHours * 3600 * 1000;
  const from = new Date(Math.floor(fromMs / 3600000) * 3600000).toISOString();
  const to = new Date(toMs).toISOString();
  const results = await Promise.allSettled([
    getJson(`/api/demand/hourly?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`),
    getJson("/api/spikes?limit=20"),
    getJson("/api/popular?limit=10"),
    getJson("/api/freshness"),
  ]);
  const [demand, spikes, popular, freshness] = results;
  if (demand.status === "fulfilled") drawChart(demand.value.rows, measure, Date.parse(from), toMs);
  if (spikes.status === "fulfilled") {
    fillTable("spikes", spikes.value, "spike-row", (s) => [
      cell(s.name || s.product_id), cell(s.category || ""), cell(sinceLabel(s.spike_start)),
      cell(formatNumber(s.current_demand), "num"), cell(formatNumber(s.baseline_demand), "num"),
      cell(s.score.toFixed(1), "num"),
    ], "no spikes right now", 6);
  }
  if (popular.status === "fulfilled") {
    fillTable("popular", popular.value, "popular-row", (p) => [
      cell(String(p.rank), "num"), cell(p.name || p.product_id), cell(p.category || ""), cell(p.score.toFixed(1), "num"),
    ], "no products yet", 4);
  }
  if (freshness.status === "fulfilled") showFreshness(freshness.value);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  const error = $("error");
  error.hidden = failed.length === 0;
  error.textContent = failed.join("; ");
  $("updated-at").textContent = new Date().toLocaleTimeString();
  document.body.dataset.loaded = "true";
  document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
}

function schedule() {
  refresh().catch((e) => {
    $("error").hidden = false;
    $("error").textContent = String(e);
  });
}

$("measure").addEventListener("change", schedule);
$("range").addEventListener("change", schedule);
$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("signin-key");
  try {
    await signIn(input.value);
    input.value = "";
    $("signin").hidden = true;
    schedule();
  } catch (e) {
    showSignIn(e.message);
  }
});

async function boot() {
  const fromLink = location.hash.match(/^#key=(.+)$/);
  if (fromLink) {
    history.replaceState(null, "", location.pathname + location.search);
    try {
      await signIn(decodeURIComponent(fromLink[1]));
    } catch (e) {
      showSignIn(e.message);
    }
  }
  schedule();
  setInterval(schedule, REFRESH_MS);
}
boot();
