// The modelpress dashboard: polls /dashboard/data and draws tables and SVG line charts.
// No build step, no library. ?interval=MS (default 1000), ?span=S (default 300).
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const interval = Math.max(200, Number(params.get("interval")) || 1000);
  const span = params.get("span") || "300";
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2e86de", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"];
  const CHARTS = [
    { key: "rate", title: "requests / s", fmt: (v) => v.toFixed(1) },
    { key: "error_rate", title: "error rate", fmt: (v) => (100 * v).toFixed(1) + "%" },
    { key: "p50_ms", title: "p50 latency (ms)", fmt: (v) => v.toFixed(2) },
    { key: "p99_ms", title: "p99 latency (ms)", fmt: (v) => v.toFixed(2) },
  ];
  const colorOf = {};
  function color(model, version) {
    const k = model + "\u0000" + version;
    if (!(k in colorOf)) colorOf[k] = COLORS[Object.keys(colorOf).filter((x) => x.startsWith(model + "\u0000")).length % COLORS.length];
    return colorOf[k];
  }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "style") node.style.cssText = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  const num = (v, digits) => (v == null ? "–" : Number(v).toFixed(digits));
  const pct = (v) => (v == null ? "–" : (100 * v).toFixed(2) + "%");

  function chart(model, spec, data) {
    const W = 400, H = 150, L = 44, R = 8, T = 10, B = 18;
    const box = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, "data-chart": spec.key, "data-model": model.name, preserveAspectRatio: "none" });
    const t0 = data.now - data.span_s, t1 = data.now;
    let ymax = 0;
    for (const v of model.versions) for (const p of v.series) if (p[spec.key] != null) ymax = Math.max(ymax, p[spec.key]);
    if (spec.key === "error_rate") ymax = Math.max(ymax, 0.01);
    ymax = ymax > 0 ? ymax * 1.1 : 1;
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
    const y = (v) => T + (1 - v / ymax) * (H - T - B);
    box.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#ccd" }));
    box.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#ccd" }));
    const top = svg("text", { x: 2, y: T + 8 }); top.textContent = spec.fmt(ymax); box.append(top);
    const zero = svg("text", { x: 2, y: H - B }); zero.textContent = "0"; box.append(zero);
    const left = svg("text", { x: L, y: H - 4 }); left.textContent = `-${Math.round(data.span_s)} s`; box.append(left);
    for (const v of model.versions) {
      const pts = v.series.filter((p) => p[spec.key] != null);
      if (!pts.length) continue;
      const line = svg("polyline", {
        points: pts.map((p) => `${x(p.t + data.bucket_s / 2).toFixed(1)},${y(p[spec.key]).toFixed(1)}`).join(" "),
        fill: "none", stroke: color(model.name, v.version), "stroke-width": 1.6,
        "data-version": v.version, "data-points": pts.length, "data-last": pts[pts.length - 1][spec.key],
      });
      box.append(line);
    }
    return el("figure", {}, el("figcaption", {}, spec.title), box);
  }

  function splitBar(model) {
    const bar = el("div", { class: "split", "data-model": model.name });
    for (const [version, w] of Object.entries(model.weights || {})) {
      if (w <= 0) continue;
      bar.append(el("div", { style: `width:${w}%;background:${color(model.name, version)}`, "data-model": model.name, "data-version": version, "data-weight": w }, `${version}: ${num(w, w % 1 ? 1 : 0)}%`));
    }
    return bar;
  }

  function table(model) {
    const head = el("tr", {}, ...["version", "traffic", "requests", "req/s", "errors", "error rate", "p50 ms", "p99 ms", "shadow", "agreement"].map((h) => el("th", {}, h)));
    const body = model.versions.map((v) => {
      const t = v.totals, s = v.shadow;
      const last = v.series.length ? v.series[v.series.length - 1] : null;
      const cell = (field, text) => el("td", { "data-field": field, "data-model": model.name, "data-version": v.version }, text);
      const weight = (model.weights || {})[v.version];
      const mirror = (model.shadow || {})[v.version];
      return el("tr", {},
        el("td", {}, el("span", { class: "swatch", style: `background:${color(model.name, v.version)}` }), v.version + (v.loaded ? "" : " (unloaded)")),
        cell("weight", weight != null ? num(weight, 1) + "%" : mirror != null ? `shadow ${num(100 * mirror, 0)}%` : "–"),
        cell("requests", t.requests),
        cell("rate", last ? num(last.rate, 1) : "–"),
        cell("errors", t.errors),
        cell("error_rate", pct(t.error_rate)),
        cell("p50_ms", num(t.p50_ms, 2)),
        cell("p99_ms", num(t.p99_ms, 2)),
        cell("shadow_requests", s ? s.requests : "–"),
        cell("agreement", s && s.agreement != null ? num(s.agreement, 4) : "–"));
    });
    return el("table", { "data-model": model.name }, el("thead", {}, head), el("tbody", {}, ...body));
  }

  function llmTable(model) {
    const rows = model.versions.filter((v) => v.llm);
    if (!rows.length) return "";
    const head = el("tr", {}, ...["version", "engine", "running", "waiting", "KV cache", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "generated"].map((h) => el("th", {}, h)));
    const body = rows.map((v) => {
      const m = v.llm;
      const cell = (field, text) => el("td", { "data-field": field, "data-model": model.name, "data-version": v.version }, text);
      return el("tr", {},
        el("td", {}, el("span", { class: "swatch", style: `background:${color(model.name, v.version)}` }), v.version),
        cell("engine", m.engine),
        cell("running", m.running),
        cell("waiting", m.waiting),
        cell("kv_cache_usage", `${pct(m.kv_cache_usage)} of ${m.kv_cache_capacity_tokens}`),
        cell("tokens_per_s", num(m.tokens_per_s, 1)),
        cell("ttft_p50_ms", num(m.ttft_p50_ms, 1)),
        cell("ttft_p99_ms", num(m.ttft_p99_ms, 1)),
        cell("itl_p50_ms", num(m.itl_p50_ms, 2)),
        cell("itl_p99_ms", num(m.itl_p99_ms, 2)),
        cell("generated_tokens", m.generated_tokens));
    });
    return el("div", { class: "llm", "data-model": model.name },
      el("h3", {}, "generation (last minute)"),
      el("table", { class: "llm", "data-model": model.name }, el("thead", {}, head), el("tbody", {}, ...body)));
  }

  function rollout(model) {
    const r = model.rollout;
    if (!r) return el("div", { class: "rollout empty", "data-model": model.name }, "No rollout.");
    const phases = r.phases || [];
    const box = el("div", { class: "rollout", "data-model": model.name, "data-status": r.status, "data-step": r.step },
      el("div", {},
        "rollout ", el("span", { class: "state " + r.status }, r.status), ` · ${r.spec ? r.spec.strategy : ""} ${r.baseline} → ${r.candidate} · `,
        `phase ${r.phase} · step ${r.step + 1}/${phases.length}`,
        r.weights ? " · " + Object.entries(r.weights).map(([k, w]) => `${k}: ${num(w, 1)}%`).join(", ") : ""));
    const list = el("ol", { reversed: "" });
    for (const e of (r.events || []).slice().reverse()) {
      const n = e.numbers && e.numbers.candidate;
      const detail = n ? ` (candidate ${n.requests} req, errors ${pct(n.error_rate)}, p99 ${num(n.p99_ms, 1)} ms` + (e.numbers.p99_ratio != null ? `, ratio ${num(e.numbers.p99_ratio, 2)}` : "") + (n.agreement != null ? `, agreement ${num(n.agreement, 4)}` : "") + ")" : "";
      list.append(el("li", { "data-action": e.action }, `${(e.at || "").slice(11, 19)} ${e.action}: ${(e.reasons || []).join("; ")}${detail}`));
    }
    box.append(list);
    return box;
  }

  function render(data) {
    const root = document.getElementById("models");
    root.replaceChildren();
    if (!data.models.length) root.append(el("p", { class: "empty" }, "No model is served."));
    for (const model of data.models) {
      const p = model.policy || {};
      const section = el("section", { class: "model", "data-model": model.name },
        el("h2", {}, model.name, el("span", { class: "policy" }, p.policy ? `${p.policy} policy` : "loading")),
        splitBar(model), table(model), llmTable(model),
        el("div", { class: "charts" }, ...CHARTS.map((c) => chart(model, c, data))),
        rollout(model));
      root.append(section);
    }
  }

  let polls = 0;
  async function poll() {
    const status = document.getElementById("status");
    try {
      const res = await fetch(`/dashboard/data?span=${encodeURIComponent(span)}`, { cache: "no-store" });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const data = await res.json();
      render(data);
      polls += 1;
      status.className = "";
      status.dataset.polls = polls;
      status.textContent = `updated ${new Date(data.now * 1000).toLocaleTimeString()} · every ${interval / 1000} s`;
    } catch (err) {
      status.className = "error";
      status.textContent = `cannot reach the server: ${err.message}`;
    }
    setTimeout(poll, interval);
  }
  poll();
})();
