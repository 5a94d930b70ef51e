// edgeagent fleet dashboard: plain JavaScript, no build step, nothing fetched from elsewhere.
// State arrives over one WebSocket (/ws): a full "fleet" message, then coalesced "rows",
// "tracks" and, for the device being viewed, "device" deltas. The fleet table renders only
// the rows in view (fixed row height, spacer rows above and below), so 1,000 devices
// stay fluid; every other list is bounded.
"use strict";

const ROW_H = 28;
const state = {
  rows: new Map(), models: [], groups: [], tracks: [],
  csrf: null, route: { view: "fleet" }, sort: { key: "id", dir: 1 },
  device: null, deviceId: null, history: [], events: [],
  sorted: [], dirty: true, socket: null,
};
// Timings of the last 2,000 pushes and renders (ms), read by bench/dashboard.py.
const stats = { apply: [], render: [] };
window.edgeagentStats = stats;
const note = (list, ms) => { list.push(ms); if (list.length > 2000) list.shift(); };
const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};
const fmt = (v, digits = 1) => (v === null || v === undefined ? "" : Number(v).toFixed(digits));
const ago = (ts) => {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
};
const clock = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "");
const onlineText = (o) => (o === true ? "online" : o === false ? "offline" : "unknown");

// --- row helpers: what the table shows and sorts by ------------------------------------
const sum = (xs) => xs.reduce((a, b) => a + (b || 0), 0);
const maxOf = (xs) => { const v = xs.filter((x) => x !== null && x !== undefined); return v.length ? Math.max(...v) : null; };
const cell = {
  id: (r) => r.id,
  online: (r) => onlineText(r.online),
  last_seen: (r) => r.last_seen || 0,
  group: (r) => r.groups.join(", "),
  pipelines: (r) => r.pipelines.map((p) => `${p.name}: ${p.model || "?"} ${p.version || ""} ${p.state || ""}`).join(" · "),
  fps: (r) => (r.pipelines.length ? sum(r.pipelines.map((p) => p.fps)) : null),
  p95: (r) => maxOf(r.pipelines.map((p) => p.p95_ms)),
  accelerator: (r) => [...new Set(r.pipelines.map((p) => p.accelerator).filter(Boolean))].join(", "),
  failovers: (r) => sum(r.pipelines.map((p) => p.failovers)),
  cpu_temp_c: (r) => r.cpu_temp_c,
  outbox: (r) => r.outbox,
};
const failed = (r) => r.online === false || r.rollout.failed || r.pipelines.some((p) => p.state === "failed");

// --- connection ---------------------------------------------------------------------------
async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
  };
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) { location.href = "/login"; throw new Error("log in first"); }
  const text = await response.text();
  let data;
  try { data = JSON.parse(text); } catch { data = { error: text.trim() || response.statusText }; }
  if (!response.ok && !data.error) data.error = response.statusText;
  return data;
}

function connect(delay = 500) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  state.socket = socket;
  socket.onopen = () => { setLink(true); delay = 500; watch(); };
  socket.onmessage = (e) => {
    const t0 = performance.now();
    const msg = JSON.parse(e.data);
    receive(msg);
    if (msg.type === "rows") note(stats.apply, performance.now() - t0);
  };
  socket.onclose = () => { setLink(false); setTimeout(() => connect(Math.min(delay * 2, 8000)), delay); };
}
function setLink(up) {
  const link = $("#link");
  link.textContent = up ? "live" : "reconnecting";
  link.className = `badge ${up ? "on" : "off"}`;
}
function watch() {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ watch: state.route.view === "device" ? state.route.id : null }));
  }
}

function receive(msg) {
  if (msg.type === "fleet") {
    state.rows = new Map(msg.rows.map((r) => [r.id, r]));
    state.models = msg.models; state.groups = msg.groups; state.tracks = msg.tracks.slice(-200);
    changed();
  } else if (msg.type === "rows") {
    for (const r of msg.rows) state.rows.set(r.id, r);
    if (msg.models) state.models = msg.models;
    if (msg.groups) state.groups = msg.groups;
    changed();
  } else if (msg.type === "tracks") {
    state.tracks = state.tracks.concat(msg.tracks).slice(-200);
    if (state.route.view === "events") renderTracks();
  } else if (msg.type === "device" && msg.row && msg.row.id === state.route.id) {
    takeDevice(msg);
  }
}

function changed() {
  state.dirty = true;
  requestAnimationFrame(render);
}

// --- the fleet table ------------------------------------------------------------------------
function visibleRows() {
  const text = $("#filter").value.trim().toLowerCase();
  const which = $("#state-filter").value;
  const { key, dir } = state.sort;
  const value = cell[key];
  const rows = [];
  for (const r of state.rows.values()) {
    if (which === "online" && r.online !== true) continue;
    if (which === "offline" && r.online !== false) continue;
    if (which === "failed" && !failed(r)) continue;
    if (text && !`${r.id} ${cell.group(r)} ${cell.pipelines(r)} ${cell.accelerator(r)} ${onlineText(r.online)}`.toLowerCase().includes(text)) continue;
    rows.push(r);
  }
  rows.sort((a, b) => {
    const x = value(a), y = value(b);
    if (x === y) return a.id < b.id ? -1 : 1;
    if (x === null || x === undefined || x === "") return 1;
    if (y === null || y === undefined || y === "") return -1;
    return (x < y ? -1 : 1) * dir;
  });
  return rows;
}

function render() {
  if (!state.dirty) return;
  const t0 = performance.now();
  renderViews();
  note(stats.render, performance.now() - t0);
}

function renderViews() {
  state.dirty = false;
  const online = [...state.rows.values()].filter((r) => r.online === true).length;
  $("#summary").textContent = `${state.rows.size} devices, ${online} online`;
  if (state.route.view === "fleet") { state.sorted = visibleRows(); renderFleet(); }
  if (state.route.view === "rollouts") renderRollouts();
  if (state.route.view === "device" && state.rows.has(state.route.id)) renderDeviceHead(state.rows.get(state.route.id));
}

function renderFleet() {
  const scroller = $("#fleet-scroll");
  const body = $("#fleet-body");
  const rows = state.sorted;
  $("#count").textContent = `${rows.length} shown`;
  const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_H) - 5);
  const count = Math.ceil(scroller.clientHeight / ROW_H) + 10;
  const last = Math.min(rows.length, first + count);
  const fragment = document.createDocumentFragment();
  fragment.append(el("tr", { style: `height:${first * ROW_H}px`, class: "spacer" }));
  for (let i = first; i < last; i++) fragment.append(fleetRow(rows[i]));
  fragment.append(el("tr", { style: `height:${(rows.length - last) * ROW_H}px`, class: "spacer" }));
  body.replaceChildren(fragment);
}

function fleetRow(r) {
  const tr = el("tr", { "data-device": r.id });
  const pipelines = cell.pipelines(r);
  const failedPipe = r.pipelines.some((p) => p.state === "failed");
  tr.append(
    el("td", { text: r.id }),
    el("td", { class: `state ${onlineText(r.online)}`, text: onlineText(r.online) }),
    el("td", { class: "seen", text: ago(r.last_seen) }),
    el("td", { text: cell.group(r) }),
    el("td", { class: failedPipe ? "failed" : "", title: pipelines, text: pipelines }),
    el("td", { class: "num fps", text: fmt(cell.fps(r)) }),
    el("td", { class: "num", text: fmt(cell.p95(r), 2) }),
    el("td", { text: cell.accelerator(r) }),
    el("td", { class: "num", text: r.pipelines.length ? String(cell.failovers(r)) : "" }),
    el("td", { class: "num", text: fmt(r.cpu_temp_c) }),
    el("td", { class: "num", text: r.outbox === null ? "" : String(r.outbox) }),
  );
  return tr;
}

// --- the device page ---------------------------------------------------------------------------
function takeDevice(msg) {
  const fresh = !state.device || state.deviceId !== msg.row.id;
  if (fresh) { state.history = []; state.events = []; state.deviceId = msg.row.id; }
  state.device = msg;
  state.history = state.history.concat(msg.telemetry).filter((p) => p.ts >= Date.now() / 1000 - 3600);
  state.events = state.events.concat(msg.events).slice(-100);
  state.rows.set(msg.row.id, msg.row);
  renderDevice(fresh);
}

function renderDeviceHead(r) {
  $("#dev-name").textContent = r.id;
  const badge = $("#dev-state");
  badge.textContent = onlineText(r.online);
  badge.className = `badge ${r.online ? "on" : "off"}`;
  const accelerators = state.device ? state.device.accelerators : [];
  $("#dev-facts").replaceChildren(
    el("span", { text: "agent " }), el("b", { text: r.version || "?" }),
    el("span", { text: " · group " }), el("b", { text: r.groups.join(", ") || "none" }),
    el("span", { text: " · last seen " }), el("b", { class: "seen", "data-ts": r.last_seen || "", text: ago(r.last_seen) }),
    el("span", { text: " · CPU " }), el("b", { text: r.cpu_temp_c === null ? "n/a" : `${fmt(r.cpu_temp_c)} °C` }),
    el("span", { text: " · outbox " }), el("b", { text: r.outbox === null ? "n/a" : String(r.outbox) }),
    el("span", { text: " · accelerators " }),
    el("b", { text: accelerators.map((a) => `${a.name}: ${a.state}`).join(", ") || "n/a" }),
  );
}

function renderDevice(fresh) {
  const d = state.device;
  renderDeviceHead(d.row);
  const holder = $("#dev-pipelines");
  if (fresh) holder.replaceChildren();
  for (const p of d.row.pipelines) {
    let box = holder.querySelector(`[data-pipeline="${CSS.escape(p.name)}"]`);
    if (!box) { box = pipelineBox(p, holder.children.length === 0); holder.append(box); }
    const acc = p.failovers ? `${p.accelerator} (${p.failovers} failover${p.failovers > 1 ? "s" : ""})` : p.accelerator;
    box.querySelector(".head").textContent =
      `${p.name}: ${p.model || "?"} ${p.version || ""} · ${p.state || "?"} · ${fmt(p.fps)} fps · p95 ${fmt(p.p95_ms, 2)} ms · ${acc || ""}${p.error ? " · " + p.error : ""}`;
    const results = d.results[p.name] || [];
    const last = results[results.length - 1];
    const pre = box.querySelector(".result");
    pre.textContent = last ? describe(last) + `\n\n${p.results} results received` : "waiting for results...";
    pre.dataset.seq = last ? String(last.seq) : "";
    const summary = d.summaries[p.name];
    box.querySelector(".summary").textContent = summary ? `now: ${JSON.stringify(summary.counts)} ${summary.zones && Object.keys(summary.zones).length ? "zones " + JSON.stringify(summary.zones) : ""}` : "";
  }
  renderPlots();
  const body = $("#dev-events");
  body.replaceChildren(...state.events.slice().reverse().slice(0, 50).map((e) => {
    const detail = e.reason || e.code || (e.progress !== undefined ? `${Math.round(e.progress * 100)}%` : "") || [e.model, e.version].filter(Boolean).join(" ") || (e.from ? `${e.from} -> ${e.to}` : "");
    return el("tr", { class: e.failed ? "fail" : "" }, el("td", { text: clock(e.ts) }), el("td", { text: e.pipeline || "" }),
      el("td", { text: e.type || "" }), el("td", { text: `${e.code ? e.code + ": " : ""}${detail}` }));
  }));
  $("#dev-model").textContent = `desired: ${JSON.stringify(d.desired, null, 1)}\nreported: ${JSON.stringify(d.reported, null, 1)}`;
}

function pipelineBox(p, liveOn) {
  const img = el("img", { class: "live", alt: `live view of ${p.name}` });
  img.hidden = true;
  const live = el("input", { type: "checkbox" });
  live.checked = liveOn;
  const box = el("div", { class: "panel pipeline", "data-pipeline": p.name },
    el("div", {}, el("label", {}, live, " live view (a snapshot each second)"), img),
    el("div", {}, el("h3", { class: "head" }),
      el("div", { class: "toolbar" },
        ...[["snapshot", "Snapshot"], ["pipeline.stop", "Stop"], ["pipeline.start", "Start"], ["pipeline.restart", "Restart"], ["model.rollback", "Roll back model"]]
          .map(([cmd, label]) => el("button", { "data-cmd": cmd, "data-pipeline": p.name, class: cmd === "model.rollback" ? "danger" : "", text: label }))),
      el("div", { class: "summary" }),
      el("pre", { class: "result", id: `results-${p.name}` })));
  const refresh = () => {
    if (!live.checked || !box.isConnected || state.route.view !== "device") { img.dataset.running = ""; return; }
    img.dataset.running = "1";
    const next = new Image();
    next.onload = () => { img.src = next.src; img.hidden = false; setTimeout(refresh, 1000); };
    next.onerror = () => setTimeout(refresh, 3000);
    next.src = `/api/live/${encodeURIComponent(state.route.id)}/${encodeURIComponent(p.name)}?t=${Date.now()}`;
  };
  live.onchange = () => { img.hidden = !live.checked || !img.src; if (live.checked && !img.dataset.running) refresh(); };
  if (liveOn) setTimeout(refresh, 0);
  return box;
}

function describe(r) {
  const res = r.result || {};
  let text = `seq ${r.seq} at ${clock(r.ts)}`;
  if (r.type === "interval") return `${text}: ${r.frames} frames, ${JSON.stringify(r.labels)}`;
  if (Array.isArray(res.detections)) text += `\n${res.detections.length} detection(s): ` + res.detections.map((d) => `${d.label} ${fmt(d.score, 2)}`).join(", ");
  else if (Array.isArray(res.classes)) text += "\n" + res.classes.map((c) => `${c.label} ${c.score !== undefined ? fmt(c.score, 2) : fmt(c.fraction * 100, 0) + "%"}`).join(", ");
  else if (res.score !== undefined) text += `\nanomaly score ${fmt(res.score, 3)} (threshold ${res.threshold}): ${res.anomaly ? "ANOMALY" : "normal"}`;
  else if (Array.isArray(res.poses)) text += `\n${res.poses.length} pose(s)`;
  if (r.latency_ms) text += `\ninvoke ${fmt(r.latency_ms.invoke, 2)} ms`;
  return text;
}

// --- plots: drawn on <canvas>, no library ----------------------------------------------------------
const COLOURS = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989"];
function renderPlots() {
  const h = state.history;
  const names = [...new Set(h.flatMap((p) => Object.keys(p.fps || {})))];
  const series = [
    ["cpu-temp", "CPU temperature °C", [["cpu", (p) => p.cpu_temp_c]]],
    ["cpu", "CPU %", [["cpu", (p) => p.cpu_percent]]],
    ["fps", "frames per second", names.map((n) => [n, (p) => (p.fps || {})[n]])],
    ["p95", "p95 invoke latency ms", names.map((n) => [n, (p) => (p.p95_ms || {})[n]])],
    ["outbox", "outbox backlog", [["outbox", (p) => p.outbox_depth]]],
  ];
  const holder = $("#plots");
  for (const [id, title, lines] of series) {
    let fig = holder.querySelector(`[data-plot="${id}"]`);
    if (!fig) {
      fig = el("figure", { "data-plot": id }, el("figcaption"), el("canvas", { width: 720, height: 280 }));
      holder.append(fig);
    }
    const lastValues = lines.map(([n, f]) => { const p = h[h.length - 1]; const v = p ? f(p) : null; return `${lines.length > 1 ? n + " " : ""}${v === null || v === undefined ? "n/a" : fmt(v, 2)}`; });
    fig.querySelector("figcaption").textContent = `${title}: ${lastValues.join(", ") || "no data"}`;
    drawPlot(fig.querySelector("canvas"), h, lines);
  }
}

function drawPlot(canvas, points, lines) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 40;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "20px system-ui"; ctx.fillStyle = "#667"; ctx.strokeStyle = "#d8dce2"; ctx.lineWidth = 1;
  // The last hour at most; less while there is less (at least 5 minutes), so that the
  // first points of a device just seen are not squeezed against the right edge.
  const now = Date.now() / 1000;
  const first = points.length ? points[0].ts : now;
  const span = Math.min(3600, Math.max(300, now - first));
  const t0 = now - span;
  const values = points.flatMap((p) => lines.map(([, f]) => f(p))).filter((v) => typeof v === "number");
  if (!values.length) { ctx.fillText("no data yet", pad, H / 2); return; }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi === lo) { hi += 1; lo = Math.max(0, lo - 1); }
  const x = (t) => pad + ((t - t0) / span) * (W - pad - 10);
  const y = (v) => H - 25 - ((v - lo) / (hi - lo)) * (H - 45);
  ctx.beginPath(); ctx.moveTo(pad, 10); ctx.lineTo(pad, H - 25); ctx.lineTo(W - 10, H - 25); ctx.stroke();
  ctx.fillText(fmt(hi, 1), 2, 24); ctx.fillText(fmt(lo, 1), 2, H - 28);
  ctx.fillText(`-${Math.round(span / 60)} min`, pad, H - 4); ctx.fillText("now", W - 50, H - 4);
  lines.forEach(([, f], i) => {
    ctx.strokeStyle = COLOURS[i % COLOURS.length]; ctx.lineWidth = 2; ctx.beginPath();
    let started = false;
    for (const p of points) {
      const v = f(p);
      if (typeof v !== "number") { started = false; continue; }
      if (started) ctx.lineTo(x(p.ts), y(v)); else { ctx.moveTo(x(p.ts), y(v)); started = true; }
    }
    ctx.stroke();
    ctx.fillStyle = ctx.strokeStyle; // a dot per sample: telemetry comes every 30 s by default
    for (const p of points) { const v = f(p); if (typeof v === "number") ctx.fillRect(x(p.ts) - 3, y(v) - 3, 6, 6); }
  });
}

// --- commands: confirmed, then the reply shown ------------------------------------------------------
function confirmDialog(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

async function sendCommand(command, pipeline) {
  const device = state.route.id;
  const args = {};
  if (pipeline) args.pipeline = pipeline;
  const what = `${command}${pipeline ? " " + pipeline : ""}`;
  if (!(await confirmDialog(`Send ${what} to ${device}?`))) return;
  const panel = $("#reply-panel");
  panel.hidden = false;
  $("#reply-title").textContent = `${what} to ${device}: waiting...`;
  $("#reply").textContent = "";
  $("#reply-image").hidden = true;
  const answer = await api("/api/command", { device, command, args }).catch((e) => ({ error: String(e) }));
  if (answer.error) {
    $("#reply-title").textContent = `${what} to ${device}: no reply`;
    $("#reply").textContent = answer.error;
    return;
  }
  $("#reply-title").textContent = `${what} to ${device}: ${answer.reply.stage}`;
  $("#reply").textContent = JSON.stringify(answer.reply, null, 2);
  if (answer.image) { const img = $("#reply-image"); img.src = answer.image; img.hidden = false; }
}

// --- rollouts -----------------------------------------------------------------------------------------
function renderRollouts() {
  const kind = $("#deploy-kind").value;
  $("#deploy-targets").replaceChildren(...(kind === "group" ? state.groups : [...state.rows.keys()].sort()).slice(0, 2000).map((v) => el("option", { value: v })));
  const select = $("#deploy-model");
  const chosen = select.value;
  select.replaceChildren(...state.models.map((m) => el("option", { value: `${m.name} ${m.version}`, text: `${m.name} ${m.version}` })));
  if (chosen) select.value = chosen;
  const lines = [];
  const counts = { converged: 0, waiting: 0, failed: 0 };
  for (const r of [...state.rows.values()].sort((a, b) => (a.id < b.id ? -1 : 1))) {
    for (const [name, p] of Object.entries(r.rollout.pipelines)) {
      if (p.status === "unmanaged") continue;
      counts[p.status] = (counts[p.status] || 0) + 1;
      lines.push([r, name, p]);
    }
  }
  const total = lines.length;
  $("#rollout-summary").replaceChildren(
    el("b", { text: `${counts.converged} of ${total}` }), el("span", { text: " pipelines converged · " }),
    el("b", { text: String(counts.waiting) }), el("span", { text: " waiting · " }),
    el("b", { class: counts.failed ? "failed" : "", text: String(counts.failed) }), el("span", { text: " failed" }),
  );
  const order = { failed: 0, waiting: 1, converged: 2 };
  lines.sort((a, b) => order[a[2].status] - order[b[2].status] || (a[0].id < b[0].id ? -1 : 1));
  $("#rollouts-body").replaceChildren(...lines.slice(0, 1000).map(([r, name, p]) => {
    const pct = p.progress === null || p.progress === undefined ? null : Math.round(p.progress * 100);
    return el("tr", { "data-rollout": `${r.id}/${name}` },
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(r.id)}`, text: r.id })),
      el("td", { class: onlineText(r.online), text: onlineText(r.online) }),
      el("td", { text: r.rollout.group || "" }),
      el("td", { text: name }),
      el("td", { text: p.desired ? `${p.desired.model} ${p.desired.version}` : "" }),
      el("td", { text: p.running ? `${p.running.model} ${p.running.version} (${p.running.state})` : "" }),
      el("td", { class: `status ${p.status}`, text: p.status }),
      el("td", {}, el("span", { class: "bar" }, el("i", { style: `width:${pct || 0}%` })), el("span", { class: "pct", text: pct === null ? "" : ` ${pct}%` })),
      el("td", { class: p.status === "failed" ? "failed" : "", text: p.detail })); // names the reason code
  }));
}

async function deploy(event) {
  event.preventDefault();
  const kind = $("#deploy-kind").value;
  const target = $("#deploy-target").value.trim();
  const pipeline = $("#deploy-pipeline").value.trim();
  const [model, version] = ($("#deploy-model").value || " ").split(" ");
  const downgrade = $("#deploy-downgrade").checked;
  if (!model || !version) { $("#deploy-result").textContent = "no published model: run `edgeagent model publish` first"; return; }
  const text = `Deploy ${model} ${version} to pipeline ${pipeline} of ${kind} ${target}${downgrade ? " (downgrade allowed)" : ""}?`;
  if (!(await confirmDialog(text))) return;
  const body = { pipeline, model, version, allow_downgrade: downgrade, [kind]: target };
  const answer = await api("/api/deploy", body).catch((e) => ({ error: String(e) }));
  $("#deploy-result").textContent = answer.error ? `failed: ${answer.error}` : `published on ${answer.topic}`;
}

// --- events ---------------------------------------------------------------------------------------------
function renderTracks() {
  $("#tracks-body").replaceChildren(...state.tracks.slice().reverse().map((t) => el("tr", {},
    el("td", { text: clock(t.end || t.start) }), el("td", {}, el("a", { href: `#/device/${encodeURIComponent(t.device)}`, text: t.device })),
    el("td", { text: t.pipeline }), el("td", { text: t.type || "" }), el("td", { text: t.label || "" }),
    el("td", { text: fmt(t.score, 2) }), el("td", { text: (t.zones || []).join(", ") }), el("td", { text: t.id || "" }))));
}

// --- routing and wiring ---------------------------------------------------------------------------------
function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [view, ...rest] = hash.split("/");
  state.route = view === "device" && rest.length ? { view: "device", id: decodeURIComponent(rest.join("/")) }
    : { view: ["rollouts", "events"].includes(view) ? view : "fleet" };
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${state.route.view}`;
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === state.route.view);
  if (state.route.view === "device") {
    if (state.deviceId !== state.route.id) { state.device = null; $("#dev-pipelines").replaceChildren(); $("#plots").replaceChildren(); $("#reply-panel").hidden = true; }
    if (state.rows.has(state.route.id)) renderDeviceHead(state.rows.get(state.route.id));
  }
  if (state.route.view === "events") renderTracks();
  watch();
  changed();
}

async function main() {
  const session = await api("/api/session");
  state.csrf = session.csrf;
  $("#broker").textContent = `broker ${session.broker}${session.tls ? " (TLS)" : ""}${session.user ? " as " + session.user : ""} · prefix ${session.prefix}`;
  $("#logout").hidden = !session.login;
  for (const th of document.querySelectorAll("#fleet th[data-sort]")) {
    th.onclick = () => {
      const key = th.dataset.sort;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      for (const h of document.querySelectorAll("#fleet th")) h.className = h.className.replace(/ ?sorted-\w+/, "");
      th.classList.add(state.sort.dir > 0 ? "sorted-asc" : "sorted-desc");
      changed();
    };
  }
  $("#fleet-scroll").addEventListener("scroll", () => { state.dirty = true; requestAnimationFrame(render); }, { passive: true });
  $("#filter").addEventListener("input", changed);
  $("#state-filter").addEventListener("change", changed);
  $("#fleet-body").addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-device]");
    if (tr) location.hash = `#/device/${encodeURIComponent(tr.dataset.device)}`;
  });
  $("#view-device").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-cmd]");
    if (button) sendCommand(button.dataset.cmd, button.dataset.pipeline);
  });
  $("#deploy").addEventListener("submit", deploy);
  $("#deploy-kind").addEventListener("change", () => { $("#deploy-target").placeholder = $("#deploy-kind").value === "group" ? "group name" : "device id"; changed(); });
  window.addEventListener("hashchange", route);
  setInterval(() => { // "last seen" ages without any message
    for (const td of document.querySelectorAll("#fleet-body td.seen")) {
      const r = state.rows.get(td.parentElement.dataset.device);
      if (r) td.textContent = ago(r.last_seen);
    }
  }, 1000);
  route();
  connect();
}

main();
