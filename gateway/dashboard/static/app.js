// gpu-fabric dashboard: vanilla JS, no build step. The access token lives in this tab's session storage
// and goes in the Authorization header of every request, the live feed (/api/v1/live) included.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TERMINAL = new Set(["completed", "failed", "cancelled", "expired"]);
const STATUS_OF = {
  "job.submitted": "queued", "job.assigned": "assigned", "job.started": "running", "job.completed": "completed",
  "job.failed": "failed", "job.requeued": "queued", "job.cancelled": "cancelled", "job.expired": "expired",
};
const state = { role: null, workers: new Map(), jobs: new Map(), live: null, jobId: null };

// --- Session and API ---------------------------------------------------------------------------

function tokens() { return JSON.parse(sessionStorage.getItem("gf.tokens") || "null"); }
function saveTokens(pair) { sessionStorage.setItem("gf.tokens", JSON.stringify(pair)); }

async function refresh() {
  const pair = tokens();
  if (!pair) return false;
  const res = await fetch("/api/v1/auth/refresh", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ refresh_token: pair.refresh_token }),
  });
  if (!res.ok) return false;
  saveTokens(await res.json());
  return true;
}

async function api(method, path, body, raw = false) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = { Authorization: `Bearer ${(tokens() || {}).access_token}` };
    if (body !== undefined) headers["content-type"] = "application/json";
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    if (res.status === 401 && attempt === 0 && await refresh()) continue;
    if (res.status === 401) { signOut(); throw new Error("signed out: the session ended"); }
    if (!res.ok) {
      const err = await res.json().catch(() => ({ message: res.statusText }));
      throw new Error(`${res.status}: ${err.message || err.code}`);
    }
    if (raw) return res;
    return res.status === 204 ? null : res.json();
  }
}

async function signIn(apiKey) {
  const res = await fetch("/api/v1/auth/token", {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ api_key: apiKey }),
  });
  if (!res.ok) throw new Error((await res.json().catch(() => ({}))).message || "sign-in refused");
  saveTokens(await res.json());
}

function signOut() {
  sessionStorage.removeItem("gf.tokens");
  if (state.live) state.live.abort();
  state.live = null;
  state.role = null;
  route();
}

// --- Live feed: server-sent events read with fetch (EventSource cannot send a header) -------------

async function openLive() {
  if (state.live) return;
  const controller = new AbortController();
  state.live = controller;
  try {
    const res = await fetch("/api/v1/live", {
      headers: { Authorization: `Bearer ${tokens().access_token}` }, signal: controller.signal,
    });
    if (res.status === 401 && await refresh()) { state.live = null; return openLive(); }
    if (!res.ok) throw new Error(`live feed: ${res.status}`);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r/g, "");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        dispatch(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;
  } finally {
    $("#live").textContent = "offline";
    $("#live").classList.remove("on");
  }
  // The stream ended (a gateway restart): open it again after a pause, and reload what was missed.
  if (state.live === controller) {
    state.live = null;
    setTimeout(() => { if (tokens()) { openLive(); loadHome(); } }, 2000);
  }
}

function dispatch(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (event === "ready") { $("#live").textContent = "live"; $("#live").classList.add("on"); }
  else if (event === "job") onJobEvent(payload);
  else if (event === "worker") later("workers", loadWorkers);
  else if (event === "heartbeat") onHeartbeat(payload);
  else if (event === "resync") loadHome();
}

const timers = {};
function later(key, fn, ms = 250) {
  clearTimeout(timers[key]);
  timers[key] = setTimeout(fn, ms);
}

// --- Workers -----------------------------------------------------------------------------------

async function loadWorkers() {
  if (state.role !== "operator") return;
  const page = await api("GET", "/api/v1/workers");
  state.workers = new Map(page.items.map((w) => [w.id, w]));
  renderWorkers();
}

function onHeartbeat(beat) {
  const worker = state.workers.get(beat.worker_id);
  if (!worker) { later("workers", loadWorkers); return; }  // a new worker: the read model names it
  Object.assign(worker, {
    in_flight: beat.in_flight, loaded_models: beat.loaded_models, last_heartbeat: new Date(beat.at_ms).toISOString(),
    capacity: beat.max_concurrency,
  });
  if (beat.gpus.length) worker.gpus = beat.gpus;
  later("render-workers", renderWorkers, 100);
}

const gib = (n) => (n / 2 ** 30).toFixed(1);

function renderWorkers() {
  const byRegion = {};
  for (const w of state.workers.values()) (byRegion[w.region] ||= []).push(w);
  const box = $("#workers");
  box.replaceChildren();
  if (!state.workers.size) { box.textContent = "No worker has registered yet."; return; }
  for (const region of Object.keys(byRegion).sort()) {
    const section = el("div", { class: "region" }, el("h3", {}, `Region ${region}`));
    const rows = byRegion[region].sort((a, b) => a.name.localeCompare(b.name)).map((w) => el("tr", { "data-worker": w.id },
      el("td", {}, w.name), el("td", {}, el("code", {}, w.id)), el("td", {}, el("span", { class: `status ${w.status}` }, w.status)),
      el("td", {}, `${w.in_flight.length}/${w.capacity}`),
      el("td", {}, w.gpus.map((g) => `${g.name} ${gib(g.memory_used_bytes)}/${gib(g.memory_total_bytes)} GiB`
        + (g.utilization_pct == null ? "" : ` ${g.utilization_pct}%`)).join(", ") || "CPU"),
      el("td", {}, w.loaded_models.join(", ") || "-"),
      el("td", {}, w.last_heartbeat ? ago(w.last_heartbeat) : "never")));
    section.append(table(["name", "id", "status", "jobs", "GPUs", "models", "heartbeat"], rows));
    box.append(section);
  }
}

// --- Jobs --------------------------------------------------------------------------------------

async function loadJobs() {
  const [recent, queued] = await Promise.all([
    api("GET", "/api/v1/jobs?limit=50"), api("GET", "/api/v1/jobs?status=queued&limit=100"),
  ]);
  state.jobs = new Map([...queued.items, ...recent.items].map((j) => [j.id, j]));
  renderJobs();
}

function onJobEvent({ job_id: id, event }) {
  let job = state.jobs.get(id);
  if (event.type === "job.submitted") {
    job = { id, type: event.job_type, status: "queued", region: event.region, worker_id: null,
            submitted_at: new Date(event.at_ms).toISOString() };
    state.jobs.set(id, job);
  } else if (!job) {
    return;  // a job older than the lists: it shows on its own page
  }
  if (STATUS_OF[event.type]) job.status = STATUS_OF[event.type];
  if (event.type === "job.assigned") Object.assign(job, { worker_id: event.worker_id, region: event.region });
  if (event.type === "job.requeued") job.worker_id = null;
  later("render-jobs", renderJobs, 50);
  if (id === state.jobId) later("job-page", () => loadJob(id), 100);
}

function renderJobs() {
  const jobs = [...state.jobs.values()].sort((a, b) => (b.submitted_at || "").localeCompare(a.submitted_at || ""));
  $("#jobs tbody").replaceChildren(...jobs.slice(0, 50).map((j) => el("tr", { "data-job": j.id },
    el("td", {}, el("a", { href: `#/jobs/${j.id}` }, j.id)), el("td", {}, j.type),
    el("td", {}, el("span", { class: `status ${j.status}` }, j.status)), el("td", {}, j.region || "any"),
    el("td", {}, j.worker_id || "-"), el("td", {}, j.submitted_at ? ago(j.submitted_at) : ""))));
  const counts = {};
  for (const j of jobs) if (j.status === "queued") counts[`${j.type}\t${j.region || "any"}`] = (counts[`${j.type}\t${j.region || "any"}`] || 0) + 1;
  const rows = Object.entries(counts).map(([key, n]) => el("tr", {}, ...key.split("\t").map((c) => el("td", {}, c)), el("td", {}, String(n))));
  $("#queue").replaceChildren(rows.length ? table(["type", "region", "queued"], rows) : "The queue is empty.");
}

async function submitJob(ev) {
  ev.preventDefault();
  $("#submit-error").textContent = "";
  try {
    const body = { type: $("#submit-type").value, params: JSON.parse($("#submit-params").value || "{}") };
    if ($("#submit-model").value) body.model = $("#submit-model").value;
    const submitted = await api("POST", "/api/v1/jobs", body);
    if (!state.jobs.has(submitted.id)) {
      state.jobs.set(submitted.id, { id: submitted.id, type: body.type, status: "queued", region: null, worker_id: null,
                                     submitted_at: new Date().toISOString() });
      renderJobs();
    }
  } catch (err) {
    $("#submit-error").textContent = err.message;
  }
}

async function loadJob(id) {
  try {
    // The explanation is the scheduler's (a queued job) or the log's; a page without it still shows the rest.
    const [job, history, placement] = await Promise.all([
      api("GET", `/api/v1/jobs/${id}`), api("GET", `/api/v1/jobs/${id}/events`),
      api("GET", `/api/v1/jobs/${id}/placement`).catch((err) => ({ summary: `no explanation: ${err.message}`, reasons: [] })),
    ]);
    if (state.jobId !== id) return;
    renderPlacement(placement);
    $("#job-id").textContent = job.id;
    $("#job-status").textContent = job.status;
    $("#job-status").className = `status ${job.status}`;
    $("#job-cancel").disabled = TERMINAL.has(job.status) || job.cancel_requested;
    $("#job-params").textContent = JSON.stringify({ type: job.type, model: job.model, region: job.region, params: job.params }, null, 2);
    await renderResult(job);
    $("#job-timeline").replaceChildren(...history.items.map(({ seq, event }) => el("li", { "data-event": event.type },
      el("time", {}, new Date(event.at_ms).toLocaleTimeString()), el("strong", {}, event.type), " ", describe(event),
      el("small", {}, ` #${seq}`))));
  } catch (err) {
    $("#job-error").textContent = err.message;
  }
}

function describe(event) {
  const parts = [];
  if (event.worker_id) parts.push(`worker ${event.worker_id}`);
  if (event.region) parts.push(`region ${event.region}`);
  if (event.attempt) parts.push(`attempt ${event.attempt}`);
  if (event.progress != null) parts.push(`${Math.round(event.progress * 100)}%`);
  if (event.error) parts.push(`${event.error.code}: ${event.error.message}`);
  if (event.reason) parts.push(event.reason);
  return parts.join(", ");
}

function renderPlacement(placement) {
  const parts = [el("p", { id: "placement-summary" }, placement.summary)];
  if (placement.rank) parts.push(el("p", {}, `Chosen for: ${placement.rank}`));
  if (placement.reasons.length) {
    parts.push(el("ul", { id: "placement-reasons" }, ...placement.reasons.map((r) => el("li", {},
      `${r.workers} worker${r.workers === 1 ? "" : "s"}: ${r.reason}`, el("small", {}, ` (${r.change})`)))));
  }
  $("#job-placement").replaceChildren(...parts);
}

async function renderResult(job) {
  const box = $("#job-result");
  if (job.status !== "completed") {
    box.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "Not finished yet.";
    return;
  }
  if (job.type === "image") {
    const blob = await (await api("GET", `/api/v1/jobs/${job.id}/result/0`, undefined, true)).blob();
    box.replaceChildren(el("img", { src: URL.createObjectURL(blob), alt: "the generated image" }));
    return;
  }
  const text = job.result && typeof job.result.text === "string" ? job.result.text : JSON.stringify(job.result, null, 2);
  box.replaceChildren(el("pre", {}, text));
}

// --- Operator page -----------------------------------------------------------------------------

async function loadAdmin() {
  try {
    const keys = await api("GET", "/api/v1/admin/keys");
    $("#keys tbody").replaceChildren(...keys.items.map((k) => el("tr", { "data-key": k.key_id },
      el("td", {}, el("code", {}, k.key_id)), el("td", {}, k.name), el("td", {}, k.role),
      el("td", {}, new Date(k.created_at_ms).toLocaleString()),
      el("td", {}, k.revoked_at_ms ? new Date(k.revoked_at_ms).toLocaleString() : ""),
      el("td", {}, k.revoked_at_ms ? "" : button("Revoke", () => revokeKey(k.key_id))))));
  } catch (err) {
    $("#admin-error").textContent = err.message;
  }
}

async function revokeKey(keyId) {
  if (!confirm(`Revoke key ${keyId}? Its holders are refused at once.`)) return;
  await api("DELETE", `/api/v1/admin/keys/${keyId}`).catch((err) => { $("#admin-error").textContent = err.message; });
  loadAdmin();
}

// --- Views -------------------------------------------------------------------------------------

async function loadHome() {
  try {
    await Promise.all([loadWorkers(), loadJobs()]);
  } catch (err) {
    $("#submit-error").textContent = err.message;
  }
}

async function route() {
  const hash = location.hash || "#/";
  for (const view of document.querySelectorAll("main > section")) view.hidden = true;
  if (!tokens()) { $("#nav").hidden = true; $("#view-signin").hidden = false; return; }
  if (!state.role) {
    // An operator may list workers; a client's token is refused with 403.
    const res = await fetch("/api/v1/workers", { headers: { Authorization: `Bearer ${tokens().access_token}` } });
    if (res.status === 401 && !(await refresh())) { signOut(); return; }
    state.role = res.status === 403 ? "client" : "operator";
    await loadHome();
    openLive();
  }
  $("#nav").hidden = false;
  $("#nav-admin").hidden = state.role !== "operator";
  $("#workers-panel").hidden = state.role !== "operator";
  const job = hash.match(/^#\/jobs\/([A-Za-z0-9_.-]+)$/);
  state.jobId = job ? job[1] : null;
  if (job) { $("#view-job").hidden = false; $("#job-error").textContent = ""; loadJob(job[1]); }
  else if (hash === "#/admin" && state.role === "operator") { $("#view-admin").hidden = false; loadAdmin(); }
  else { $("#view-home").hidden = false; renderJobs(); renderWorkers(); }
}

// --- Helpers -----------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))), el("tbody", {}, ...rows));
}

function button(label, onClick) {
  const b = el("button", { type: "button" }, label);
  b.addEventListener("click", onClick);
  return b;
}

function ago(iso) {
  const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
  return s < 60 ? `${s}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : new Date(iso).toLocaleString();
}

// --- Wiring ------------------------------------------------------------------------------------

$("#signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("#signin-error").textContent = "";
  try {
    await signIn($("#api-key").value.trim());
    $("#api-key").value = "";
    route();
  } catch (err) {
    $("#signin-error").textContent = err.message;
  }
});
$("#sign-out").addEventListener("click", signOut);
$("#submit-form").addEventListener("submit", submitJob);
$("#job-cancel").addEventListener("click", async () => {
  try {
    await api("POST", `/api/v1/jobs/${state.jobId}/cancel`);
    loadJob(state.jobId);
  } catch (err) {
    $("#job-error").textContent = err.message;
  }
});
$("#key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const created = await api("POST", "/api/v1/admin/keys", { name: $("#key-name").value, role: $("#key-role").value });
    $("#key-created").textContent = `New ${created.role} key (shown once): ${created.api_key}`;
    loadAdmin();
  } catch (err) {
    $("#admin-error").textContent = err.message;
  }
});
$("#enroll-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const created = await api("POST", "/api/v1/admin/workers/enroll", { ttl_s: Number($("#enroll-ttl").value) });
    $("#enroll-token").textContent = `Enrollment token (one use): ${created.enrollment_token}`;
  } catch (err) {
    $("#admin-error").textContent = err.message;
  }
});
window.addEventListener("hashchange", route);
setInterval(() => { if (!$("#view-home").hidden) renderWorkers(); }, 5000);  // "3s ago" ages; no request
route();
