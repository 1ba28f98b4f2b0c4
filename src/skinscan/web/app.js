// skinscan web page: add a photo (pick, camera, drop or paste), shrink it in the browser, send it to
// POST /v1/predict?explain=true on this server, and show the estimate, the advice and the heatmap.
// No build step and nothing from other servers: this file, index.html and style.css are all there is.
//
// The page keeps a list of photos of one spot (`lesion.photos`, up to MAX_PHOTOS). The first photo goes to
// /v1/predict?explain=true; "Add another photo of the same spot" adds more, and with two or more the photos
// go together to /v1/predict/lesion, which combines them into one estimate. Each photo's own result shows
// under its thumbnail; the heatmap is that of the selected photo (fetched when it is first shown).
//
// Optional questions about the spot (age, where it is, has it grown, does it bleed...) are shown when the
// server's model can use them; the answers given travel as form fields beside the photo, and the result
// lists how each one moved the estimate ("bleeding: odds x3.1").

import * as device from "./private.js";

const MAX_PHOTOS = 4;
const MODE_STORAGE = "skinscan-mode";
const PRIVACY = {
  device: "Private mode: your photo is checked on this device and never leaves it. After your first visit the page also works offline.",
  server:
    "Your photo is sent to this skinscan server to be checked, re-encoded without its metadata (such as the place it was taken); skinscan does not store it.",
  static: "Your photo is checked on this device and never leaves it; this site has no server to send it to.",
};
const MAX_SIDE = 1280; // longer side sent to the server: the model looks at 224 px, the quality checks at more
const MAX_UNSHRUNK_BYTES = 4 * 1024 * 1024; // a small photo is sent as it is, unless its file is this big
const JPEG_QUALITY = 0.92;
const KEY_STORAGE = "skinscan-api-key";
const ANSWER_NAMES = ["age", "sex", "body_site", "diameter_mm", "itch", "grew", "hurt", "changed", "bleed", "elevated", "skin_cancer_history"];
const NUMBER_HINTS = {
  age: "Your age: enter a whole number of years from 0 to 120, or leave it empty.",
  diameter_mm: "Width of the spot: enter millimetres, more than 0 and at most 200, or leave it empty.",
};

const $ = (id) => document.getElementById(id);
const lesion = { photos: [], selected: null, forced: false, answered: false };
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let inFlight = null; // AbortController of the request whose answer the page is waiting for
let heatFlight = null; // AbortController of the heatmap request of the selected photo
// Where photos are checked: "device" (private mode, the default where the browser can run the model) or
// "server". `uploadAllowed`: the person chose the server (or agreed to send this browser's photos there).
const privateMode = { mode: "server", supported: false, hasServer: true, uploadAllowed: false, manifest: null };

// ------------------------------------------------------------------ adding photos
// `add`: another photo of the same spot (the "Add another photo" control); otherwise a new spot.
async function addFiles(files, { add = false } = {}) {
  const file = Array.from(files || []).find((f) => f instanceof File);
  if (!file) return;
  if (!add || lesion.photos.length === 0) clearPhotos();
  else if (lesion.photos.length >= MAX_PHOTOS) return;
  $("tips").open = false; // the tips stay one tap away
  const photo = await preparePhoto(file);
  lesion.photos.push(photo);
  selectPhoto(photo);
  if (privateMode.mode === "device") await checkOnDevice(photo);
  else if (lesion.photos.length === 1) await check(photo);
  else await checkLesion();
}

function clearPhotos() {
  if (inFlight) inFlight.abort();
  if (heatFlight) heatFlight.abort();
  for (const photo of lesion.photos) if (photo.url) URL.revokeObjectURL(photo.url);
  lesion.photos = [];
  lesion.selected = null;
  lesion.forced = false;
  lesion.answered = false;
  renderThumbs();
  updateLesionControls();
}

// "Start again": forget this spot: its photos and the answers about it (the next spot is another one).
function startAgain() {
  clearPhotos();
  $("questions-form").reset();
  clearAnswerError();
  hideHeatmap();
  $("viewer-panel").hidden = true;
  $("photo-img").removeAttribute("src");
  const empty = document.createElement("p");
  empty.id = "result-empty";
  empty.className = "muted";
  empty.textContent = "Add a photo to see the estimate here.";
  setResult(empty);
  $("questions-apply").hidden = true;
  $("choose-button").focus();
}

// Decode the photo in the browser for showing it. `file` stays for checks on the device; `upload` is what
// goes to the server: re-encoded (canvas, JPEG), which drops the metadata phone photos carry (GPS position,
// camera), and shrunk when large. A file the browser cannot decode (not an image, or HEIC on most desktop
// browsers) cannot be re-encoded: the page asks before it sends such a file as it is.
async function preparePhoto(file) {
  const name = file.name || "photo";
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.src = url;
  try {
    await img.decode(); // <img> applies the EXIF orientation, so the canvas copy is upright too
  } catch {
    URL.revokeObjectURL(url);
    return { name, file, upload: file, url: null, stripped: false };
  }
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  const scale = Math.min(1, MAX_SIDE / Math.max(w, h));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(w * scale));
  canvas.height = Math.max(1, Math.round(h * scale));
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  // a photo that needs no shrinking goes as PNG: lossless, so the server sees the pixels the file holds
  const type = scale === 1 ? "image/png" : "image/jpeg";
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, type, JPEG_QUALITY));
  if (!blob) return { name, file, upload: file, url, stripped: false }; // out of memory for the canvas
  return { name: name.replace(/\.[^.]*$/, "") + (scale === 1 ? ".png" : ".jpg"), file, upload: blob, url, stripped: true };
}

// ------------------------------------------------------------------ private mode: checks on this device
async function checkOnDevice(photo, { force = false } = {}) {
  photo.forced = force;
  showBusy(device.loaded() ? "Checking the photo on this device…" : "Loading the model onto this device (once)…");
  let body;
  try {
    body = await device.check(photo.file, { force });
  } catch (err) {
    if (!photo.url && privateMode.hasServer) {
      // a file this browser cannot read (HEIC on most desktop browsers): only the server can check it, if asked
      const reason = "This photo cannot be checked on this device, but the skinscan server can check it.";
      return askUpload(photo, () => check(photo, { force }), reason);
    }
    showError(`This photo could not be checked on this device (${err.message || err}).`, "device_failed", photo);
    return;
  }
  if (lesion.photos[0] !== photo) return; // Start again while it was being checked
  photo.result = body;
  photo.heatmap = body.probability === null ? null : await device.heatmapPng(photo.file, body.influence).catch(() => null);
  lesion.answered = true;
  showResult(body, { retry: () => checkOnDevice(photo, { force: true }) });
  if (lesion.selected === photo) showHeatmap(photo);
  showModel(body.model, "device");
  updateLesionControls();
}

// Before anything is uploaded where the person has not chosen the server: ask (`reason`: why not on the device).
function askUpload(photo, send, reason = "") {
  if (privateMode.uploadAllowed && photo.stripped) return send();
  const node = fromTemplate("tpl-ask-upload");
  const why = [];
  if (reason) why.push(reason);
  else if (!privateMode.uploadAllowed) why.push("This browser cannot check photos on this device, so the photo would be checked on the skinscan server.");
  if (!photo.stripped) why.push("This browser cannot read this file, so it cannot remove the file's metadata (such as the place it was taken) before sending it.");
  node.querySelector(".ask-upload-why").textContent = why.join(" ");
  node.querySelector(".ask-send").addEventListener("click", () => {
    privateMode.uploadAllowed = true;
    photo.stripped = true; // agreed for this file
    send();
  });
  node.querySelector(".ask-cancel").addEventListener("click", () => startAgain());
  setResult(node);
  return Promise.resolve();
}

function setMode(mode, { remember = true } = {}) {
  privateMode.mode = mode;
  if (mode === "server") privateMode.uploadAllowed = remember || privateMode.uploadAllowed;
  if (remember) localStorage.setItem(MODE_STORAGE, mode);
  $("mode-device").checked = mode === "device";
  $("mode-server").checked = mode === "server";
  const text = !privateMode.hasServer ? PRIVACY.static : PRIVACY[mode];
  $("mode-note").textContent = text;
  $("privacy-item").textContent = text;
  document.documentElement.dataset.mode = mode;
  $("questions").hidden = mode === "device" || !privateMode.answers; // the answers are used by the server only
  if (mode === "device" && privateMode.manifest) showModel(privateMode.manifest);
  updateLesionControls();
}

async function initPrivateMode() {
  privateMode.supported = device.deviceSupported();
  try {
    privateMode.manifest = await device.manifest();
    privateMode.hasServer = privateMode.manifest.server !== false;
  } catch {
    privateMode.supported = false; // this server offers no private mode
  }
  $("mode-device").disabled = !privateMode.supported;
  $("mode-server").disabled = !privateMode.hasServer;
  const saved = localStorage.getItem(MODE_STORAGE);
  const mode = !privateMode.supported ? "server" : saved === "server" && privateMode.hasServer ? "server" : "device";
  setMode(mode, { remember: saved === mode });
  if (!privateMode.supported) $("mode-note").textContent = "This browser cannot check photos on this device. " + PRIVACY.server;
  if (privateMode.supported && "serviceWorker" in navigator) {
    navigator.serviceWorker.register(new URL("../sw.js", import.meta.url).href).catch(() => {});
  }
}

// ------------------------------------------------------------------ talking to the server
function authHeaders() {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

const INVALID_ANSWERS = "An answer to the questions is not valid: correct it, or leave it empty, and check again.";

// POST `form` to `url` for the result area: the JSON answer of a 2xx, or null when the page has shown
// why not (error, access key form) or a newer request replaced this one. `retry` runs it again (new key).
async function post(url, form, retry, photo = null) {
  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  let response;
  let body = null;
  try {
    response = await fetch(url, { method: "POST", body: form, headers: authHeaders(), signal: controller.signal });
    body = await response.json().catch(() => null);
  } catch (err) {
    if (err.name === "AbortError") return null; // a newer photo replaced this one
    if (controller === inFlight) showError("Could not reach the skinscan server. Check the connection and try again.");
    return null;
  } finally {
    if (controller === inFlight) inFlight = null;
  }
  if (controller.signal.aborted) return null;
  if (response.status === 401) {
    showKeyForm(retry);
    return null;
  }
  if (!response.ok || !body) {
    const message = body && body.error ? body.error.message : `The server answered with status ${response.status}.`;
    const code = body && body.error ? body.error.code : "";
    if (code === "invalid_answers") showAnswerError(message);
    showError(message, code, photo);
    return null;
  }
  return body;
}

async function check(photo, { force = false } = {}) {
  if (!privateMode.uploadAllowed || !photo.stripped) return askUpload(photo, () => check(photo, { force }));
  const answers = collectAnswers();
  if (!answers) {
    showError(INVALID_ANSWERS, "invalid_answers", photo);
    return;
  }
  photo.forced = force;
  $("questions-apply").hidden = true;
  showBusy();
  const form = new FormData();
  form.append("file", photo.upload, photo.name);
  for (const [name, value] of Object.entries(answers)) form.append(name, value);
  const params = new URLSearchParams({ explain: "true" });
  if (force) params.set("force", "true");
  const body = await post(`/v1/predict?${params}`, form, () => check(photo, { force }), photo);
  if (!body) return;
  photo.result = body;
  photo.heatmap = body.heatmap_png || null;
  lesion.answered = true;
  showResult(body, { retry: () => check(photo, { force: true }) });
  if (lesion.selected === photo) showHeatmap(photo);
  showModel(body.model, "server");
  updateLesionControls();
}

// Two or more photos of the spot: one combined estimate from /v1/predict/lesion. The answers go once, as
// form fields of the lesion (the server adjusts the combined estimate with them).
async function checkLesion({ force = lesion.forced } = {}) {
  const unsent = lesion.photos.find((p) => !p.stripped);
  if (!privateMode.uploadAllowed || unsent) return askUpload(unsent || lesion.photos[0], () => checkLesion({ force }));
  const answers = collectAnswers();
  if (!answers) {
    showError(INVALID_ANSWERS, "invalid_answers");
    return;
  }
  lesion.forced = force;
  $("questions-apply").hidden = true;
  const photos = lesion.photos.slice();
  for (const photo of photos) photo.lesionResult = undefined;
  renderThumbs();
  showBusy(`Checking the ${photos.length} photos…`);
  const form = new FormData();
  for (const photo of photos) form.append("file", photo.upload, photo.name);
  for (const [name, value] of Object.entries(answers)) form.append(name, value);
  const params = new URLSearchParams();
  if (force) params.set("force", "true");
  const query = force ? `?${params}` : "";
  const body = await post(`/v1/predict/lesion${query}`, form, () => checkLesion({ force }));
  if (!body || photos.length !== lesion.photos.length) return; // Start again while it was on its way
  photos.forEach((photo, i) => (photo.lesionResult = (body.photos || [])[i] || null));
  lesion.answered = true;
  showResult(body.combined || {}, { combined: true, retry: () => checkLesion({ force: true }) });
  renderThumbs();
  showModel(body.model, "server");
  updateLesionControls();
  if (lesion.selected) showHeatmap(lesion.selected);
}

// The heatmap of a photo that was not the first one: asked for when the photo is shown.
async function fetchHeatmap(photo) {
  if (heatFlight) heatFlight.abort();
  const controller = new AbortController();
  heatFlight = controller;
  const form = new FormData();
  form.append("file", photo.upload, photo.name);
  try {
    const response = await fetch("/v1/predict?explain=true&force=true", {
      method: "POST",
      body: form,
      headers: authHeaders(),
      signal: controller.signal,
    });
    const body = response.ok ? await response.json() : null;
    photo.heatmap = (body && body.heatmap_png) || null;
  } catch {
    return; // no heatmap for this photo: the photo shows alone
  } finally {
    if (controller === heatFlight) heatFlight = null;
  }
  if (photo.heatmap && lesion.selected === photo) showHeatmap(photo);
}

async function loadModelInfo() {
  try {
    const response = await fetch("/v2/models/skinscan", { headers: authHeaders() });
    if (response.ok) {
      const meta = await response.json();
      privateMode.answers = Array.isArray(meta.answers) && meta.answers.length > 0;
      if (privateMode.mode === "server") showModel(meta.model, "server");
      $("questions").hidden = privateMode.mode === "device" || !privateMode.answers;
    }
  } catch {
    // the page works without it; the model appears with the first result
  }
}

// ------------------------------------------------------------------ showing things
function fromTemplate(id) {
  return $(id).content.firstElementChild.cloneNode(true);
}

function setResult(node) {
  const result = $("result");
  result.replaceChildren(node);
  result.setAttribute("aria-busy", "false");
}

function showBusy(text = null) {
  const node = fromTemplate("tpl-busy");
  if (text) node.querySelector(".busy-text").textContent = text;
  setResult(node);
  $("result").setAttribute("aria-busy", "true");
}

function showError(message, code = "", photo = null) {
  const node = fromTemplate("tpl-error");
  node.querySelector(".error-message").textContent = sentence(message);
  if (code) node.dataset.code = code;
  if (code === "invalid_answers" || code === "answers_unavailable") {
    node.querySelector(".error-title").textContent = "The answers could not be used";
    node.querySelector(".error-hint").textContent =
      code === "invalid_answers"
        ? "Correct the answer in the questions (or leave it empty) and check again."
        : "Leave the questions empty to check the photo alone.";
  }
  setResult(node);
  hideHeatmap();
  if (photo && !photo.url) $("viewer-panel").hidden = true; // nothing to show: the file was not a picture
  updateLesionControls();
}

function sentence(text) {
  const t = String(text).trim();
  return t.charAt(0).toUpperCase() + t.slice(1) + (/[.!?]$/.test(t) ? "" : ".");
}

function showKeyForm(retry) {
  const form = fromTemplate("tpl-apikey");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = form.querySelector("input").value.trim();
    sessionStorage.setItem(KEY_STORAGE, apiKey);
    retry();
    loadModelInfo();
  });
  setResult(form);
  form.querySelector("input").focus();
}

function selectPhoto(photo) {
  lesion.selected = photo;
  showPhoto(photo);
  renderThumbs();
  if (photo.heatmap) showHeatmap(photo);
  else if (lesion.photos.length > 1 && photo.url && lesion.answered && !(photo.lesionResult && photo.lesionResult.error)) {
    fetchHeatmap(photo);
  }
}

function showPhoto(photo) {
  $("viewer-panel").hidden = false;
  const caption = $("viewer-caption");
  const n = lesion.photos.length;
  const index = lesion.photos.indexOf(photo) + 1;
  $("viewer-title").textContent = n > 1 ? `Your photos (${n})` : "Your photo";
  $("photo-img").alt = n > 1 ? `Photo ${index} of ${n} you added` : "The photo you added";
  hideHeatmap();
  if (photo.url) {
    $("photo-img").src = photo.url;
    $("photo-img").hidden = false;
    caption.hidden = true;
  } else {
    $("photo-img").removeAttribute("src");
    $("photo-img").hidden = true;
    caption.textContent = "This browser cannot show this file; the server will check it.";
    caption.hidden = false;
  }
}

function hideHeatmap() {
  $("heatmap-img").hidden = true;
  $("heatmap-img").removeAttribute("src");
  $("heatmap-controls").hidden = true;
}

function showHeatmap(photo) {
  if (!photo.heatmap) return;
  const src = `data:image/png;base64,${photo.heatmap}`;
  if (!photo.url) {
    // the browser could not show the photo (e.g. HEIC): the server's overlay is the only picture of it
    $("photo-img").src = src;
    $("photo-img").hidden = false;
    $("viewer-caption").textContent = "This browser cannot show the photo itself; shown with the heatmap.";
    return;
  }
  $("heatmap-img").src = src;
  $("heatmap-controls").hidden = false;
  applyHeatmapControls();
}

function applyHeatmapControls() {
  const on = $("heatmap-toggle").checked;
  const strength = Number($("heatmap-opacity").value);
  $("heatmap-img").hidden = !on || !$("heatmap-img").getAttribute("src");
  $("heatmap-img").style.opacity = String(strength / 100);
  $("heatmap-opacity").disabled = !on;
  $("heatmap-opacity-value").textContent = `${strength}%`;
}

// `checked`: where the result shown was made ("device" or "server"). A server result in private mode is
// one the person chose to send (a file this browser cannot read): the line says so.
function showModel(model, checked = privateMode.mode) {
  if (!model) return;
  const where =
    checked === "device" ? " (on this device)" : privateMode.mode === "device" ? " (on the skinscan server, as you chose)" : "";
  $("model-info").textContent = `Model: ${model.name}, version ${model.version}${where}`;
  $("footer-model").textContent = `skinscan · model ${model.name} ${model.version}`;
}

// Percentages: whole numbers, with one decimal where whole numbers would hide the difference between
// the estimate and the threshold.
function percents(p, threshold) {
  const fmt = (v, digits) => {
    if (v < 0.01 && v > 0 && digits === 0) return "under 1%";
    if (v > 0.99 && v < 1 && digits === 0) return "over 99%";
    return `${(v * 100).toFixed(digits)}%`;
  };
  const digits = fmt(p, 0) === fmt(threshold, 0) ? 1 : 0;
  return [fmt(p, digits), fmt(threshold, digits)];
}

// `combined`: the combined estimate of several photos; `retry`: check again with force (poor quality).
function showResult(body, { combined = false, retry = null } = {}) {
  const node = fromTemplate("tpl-result");
  const show = (selector) => {
    const el = node.querySelector(selector);
    el.hidden = false;
    return el;
  };
  const hasProbability = typeof body.probability === "number";
  const quality = qualityOf(body);
  const retake = quality.verdict === "retake";
  // for programs and the browser tests: what was estimated, and where
  node.dataset.mode = body.mode || "server";
  if (body.threads) node.dataset.threads = String(body.threads); // WebAssembly threads of an on-device check
  if (hasProbability) node.dataset.probability = String(body.probability);
  if (body.decision) node.dataset.decision = body.decision;
  if (quality.verdict) node.dataset.quality = quality.verdict;
  if (body.photo_type) node.dataset.photoType = body.photo_type;
  if (body.influence) node.dataset.influence = JSON.stringify(body.influence);
  else if (body.heatmap) node.dataset.cam = JSON.stringify(body.heatmap);

  if (combined) {
    const used = typeof body.n_used === "number" ? body.n_used : body.n_photos;
    const aside = body.n_photos - used;
    show(".combined-note").textContent =
      aside > 0
        ? `Combined estimate from ${used} of ${body.n_photos} photos of this spot: ${aside} set aside (see the photos).`
        : `Combined estimate from ${body.n_photos} photos of this spot.`;
    if (body.warning) show(".lesion-warning").textContent = `Please note: ${sentence(body.warning)}`;
    node.querySelector(".retake-title").textContent = "Please retake the photos";
    node.querySelector(".retake-lead").textContent = "None of these photos is good enough for a reliable estimate:";
    node.querySelector(".check-anyway").textContent = "Check these photos anyway";
    node.querySelector(".forced-note").textContent =
      "These photos\u2019 quality was poor, so this estimate is less reliable. Sharper photos give a better one.";
  }

  if (retake) {
    const box = show(".retake");
    const list = box.querySelector(".retake-reasons");
    for (const reason of quality.reasons) {
      const li = document.createElement("li");
      li.textContent = sentence(typeof reason === "string" ? reason : reason.message || reason.text || "");
      list.append(li);
    }
    if (!list.children.length) list.hidden = true;
    if (!hasProbability) {
      const again = show(".check-anyway");
      if (retry) again.addEventListener("click", retry);
    } else {
      show(".forced-note");
    }
  } else if (quality.verdict === "ok") {
    show(".quality-ok");
  }

  const adjustments = Array.isArray(body.adjustments) ? body.adjustments : [];
  if (hasProbability && adjustments.length) {
    const box = show(".adjustments");
    const alone = typeof body.image_probability === "number" ? body.image_probability : null;
    box.querySelector(".adjustments-lead").textContent =
      alone === null
        ? "Your answers changed the estimate:"
        : `From the photo${combined ? "s" : ""} alone: ${percents(alone, body.threshold)[0]}. Your answers changed it:`;
    const list = box.querySelector(".adjustments-list");
    for (const adjustment of adjustments) {
      const li = document.createElement("li");
      li.textContent = adjustment.label || `${adjustment.answer}: odds x${adjustment.odds_ratio}`;
      list.append(li);
    }
  }

  if (hasProbability) {
    const refer = body.decision === "refer";
    const decision = show(".decision");
    decision.classList.add(refer ? "refer" : "monitor");
    decision.dataset.decision = body.decision;
    decision.querySelector(".decision-kicker").textContent = "Suggested next step";
    decision.querySelector(".decision-title").textContent = refer
      ? "See a dermatologist soon"
      : "No referral suggested: keep an eye on it";
    decision.querySelector(".decision-advice").textContent = body.advice || "";

    const [pText, tText] = percents(body.probability, body.threshold);
    const gauge = show(".gauge");
    gauge.classList.add(refer ? "refer" : "monitor");
    gauge.querySelector(".gauge-value").textContent = pText;
    const track = gauge.querySelector(".gauge-track");
    track.setAttribute("aria-valuenow", String(Math.round(body.probability * 1000) / 10));
    track.setAttribute("aria-valuetext", `${pText}; referral threshold ${tText}`);
    track.setAttribute("aria-label", "Estimated chance that this spot is a skin cancer");
    track.style.setProperty("--p", String(body.probability));
    track.style.setProperty("--t", String(body.threshold));
    gauge.querySelector(".gauge-threshold-label").textContent =
      `The dashed line is the referral threshold (${tText}): at or above it, skinscan suggests seeing a dermatologist.`;
    if (body.diagnosis_label) {
      const looks = show(".looks-like");
      looks.dataset.diagnosis = body.diagnosis;
      looks.querySelector(".looks-like-value").textContent = body.diagnosis_label;
    }
  }
  setResult(node);
}

// The quality gate's answer: `quality` "ok" | "retake" with `reasons` beside it, or a report object
// {verdict, reasons, ...}; absent when the server has no gate.
function qualityOf(body) {
  const q = body.quality;
  if (q && typeof q === "object") return { verdict: q.verdict, reasons: q.reasons || body.reasons || [] };
  return { verdict: q, reasons: body.reasons || [] };
}

// ------------------------------------------------------------------ several photos of the spot
// One button per photo (shown with two or more): its picture and its own result; it selects the photo shown
// above with its heatmap.
function renderThumbs() {
  const list = $("thumbs");
  const n = lesion.photos.length;
  list.hidden = n < 2;
  list.replaceChildren();
  if (n < 2) return;
  lesion.photos.forEach((photo, i) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.setAttribute("aria-pressed", String(lesion.selected === photo));
    if (photo.url) {
      const img = document.createElement("img");
      img.src = photo.url;
      img.alt = "";
      button.append(img);
    } else {
      const none = document.createElement("span");
      none.className = "thumb-none";
      none.textContent = "No preview";
      button.append(none);
    }
    const label = document.createElement("span");
    label.className = "thumb-label";
    label.textContent = `Photo ${i + 1}`;
    const result = document.createElement("span");
    result.className = "thumb-result";
    const [text, aside] = photoSummary(photo.lesionResult);
    result.textContent = text;
    if (aside) result.classList.add("aside");
    button.append(label, result);
    button.addEventListener("click", () => selectPhoto(photo));
    li.append(button);
    list.append(li);
  });
}

// [text, set aside?] for one photo's own result in a combined check (undefined: not back yet).
function photoSummary(r) {
  if (r === undefined) return ["Checking\u2026", false];
  if (!r) return ["No result", true];
  if (r.error) return [`Set aside: ${sentence(r.error)}`, true];
  if (typeof r.probability !== "number") {
    const reasons = (r.reasons || []).map((x) => (typeof x === "string" ? x : x.message || "")).filter(Boolean);
    return [`Set aside: ${sentence(reasons.join("; ") || "poor quality")}`, true];
  }
  const text = `${percents(r.probability, r.threshold)[0]} alone`;
  return [r.quality === "retake" ? `${text} (poor quality)` : text, false];
}

function updateLesionControls() {
  const n = lesion.photos.length;
  $("lesion-controls").hidden = n === 0;
  // on the device one photo at a time: combining several is the server's (see docs/private-mode.md)
  $("add-button").hidden = !lesion.answered || n >= MAX_PHOTOS || privateMode.mode === "device";
  $("lesion-count").textContent =
    n === 0 ? "" : n >= MAX_PHOTOS ? `${n} photos of this spot (the most it takes).` : `${n} of up to ${MAX_PHOTOS} photos of this spot.`;
}

// ------------------------------------------------------------------ questions about the spot
// The answers given, as {name: value} (unanswered questions left out), or null when one is not valid.
function collectAnswers() {
  const answers = {};
  if ($("questions").hidden) return answers;
  const form = $("questions-form");
  clearAnswerError();
  for (const name of ANSWER_NAMES) {
    const field = form.elements[name];
    if (!field) continue;
    if (field instanceof HTMLInputElement && field.type === "number") {
      if (!field.validity.valid) {
        showAnswerError(NUMBER_HINTS[name] || "Enter a number, or leave it empty.", name);
        return null;
      }
      if (field.value.trim() !== "") answers[name] = field.value.trim();
    } else if (field.value) {
      answers[name] = field.value; // a <select>, or the checked radio button of a yes/no question
    }
  }
  return answers;
}

// Say what is wrong beside the questions; `name` (or the first answer the server's message names) is marked.
function showAnswerError(message, name = null) {
  const field = name || ANSWER_NAMES.find((n) => new RegExp(`\\b${n}\\b`).test(message));
  $("questions").open = true;
  const box = $("questions-error");
  box.textContent = sentence(message);
  box.hidden = false;
  const input = field ? document.getElementById(`q-${field}`) : null;
  if (input) {
    input.setAttribute("aria-invalid", "true");
    if (input.focus) input.focus();
  }
}

function clearAnswerError() {
  $("questions-error").hidden = true;
  for (const el of $("questions-form").querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function answersChanged() {
  $("questions-apply").hidden = lesion.photos.length === 0; // before any photo, the answers go with the first
}

// ------------------------------------------------------------------ wiring
async function init() {
  $("choose-button").addEventListener("click", () => $("file-input").click());
  $("take-button").addEventListener("click", () => $("camera-input").click());
  for (const id of ["file-input", "camera-input"]) {
    $(id).addEventListener("change", (event) => {
      addFiles(event.target.files);
      event.target.value = ""; // choosing the same file again still triggers a check
    });
  }

  const zone = $("dropzone");
  let depth = 0; // dragenter/leave fire for every child element
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) zone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault(); // allow the drop (and keep the browser from opening the file)
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });

  $("questions-form").addEventListener("input", answersChanged);
  $("questions-form").addEventListener("change", answersChanged);
  $("questions-form").addEventListener("submit", (event) => event.preventDefault());
  $("questions-apply").addEventListener("click", () => {
    const photo = lesion.photos[0];
    if (!photo) return;
    const done =
      privateMode.mode === "device"
        ? checkOnDevice(photo, { force: Boolean(photo.forced) })
        : lesion.photos.length > 1
          ? checkLesion()
          : check(photo, { force: Boolean(photo.forced) });
    done.then(() => $("result-title").scrollIntoView()); // the result is above the questions: bring it into view
  });
  $("add-button").addEventListener("click", () => $("add-input").click());
  $("add-input").addEventListener("change", (event) => {
    addFiles(event.target.files, { add: true });
    event.target.value = "";
  });
  $("restart-button").addEventListener("click", startAgain);
  $("heatmap-toggle").addEventListener("change", applyHeatmapControls);
  $("heatmap-opacity").addEventListener("input", applyHeatmapControls);
  for (const input of [$("mode-device"), $("mode-server")]) {
    input.addEventListener("change", () => {
      if (!input.checked) return;
      startAgain();
      setMode(input.value);
    });
  }
  await initPrivateMode();
  if (privateMode.hasServer) loadModelInfo();
  document.documentElement.dataset.ready = "true"; // for the browser tests
}

function hasFiles(event) {
  return Boolean(event.dataTransfer) && Array.from(event.dataTransfer.types || []).includes("Files");
}

init();
