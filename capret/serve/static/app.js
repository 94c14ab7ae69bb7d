// capret serve page: one client of the JSON API (see /docs).
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;

function setStatus(id, text, error = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", error);
}

async function api(path, form) {
  const response = await fetch(path, form ? { method: "POST", body: form } : {});
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function galleryUrl(id, crop = true) {
  return `/api/gallery/image?id=${encodeURIComponent(id)}&crop=${crop}`;
}

function card(match, onReference) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.id = match.id;
  const img = document.createElement("img");
  img.src = galleryUrl(match.id);
  img.alt = match.id;
  img.title = match.caption || match.id;
  const meta = document.createElement("div");
  meta.innerHTML = `<span class="score">#${match.rank} · ${match.score.toFixed(3)}</span><br>${match.id}`;
  div.append(img, meta);
  if (onReference) {
    const use = document.createElement("button");
    use.type = "button";
    use.className = "use-reference";
    use.textContent = "use as reference";
    use.addEventListener("click", () => onReference(match));
    div.append(use);
  }
  return div;
}

function column(title, result, onReference) {
  const col = document.createElement("div");
  col.className = "column";
  const t = result.timings_ms || {};
  const times = Object.entries(t).map(([k, v]) => `${k} ${v.toFixed(1)} ms`).join(" · ");
  col.innerHTML = `<h3>${title}</h3><div class="timings">${times}</div>`;
  const grid = document.createElement("div");
  grid.className = "grid results";
  for (const m of result.results) grid.append(card(m, onReference));
  col.append(grid);
  return col;
}

// ------------------------------------------------------------------------------------------ image to image
async function imageSearch(event) {
  event.preventDefault();
  const file = $("image-file").files[0];
  const galleryId = $("image-gallery").value;
  if (!file && !galleryId) return setStatus("image-status", "choose a photo or a gallery item", true);
  const variants = [{ title: "with captions", use_captions: true, rerank: false }];
  if ($("compare-captions").checked) variants.push({ title: "without captions", use_captions: false, rerank: false });
  if ($("compare-rerank").checked && INFO && INFO.reranker)
    variants.push({ title: `captions + ${INFO.reranker} reranking`, use_captions: true, rerank: true });
  setStatus("image-status", "searching…");
  $("image-results").textContent = "";
  try {
    const results = [];
    for (const v of variants) {  // one after the other: the server bounds concurrent searches
      const form = new FormData();
      if (file) form.append("image", file); else form.append("gallery_id", galleryId);
      form.append("k", $("image-k").value);
      form.append("use_captions", v.use_captions);
      form.append("rerank", v.rerank);
      results.push([v, await api("/api/search/image", form)]);
    }
    const first = results[0][1];
    const item = first.items[0] || {};
    const captionMs = first.timings_ms.caption || 0;
    $("image-query").innerHTML = `<img id="query-crop" src="${first.query_crop}" alt="query item">
      <div><div class="caption" id="query-caption"><b>Caption built for the query item</b>
      (${captionMs.toFixed(1)} ms): ${item.caption ? escapeHtml(item.caption) : "<i>none</i>"}</div>
      <div class="timings">${first.fallback ? "no item detected: whole photo searched · " : ""}${first.items.length} item(s) searched</div></div>`;
    for (const [v, r] of results) $("image-results").append(column(v.title, r, null));
    setStatus("image-status", `done: ${first.results.length} results`);
  } catch (err) {
    setStatus("image-status", err.message, true);
  }
}

// ------------------------------------------------------------------------------------------ composed
const turns = [];

async function composedSearch(event, reference) {
  if (event) event.preventDefault();
  const text = $("composed-text").value.trim();
  if (!text) return setStatus("composed-status", "type how the target should differ", true);
  const form = new FormData();
  const file = $("composed-file").files[0];
  const ref = reference || (file ? null : $("composed-gallery").value);
  if (ref) form.append("reference_id", ref);
  else if (file) form.append("image", file);
  else return setStatus("composed-status", "choose a reference photo or gallery item", true);
  form.append("text", text);
  form.append("k", $("composed-k").value);
  form.append("method", $("composed-method").value);
  setStatus("composed-status", "searching…");
  try {
    const result = await api("/api/search/composed", form);
    turns.push({ reference: ref || (file ? file.name : ""), text, result });
    renderHistory();
    setStatus("composed-status", `turn ${turns.length}: ${result.results.length} results (${result.method})`);
  } catch (err) {
    setStatus("composed-status", err.message, true);
  }
}

function useAsReference(match) {
  $("composed-gallery").value = match.id;
  $("composed-file").value = "";
  $("composed-text").value = "";
  $("composed-text").focus();
  setStatus("composed-status", `reference is now ${match.id}: type the next modification and search`);
}

function renderHistory() {
  const list = $("history");
  list.textContent = "";
  turns.forEach((turn, i) => {
    const li = document.createElement("li");
    li.className = "turn";
    li.innerHTML = `<div class="turn-head"><img src="${turn.result.reference_crop}" alt="reference">
      <div><b>Turn ${i + 1}</b> · reference ${escapeHtml(turn.reference)} · “${escapeHtml(turn.text)}”</div></div>`;
    li.append(column(`${turn.result.method}`, turn.result, useAsReference));
    list.prepend(li);
  });
}

function escapeHtml(text) {
  const div = document.createElement("div");
  div.textContent = String(text);
  return div.innerHTML;
}

// ------------------------------------------------------------------------------------------ start-up
async function start() {
  document.querySelectorAll(".tab").forEach((tab) =>
    tab.addEventListener("click", () => {
      document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
      $("panel-image").classList.toggle("hidden", tab.dataset.tab !== "image");
      $("panel-composed").classList.toggle("hidden", tab.dataset.tab !== "composed");
    })
  );
  $("image-form").addEventListener("submit", imageSearch);
  $("composed-form").addEventListener("submit", (e) => composedSearch(e, null));
  try {
    INFO = await api("/api/info");
    $("info").textContent = `${INFO.gallery_size} gallery items · captioner ${INFO.captioner || "none"} · ` +
      `detector ${INFO.detector || "none"} · reranker ${INFO.reranker || "none"}`;
    for (const m of INFO.composed_methods) $("composed-method").append(new Option(m, m));
    const gallery = await api("/api/gallery?limit=500");
    for (const item of gallery.items) {
      $("image-gallery").append(new Option(item.id, item.id));
      $("composed-gallery").append(new Option(item.id, item.id));
    }
  } catch (err) {
    $("info").textContent = `cannot reach the API: ${err.message}`;
  }
}

start();
