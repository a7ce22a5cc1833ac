// The demo page: send each chosen, dropped or pasted image to POST /api/predict on its own
// (so one bad file spoils only its own card) and draw the model's input (32x32, or the size
// the model was trained on) beside the top bars
// (up to 5, fewer where the model has fewer classes).
"use strict";

const state = { maxUploadBytes: null, imageSize: 32, previews: [] };

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // never innerHTML: file names are untrusted
  return node;
}

function formatBytes(n) {
  if (n >= 1024 * 1024) return `${+(n / (1024 * 1024)).toFixed(1)} MB`;
  if (n >= 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${n} bytes`;
}

function showPageError(message) {
  const box = $("page-error");
  box.textContent = message;
  box.hidden = false;
}

async function loadModel() {
  try {
    const response = await fetch("/api/model");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const model = await response.json();
    const parts = [model.model];
    if (model.dataset) parts.push(`${model.dataset}, ${model.num_classes} classes`);
    if (model.parameters) parts.push(`${model.parameters.toLocaleString("en")} parameters`);
    parts.push(model.test_top1 == null
      ? "test accuracy not measured"
      : `test accuracy ${(100 * model.test_top1).toFixed(2)}%`);
    $("model-line").textContent = parts.join(" \u00b7 ");
    $("model-line").dataset.model = model.model;
    if (model.image_size) {
      state.imageSize = model.image_size;
      $("image-size").textContent = `${model.image_size}\u00d7${model.image_size}`;
    }
    state.maxUploadBytes = model.limits ? model.limits.max_upload_bytes : null;
    if (state.maxUploadBytes) {
      $("drop-hint").textContent += ` Up to ${formatBytes(state.maxUploadBytes)} per image.`;
    }
  } catch (error) {
    $("model-line").textContent = "Model unavailable";
    showPageError(`Cannot reach the server: ${error.message}`);
  }
}

function newCard(file) {
  const card = element("li", "result-card is-pending");
  const head = element("div", "card-head");
  head.append(element("span", "file-name", file.name || "pasted image"),
              element("span", "file-size", formatBytes(file.size)));
  const body = element("div", "card-body");
  body.append(element("p", "pending-text", "Classifying\u2026"));
  card.append(head, body);
  $("results").prepend(card);
  $("toolbar").hidden = false;
  return card;
}

function showError(card, message) {
  card.className = "result-card is-error";
  const body = card.querySelector(".card-body");
  const text = element("p", "error-message", message);
  text.setAttribute("role", "alert");
  body.replaceChildren(text);
}

function figure(src, alt, caption, className) {
  const fig = element("figure", "thumb");
  const img = element("img", className);
  img.src = src;
  img.alt = alt;
  fig.append(img, element("figcaption", null, caption));
  return fig;
}

function showResult(card, file, result) {
  card.className = "result-card is-done";
  const images = element("div", "images");
  const side = state.imageSize;
  images.append(figure(result.input_png, `${result.filename} at ${side} by ${side} pixels`,
                       `model input, ${side}\u00d7${side}`, "model-input"));
  const preview = URL.createObjectURL(file);
  state.previews.push(preview);
  images.append(figure(preview, `${result.filename} as uploaded`, "original", "original"));

  const list = element("ol", "predictions");
  result.top.forEach((entry, rank) => {
    const row = element("li", rank === 0 ? "prediction is-top" : "prediction");
    const percent = 100 * entry.probability;
    const label = element("span", "label", entry.class);
    const track = element("span", "bar");
    const fill = element("span", "bar-fill");
    fill.style.width = `${Math.max(percent, 0.5).toFixed(2)}%`; // CSSOM, allowed by the CSP
    track.append(fill);
    track.setAttribute("role", "meter");
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", "100");
    track.setAttribute("aria-valuenow", percent.toFixed(1));
    track.setAttribute("aria-label", `${entry.class} probability`);
    row.append(label, track, element("span", "value", `${percent.toFixed(1)}%`));
    list.append(row);
  });
  card.querySelector(".card-body").replaceChildren(images, list);
}

async function classify(file) {
  const card = newCard(file);
  if (state.maxUploadBytes && file.size > state.maxUploadBytes) {
    showError(card, `${file.name}: ${formatBytes(file.size)} is over the upload limit of ` +
                    `${formatBytes(state.maxUploadBytes)}`);
    return;
  }
  const body = new FormData();
  body.append("file", file, file.name || "pasted-image.png");
  try {
    const response = await fetch("/api/predict", { method: "POST", body });
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      // not JSON: fall through to the status line
    }
    if (!response.ok) {
      showError(card, (data && data.error) || `the server answered HTTP ${response.status}`);
      return;
    }
    showResult(card, file, data.results[0]);
  } catch (error) {
    showError(card, `${file.name}: the request failed (${error.message})`);
  }
}

function handleFiles(files) {
  for (const file of files) classify(file);
}

function setUp() {
  const input = $("file-input");
  const zone = $("drop-zone");
  input.addEventListener("change", () => {
    handleFiles(Array.from(input.files));
    input.value = ""; // choosing the same file again still fires "change"
  });
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
    event.preventDefault();
    zone.classList.add("is-over");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, (event) => {
    event.preventDefault();
    zone.classList.remove("is-over");
  }));
  zone.addEventListener("drop", (event) => handleFiles(Array.from(event.dataTransfer.files)));
  // A drop that misses the zone must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    if (files.length) handleFiles(files);
  });
  $("clear-button").addEventListener("click", () => {
    $("results").replaceChildren();
    state.previews.forEach((url) => URL.revokeObjectURL(url));
    state.previews = [];
    $("toolbar").hidden = true;
  });
  loadModel();
}

setUp();
