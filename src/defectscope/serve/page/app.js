/* defectscope operator page: plain JavaScript, no build step, no external resources.
 *
 * Talks only to the service's HTTP API (/v1/...). The token comes from ?token= (read once, then
 * removed from the address bar) or from the sign-in box, lives in sessionStorage and goes out as
 * "Authorization: Bearer" on every request; images are fetched the same way and shown as blob URLs,
 * because an <img> cannot send headers. Every text that comes from the API or from a file name is
 * put into the page with textContent, never as HTML.
 */
"use strict";

(() => {
  const TOKEN_KEY = "defectscope.token";
  const MODEL_KEY = "defectscope.model";
  const PARALLEL_UPLOADS = 3;
  const REFRESH_MS = 5000;
  const BAR_MAX = 2; // the score bar spans normalized scores 0..2, so the threshold (1) sits in the middle
  const VERDICTS = ["good", "anomalous", "error"];
  const DEFECT_KINDS = ["confirmed_defect", "missed_defect"]; // the kinds that take a defect type and a mask
  const KIND_LABELS = {
    confirmed_defect: "confirmed defect",
    false_alarm: "false alarm",
    missed_defect: "missed defect",
    confirmed_good: "confirmed good",
  };

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  };

  const state = {
    token: null,
    models: [],
    model: null,
    inspections: new Map(), // id -> latest Inspection JSON seen
    historyOffset: 0,
    historyTotal: 0,
    historySignature: "",
    modalId: null,
    started: false,
  };

  // ---------------------------------------------------------------- API access

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function describeDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((d) => (d && d.msg ? `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}` : String(d)))
        .join("; ");
    }
    return JSON.stringify(detail);
  }

  async function errorDetail(resp) {
    let text = "";
    try {
      text = await resp.text();
    } catch (_) {
      /* the body could not be read: the status line is all there is */
    }
    try {
      const body = JSON.parse(text);
      if (body && body.detail !== undefined) return describeDetail(body.detail);
    } catch (_) {
      /* not JSON */
    }
    const short = text && text.length <= 200 && !text.trimStart().startsWith("<") ? `: ${text.trim()}` : "";
    return `HTTP ${resp.status} ${resp.statusText}${short}`;
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    let resp;
    try {
      resp = await fetch(path, { ...options, headers, cache: "no-store" });
    } catch (err) {
      setConnection(false);
      throw new ApiError(0, `cannot reach the service (${err.message})`);
    }
    setConnection(true);
    if (resp.status === 401) {
      const detail = await errorDetail(resp);
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(`The service refused the token (${detail}). Sign in again.`);
      throw new ApiError(401, detail);
    }
    if (!resp.ok) throw new ApiError(resp.status, await errorDetail(resp));
    return resp;
  }

  const getJSON = async (path) => (await api(path)).json();

  function setConnection(ok) {
    const node = $("conn");
    node.textContent = ok ? "connected" : "service unreachable";
    node.classList.toggle("down", !ok);
  }

  // Images behind auth: fetched once each with the token, kept as blob URLs (inspections never change).
  const blobCache = new Map();
  const BLOB_CACHE_MAX = 400;

  function blobUrl(url) {
    let entry = blobCache.get(url);
    if (!entry) {
      entry = api(url)
        .then((resp) => resp.blob())
        .then((blob) => URL.createObjectURL(blob));
      entry.catch(() => blobCache.delete(url));
      blobCache.set(url, entry);
      while (blobCache.size > BLOB_CACHE_MAX) {
        const [oldUrl, oldEntry] = blobCache.entries().next().value;
        blobCache.delete(oldUrl);
        oldEntry.then((u) => URL.revokeObjectURL(u)).catch(() => {});
      }
    }
    return entry;
  }

  function showImage(img, url, fallbackUrl = null) {
    img.classList.add("loading");
    img.classList.remove("failed");
    img.removeAttribute("src");
    img.dataset.url = url || "";
    if (!url) {
      img.classList.remove("loading");
      img.classList.add("failed");
      return Promise.resolve(false);
    }
    return blobUrl(url)
      .then((src) => {
        if (img.dataset.url !== url) return false; // replaced meanwhile
        img.src = src;
        img.classList.remove("loading");
        return true;
      })
      .catch((err) => {
        if (img.dataset.url !== url) return false;
        if (fallbackUrl) return showImage(img, fallbackUrl, null);
        img.classList.remove("loading");
        img.classList.add("failed");
        img.title = `image not available: ${err.message}`;
        return false;
      });
  }

  const lazyImages = new IntersectionObserver(
    (entries) => {
      for (const entry of entries) {
        if (!entry.isIntersecting) continue;
        const img = entry.target;
        lazyImages.unobserve(img);
        showImage(img, img.dataset.lazy, img.dataset.fallback || null);
      }
    },
    { rootMargin: "200px" },
  );

  // ---------------------------------------------------------------- formatting

  function fmt(x) {
    if (x === null || x === undefined || Number.isNaN(Number(x))) return "—";
    const v = Number(x);
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 100) return v.toFixed(1);
    if (a >= 1) return v.toFixed(3);
    return v.toPrecision(3);
  }

  const pad = (n) => String(n).padStart(2, "0");
  function fmtTime(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso || "—";
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(
      d.getMinutes(),
    )}:${pad(d.getSeconds())}`;
  }

  function timeCell(iso) {
    const text = fmtTime(iso);
    const [date, time] = text.includes(" ") ? text.split(" ", 2) : ["", text];
    return el("td", { class: "time", title: text }, el("span", { class: "date", text: `${date} ` }), time);
  }

  const verdictClass = (verdict) => (VERDICTS.includes(verdict) ? `v-${verdict}` : "v-none");
  const verdictText = (verdict) => (verdict ? verdict : "no verdict");

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function feedbackSummary(fb) {
    const parts = [KIND_LABELS[fb.kind] || fb.kind];
    if (fb.defect_type) parts.push(fb.defect_type);
    if (fb.mask) parts.push("with mask");
    return parts.join(" · ");
  }

  // A bar for the normalized score (score / threshold) with the threshold line at 1, the number beside it.
  function scoreBar(ins) {
    const ns = ins.normalized_score;
    const wrap = el("div", { class: `score ${verdictClass(ins.verdict)}` });
    const bar = el("div", { class: "bar", role: "img" });
    if (ns === null || ns === undefined) {
      bar.classList.add("bar-empty");
      bar.setAttribute("aria-label", "no threshold: the score cannot be compared");
      bar.append(el("span", { class: "bar-note", text: "no threshold" }));
      wrap.append(bar);
      return wrap;
    }
    const fraction = Math.max(0, Math.min(Number(ns) / BAR_MAX, 1));
    bar.setAttribute("aria-label", `score ${fmt(ns)} times the threshold`);
    bar.title = `normalized score ${fmt(ns)} (the threshold is 1)`;
    const fill = el("div", { class: "bar-fill" });
    fill.style.width = `${(fraction * 100).toFixed(1)}%`;
    bar.append(fill, el("div", { class: "bar-threshold" }));
    wrap.append(
      bar,
      el("span", { class: "bar-label", "aria-hidden": "true", text: `×${fmt(ns)}${Number(ns) > BAR_MAX ? " »" : ""}` }),
      el(
        "div",
        { class: "bar-scale", "aria-hidden": "true" },
        el("span", { text: "0" }),
        el("span", { class: "mid", text: "threshold" }),
        el("span", { class: "end", text: `${BAR_MAX}×` }),
      ),
    );
    return wrap;
  }

  function numbers(ins) {
    const dl = el("dl", { class: "nums" });
    const add = (term, value) => dl.append(el("div", {}, el("dt", { text: term }), el("dd", { text: value })));
    add("score", fmt(ins.score));
    add("threshold", fmt(ins.threshold));
    add("rule", ins.rule || "—");
    return dl;
  }

  // ---------------------------------------------------------------- sign-in

  function takeTokenFromUrl() {
    const url = new URL(window.location.href);
    if (!url.searchParams.has("token")) return;
    const token = url.searchParams.get("token");
    url.searchParams.delete("token");
    window.history.replaceState(window.history.state, "", `${url.pathname}${url.search}${url.hash}`);
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
  }

  function showLogin(message) {
    $("login-msg").textContent = message || "";
    $("login").hidden = false;
    $("logout").hidden = true;
    if ($("modal").open) $("modal").close();
    $("login-token").value = "";
    $("login-token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const token = $("login-token").value.trim();
    if (!token) return;
    state.token = token;
    try {
      await getJSON("/v1/models");
    } catch (err) {
      if (err.status !== 401) $("login-msg").textContent = err.message;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    start();
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    showLogin("Signed out.");
  }

  // ---------------------------------------------------------------- models and counters

  // The per-verdict counters come with /v1/models (its `inspections` field): one request per refresh.
  const verdictCounts = (model) => (model.inspections && typeof model.inspections === "object" ? model.inspections : null);

  async function loadModels() {
    let models;
    try {
      models = await getJSON("/v1/models");
    } catch (err) {
      $("models-msg").textContent = `Models could not be loaded: ${err.message}`;
      return;
    }
    $("models-msg").textContent = models.length ? "" : "The service serves no model.";
    state.models = models;
    renderModels(models, models.map(verdictCounts));
  }

  function renderModels(models, counts) {
    const list = $("models");
    const names = models.map((m) => m.name);
    const shown = [...list.querySelectorAll("input[name=model]")].map((i) => i.value);
    if (names.join("\n") !== shown.join("\n")) {
      list.querySelectorAll(".model").forEach((n) => n.remove());
      for (const m of models) {
        const input = el("input", { type: "radio", name: "model", value: m.name, id: `model-${m.name}` });
        input.addEventListener("change", () => selectModel(m.name));
        list.append(
          el(
            "label",
            { class: "model", "data-model": m.name, htmlFor: input.id },
            input,
            el(
              "span",
              { class: "model-text" },
              el("span", { class: "model-name", text: m.name }),
              el("span", { class: "model-meta" }),
              el("span", { class: "model-counts" }),
              el("span", { class: "model-feedback" }),
            ),
          ),
        );
      }
      const filter = $("f-model");
      const chosen = filter.value;
      filter.querySelectorAll("option:not([value=''])").forEach((o) => o.remove());
      for (const name of names) filter.append(el("option", { value: name, text: name }));
      filter.value = names.includes(chosen) ? chosen : "";
    }
    models.forEach((m, i) => {
      const label = list.querySelector(`.model[data-model="${CSS.escape(m.name)}"]`);
      const meta = [m.method, m.threshold !== null && m.threshold !== undefined ? `threshold ${fmt(m.threshold)}` : "no threshold"];
      if (m.rule) meta.push(m.rule);
      const engine = m.engine && m.engine.engine;
      if (engine && engine !== "torch") meta.push(m.engine.int8 ? `${engine} int8` : engine);
      label.querySelector(".model-meta").textContent = meta.filter(Boolean).join(" · ");
      const c = counts[i];
      const countsNode = label.querySelector(".model-counts");
      countsNode.replaceChildren();
      if (c) {
        for (const verdict of VERDICTS) {
          countsNode.append(
            el("span", { class: `count ${verdictClass(verdict)}`, "data-verdict": verdict, text: `${c[verdict] || 0} ${verdict}` }),
          );
        }
      }
      const fb = m.feedback || {};
      const waiting = Object.keys(KIND_LABELS)
        .filter((k) => fb[k])
        .map((k) => `${fb[k]} ${KIND_LABELS[k]}${fb[k] === 1 ? "" : "s"}`);
      label.querySelector(".model-feedback").textContent = waiting.length
        ? `waiting for export: ${waiting.join(", ")}`
        : "no feedback waiting for export";
    });
    const saved = state.model || sessionStorage.getItem(MODEL_KEY);
    selectModel(names.includes(saved) ? saved : names[0] || null);
  }

  function selectModel(name) {
    state.model = name;
    if (name) sessionStorage.setItem(MODEL_KEY, name);
    for (const input of $("models").querySelectorAll("input[name=model]")) input.checked = input.value === name;
    for (const label of $("models").querySelectorAll(".model")) label.classList.toggle("selected", label.dataset.model === name);
    $("drop-model").textContent = name ? `inspected with model “${name}”` : "no model to inspect with";
    $("files").disabled = !name;
    $("drop").classList.toggle("disabled", !name);
  }

  // ---------------------------------------------------------------- uploads

  const queue = [];
  let active = 0;
  const tally = { done: 0, failed: 0 };

  function enqueue(files) {
    if (!state.model) {
      $("queue").textContent = "Pick a model first.";
      return;
    }
    for (const file of files) {
      const card = pendingCard(file.name, state.model);
      $("results").prepend(card);
      queue.push({ file, model: state.model, card });
    }
    $("clear-results").hidden = false;
    pump();
  }

  function pump() {
    while (active < PARALLEL_UPLOADS && queue.length) {
      const job = queue.shift();
      active += 1;
      inspect(job).finally(() => {
        active -= 1;
        pump();
        refreshSoon();
      });
    }
    updateQueueStatus();
  }

  function updateQueueStatus() {
    const node = $("queue");
    if (active || queue.length) {
      node.textContent = `Inspecting ${active}${queue.length ? `, ${queue.length} waiting` : ""}…`;
    } else if (tally.done || tally.failed) {
      node.textContent = `${plural(tally.done, "image")} inspected${tally.failed ? `, ${tally.failed} not inspected (see the cards)` : ""}.`;
    }
  }

  async function inspect({ file, model, card }) {
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const resp = await api(`/v1/models/${encodeURIComponent(model)}/inspect`, { method: "POST", body: form });
      const ins = await resp.json();
      state.inspections.set(ins.id, ins);
      fillCard(card, ins);
      tally.done += 1;
    } catch (err) {
      failCard(card, err);
      tally.failed += 1;
    }
  }

  function pendingCard(filename, model) {
    return el(
      "li",
      { class: "card pending", "data-filename": filename, "aria-busy": "true" },
      el(
        "div",
        { class: "card-head" },
        el("span", { class: "fname", text: filename, title: filename }),
        el("span", { class: "card-model", text: model }),
      ),
      el("p", { class: "verdict", text: "inspecting…" }),
    );
  }

  function failCard(card, err) {
    card.classList.remove("pending");
    card.classList.add("failed");
    card.removeAttribute("aria-busy");
    card.dataset.verdict = "failed";
    const head = card.querySelector(".card-head");
    card.replaceChildren(
      head,
      el("p", { class: "verdict", text: "not inspected" }),
      el("p", { class: "reason", role: "alert", text: err.status ? `${err.status}: ${err.message}` : err.message }),
    );
  }

  function fillCard(card, ins) {
    card.classList.remove("pending");
    card.removeAttribute("aria-busy");
    card.className = `card ${verdictClass(ins.verdict)}`;
    card.dataset.id = ins.id;
    card.dataset.verdict = ins.verdict || "none";
    const head = card.querySelector(".card-head");
    card.replaceChildren(head);
    const img = el("img", { alt: `Overlay of ${ins.filename || "the image"}`, decoding: "async" });
    const thumb = el("button", { type: "button", class: "thumb", "aria-label": `Enlarge ${ins.filename || ins.id}` }, img);
    thumb.addEventListener("click", () => openModal(ins.id));
    showImage(img, ins.overlay_url, ins.image_url);
    const verdict = el("p", { class: "verdict", text: verdictText(ins.verdict) });
    card.append(thumb, verdict);
    if (ins.reason) card.append(el("p", { class: "reason", text: ins.reason }));
    card.append(scoreBar(ins), numbers(ins), feedbackBlock(ins, false));
    card.onclick = (e) => {
      if (!e.target.closest("button, input, label, a")) openModal(ins.id); // a click on the card enlarges it
    };
  }

  function refreshCards(ins) {
    for (const card of document.querySelectorAll(`.card[data-id="${CSS.escape(ins.id)}"]`)) {
      markRecorded(card.querySelector(".feedback"), ins);
    }
  }

  // ---------------------------------------------------------------- feedback

  function feedbackBlock(ins, inModal) {
    const block = $("feedback-tpl").content.firstElementChild.cloneNode(true);
    const typeInput = block.querySelector("input[name=defect_type]");
    typeInput.id = `dt-${inModal ? "m" : "c"}-${ins.id}`;
    block.querySelector(".fb-type").htmlFor = typeInput.id;
    for (const button of block.querySelectorAll("button[data-kind]")) {
      button.addEventListener("click", () => sendFeedback(ins.id, button.dataset.kind, block, inModal));
    }
    markRecorded(block, ins);
    return block;
  }

  function markRecorded(block, ins) {
    if (!block) return;
    const kinds = new Set((ins.feedback || []).map((f) => f.kind));
    for (const button of block.querySelectorAll("button[data-kind]")) {
      button.setAttribute("aria-pressed", kinds.has(button.dataset.kind) ? "true" : "false");
    }
    const items = ins.feedback || [];
    const last = items[items.length - 1];
    const status = block.querySelector(".fb-status");
    if (last && !status.dataset.sticky) status.textContent = `Recorded: ${feedbackSummary(last)}`;
  }

  async function sendFeedback(id, kind, block, inModal) {
    const status = block.querySelector(".fb-status");
    const buttons = block.querySelectorAll("button[data-kind]");
    const body = { kind };
    const isDefect = DEFECT_KINDS.includes(kind);
    const defectType = block.querySelector("input[name=defect_type]").value.trim();
    const left = []; // what the operator gave that only goes with defect feedback
    if (defectType) {
      if (isDefect) body.defect_type = defectType;
      else left.push("defect type");
    }
    if (inModal && mask.drawn) {
      if (isDefect) body.mask_png_base64 = maskPngBase64();
      else left.push("mask");
    }
    buttons.forEach((b) => (b.disabled = true));
    status.classList.remove("error");
    status.textContent = "Sending…";
    try {
      const resp = await api(`/v1/inspections/${encodeURIComponent(id)}/feedback`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const fb = await resp.json();
      const note = left.length ? ` (${left.join(" and ")} not sent: ${left.length > 1 ? "they go" : "it goes"} with defects only)` : "";
      status.textContent = `Recorded: ${feedbackSummary(fb)} at ${fmtTime(fb.created)}${note}`;
      status.dataset.sticky = "1";
      if (body.mask_png_base64) $("mask-state").textContent = "mask sent with this feedback";
      const ins = await getJSON(`/v1/inspections/${encodeURIComponent(id)}`);
      state.inspections.set(id, ins);
      refreshCards(ins);
      if (state.modalId === id) {
        markRecorded($("m-feedback").querySelector(".feedback"), ins);
        renderRecorded(ins);
      }
      markRecorded(block, ins);
      refreshSoon();
    } catch (err) {
      status.classList.add("error");
      status.textContent = `Feedback not recorded: ${err.message}`;
    } finally {
      buttons.forEach((b) => (b.disabled = false));
    }
  }

  // ---------------------------------------------------------------- the modal and the mask brush

  const mask = { drawn: false, drawing: false, last: null };

  function resetMask() {
    const canvas = $("m-canvas");
    const img = $("m-image");
    canvas.width = img.naturalWidth || 1;
    canvas.height = img.naturalHeight || 1;
    mask.drawn = false;
    $("mask-state").textContent = "";
  }

  function canvasPoint(event) {
    const canvas = $("m-canvas");
    const rect = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * canvas.height) / rect.height,
      scale: canvas.width / rect.width,
    };
  }

  function stroke(from, to) {
    const ctx = $("m-canvas").getContext("2d");
    ctx.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
    ctx.strokeStyle = "#ff2d55";
    ctx.fillStyle = "#ff2d55";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush").value) * to.scale;
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    if (!$("erase").checked) {
      mask.drawn = true;
      $("mask-state").textContent = "mask drawn: it is sent with the next feedback from this window";
    }
  }

  function setupBrush() {
    const canvas = $("m-canvas");
    canvas.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      canvas.setPointerCapture(e.pointerId);
      mask.drawing = true;
      mask.last = canvasPoint(e);
      stroke(mask.last, mask.last);
      e.preventDefault();
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!mask.drawing) return;
      const point = canvasPoint(e);
      stroke(mask.last, point);
      mask.last = point;
    });
    const end = () => {
      mask.drawing = false;
      mask.last = null;
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    $("mask-clear").addEventListener("click", resetMask);
  }

  // The mask as the API wants it: a PNG at the input image's size, white where the operator drew.
  function maskPngBase64() {
    const canvas = $("m-canvas");
    const white = el("canvas", { width: canvas.width, height: canvas.height });
    const wctx = white.getContext("2d");
    wctx.drawImage(canvas, 0, 0);
    wctx.globalCompositeOperation = "source-in";
    wctx.fillStyle = "#fff";
    wctx.fillRect(0, 0, white.width, white.height);
    const out = el("canvas", { width: canvas.width, height: canvas.height });
    const octx = out.getContext("2d");
    octx.fillStyle = "#000";
    octx.fillRect(0, 0, out.width, out.height);
    octx.drawImage(white, 0, 0);
    return out.toDataURL("image/png").split(",", 2)[1];
  }

  function renderRecorded(ins) {
    const list = $("m-recorded");
    list.replaceChildren();
    const items = ins.feedback || [];
    if (!items.length) list.append(el("li", { class: "msg", text: "none yet" }));
    for (const fb of items) {
      list.append(
        el(
          "li",
          { "data-kind": fb.kind },
          el("strong", { text: KIND_LABELS[fb.kind] || fb.kind }),
          ` · ${fmtTime(fb.created)}`,
          fb.defect_type ? ` · type ${fb.defect_type}` : "",
          fb.mask ? " · with mask" : "",
          fb.note ? ` · ${fb.note}` : "",
          fb.exported ? " · exported" : " · waiting for export",
        ),
      );
    }
  }

  async function openModal(id) {
    let ins = state.inspections.get(id);
    try {
      ins = await getJSON(`/v1/inspections/${encodeURIComponent(id)}`);
      state.inspections.set(id, ins);
    } catch (err) {
      if (!ins) {
        $("history-msg").textContent = `Inspection ${id} could not be opened: ${err.message}`;
        return;
      }
    }
    state.modalId = id;
    const modal = $("modal");
    $("modal-title").textContent = ins.filename || ins.id;
    const summary = $("modal-summary");
    summary.replaceChildren(
      el("p", { class: `verdict big ${verdictClass(ins.verdict)}`, text: verdictText(ins.verdict) }),
      ins.reason ? el("p", { class: "reason", text: ins.reason }) : "",
      scoreBar(ins),
      numbers(ins),
      el(
        "p",
        { class: "meta" },
        `${ins.model} · ${fmtTime(ins.created)}`,
        ins.timings && typeof ins.timings.total_ms === "number" ? ` · ${ins.timings.total_ms.toFixed(0)} ms` : "",
        el("br"),
        el("span", { class: "mono", text: `id ${ins.id}` }),
      ),
    );
    const img = $("m-image");
    img.onload = resetMask;
    resetMask();
    for (const [id, url] of [
      ["m-image", ins.image_url],
      ["m-overlay", ins.overlay_url],
      ["m-heatmap", ins.heatmap_url],
    ]) {
      const link = $(`${id}-link`);
      link.hidden = true;
      showImage($(id), url).then((ok) => {
        if (ok && state.modalId === ins.id) {
          link.href = $(id).src;
          link.hidden = false;
        }
      });
    }
    $("m-feedback").replaceChildren(feedbackBlock(ins, true));
    renderRecorded(ins);
    if (!modal.open) modal.showModal();
  }

  function closeModal() {
    state.modalId = null;
    if ($("modal").open) $("modal").close();
  }

  // ---------------------------------------------------------------- history

  function historyQuery() {
    const q = new URLSearchParams();
    const model = $("f-model").value;
    const verdict = $("f-verdict").value;
    if (model) q.set("model", model);
    if (verdict) q.set("verdict", verdict);
    for (const [key, id] of [
      ["since", "f-since"],
      ["until", "f-until"],
    ]) {
      const value = $(id).value;
      if (!value) continue;
      const d = new Date(value); // datetime-local is local time; the API wants an instant
      if (!Number.isNaN(d.getTime())) q.set(key, d.toISOString());
    }
    q.set("limit", $("f-limit").value);
    q.set("offset", String(state.historyOffset));
    return q;
  }

  async function loadHistory() {
    let data;
    try {
      data = await getJSON(`/v1/inspections?${historyQuery()}`);
    } catch (err) {
      $("history-msg").textContent = `History could not be loaded: ${err.message}`;
      return;
    }
    $("history-msg").textContent = data.total ? "" : "No inspection matches these filters.";
    state.historyTotal = data.total;
    for (const ins of data.items) state.inspections.set(ins.id, ins);
    const signature = JSON.stringify([data.total, data.offset, data.items.map((i) => [i.id, (i.feedback || []).length])]);
    if (signature !== state.historySignature) {
      state.historySignature = signature;
      renderHistory(data.items);
    }
    const limit = Number($("f-limit").value);
    const first = data.total ? state.historyOffset + 1 : 0;
    const last = Math.min(state.historyOffset + data.items.length, data.total);
    $("page-info").textContent = data.total ? `${first}–${last} of ${data.total}` : "0 of 0";
    $("prev").disabled = state.historyOffset === 0;
    $("next").disabled = state.historyOffset + limit >= data.total;
  }

  function renderHistory(items) {
    const body = $("history").tBodies[0];
    body.replaceChildren();
    for (const ins of items) {
      const img = el("img", { class: "thumb-sm", alt: "", width: 48, height: 48 });
      img.dataset.lazy = ins.overlay_url || ins.image_url;
      img.dataset.fallback = ins.image_url || "";
      const fb = (ins.feedback || []).map((f) => KIND_LABELS[f.kind] || f.kind);
      const row = el(
        "tr",
        { "data-id": ins.id, "data-verdict": ins.verdict || "none", tabIndex: 0 },
        el("td", {}, img),
        timeCell(ins.created),
        el("td", { class: "fname", text: ins.filename || "—", title: ins.filename || "" }),
        el("td", { text: ins.model }),
        el("td", {}, el("span", { class: `pill ${verdictClass(ins.verdict)}`, text: verdictText(ins.verdict) })),
        el("td", { class: "num", text: fmt(ins.score) }),
        el("td", { class: "num", text: fmt(ins.threshold) }),
        el("td", { class: "fb-cell", text: [...new Set(fb)].join(", ") || "—" }),
      );
      row.setAttribute("aria-label", `${ins.filename || ins.id}, ${verdictText(ins.verdict)}: open`);
      row.addEventListener("click", () => openModal(ins.id));
      row.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          openModal(ins.id);
        }
      });
      body.append(row);
      lazyImages.observe(img);
    }
  }

  let refreshTimer = null;
  function refreshSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(() => {
      loadHistory();
      loadModels();
    }, 250);
  }

  // ---------------------------------------------------------------- wiring

  function setupDrop() {
    const drop = $("drop");
    const input = $("files");
    input.addEventListener("change", () => {
      enqueue([...input.files]);
      input.value = "";
    });
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (e) => {
        e.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      enqueue([...(e.dataTransfer ? e.dataTransfer.files : [])]);
    });
    // A file dropped beside the zone must not make the browser navigate away from the page.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
  }

  function setupHistory() {
    $("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      state.historyOffset = 0;
      loadHistory();
    });
    $("filters").addEventListener("reset", () =>
      setTimeout(() => {
        state.historyOffset = 0;
        loadHistory();
      }),
    );
    for (const id of ["f-model", "f-verdict", "f-limit"]) {
      $(id).addEventListener("change", () => {
        state.historyOffset = 0;
        loadHistory();
      });
    }
    $("prev").addEventListener("click", () => {
      state.historyOffset = Math.max(0, state.historyOffset - Number($("f-limit").value));
      loadHistory();
    });
    $("next").addEventListener("click", () => {
      state.historyOffset += Number($("f-limit").value);
      loadHistory();
    });
    setInterval(() => {
      const idle = !$("modal").open && document.visibilityState === "visible" && $("login").hidden;
      if (state.started && idle && $("auto-refresh").checked) {
        if (state.historyOffset === 0) loadHistory();
        loadModels();
      }
    }, REFRESH_MS);
  }

  function setupModal() {
    const modal = $("modal");
    $("modal-close").addEventListener("click", closeModal);
    modal.addEventListener("close", () => (state.modalId = null));
    modal.addEventListener("click", (e) => {
      if (e.target === modal) closeModal(); // a click on the backdrop
    });
    setupBrush();
  }

  function start() {
    state.token = sessionStorage.getItem(TOKEN_KEY);
    $("login").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    state.started = true;
    state.historySignature = "";
    loadModels();
    loadHistory();
  }

  function main() {
    $("login-form").addEventListener("submit", signIn);
    $("logout").addEventListener("click", signOut);
    $("clear-results").addEventListener("click", () => {
      $("results").querySelectorAll(".card:not(.pending)").forEach((c) => c.remove());
      tally.done = 0;
      tally.failed = 0;
      $("queue").textContent = "";
      $("clear-results").hidden = !$("results").children.length;
    });
    setupDrop();
    setupHistory();
    setupModal();
    takeTokenFromUrl();
    state.token = sessionStorage.getItem(TOKEN_KEY);
    if (state.token) start();
    else showLogin("");
  }

  main();
})();
