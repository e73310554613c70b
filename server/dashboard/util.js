// sandmill's dashboard, shared pieces: plain JavaScript modules, no build step. Every value shown comes
// from the API and may be hostile (a job's output, args, result): text goes in with
// textContent, never innerHTML. The token is kept in this tab's sessionStorage, never in a URL.

export const TOKEN_KEY = "sandmill.token";
export const WS_KEY = "sandmill.workspace";
// The current page's refresh or log-follow timer, and a sequence number: a page's late
// answers are dropped once another page is shown. onUnauthorized: set by app.js.
export const nav = { timer: null, seq: 0, onUnauthorized: null };

// ---- small helpers -------------------------------------------------------------------------

export function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

export const $ = (sel) => document.querySelector(sel);
export const enc = encodeURIComponent;

export function ago(iso) {
  if (!iso) return "";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 0) return "in " + fmtS(-s);
  return fmtS(s) + " ago";
}

export function fmtS(s) {
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

export function when(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
export function json(v) { return JSON.stringify(v, null, 2); }
export function table(head, rows, rowAttrs) {
  return h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((r, i) => h("tr", rowAttrs ? rowAttrs(i) : {}, r.map((c) => h("td", {}, c)))))));
}
export function stateSpan(s) { return h("span", { class: "state-" + s, text: s }); }
export function jobLink(ws, id, text) { return h("a", { href: `#/job/${enc(ws)}/${enc(id)}`, text: text || id.slice(0, 8) }); }
export function workspace() { return sessionStorage.getItem(WS_KEY) || "main"; }

// ---- the API ---------------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export async function api(path, opts = {}) {
  const headers = { Authorization: "Bearer " + (sessionStorage.getItem(TOKEN_KEY) || "") };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method: opts.method || "GET", headers,
                                 body: opts.body === undefined ? undefined : JSON.stringify(opts.body) });
  const text = await r.text();
  let body = text;
  if ((r.headers.get("content-type") || "").includes("json")) {
    try { body = JSON.parse(text); } catch (_) { body = text; }
  }
  if (r.status === 401) {  // expired or revoked: back to the sign-in form
    if (nav.onUnauthorized) nav.onUnauthorized((body && body.error) || "signed out");
    throw new ApiError(401, body);
  }
  if (!r.ok) throw new ApiError(r.status, typeof body === "object" ? body : { error: text });
  return body;
}

export function stopTimer() { if (nav.timer) { clearTimeout(nav.timer); nav.timer = null; } }

// Call fn now and every `ms` after it ends, while this page is shown.
export function every(ms, fn) {
  const seq = nav.seq;
  const tick = async () => {
    if (seq !== nav.seq) return;
    let again = true;
    try { again = (await fn()) !== false; } catch (e) { if (seq === nav.seq) showError(e); }
    if (again && seq === nav.seq && sessionStorage.getItem(TOKEN_KEY)) nav.timer = setTimeout(tick, ms);
  };
  return tick();
}

export function showError(e) {
  if (e && e.status === 401) return;
  const box = $("#page-error");
  if (box) box.textContent = e && e.message ? e.message : String(e);
}

export function pageHead(view, title) {
  view.append(h("h1", { text: title }), h("p", { id: "page-error", class: "error", role: "alert" }));
}

