// Bailan's web page: plain JavaScript, no build step, no other origin (see app/routes/web.py).
"use strict";

const KEY_STORE = "bailan.apiKey";
const HISTORY_STORE = "bailan.history";
const HISTORY_MAX = 50;
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const $ = (id) => document.getElementById(id);

// The job on screen; a view or a stream of another job is ignored.
let current = null; // {id, stream: AbortController, frames: Map(step -> blob URL), chain: Promise, imagesShown}

// A key is sent only if a header can carry it (printable ASCII): fetch() throws on anything else.
const KEY_CHARS = /^[\x21-\x7e]+$/;

function authHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORE);
  return key && KEY_CHARS.test(key) ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  let body = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("application/json")) body = await response.json();
  return { response, body };
}

// FastAPI's 422 lists {loc, msg}; every other error is {detail: "..."}.
function errorText(body, response) {
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("\n");
  }
  if (body && body.detail) return String(body.detail);
  return `HTTP ${response.status}`;
}

// ---------------------------------------------------------------- the form

async function loadConfig() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  let response = null;
  let body = null;
  try {
    // The page's own settings need no key (README, "The web page").
    response = await fetch("/web/config.json");
    body = response.ok ? await response.json() : null;
  } catch (exc) { /* unreachable: as for an error answer */ }
  if (!body) {
    // The key field stays reachable (a wrong key must be fixable), and the settings come later.
    $("key-box").hidden = false;
    setTimeout(() => loadConfig().catch(() => {}), 5000);
    return;
  }
  $("key-box").hidden = !body.keys_required && !localStorage.getItem(KEY_STORE);
  // Steps, guidance and sampler left empty are the model's defaults (/v1/models), applied by the server.
  $("steps").max = body.max_steps;
  $("width").max = body.max_width;
  $("height").max = body.max_height;
  $("num_images").max = body.max_images;
  // The model: the server's default first (a job that names none runs there); hidden with one model.
  const models = $("model");
  const fallback = body.default_model ? `server default (${body.default_model})` : "any worker";
  models.replaceChildren(new Option(fallback, ""), ...body.models.map((name) => new Option(name, name)));
  $("model-box").hidden = body.models.length < 2;
  const select = $("scheduler");
  const chosen = select.value;
  select.replaceChildren(new Option("model's", ""),
    ...body.schedulers.map((name) => new Option(name, name, false, name === chosen)));
}

function requestBody() {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value };
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  for (const name of ["width", "height", "steps", "seed", "num_images", "preview_every"]) {
    const text = $(name).value.trim();
    if (text !== "") body[name] = Number(text);
  }
  if ($("model").value) body.model = $("model").value;
  const guidance = $("guidance_scale").value.trim();
  if (guidance !== "") body.guidance_scale = Number(guidance);
  return body;
}

async function submitJob(event) {
  event.preventDefault();
  const error = $("form-error");
  error.hidden = true;
  $("submit").disabled = true;
  try {
    const { response, body } = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    if (!response.ok) {
      error.textContent = errorText(body, response);
      error.hidden = false;
      return;
    }
    remember(body);
    openJob(body);
  } catch (exc) {
    error.textContent = `could not reach the API: ${exc}`;
    error.hidden = false;
  } finally {
    $("submit").disabled = false;
  }
}

// ---------------------------------------------------------------- one job on screen

function openJob(view) {
  if (current) {
    current.stream.abort();
    // Its frames and images were blob: URLs; nothing shows them now.
    for (const url of [...current.frames.values(), ...current.images]) if (url) URL.revokeObjectURL(url);
  }
  current = { id: view.id, stream: new AbortController(), frames: new Map(), images: [], chain: Promise.resolve(),
              imagesShown: false };
  $("job").hidden = false;
  $("job-id").textContent = view.id;
  for (const id of ["frames", "images", "params"]) $(id).replaceChildren();
  $("preview-box").hidden = true;
  $("params-box").hidden = true;
  $("job-error").hidden = true;
  render(view);
  if (!TERMINAL.has(view.status)) follow(current);
}

function render(view) {
  if (!current || view.id !== current.id) return;
  $("job-status").textContent = view.status + (view.cancel_requested && !TERMINAL.has(view.status) ? " (canceling)" : "");
  $("job-status").dataset.status = view.status;
  const total = view.progress.total_steps || 1;
  $("job-progress").max = total;
  $("job-progress").value = view.progress.step;
  $("job-steps").textContent = `step ${view.progress.step} / ${view.progress.total_steps}`;
  let queue = "";
  if (view.status === "queued" && view.queue_position != null) {
    queue = `position ${view.queue_position} in the queue`;
    queue += view.eta_s != null ? ` · done in about ${formatSeconds(view.eta_s)}` : " · estimating the wait…";
  }
  $("job-queue").textContent = queue;
  $("job-queue").dataset.eta = view.eta_s != null ? String(view.eta_s) : "";
  const cancel = $("cancel");
  cancel.hidden = TERMINAL.has(view.status);
  cancel.disabled = view.cancel_requested;
  if (view.error) {
    $("job-error").textContent = `${view.error.code}: ${view.error.message}`;
    $("job-error").hidden = false;
  } else {
    $("job-error").hidden = true; // a stream's error (Redis) is past once a view arrives again
  }
  const job = current;
  for (const preview of view.previews) {
    if (job.frames.has(preview.step)) continue;
    job.frames.set(preview.step, null);
    // One after another, so frames appear in step order; one that fails leaves the rest to come.
    job.chain = job.chain.then(() => showFrame(job, preview)).catch(() => {});
  }
  if (view.params) showParams(view);
  if (view.status === "succeeded" && !job.imagesShown) {
    job.imagesShown = true;
    job.chain = job.chain.then(() => showImages(job, view)).catch(() => {});
  }
  updateHistory(view);
}

function formatSeconds(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  return `${Math.round(seconds / 60)} min`;
}

// The bytes at `path` as an object URL, or why not: the API's answer (status 0 when the
// network failed: a missing frame, not a stopped page).
async function fetchBlob(path) {
  try {
    const response = await fetch(path, { headers: authHeaders() });
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (exc) { /* not the API's JSON (a proxy's page) */ }
      return { url: null, status: response.status, reason: errorText(body, response) };
    }
    return { url: URL.createObjectURL(await response.blob()), status: response.status, reason: "" };
  } catch (exc) {
    return { url: null, status: 0, reason: "" };
  }
}

async function blobUrl(path) {
  return (await fetchBlob(path)).url;
}

async function showFrame(job, preview) {
  const url = await blobUrl(preview.url);
  if (job !== current && url) URL.revokeObjectURL(url);
  if (!url || job !== current) return;
  job.frames.set(preview.step, url);
  const thumb = new Image();
  thumb.src = url;
  thumb.alt = `preview at step ${preview.step}`;
  thumb.title = `step ${preview.step}`;
  thumb.dataset.step = preview.step;
  $("frames").append(thumb);
  $("preview").src = url;
  $("preview").dataset.step = preview.step;
  $("preview-caption").textContent = `preview at step ${preview.step}`;
  $("preview-box").hidden = false;
}

async function showImages(job, view) {
  const ext = (view.params && view.params.output_format) || "png";
  for (const image of view.images) {
    const fetched = await fetchBlob(image.url);
    const url = fetched.url;
    if (job !== current) {
      if (url) URL.revokeObjectURL(url);
      return;
    }
    if (!url) {
      // Gone for good (expired): the API says so, and a retry cannot help. Anything else may pass.
      showJobError(fetched.status === 404
        ? `image ${image.index}: ${fetched.reason}`
        : `image ${image.index} could not be loaded; open the job again to retry`);
      continue;
    }
    job.images.push(url);
    const figure = document.createElement("figure");
    const img = new Image();
    img.src = url;
    img.alt = `image ${image.index}`;
    img.dataset.index = image.index;
    const link = document.createElement("a");
    link.href = url;
    link.download = `bailan-${view.id}-${image.index}.${ext}`;
    link.textContent = `Download (seed ${image.seed})`;
    const caption = document.createElement("figcaption");
    caption.append(link);
    figure.append(img, caption);
    $("images").append(figure);
  }
}

function showParams(view) {
  const rows = [];
  for (const [name, value] of Object.entries(view.params)) {
    if (value === null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    dd.dataset.param = name;
    rows.push(dt, dd);
  }
  if (view.model) {
    const dt = document.createElement("dt");
    dt.textContent = "model";
    const dd = document.createElement("dd");
    dd.textContent = view.model;
    rows.push(dt, dd);
  }
  $("params").replaceChildren(...rows);
  $("params-box").hidden = false;
}

// The event stream, read with fetch(): EventSource cannot send the Authorization header.
async function follow(job) {
  let delay = 500;
  while (job === current && !job.stream.signal.aborted) {
    let ended = false;
    try {
      const response = await fetch(`/v1/jobs/${job.id}/events`, {
        headers: authHeaders({ Accept: "text/event-stream" }),
        signal: job.stream.signal,
      });
      if (response.status === 401 || response.status === 404) {
        const body = await response.json().catch(() => null);
        showJobError(errorText(body, response));
        return;
      }
      if (response.ok) {
        ended = await readEvents(job, response.body);
        delay = 500;
      }
    } catch (exc) {
      if (job.stream.signal.aborted) return;
    }
    if (ended) return;
    // Dropped, refused (429: too many streams) or unreachable: read once, then try again.
    await pollOnce(job);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 5000);
  }
}

async function pollOnce(job) {
  try {
    const { response, body } = await api(`/v1/jobs/${job.id}`);
    if (response.ok) {
      render(body);
      if (TERMINAL.has(body.status)) job.stream.abort();
    }
  } catch (exc) { /* the next try says more */ }
}

// Server-sent events: blocks separated by a blank line, "event:" and "data:" lines, ":" comments.
// Returns true once the job reached a final state or is gone.
async function readEvents(job, stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (event === "job") {
        const view = JSON.parse(data.join("\n"));
        render(view);
        if (TERMINAL.has(view.status)) {
          reader.cancel();
          return true;
        }
      } else if (event === "gone" || event === "error") {
        showJobError(data.join("\n"));
        reader.cancel();
        return event === "gone";
      }
    }
  }
}

function showJobError(text) {
  $("job-error").textContent = text;
  $("job-error").hidden = false;
}

async function cancelJob() {
  if (!current) return;
  $("cancel").disabled = true;
  try {
    const { response, body } = await api(`/v1/jobs/${current.id}/cancel`, { method: "POST" });
    if (response.ok) render(body);
    else showJobError(errorText(body, response));
  } catch (exc) {
    $("cancel").disabled = false;
    showJobError(`could not reach the API: ${exc}`);
  }
}

// ---------------------------------------------------------------- history (this browser's jobs)

function history() {
  try {
    const list = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]");
    return Array.isArray(list) ? list : [];
  } catch (exc) {
    return [];
  }
}

function saveHistory(list) {
  localStorage.setItem(HISTORY_STORE, JSON.stringify(list.slice(0, HISTORY_MAX)));
  renderHistory();
}

function remember(view) {
  const list = history().filter((item) => item.id !== view.id);
  list.unshift({ id: view.id, prompt: view.params ? view.params.prompt : "", at: view.created_at, status: view.status });
  saveHistory(list);
}

function updateHistory(view) {
  const list = history();
  const item = list.find((entry) => entry.id === view.id);
  if (item && item.status !== view.status) {
    item.status = view.status;
    saveHistory(list);
  }
}

function renderHistory() {
  const items = history().map((entry) => {
    const li = document.createElement("li");
    li.dataset.id = entry.id;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Open";
    button.addEventListener("click", () => reopen(entry.id));
    const text = document.createElement("span");
    const when = entry.at ? new Date(entry.at).toLocaleString() : "";
    text.textContent = ` ${entry.prompt} — ${entry.status} ${when ? "· " + when : ""}`;
    li.append(button, text);
    return li;
  });
  $("history").replaceChildren(...items);
}

async function reopen(id) {
  let response;
  let body;
  try {
    ({ response, body } = await api(`/v1/jobs/${id}`));
  } catch (exc) {
    $("form-error").textContent = `could not reach the API: ${exc}`;
    $("form-error").hidden = false;
    return;
  }
  if (response.ok) {
    openJob(body);
    return;
  }
  if (response.status === 404) {
    const list = history();
    const item = list.find((entry) => entry.id === id);
    if (item) { item.status = "expired"; saveHistory(list); }
  }
  $("form-error").textContent = errorText(body, response);
  $("form-error").hidden = false;
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("job-form").addEventListener("submit", submitJob);
  $("cancel").addEventListener("click", cancelJob);
  $("api-key").addEventListener("input", () => {
    const key = $("api-key").value.trim();
    const usable = !key || KEY_CHARS.test(key);
    $("api-key").setCustomValidity(usable ? "" : "an API key has only printable ASCII characters");
    $("api-key").reportValidity();
    if (key && usable) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
  });
  $("clear-history").addEventListener("click", () => saveHistory([]));
  renderHistory();
  loadConfig().catch(() => {});
});
