// The dashboard: queries over HTTP for what changes rarely (DAGs, dead letters), one `stats` subscription for
// what is live. Everything shown comes from the public GraphQL API (docs/graphql.md).
import { ApiError, LiveConnection, endpoint, onAuthNeeded, request, setToken } from "./graphql.js";
import { rate, renderDag } from "./dag.js";

const api = endpoint();
const $ = (selector) => document.querySelector(selector);

const DAGS = `query Dags { dags(consistency: STALE) { id pipelines
  stages { id kind service pipelines parent children options { name value } placements { sidecarId replica address } }
  edges { from to pipelines policy { mode shedAfterMs } } } }`;
const STATS_FIELDS = `atMs source message
  cluster { nodeId leaderId isLeader role term commitIndex appliedIndex members { id address voter leader matchIndex lag reachable } }
  stages { dagId stageId replicas sidecars recordsIn recordsOut recordsInPerSecond recordsOutPerSecond bytesInPerSecond bytesOutPerSecond
           errors deadLettered watermarkMs watermarkLagMs ackedRecords ackedOffsets { partition offset } lastError }
  edges { dagId from to recordsSent recordsPerSecond creditsAvailable starvedSecondsTotal starvedRatio inFlightBatches oldestInFlightSeconds backpressure backpressureOrigin }
  sidecars { id address health silent registered lastHeartbeatAgeMs load { recordsPerSecond runningStages }
             services { name kind } stages { stageId replica } }`;
const STATS_SUB = `subscription Stats { stats(intervalMs: 1000) { ${STATS_FIELDS} } }`;
const DEAD_LETTERS = `query DeadLetters($pipeline: String, $stage: String, $errorClass: ErrorClass) {
  deadLetters(pipeline: $pipeline, stage: $stage, errorClass: $errorClass, limit: 200) {
    total letters { id sidecar pipeline stageId service errorClass reason error failedAtMs } unreachable { sidecar message } } }`;
const DEAD_LETTER = `query DeadLetter($sidecar: String!, $id: String!) { deadLetter(sidecar: $sidecar, id: $id) {
  id sidecar pipeline dagId stageId service errorClass reason error attempts failedAtMs sourceId partition batchId
  record { offset eventTimeMs key value truncated headers { key value } } } }`;
const REDRIVE = `mutation Redrive($sidecar: String, $ids: [String!]) { redriveDeadLetters(sidecar: $sidecar, ids: $ids) {
  redriven failed { id reason } unreachable { sidecar message } } }`;

const state = { dags: [], stats: null, selected: null, placementsKey: "", deadLettered: -1 };

function text(tag, value, className) {
  const node = document.createElement(tag);
  node.textContent = value;
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell;
    tr.append(td);
  }
  return tr;
}

function showAlert(message) {
  const alert = $("#alert");
  alert.hidden = !message;
  alert.textContent = message ? `⚠ ${message}` : "";
}

function setConnection(status) {
  const el = $("#connection");
  el.className = `status ${status.state}`;
  if (status.state === "live") {
    el.textContent = status.reconnected ? `● Live — reconnected at ${new Date().toLocaleTimeString()}` : "● Live";
    showAlert("");
  } else if (status.state === "connecting") {
    el.textContent = status.attempt ? `◌ Reconnecting (attempt ${status.attempt})…` : "◌ Connecting…";
  } else {
    el.textContent = `✖ Connection lost — reconnecting in ${Math.round(status.retryInMs / 1000)} s`;
    showAlert(`The GraphQL API at ${api.ws} is unreachable (${status.error}). The page keeps the last data it had and retries (attempt ${status.attempt}).`);
  }
}

// ------------------------------------------------------------------------------------------- views

function renderCluster(cluster) {
  $("#cluster-summary").textContent =
    `this router: ${cluster.nodeId} (${cluster.role}) · leader: ${cluster.leaderId || "none known"} · term ${cluster.term} · ` +
    `commit ${cluster.commitIndex} · applied ${cluster.appliedIndex} (apply lag ${Math.max(0, cluster.commitIndex - cluster.appliedIndex)})`;
  const body = $("#members tbody");
  // Match index, lag and reachability are the leader's view of its followers: a follower has none to show.
  const leaderView = (cells) => cluster.isLeader ? cells : cells.map(() => text("span", "–", "health-unknown"));
  body.replaceChildren(...cluster.members.map((m) => row([
    m.id, m.address, m.leader ? "★ leader" : m.voter ? "voter" : "learner",
    ...leaderView([String(m.matchIndex), String(m.lag),
      text("span", m.reachable ? "✔ reachable" : "✖ unreachable", m.reachable ? "health-ok" : "health-bad")]),
  ])));
}

function healthOf(s) {
  if (!s.registered) return ["✖ gone (left the registry)", "health-bad"];
  if (s.silent) return [`✖ silent — no heartbeat for ${(s.lastHeartbeatAgeMs / 1000).toFixed(1)} s`, "health-bad"];
  if (s.health === "SERVING") return ["✔ serving", "health-ok"];
  if (s.health === "DEGRADED") return ["⚠ degraded", "health-bad"];
  if (s.health === "NOT_SERVING") return ["✖ not serving", "health-bad"];
  return ["? unknown", "health-unknown"];
}

function renderSidecars(sidecars) {
  $("#sidecar-table tbody").replaceChildren(...sidecars.map((s) => {
    const [label, cls] = healthOf(s);
    const tr = row([
      s.id, text("span", label, cls),
      s.load ? rate(s.load.recordsPerSecond) : "–",
      String(s.stages.length),
      s.lastHeartbeatAgeMs === null ? "–" : `${(s.lastHeartbeatAgeMs / 1000).toFixed(1)} s ago`,
      s.services.map((x) => `${x.name} (${x.kind})`).join(", ") || "–",
    ]);
    tr.dataset.sidecar = s.id;
    tr.dataset.health = s.registered && !s.silent ? s.health : "UNHEALTHY";
    return tr;
  }));
}

function statsMaps() {
  const stages = new Map();
  const edges = new Map();
  for (const s of state.stats?.stages ?? []) stages.set(s.stageId, s);
  for (const e of state.stats?.edges ?? []) edges.set(`${e.from}>${e.to}`, e);
  return { stages, edges };
}

function renderDags() {
  const focused = document.activeElement?.dataset?.stage;
  const { stages, edges } = statsMaps();
  const boxes = state.dags.map((dag) => {
    const box = document.createElement("div");
    box.className = "dag-box";
    box.append(text("h3", `${dag.pipelines.join(" + ")} — source ${dag.stages[0]?.service ?? "?"}`));
    box.append(renderDag(dag, stages, edges, openStage, state.selected));
    return box;
  });
  $("#dags").replaceChildren(...(boxes.length ? boxes : [text("p", "No pipelines applied yet.", "hint")]));
  if (focused) document.querySelector(`[data-stage="${focused}"]`)?.focus();
  if (state.selected) renderDetails();
}

function findStage(id) {
  for (const dag of state.dags) {
    const stage = dag.stages.find((s) => s.id === id);
    if (stage) return { dag, stage };
  }
  return null;
}

function openStage(id) {
  state.selected = id;
  renderDags();
}

function renderDetails() {
  const found = findStage(state.selected);
  const details = $("#details");
  if (!found) {
    details.hidden = true;
    return;
  }
  const { dag, stage } = found;
  const s = statsMaps().stages.get(stage.id);
  const outgoing = (state.stats?.edges ?? []).filter((e) => e.from === stage.id);
  const dl = document.createElement("dl");
  const add = (k, v) => dl.append(text("dt", k), text("dd", v));
  add("stage", `${stage.kind} ${stage.service} (${stage.id})`);
  add("pipelines", stage.pipelines.join(", "));
  add("options", stage.options.map((o) => `${o.name} = ${o.value}`).join(", ") || "–");
  add("assignments", stage.placements.map((p) => `${p.sidecarId} #${p.replica} @ ${p.address}`).join("; ") || "✖ not placed");
  if (s) {
    add("records in / out", `${s.recordsIn} / ${s.recordsOut} (${rate(s.recordsInPerSecond)}/s in, ${rate(s.recordsOutPerSecond)}/s out)`);
    add("bytes/s in / out", `${rate(s.bytesInPerSecond)} / ${rate(s.bytesOutPerSecond)}`);
    add("errors", String(s.errors));
    add("dead-lettered", String(s.deadLettered));
    add("event-time watermark", s.watermarkMs ? `${new Date(s.watermarkMs).toISOString()} (lag ${(s.watermarkLagMs / 1000).toFixed(1)} s)` : "–");
    if (stage.kind === "SOURCE") {
      add("ack watermark", s.ackedOffsets.map((a) => `partition ${a.partition}: offset ${a.offset}`).join(", ") || "nothing acknowledged yet");
    }
    add("last error", s.lastError || "none");
  } else {
    add("stats", "none reported yet");
  }
  for (const e of outgoing) {
    const child = findStage(e.to)?.stage;
    add(`edge → ${child?.service ?? e.to}`, `${rate(e.recordsPerSecond)} rec/s, ${e.creditsAvailable} credits, ${e.inFlightBatches} in flight, starved ${e.starvedSecondsTotal.toFixed(1)} s${e.backpressure ? " — ⚠ backpressure" : ""}`);
  }
  const close = text("button", "Close");
  close.type = "button";
  close.addEventListener("click", () => { state.selected = null; details.hidden = true; renderDags(); });
  details.replaceChildren(text("h3", `Stage ${stage.service} in DAG ${dag.id}`), dl, close);
  details.hidden = false;
}

// --------------------------------------------------------------------------------------- data flow

async function loadDags() {
  try {
    state.dags = (await request(api.http, DAGS)).dags;
  } catch (e) {
    showAlert(e instanceof ApiError ? e.message : String(e));
    return;
  }
  const select = $("#dlq-filter select[name=pipeline]");
  const current = select.value;
  const names = [...new Set(state.dags.flatMap((d) => d.pipelines))].sort();
  select.replaceChildren(new Option("all", ""), ...names.map((n) => new Option(n, n)));
  select.value = names.includes(current) ? current : "";
  renderDags();
}

function onStats(stats) {
  state.stats = stats;
  renderCluster(stats.cluster);
  renderSidecars(stats.sidecars);
  // Any router serves the live numbers (a follower fetches them from the leader); the note only says when
  // it could not, and why: the page keeps the layout and shows the rates again once the leader answers.
  const note = $("#follower-note");
  note.hidden = stats.source !== "UNAVAILABLE";
  note.textContent = note.hidden ? "" : `⚠ No live statistics right now: ${stats.message}`;
  $("#stats-source").textContent = stats.source === "LEADER" ? "live stats: this router (the leader)"
    : stats.source === "FORWARDED" ? `live stats: ${stats.message}` : "live stats: unavailable";
  // Placements changed (a pipeline applied, a sidecar gone): the DAGs are fetched again, no timer needed.
  const key = stats.sidecars.map((s) => `${s.id}:${s.stages.map((x) => x.stageId + x.replica).join(",")}`).join(";");
  if (key !== state.placementsKey) {
    state.placementsKey = key;
    loadDags();
  } else {
    renderDags();
  }
  const dead = stats.stages.reduce((n, s) => n + Number(s.deadLettered), 0);
  if (dead !== state.deadLettered) {
    state.deadLettered = dead;
    loadDeadLetters();
  }
}

function filters() {
  const form = new FormData($("#dlq-filter"));
  const errorClass = form.get("errorClass");
  return { pipeline: form.get("pipeline") || "", stage: form.get("stage") || "", ...(errorClass ? { errorClass } : {}) };
}

async function loadDeadLetters() {
  let page;
  try {
    page = (await request(api.http, DEAD_LETTERS, filters())).deadLetters;
  } catch (e) {
    $("#dlq-message").textContent = `⚠ ${e.message}`;
    return;
  }
  const unreachable = page.unreachable.map((u) => `${u.sidecar}: ${u.message}`).join("; ");
  $("#dlq-message").textContent = `${page.total} dead letter${page.total === 1 ? "" : "s"}${unreachable ? ` (not answering: ${unreachable})` : ""}`;
  $("#dlq-table tbody").replaceChildren(...page.letters.map((letter) => {
    const inspect = text("button", "Inspect");
    inspect.type = "button";
    inspect.addEventListener("click", () => inspectLetter(letter.sidecar, letter.id));
    const redrive = text("button", "Redrive");
    redrive.type = "button";
    redrive.addEventListener("click", () => redriveLetter(letter.sidecar, letter.id));
    const actions = document.createElement("span");
    actions.append(inspect, " ", redrive);
    const stage = findStage(letter.stageId)?.stage;
    const tr = row([letter.id, letter.sidecar, letter.pipeline, stage ? stage.service : letter.stageId, letter.errorClass, letter.reason, letter.error, actions]);
    tr.dataset.letter = letter.id;
    return tr;
  }));
}

async function inspectLetter(sidecar, id) {
  const box = $("#letter");
  let letter;
  try {
    letter = (await request(api.http, DEAD_LETTER, { sidecar, id })).deadLetter;
  } catch (e) {
    box.replaceChildren(text("p", `⚠ ${e.message}`));
    box.hidden = false;
    return;
  }
  if (!letter) {
    box.replaceChildren(text("p", `Dead letter ${id} is no longer in ${sidecar}'s queue.`));
    box.hidden = false;
    return;
  }
  const dl = document.createElement("dl");
  const add = (k, v) => dl.append(text("dt", k), text("dd", v));
  add("id", letter.id);
  add("where", `pipeline ${letter.pipeline}, stage ${letter.stageId} (${letter.service}), sidecar ${letter.sidecar}`);
  add("why", `${letter.errorClass} · ${letter.reason} · ${letter.error} (after ${letter.attempts} attempts)`);
  add("failed at", new Date(letter.failedAtMs).toISOString());
  add("provenance", `source ${letter.sourceId}, partition ${letter.partition}, offset ${letter.record?.offset ?? "?"}, batch ${letter.batchId}`);
  if (letter.record) {
    add("event time", letter.record.eventTimeMs ? new Date(letter.record.eventTimeMs).toISOString() : "unknown");
    add("headers", letter.record.headers.map((h) => `${h.key}=${h.value}`).join(", ") || "–");
    add("key", letter.record.key || "–");
  }
  const value = document.createElement("pre");
  value.append(text("code", letter.record ? letter.record.value + (letter.record.truncated ? "\n… (cut at 64 KiB)" : "") : ""));
  box.replaceChildren(text("h3", "Dead letter"), dl, value);
  box.hidden = false;
}

async function redriveLetter(sidecar, id) {
  // The outcome goes to its own line: the listing's message is rewritten whenever the DLQ counts change.
  const outcome = $("#dlq-outcome");
  outcome.textContent = `Redriving ${id}…`;
  try {
    const result = (await request(api.http, REDRIVE, { sidecar, ids: [id] }, 70000)).redriveDeadLetters;
    const failed = result.failed.map((f) => `${f.id}: ${f.reason}`).concat(result.unreachable.map((u) => `${u.sidecar}: ${u.message}`));
    outcome.textContent = `${failed.length ? "⚠" : "✔"} Redriven ${result.redriven} dead letter${result.redriven === 1 ? "" : "s"}${failed.length ? `; not redriven: ${failed.join("; ")}` : ""}`;
  } catch (e) {
    outcome.textContent = `⚠ Redrive failed: ${e.message}`;
    return;
  }
  $("#letter").hidden = true;
  await loadDeadLetters();
}

$("#dlq-filter").addEventListener("submit", (event) => {
  event.preventDefault();
  loadDeadLetters();
});

const live = new LiveConnection(api.ws, (status) => {
  setConnection(status);
  if (status.state === "live" && status.reconnected) loadDags();
});
live.subscribe(STATS_SUB, {}, (data) => onStats(data.stats), (error) => showAlert(`live stats: ${error}`));

// Authentication on: the API answered 401 (or closed the WebSocket with 4403); ask for a token.
onAuthNeeded((message) => {
  $("#login-why").textContent = message;
  $("#login").hidden = false;
  $("#login input[name=token]").focus();
});
$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  setToken($("#login input[name=token]").value.trim());
  $("#login").hidden = true;
  showAlert("");
  live.restart();
  loadDags();
});
loadDags();
window.etlDashboard = { state, live };
