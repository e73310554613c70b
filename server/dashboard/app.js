// sandmill's dashboard: sign-in, routing, the overview and workers pages. plain JavaScript modules, no build step. Every value shown comes
// from the API and may be hostile (a job's output, args, result): text goes in with
// textContent, never innerHTML. The token is kept in this tab's sessionStorage, never in a URL.

import { $, TOKEN_KEY, WS_KEY, api, enc, every, fmtS, h, jobLink, nav, pageHead, showError, stopTimer, table,
         workspace } from "./util.js";
import { groupPage, groupsPage, jobPage, jobsPage, scriptPage, scriptsPage } from "./pages.js";

// ---- sign in ---------------------------------------------------------------------------------

function signedIn() { return !!sessionStorage.getItem(TOKEN_KEY); }

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopTimer();
  showChrome(false);
  $("#signin-error").textContent = message || "";
}

function showChrome(on) {
  $("#nav").hidden = !on;
  $("#session").hidden = !on;
  $("#signin").hidden = on;
  $("#view").hidden = !on;
  if (!on) $("#view").replaceChildren();
}

async function onSignIn(ev) {
  ev.preventDefault();
  const token = $("#token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("/api/dashboard/groups");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#signin-error").textContent = e.status === 403
      ? "the dashboard needs the admin token: " + e.message : e.message;
    showChrome(false);
    return;
  }
  $("#token").value = "";
  $("#signin-error").textContent = "";
  showChrome(true);
  route();
}

const ROUTES = [
  [/^#\/overview$/, overview], [/^#\/workers$/, workersPage], [/^#\/jobs$/, jobsPage],
  [/^#\/job\/([^/]+)\/([^/]+)$/, jobPage], [/^#\/scripts$/, scriptsPage],
  [/^#\/script\/([^/]+)\/(.+)$/, scriptPage], [/^#\/groups$/, groupsPage],
  [/^#\/group\/([^/]+)$/, groupPage],
];

function route() {
  stopTimer();
  nav.seq += 1;
  if (!signedIn()) { showChrome(false); return; }
  showChrome(true);
  const hash = location.hash || "#/overview";
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", hash.startsWith("#/" + a.dataset.page) ||
      hash.startsWith("#/" + a.dataset.page.replace(/s$/, "") + "/"));
  }
  const view = $("#view");
  view.replaceChildren();
  for (const [re, page] of ROUTES) {
    const m = hash.match(re);
    if (m) {
      const args = m.slice(1).map(decodeURIComponent);
      Promise.resolve(page(view, ...args)).catch(showError);
      return;
    }
  }
  location.hash = "#/overview";
}

// ---- overview --------------------------------------------------------------------------------

async function overview(view) {
  pageHead(view, "Overview");
  const body = h("div");
  view.append(body);
  await every(2000, async () => {
    const o = await api("/api/dashboard/overview");
    const waiting = o.queue.reduce((a, r) => a + r.waiting, 0);
    const running = o.queue.reduce((a, r) => a + r.running, 0);
    const alive = o.groups.reduce((a, g) => a + g.alive, 0);
    const hour = o.throughput.reduce((a, m) => a + m.success + m.failure + m.canceled, 0);
    const failed = o.throughput.reduce((a, m) => a + m.failure, 0);
    const oldest = o.queue.reduce((a, r) => Math.max(a, r.oldest_wait_s), 0);
    body.replaceChildren(
      h("div", { class: "cards" },
        card(waiting, "jobs waiting", "waiting-total"), card(running, "running"),
        card(fmtS(oldest), "oldest wait"), card(hour, "completed, last hour"),
        card(failed, "failed, last hour"), card(alive, "workers alive", "workers-alive")),
      h("h2", { text: "Completed per minute, last hour" }), chart(o.throughput),
      h("div", { class: "legend" }, h("span", {}, h("i", { class: "lg-s" }), "success"),
        h("span", {}, h("i", { class: "lg-f" }), "failure"),
        h("span", {}, h("i", { class: "lg-c" }), "canceled")),
      h("h2", { text: "Queue by tag" }),
      o.queue.length ? table(["tag", "waiting", "running", "oldest wait"],
        o.queue.map((r) => [r.tag, r.waiting, r.running, r.oldest_wait_s ? fmtS(r.oldest_wait_s) : "—"]))
        : h("p", { class: "muted", text: "The queue is empty." }),
      h("h2", { text: "Workers by group" }),
      o.groups.length ? table(["group", "alive", "dead", "busy / subworkers"],
        o.groups.map((g) => [h("a", { href: "#/group/" + enc(g.group), text: g.group }), g.alive,
                             g.dead ? h("span", { class: "dead-flag", text: g.dead }) : 0,
                             `${g.busy} / ${g.subworkers}`]))
        : h("p", { class: "muted", text: "No workers." }));
  });
}

function card(n, label, id) {
  return h("div", { class: "card", id: id ? "card-" + id : null },
    h("div", { class: "n", text: n }), h("div", { class: "l", text: label }));
}

// Stacked bars per minute over the last hour, as inline SVG.
function chart(rows) {
  const NS = "http://www.w3.org/2000/svg";
  const el = (tag, attrs) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    return e;
  };
  const W = 600, H = 180, pad = 24;
  const svg = el("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
                          role: "img", "aria-label": "completed jobs per minute" });
  const now = Math.floor(Date.now() / 60000) * 60;
  const by = new Map(rows.map((r) => [Math.round(r.minute), r]));
  let max = 1;
  for (const r of rows) max = Math.max(max, r.success + r.failure + r.canceled);
  const bw = (W - pad) / 60;
  for (let i = 0; i < 60; i++) {
    const r = by.get(now - (59 - i) * 60);
    if (!r) continue;
    let y = H - pad;
    for (const [cls, n] of [["s", r.success], ["f", r.failure], ["c", r.canceled]]) {
      if (!n) continue;
      const hgt = (n / max) * (H - 2 * pad);
      y -= hgt;
      svg.append(el("rect", { class: cls, x: pad + i * bw + 1, y, width: Math.max(1, bw - 2), height: hgt }));
    }
  }
  const label = (x, y, t, anchor) => { const e = el("text", { x, y, "text-anchor": anchor || "start" }); e.textContent = t; svg.append(e); };
  label(2, pad, String(max));
  label(pad, H - 6, "−60 min");
  label(W - 2, H - 6, "now", "end");
  svg.append(el("line", { x1: pad, y1: H - pad, x2: W, y2: H - pad, stroke: "#d9dde5" }));
  return svg;
}

// ---- workers ---------------------------------------------------------------------------------

function occupancyText(w) {
  const parts = [];
  for (const [k, v] of Object.entries(w)) {
    if (!k.startsWith("occupancy") || typeof v !== "number") continue;
    const win = k === "occupancy" ? "last ping" : k.replace(/^occupancy_?/, "");
    parts.push(`${win}: ${Math.round(v * 100)}%`);
  }
  return parts.join(", ");
}

async function workersPage(view) {
  pageHead(view, "Workers");
  const body = h("div", { id: "workers" });
  view.append(body);
  await every(2000, async () => {
    const r = await api("/api/dashboard/workers");
    const groups = new Map();
    for (const w of r.workers) {
      if (!groups.has(w.worker_group)) groups.set(w.worker_group, []);
      groups.get(w.worker_group).push(w);
    }
    const out = [];
    if (!r.workers.length) out.push(h("p", { class: "muted", text: "No worker has pinged in the last 10 minutes." }));
    for (const [g, ws] of groups) {
      out.push(h("h2", {}, "group ", h("a", { href: "#/group/" + enc(g), text: g }), ` (${ws.filter((w) => !w.dead).length} alive)`));
      out.push(table(["worker", "tags", "backend", "busy / subworkers", "occupancy", "running", "last ping", "init script"],
        ws.map((w) => [
          h("span", {}, w.worker, w.dead ? h("span", { class: "dead-flag", text: " dead" }) : null,
            h("div", { class: "muted", text: w.hostname })),
          h("span", {}, w.tags.map((t) => h("span", { class: "tag", text: t }))),
          h("span", {}, w.backend, w.backend_reason ? h("div", { class: "muted", text: w.backend_reason }) : null),
          `${w.busy} / ${w.subworkers}`,
          occupancyText(w),
          h("span", {}, w.running.map((j) => h("div", {}, jobLink(j.workspace, j.id, j.script_path || j.id.slice(0, 8))))),
          `${w.last_ping_s_ago} s ago`,
          w.last_init ? h("span", {}, jobLink("admins", w.last_init.id, w.last_init.status)) : h("span", { class: "muted", text: "none" }),
        ]), (i) => ({ class: ws[i].dead ? "dead" : null, "data-worker": ws[i].worker })));
    }
    body.replaceChildren(...out);
  });
}

// ---- start -----------------------------------------------------------------------------------

function start() {
  nav.onUnauthorized = signOut;
  $("#signin-form").addEventListener("submit", onSignIn);
  $("#signout").addEventListener("click", () => signOut(""));
  const wsInput = $("#workspace");
  wsInput.value = workspace();
  wsInput.addEventListener("change", () => { sessionStorage.setItem(WS_KEY, wsInput.value.trim() || "main"); route(); });
  window.addEventListener("hashchange", route);
  route();
}

start();  // a module runs once the page is parsed
