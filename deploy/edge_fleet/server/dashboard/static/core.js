// edge-fleet dashboard: the shared parts (DOM building, the API, formatting, charts).
// Every piece of data goes into the page as text (textContent, setAttribute); nothing is
// parsed as HTML, so device names and labels from boxes can never become markup.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

// h("td", {class: "x", dataset: {label: "Group"}}, "text", child): an element; strings become text nodes.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

const session = { me: null };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// fetch under /api/v1 with the session cookie; changes carry the session's CSRF token.
async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const method = options.method || "GET";
  if (method !== "GET" && session.me && session.me.csrf) headers["X-CSRF-Token"] = session.me.csrf;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const answer = await fetch("/api/v1" + path, {
    method, headers, credentials: "same-origin",
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (answer.status === 401 && path !== "/session") { window.dispatchEvent(new Event("signed-out")); }
  if (!answer.ok) {
    let detail = answer.statusText;
    try { const body = await answer.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (_e) { /* not JSON */ }
    throw new ApiError(answer.status, `${answer.status}: ${detail}`);
  }
  return answer.status === 204 ? null : answer.json();
}

function may(role) {
  const ranks = { viewer: 0, operator: 1, admin: 2 };
  return session.me !== null && ranks[session.me.role] >= ranks[role];
}

function showError(error) {
  const banner = document.getElementById("error");
  if (!error) { banner.hidden = true; return; }
  banner.textContent = error.message || String(error);
  banner.hidden = false;
}

function ago(at, now) {
  if (!at) return "never";
  const s = Math.max(0, Math.round((now || Date.now() / 1000) - at));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function clock(at) {
  return new Date(at * 1000).toLocaleString([], { hour12: false });
}

function num(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function stateOf(d) {
  if (d.revoked) return "revoked";
  if (d.online === null) return "never seen";
  return d.online ? "online" : "offline";
}

// A line chart in inline SVG: times ``at`` (Unix s) against ``values`` (null: a gap) over [since, now].
function chart(title, unit, at, values, since, now, digits = 1) {
  const W = 600, H = 180, L = 58, R = 8, T = 8, B = 26;
  const present = values.filter((v) => v !== null && v !== undefined);
  const last = present.length ? present[present.length - 1] : null;
  const box = h("div", { class: "chart", dataset: { chart: title } },
    h("h3", {}, `${title}: ${last === null ? "no data" : num(last, digits) + " " + unit}`));
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  let lo = present.length ? Math.min(...present) : 0, hi = present.length ? Math.max(...present) : 1;
  if (hi - lo < 1e-9) { hi += 1; lo = Math.max(0, lo - 1); }
  const x = (t) => L + ((t - since) / Math.max(1, now - since)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  svg.append(s("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    s("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    s("text", { x: L - 4, y: T + 10, "text-anchor": "end" }, num(hi, digits)),
    s("text", { x: L - 4, y: H - B, "text-anchor": "end" }, num(lo, digits)));
  for (const t of [since, (since + now) / 2, now]) {
    const label = new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
    svg.append(s("text", { x: x(t), y: H - 6, "text-anchor": t === since ? "start" : t === now ? "end" : "middle" }, label));
  }
  let d = "", pen = false;
  at.forEach((t, i) => {
    const v = values[i];
    if (v === null || v === undefined) { pen = false; return; }
    d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
    pen = true;
  });
  if (d) svg.append(s("path", { class: "line", d }));
  box.append(svg);
  return box;
}

// Reads a server-sent-event stream from a fetch answer: calls onEvent(kind, data) for each event.
async function readEvents(answer, onEvent) {
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(kind, data ? JSON.parse(data) : null);
    }
  }
}
