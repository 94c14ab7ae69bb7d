// The catalogue page: a client of the JSON API (/api/info, /api/categories, /api/search, /api/item/image).
"use strict";

const $ = (id) => document.getElementById(id);

async function getJSON(url) {
  const reply = await fetch(url);
  if (!reply.ok) throw new Error((await reply.json()).detail || reply.statusText);
  return reply.json();
}

async function load() {
  const info = await getJSON("/api/info");
  $("info").textContent = `${info.rows} items · ${info.index} search · model ${info.fingerprint}` +
    (info.writes ? " · writes enabled" : "");
  const categories = await getJSON("/api/categories");
  for (const [name, count] of Object.entries(categories)) {
    if (!name) continue;
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `${name} (${count})`;
    $("category").appendChild(option);
  }
}

function card(result) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = `/api/item/image?id=${encodeURIComponent(result.id)}&crop=true`;
  img.alt = result.id;
  const caption = document.createElement("figcaption");
  caption.textContent = `#${result.rank} ${result.id} · ${result.category || "—"} · ${result.score.toFixed(3)}`;
  caption.title = result.caption || "";
  figure.append(img, caption);
  return figure;
}

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  form.append("image", $("photo").files[0]);
  form.append("k", $("k").value);
  if ($("category").value) form.append("category", $("category").value);
  if ($("text").value) form.append("text", $("text").value);
  form.append("use_captions", $("use-captions").checked ? "true" : "false");
  $("status").textContent = "searching…";
  $("results").replaceChildren();
  try {
    const reply = await fetch("/api/search", { method: "POST", body: form });
    const body = await reply.json();
    if (!reply.ok) throw new Error(body.detail || reply.statusText);
    $("status").textContent = `${body.results.length} results in ${body.timings_ms.total.toFixed(0)} ms` +
      (body.category ? ` (category ${body.category})` : "");
    $("results").replaceChildren(...body.results.map(card));
  } catch (error) {
    $("status").textContent = `error: ${error.message}`;
  }
});

load().catch((error) => { $("info").textContent = `error: ${error.message}`; });
