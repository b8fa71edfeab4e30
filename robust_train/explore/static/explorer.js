"use strict";
// The explorer page: pick an image and an attack, the server computes the whole ε grid once, and the slider then
// only looks values up. Bluff's graph and a channel's details are asked for per ε (debounced).

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const ROLE_COLOURS = { original: "#2ca02c", target: "#1f77b4", both: "#ff7f0e", adversarial: "#d62728" };

const state = { info: null, image: "t0", grid: null, index: 0, request: 0, pathwaysTimer: null, channel: null };

function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body;
  try { body = await response.json(); } catch (e) { body = { error: `${response.status} ${response.statusText}` }; }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value; o.textContent = text;
  select.appendChild(o);
}

function className(c) { return state.info.classes[c] ?? String(c); }
function fmt(v, digits = 3) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
function el(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// ----- image picker -----
async function loadGallery() {
  const params = new URLSearchParams({ show: $("filter-show").value, class: $("filter-class").value });
  const data = await api(`/api/images?${params}`);
  const gallery = $("gallery");
  gallery.replaceChildren();
  $("gallery-count").textContent = `${data.count} image${data.count === 1 ? "" : "s"}` +
    (data.count > data.images.length ? `, first ${data.images.length} shown` : "");
  for (const item of data.images) {
    const button = document.createElement("button");
    button.className = "thumb" + (item.pred !== item.label ? " wrong" : "") + (item.id === state.image ? " selected" : "");
    button.dataset.id = item.id;
    button.title = `label ${className(item.label)}, predicted ${className(item.pred)}` +
      (item.broken_eps === null ? ", PGD-10 breaks it at no grid ε" : `, broken at ε ${fmt(item.broken_eps)}`);
    const img = document.createElement("img");
    img.src = item.src; img.alt = button.title;
    const label = document.createElement("span");
    label.textContent = className(item.label);
    button.append(img, label);
    button.addEventListener("click", () => pickImage(item.id));
    gallery.appendChild(button);
  }
}

function pickImage(id) {
  state.image = id;
  for (const t of document.querySelectorAll(".thumb")) t.classList.toggle("selected", t.dataset.id === id);
  loadGrid();
}

async function upload(file) {
  const form = new FormData();
  form.append("image", file);
  try {
    const data = await api("/api/upload", { method: "POST", body: form });
    showMessage("");
    pickImage(data.id);
  } catch (e) {
    showMessage(`Upload refused: ${e.message}`);
  } finally {
    $("upload").value = "";
  }
}

// ----- the ε grid -----
function attackParams() {
  const params = new URLSearchParams({ image: state.image, attack: $("attack").value, steps: $("steps").value,
                                       map: $("map").value });
  if ($("attack").value === "pgd_target") params.set("target", $("target").value);
  return params;
}

async function loadGrid() {
  const ticket = ++state.request;
  const params = attackParams();
  if ($("map-class").value !== "") params.set("class", $("map-class").value);
  $("busy").hidden = false;
  try {
    const grid = await api(`/api/grid?${params}`);
    if (ticket !== state.request) return; // a newer choice was made meanwhile
    state.grid = grid;
    $("eps-slider").max = String(grid.eps.length - 1);
    state.index = Math.min(Number($("eps-slider").value), grid.eps.length - 1);
    showMessage("");
    render();
    schedulePathways();
  } catch (e) {
    if (ticket === state.request) showMessage(e.message);
  } finally {
    if (ticket === state.request) $("busy").hidden = true;
  }
}

function scores(list, top5, original, target) {
  list.replaceChildren();
  for (const { class: c, p } of top5) {
    const li = document.createElement("li");
    li.className = c === original ? "original" : (c === target ? "is-target" : "other");
    const name = document.createElement("span"); name.textContent = className(c);
    const barBox = document.createElement("span");
    const bar = document.createElement("div"); bar.className = "bar";
    bar.style.width = `${Math.max(1, p * 100)}%`;
    barBox.appendChild(bar);
    const value = document.createElement("span"); value.textContent = `${(p * 100).toFixed(1)}%`;
    li.append(name, barBox, value);
    list.appendChild(li);
  }
}

function render() {
  const g = state.grid;
  if (!g) return;
  const i = state.index;
  const unit = g.norm === "l2" ? "L2" : "L∞";
  $("eps-label").textContent = `ε = ${fmt(g.eps[i])} (${unit})` +
    (g.minimal_norm !== null ? ` · DeepFool ‖r‖₂ = ${fmt(g.minimal_norm)}` : "");
  $("img-clean").src = g.x;
  $("img-adv").src = g.adversarial[i];
  $("img-adv-under").src = g.adversarial[i];
  $("img-delta").src = g.perturbation[i];
  $("delta-size").textContent = `‖·‖∞ ${fmt(g.linf[i])}, ‖·‖₂ ${fmt(g.l2[i])}`;
  $("saliency-diff").src = g.saliency_difference[i];
  const a = g.models.a;
  scores($("scores-a"), a.top5[i], g.original, g.target);
  $("map-clean").src = a.map ? a.map.clean : "";
  $("map-adv").src = a.map ? a.map.adversarial[i] : "";
  $("tau").textContent = a.map ? fmt(a.map.tau[i]) : "–";
  const b = g.models.b;
  $("panel-b").hidden = !b;
  if (b) {
    scores($("scores-b"), b.top5[i], g.original, g.target);
    $("img-adv-b").src = g.adversarial[i];
    $("map-b").src = b.map ? b.map.adversarial[i] : "";
    $("map-b-name").textContent = b.map ? b.map.name : "(no map)";
    $("tau-b").textContent = b.map ? fmt(b.map.tau[i]) : "–";
  }
  applyOpacity();
  drawChart();
}

function applyOpacity() {
  const o = Number($("opacity").value) / 100;
  for (const id of ["map-clean", "map-adv", "map-b"]) $(id).style.opacity = String(o);
}

// ----- charts (plain SVG) -----
function lineChart(svg, xs, series, { width, height, yMax = 1, yMin = 0, marker = null }) {
  svg.replaceChildren();
  const pad = { l: 30, r: 22, t: 8, b: 22 };
  const xMax = Math.max(...xs) || 1;
  const X = (v) => pad.l + (v / xMax) * (width - pad.l - pad.r);
  const Y = (v) => height - pad.b - ((v - yMin) / (yMax - yMin)) * (height - pad.t - pad.b);
  el("line", { x1: pad.l, y1: Y(yMin), x2: width - pad.r, y2: Y(yMin), class: "axis" }, svg);
  el("line", { x1: pad.l, y1: Y(yMin), x2: pad.l, y2: Y(yMax), class: "axis" }, svg);
  for (const v of [yMin, (yMin + yMax) / 2, yMax]) {
    el("text", { x: 2, y: Y(v) + 3, class: "tick" }, svg).textContent = String(+v.toFixed(2));
  }
  for (const v of [0, xMax / 2, xMax]) {
    el("text", { x: X(v) - 8, y: height - 6, class: "tick" }, svg).textContent = String(+v.toFixed(3));
  }
  el("text", { x: width - 12, y: height - 6, class: "tick" }, svg).textContent = "ε";
  for (const s of series) {
    const points = xs.map((x, k) => [x, s.values[k]]).filter(([, v]) => v !== null && v !== undefined);
    if (!points.length) continue;
    el("polyline", { points: points.map(([x, v]) => `${X(x)},${Y(v)}`).join(" "), fill: "none",
                     stroke: s.colour, "stroke-width": 2, "stroke-dasharray": s.dash || "", class: s.cls || "" }, svg);
  }
  if (marker !== null) {
    el("line", { x1: X(marker), x2: X(marker), y1: Y(yMin), y2: Y(yMax), stroke: "#000", "stroke-dasharray": "3 3",
                 class: "marker" }, svg);
  }
  return { X, Y };
}

function drawChart() {
  const g = state.grid;
  if (!g) return;
  const a = g.models.a;
  const series = [
    { values: a.p_original, colour: "#2ca02c", cls: "p-original" },
    { values: a.p_top_other, colour: "#d62728", cls: "p-other" },
  ];
  if (a.map) series.push({ values: a.map.tau, colour: "#7f3fbf", cls: "tau" });
  if (g.models.b) series.push({ values: g.models.b.p_original, colour: "#888", dash: "4 3", cls: "p-original-b" });
  lineChart($("chart"), g.eps, series, { width: 360, height: 180, yMin: Math.min(0, ...(a.map ? a.map.tau.filter((t) => t !== null) : [0])), marker: g.eps[state.index] });
}

// ----- Bluff's view -----
function schedulePathways() {
  clearTimeout(state.pathwaysTimer);
  $("graph").classList.add("stale"); // dimmed until the graph of the current image and ε arrives
  $("bluff-caption").textContent = "updating…";
  state.pathwaysTimer = setTimeout(loadPathways, 200);
}

async function loadPathways() {
  if (!state.grid) return;
  const params = attackParams();
  params.set("eps_index", String(state.index));
  params.set("k", $("k").value);
  params.set("rank_by", $("rank-by").value);
  const ticket = state.request;
  try {
    const graph = await api(`/api/pathways?${params}`);
    if (ticket !== state.request || Number(params.get("eps_index")) !== state.index) return;
    drawGraph(graph);
    $("graph").classList.remove("stale");
    if (state.channel) loadChannel(state.channel.layer, state.channel.channel);
  } catch (e) {
    showMessage(e.message);
  }
}

function drawGraph(graph) {
  const svg = $("graph");
  svg.replaceChildren();
  const width = svg.clientWidth || 900;
  const rows = Math.max(...graph.layers.map((l) => l.nodes.length));
  const height = Math.max(160, 50 + rows * 44);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.height = `${height}px`;
  $("bluff-caption").textContent = `ε = ${fmt(graph.eps)}: original class ${className(graph.original)} (green), ` +
    `target class ${className(graph.target_class)} (blue); ranked by ${graph.rank_by}. Click a channel for details.`;
  const column = (l) => 60 + l * ((width - 120) / Math.max(1, graph.layers.length - 1));
  const position = new Map();
  graph.layers.forEach((layer, l) => {
    const x = column(l);
    el("text", { x: x - 30, y: 14 }, svg).textContent = `${layer.name} (${layer.channels})`;
    layer.nodes.forEach((node, r) => position.set(`${l}:${node.channel}`, [x, 40 + r * 44]));
  });
  const edges = el("g", { class: "edges" }, svg);
  for (const e of graph.edges) {
    const [x1, y1] = position.get(`${e.source[0]}:${e.source[1]}`);
    const [x2, y2] = position.get(`${e.target[0]}:${e.target[1]}`);
    const mid = (x1 + x2) / 2;
    el("path", { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, class: "edge",
                 stroke: e.weight >= 0 ? "#555" : "#b55", "stroke-opacity": 0.15 + 0.6 * Math.abs(e.weight),
                 "stroke-width": 0.5 + 4 * Math.abs(e.weight), "stroke-dasharray": e.weight >= 0 ? "" : "4 2" }, edges);
  }
  graph.layers.forEach((layer, l) => {
    const g = el("g", { class: "layer", "data-layer": l }, svg);
    for (const node of layer.nodes) {
      const [x, y] = position.get(`${l}:${node.channel}`);
      const c = el("circle", { cx: x, cy: y, r: 11, fill: ROLE_COLOURS[node.role], class: "node",
                               "data-role": node.role, "data-channel": node.channel }, g);
      if (state.channel && state.channel.layer === l && state.channel.channel === node.channel) c.classList.add("selected");
      el("title", {}, c).textContent = `${layer.name} channel ${node.channel}: ${node.role}, ${node.effect}\n` +
        `percentile on x′ ${fmt(node.adversarial, 0)}, on x ${fmt(node.clean, 0)} (change ${fmt(node.change, 0)})\n` +
        `median percentile: original class ${fmt(node.original, 0)}, target class ${fmt(node.target, 0)}`;
      el("text", { x: x + 14, y: y + 4 }, g).textContent =
        `${node.channel} ${node.effect === "excited" ? "▲" : node.effect === "inhibited" ? "▼" : ""}`;
      c.addEventListener("click", () => loadChannel(l, node.channel));
    }
  });
}

async function loadChannel(layer, channel) {
  state.channel = { layer, channel };
  const params = attackParams();
  params.set("layer", String(layer));
  params.set("channel", String(channel));
  try {
    const data = await api(`/api/channel?${params}`);
    $("channel").hidden = false;
    $("channel-title").textContent = `${data.layer}, channel ${data.channel}`;
    const examples = $("channel-examples");
    examples.replaceChildren();
    for (const src of data.examples) {
      const img = document.createElement("img");
      img.src = src; img.alt = "image patch";
      examples.appendChild(img);
    }
    lineChart($("channel-chart"), data.eps, [{ values: data.curve, colour: "#d62728" }],
              { width: 300, height: 150, yMax: 100, marker: data.eps[state.index] });
    for (const c of document.querySelectorAll("#graph .node")) {
      c.classList.toggle("selected", c.parentNode.dataset.layer === String(layer) && c.dataset.channel === String(channel));
    }
  } catch (e) {
    showMessage(e.message);
  }
}

// ----- start -----
function updateAttackControls() {
  const attack = $("attack").value;
  $("steps-box").hidden = !["pgd", "pgd_target", "aai"].includes(attack);
  $("target-box").hidden = attack !== "pgd_target";
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    showMessage(`The server did not answer: ${e.message}`);
    return;
  }
  const info = state.info;
  $("model-line").textContent = `A: ${info.model.path} (${info.model.method}, ${info.model.arch})` +
    (info.compare ? ` · B: ${info.compare.path}` : "") + ` · images: ${info.images}`;
  for (const a of info.attacks) option($("attack"), a.name, a.label);
  option($("map-class"), "", "the original");
  info.classes.forEach((c, k) => {
    option($("filter-class"), String(k), c);
    option($("target"), String(k), c);
    option($("map-class"), String(k), c);
  });
  $("target").value = String(Math.min(9, info.classes.length - 1));
  for (const m of info.model.maps) option($("map"), m, m);
  $("eps-slider").max = String(info.points - 1);
  $("filter-show").querySelector('[value="fragile"]').textContent = `broken at ε ≤ ${fmt(info.small_eps)}`;
  updateAttackControls();

  $("filter-show").addEventListener("change", loadGallery);
  $("filter-class").addEventListener("change", loadGallery);
  $("upload").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
  $("attack").addEventListener("change", () => { updateAttackControls(); loadGrid(); });
  for (const id of ["steps", "target", "map", "map-class"]) $(id).addEventListener("change", loadGrid);
  $("opacity").addEventListener("input", applyOpacity);
  $("eps-slider").addEventListener("input", () => {
    state.index = Number($("eps-slider").value);
    render();
    schedulePathways();
  });
  $("k").addEventListener("change", loadPathways);
  $("rank-by").addEventListener("change", loadPathways);
  await loadGallery();
  await loadGrid();
}

document.addEventListener("DOMContentLoaded", start);
