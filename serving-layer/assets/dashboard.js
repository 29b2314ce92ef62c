// The dashboard: reads the serving layer's JSON API and draws it, every
// REFRESH_MS. Plain JavaScript and hand-written SVG: no library, no CDN.
// Text from the API is only ever set through textContent (never HTML).
//
// What is shown lives in the page's fragment (#view=product&product=p-1&
// range=72&category=Toys&compare=1&measure=views&q=lamp), so every view is a
// link that can be shared, bookmarked or opened by a test.
"use strict";

const REFRESH_MS = 15000;
const HOUR_MS = 3600 * 1000;
const SVG = "http://www.w3.org/2000/svg";
const PRESETS = ["24", "72", "168", "720"];
const MEASURES = { views: "views", cart_adds: "cart adds", purchases: "purchases", units: "units", revenue_cents: "revenue" };

const $ = (id) => document.getElementById(id);
let currency = "USD";
let refreshing = null;

// ---- state in the fragment ----

function readState() {
  const p = new URLSearchParams(location.hash.replace(/^#/, ""));
  const range = p.get("range") || "24";
  return {
    key: p.get("key"),
    view: p.get("view") === "product" && p.get("product") ? "product" : "overview",
    product: p.get("product") || "",
    range: PRESETS.includes(range) || range === "custom" ? range : "24",
    from: p.get("from") || "",
    to: p.get("to") || "",
    category: p.get("category") || "",
    compare: p.get("compare") === "1",
    measure: MEASURES[p.get("measure")] ? p.get("measure") : "views",
    q: p.get("q") || "",
  };
}

function link(state) {
  const p = new URLSearchParams();
  if (state.view === "product") {
    p.set("view", "product");
    p.set("product", state.product);
  }
  if (state.range !== "24") p.set("range", state.range);
  if (state.range === "custom") {
    p.set("from", state.from);
    p.set("to", state.to);
  }
  if (state.category) p.set("category", state.category);
  if (state.compare) p.set("compare", "1");
  if (state.measure !== "views") p.set("measure", state.measure);
  return "#" + p.toString();
}

function go(patch) {
  const next = link({ ...readState(), ...patch });
  if (next !== location.hash) location.hash = next;
  else schedule();
}

// `[from, to)` of the state in epoch ms; `to` is now for the presets.
function rangeOf(state) {
  if (state.range === "custom") {
    const from = Date.parse(state.from), to = Date.parse(state.to);
    if (Number.isFinite(from) && Number.isFinite(to) && from < to) return { from, to };
  }
  const to = Date.now();
  const hours = Number(state.range === "custom" ? 24 : state.range);
  return { from: Math.floor((to - hours * HOUR_MS) / HOUR_MS) * HOUR_MS, to };
}

// ---- talking to the API ----

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

const iso = (ms) => new Date(ms).toISOString();
const q = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== undefined)).toString();

// ---- formatting: the viewer's time zone, the shop's currency ----

function money(cents) {
  return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(cents / 100);
}

function formatValue(value, measure) {
  if (measure === "revenue_cents") return money(value);
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: 1 });
}

function timeLabel(ms, withDate) {
  const options = withDate
    ? { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" }
    : { hour: "2-digit", minute: "2-digit" };
  return new Date(ms).toLocaleString(undefined, options);
}

function zoneLabel() {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  const minutes = -new Date().getTimezoneOffset();
  const sign = minutes < 0 ? "-" : "+";
  const hh = String(Math.floor(Math.abs(minutes) / 60)).padStart(2, "0");
  const mm = String(Math.abs(minutes) % 60).padStart(2, "0");
  return `${zone} (UTC${sign}${hh}:${mm})`;
}

function hoursLabel(hours) {
  return hours < 48 ? `${hours} h` : `${(hours / 24).toFixed(1)} days`;
}

// A colour per category, distinct for any number of them: hues a golden
// angle apart, in the order of the sorted category names.
function palette(categories) {
  const colours = new Map();
  [...categories].sort((a, b) => a.localeCompare(b)).forEach((c, i) => {
    colours.set(c, `hsl(${((i * 137.508) % 360).toFixed(1)}, 68%, ${i % 2 ? 38 : 48}%)`);
  });
  return colours;
}

// ---- DOM helpers ----

function el(tag, attrs, text) {
  const node = ["svg", "g", "path", "line", "text", "title", "circle", "rect"].includes(tag)
    ? document.createElementNS(SVG, tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function cell(content, cls) {
  const td = el("td", cls ? { class: cls } : {});
  if (content instanceof Node) td.append(content);
  else td.textContent = content;
  return td;
}

function productLink(id, name) {
  return el("a", { href: link({ ...readState(), view: "product", product: id }), "data-product-link": id }, name || id);
}

function fillTable(tbodyId, rows, rowTestId, toCells, emptyText, columns) {
  const tbody = $(tbodyId);
  tbody.replaceChildren();
  if (rows.length === 0) {
    const tr = el("tr", { "data-testid": `${rowTestId}-empty` });
    tr.append(el("td", { colspan: columns, class: "empty" }, emptyText));
    tbody.append(tr);
    return;
  }
  for (const row of rows) {
    const tr = el("tr", { "data-testid": rowTestId, "data-product-id": row.product_id || "" });
    tr.append(...toCells(row));
    tbody.append(tr);
  }
}

// A nice round step for about `ticks` axis ticks up to `max`.
function niceStep(max, ticks) {
  const raw = max / ticks;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const residual = raw / magnitude;
  const nice = residual > 5 ? 10 : residual > 2 ? 5 : residual > 1 ? 2 : 1;
  return nice * magnitude;
}

// ---- the chart ----
//
// `series`: { key, label, colour, points: Map(hourMs -> value), style:
// "solid" | "dashed" | "previous", partial: the current hour is drawn as
// partial }. Hours without a point had no demand and are drawn at zero,
// except for dashed (expected) and previous series, drawn only where known.
// `shades`: [{ from, to }] hour spans shaded (spike periods).
function drawChart(container, series, { fromMs, toMs, measure, shades = [], testid, label }) {
  container.replaceChildren();
  const values = series.flatMap((s) => [...s.points.values()]);
  if (values.length === 0) {
    container.append(el("p", { class: "empty", "data-testid": "chart-empty" }, "no demand in this range"));
    return;
  }
  const width = 960, height = 300, left = 64, right = 28, top = 10, bottom = 28;
  const x0 = Math.floor(fromMs / HOUR_MS) * HOUR_MS;
  const x1 = Math.max(x0 + HOUR_MS, Math.floor((toMs - 1) / HOUR_MS) * HOUR_MS);
  const now = Date.now();
  const current = Math.floor(now / HOUR_MS) * HOUR_MS;
  const elapsed = Math.max(60000, now - current);
  const projected = (v) => (v * HOUR_MS) / elapsed;
  const partialMax = series.filter((s) => s.partial && s.points.has(current) && current <= x1)
    .map((s) => projected(s.points.get(current)));
  const maxValue = Math.max(1, ...values, ...partialMax);
  const step = niceStep(maxValue, 5);
  const yMax = Math.ceil(maxValue / step) * step;
  const x = (t) => left + ((t - x0) / (x1 - x0)) * (width - left - right);
  const y = (v) => top + (1 - v / yMax) * (height - top - bottom);

  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "data-testid": testid, "aria-label": label });
  for (const s of shades) {
    const a = Math.max(x0, s.from), b = Math.min(x1, s.to);
    if (b < a) continue;
    svg.append(el("rect", { x: x(a) - 3, y: top, width: Math.max(6, x(b) - x(a) + 6), height: height - top - bottom,
      class: "shade", "data-testid": "spike-period", "data-from": iso(s.from), "data-to": iso(s.to) }));
  }
  const axis = el("g", { class: "axis" });
  for (let v = 0; v <= yMax + step / 2; v += step) {
    axis.append(el("line", { x1: left, x2: width - right, y1: y(v), y2: y(v) }));
    axis.append(el("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, formatValue(v, measure)));
  }
  const rangeHours = Math.round((x1 - x0) / HOUR_MS);
  const every = Math.max(1, Math.ceil(rangeHours / 8));
  for (let t = x0; t <= x1; t += every * HOUR_MS) {
    axis.append(el("text", { x: x(t), y: height - 8, "text-anchor": "middle", "data-testid": "x-label", "data-hour": iso(t) },
      timeLabel(t, rangeHours > 24)));
  }
  svg.append(axis);

  for (const s of series) {
    const hours = [];
    if (s.style === "solid") {
      for (let t = x0; t <= x1; t += HOUR_MS) hours.push(t);
    } else {
      hours.push(...[...s.points.keys()].filter((t) => t >= x0 && t <= x1).sort((a, b) => a - b));
    }
    const partial = s.partial && current >= x0 && current <= x1 && hours.includes(current);
    const solid = partial ? hours.filter((t) => t < current) : hours;
    const d = solid.map((t, i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(s.points.get(t) || 0).toFixed(1)}`);
    const attrs = { d: d.join(" "), fill: "none", stroke: s.colour, "stroke-width": s.style === "previous" ? 1.5 : 2,
      "data-testid": s.testid, "data-category": s.key, "data-points": s.points.size };
    if (s.style !== "solid") attrs["stroke-dasharray"] = s.style === "previous" ? "2 3" : "6 4";
    if (s.style === "previous") attrs.opacity = 0.55;
    const path = el("path", attrs);
    path.append(el("title", {}, s.label));
    svg.append(path);
    if (partial) {
      // The current hour so far, and where it is heading at this pace: a
      // dashed segment to the projection, never a fall to zero.
      const actual = s.points.get(current) || 0;
      const guess = projected(actual);
      const before = current - HOUR_MS;
      const startX = x(Math.max(before, x0)), startY = y(before >= x0 ? s.points.get(before) || 0 : actual);
      svg.append(el("path", { d: `M${startX.toFixed(1)},${startY.toFixed(1)} L${x(current).toFixed(1)},${y(guess).toFixed(1)}`,
        fill: "none", stroke: s.colour, "stroke-width": 2, "stroke-dasharray": "4 4", "data-testid": "partial-hour",
        "data-category": s.key, "data-actual": actual, "data-projected": guess.toFixed(2) }));
      const dot = el("circle", { cx: x(current), cy: y(guess), r: 4, fill: "white", stroke: s.colour, "stroke-width": 2 });
      dot.append(el("title", {}, `${s.label}: ${formatValue(actual, measure)} so far this hour, about ${formatValue(guess, measure)} at this pace`));
      svg.append(dot, el("circle", { cx: x(current), cy: y(actual), r: 2.5, fill: s.colour }));
    }
  }
  container.append(svg);
}

// ---- CSV export of what is shown ----

function csvField(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function setExport(filename, header, rows) {
  const text = [header, ...rows].map((r) => r.map(csvField).join(",")).join("\r\n") + "\r\n";
  const a = $("export");
  a.href = "data:text/csv;charset=utf-8," + encodeURIComponent(text);
  a.download = filename;
  a.dataset.rows = String(rows.length);
}

const cents = (v) => (Number(v) / 100).toFixed(2);

// ---- the overview ----

let knownCategories = [];

function fillCategories(categories, selected) {
  knownCategories = [...new Set([...knownCategories, ...categories, ...(selected ? [selected] : [])])].sort((a, b) => a.localeCompare(b));
  const select = $("category");
  select.replaceChildren(el("option", { value: "" }, "all"));
  for (const c of knownCategories) select.append(el("option", { value: c }, c));
  select.value = selected;
}

function totalsBy(rows, measure) {
  const totals = new Map();
  for (const r of rows) totals.set(r.category, (totals.get(r.category) || 0) + Number(r[measure]));
  return totals;
}

async function renderOverview(state, range, freshness) {
  // The previous period: as many whole hours, just before.
  const span = Math.ceil((range.to - range.from) / HOUR_MS) * HOUR_MS;
  document.body.dataset.previousFrom = state.compare ? iso(range.from - span) : "";
  const measure = state.measure;
  const calls = [
    getJson(`/api/demand/hourly?${q({ from: iso(range.from), to: iso(range.to) })}`),
    getJson("/api/spikes?limit=100"),
    getJson(`/api/spikes/history?${q({ from: iso(range.from), to: iso(range.to), category: state.category })}`),
    getJson("/api/popular?limit=200"),
    state.compare ? getJson(`/api/demand/hourly?${q({ from: iso(range.from - span), to: iso(range.from) })}`) : Promise.resolve(null),
    freshness,
  ];
  const results = await Promise.allSettled(calls);
  const [demand, spikes, history, popular, previous] = results;
  const inCategory = (row) => !state.category || row.category === state.category;
  if (demand.status === "fulfilled") {
    const all = demand.value.rows;
    const colours = palette(new Set(all.map((r) => r.category)));
    fillCategories([...colours.keys()], state.category);
    const shown = all.filter(inCategory);
    const before = previous.status === "fulfilled" && previous.value ? previous.value.rows.filter(inCategory) : null;
    const series = [];
    const byCategory = new Map();
    for (const r of shown) {
      if (!byCategory.has(r.category)) byCategory.set(r.category, new Map());
      byCategory.get(r.category).set(Date.parse(r.hour), Number(r[measure]));
    }
    const legend = $("legend");
    legend.replaceChildren();
    for (const [category, points] of [...byCategory.entries()].sort((a, b) => a[0].localeCompare(b[0]))) {
      const colour = colours.get(category);
      series.push({ key: category, label: category, colour, points, style: "solid", partial: true, testid: "demand-series" });
      legend.append(el("span", { style: `--c: ${colour}`, "data-testid": "legend-item", "data-category": category, "data-colour": colour }, category));
    }
    if (before) {
      const shifted = new Map();
      for (const r of before) {
        if (!shifted.has(r.category)) shifted.set(r.category, new Map());
        shifted.get(r.category).set(Date.parse(r.hour) + span, Number(r[measure]));
      }
      for (const [category, points] of shifted) {
        series.push({ key: category, label: `${category}, previous period`, colour: colours.get(category) || "#888",
          points, style: "previous", testid: "previous-series" });
      }
    }
    $("chart-title").textContent = `Hourly ${MEASURES[measure]} ${state.category ? `of ${state.category}` : "by category"}`;
    drawChart($("chart"), series, { fromMs: range.from, toMs: range.to, measure, testid: "demand-chart",
      label: `hourly ${measure} by category` });

    // Totals of the period, against the previous one of the same length.
    const now = totalsBy(shown, measure);
    const then = before ? totalsBy(before, measure) : new Map();
    const categories = [...new Set([...now.keys(), ...then.keys()])].sort((a, b) => a.localeCompare(b));
    const rows = categories.map((c) => ({ category: c, now: now.get(c) || 0, then: before ? then.get(c) || 0 : null }));
    if (rows.length > 1) {
      const sum = (k) => rows.reduce((a, r) => a + (r[k] || 0), 0);
      rows.push({ category: "all", now: sum("now"), then: before ? sum("then") : null, all: true });
    }
    $("totals-now").textContent = `this period (${hoursLabel(Math.round(span / HOUR_MS))})`;
    $("totals-before").textContent = before ? "previous period" : "previous period (tick compare)";
    fillTable("totals", rows, "totals-row", (r) => {
      const change = r.then === null ? "" : r.then === 0 ? (r.now > 0 ? "new" : "–")
        : `${r.now >= r.then ? "+" : ""}${(((r.now - r.then) / r.then) * 100).toFixed(1)} %`;
      const name = el("span", { class: r.all ? "all" : "swatch", style: `--c: ${colours.get(r.category) || "#888"}` }, r.category);
      return [cell(name), cell(formatValue(r.now, measure), "num"),
        cell(r.then === null ? "" : formatValue(r.then, measure), "num"), cell(change, "num")];
    }, "no demand in this range", 4);
    for (const tr of $("totals").querySelectorAll("tr[data-testid=totals-row]")) {
      const r = rows[[...tr.parentNode.children].indexOf(tr)];
      tr.dataset.category = r.category;
      tr.dataset.now = String(r.now);
      if (r.then !== null) tr.dataset.then = String(r.then);
    }

    // The export: the chart's numbers, hour by hour, with the previous period's beside them.
    const header = ["hour_utc", "hour_local", "category", measure === "revenue_cents" ? `revenue_${currency}` : measure];
    if (before) header.push(`previous_period_${header[3]}`);
    const lines = [];
    const prevOf = (category, t) => (before ? (series.find((s) => s.style === "previous" && s.key === category)?.points.get(t) ?? 0) : null);
    for (const [category, points] of [...byCategory.entries()].sort((a, b) => a[0].localeCompare(b[0]))) {
      for (const t of [...points.keys()].sort((a, b) => a - b)) {
        const v = points.get(t);
        const line = [iso(t), timeLabel(t, true), category, measure === "revenue_cents" ? cents(v) : v];
        if (before) {
          const p = prevOf(category, t);
          line.push(measure === "revenue_cents" ? cents(p) : p);
        }
        lines.push(line);
      }
    }
    setExport(`demand-${state.category || "all"}-${iso(range.from).slice(0, 13)}h.csv`, header, lines);
  }
  if (spikes.status === "fulfilled") {
    fillTable("spikes", spikes.value.filter(inCategory), "spike-row", (s) => [
      cell(productLink(s.product_id, s.name)), cell(s.category || ""), cell(timeLabel(Date.parse(s.spike_start), true)),
      cell(formatValue(s.current_demand), "num"), cell(formatValue(s.baseline_demand), "num"),
      cell(s.score.toFixed(1), "num"),
    ], "no spikes right now", 6);
  }
  if (history.status === "fulfilled") {
    fillTable("history", history.value.filter((h) => !h.driven_by), "history-row", (h) => [
      cell(productLink(h.product_id, h.name)), cell(h.category || ""), cell(timeLabel(Date.parse(h.spike_start), true)),
      cell(timeLabel(Date.parse(h.latest_hour), true)), cell(`${h.duration_hours} h`, "num"),
      cell(h.peak_demand === null ? "" : formatValue(h.peak_demand), "num"),
      cell(h.peak_expected === null ? "" : formatValue(h.peak_expected), "num"),
    ], "no spikes in this range", 7);
  }
  if (popular.status === "fulfilled") {
    fillTable("popular", popular.value.filter(inCategory).slice(0, 10), "popular-row", (p) => [
      cell(String(p.rank), "num"), cell(productLink(p.product_id, p.name)), cell(p.category || ""), cell(p.score.toFixed(1), "num"),
    ], "no products yet", 4);
  }
  return results;
}

// ---- a product's page ----

async function renderProduct(state, range, freshness) {
  const results = await Promise.allSettled([
    getJson(`/api/products/${encodeURIComponent(state.product)}?${q({ from: iso(range.from), to: iso(range.to) })}`),
    freshness,
  ]);
  const [page] = results;
  if (page.status !== "fulfilled") return results;
  const { product, hours, spikes } = page.value;
  const name = product?.name || state.product;
  $("product-title").textContent = name;
  const facts = [`id ${state.product}`];
  if (product?.category) facts.push(`category ${product.category}`);
  if (product?.price_cents !== null && product?.price_cents !== undefined) facts.push(`price ${money(product.price_cents)}`);
  if (!product) facts.push("not in the catalog yet");
  const basis = hours.findLast?.((h) => h.basis)?.basis;
  if (basis && basis !== "product") facts.push(`expected from its ${basis}'s typical product (no baseline of its own yet)`);
  $("product-facts").textContent = facts.join(" · ");
  const css = getComputedStyle(document.body);
  const demand = new Map(hours.map((h) => [Date.parse(h.hour), Number(h.demand)]));
  const expected = new Map(hours.filter((h) => h.expected !== null).map((h) => [Date.parse(h.hour), Number(h.expected)]));
  const series = [
    { key: "demand", label: "demand", colour: css.getPropertyValue("--demand").trim() || "#0969da", points: demand,
      style: "solid", partial: true, testid: "product-demand" },
    { key: "expected", label: "expected by the baseline", colour: css.getPropertyValue("--baseline").trim() || "#6e7781",
      points: expected, style: "dashed", testid: "product-expected" },
  ];
  const shades = spikes.map((s) => ({ from: Date.parse(s.spike_start), to: Date.parse(s.latest_hour) }));
  drawChart($("product-chart"), series, { fromMs: range.from, toMs: range.to, measure: "views", shades,
    testid: "product-chart", label: `hourly demand of ${name} against its baseline` });
  fillTable("product-spikes", spikes, "product-spike-row", (s) => [
    cell(timeLabel(Date.parse(s.spike_start), true)), cell(timeLabel(Date.parse(s.latest_hour), true)),
    cell(`${s.duration_hours} h`, "num"), cell(s.peak_demand === null ? "" : formatValue(s.peak_demand), "num"),
    cell(s.peak_expected === null ? "" : formatValue(s.peak_expected), "num"), cell(s.peak_score.toFixed(1), "num"),
  ], "no spikes in this range", 6);
  setExport(`product-${state.product}-${iso(range.from).slice(0, 13)}h.csv`,
    ["hour_utc", "hour_local", "views", "cart_adds", "purchases", "units", `revenue_${currency}`, "demand", "expected", "is_spike"],
    hours.map((h) => [h.hour, timeLabel(Date.parse(h.hour), true), h.views, h.cart_adds, h.purchases, h.units,
      cents(h.revenue_cents), h.demand, h.expected === null ? "" : h.expected.toFixed(2), h.is_spike === null ? "" : h.is_spike]));
  return results;
}

// ---- freshness badges ----

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
    if (layer && layer.last_event_time) badge.title = `last event ${timeLabel(Date.parse(layer.last_event_time), true)}`;
  }
}

// ---- search ----

let searchTimer = null;

async function search(text) {
  const list = $("search-results");
  list.replaceChildren();
  if (!text.trim()) {
    list.hidden = true;
    return;
  }
  try {
    const products = await getJson(`/api/products?${q({ q: text.trim(), limit: 12 })}`);
    for (const p of products) {
      const item = el("li", { "data-testid": "search-result", "data-product-id": p.product_id });
      item.append(productLink(p.product_id, p.name), el("small", {}, ` ${p.category || ""} · ${p.product_id}`));
      list.append(item);
    }
    if (products.length === 0) list.append(el("li", { class: "empty", "data-testid": "search-empty" }, "no such product"));
  } catch (e) {
    list.append(el("li", { class: "error" }, e.message));
  }
  list.hidden = false;
  document.body.dataset.searched = text;
}

// ---- the whole page ----

async function refresh() {
  const state = readState();
  const range = rangeOf(state);
  $("overview").hidden = state.view !== "overview";
  $("product").hidden = state.view !== "product";
  $("measure-label").hidden = state.view !== "overview";
  $("category-label").hidden = state.view !== "overview";
  $("range").value = state.range;
  $("custom-range").hidden = state.range !== "custom";
  $("compare").checked = state.compare;
  $("compare").disabled = state.view !== "overview";
  $("measure").value = state.measure;
  const local = (ms) => new Date(ms - new Date(ms).getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  if (document.activeElement !== $("from")) $("from").value = local(range.from);
  if (document.activeElement !== $("to")) $("to").value = local(range.to);
  const freshness = getJson("/api/freshness");
  const results = state.view === "product"
    ? await renderProduct(state, range, freshness)
    : await renderOverview(state, range, freshness);
  const fresh = await Promise.allSettled([freshness]);
  if (fresh[0].status === "fulfilled") showFreshness(fresh[0].value);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  const error = $("error");
  error.hidden = failed.length === 0;
  error.textContent = [...new Set(failed)].join("; ");
  $("updated-at").textContent = new Date().toLocaleTimeString();
  document.body.dataset.view = state.view;
  document.body.dataset.rangeFrom = iso(range.from);
  document.body.dataset.rangeTo = iso(range.to);
  document.body.dataset.loaded = "true";
  document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
}

function schedule() {
  if (refreshing) return refreshing;
  refreshing = refresh().catch((e) => {
    $("error").hidden = false;
    $("error").textContent = String(e);
  }).finally(() => { refreshing = null; });
  return refreshing;
}

$("measure").addEventListener("change", () => go({ measure: $("measure").value }));
$("category").addEventListener("change", () => go({ category: $("category").value }));
$("compare").addEventListener("change", () => go({ compare: $("compare").checked }));
$("range").addEventListener("change", () => {
  const value = $("range").value;
  if (value !== "custom") return go({ range: value });
  const r = rangeOf(readState());
  go({ range: "custom", from: iso(r.from), to: iso(r.to) });
});
$("apply-range").addEventListener("click", () => {
  const from = Date.parse($("from").value), to = Date.parse($("to").value);
  if (!(from < to)) {
    $("error").hidden = false;
    $("error").textContent = "the range needs a start before its end";
    return;
  }
  go({ range: "custom", from: iso(from), to: iso(to) });
});
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => search($("search").value), 250);
});
$("search").addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    const first = $("search-results").querySelector("a");
    if (first) location.hash = first.getAttribute("href");
  }
});
window.addEventListener("hashchange", () => {
  $("search-results").hidden = true;
  schedule();
});
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
  $("timezone").textContent = zoneLabel();
  const state = readState();
  if (state.key) {
    // The key leaves the address bar at once; the rest of the link stays.
    history.replaceState(null, "", location.pathname + location.search + link(state));
    try {
      await signIn(state.key);
    } catch (e) {
      showSignIn(e.message);
    }
  }
  try {
    currency = (await getJson("/api/meta")).currency || currency;
  } catch {
    // Signed out, or the API is down: the refresh says so.
  }
  await schedule();
  if (state.q) {
    $("search").value = state.q;
    await search(state.q);
  }
  setInterval(schedule, REFRESH_MS);
}
boot();
