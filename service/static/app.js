// The operators' page: sign in with the admin token, review kept predictions, upload labelled
// images, retrain, and promote or roll back model versions, all through the admin API.
//
// Rules this file keeps: the token lives in sessionStorage only and travels only in the
// Authorization header (never in a URL); every string that comes from a user or the server is put
// in the page with textContent or DOM APIs (never innerHTML); images of kept predictions are
// fetched with the token and shown as blob: URLs, revoked when they leave the page.

const TOKEN_KEY = "transfer-serve.admin-token";
const JOB_KEY = "transfer-serve.job";
const TABS = ["review", "upload", "train", "versions"];
const FINAL_STATES = new Set(["succeeded", "rejected", "failed"]);
const UPLOAD_CONCURRENCY = 4;
const POLL_MS = 1000;
// API routes relative to the page's own location (/ui/ -> /), so a proxy prefix is kept
const ROOT = new URL("../", import.meta.url);

const $ = (id) => document.getElementById(id);

// -- talking to the admin API ---------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** An admin API call: JSON (or FormData) in, the parsed JSON body (or a Blob) out; an ApiError
 * with the server's own message otherwise. A 401/403 after sign-in signs out. */
async function api(path, { method = "GET", json, form, blob = false, token } = {}) {
  const headers = { Authorization: `Bearer ${token ?? sessionStorage.getItem(TOKEN_KEY) ?? ""}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(new URL(path, ROOT), { method, headers, body, cache: "no-store", credentials: "omit" });
  } catch (error) {
    throw new ApiError(0, `the service cannot be reached (${error.message})`, null);
  }
  if (response.ok && blob) return response.blob();
  const isJson = (response.headers.get("content-type") || "").includes("application/json");
  const data = isJson ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    const message = (data && typeof data.error === "string") ? data.error
      : `${response.status} ${response.statusText || "error"}`;
    const error = new ApiError(response.status, message, data);
    if ((response.status === 401 || response.status === 403) && token === undefined) signOut(message);
    throw error;
  }
  return data;
}

// -- small DOM helpers ----------------------------------------------------------------------------

/** An element with attributes (``on*`` become listeners) and children (strings become text). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const percent = (x) => (typeof x === "number" ? `${(100 * x).toFixed(1)} %` : "–");
const number = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : "–");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

let noticeTimer;
/** A line under the tabs: what just happened, or (``error``) what went wrong. */
function notice(text, error = false) {
  const node = $("notice");
  node.textContent = text;
  node.classList.toggle("error", error);
  clearTimeout(noticeTimer);
  if (!error) noticeTimer = setTimeout(() => { node.textContent = ""; }, 8000);
}

// -- signing in and out ---------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  const error = $("sign-in-error");
  error.hidden = true;
  if (!token) return;
  $("sign-in-button").disabled = true;
  try {
    await api("admin/models", { token });  // checks the token; nothing is stored unless it works
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    await enter();
  } catch (failure) {
    error.textContent = failure.status === 403 || failure.status === 401
      ? `Not signed in: ${failure.message}` : `Cannot sign in: ${failure.message}`;
    error.hidden = false;
  } finally {
    $("sign-in-button").disabled = false;
  }
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(JOB_KEY);
  stopPolling();
  // nothing seen while signed in stays in the page
  clearReview();
  for (const id of ["upload-list", "versions", "job-metrics"]) $(id).replaceChildren();
  $("label-counts").tBodies[0].replaceChildren();
  for (const id of ["upload-summary", "label-summary", "train-summary", "review-kept", "notice"]) $(id).textContent = "";
  $("job").hidden = true;
  $("retrain").disabled = false;
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("active-version").textContent = "";
  $("sign-in").hidden = false;
  const error = $("sign-in-error");
  error.hidden = !message;
  error.textContent = message ? `Signed out: ${message}` : "";
  $("token").focus();
}

async function enter() {
  $("sign-in").hidden = true;
  $("sign-out").hidden = false;
  $("app").hidden = false;
  showTab(TABS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "review");
  const job = sessionStorage.getItem(JOB_KEY);
  if (job) watchJob(job);
}

// -- tabs -----------------------------------------------------------------------------------------

const loaders = {
  review: () => Promise.all([loadModels(), loadReview()]),
  upload: () => Promise.all([loadModels(), loadLabels()]),
  train: () => loadLabels(),
  versions: () => loadModels(),
};

function showTab(name) {
  for (const tab of TABS) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`panel-${tab}`).hidden = !selected;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  notice("");  // what happened on the last tab
  loaders[name]().catch((error) => notice(error.message, true));
}

// -- models: the active version's labels, the versions tab ----------------------------------------

let models = { active: null, versions: [] };

async function loadModels() {
  models = await api("admin/models");
  $("active-version").textContent = models.active ? `active model: ${models.active}` : "no active model";
  const active = models.versions.find((v) => v.active);
  $("label-options").replaceChildren(...(active?.labels ?? []).map((label) => el("option", { value: label })));
  renderVersions();
}

function renderVersions() {
  const fallback = $("fallback");
  fallback.hidden = !models.fallback_from;
  fallback.textContent = models.fallback_from
    ? `Version ${models.fallback_from.version} failed verification; serving the last good one instead `
      + `(${models.fallback_from.reason ?? "no reason given"}).` : "";
  const replicas = models.replicas ?? [];
  $("replicas").textContent = replicas.length
    ? `Replicas: ${replicas.map((r) => `${r.id} serves ${r.version ?? "nothing yet"}${r.variant ? ` (${r.variant})` : ""}`).join("; ")}`
    : "";
  const active = models.versions.find((v) => v.active);
  const cards = [...models.versions].reverse().map((version) => versionCard(version, active));
  $("versions").replaceChildren(...cards);
}

function versionCard(version, active) {
  const older = active && versionNumber(version.version) < versionNumber(active.version);
  const action = version.active ? el("span", { class: "badge" }, "active")
    : el("button", {
      type: "button", class: older ? "quiet" : "", "data-version": version.version,
      onclick: (event) => activate(version.version, event.currentTarget),
    }, older ? `Roll back to ${version.version}` : `Activate ${version.version}`);
  const card = el("article", { class: "version", "data-version": version.version },
    el("header", {}, el("h2", {}, version.version), action),
  );
  if (version.error) {
    card.append(el("p", { class: "error" }, `Damaged: ${version.error}`));
    return card;
  }
  const labels = version.labels ?? [];
  card.append(el("dl", { class: "facts" },
    fact("created", when(version.created_at)),
    fact("strategy", version.strategy ?? "–"),
    fact("parent", version.parent ?? "–"),
    // ImageNet's labels hold commas: they are listed one to a line, the first few only
    fact("labels", labels.length > 6
      ? [`${labels.length} labels:`, ...labels.slice(0, 3).map((l) => el("span", { class: "label-name" }, l)), "…"]
      : labels.map((l) => el("span", { class: "label-name" }, l))),
    fact("variants", (version.variants ?? []).join(", ") || "–"),
  ));
  card.append(metricsBlock(version.metrics ?? {}));
  return card;
}

const versionNumber = (v) => Number.parseInt(String(v ?? "").slice(1), 10);

function fact(name, value) {
  return [el("dt", {}, name), el("dd", {}, value)];
}

/** A version's metrics: the held-out comparison of a retrained one (and its confusion matrix),
 * else whatever scalar metrics it has. */
function metricsBlock(metrics) {
  const block = el("div", { class: "metrics-block" });
  const candidate = metrics.candidate;
  if (candidate && typeof candidate === "object") {
    const parent = metrics.active ?? {};
    block.append(el("dl", { class: "facts" },
      fact("accuracy", `${percent(candidate.accuracy)} on ${candidate.held_out ?? "?"} held-out images`),
      fact(`${parent.version ?? "parent"} on the same`, percent(parent.accuracy)),
      metrics.gate ? fact("gate", metrics.gate) : null,
      typeof metrics.train_images === "number" ? fact("trained on", `${metrics.train_images} images`) : null,
    ));
    const matrix = candidate.confusion_matrix;
    if (Array.isArray(matrix) && matrix.length && Array.isArray(metrics.labels)) block.append(confusionTable(matrix, metrics.labels));
    return block;
  }
  const scalars = Object.entries(metrics).filter(([, v]) => typeof v === "number" || typeof v === "string");
  if (scalars.length) {
    block.append(el("dl", { class: "facts" }, scalars.slice(0, 12).map(([k, v]) => fact(k, typeof v === "number"
      ? (k.includes("accuracy") ? percent(v) : number(v)) : v))));
  } else {
    block.append(el("p", { class: "muted" }, "No metrics recorded."));
  }
  return block;
}

/** Rows: true label; columns: predicted. Labels with no held-out image and no prediction are left
 * out (a model with ImageNet's 1000 labels would otherwise give a million cells). */
function confusionTable(matrix, labels) {
  const used = labels.map((_, i) => (matrix[i] ?? []).some((n) => n > 0) || matrix.some((row) => (row?.[i] ?? 0) > 0));
  const shown = labels.map((label, i) => [label, i]).filter(([, i]) => used[i]);
  const table = el("table", { class: "confusion" },
    el("caption", {}, "Confusion matrix on the held-out images (rows: true label, columns: predicted)"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "true \\ predicted"),
      shown.map(([label]) => el("th", { scope: "col" }, label)))),
    el("tbody", {}, shown.map(([label, i]) => el("tr", {}, el("th", { scope: "row" }, label),
      shown.map(([, j]) => el("td", { class: i === j ? "diagonal num" : "num" }, String(matrix[i]?.[j] ?? 0)))))),
  );
  return table;
}

async function activate(version, button) {
  button.disabled = true;
  try {
    const result = await api(`admin/models/${encodeURIComponent(version)}/activate`, { method: "POST" });
    notice(`${result.active} is now active.`);
    await loadModels();
  } catch (error) {
    notice(`Could not activate ${version}: ${error.message}`, true);
    button.disabled = false;
  }
}

// -- review queue ---------------------------------------------------------------------------------

const imageUrls = new Map();  // prediction id -> blob: URL shown for it

function clearReview() {
  for (const url of imageUrls.values()) URL.revokeObjectURL(url);
  imageUrls.clear();
  $("review-grid").replaceChildren();
}

let reviewLoads = 0;

async function loadReview() {
  const load = ++reviewLoads;
  const limit = $("review-limit").value;
  const order = $("review-order").value;
  const queue = await api(`admin/review?limit=${encodeURIComponent(limit)}&order=${encodeURIComponent(order)}`);
  if (load !== reviewLoads) return;  // a later load (another order, a refresh) answers instead
  clearReview();
  $("review-kept").textContent = typeof queue.kept === "number" ? `${queue.kept} kept predictions` : "";
  const cards = queue.items.map(reviewCard);
  $("review-grid").replaceChildren(...cards);
  $("review-empty").hidden = cards.length > 0;
  cards.forEach((card, i) => loadImage(queue.items[i].prediction_id, card.querySelector("img")));
}

async function loadImage(id, img) {
  try {
    const blob = await api(`admin/predictions/${encodeURIComponent(id)}/image`, { blob: true });
    if (!img.isConnected) return;
    const previous = imageUrls.get(id);
    if (previous) URL.revokeObjectURL(previous);
    const url = URL.createObjectURL(blob);
    imageUrls.set(id, url);
    img.src = url;
  } catch (error) {
    img.alt = `image unavailable: ${error.message}`;
  }
}

function reviewCard(item) {
  const card = el("li", {
    class: "card", tabindex: "0", "data-prediction-id": item.prediction_id,
    "aria-label": `predicted ${item.label}, score ${percent(item.score)}`,
  });
  const choices = (item.top_k ?? [{ label: item.label, score: item.score }]).slice(0, 9);
  const other = el("input", {
    type: "text", list: "label-options", placeholder: "other label", maxlength: "64", spellcheck: "false",
    "aria-label": "another label", class: "other-label",
  });
  card.append(
    el("img", { alt: `kept image predicted as ${item.label}` }),
    el("p", { class: "prediction" }, el("strong", { class: "label" }, item.label), " ",
      el("span", { class: "score" }, percent(item.score))),
    el("p", { class: "muted small" }, `model ${item.model_version} · margin ${number(item.margin, 2)}`
      + (typeof item.entropy === "number" ? ` · entropy ${number(item.entropy, 2)}` : "")),
    el("ol", { class: "choices" }, choices.map((choice, k) => el("li", {},
      el("button", {
        type: "button", class: k === 0 ? "choice confirm" : "choice", "data-label": choice.label,
        title: k === 0 ? "confirm (Enter or 1)" : `label as ${choice.label} (${k + 1})`,
        onclick: () => label(card, item, choice.label),
      }, el("kbd", {}, String(k + 1)), ` ${choice.label} `, el("span", { class: "muted" }, percent(choice.score)))))),
    el("form", {
      class: "correct", onsubmit: (event) => {
        event.preventDefault();
        const value = other.value.trim();
        if (value) label(card, item, value);
      },
    }, other, el("button", { type: "submit" }, "Label")),
    el("div", { class: "actions" },
      el("button", { type: "button", class: "confirm", onclick: () => label(card, item, item.label) }, "Confirm"),
      el("button", { type: "button", class: "danger", onclick: () => discard(card, item) }, "Discard")),
    el("p", { class: "error card-error", role: "alert", hidden: true }),
  );
  card.addEventListener("keydown", (event) => {
    if (event.target !== card || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "Enter") label(card, item, item.label);
    else if (/^[1-9]$/.test(event.key) && choices[Number(event.key) - 1]) label(card, item, choices[Number(event.key) - 1].label);
    else if (event.key === "Delete") discard(card, item);
    else if (event.key === "ArrowRight" || event.key === "ArrowDown") card.nextElementSibling?.focus();
    else if (event.key === "ArrowLeft" || event.key === "ArrowUp") card.previousElementSibling?.focus();
    else return;
    event.preventDefault();
  });
  return card;
}

async function label(card, item, chosen) {
  await reviewed(card, item, () => api("admin/feedback", {
    method: "POST", json: { prediction_id: item.prediction_id, label: chosen },
  }), (result) => {
    const stored = result.stored?.[0];
    return `${chosen === item.label ? "Confirmed" : "Corrected to"} '${chosen}'`
      + (stored ? ` (${stored.status}; ${result.counts?.[chosen] ?? "?"} images labelled '${chosen}')` : "");
  });
}

async function discard(card, item) {
  await reviewed(card, item, () => api(`admin/predictions/${encodeURIComponent(item.prediction_id)}`,
    { method: "DELETE" }), () => "Discarded a kept image.");
}

/** Run a review action; on success the card leaves the grid (focus moves on), else it shows why. */
async function reviewed(card, item, call, describe) {
  if (card.classList.contains("busy")) return;
  card.classList.add("busy");
  const error = card.querySelector(".card-error");
  error.hidden = true;
  try {
    const result = await call();
    const next = card.nextElementSibling ?? card.previousElementSibling;
    const url = imageUrls.get(item.prediction_id);
    if (url) URL.revokeObjectURL(url);
    imageUrls.delete(item.prediction_id);
    card.remove();
    next?.focus();
    $("review-empty").hidden = $("review-grid").children.length > 0;
    notice(describe(result));
  } catch (failure) {
    error.textContent = failure.message;
    error.hidden = false;
  } finally {
    card.classList.remove("busy");
  }
}

// -- uploads of labelled images -------------------------------------------------------------------

async function loadLabels() {
  const summary = await api("admin/labels");
  const rows = Object.entries(summary.counts).sort(([a], [b]) => a.localeCompare(b))
    .map(([name, count]) => el("tr", { "data-label": name }, el("td", {}, name), el("td", { class: "num" }, String(count))));
  $("label-counts").tBodies[0].replaceChildren(...rows);
  const pending = summary.not_in_active_model;
  const text = `${summary.total} labelled images` + (typeof pending === "number"
    ? `; ${pending} not yet in the active model (${summary.active_version ?? "none"})` : "");
  $("label-summary").textContent = text;
  $("train-summary").textContent = text + ".";
  return summary;
}

async function upload(files) {
  const labelText = $("upload-label").value.trim();
  const images = [...files];  // the server says what is wrong with any that is not an image
  if (!images.length) return;
  if (!labelText) {
    notice("Type the images' label first, then drop them again.", true);
    $("upload-label").focus();
    return;
  }
  const rows = images.map((file) => {
    const status = el("span", { class: "status" }, "waiting");
    const row = el("li", { class: "pending" }, el("span", { class: "name" }, file.name), " ", status);
    $("upload-list").prepend(row);
    return { file, row, status };
  });
  const tally = { stored: 0, unchanged: 0, moved: 0, failed: 0 };
  let counts = null;
  const queue = [...rows];
  // one image per request: each file gets its own answer, and a bad one does not hold up the rest
  async function worker() {
    for (let entry = queue.shift(); entry; entry = queue.shift()) {
      entry.status.textContent = "uploading";
      const form = new FormData();
      form.append("label", labelText);
      form.append("images", entry.file, entry.file.name);
      try {
        const result = await api("admin/labels", { method: "POST", form });
        const stored = result.stored[0];
        tally[stored.status] += 1;
        counts = result.counts;
        entry.status.textContent = stored.status === "moved" ? `moved (${stored.note})` : stored.status;
        entry.row.className = "done";
      } catch (error) {
        tally.failed += 1;
        entry.status.textContent = error.message;
        entry.row.className = "failed";
      }
      $("upload-summary").textContent = summaryText(labelText, tally, rows.length);
    }
  }
  $("upload-summary").textContent = summaryText(labelText, tally, rows.length);
  await Promise.all(Array.from({ length: Math.min(UPLOAD_CONCURRENCY, rows.length) }, worker));
  if (counts) await loadLabels().catch((error) => notice(error.message, true));
}

function summaryText(labelText, tally, total) {
  const done = tally.stored + tally.unchanged + tally.moved + tally.failed;
  return `'${labelText}': ${done}/${total} done: ${tally.stored} stored, ${tally.unchanged} already there, `
    + `${tally.moved} relabelled, ${tally.failed} failed`;
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const input = $("upload-files");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    upload(event.dataTransfer.files);
  });
  input.addEventListener("change", () => {
    upload(input.files).finally(() => { input.value = ""; });
  });
  // a file dropped beside the zone would make the browser navigate away to it
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// -- retraining -----------------------------------------------------------------------------------

let pollTimer;

function stopPolling() {
  clearTimeout(pollTimer);
  pollTimer = undefined;
}

async function retrain() {
  $("retrain").disabled = true;
  try {
    const job = await api("admin/retrain", { method: "POST", json: {} });
    notice(`Retrain job ${job.id} started.`);
    showJob(job);
    watchJob(job.id);
  } catch (error) {
    notice(error.message, true);
    if (error.status === 409 && error.body?.job?.id) watchJob(error.body.job.id);
    else $("retrain").disabled = false;
  }
}

function watchJob(id) {
  stopPolling();
  sessionStorage.setItem(JOB_KEY, id);
  const poll = async () => {
    try {
      const job = await api(`admin/jobs/${encodeURIComponent(id)}`);
      showJob(job);
      if (FINAL_STATES.has(job.state)) {
        sessionStorage.removeItem(JOB_KEY);
        $("retrain").disabled = false;
        pollTimer = undefined;
        await Promise.all([loadModels(), loadLabels()]);
        return;
      }
    } catch (error) {
      notice(`Job ${id}: ${error.message}`, true);
      if (error.status === 404) {
        sessionStorage.removeItem(JOB_KEY);
        $("retrain").disabled = false;
        return;
      }
    }
    pollTimer = setTimeout(poll, POLL_MS);
  };
  $("retrain").disabled = true;
  poll();
}

function showJob(job) {
  $("job").hidden = false;
  $("job").dataset.state = job.state;
  $("job-id").textContent = job.id;
  $("job-state").textContent = job.state;
  $("job-state").dataset.state = job.state;
  $("job-phase").textContent = job.phase;
  $("job-progress").value = job.progress ?? 0;
  $("job-percent").textContent = percent(job.progress ?? 0);
  const result = $("job-result");
  result.classList.toggle("error", job.state === "failed");
  result.textContent = {
    succeeded: `${job.version} is trained and active.`,
    rejected: `${job.version ?? "The candidate"} was kept inactive: ${job.metrics?.gate ?? "it did worse than the active model"}.`,
    failed: `Failed: ${job.error ?? "no reason recorded"}`,
  }[job.state] ?? "";
  const m = job.metrics ?? {};
  $("job-metrics").replaceChildren(...(m.candidate ? [
    fact("candidate accuracy", `${percent(m.candidate.accuracy)} on ${m.candidate.held_out} held-out images`),
    fact(`${m.active?.version ?? "active"} accuracy`, percent(m.active?.accuracy)),
    m.gate ? fact("gate", m.gate) : [],
  ].flat() : []));
}

// -- start ----------------------------------------------------------------------------------------

function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => showTab(tab));
  document.querySelector(".tabs").addEventListener("keydown", (event) => {
    const at = TABS.findIndex((tab) => $(`tab-${tab}`) === document.activeElement);
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (at < 0 || !step) return;
    const next = TABS[(at + step + TABS.length) % TABS.length];
    showTab(next);
    $(`tab-${next}`).focus();
  });
  $("review-refresh").addEventListener("click", () => loadReview().catch((e) => notice(e.message, true)));
  $("review-limit").addEventListener("change", () => loadReview().catch((e) => notice(e.message, true)));
  $("review-order").addEventListener("change", () => loadReview().catch((e) => notice(e.message, true)));
  $("versions-refresh").addEventListener("click", () => loadModels().catch((e) => notice(e.message, true)));
  $("retrain").addEventListener("click", retrain);
  setUpDropZone();
  if (sessionStorage.getItem(TOKEN_KEY)) {
    api("admin/models").then(enter, (error) => signOut(error.message));
  } else {
    $("token").focus();
  }
}

start();
