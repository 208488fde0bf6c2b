/* run.js: the live run page (templates/studio/run_detail.html).

   The server renders a complete page first; this script then connects to
   the run's WebSocket (live.js) and keeps the page current:
   - snapshot: every chart drawn once with Plotly.newPlot, tables, samples,
     log and report filled from scratch;
   - events: chart points appended with Plotly.extendTraces once per
     animation frame (charts.js Board), new eval rows and samples added;
   - run: status badge, flags, error, stage table and timeline, progress
     bar and action buttons;
   - log / report: the log tail (last 500 lines) and the report card.
   Text from events, logs and models is set with textContent only; the
   report is HTML sanitized by the server.

   Needs: charts.js and live.js loaded first; Plotly is optional (without it
   the page keeps everything but the charts). Exposes window.NanoRunPage
   ({data, conn, board}) for debugging and browser tests.
*/
(function () {
  "use strict";

  const C = window.NanoCharts;
  const L = window.NanoLive;
  const LOG_LINES = 500;
  const SAMPLE_EVENTS = 50;
  // Envelope fields of an eval event: the rest are its values.
  const EVAL_ENVELOPE = new Set(["seq", "time", "stage", "kind", "name", "step"]);
  // Statuses whose duration grows until the next `run` message.
  const TICKING = new Set(["running", "pausing", "stopping"]);

  const $ = (id) => document.getElementById(id);

  const { el, readJson } = window.NanoDom;

  function badge(status, id) {
    const span = el("span", {className: `badge status-${status}`, text: status});
    if (id) span.id = id;
    return span;
  }

  function cookie(name) {
    for (const part of document.cookie ? document.cookie.split(";") : []) {
      const [k, ...v] = part.trim().split("=");
      if (k === name) return decodeURIComponent(v.join("="));
    }
    return null;
  }

  // ------------------------------------------------------------ page state

  const page = $("run-page");
  if (!page || !C || !L) return;
  const runId = page.dataset.runId;
  let run = readJson("run-initial") || {id: runId, status: "", stages: []};
  let runAt = Date.now();  // when `run` arrived: running durations tick from there (no clock skew)
  const data = C.createRunData(runId, run);
  let logLines = [];

  // ------------------------------------------------------------- run state

  function elapsedSince(seconds, status) {
    if (typeof seconds !== "number") return null;
    return TICKING.has(status) ? seconds + (Date.now() - runAt) / 1000 : seconds;
  }

  function renderHeader() {
    const status = $("run-status");
    if (status) {
      status.textContent = run.status;
      status.className = `badge status-${run.status}`;
    }
    const flags = $("run-flags");
    if (flags) {
      const notes = [];
      if (run.kill_requested) notes.push("kill requested");
      else if (run.cancel_requested) notes.push("cancel requested");
      if (run.pause_requested && run.status !== "paused") notes.push("pause requested");
      flags.textContent = notes.join(" · ");
    }
    const errorBox = $("run-error");
    if (errorBox) {
      errorBox.hidden = !run.error;
      const text = $("run-error-text");
      if (text) text.textContent = run.error || "";
    }
    renderDurations();
  }

  function renderDurations() {
    const runDuration = $("run-duration");
    if (runDuration) {
      const seconds = elapsedSince(run.duration, run.status);
      runDuration.textContent = seconds === null ? "" : C.formatDuration(seconds);
    }
    for (const stage of run.stages || []) {
      const row = stageRow(stage);
      const cell = row && row.querySelector(".stage-duration");
      const seconds = elapsedSince(stage.duration, stage.status);
      if (cell) cell.textContent = seconds === null ? "—" : C.formatDuration(seconds);
    }
    renderTimeline();
  }

  function stageRow(stage) {
    const body = $("stages-body");
    if (!body) return null;
    for (const row of body.rows) if (row.dataset.stage === stage.name) return row;
    // A stage the server page did not list (the pipeline grew): add a row.
    const row = el("tr", {"data-stage": stage.name},
      el("td", {text: String((stage.order || 0) + 1)}),
      el("td", {}, el("strong", {text: stage.name})),
      el("td", {className: "stage-status"}),
      el("td", {className: "num stage-exit", text: "—"}),
      el("td", {className: "num stage-duration", text: "—"}),
      el("td", {}));
    body.append(row);
    return row;
  }

  function renderStages() {
    for (const stage of run.stages || []) {
      const row = stageRow(stage);
      if (!row) continue;
      const statusCell = row.querySelector(".stage-status");
      if (statusCell) {
        statusCell.replaceChildren(badge(stage.status));
        if (stage.note) statusCell.append(" ", el("span", {className: "muted stage-note", text: stage.note}));
      }
      const exitCell = row.querySelector(".stage-exit");
      if (exitCell) exitCell.textContent = stage.exit_code === null || stage.exit_code === undefined ? "—" : String(stage.exit_code);
    }
  }

  /** One bar per stage, as wide as its duration (waiting stages get a sliver). */
  function renderTimeline() {
    const strip = $("stage-strip");
    if (!strip) return;
    const stages = run.stages || [];
    const seconds = stages.map((s) => elapsedSince(s.duration, s.status));
    const known = seconds.filter((s) => typeof s === "number" && s > 0);
    const total = known.reduce((a, b) => a + b, 0);
    const sliver = known.length ? Math.max(total * 0.06, 1) : 1;
    strip.replaceChildren(...stages.map((stage, i) => {
      const s = seconds[i];
      const width = typeof s === "number" && s > 0 ? Math.max(s, sliver / 2) : sliver;
      const label = `${stage.name}: ${stage.status}${typeof s === "number" ? `, ${C.formatDuration(s)}` : ""}`;
      const seg = el("div", {className: `stage-seg status-${stage.status}`, title: label, role: "listitem", "aria-label": label},
        el("span", {text: stage.name}));
      seg.style.flexGrow = String(width);
      return seg;
    }));
  }

  /** The progress bar: the server's progress, moved on by newer metric events between `run` messages. */
  function renderProgress() {
    const box = $("progress");
    if (!box) return;
    const p = run.progress;
    if (!p || typeof p.total !== "number" || p.total <= 0) {
      box.hidden = true;
      return;
    }
    let step = typeof p.step === "number" ? p.step : 0;
    const series = data.metrics.get(p.stage);
    if (series && series.n && series.step[series.n - 1] > step) step = series.step[series.n - 1];
    const fraction = Math.min(1, step / p.total);
    box.hidden = false;
    const bar = $("run-progress");
    if (bar) bar.value = fraction;
    let text = `${p.stage}: step ${step} / ${p.total} (${(100 * fraction).toFixed(1)}%)`;
    const eta = TICKING.has(run.status) ? C.etaSeconds(series, step, p.total) : null;
    if (eta !== null) text += ` · about ${C.formatDuration(eta)} left`;
    const label = $("progress-text");
    if (label) label.textContent = text;
  }

  /** Show the actions the server allows now; hide the others. */
  function renderActions() {
    const actions = run.actions;
    const box = $("run-actions");
    if (!box || !actions) return;
    for (const form of box.querySelectorAll("form[data-action]")) {
      const url = actions[form.dataset.action];
      form.hidden = !url;
      if (url) form.setAttribute("action", url);
      for (const button of form.querySelectorAll("button")) button.disabled = !url || form.dataset.sent === "1";
    }
  }

  function updateRun(next) {
    if (!next) return;
    run = next;
    runAt = Date.now();
    data.info = next;
    renderHeader();
    renderStages();
    renderProgress();
    renderActions();
  }

  function bindActions() {
    const box = $("run-actions");
    if (!box) return;
    // common.js (every page) asks the data-confirm question first and may cancel the submit.
    box.addEventListener("submit", (e) => {
      const form = e.target;
      if (e.defaultPrevented) return;
      // The cookie holds the current token even if the page's copy went stale (login in another tab).
      const token = cookie("csrftoken");
      const input = form.querySelector("input[name=csrfmiddlewaretoken]");
      if (token && input) input.value = token;
      form.dataset.sent = "1";
      setTimeout(() => form.querySelectorAll("button").forEach((b) => (b.disabled = true)), 0);
    });
  }

  // ------------------------------------------------------ connection state

  function showConnection(state, detail) {
    const node = $("conn-state");
    if (node) {
      node.textContent = state;
      node.className = `conn-state conn-${state}`;
    }
    const more = $("conn-detail");
    if (!more) return;
    if (state === "reconnecting" && detail.delay) more.textContent = `retry in ${Math.round(detail.delay / 1000)} s`;
    else if (state === "closed") more.textContent = detail.reason || "";
    else more.textContent = "";
  }

  // -------------------------------------------------- evals, samples, log

  function evalValues(ev) {
    const parts = [];
    for (const [key, value] of Object.entries(ev)) {
      if (EVAL_ENVELOPE.has(key) || typeof value !== "number") continue;
      parts.push(el("span", {className: "kv"}, el("code", {text: key}), ` ${C.formatNumber(value)}`));
    }
    return parts;
  }

  function evalRow(ev) {
    return el("tr", {},
      el("td", {text: ev.stage || ""}),
      el("td", {}, el("strong", {text: ev.name || ""})),
      el("td", {className: "num", text: typeof ev.step === "number" ? String(ev.step) : "—"}),
      el("td", {}, ...evalValues(ev)));
  }

  function renderEvals() {
    const body = $("eval-rows");
    if (!body) return;
    body.replaceChildren(...data.evals.map(evalRow));
    const empty = $("evals-empty");
    if (empty) empty.hidden = data.evals.length > 0;
  }

  function sampleCard(ev) {
    const items = (Array.isArray(ev.samples) ? ev.samples : []).map((s) =>
      el("li", {},
        el("span", {className: "sample-prompt", text: String(s.prompt ?? "")}),
        el("span", {className: "sample-completion", text: String(s.completion ?? "")})));
    return el("article", {className: "sample"},
      el("h3", {text: `${ev.stage || ""} · step ${ev.step ?? "?"}`}),
      el("ul", {}, ...items));
  }

  function renderSamples() {
    const box = $("samples");
    if (!box) return;
    const newest = data.samples.slice(-SAMPLE_EVENTS).reverse();
    box.replaceChildren(...newest.map(sampleCard));
    const empty = $("samples-empty");
    if (empty) empty.hidden = data.samples.length > 0;
  }

  function addSample(ev) {
    const box = $("samples");
    if (!box) return;
    box.prepend(sampleCard(ev));
    while (box.children.length > SAMPLE_EVENTS) box.lastElementChild.remove();
    const empty = $("samples-empty");
    if (empty) empty.hidden = true;
  }

  function renderLog(stage, lines, reset) {
    const pre = $("log");
    if (!pre) return;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 24;
    logLines = reset ? lines.slice() : logLines.concat(lines);
    if (logLines.length > LOG_LINES) logLines = logLines.slice(-LOG_LINES);
    pre.textContent = logLines.join("\n");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    const label = $("log-stage");
    if (label && stage) label.textContent = `logs/${stage}.log`;
  }

  function setReport(html) {
    const box = $("report");
    if (!box) return;
    box.innerHTML = html || "";  // sanitized by the server (Markdown without raw HTML, then nh3)
    const empty = $("report-empty");
    if (empty) empty.hidden = !!html;
  }

  function renderChartNote() {
    const note = $("chart-note");
    if (!note) return;
    const d = data.downsampled;
    note.textContent = d && d.metric_stride > 1
      ? `History: 1 in ${d.metric_stride} of ${d.metric_total} metric points, the most recent ones all; new points arrive at full rate. Smoothing accounts for the gaps.`
      : "";
  }

  // ---------------------------------------------------------------- charts

  let board = null;
  const chartEls = C.CHARTS.map((spec) => ({spec, el: $(`chart-${spec.id}`)})).filter((c) => c.el);
  if (window.Plotly && chartEls.length) {
    board = new C.Board({
      Plotly: window.Plotly, charts: chartEls, settings: C.loadSettings(), colorBy: "stage", trainerTrace: true,
      sources: () => [{id: runId, label: run.name || runId, data}],
      theme: C.readTheme(), config: C.plotlyConfig(window.Plotly),
      glThreshold: C.hardwareWebGL() ? C.GL_THRESHOLD : Infinity,
    });
  } else {
    for (const c of chartEls) c.el.dataset.placeholder = "Charts need static/plotly/plotly.min.js, which did not load.";
  }
  C.bindControls(board, {
    smoothing: $("smoothing"), smoothingValue: $("smoothing-value"), logY: $("log-y"), xAxis: $("x-axis"),
  });

  // ------------------------------------------------------------ live link

  function onSnapshot(msg) {
    C.applySnapshot(data, msg);
    if (msg.run) updateRun(msg.run);
    if (board) board.render();
    renderEvals();
    renderSamples();
    renderChartNote();
    renderProgress();
    if (msg.log) renderLog(msg.log.stage, msg.log.lines || [], true);
    if ("report_html" in msg) setReport(msg.report_html);
  }

  function onEvents(events) {
    const accepted = C.applyEvents(data, events);
    if (!accepted.length) return;
    if (board) board.update();
    const body = $("eval-rows");
    for (const ev of accepted) {
      if (ev.kind === "eval" && ev.name !== "val_bpb" && body) {
        body.append(evalRow(ev));
        const empty = $("evals-empty");
        if (empty) empty.hidden = true;
      } else if (ev.kind === "sample") {
        addSample(ev);
      }
    }
    renderProgress();
  }

  bindActions();
  updateRun(run);
  const conn = L.connect(page.dataset.wsUrl, {
    onState: showConnection,
    onSnapshot,
    onEvents,
    onRun: updateRun,
    onLog: (msg) => renderLog(msg.stage, msg.lines || [], !!msg.reset),
    onReport: setReport,
  });
  window.addEventListener("online", () => conn.reconnectNow());
  // Running durations count up between `run` messages; finished ones never change.
  setInterval(() => {
    if (TICKING.has(run.status)) renderDurations();
  }, 1000);
  window.NanoRunPage = {data, conn, board};
})();
