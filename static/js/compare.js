/* compare.js: the compare page (templates/studio/compare.html, /compare/?runs=<id>&runs=<id>).

   Opens one live socket per run (live.js, same protocol as the run page) and
   overlays the same charts as the run page, each run in its stable colour
   (NanoCharts.colorFor) with its label in the legend. The smoothing, log-y
   and x-axis controls are shared with the run page (remembered in
   localStorage). The summary table shows, per run and stage, the last, min
   and best (minimum of the smoothed curve) train loss and the last and best
   validation bpb; it follows the smoothing slider.

   Needs charts.js and live.js loaded first, and the json_script
   #compare-runs = [[run_id, ws_url, label], ...].
*/
(function () {
  "use strict";

  const C = window.NanoCharts;
  const L = window.NanoLive;
  const $ = (id) => document.getElementById(id);
  const STATE_ORDER = ["closed", "reconnecting", "connecting", "live"];

  const { el, readJson } = window.NanoDom;

  const page = $("compare-page");
  if (!page || !C || !L) return;
  const body = $("compare-rows");
  // Run page links, as the server rendered them, before the rows are rebuilt.
  const links = {};
  if (body) for (const row of body.rows) links[row.dataset.run] = row.dataset.url;

  const sources = (readJson("compare-runs") || []).map(([id, url, label]) => ({
    id: String(id), url, label: label || String(id), data: C.createRunData(String(id)), state: "connecting", detail: {},
  }));

  // ---------------------------------------------------------------- charts

  let board = null;
  const chartEls = C.CHARTS.map((spec) => ({spec, el: $(`chart-${spec.id}`)})).filter((c) => c.el);
  if (window.Plotly && chartEls.length && sources.length) {
    board = new C.Board({
      Plotly: window.Plotly, charts: chartEls, settings: C.loadSettings(), colorBy: "run", trainerTrace: false,
      sources: () => sources, theme: C.readTheme(), config: C.plotlyConfig(window.Plotly),
      glThreshold: C.hardwareWebGL() ? C.GL_THRESHOLD : Infinity,
    });
    board.render();
  } else if (!window.Plotly) {
    for (const c of chartEls) c.el.dataset.placeholder = "Charts need static/plotly/plotly.min.js, which did not load.";
  }

  // ----------------------------------------------------------------- table

  const fmt = (v) => C.formatNumber(v);
  const atStep = (v, step) => (v === null ? "—" : `${fmt(v)} @ ${step}`);

  /** The run's colour chip. Coloured through the CSSOM: the Content-Security-Policy refuses style attributes. */
  function swatch(id) {
    const chip = el("span", {className: "swatch"});
    chip.style.background = C.colorFor(id);
    return chip;
  }

  function summaryRows(source, alpha) {
    const stages = new Set([...source.data.metrics.keys(), ...source.data.vals.keys()]);
    const info = source.data.info || {};
    const rows = [];
    const many = stages.size > 1;
    for (const stage of stages.size ? stages : [""]) {
      const loss = C.summarize(source.data.metrics.get(stage), "loss", alpha);
      const val = C.summarize(source.data.vals.get(stage), "val_bpb", 0);
      const link = links[source.id];
      const name = link ? el("a", {href: link, text: source.label}) : el("span", {text: source.label});
      rows.push(el("tr", {"data-run": source.id},
        el("td", {}, swatch(source.id), name,
          many ? el("span", {className: "muted", text: ` · ${stage}`}) : null),
        el("td", {}, info.status ? el("span", {className: `badge status-${info.status}`, text: info.status}) : null),
        el("td", {}, el("span", {className: `conn-state compare-conn conn-${source.state}`, text: source.state,
          title: source.detail.reason || ""})),
        el("td", {className: "num", text: loss.lastStep === null ? "—" : String(loss.lastStep)}),
        el("td", {className: "num", text: fmt(loss.last)}),
        el("td", {className: "num", text: atStep(loss.min, loss.minStep)}),
        el("td", {className: "num", text: atStep(loss.best, loss.bestStep)}),
        el("td", {className: "num", text: fmt(val.last)}),
        el("td", {className: "num", text: atStep(val.min, val.minStep)})));
    }
    return rows;
  }

  let rowsQueued = false;
  function renderRows() {
    rowsQueued = false;
    if (!body) return;
    const alpha = board ? board.settings.alpha : C.loadSettings().alpha;
    body.replaceChildren(...sources.flatMap((s) => summaryRows(s, alpha)));
  }

  function scheduleRows() {
    if (rowsQueued) return;
    rowsQueued = true;
    requestAnimationFrame(renderRows);
  }

  /** The page-wide indicator shows the worst state of all sockets ("live" only when all are). */
  function renderConnection() {
    const node = $("conn-state");
    if (!node || !sources.length) return;
    const worst = sources.map((s) => s.state).sort((a, b) => STATE_ORDER.indexOf(a) - STATE_ORDER.indexOf(b))[0];
    node.textContent = worst;
    node.className = `conn-state conn-${worst}`;
    const detail = $("conn-detail");
    if (detail) {
      const live = sources.filter((s) => s.state === "live").length;
      detail.textContent = `${live} of ${sources.length} runs live`;
    }
  }

  C.bindControls(board, {
    smoothing: $("smoothing"), smoothingValue: $("smoothing-value"), logY: $("log-y"), xAxis: $("x-axis"),
  }, scheduleRows);

  // ------------------------------------------------------------ live links

  const conns = sources.map((source) => L.connect(source.url, {
    onState(state, detail) {
      source.state = state;
      source.detail = detail || {};
      renderConnection();
      scheduleRows();
    },
    onSnapshot(msg) {
      C.applySnapshot(source.data, msg);
      if (board) board.update();
      scheduleRows();
    },
    onEvents(events) {
      if (!C.applyEvents(source.data, events).length) return;
      if (board) board.update();
      scheduleRows();
    },
    onRun(run) {
      if (!run) return;
      source.data.info = run;
      scheduleRows();
    },
  }));
  window.addEventListener("online", () => conns.forEach((c) => c.reconnectNow()));
  renderConnection();
  window.NanoComparePage = {sources, conns, board};
})();
