// The live dashboard: one card per key, fed by the SSE stream at `events`.
//
// The stream sends the current value of every key first, then each commit as
// `event: update`, `id: <seq>`, `data: {"type", "updated", "valid", "values", "seq"}`.
// Events are queued per key and drawn once per animation frame, so a burst of
// commits costs one DOM update per changed card, never one per event.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || "";
  const keysFilter = params.get("keys") || "";

  const $ = (id) => document.getElementById(id);
  const cardsEl = $("cards");
  const emptyEl = $("empty");
  const connEl = $("conn");
  const template = $("card-template");
  const stat = { keys: $("stat-keys"), rate: $("stat-rate"), expired: $("stat-expired"), seq: $("stat-seq") };

  // ---- URLs: relative (works behind a path prefix), token passed on ---------------

  function apiUrl(path, extra) {
    const q = new URLSearchParams(extra || {});
    if (token) q.set("token", token);
    const s = q.toString();
    return s ? `${path}?${s}` : path;
  }
  $("link-keys").href = apiUrl("keys");
  $("link-docs").href = apiUrl("docs");

  // ---- formatting -------------------------------------------------------------------

  const numberFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
  const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  const dateTimeFmt = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });

  // Field-name suffix -> unit shown after a number (longest suffixes first).
  const UNITS = [
    ["_mm_s", "mm/s"], ["_ugm3", "µg/m³"], ["_days", "d"], ["_pct", "%"], ["_hpa", "hPa"],
    ["_kph", "km/h"], ["_kwh", "kWh"], ["_kw", "kW"], ["_bar", "bar"], ["_lpm", "L/min"],
    ["_rpm", "rpm"], ["_ppm", "ppm"], ["_ms", "ms"], ["_c", "°C"], ["_v", "V"],
  ];
  const ACRONYMS = /^(pm\d+(\.\d+)?|no2|o3|co2|aqi|id|url)$/;
  const TONES = {
    ok: "ok", good: "ok", normal: "ok", online: "ok", on: "ok", clear: "ok",
    warning: "warn", moderate: "warn", degraded: "warn", "check pressure": "warn",
    "unhealthy for sensitive groups": "warn",
    alarm: "bad", error: "bad", critical: "bad", offline: "bad", unhealthy: "bad",
    "very unhealthy": "bad", hazardous: "bad", storm: "bad",
  };
  const labelCache = new Map();

  function fieldLabel(name) {
    let hit = labelCache.get(name);
    if (hit) return hit;
    let base = name, unit = "";
    for (const [suffix, u] of UNITS) {
      if (name.length > suffix.length && name.endsWith(suffix)) { base = name.slice(0, -suffix.length); unit = u; break; }
    }
    let label = base.replace(/(\d)_(\d)/g, "$1.$2").replace(/_/g, " ");
    label = label.split(" ").map((w) => (ACRONYMS.test(w) ? w.toUpperCase() : w)).join(" ");
    hit = { label: label.charAt(0).toUpperCase() + label.slice(1), unit };
    labelCache.set(name, hit);
    return hit;
  }

  const ISO_DATE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/;

  // Grouped digits and at most two decimals; tiny values keep three significant digits
  // instead of rounding to 0.
  function formatNumber(value) {
    const abs = Math.abs(value);
    if (abs > 0 && abs < 0.01) return value.toPrecision(3);
    return numberFmt.format(value);
  }

  // Fills `dd` with a readable rendering of one value.
  function renderValue(dd, name, value) {
    dd.className = "";
    dd.textContent = "";
    dd.title = "";
    if (typeof value === "number") {
      dd.classList.add("num");
      dd.append(formatNumber(value));
      const { unit } = fieldLabel(name);
      if (unit) {
        const u = document.createElement("span");
        u.className = "unit";
        u.textContent = unit;
        dd.append(u);
      }
    } else if (typeof value === "boolean") {
      const chip = document.createElement("span");
      chip.className = `chip ${value ? "ok" : "off"}`;
      chip.textContent = value ? "yes" : "no";
      dd.append(chip);
    } else if (typeof value === "string") {
      const tone = TONES[value.toLowerCase()];
      if (tone && /status|category|state|health|conditions/.test(name)) {
        const chip = document.createElement("span");
        chip.className = `chip ${tone}`;
        chip.textContent = value;
        dd.append(chip);
      } else if (ISO_DATE.test(value) && !Number.isNaN(Date.parse(value))) {
        dd.textContent = dateTimeFmt.format(new Date(value));
        dd.title = value;
      } else {
        dd.textContent = value;
      }
    } else if (value === null) {
      dd.textContent = "–";
    } else {
      const text = JSON.stringify(value);
      dd.classList.add("json");
      dd.textContent = text.length > 160 ? `${text.slice(0, 157)}…` : text;
      if (text.length > 160) dd.title = text.slice(0, 2000);
    }
  }

  function relative(ms) {
    const s = Math.round(Math.abs(ms) / 1000);
    if (s < 1) return "now";
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h`;
    return `${Math.floor(s / 86400)} d`;
  }

  function clock(ms) {
    const d = new Date(ms);
    return Math.abs(Date.now() - ms) < 20 * 3600 * 1000 ? timeFmt.format(d) : dateTimeFmt.format(d);
  }

  // ---- cards ------------------------------------------------------------------------

  const cards = new Map(); // type -> card record
  const order = []; // sorted types, to insert new cards in place
  let filterText = "";

  // A stable colour per kind (the part before the first ":"): cards of a kind match.
  function hue(text) {
    let h = 0;
    for (let i = 0; i < text.length; i += 1) h = (h * 31 + text.charCodeAt(i)) >>> 0;
    return h % 360;
  }

  function createCard(type) {
    const el = template.content.firstElementChild.cloneNode(true);
    const colon = type.indexOf(":");
    el.dataset.type = type;
    const kind = colon > 0 ? type.slice(0, colon) : "";
    el.querySelector(".kind").textContent = kind;
    el.style.setProperty("--hue", String(hue(kind || type)));
    const name = el.querySelector(".name");
    name.textContent = colon > 0 ? type.slice(colon + 1) : type;
    name.href = apiUrl(`keys/${encodeURIComponent(type)}`);
    name.title = `${type} (open the stored JSON)`;
    const card = {
      type, el,
      values: el.querySelector(".values"),
      updated: el.querySelector(".updated"),
      valid: el.querySelector(".valid"),
      state: el.querySelector(".state"),
      seqEl: el.querySelector(".seq"),
      rows: new Map(), // field -> { dd, text, value }
      fields: "",
      seq: null, data: null, updatedAt: NaN, validAt: null, updatedClock: "", validClock: "",
      expired: false, flip: false, animate: false,
      // Painted until the observer says otherwise: a new card is usually on screen.
      visible: true, dirty: false,
      shown: { updated: "", valid: "" },
    };
    el.hidden = !matches(type);
    // Binary search for the sorted position.
    let lo = 0, hi = order.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (order[mid] < type) lo = mid + 1; else hi = mid; }
    const next = lo < order.length ? cards.get(order[lo]).el : null;
    order.splice(lo, 0, type);
    cardsEl.insertBefore(el, next);
    cards.set(type, card);
    if (observer) observer.observe(el);
    stat.keys.textContent = numberFmt.format(cards.size);
    if (!el.hidden) emptyEl.hidden = true;
    return card;
  }

  function renderValues(card, values, animate) {
    const names = values && typeof values === "object" ? Object.keys(values) : [];
    const fields = names.join("\u0000");
    if (fields !== card.fields) {
      // A different set of fields: rebuild this card's list (rare).
      card.values.textContent = "";
      card.rows.clear();
      card.fields = fields;
      for (const n of names) {
        const dt = document.createElement("dt");
        dt.textContent = fieldLabel(n).label;
        dt.title = n;
        const dd = document.createElement("dd");
        card.values.append(dt, dd);
        card.rows.set(n, { dd, text: undefined, value: undefined });
      }
      if (!names.length) {
        const none = document.createElement("dd");
        none.className = "empty-values";
        none.textContent = "no values";
        card.values.append(none);
      }
      animate = false;
    }
    for (const n of names) {
      const row = card.rows.get(n);
      const value = values[n];
      const text = JSON.stringify(value);
      if (text === row.text) continue; // unchanged values cost nothing
      const before = row.value;
      row.text = text;
      row.value = value;
      renderValue(row.dd, n, value);
      if (animate) {
        const how = typeof value === "number" && typeof before === "number"
          ? (value > before ? "up" : "down") : "chg";
        row.dd.classList.add(`${how}-${card.flip ? "a" : "b"}`);
      }
    }
  }

  // Data first, DOM second: applyUpdate records the value and the expired state
  // (cheap, for every card); paint() draws the card, and runs only for cards on or
  // near the screen.  An off-screen card is marked dirty and painted when it is
  // scrolled into view, so thousands of keys at high rates cost little DOM work.
  function applyUpdate(d) {
    if (!d || typeof d.type !== "string") return;
    const card = cards.get(d.type) || createCard(d.type);
    if (card.seq !== null && card.seq === d.seq) return; // a replayed duplicate
    card.animate = card.seq !== null;
    card.seq = d.seq;
    card.data = d;
    card.updatedAt = Date.parse(d.updated);
    card.validAt = d.valid ? Date.parse(d.valid) : null;
    // Clock strings change only with the value: formatted once here, not every second.
    card.updatedClock = Number.isNaN(card.updatedAt) ? "" : clock(card.updatedAt);
    card.validClock = card.validAt === null || Number.isNaN(card.validAt) ? "" : clock(card.validAt);
    markExpiry(card, Date.now());
    if (card.visible) paint(card);
    else card.dirty = true;
  }

  function paint(card) {
    const d = card.data;
    card.dirty = false;
    if (!d) return;
    card.flip = !card.flip;
    card.updated.dateTime = d.updated || "";
    card.updated.title = d.updated || "";
    card.valid.dateTime = d.valid || "";
    card.valid.title = d.valid || "no expiry";
    card.seqEl.textContent = d.seq != null ? `#${d.seq}` : "";
    renderValues(card, d.values, card.animate);
    refreshTimes(card, Date.now());
    if (card.animate) {
      card.el.classList.remove(card.flip ? "flash-b" : "flash-a");
      card.el.classList.add(card.flip ? "flash-a" : "flash-b");
      card.animate = false;
    }
  }

  // The expired state is kept current on every card, on screen or not, and
  // re-evaluated by the clock too: a value expires when its `valid` instant
  // passes, with or without a new event.
  function markExpiry(card, now) {
    const hasValid = card.validAt !== null && !Number.isNaN(card.validAt);
    const expired = hasValid && now >= card.validAt;
    if (expired !== card.expired || card.el.dataset.expired === undefined) {
      card.expired = expired;
      card.el.classList.toggle("expired", expired);
      card.el.dataset.expired = String(expired);
    }
    const state = !hasValid ? "no-expiry" : expired ? "expired" : "valid";
    if (state !== card.state.dataset.state) {
      card.state.dataset.state = state;
      card.state.textContent = state === "no-expiry" ? "no expiry" : state;
    }
  }

  // Relative times ("3 s ago", "58 s left"), only for painted cards.
  function refreshTimes(card, now) {
    let updated = "–";
    if (card.updatedClock) {
      const age = relative(now - card.updatedAt);
      updated = `${card.updatedClock} · ${age === "now" ? age : `${age} ago`}`;
    }
    let valid = "no expiry";
    if (card.validClock) {
      valid = now >= card.validAt
        ? `expired ${relative(now - card.validAt)} ago`
        : `until ${card.validClock} · ${relative(card.validAt - now)} left`;
    }
    if (updated !== card.shown.updated) { card.updated.textContent = updated; card.shown.updated = updated; }
    if (valid !== card.shown.valid) { card.valid.textContent = valid; card.shown.valid = valid; }
  }

  const observer = "IntersectionObserver" in window
    ? new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const card = cards.get(entry.target.dataset.type);
        if (!card) continue;
        card.visible = entry.isIntersecting;
        if (card.visible && card.dirty) paint(card);
      }
    }, { rootMargin: "400px 0px" })
    : null;

  // ---- filter -----------------------------------------------------------------------

  function matches(type) {
    return !filterText || type.toLowerCase().includes(filterText);
  }
  $("filter").addEventListener("input", (e) => {
    filterText = e.target.value.trim().toLowerCase();
    let shown = 0;
    for (const card of cards.values()) {
      card.el.hidden = !matches(card.type);
      if (!card.el.hidden) shown += 1;
    }
    showEmpty(shown);
  });

  function showEmpty(shown) {
    emptyEl.hidden = shown > 0;
    if (!shown) {
      emptyEl.textContent = cards.size ? `No key matches “${filterText}”.` : "Waiting for the first update…";
    }
  }

  // ---- drawing: at most once per frame ----------------------------------------------

  const pending = new Map(); // type -> latest event data not drawn yet
  let frame = 0;

  function draw() {
    frame = 0;
    for (const d of pending.values()) applyUpdate(d);
    pending.clear();
    if (lastEventId) stat.seq.textContent = lastEventId;
    // For scripts and tests watching the page: how many events it has received.
    document.body.dataset.events = String(totalEvents);
  }

  function schedule() {
    if (frame) return;
    // Hidden tabs get no animation frames; a timer still keeps them current.
    frame = document.hidden ? setTimeout(draw, 250) : requestAnimationFrame(draw);
  }

  // ---- the stream -------------------------------------------------------------------

  let source = null;
  let lastEventId = "";
  let retryTimer = 0;
  let attempt = 0;
  let eventsThisSecond = 0;
  let totalEvents = 0;

  function setConn(state, text) {
    if (connEl.dataset.state === state && !text) return;
    connEl.dataset.state = state;
    connEl.querySelector(".label").textContent = text || state;
    document.body.dataset.conn = state;
  }

  function onUpdate(e) {
    let d;
    try { d = JSON.parse(e.data); } catch { return; }
    if (e.lastEventId) lastEventId = e.lastEventId;
    eventsThisSecond += 1;
    totalEvents += 1;
    if (d && typeof d.type === "string") {
      pending.set(d.type, d);
      schedule();
    }
  }

  function connect() {
    clearTimeout(retryTimer);
    const extra = {};
    if (keysFilter) extra.keys = keysFilter;
    // A fresh EventSource cannot set the Last-Event-ID header: the query parameter
    // carries it.  (The browser's own reconnects send the header by themselves.)
    if (lastEventId) extra.last_event_id = lastEventId;
    source = new EventSource(apiUrl("events", extra));
    source.addEventListener("open", () => { attempt = 0; setConn("live"); });
    source.addEventListener("update", onUpdate);
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error, e.g. 503 while the server restarts,
        // or 401): reconnect ourselves with capped backoff.
        source.close();
        scheduleReconnect();
      } else if (connEl.dataset.state !== "unauthorized") {
        setConn("reconnecting"); // the browser retries by itself
      }
    });
  }

  function scheduleReconnect() {
    attempt += 1;
    const delay = Math.min(15000, 500 * 2 ** Math.min(attempt - 1, 5)) * (0.75 + Math.random() * 0.5);
    // A refused token stays on display until a connection opens again.
    if (connEl.dataset.state !== "unauthorized") setConn("reconnecting");
    retryTimer = setTimeout(connect, delay);
    // Tell a wrong or missing token apart from an outage.
    fetch(apiUrl("keys"), { cache: "no-store" }).then((resp) => {
      if (resp.status === 401 || resp.status === 403) {
        setConn("unauthorized", token ? "token refused" : "token needed (?token=)");
      }
    }).catch(() => {});
  }

  // ---- the clock: expiry, relative times, rate -----------------------------------------

  let lastTick = performance.now();

  function tick() {
    const now = Date.now();
    let expired = 0;
    for (const card of cards.values()) {
      markExpiry(card, now);
      if (card.visible && !card.dirty) refreshTimes(card, now);
      if (card.expired) expired += 1;
    }
    stat.expired.textContent = numberFmt.format(expired);
    // Per elapsed time, not per tick: a busy page runs its timers late.
    const t = performance.now();
    stat.rate.textContent = numberFmt.format(Math.round((eventsThisSecond * 1000) / Math.max(1, t - lastTick)));
    lastTick = t;
    eventsThisSecond = 0;
  }
  setInterval(tick, 1000);

  window.addEventListener("pagehide", () => { if (source) source.close(); });
  // Back from the back/forward cache: the stream was closed, resume it.
  window.addEventListener("pageshow", (e) => { if (e.persisted) connect(); });

  connect();
})();
