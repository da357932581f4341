// ztunnel admin UI: draws GET /api/graph as SVG and shows details on click.
// Rules of this file: every value from the server reaches the page through
// textContent, createElementNS or setAttribute -- never innerHTML -- and no
// inline script or style exists (the Content-Security-Policy forbids both).
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const POLL_MS = 2000;
  const COL_W = 370, NODE_W = 190, NODE_H = 48, ROW_H = 80, PAD = 30;
  const OUTCOME_TEXT = {
    mtls: "mTLS, allowed", plaintext: "plaintext", denied: "denied by policy", failed: "failed",
  };

  let graph = null;        // the last /api/graph document
  let lastText = "";       // its text, to skip redraws when nothing changed
  let selected = null;     // {kind: "edge"|"node", id}
  const byElement = new WeakMap();

  function el(name, attrs, text) {
    const e = document.createElement(name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function svg(name, attrs, text) {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function label(n) {
    if (!n) return "?";
    return n.kind === "address" ? String(n.name) : n.namespace + "/" + n.name;
  }

  function bytes(n) {
    if (n >= 1048576) return (n / 1048576).toFixed(1) + " MiB";
    if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
    return n + " B";
  }

  // -- layout: sources left, services in the middle, destinations right ------------

  function layout(g) {
    const incoming = new Set(g.edges.map((e) => e.target));
    const cols = [[], [], []];
    for (const n of g.nodes) {
      if (n.kind === "service") cols[1].push(n);
      else if (incoming.has(n.id)) cols[2].push(n);
      else cols[0].push(n);
    }
    const key = (n) => [n.local ? 0 : 1, label(n)].join(" ");
    const pos = new Map();
    const rows = Math.max(1, ...cols.map((c) => c.length));
    cols.forEach((col, ci) => {
      col.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
      const top = PAD + ((rows - col.length) * ROW_H) / 2;
      col.forEach((n, ri) => pos.set(n.id, { x: PAD + ci * COL_W, y: top + ri * ROW_H }));
    });
    return { pos, width: PAD * 2 + 2 * COL_W + NODE_W, height: PAD * 2 + rows * ROW_H };
  }

  // -- drawing ---------------------------------------------------------------------

  function draw() {
    const root = document.getElementById("graph");
    clear(root);
    const { pos, width, height } = layout(graph);
    root.setAttribute("viewBox", "0 0 " + width + " " + height);
    root.setAttribute("height", String(height));
    const nodes = new Map(graph.nodes.map((n) => [n.id, n]));
    const defs = svg("defs");
    for (const o of graph.outcomes) {
      const m = svg("marker", {
        id: "arrow-" + o, viewBox: "0 0 10 10", refX: 10, refY: 5,
        markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse",
      });
      m.appendChild(svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow-" + o }));
      defs.appendChild(m);
    }
    root.appendChild(defs);
    const layer = (name) => root.appendChild(svg("g", { class: name }));
    const members = layer("members"), edges = layer("edges"), boxes = layer("nodes");
    const labels = layer("labels");  // above everything, so no line hides a label's click
    for (const n of graph.nodes) {
      if (n.kind !== "service") continue;
      for (const ep of n.endpoints || []) {
        if (!pos.has(ep)) continue;
        const a = pos.get(n.id), b = pos.get(ep);
        members.appendChild(svg("line", {
          class: "member", x1: a.x + NODE_W, y1: a.y + NODE_H / 2, x2: b.x, y2: b.y + NODE_H / 2,
        }));
      }
    }
    const srcLane = lanes(graph.edges, (e) => e.source);
    const dstLane = lanes(graph.edges, (e) => e.target);
    const middle = graph.nodes.filter((n) => n.kind === "service").map((n) => pos.get(n.id).y);
    const bypass = middle.length ? Math.max(...middle) + NODE_H + 18 : null;
    graph.edges.forEach((e) => {
      const route = { src: srcLane.get(e.id), dst: dstLane.get(e.id), bypass };
      const [line, text] = drawEdge(e, pos, nodes, route);
      edges.appendChild(line);
      labels.appendChild(text);
    });
    for (const n of graph.nodes) boxes.appendChild(drawNode(n, pos.get(n.id)));
    markSelected();
  }

  function via(e, nodes) {
    for (const s of e.services || []) {
      const id = "svc:" + s;
      if (nodes.has(id)) return id;
    }
    return null;
  }

  // Edges sharing an end fan out over the box's height, one lane each.
  function lanes(edges, end) {
    const groups = new Map();
    for (const e of edges) {
      const k = end(e);
      if (!groups.has(k)) groups.set(k, []);
      groups.get(k).push(e.id);
    }
    const out = new Map();
    for (const ids of groups.values()) {
      const gap = Math.min(14, (NODE_H - 8) / ids.length);
      ids.forEach((id, i) => out.set(id, (i - (ids.length - 1) / 2) * gap));
    }
    return out;
  }

  function drawEdge(e, pos, nodes, route) {
    const a = pos.get(e.source), b = pos.get(e.target);
    const mid = (p) => p.y + NODE_H / 2;
    const points = [[a.x + NODE_W, mid(a) + route.src]];
    const svc = via(e, nodes);
    if (svc && pos.has(svc)) {  // through the service the client addressed
      const s = pos.get(svc);
      points.push([s.x - 2, mid(s) + route.src], [s.x + NODE_W + 2, mid(s) + route.dst]);
    } else if (route.bypass !== null && b.x - a.x > COL_W) {  // around the services
      points.push([a.x + COL_W, route.bypass + route.dst], [a.x + COL_W + NODE_W, route.bypass + route.dst]);
    }
    if (b.x <= a.x) {  // a back edge (destination left of source): loop below
      points.push([a.x + NODE_W + 20, b.y + NODE_H + 10 + route.dst]);
      points.push([b.x + NODE_W / 2, b.y + NODE_H + 2]);
    } else {
      points.push([b.x - 2, mid(b) + route.dst]);
    }
    const d = points.map((p, i) => (i ? "L" : "M") + p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
    const cls = "edge " + e.outcome + (e.open > 0 ? " open" : "");
    const g = svg("g", { class: cls, "data-edge": e.id, "data-outcome": e.outcome, tabindex: 0 });
    const title = label(nodes.get(e.source)) + " → " + label(nodes.get(e.target)) + ": " +
      OUTCOME_TEXT[e.outcome] + "\n" + (e.srcIdentity || "no client identity") + " → " +
      (e.dstIdentity || "?");
    g.appendChild(svg("title", {}, title));
    g.appendChild(svg("path", { class: "line", d: d, "marker-end": "url(#arrow-" + e.outcome + ")" }));
    g.appendChild(svg("path", { class: "hit", d: d }));
    const last = points[points.length - 1], prev = points[points.length - 2];
    // The label sits a fixed distance before the arrow head: edges into one box have
    // separate lanes there, so their labels never overlap.
    const len = Math.hypot(last[0] - prev[0], last[1] - prev[1]) || 1;
    const t = Math.max(0, 1 - 78 / len);
    const tx = prev[0] + (last[0] - prev[0]) * t, ty = prev[1] + (last[1] - prev[1]) * t - 3;
    const open = e.open > 0 ? ", " + e.open + " open" : "";
    const text = svg("g", { class: "edge-label " + e.outcome, "data-edge": e.id });
    text.appendChild(svg("title", {}, title));
    text.appendChild(svg("text", { x: tx.toFixed(1), y: ty.toFixed(1), "text-anchor": "middle" },
      e.connections + " conn" + open + ", " + bytes(e.bytesSent + e.bytesRecv)));
    byElement.set(g, { kind: "edge", id: e.id });
    byElement.set(text, { kind: "edge", id: e.id });
    return [g, text];
  }

  function drawNode(n, p) {
    const cls = "node " + n.kind + (n.local ? " local" : "");
    const g = svg("g", { class: cls, "data-node": n.id, transform: "translate(" + p.x + "," + p.y + ")", tabindex: 0 });
    g.appendChild(svg("title", {}, label(n) + (n.identity ? "\n" + n.identity : "")));
    g.appendChild(svg("rect", { width: NODE_W, height: NODE_H, rx: n.kind === "service" ? 14 : 4 }));
    const name = n.kind === "address" ? n.name : n.name;
    g.appendChild(svg("text", { x: 10, y: 18, class: "name" }, clip(String(name), 28)));
    let sub;
    if (n.kind === "workload") sub = n.namespace + (n.node ? " · " + n.node : "") + (n.local ? " · this node" : "");
    else if (n.kind === "service") sub = "service · " + n.namespace + " · " + (n.addresses || []).join(",");
    else sub = "address (not in the state)";
    g.appendChild(svg("text", { x: 10, y: 35, class: "sub" }, clip(sub, 34)));
    byElement.set(g, { kind: "node", id: n.id });
    return g;
  }

  function clip(text, n) {
    return text.length > n ? text.slice(0, n - 1) + "…" : text;
  }

  function markSelected() {
    for (const e of document.querySelectorAll("#graph .selected")) e.classList.remove("selected");
    if (!selected) return;
    for (const e of document.querySelectorAll("#graph g.edge, #graph g.node")) {
      const s = byElement.get(e);
      if (s && s.kind === selected.kind && s.id === selected.id) e.classList.add("selected");
    }
  }

  // -- details ---------------------------------------------------------------------

  function dl(pairs) {
    const list = el("dl");
    for (const [k, v] of pairs) {
      if (v === null || v === undefined || v === "") continue;
      list.appendChild(el("dt", {}, k));
      list.appendChild(el("dd", {}, v));
    }
    return list;
  }

  function section(parent, title) {
    parent.appendChild(el("h3", {}, title));
    const box = el("div");
    box.appendChild(el("p", { class: "hint" }, "loading…"));
    parent.appendChild(box);
    return box;
  }

  function certificatePairs(node) {
    const c = node.certificate;
    if (!c) return [["certificate", node.kind === "workload" ? "not held by this agent" : null]];
    return [["certificate", c.state], ["serial", c.serial], ["valid from", c.validFrom], ["expires", c.expires]];
  }

  function showNode(n) {
    const box = document.getElementById("details");
    clear(box);
    box.appendChild(el("h2", {}, label(n)));
    box.appendChild(dl([
      ["kind", n.kind], ["addresses", (n.addresses || []).join(", ")], ["node", n.node],
      ["on this node", n.kind === "workload" ? (n.local ? "yes" : "no") : null],
      ["protocol", n.protocol], ["identity", n.identity], ["hostname", n.hostname],
      ...certificatePairs(n),
    ]));
    const edges = graph.edges.filter((e) => e.source === n.id || e.target === n.id);
    box.appendChild(el("h3", {}, "connections (" + edges.length + " edges)"));
    const nodes = new Map(graph.nodes.map((x) => [x.id, x]));
    for (const e of edges) {
      const line = el("p");
      line.appendChild(el("span", { class: "badge " + e.outcome }, e.outcome));
      line.appendChild(document.createTextNode(" " + label(nodes.get(e.source)) + " → " +
        label(nodes.get(e.target)) + ": " + e.connections + " connections"));
      box.appendChild(line);
    }
    loadLogs(section(box, "access log"), "node=" + encodeURIComponent(n.id));
  }

  function showEdge(e) {
    const box = document.getElementById("details");
    clear(box);
    const nodes = new Map(graph.nodes.map((x) => [x.id, x]));
    const src = nodes.get(e.source), dst = nodes.get(e.target);
    box.appendChild(el("h2", {}, label(src) + " → " + label(dst)));
    const head = el("p");
    head.appendChild(el("span", { class: "badge " + e.outcome }, OUTCOME_TEXT[e.outcome]));
    box.appendChild(head);
    box.appendChild(dl([
      ["connections", String(e.connections)], ["open now", String(e.open)],
      ["bytes sent", bytes(e.bytesSent)], ["bytes received", bytes(e.bytesRecv)],
      ["services", (e.services || []).join(", ")], ["ports", (e.ports || []).join(", ")],
      ["source identity", e.srcIdentity || "none (plaintext client)"],
      ["destination identity", e.dstIdentity], ["last error", e.lastError],
    ]));
    for (const [who, n] of [["source", src], ["destination", dst]]) {
      if (n && n.kind === "workload") {
        box.appendChild(el("h3", {}, who + " " + label(n)));
        box.appendChild(dl([["identity", n.identity], ...certificatePairs(n)]));
      }
    }
    const policy = section(box, "deciding policy (explain, evaluated now)");
    if (e.explain) loadExplain(policy, e.explain);
    else { clear(policy); policy.appendChild(el("p", { class: "hint" }, "no port known to explain")); }
    loadLogs(section(box, "access log"), "edge=" + encodeURIComponent(e.id));
  }

  async function getJSON(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!r.ok) throw new Error(url + ": HTTP " + r.status + " " + (await r.text()).trim());
    return r.json();
  }

  async function loadExplain(box, q) {
    const url = "/explain?from=" + encodeURIComponent(q.from) + "&to=" + encodeURIComponent(q.to);
    try {
      const result = await getJSON(url);
      clear(box);
      box.classList.add("explain");
      box.appendChild(el("p", {}, "from " + q.from + " to " + q.to));
      for (const item of result.results || []) {
        box.appendChild(el("pre", {}, String(item.explanation || "")));
      }
    } catch (err) {
      clear(box);
      box.appendChild(el("p", { class: "hint" }, String(err.message)));
    }
  }

  async function loadLogs(box, query) {
    try {
      const result = await getJSON("/api/connections?limit=50&" + query);
      clear(box);
      box.classList.add("logs");
      if (!result.entries.length) box.appendChild(el("p", { class: "hint" }, "no ended connections in the history"));
      for (const entry of result.entries) {
        const fields = Object.entries(entry.log).map(([k, v]) => k + "=" + JSON.stringify(v));
        box.appendChild(el("pre", {}, fields.join(" ")));
      }
    } catch (err) {
      clear(box);
      box.appendChild(el("p", { class: "hint" }, String(err.message)));
    }
  }

  function showSelected() {
    if (!selected || !graph) return;
    const list = selected.kind === "edge" ? graph.edges : graph.nodes;
    const item = list.find((x) => x.id === selected.id);
    if (item) (selected.kind === "edge" ? showEdge : showNode)(item);
  }

  function onClick(event) {
    let t = event.target;
    while (t && t !== event.currentTarget && !byElement.has(t)) t = t.parentNode;
    const s = t && byElement.get(t);
    if (!s) return;
    selected = s;
    markSelected();
    showSelected();
  }

  // -- polling ---------------------------------------------------------------------

  function setStatus(text, stale) {
    const s = document.getElementById("status");
    s.textContent = text;
    s.classList.toggle("stale", stale);
  }

  async function poll() {
    try {
      const r = await fetch("/api/graph", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const next = await r.json();
      const h = next.history;
      // Redraw only when what is drawn changed (not for a new timestamp), so a click or
      // a selection is never lost to a redraw of the same picture.
      const text = JSON.stringify([next.node, next.nodes, next.edges.map(drawn)]);
      if (text !== lastText) {
        const before = graph;
        graph = next;
        lastText = text;
        document.getElementById("title").textContent = "ztunnel" + (graph.node ? " on " + graph.node : "");
        draw();
        if (selected && before) refreshSelected(before);
      }
      const when = new Date().toLocaleTimeString();
      setStatus("updated " + when + " · " + graph.edges.length + " edges · history " + h.size +
        "/" + h.capacity + " (" + h.recorded + " recorded, " + h.evicted + " evicted)", false);
      document.body.setAttribute("data-loaded", "1");
    } catch (err) {
      setStatus("cannot reach the agent (" + err.message + "); retrying", true);
    }
    setTimeout(poll, POLL_MS);
  }

  function drawn(e) {
    const copy = Object.assign({}, e);
    delete copy.lastSeen;
    return copy;
  }

  function refreshSelected(before) {
    // Re-render the details only when the selected item changed, so reading is not disturbed.
    const list = selected.kind === "edge" ? "edges" : "nodes";
    const old = before[list].find((x) => x.id === selected.id);
    const now = graph[list].find((x) => x.id === selected.id);
    if (JSON.stringify(old && drawn(old)) !== JSON.stringify(now && drawn(now))) showSelected();
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("graph").addEventListener("click", onClick);
    document.getElementById("graph").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") onClick(ev);
    });
    poll();
  });
})();
