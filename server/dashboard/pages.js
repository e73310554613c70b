// sandmill's dashboard, the pages that read and write jobs, scripts and group configs: plain JavaScript modules, no build step. Every value shown comes
// from the API and may be hostile (a job's output, args, result): text goes in with
// textContent, never innerHTML. The token is kept in this tab's sessionStorage, never in a URL.

import { $, api, ago, enc, every, fmtS, h, jobLink, json, pageHead, showError, stateSpan, table, when,
         workspace } from "./util.js";

const LANGUAGES = ["python3", "bash", "postgresql", "http", "sleep", "noop"];

// ---- jobs ------------------------------------------------------------------------------------

export async function jobsPage(view) {
  pageHead(view, "Jobs");
  const f = { state: h("select", { id: "f-state" }, ["all", "active", "queued", "running", "completed", "success", "failure", "canceled"].map((s) => h("option", { value: s, text: s }))),
              workspace: h("input", { id: "f-workspace", placeholder: "any" }),
              script: h("input", { id: "f-script", placeholder: "path" }),
              tag: h("input", { id: "f-tag", placeholder: "any" }) };
  const list = h("div", { id: "job-list" });
  const more = h("button", { id: "more", type: "button", hidden: true, text: "More" });
  let next = null;
  const query = (cursor) => {
    const q = new URLSearchParams({ state: f.state.value, limit: "50" });
    for (const k of ["workspace", "script", "tag"]) if (f[k].value.trim()) q.set(k, f[k].value.trim());
    if (cursor) q.set("cursor", cursor);
    return "/api/dashboard/jobs?" + q;
  };
  const rows = [];
  const draw = () => {
    list.replaceChildren(rows.length ? table(["job", "state", "workspace", "script", "language", "tag", "created", "duration"],
      rows.map((j) => [jobLink(j.workspace, j.id), stateSpan(j.state), j.workspace, j.script_path || j.kind, j.language,
                       j.tag, ago(j.created_at), j.duration_ms === null ? "" : fmtS(j.duration_ms / 1000)]))
      : h("p", { class: "muted", text: "No jobs." }));
    more.hidden = !next;
  };
  const load = async (append) => {
    const r = await api(query(append ? next : null));
    if (!append) rows.length = 0;
    rows.push(...r.jobs);
    next = r.next;
    draw();
  };
  more.addEventListener("click", () => load(true).catch(showError));
  const filters = h("form", { class: "filters", id: "job-filters", onsubmit: (e) => { e.preventDefault(); load(false).catch(showError); } },
    h("label", {}, "state", f.state), h("label", {}, "workspace", f.workspace), h("label", {}, "script", f.script),
    h("label", {}, "tag", f.tag), h("button", { type: "submit", text: "Filter" }));
  f.state.addEventListener("change", () => load(false).catch(showError));
  view.append(runForm(), h("h2", { text: "Jobs" }), filters, list, more);
  await load(false);
}

// Run code (a preview job) in the chosen workspace, then follow it on its page.
function runForm() {
  const lang = h("select", { id: "run-language" }, LANGUAGES.map((l) => h("option", { value: l, text: l })));
  lang.value = "bash";
  const content = h("textarea", { id: "run-content", rows: 5, spellcheck: "false", value: "echo hello from sandmill" });
  const args = h("textarea", { id: "run-args", rows: 2, spellcheck: "false", value: "{}" });
  const tag = h("input", { id: "run-tag", placeholder: "the language's default" });
  const err = h("p", { class: "field-error", id: "run-error", role: "alert" });
  const form = h("form", { class: "grid", id: "run-form" },
    h("label", { for: "run-language", text: "language" }), h("div", { class: "field" }, lang),
    h("label", { for: "run-content", text: "code" }), h("div", { class: "field" }, content),
    h("label", { for: "run-args", text: "args (JSON)" }), h("div", { class: "field" }, args),
    h("label", { for: "run-tag", text: "tag" }), h("div", { class: "field" }, tag),
    h("span"), h("div", { class: "field" }, h("button", { class: "primary", type: "submit", id: "run-submit", text: "Run" }), err));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    let a;
    try { a = JSON.parse(args.value || "{}"); } catch (x) { err.textContent = "args: not JSON: " + x.message; return; }
    const q = tag.value.trim() ? "?tag=" + enc(tag.value.trim()) : "";
    try {
      const id = await api(`/api/w/${enc(workspace())}/jobs/run/preview${q}`, { method: "POST",
        body: { language: lang.value, content: content.value, args: a } });
      location.hash = `#/job/${enc(workspace())}/${enc(id)}`;
    } catch (x) { err.textContent = x.message; }
  });
  return h("details", { open: true }, h("summary", { text: `Run code in workspace ${workspace()}` }), form);
}

export async function jobPage(view, ws, id) {
  pageHead(view, "Job " + id);
  const head = h("div", { id: "job-head" });
  const logs = h("pre", { id: "job-logs" });
  const result = h("div", { id: "job-result" });
  const cancel = h("button", { class: "danger", id: "cancel", type: "button", text: "Cancel", hidden: true });
  const cancelMsg = h("span", { id: "cancel-msg", class: "muted" });
  cancel.addEventListener("click", async () => {
    try {
      cancelMsg.textContent = await api(`/api/w/${enc(ws)}/jobs_u/queue/cancel/${enc(id)}`, { method: "POST", body: { reason: "canceled from the dashboard" } });
    } catch (e) { cancelMsg.textContent = e.message; }
  });
  view.append(head, h("p", {}, cancel, " ", cancelMsg), h("h2", { text: "Logs" }), logs, result);
  let offset = 0, job = null;
  const showJob = (j) => {
    job = j;
    const state = j.type === "CompletedJob" ? j.status : (j.running ? "running" : "queued");
    const rows = [["state", stateSpan(state)], ["workspace", j.workspace_id], ["kind", j.job_kind],
      ["script", j.script_path || ""], ["language", j.language], ["tag", j.tag], ["worker", j.worker || ""],
      ["created", when(j.created_at)], ["scheduled for", when(j.scheduled_for)], ["started", when(j.started_at)],
      ["completed", when(j.completed_at)], ["duration", j.duration_ms === null ? "" : fmtS(j.duration_ms / 1000)],
      ["cpu", j.cpu_ms === undefined || j.cpu_ms === null ? "" : fmtS(j.cpu_ms / 1000)],
      ["memory peak", j.mem_peak ? j.mem_peak + " KiB" : ""], ["restarts", j.restarts],
      ["waiting because", j.waiting_reason || ""], ["canceled by", j.canceled_by || ""]];
    head.replaceChildren(h("dl", { class: "kv", id: "job-fields" }, rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { "data-field": k }, v)])),
      h("h2", { text: "Args" }), h("pre", { id: "job-args", text: json(j.args) }));
    cancel.hidden = j.type === "CompletedJob";
    if (j.type === "CompletedJob") {
      result.replaceChildren(h("h2", { text: "Result" }), h("pre", { id: "job-result-json", text: json(j.result) }),
        j.error ? h("div", {}, h("h2", { text: "Error" }), h("pre", { id: "job-error", text: j.error })) : null);
    }
  };
  showJob(await api(`/api/w/${enc(ws)}/jobs_u/get/${enc(id)}`));
  // the logs stream: new chunks since the last read, every 0.5 s until the job completes
  // (its logs are all written before its completion, so the last read has them all)
  await every(500, async () => {
    const u = await api(`/api/w/${enc(ws)}/jobs_u/getupdate/${enc(id)}?log_offset=${offset}`);
    if (u.new_logs) logs.append(document.createTextNode(u.new_logs));
    offset = u.log_offset;
    if (u.completed || (job && job.running !== u.running)) {
      showJob(await api(`/api/w/${enc(ws)}/jobs_u/get/${enc(id)}`));
    }
    return !u.completed;
  });
}

// ---- scripts ---------------------------------------------------------------------------------

export async function scriptsPage(view) {
  const ws = workspace();
  pageHead(view, `Scripts of workspace ${ws}`);
  const list = await api(`/api/w/${enc(ws)}/scripts/list`);
  view.append(list.length ? table(["path", "language", "summary", "created"],
    list.map((s) => [h("a", { href: `#/script/${enc(ws)}/${enc(s.path)}`, text: s.path }), s.language, s.summary || "", ago(s.created_at)]))
    : h("p", { class: "muted", text: "No scripts in this workspace (set the workspace at the top)." }));
}

export async function scriptPage(view, ws, path) {
  pageHead(view, "Script " + path);
  const s = await api(`/api/w/${enc(ws)}/scripts/get/p/${path.split("/").map(enc).join("/")}`);
  const args = h("textarea", { id: "script-args", rows: 3, value: "{}" });
  const err = h("p", { class: "field-error", id: "script-run-error" });
  const form = h("form", { class: "grid", id: "script-run" },
    h("label", { for: "script-args", text: "args (JSON)" }), h("div", { class: "field" }, args),
    h("span"), h("div", { class: "field" }, h("button", { class: "primary", type: "submit", text: "Run" }), err));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    let a;
    try { a = JSON.parse(args.value || "{}"); } catch (x) { err.textContent = "args: not JSON: " + x.message; return; }
    try {
      const id = await api(`/api/w/${enc(ws)}/jobs/run/p/${path.split("/").map(enc).join("/")}`, { method: "POST", body: a });
      location.hash = `#/job/${enc(ws)}/${enc(id)}`;
    } catch (x) { err.textContent = x.message; }
  });
  view.append(h("dl", { class: "kv" }, [["workspace", ws], ["language", s.language], ["hash", s.hash], ["tag", s.tag || ""],
      ["timeout", s.timeout === null ? "" : s.timeout + " s"], ["summary", s.summary || ""], ["created", when(s.created_at)]]
      .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })])),
    h("h2", { text: "Run" }), form, h("h2", { text: "Code" }), h("pre", { text: s.content }),
    h("p", {}, h("a", { href: "#/jobs", text: "Jobs" })));
}

// ---- worker group configs --------------------------------------------------------------------

export async function groupsPage(view) {
  pageHead(view, "Worker groups");
  const r = await api("/api/dashboard/groups");
  const name = h("input", { id: "new-group", placeholder: "group name" });
  view.append(r.groups.length ? h("ul", { id: "group-list" }, r.groups.map((g) => h("li", {}, h("a", { href: "#/group/" + enc(g), text: g }))))
      : h("p", { class: "muted", text: "No groups yet." }),
    h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); if (name.value.trim()) location.hash = "#/group/" + enc(name.value.trim()); } },
      h("label", {}, "edit another group's config", name), h("button", { type: "submit", text: "Open" })));
}

const FIELDS = [  // [profile field, label, kind]
  ["tags", "tags", "list"], ["limits", "limits (JSON)", "json"], ["env_allow", "env allow-list", "list"],
  ["init_script", "init script (bash)", "text"], ["periodic_script", "periodic script (bash)", "text"],
  ["periodic_interval_s", "periodic interval (s)", "number"],
];

export async function groupPage(view, group) {
  pageHead(view, "Worker group " + group);
  const cfg = (await api(`/api/dashboard/groups/${enc(group)}`)).config || {};
  const inputs = {}, errors = {};
  const rows = [];
  for (const [name, label, kind] of FIELDS) {
    const v = cfg[name];
    let input;
    if (kind === "list") input = h("input", { id: "cfg-" + name, value: Array.isArray(v) ? v.join(", ") : "", placeholder: "comma-separated; empty: the profile's" });
    else if (kind === "json") input = h("textarea", { id: "cfg-" + name, rows: 3, value: v === undefined ? "" : json(v), placeholder: '{"wall_s": 60, "memory_mb": 512}' });
    else if (kind === "number") input = h("input", { id: "cfg-" + name, type: "number", value: v === undefined ? "" : v });
    else input = h("textarea", { id: "cfg-" + name, rows: 4, value: v || "" });
    inputs[name] = input;
    errors[name] = h("div", { class: "field-error", id: "err-" + name, role: "alert" });
    rows.push(h("label", { for: "cfg-" + name, text: label }), h("div", { class: "field" }, input, errors[name]));
  }
  const known = new Set(FIELDS.map((f) => f[0]));
  const rest = Object.fromEntries(Object.entries(cfg).filter(([k]) => !known.has(k)));
  inputs.other = h("textarea", { id: "cfg-other", rows: 3, value: Object.keys(rest).length ? json(rest) : "" , placeholder: '{"subworkers": 4}' });
  errors.other = h("div", { class: "field-error", id: "err-other", role: "alert" });
  rows.push(h("label", { for: "cfg-other", text: "other fields (JSON)" }), h("div", { class: "field" }, inputs.other, errors.other));
  const saved = h("span", { id: "cfg-saved", class: "ok", role: "status" });
  const formErr = h("p", { class: "field-error", id: "cfg-error" });
  const form = h("form", { class: "grid", id: "cfg-form" }, rows, h("span"),
    h("div", { class: "field" }, h("div", {}, h("button", { class: "primary", type: "submit", id: "cfg-save", text: "Save" }), " ", saved), formErr));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const el of Object.values(errors)) el.textContent = "";
    saved.textContent = formErr.textContent = "";
    const body = {};
    try {
      const other = inputs.other.value.trim();
      if (other) Object.assign(body, JSON.parse(other));
    } catch (x) { errors.other.textContent = "not JSON: " + x.message; return; }
    for (const [name, , kind] of FIELDS) {
      const raw = inputs[name].value;
      if (!raw.trim()) continue;
      if (kind === "list") body[name] = raw.split(",").map((s) => s.trim()).filter((s) => s);
      else if (kind === "json") {
        try { body[name] = JSON.parse(raw); } catch (x) { errors[name].textContent = "not JSON: " + x.message; return; }
      } else if (kind === "number") body[name] = Number(raw);
      else body[name] = raw;
    }
    try {
      await api(`/api/configs/worker__${enc(group)}`, { method: "PUT", body });
      saved.textContent = "saved: the group's workers reload it now";
    } catch (x) {
      const detail = (x.body && x.body.detail) || [];
      if (!detail.length) { formErr.textContent = x.message; return; }
      for (const d of detail) {  // the server's reason, at the field it names
        const top = String(d.field).split(".")[0];
        const box = errors[top] || errors.other;
        box.textContent = (box.textContent ? box.textContent + "; " : "") + `${d.field}: ${d.reason}`;
      }
    }
  });
  view.append(h("p", { class: "muted", text: "A partial profile overriding the group's YAML; its running workers reload it on save." }), form,
    h("h2", { text: "Workers of this group" }), h("div", { id: "group-workers" }));
  await every(3000, async () => {
    const r = await api("/api/dashboard/workers");
    const ws = r.workers.filter((w) => w.worker_group === group);
    $("#group-workers").replaceChildren(ws.length ? table(["worker", "last ping", "last init script run"], ws.map((w) => [
      h("span", {}, w.worker, w.dead ? h("span", { class: "dead-flag", text: " dead" }) : null), `${w.last_ping_s_ago} s ago`,
      w.last_init ? h("span", {}, jobLink("admins", w.last_init.id, `${w.last_init.status}, ${ago(w.last_init.completed_at)}`), " (logs)") : "none"]))
      : h("p", { class: "muted", text: "No live workers in this group." }));
  });
}

