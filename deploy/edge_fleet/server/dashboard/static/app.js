// edge-fleet dashboard: sign-in, the router and the pages (Fleet, Device, Rollouts, Jobs, Enrollments).
"use strict";

const main = () => document.getElementById("main");
let timer = null;  // the current page's refresh
let generation = 0;  // a page's refresh stops drawing once another page is shown
const fleetFilters = { group: "", label: "", state: "", version: "", text: "" };

function every(ms, draw) {
  const mine = ++generation;
  const run = async () => {
    if (mine !== generation) return;
    try { await draw(); showError(null); } catch (error) { if (error.status !== 401) showError(error); }
    if (mine === generation) timer = setTimeout(run, ms);
  };
  clearTimeout(timer);
  run();
}

// -- Fleet ------------------------------------------------------------------------------------

function matches(d, f) {
  const version = d.model ? `${d.model}@${d.version}` : "";
  if (f.group && d.group !== f.group) return false;
  if (f.version && version !== f.version) return false;
  if (f.label) { const [k, v] = f.label.split(/=(.*)/s); if (d.labels[k] !== v) return false; }
  if (f.state === "online" && !d.online) return false;
  if (f.state === "offline" && d.online) return false;
  if (f.state === "degraded" && !(d.online && d.health === "degraded")) return false;
  if (f.state === "updating" && !["downloading", "verifying", "testing", "activating"].includes(d.update_phase)) return false;
  if (f.state === "behind" && !d.behind) return false;
  if (f.text && !d.device_id.toLowerCase().includes(f.text.toLowerCase())) return false;
  return true;
}

function select(name, title, options, onChange) {
  const el = h("select", { name, "aria-label": title, onchange: (e) => onChange(e.target.value) },
    h("option", { value: "" }, `${title}: all`), options.map((o) => h("option", { value: o }, o)));
  el.value = options.includes(fleetFilters[name]) ? fleetFilters[name] : "";
  return el;
}

function fleetRow(d, now) {
  const td = (label, ...content) => h("td", { dataset: { label } }, ...content);
  const state = stateOf(d);
  const health = !d.online ? "–" : d.health === "degraded" ? `degraded: ${d.reasons.join(", ") || "?"}` : (d.health || "–");
  return h("tr", { dataset: { device: d.device_id } },
    td("Device", h("a", { href: `#/device/${encodeURIComponent(d.device_id)}` }, d.device_id)),
    td("State", h("span", { class: state === "online" ? "online" : "offline" }, state),
      d.update_phase && d.update_phase !== "active" ? ` (${d.update_phase})` : ""),
    td("Health", h("span", { class: d.health === "degraded" ? "degraded" : "" }, health)),
    td("Group", d.group || "–"),
    td("Labels", Object.entries(d.labels).map(([k, v]) => h("span", { class: "label" }, `${k}=${v}`))),
    td("Model", d.model ? `${d.model}@${d.version}` : "–", d.behind ? h("span", { class: "degraded" }, ` → ${d.target}`) : ""),
    td("Last seen", d.online ? "now" : ago(d.last_seen || d.offline_since, now)),
    td("tok/s", num(d.tok_s)));
}

function fleetPage() {
  const counts = h("div", { class: "counts" });
  const filters = h("div", { class: "filters" });
  const body = h("tbody");
  const shown = h("p", { class: "muted" });
  main().replaceChildren(h("h1", {}, "Fleet"), counts, filters, shown, h("div", { class: "scroll" },
    h("table", { class: "cards", id: "fleet" }, h("thead", {}, h("tr", {},
      ["Device", "State", "Health", "Group", "Labels", "Model", "Last seen", "tok/s"].map((c) => h("th", {}, c)))), body)));
  let data = null;
  const draw = () => {
    const rows = data.devices.filter((d) => matches(d, fleetFilters));
    body.replaceChildren(...rows.map((d) => fleetRow(d, data.now)));
    shown.textContent = `${rows.length} of ${data.devices.length} devices shown`;
  };
  const set = (name) => (value) => { fleetFilters[name] = value; draw(); };
  every(5000, async () => {
    data = await api("/fleet");
    const c = data.counts;
    counts.replaceChildren(...[["online", c.online], ["offline", c.offline], ["degraded", c.degraded],
      ["updating", c.updating], ["behind target", c.behind]].map(([k, v]) =>
      h("div", { class: "count", dataset: { count: k } }, h("b", {}, String(v)), k)));
    const text = h("input", { type: "search", placeholder: "device id", "aria-label": "device id",
      value: fleetFilters.text, oninput: (e) => set("text")(e.target.value) });
    if (!filters.contains(document.activeElement)) {
      filters.replaceChildren(select("group", "group", data.groups, set("group")),
        select("label", "label", data.labels, set("label")),
        select("state", "state", ["online", "offline", "degraded", "updating", "behind"], set("state")),
        select("version", "version", data.versions, set("version")), text);
    }
    draw();
  });
}

// -- Device -----------------------------------------------------------------------------------

function devicePage(id) {
  let window_s = 3600;
  const facts = h("div", { class: "facts" });
  const charts = h("div", { class: "charts" });
  const updates = h("div", { class: "scroll" });
  const jobs = h("div", { class: "scroll" });
  const toggle = (s, text) => h("button", { type: "button", onclick: () => { window_s = s; refresh(); } }, text);
  main().replaceChildren(h("p", {}, h("a", { href: "#/fleet" }, "← Fleet")), h("h1", {}, id), facts,
    h("h2", {}, "Telemetry ", toggle(3600, "last hour"), " ", toggle(86400, "last day")), charts,
    h("h2", {}, "Updates"), updates, h("h2", {}, "Last jobs"), jobs);
  const path = `/devices/${encodeURIComponent(id)}`;
  const table = (heads, rows) => h("table", { class: "cards" }, h("thead", {}, h("tr", {}, heads.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((v, i) => h("td", { dataset: { label: heads[i] } }, v ?? "–"))))));
  const refresh = () => every(10000, async () => {
    const now = Date.now() / 1000;
    const [d, t, u, j] = await Promise.all([api(path), api(`${path}/telemetry?since=${now - window_s}`),
      api(`${path}/updates`), api(`${path}/jobs`)]);
    const cert = t.cert_expires_at;
    facts.replaceChildren(...[["State", stateOf(d)], ["Health", d.health || "–"], ["Group", d.group || "–"],
      ["Labels", Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
      ["Model", d.model ? `${d.model}@${d.version}` : "–"], ["Agent", d.agent_version || "–"],
      ["Last seen", d.online ? "now" : ago(d.last_seen, now)],
      ["Certificate expires", cert ? `${clock(cert)} (in ${Math.round((cert - now) / 86400)} days)` : "no certificate reported"],
      ["Update", u.current.phase ? `${u.current.phase}${u.current.error ? ": " + u.current.error : ""}` : "–"]]
      .map(([k, v]) => h("div", { dataset: { fact: k } }, h("span", {}, k), v)));
    const since = now - window_s;
    charts.replaceChildren(chart("tokens/s", "tok/s", t.at, t.tok_s, since, now),
      chart("temperature", "°C", t.at, t.temp_c, since, now),
      chart("memory available", "MiB", t.at, t.mem_mb, since, now, 0),
      chart("queue depth", "jobs", t.at, t.queue, since, now),
      chart("jobs per minute", "/min", t.at, t.jobs_per_min, since, now));
    updates.replaceChildren(u.rollouts.length || u.assignments.length ? table(["When", "Rollout / origin", "Release", "Outcome"], [
      ...u.rollouts.map((r) => [clock(r.updated), r.rollout, r.release, `${r.state}${r.detail ? ": " + r.detail : ""}`]),
      ...u.assignments.map((a) => [clock(a.at), a.origin, a.release || "(withdrawn)", `assigned by ${a.actor}`])])
      : h("p", { class: "muted" }, "no update recorded"));
    jobs.replaceChildren(j.length ? table(["Sent", "Job", "State", "Finish reason", "Tokens", "tok/s", "Error"],
      j.map((x) => [clock(x.created), x.id, x.state, x.finish_reason, x.completion_tokens, num(x.decode_tok_s), x.error]))
      : h("p", { class: "muted" }, "no job sent through this server yet"));
  });
  refresh();
}

// -- Rollouts ---------------------------------------------------------------------------------

async function act(rollout, action, body) {
  await api(`/rollouts/${rollout}/${action}`, { method: "POST", body });
}

function rolloutCard(r, detail) {
  const id = r.id.split("/").map(encodeURIComponent).join("/");
  const buttons = h("div", { class: "actions" });
  const run = (action, body) => async () => {
    try { await act(id, action, body ? await body() : undefined); showError(null); route(); } catch (e) { showError(e); }
  };
  if (may("operator")) {
    if (r.state === "running") buttons.append(h("button", { type: "button", onclick: run("pause") }, "Pause"));
    if (r.state === "halted") buttons.append(h("button", { type: "button", onclick: run("resume") }, "Resume"));
    if (r.state === "running" || r.state === "halted") {
      buttons.append(h("button", { type: "button", class: "danger", onclick: run("abort") }, "Abort"));
    }
    if (r.state !== "running" && !r.rollback_of) {
      const files = h("input", { type: "file", accept: ".json,application/json", multiple: true, "aria-label": "rollback manifests" });
      const read = async () => ({ manifests: await Promise.all([...files.files].map(async (f) => JSON.parse(await f.text()))) });
      buttons.append(h("label", {}, "signed rollback manifests ", files),
        h("button", { type: "button", onclick: run("rollback", read) }, "Roll back"));
    }
  }
  const counts = Object.entries(r.targets).map(([k, v]) => `${k} ${v}`).join(", ");
  const card = h("div", { class: "rollout", dataset: { rollout: r.id, state: r.state } },
    h("h2", {}, r.id), h("p", {}, h("b", { class: r.state === "halted" ? "degraded" : "" }, r.state),
      ` · wave ${r.wave} of ${r.waves}${r.canary ? " (the first is the canary)" : ""} · ${counts} · by ${r.created_by}`),
    r.reason ? h("p", { class: "reason" }, `Reason: ${r.reason}`) : null, buttons);
  if (detail) {
    const waves = {};
    for (const t of detail.targets) (waves[t.wave] = waves[t.wave] || []).push(t);
    for (const [wave, members] of Object.entries(waves)) {
      card.append(h("div", { class: "wave" }, `Wave ${wave}: `, members.map((t) =>
        h("span", { class: `box ${t.state}`, title: t.detail || t.state, dataset: { device: t.device } }, `${t.device} ${t.state}`))));
    }
    card.append(h("div", { class: "events" }, detail.events.map((e) => `${clock(e.at)}  ${e.text}\n`)));
  }
  return card;
}

function newRolloutForm() {
  const manifest = h("input", { type: "file", name: "manifest", accept: ".json,application/json", required: true, "aria-label": "signed manifest" });
  const kind = h("select", { name: "kind", "aria-label": "target kind" }, h("option", { value: "group" }, "group"), h("option", { value: "select" }, "selector"));
  const target = h("input", { name: "target", required: true, placeholder: "shop-17 or region=north,hw=pi5", "aria-label": "group or selector" });
  const waves = h("input", { name: "waves", value: "10,50,100", "aria-label": "waves (%)" });
  const canary = h("input", { name: "canary", type: "number", min: 0, value: 0, "aria-label": "canary devices" });
  const parallel = h("input", { name: "max_parallel", type: "number", min: 0, value: 0, "aria-label": "max parallel (0: whole wave)" });
  const form = h("form", { class: "jobform", id: "new-rollout" }, h("h2", {}, "New rollout"),
    h("label", {}, "Signed manifest.json ", manifest), h("label", {}, kind, " ", target),
    h("label", {}, "waves (%) ", waves), h("label", {}, "canary devices ", canary),
    h("label", {}, "at most updating at once (0: a whole wave) ", parallel), h("button", { type: "submit" }, "Start rollout"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const body = { manifest: JSON.parse(await manifest.files[0].text()), [kind.value]: target.value.trim(),
        waves: waves.value.split(",").map((w) => Number(w.replace("%", "").trim())),
        canary: Number(canary.value), max_parallel: Number(parallel.value) };
      await api("/rollouts", { method: "POST", body });
      form.reset();
      showError(null);
      route();
    } catch (error) { showError(error); }
  });
  return h("details", {}, h("summary", {}, "Start a rollout…"), form);
}

function rolloutsPage() {
  const list = h("div");
  main().replaceChildren(h("h1", {}, "Rollouts"),
    may("operator") ? newRolloutForm() : h("p", { class: "muted" }, "You read as a viewer: the actions need an operator's token."), list);
  every(2000, async () => {
    const rollouts = await api("/rollouts");
    const active = rollouts.filter((r) => r.state === "running" || r.state === "halted").slice(0, 10);
    const details = await Promise.all(active.map((r) => api(`/targets?rollout=${encodeURIComponent(r.id)}`)));
    const byId = Object.fromEntries(details.map((d) => [d.rollout.id, d]));
    list.replaceChildren(...(rollouts.length ? rollouts.slice(0, 50).map((r) => rolloutCard(r, byId[r.id]))
      : [h("p", { class: "muted" }, "No rollout yet: edge-fleet rollout MANIFEST --group G (or --select …)")]));
  });
}

// -- Jobs -------------------------------------------------------------------------------------

async function jobsPage() {
  generation++;
  clearTimeout(timer);
  const fleet = await api("/fleet");
  if (!may("operator")) {
    main().replaceChildren(h("h1", {}, "Jobs"), h("p", { class: "muted" }, "Sending jobs needs an operator's token."));
    return;
  }
  const kind = h("select", { name: "kind", "aria-label": "send to" }, h("option", { value: "device" }, "device"), h("option", { value: "group" }, "group"));
  const target = h("select", { name: "target", "aria-label": "target" });
  const fill = () => target.replaceChildren(...(kind.value === "device" ? fleet.devices.filter((d) => d.online).map((d) => d.device_id) : fleet.groups)
    .map((x) => h("option", { value: x }, x)));
  kind.addEventListener("change", fill);
  fill();
  const prompt = h("textarea", { name: "prompt", "aria-label": "prompt", placeholder: "Prompt", required: true });
  const maxTokens = h("input", { name: "max_tokens", type: "number", min: 1, max: 4096, value: 64, "aria-label": "max tokens" });
  const answer = h("div", { class: "answer", id: "answer", "aria-live": "polite" });
  const status = h("p", { id: "job-status", class: "muted" });
  const send = h("button", { type: "submit" }, "Send");
  const form = h("form", { class: "jobform" }, h("label", {}, "Send to ", kind, " ", target), prompt,
    h("label", {}, "max tokens ", maxTokens), send);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    send.disabled = true;
    answer.textContent = "";
    status.textContent = "sending…";
    let chunks = 0;
    try {
      const answerStream = await fetch("/api/v1/jobs/stream", { method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": session.me.csrf },
        body: JSON.stringify({ [kind.value]: target.value, prompt: prompt.value, max_tokens: Number(maxTokens.value) }) });
      if (!answerStream.ok) { const b = await answerStream.json(); throw new Error(`${answerStream.status}: ${JSON.stringify(b.detail)}`); }
      await readEvents(answerStream, (event, data) => {
        if (event === "job") { status.textContent = `job ${data.id} sent to ${data.target}; streaming…`; status.dataset.job = data.id; }
        if (event === "chunk") { chunks++; answer.append(document.createTextNode(data.text)); status.dataset.chunks = String(chunks); }
        if (event === "result") {
          if (!chunks) answer.textContent = data.text;
          const t = data.timings;
          status.textContent = `${data.status} · ${data.finish_reason || "–"} · ${data.usage.completion_tokens} tokens in ${chunks} chunks` +
            (t ? ` · ${num(t.decode_tokens_per_s)} tok/s` : "") + (data.device_id ? ` · answered by ${data.device_id}` : "") +
            (data.error ? ` · ${data.error.message}` : "");
          status.dataset.done = data.status;
        }
        if (event === "error") { status.textContent = `failed: ${data.message}`; status.dataset.done = "error"; }
      });
    } catch (error) { status.textContent = `failed: ${error.message}`; status.dataset.done = "error"; }
    send.disabled = false;
  });
  main().replaceChildren(h("h1", {}, "Jobs"), form, h("h2", {}, "Answer"), answer, status);
}

// -- Enrollments ------------------------------------------------------------------------------

function enrollmentsPage() {
  const body = h("tbody");
  const note = h("p", { class: "muted" });
  main().replaceChildren(h("h1", {}, "Enrollments"), note, h("div", { class: "scroll" },
    h("table", { class: "cards", id: "enrollments" }, h("thead", {}, h("tr", {},
      ["Box", "Claim", "Key fingerprint", "Waiting", ""].map((c) => h("th", {}, c)))), body)));
  const decide = (name, action, reason) => async () => {
    try {
      const options = action === "reject" ? { method: "POST", body: { reason: reason.value.trim() || null } } : { method: "POST" };
      await api(`/enrollments/${encodeURIComponent(name)}/${action}`, options);
      showError(null);
      shown = null;
      route();
    } catch (e) { showError(e); }
  };
  let shown = null;  // redrawn only when the queue changes: a reason being typed stays
  every(3000, async () => {
    const rows = await api("/enrollments");
    const key = rows.map((p) => `${p.name}/${p.fingerprint}`).join(" ");
    if (key === shown) return;
    shown = key;
    const now = Date.now() / 1000;
    note.textContent = rows.length
      ? "Compare each key's fingerprint with the one the box printed before approving."
      : "No box is waiting for approval (claims made with --approve manual queue here).";
    body.replaceChildren(...rows.map((p) => {
      const td = (label, ...content) => h("td", { dataset: { label } }, ...content);
      const reason = h("input", { name: "reason", placeholder: "reason (told to the box)", "aria-label": `reason for ${p.name}` });
      const actions = may("operator") ? [
        h("button", { type: "button", onclick: decide(p.name, "approve", reason) }, "Approve"), " ", reason, " ",
        h("button", { type: "button", class: "danger", onclick: decide(p.name, "reject", reason) }, "Reject"),
      ] : [h("span", { class: "muted" }, "an operator decides")];
      return h("tr", { dataset: { enrollment: p.name } }, td("Box", p.name), td("Claim", p.claim),
        td("Key fingerprint", h("code", {}, p.fingerprint)), td("Waiting", ago(p.since, now)), td("", ...actions));
    }));
  });
}

// -- Router and sign-in -----------------------------------------------------------------------

function route() {
  if (!session.me) return;
  const [page, ...rest] = (location.hash.replace(/^#\/?/, "") || "fleet").split("/");
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("current", a.dataset.page === page);
  const pages = { fleet: fleetPage, rollouts: rolloutsPage, jobs: jobsPage, enrollments: enrollmentsPage,
    device: () => devicePage(decodeURIComponent(rest.join("/"))) };
  Promise.resolve((pages[page] || fleetPage)()).catch(showError);
}

function signedIn(me) {
  session.me = me;
  document.getElementById("signin").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = false;
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  route();
}

function signedOut() {
  session.me = null;
  generation++;
  clearTimeout(timer);
  main().replaceChildren();
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("signin").hidden = false;
}

async function start() {
  window.addEventListener("hashchange", route);
  window.addEventListener("signed-out", signedOut);
  document.getElementById("signin").addEventListener("submit", async (e) => {
    e.preventDefault();
    const field = document.getElementById("token");
    try {
      signedIn(await api("/session", { method: "POST", body: { token: field.value.trim() } }));
      field.value = "";
      document.getElementById("signin-error").textContent = "";
    } catch (error) { document.getElementById("signin-error").textContent = error.message; }
  });
  document.getElementById("signout").addEventListener("click", async () => {
    try { await api("/session", { method: "DELETE" }); } finally { signedOut(); }
  });
  try { signedIn(await api("/session")); } catch (_e) { signedOut(); }
}

start();
