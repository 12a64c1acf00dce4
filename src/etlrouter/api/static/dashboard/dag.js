// The merged DAG as SVG: a tree laid out left to right (depth = column, leaves take one row each, a parent sits
// at the middle of its children). Pure layout, then a renderer that builds SVG elements.

const SVG = "http://www.w3.org/2000/svg";
export const NODE_W = 190;
export const NODE_H = 62;
const COL = 380;
const ROW = 96;
const PAD = 16;

const KIND_ICON = { SOURCE: "⇥", TRANSFORM: "ƒ", LOOKUP: "⌕", SINK: "⇲" };

export function layout(dag) {
  const byId = new Map(dag.stages.map((s) => [s.id, s]));
  const pos = new Map();
  let row = 0;
  const place = (id, depth) => {
    const stage = byId.get(id);
    const kids = (stage?.children ?? []).filter((c) => byId.has(c));
    let y;
    if (kids.length === 0) {
      y = row++;
    } else {
      const ys = kids.map((c) => place(c, depth + 1));
      y = (ys[0] + ys[ys.length - 1]) / 2;
    }
    pos.set(id, { x: PAD + depth * COL, y: PAD + y * ROW, depth });
    return y;
  };
  const roots = dag.stages.filter((s) => !s.parent || !byId.has(s.parent));
  for (const root of roots) place(root.id, 0);
  const maxDepth = Math.max(0, ...[...pos.values()].map((p) => p.depth));
  return { pos, width: PAD * 2 + maxDepth * COL + NODE_W, height: PAD * 2 + Math.max(1, row) * ROW - (ROW - NODE_H) };
}

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

export function rate(value) {
  if (value === undefined || value === null) return "–";
  if (value >= 10000) return `${(value / 1000).toFixed(0)}k`;
  if (value >= 1000) return `${(value / 1000).toFixed(1)}k`;
  return value.toFixed(value < 10 && value > 0 ? 1 : 0);
}

// Draws `dag` into a new <svg>; `stats` maps stage id -> StageStats and "from>to" -> EdgeStats.
// `onOpen(stageId)` runs on click or Enter/Space on a stage (stages are focusable buttons).
export function renderDag(dag, stages, edges, onOpen, selected) {
  const { pos, width, height } = layout(dag);
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "group", "aria-label": `merged DAG ${dag.id} of pipelines ${dag.pipelines.join(", ")}`, class: "dag" });
  for (const edge of dag.edges) {
    const a = pos.get(edge.from);
    const b = pos.get(edge.to);
    if (!a || !b) continue;
    const s = edges.get(`${edge.from}>${edge.to}`);
    const pressure = Boolean(s?.backpressure);
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
    const mx = (x1 + x2) / 2;
    const g = el("g", { class: `edge${pressure ? " backpressure" : ""}`, "data-edge": `${edge.from}>${edge.to}` });
    g.append(el("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 6},${y2}`, "marker-end": "url(#arrow)" }));
    const label = s ? `${rate(s.recordsPerSecond)} rec/s · ${s.creditsAvailable} cr` : "no data";
    g.append(el("text", { x: mx, y: (y1 + y2) / 2 - 6, class: "edge-rate", "data-rate": s ? s.recordsPerSecond : "" }, label));
    if (pressure) {
      const child = dag.stages.find((x) => x.id === edge.to)?.service ?? edge.to;
      const why = s.backpressureOrigin ? `${child} not keeping up` : "held back downstream";
      g.append(el("text", { x: mx, y: (y1 + y2) / 2 + 10, class: "edge-warn" }, "⚠ backpressure"));
      g.append(el("text", { x: mx, y: (y1 + y2) / 2 + 24, class: "edge-warn" }, why));
      if (s.backpressureOrigin) g.setAttribute("data-origin", "true");
    }
    if (edge.policy?.mode === "SHED") {
      g.append(el("text", { x: mx, y: (y1 + y2) / 2 + (pressure ? 38 : 12), class: "edge-policy" }, `shed after ${edge.policy.shedAfterMs / 1000}s`));
    }
    svg.append(g);
  }
  const defs = el("defs");
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 10, markerHeight: 10, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" });
  marker.append(el("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" }));
  defs.append(marker);
  svg.prepend(defs);
  for (const stage of dag.stages) {
    const p = pos.get(stage.id);
    const s = stages.get(stage.id);
    const shared = stage.pipelines.length > 1;
    const problem = Boolean(s && (s.lastError || Number(s.deadLettered) > 0));
    const placed = stage.placements.length > 0;
    const g = el("g", {
      class: `stage kind-${stage.kind.toLowerCase()}${shared ? " shared" : ""}${problem ? " problem" : ""}${placed ? "" : " unplaced"}${selected === stage.id ? " selected" : ""}`,
      transform: `translate(${p.x},${p.y})`,
      tabindex: 0,
      role: "button",
      "data-stage": stage.id,
      "aria-label": `${stage.kind} ${stage.service}${shared ? `, shared by ${stage.pipelines.length} pipelines` : ""}: ${s ? `${rate(s.recordsInPerSecond)} records per second in` : "no stats yet"}${placed ? "" : ", not placed"}. Press Enter for details.`,
    });
    g.append(el("rect", { width: NODE_W, height: NODE_H, rx: 8 }));
    g.append(el("text", { x: 10, y: 20, class: "stage-name" }, `${KIND_ICON[stage.kind] ?? "?"} ${stage.service}`));
    const line2 = s ? `in ${rate(s.recordsInPerSecond)}/s · out ${rate(s.recordsOutPerSecond)}/s` : placed ? "waiting for stats" : "✖ not placed";
    g.append(el("text", { x: 10, y: 38, class: "stage-rates" }, line2));
    const notes = [];
    if (shared) notes.push(`⇉ shared ×${stage.pipelines.length}`);
    if (s && Number(s.deadLettered) > 0) notes.push(`☠ DLQ ${s.deadLettered}`);
    if (s?.lastError) notes.push("⚠ error");
    g.append(el("text", { x: 10, y: 54, class: "stage-notes" }, notes.join(" · ")));
    const title = el("title", {}, `${stage.id}\npipelines: ${stage.pipelines.join(", ")}`);
    g.append(title);
    g.addEventListener("click", () => onOpen(stage.id));
    g.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        onOpen(stage.id);
      }
    });
    svg.append(g);
  }
  return svg;
}
