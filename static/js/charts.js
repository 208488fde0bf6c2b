/* charts.js: the chart logic of the run and compare pages, as plain functions.

   Loaded in the browser as a classic script (window.NanoCharts) and in node
   tests with require(). Nothing here touches the DOM; the Board at the end
   drives a Plotly object it is given, so a test can hand it a fake one.

   Data flow:
     const data = NanoCharts.createRunData("run-id");
     NanoCharts.applySnapshot(data, snapshotMessage);     // replaces everything
     NanoCharts.applyEvents(data, eventsMessage.events);  // appends, drops seq <= last
     const board = new NanoCharts.Board({Plotly, charts: [{spec, el}], sources: () => [{id, label, data}]});
     board.render();   // Plotly.newPlot per chart
     board.update();   // later: Plotly.extendTraces with only the new points, once per frame

   Smoothing is a de-biased exponential moving average whose weight depends on
   the step gap between points: a point `gap` steps after the previous one
   keeps alpha**gap of the old average, exactly as if the metric had been
   logged at every step in between with the new value. So a down-sampled
   history (every k-th step) and full-rate live points smooth alike, and the
   curve does not change shape when the snapshot's stride changes. De-biasing
   (dividing by the accumulated weight) makes the first smoothed value equal
   the first raw value instead of starting near zero.
*/
(function (root) {
  "use strict";

  // Ten colours that stay readable on the light and the dark background.
  const PALETTE = [
    "#3b6fd8", "#e0702a", "#2e9e5b", "#d2415a", "#8a5cd0",
    "#1a9aa8", "#c28a12", "#d45fb0", "#6b7d2a", "#7a6a5a",
  ];
  const DASHES = ["solid", "dash", "dot", "dashdot", "longdash"];

  // Fields of metric events the charts (and the ETA) use.
  const METRIC_FIELDS = ["loss", "smooth_loss", "lrm", "tok_per_sec", "mfu", "peak_mem_mb", "dt"];

  // The charts of both pages. `id` names the element: chart-<id>.
  const CHARTS = [
    {id: "loss", title: "Train loss", source: "metric", field: "loss", smooth: true, trainerField: "smooth_loss", yTitle: "loss"},
    {id: "val", title: "Validation bpb", source: "val", field: "val_bpb", markers: true, yTitle: "bits per byte"},
    {id: "lrm", title: "Learning-rate multiplier", source: "metric", field: "lrm", yTitle: "lrm"},
    {id: "tps", title: "Tokens / s", source: "metric", field: "tok_per_sec", smooth: true, yTitle: "tokens/s"},
    {id: "mfu", title: "MFU %", source: "metric", field: "mfu", smooth: true, yTitle: "MFU %"},
    {id: "mem", title: "Peak memory (MB)", source: "metric", field: "peak_mem_mb", yTitle: "MB"},
  ];

  const X_MODES = {
    step: "step",
    tokens: "tokens",
    flops: "FLOPs",
    wall: "wall time since run start",
    relative: "time since stage start",
  };

  // Smoothing 0.9 per step, x = step, linear y: what a page shows before the user picks.
  const DEFAULT_SETTINGS = {alpha: 0.9, xMode: "step", logY: false};

  // Above this many points in a chart, lines are drawn with WebGL.
  const GL_THRESHOLD = 2000;

  function isNum(v) {
    return typeof v === "number" && Number.isFinite(v);
  }

  // ---------------------------------------------------------------- colours

  /** FNV-1a over the UTF-16 code units: small, fast and well spread for run ids. */
  function hashString(text) {
    let h = 0x811c9dc5;
    for (let i = 0; i < text.length; i++) {
      h ^= text.charCodeAt(i);
      h = Math.imul(h, 0x01000193);
    }
    return h >>> 0;
  }

  /** The same colour for a run id on every page and every load. */
  function colorFor(id) {
    return PALETTE[hashString(String(id)) % PALETTE.length];
  }

  // -------------------------------------------------------------- smoothing

  function emaState() {
    return {num: 0, den: 0, step: null};
  }

  /** Add one point to a step-gap-aware, de-biased EMA and return the smoothed value. O(1).

      alpha is the weight per step (0 = no smoothing, 0.999 = heavy). A gap of
      g steps since the previous point keeps alpha**g of the old average. A
      step that does not advance counts as a gap of 1. */
  function emaPush(state, alpha, step, value) {
    const a = Math.min(Math.max(alpha || 0, 0), 0.9999);
    const gap = state.step === null ? 1 : Math.max(1, step - state.step);
    const keep = a > 0 ? Math.pow(a, gap) : 0;
    state.num = keep * state.num + (1 - keep) * value;
    state.den = keep * state.den + (1 - keep);
    state.step = step;
    return state.den > 0 ? state.num / state.den : value;
  }

  /** The smoothed series of (steps, values) in one go; non-numbers give null and are skipped. */
  function emaSeries(steps, values, alpha) {
    const state = emaState();
    return values.map((v, i) => (isNum(v) ? emaPush(state, alpha, steps[i], v) : null));
  }

  // ------------------------------------------------------------- run data

  function newSeries(stage, fields) {
    const cols = {};
    for (const f of fields) cols[f] = [];
    return {stage, n: 0, step: [], time: [], cols, version: 0};
  }

  /** Append one event as a row. A step that does not advance means the stage
      was resumed from an earlier checkpoint: the rows from that step on are
      superseded, so they are dropped (and `version` tells the charts to redraw). */
  function appendRow(series, ev, fields) {
    const step = ev.step;
    if (series.n > 0 && step <= series.step[series.n - 1]) {
      let keep = series.n;
      while (keep > 0 && series.step[keep - 1] >= step) keep--;
      series.step.length = keep;
      series.time.length = keep;
      for (const f of fields) series.cols[f].length = keep;
      series.n = keep;
      series.version++;
    }
    series.step.push(step);
    series.time.push(isNum(ev.time) ? ev.time : null);
    for (const f of fields) series.cols[f].push(isNum(ev[f]) ? ev[f] : null);
    series.n++;
  }

  /** Everything the pages keep about one run, built from its events. */
  function createRunData(id, info) {
    const data = {id, epoch: 0, info: info || null};
    resetRunData(data);
    return data;
  }

  function resetRunData(data) {
    data.lastSeq = 0;
    data.firstTime = null;
    data.lastTime = null;
    data.setups = {};       // stage -> its setup event (flops_per_token, ...)
    data.stageStart = {};   // stage -> time of its first event
    data.metrics = new Map();  // stage -> series of metric events that have a step
    data.vals = new Map();     // stage -> series of val_bpb evals
    data.evals = [];        // other eval events, in seq order
    data.samples = [];      // sample events, in seq order
    data.downsampled = null;
  }

  function addEvent(data, ev) {
    const stage = ev.stage || "";
    if (isNum(ev.time)) {
      if (data.firstTime === null || ev.time < data.firstTime) data.firstTime = ev.time;
      if (data.lastTime === null || ev.time > data.lastTime) data.lastTime = ev.time;
      if (!(stage in data.stageStart)) data.stageStart[stage] = ev.time;
    }
    switch (ev.kind) {
      case "setup":
        data.setups[stage] = ev;
        break;
      case "metric":
        if (isNum(ev.step)) {  // tok_train's metrics have no step: not charted
          if (!data.metrics.has(stage)) data.metrics.set(stage, newSeries(stage, METRIC_FIELDS));
          appendRow(data.metrics.get(stage), ev, METRIC_FIELDS);
        }
        break;
      case "eval":
        if (ev.name === "val_bpb") {
          if (isNum(ev.step) && isNum(ev.val_bpb)) {
            if (!data.vals.has(stage)) data.vals.set(stage, newSeries(stage, ["val_bpb"]));
            appendRow(data.vals.get(stage), ev, ["val_bpb"]);
          }
        } else {
          data.evals.push(ev);
        }
        break;
      case "sample":
        data.samples.push(ev);
        break;
      default:
        break;
    }
  }

  function bySeq(a, b) {
    return a.seq - b.seq;
  }

  /** Replace the run's state with a snapshot message (protocol: a snapshot always replaces). */
  function applySnapshot(data, msg) {
    resetRunData(data);
    data.epoch++;
    if (msg.run) data.info = msg.run;
    data.downsampled = msg.downsampled || null;
    const events = (msg.events || []).filter((e) => isNum(e.seq)).sort(bySeq);
    for (const ev of events) {
      if (ev.seq <= data.lastSeq) continue;
      addEvent(data, ev);
      data.lastSeq = ev.seq;
    }
    if (isNum(msg.last_seq) && msg.last_seq > data.lastSeq) data.lastSeq = msg.last_seq;
    return events;
  }

  /** Add new events; those with seq <= the last one seen are dropped. Returns the accepted ones. */
  function applyEvents(data, events) {
    const accepted = [];
    for (const ev of (events || []).filter((e) => isNum(e.seq)).sort(bySeq)) {
      if (ev.seq <= data.lastSeq) continue;
      addEvent(data, ev);
      data.lastSeq = ev.seq;
      accepted.push(ev);
    }
    return accepted;
  }

  // ----------------------------------------------------------- x transforms

  function stepToTokens(step, totalBatchSize) {
    return isNum(totalBatchSize) && totalBatchSize > 0 ? step * totalBatchSize : null;
  }

  function tokensToFlops(tokens, flopsPerToken) {
    return isNum(tokens) && isNum(flopsPerToken) && flopsPerToken > 0 ? tokens * flopsPerToken : null;
  }

  /** Minutes for runs shorter than 3 hours, hours beyond. */
  function timeUnit(spanSeconds) {
    return isNum(spanSeconds) && spanSeconds >= 3 * 3600 ? {label: "h", seconds: 3600} : {label: "min", seconds: 60};
  }

  function elapsed(time, start, unit) {
    return isNum(time) && isNum(start) ? (time - start) / unit.seconds : null;
  }

  /** The run's start (unix seconds): the server's started_ts, else its first event. */
  function runStart(data) {
    const info = data.info || {};
    return isNum(info.started_ts) ? info.started_ts : data.firstTime;
  }

  /** What the x transforms of one stage need: batch size, FLOPs per token, start times. */
  function stageContext(data, stage) {
    const setup = data.setups[stage] || {};
    const info = data.info || {};
    let batch = setup.total_batch_size;
    if (!isNum(batch) && isNum(setup.total_tokens) && isNum(setup.num_iterations) && setup.num_iterations > 0) {
      batch = setup.total_tokens / setup.num_iterations;
    }
    if (!isNum(batch)) batch = info.total_batch_size;
    return {
      batch: isNum(batch) ? batch : null,
      flopsPerToken: isNum(setup.flops_per_token) ? setup.flops_per_token : null,
      runStart: runStart(data),
      stageStart: isNum(data.stageStart[stage]) ? data.stageStart[stage] : null,
    };
  }

  function sameContext(a, b) {
    return a.batch === b.batch && a.flopsPerToken === b.flopsPerToken && a.runStart === b.runStart && a.stageStart === b.stageStart;
  }

  /** The x value of a point (step, time) of a stage for an x mode; null when unknown. */
  function xValue(mode, ctx, step, time, unit) {
    switch (mode) {
      case "tokens":
        return stepToTokens(step, ctx.batch);
      case "flops":
        return tokensToFlops(stepToTokens(step, ctx.batch), ctx.flopsPerToken);
      case "wall":
        return elapsed(time, ctx.runStart, unit);
      case "relative":
        return elapsed(time, ctx.stageStart, unit);
      default:
        return step;
    }
  }

  function xTitle(mode, unit) {
    const title = X_MODES[mode] || X_MODES.step;
    return mode === "wall" || mode === "relative" ? `${title} (${unit.label})` : title;
  }

  // ------------------------------------------------------------- summaries

  /** min / last / best of one field of a series. best is the minimum of the
      smoothed curve (alpha), which a single lucky batch cannot set. */
  function summarize(series, field, alpha) {
    const out = {count: 0, last: null, lastStep: null, min: null, minStep: null, best: null, bestStep: null};
    if (!series) return out;
    const values = series.cols[field] || [];
    const state = emaState();
    for (let i = 0; i < series.n; i++) {
      const v = values[i];
      if (!isNum(v)) continue;
      const step = series.step[i];
      const s = emaPush(state, alpha, step, v);
      out.count++;
      out.last = v;
      out.lastStep = step;
      if (out.min === null || v < out.min) {
        out.min = v;
        out.minStep = step;
      }
      if (out.best === null || s < out.best) {
        out.best = s;
        out.bestStep = step;
      }
    }
    return out;
  }

  /** Seconds left in a stage from the mean step time of its last `window` metrics. */
  function etaSeconds(series, step, total, window = 20) {
    if (!series || !isNum(step) || !isNum(total) || total <= step) return null;
    const dts = series.cols.dt;
    let sum = 0;
    let count = 0;
    for (let i = series.n - 1; i >= 0 && count < window; i--) {
      if (isNum(dts[i])) {
        sum += dts[i];
        count++;
      }
    }
    return count ? (sum / count) * (total - step) : null;
  }

  // ------------------------------------------------------------- formatting

  /** 4 significant digits, exponent for very large or small magnitudes, integers as they are. */
  function formatNumber(v) {
    if (!isNum(v)) return v === null || v === undefined ? "—" : String(v);
    const a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e9) return String(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(3);
    return String(Number(v.toPrecision(4)));
  }

  /** 0.4 s, 12.3 s, 4 m 05 s, 3 h 07 m, 2 d 04 h (as the server formats durations). */
  function formatDuration(seconds) {
    if (!isNum(seconds)) return "";
    const s = Math.max(0, seconds);
    if (s < 60) return `${s.toFixed(1)} s`;
    let minutes = Math.floor(Math.round(s) / 60);
    const secs = Math.round(s) % 60;
    const pad = (n) => String(n).padStart(2, "0");
    if (minutes < 60) return `${minutes} m ${pad(secs)} s`;
    let hours = Math.floor(minutes / 60);
    minutes %= 60;
    if (hours < 48) return `${hours} h ${pad(minutes)} m`;
    const days = Math.floor(hours / 24);
    hours %= 24;
    return `${days} d ${pad(hours)} h`;
  }

  /** Plotly renders trace names as a small HTML subset: show user text literally. */
  function escapeLabel(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function csvCell(v) {
    const s = v === null || v === undefined ? "" : String(v);
    return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }

  /** The points of Plotly traces as CSV: trace,x,y,step (step from customdata). */
  function tracesToCsv(traces) {
    const rows = ["trace,x,y,step"];
    for (const t of traces) {
      const xs = t.x || [];
      for (let i = 0; i < xs.length; i++) {
        const step = t.customdata ? t.customdata[i] : "";
        rows.push([t.name, xs[i], t.y[i], step].map(csvCell).join(","));
      }
    }
    return rows.join("\n") + "\n";
  }

  // ------------------------------------------------------------ chart model

  /** One chart: builds Plotly traces from the sources' series and, later, the
      points added since (for Plotly.extendTraces).

      options: sources() -> [{id, label, data}], settings {alpha, xMode, logY},
      colorBy "stage" (run page) | "run" (compare page), trainerTrace (show the
      trainer's own smoothed loss, hidden until clicked in the legend), theme
      {text, grid}, glThreshold. */
  function ChartModel(spec, options) {
    this.spec = spec;
    this.options = options;
    this.slots = [];
    this.gl = false;
    this.empty = true;
    this.unit = timeUnit(0);
  }

  ChartModel.prototype.seriesList = function () {
    const out = [];
    for (const source of this.options.sources()) {
      const map = this.spec.source === "val" ? source.data.vals : source.data.metrics;
      // Stages get their dash/colour by their order in the run's metrics, so
      // the loss chart and the val chart agree.
      const stages = Array.from(source.data.metrics.keys());
      for (const [stage, series] of map) {
        let index = stages.indexOf(stage);
        if (index < 0) index = stages.length + out.length;
        out.push({source, series, stageIndex: index, stageCount: map.size});
      }
    }
    return out;
  };

  ChartModel.prototype.totalPoints = function (list) {
    return list.reduce((n, item) => n + item.series.n, 0);
  };

  /** The points of a slot's series rows [from, to): raw, smoothed and trainer-smoothed. */
  ChartModel.prototype.collect = function (slot, from, to) {
    const {spec} = this;
    const {alpha, xMode} = this.options.settings;
    const s = slot.series;
    const values = s.cols[spec.field] || [];
    const trainer = spec.trainerField ? s.cols[spec.trainerField] || [] : [];
    const out = {raw: [[], [], []], smooth: [[], [], []], trainer: [[], [], []]};
    for (let i = from; i < to; i++) {
      const v = values[i];
      const step = s.step[i];
      // The EMA follows the metric stream, whatever the x axis can place.
      const sm = isNum(v) && spec.smooth ? emaPush(slot.ema, alpha, step, v) : null;
      const x = xValue(xMode, slot.ctx, step, s.time[i], this.unit);
      if (x === null) continue;
      if (isNum(v)) {
        out.raw[0].push(x); out.raw[1].push(v); out.raw[2].push(step);
        if (sm !== null) {
          out.smooth[0].push(x); out.smooth[1].push(sm); out.smooth[2].push(step);
        }
      }
      if (isNum(trainer[i])) {
        out.trainer[0].push(x); out.trainer[1].push(trainer[i]); out.trainer[2].push(step);
      }
    }
    return out;
  };

  ChartModel.prototype.traceName = function (item) {
    const {colorBy} = this.options;
    if (colorBy === "run") {
      const label = item.source.label || item.source.id;
      return item.stageCount > 1 ? `${label} · ${item.series.stage}` : label;
    }
    return item.series.stage || this.spec.field;
  };

  /** The full figure: {data, layout}. Resets the incremental state. */
  ChartModel.prototype.build = function () {
    const {spec, options} = this;
    const {settings} = options;
    const list = this.seriesList();
    const byRun = options.colorBy === "run";
    let span = 0;
    for (const {source} of list) {
      const start = runStart(source.data);
      if (isNum(source.data.lastTime) && isNum(start)) span = Math.max(span, source.data.lastTime - start);
    }
    this.unit = timeUnit(span);
    this.gl = this.totalPoints(list) > (options.glThreshold || GL_THRESHOLD);
    const type = this.gl ? "scattergl" : "scatter";
    const traces = [];
    this.slots = [];
    for (const item of list) {
      const slot = {
        source: item.source, series: item.series, version: item.series.version, epoch: item.source.data.epoch,
        ctx: stageContext(item.source.data, item.series.stage), ema: emaState(), drawn: item.series.n, idx: {},
      };
      const color = byRun ? colorFor(item.source.id) : PALETTE[item.stageIndex % PALETTE.length];
      const dash = byRun ? DASHES[item.stageIndex % DASHES.length] : "solid";
      const name = escapeLabel(this.traceName(item));
      const group = `${item.source.id}/${item.series.stage}`;
      const pts = this.collect(slot, 0, item.series.n);
      const hover = `%{fullData.name}: %{y:.6g} (step %{customdata})<extra></extra>`;
      const trace = (role, p, extra) => {
        slot.idx[role] = traces.length;
        traces.push(Object.assign({
          type, mode: spec.markers ? "lines+markers" : "lines", name, legendgroup: group,
          x: p[0], y: p[1], customdata: p[2], hovertemplate: hover,
          line: {color, width: 2, dash}, marker: {color, size: 5},
        }, extra));
      };
      if (spec.smooth) {
        // The raw curve first, so it is drawn under the smoothed one as a faint shadow.
        trace("raw", pts.raw, {name: `${name} (raw)`, showlegend: false, opacity: 0.25, line: {color, width: 1, dash}});
        trace("smooth", pts.smooth, {});
      } else {
        trace("raw", pts.raw, {});
      }
      if (spec.trainerField && options.trainerTrace) {
        trace("trainer", pts.trainer, {name: `${name} (trainer smooth_loss)`, visible: "legendonly", line: {color, width: 1.5, dash: "dot"}});
      }
      this.slots.push(slot);
    }
    this.empty = !traces.some((t) => t.x.length > 0);
    return {data: traces, layout: this.layout(traces)};
  };

  ChartModel.prototype.layout = function (traces) {
    const {settings, theme = {}} = this.options;
    const axis = (extra) => Object.assign({
      gridcolor: theme.grid || "rgba(128,128,128,0.2)", zerolinecolor: theme.grid || "rgba(128,128,128,0.3)",
      linecolor: theme.grid || "rgba(128,128,128,0.3)", automargin: true,
    }, extra);
    const legendItems = traces.filter((t) => t.showlegend !== false).length;
    return {
      margin: {l: 50, r: 12, t: 8, b: 36},
      height: 280,
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
      font: {color: theme.text || "#444", size: 11},
      hovermode: "x unified",
      showlegend: legendItems > 1 || this.options.colorBy === "run",
      legend: {orientation: "h", x: 0, y: 1.02, yanchor: "bottom", bgcolor: "rgba(0,0,0,0)"},
      xaxis: axis({
        title: {text: xTitle(settings.xMode, this.unit)},
        exponentformat: settings.xMode === "flops" ? "power" : "SI",
      }),
      yaxis: axis({title: {text: this.spec.yTitle}, type: settings.logY ? "log" : "linear", exponentformat: "SI"}),
      // Keeps the user's zoom across rebuilds, until the x axis itself changes.
      uirevision: settings.xMode,
      annotations: this.empty ? [{
        text: "no data yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5,
        font: {color: theme.muted || "#888", size: 13},
      }] : [],
    };
  };

  /** What changed since the last build or pull:
      null (nothing), {rebuild: true} (new stage, resumed stage, new snapshot,
      context change, crossed the WebGL threshold, first point), or
      {update: {x, y, customdata}, indices} for Plotly.extendTraces. */
  ChartModel.prototype.pull = function () {
    const list = this.seriesList();
    if (list.length !== this.slots.length) return {rebuild: true};
    for (let i = 0; i < list.length; i++) {
      const slot = this.slots[i];
      const item = list[i];
      if (slot.series !== item.series || slot.version !== item.series.version || slot.epoch !== item.source.data.epoch) {
        return {rebuild: true};
      }
      if (slot.drawn < slot.series.n && !sameContext(slot.ctx, stageContext(item.source.data, item.series.stage))) {
        return {rebuild: true};
      }
    }
    if (!this.gl && this.totalPoints(list) > (this.options.glThreshold || GL_THRESHOLD)) return {rebuild: true};
    const update = {x: [], y: [], customdata: []};
    const indices = [];
    for (const slot of this.slots) {
      if (slot.drawn >= slot.series.n) continue;
      const pts = this.collect(slot, slot.drawn, slot.series.n);
      slot.drawn = slot.series.n;
      for (const role of ["raw", "smooth", "trainer"]) {
        if (!(role in slot.idx) || pts[role][0].length === 0) continue;
        indices.push(slot.idx[role]);
        update.x.push(pts[role][0]);
        update.y.push(pts[role][1]);
        update.customdata.push(pts[role][2]);
      }
    }
    if (!indices.length) return null;
    // The "no data yet" note must go: redraw once, then extend as usual.
    if (this.empty) return {rebuild: true};
    return {update, indices};
  };

  // ----------------------------------------------------------------- board

  /** A set of charts drawn with Plotly, sharing sources and settings.

      options: Plotly, charts [{spec, el}], sources(), settings {alpha, xMode,
      logY}, colorBy, trainerTrace, theme, config (extra Plotly config),
      minIntervalMs (default 250), and for tests: schedule
      (requestAnimationFrame), delay (setTimeout), now (Date.now).

      Updates are drawn on an animation frame, and at most once per
      minIntervalMs: extending a WebGL trace costs time proportional to its
      length, so a fast run (tens of steps a second) would otherwise keep the
      page busy redrawing; four redraws a second look just as live. */
  function Board(options) {
    this.Plotly = options.Plotly;
    this.settings = Object.assign({}, DEFAULT_SETTINGS, options.settings);
    this.schedule = options.schedule || ((cb) => (root.requestAnimationFrame ? root.requestAnimationFrame(cb) : setTimeout(cb, 16)));
    this.delay = options.delay || ((cb, ms) => setTimeout(cb, ms));
    this.now = options.now || (() => Date.now());
    this.minIntervalMs = options.minIntervalMs === undefined ? 250 : options.minIntervalMs;
    this.lastFlush = -Infinity;
    this.config = Object.assign({responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"]}, options.config);
    this.pending = false;
    this.charts = options.charts.map(({spec, el}) => ({
      spec, el,
      model: new ChartModel(spec, {
        sources: options.sources, settings: this.settings, colorBy: options.colorBy || "stage",
        trainerTrace: !!options.trainerTrace, theme: options.theme, glThreshold: options.glThreshold,
      }),
    }));
  }

  /** Draw every chart from scratch (a snapshot arrived). */
  Board.prototype.render = function () {
    for (const c of this.charts) {
      const fig = c.model.build();
      this.Plotly.newPlot(c.el, fig.data, fig.layout, this.config);
    }
  };

  /** Recompute every chart from the stored points (smoothing or x axis changed). */
  Board.prototype.redraw = function () {
    for (const c of this.charts) {
      const fig = c.model.build();
      this.Plotly.react(c.el, fig.data, fig.layout, this.config);
    }
  };

  /** New events were stored: draw their points on a coming animation frame. */
  Board.prototype.update = function () {
    if (this.pending) return;
    this.pending = true;
    const draw = () => this.schedule(() => {
      this.pending = false;
      this.lastFlush = this.now();
      this.flush();
    });
    const wait = this.lastFlush + this.minIntervalMs - this.now();
    if (wait > 0) this.delay(draw, wait);
    else draw();
  };

  Board.prototype.flush = function () {
    for (const c of this.charts) {
      const change = c.model.pull();
      if (!change) continue;
      if (change.rebuild) {
        const fig = c.model.build();
        this.Plotly.react(c.el, fig.data, fig.layout, this.config);
      } else {
        this.Plotly.extendTraces(c.el, change.update, change.indices);
      }
    }
  };

  /** Change settings: log-y only relayouts; smoothing and x axis recompute the traces. */
  Board.prototype.setSettings = function (patch) {
    const needsData = ("alpha" in patch && patch.alpha !== this.settings.alpha) ||
      ("xMode" in patch && patch.xMode !== this.settings.xMode);
    Object.assign(this.settings, patch);
    if (needsData) {
      this.redraw();
    } else if ("logY" in patch) {
      const type = this.settings.logY ? "log" : "linear";
      for (const c of this.charts) this.Plotly.relayout(c.el, {"yaxis.type": type, "yaxis.autorange": true});
    }
  };

  // ------------------------------------------------------- browser helpers
  // Shared by run.js and compare.js. They touch the DOM only when called.

  const SETTINGS_KEY = "nanostudio.chart-settings";

  /** The chart settings the user chose last time (any page), else the defaults. */
  function loadSettings(storage) {
    const out = Object.assign({}, DEFAULT_SETTINGS);
    try {
      const saved = JSON.parse((storage || root.localStorage).getItem(SETTINGS_KEY) || "{}");
      if (isNum(saved.alpha) && saved.alpha >= 0 && saved.alpha < 1) out.alpha = saved.alpha;
      if (saved.xMode in X_MODES) out.xMode = saved.xMode;
      if (typeof saved.logY === "boolean") out.logY = saved.logY;
    } catch (err) {
      // no storage (private mode) or a corrupt entry: defaults
    }
    return out;
  }

  function saveSettings(settings, storage) {
    try {
      const {alpha, xMode, logY} = settings;
      (storage || root.localStorage).setItem(SETTINGS_KEY, JSON.stringify({alpha, xMode, logY}));
    } catch (err) {
      // storage full or disabled: settings last for this page only
    }
  }

  /** Whether WebGL runs on a real GPU. Without one (headless browsers, remote
      desktops, VMs) WebGL falls back to a software rasterizer such as
      SwiftShader or llvmpipe, where redrawing a scattergl chart takes about a
      second and freezes the page, while SVG lines stay fast; so the pages use
      scattergl above GL_THRESHOLD points only when this is true. */
  function hardwareWebGL() {
    try {
      const canvas = root.document.createElement("canvas");
      const gl = canvas.getContext("webgl") || canvas.getContext("experimental-webgl");
      if (!gl) return false;
      const info = gl.getExtension("WEBGL_debug_renderer_info");
      const renderer = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER) || "");
      const lose = gl.getExtension("WEBGL_lose_context");
      if (lose) lose.loseContext();  // browsers allow only a few live contexts: give this one back
      return !/swiftshader|llvmpipe|softpipe|software|basic render/i.test(renderer);
    } catch (err) {
      return false;
    }
  }

  /** Chart colours from the stylesheet's variables, so charts follow light/dark mode. */
  function readTheme() {
    const css = root.getComputedStyle(root.document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return {text: v("--text") || "#444", grid: v("--line") || "#ddd", muted: v("--muted") || "#888"};
  }

  function downloadCsv(gd) {
    const blob = new Blob([tracesToCsv(gd.data || [])], {type: "text/csv"});
    const a = root.document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${gd.id || "chart"}.csv`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  /** Plotly config with a "Download CSV" button next to the PNG one. */
  function plotlyConfig(Plotly) {
    const icon = Plotly && Plotly.Icons && Plotly.Icons.disk;
    return icon ? {modeBarButtonsToAdd: [{name: "Download data as CSV", icon, click: downloadCsv}]} : {};
  }

  /** Wire the smoothing slider, log-y checkbox and x-axis select to a board.
      els: {smoothing, smoothingValue, logY, xAxis}; onChange(settings) runs after each change. */
  function bindControls(board, els, onChange) {
    const settings = board ? board.settings : loadSettings();
    const changed = (patch) => {
      if (board) board.setSettings(patch);
      else Object.assign(settings, patch);
      saveSettings(settings);
      if (onChange) onChange(settings);
    };
    const showAlpha = () => {
      if (els.smoothingValue) els.smoothingValue.textContent = Number(els.smoothing.value).toFixed(3);
    };
    if (els.smoothing) {
      els.smoothing.value = String(settings.alpha);
      showAlpha();
      // Dragging fires many input events: recompute at most once per frame.
      let queued = false;
      els.smoothing.addEventListener("input", () => {
        showAlpha();
        if (queued) return;
        queued = true;
        root.requestAnimationFrame(() => {
          queued = false;
          changed({alpha: Number(els.smoothing.value)});
        });
      });
    }
    if (els.logY) {
      els.logY.checked = settings.logY;
      els.logY.addEventListener("change", () => changed({logY: els.logY.checked}));
    }
    if (els.xAxis) {
      els.xAxis.value = settings.xMode;
      els.xAxis.addEventListener("change", () => changed({xMode: els.xAxis.value}));
    }
    return settings;
  }

  const NanoCharts = {
    PALETTE, CHARTS, X_MODES, METRIC_FIELDS, GL_THRESHOLD, DEFAULT_SETTINGS,
    loadSettings, saveSettings, readTheme, plotlyConfig, bindControls, hardwareWebGL,
    hashString, colorFor,
    emaState, emaPush, emaSeries,
    createRunData, applySnapshot, applyEvents,
    stepToTokens, tokensToFlops, timeUnit, runStart, stageContext, xValue, xTitle,
    summarize, etaSeconds, formatNumber, formatDuration, escapeLabel, tracesToCsv,
    ChartModel, Board,
  };
  root.NanoCharts = NanoCharts;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoCharts;
})(typeof window !== "undefined" ? window : globalThis);
