// Unit tests of static/js/charts.js. Run: node --test tests/js/
import test from "node:test";
import assert from "node:assert/strict";
import {createRequire} from "node:module";

const require = createRequire(import.meta.url);
const C = require("../../static/js/charts.js");

const close = (a, b, eps = 1e-12) => assert.ok(Math.abs(a - b) <= eps * Math.max(1, Math.abs(b)), `${a} != ${b}`);

function metric(seq, step, loss, extra = {}) {
  return {seq, time: 1000 + step, stage: "base_train", kind: "metric", step, loss, smooth_loss: loss, lrm: 1, dt: 0.5,
    tok_per_sec: 100, mfu: 10, peak_mem_mb: 50, ...extra};
}

function snapshot(events, run = {id: "r1", started_ts: 1000, total_batch_size: 8}) {
  return {type: "snapshot", run, events, last_seq: events.length ? events[events.length - 1].seq : 0};
}

// A fake Plotly that records calls and keeps `data` on the element like the real one.
function fakePlotly() {
  const calls = [];
  return {
    calls,
    newPlot(el, data, layout) { calls.push(["newPlot", el.id]); el.data = data.map((t) => ({...t, x: [...t.x], y: [...t.y]})); el.layout = layout; },
    react(el, data, layout) { calls.push(["react", el.id]); el.data = data.map((t) => ({...t, x: [...t.x], y: [...t.y]})); el.layout = layout; },
    extendTraces(el, update, indices) {
      calls.push(["extendTraces", el.id, indices]);
      indices.forEach((i, k) => { el.data[i].x.push(...update.x[k]); el.data[i].y.push(...update.y[k]); });
    },
    relayout(el, patch) { calls.push(["relayout", el.id, patch]); },
  };
}

function board(data, Plotly, settings = {}) {
  const el = {id: "chart-loss"};
  const b = new C.Board({
    Plotly, charts: [{spec: C.CHARTS[0], el}], sources: () => [{id: data.id, label: data.id, data}],
    settings, trainerTrace: true, schedule: (cb) => cb(), minIntervalMs: 0,
  });
  return {b, el};
}

test("the first smoothed value equals the first raw value (de-biased EMA)", () => {
  const s = C.emaState();
  assert.equal(C.emaPush(s, 0.99, 0, 7.5), 7.5);
});

test("a constant series stays constant under smoothing", () => {
  for (const v of C.emaSeries([1, 2, 3, 10, 50], [4, 4, 4, 4, 4], 0.95)) close(v, 4);
});

test("two points 10 steps apart smooth like 10 equal points at every step", () => {
  const sparse = C.emaSeries([0, 10], [5, 2], 0.9);
  const steps = Array.from({length: 11}, (_, i) => i);
  const dense = C.emaSeries(steps, [5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2], 0.9);
  close(sparse[1], dense[10]);
});

test("a down-sampled history ends where the full-rate history ends", () => {
  const steps = Array.from({length: 1000}, (_, i) => i + 1);
  const values = steps.map((s) => 3 + 5 / s);  // a smooth curve: down-sampling it loses little
  const full = C.emaSeries(steps, values, 0.9);
  const every10 = C.emaSeries(steps.filter((s) => s % 10 === 0), values.filter((_, i) => (i + 1) % 10 === 0), 0.9);
  assert.ok(Math.abs(full[999] - every10[99]) < 1e-3, `${full[999]} vs ${every10[99]}`);
});

test("zero smoothing returns the raw values", () => {
  assert.deepEqual(C.emaSeries([1, 2, 3], [3, 1, 2], 0), [3, 1, 2]);
});

test("incremental smoothing equals batch smoothing", () => {
  const steps = [1, 2, 5, 6, 20, 21, 22, 100];
  const values = [9, 7, 6.5, 6, 5, 5.2, 4.9, 3];
  const batch = C.emaSeries(steps, values, 0.8);
  const state = C.emaState();
  steps.forEach((step, i) => close(C.emaPush(state, 0.8, step, values[i]), batch[i]));
});

test("non-numeric values are skipped by the smoother", () => {
  const withGap = C.emaSeries([1, 2, 3], [4, null, 2], 0.5);
  assert.equal(withGap[1], null);
  close(withGap[2], C.emaSeries([1, 3], [4, 2], 0.5)[1]);
});

test("events replayed after a snapshot are dropped by seq", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 2, 4), metric(3, 3, 3)]));
  const accepted = C.applyEvents(data, [metric(2, 2, 4), metric(3, 3, 3), metric(4, 4, 2.5), metric(5, 5, 2)]);
  assert.deepEqual(accepted.map((e) => e.seq), [4, 5]);
  assert.deepEqual(data.metrics.get("base_train").step, [1, 2, 3, 4, 5]);
  assert.equal(data.lastSeq, 5);
});

test("a snapshot replaces what the run had", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 2, 4)]));
  C.applyEvents(data, [{seq: 3, kind: "eval", stage: "tok_eval", name: "tokenizer", ratio: 4.1}]);
  const epoch = data.epoch;
  C.applySnapshot(data, snapshot([metric(10, 100, 2)]));
  assert.deepEqual(data.metrics.get("base_train").step, [100]);
  assert.equal(data.evals.length, 0);
  assert.equal(data.lastSeq, 10);
  assert.equal(data.epoch, epoch + 1);
});

test("a snapshot's last_seq counts even when its last events were not charted", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, {run: {}, events: [metric(1, 1, 5)], last_seq: 9});
  assert.deepEqual(C.applyEvents(data, [metric(9, 9, 1), metric(10, 10, 1)]).map((e) => e.seq), [10]);
});

test("a resumed stage replaces the steps it repeats", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 2, 4), metric(3, 3, 3.5), metric(4, 4, 3.4)]));
  const series = data.metrics.get("base_train");
  const version = series.version;
  C.applyEvents(data, [{seq: 5, kind: "resume", stage: "base_train", step: 2}, metric(6, 3, 3.6)]);
  assert.deepEqual(series.step, [1, 2, 3]);
  assert.deepEqual(series.cols.loss, [5, 4, 3.6]);
  assert.equal(series.version, version + 1);
});

test("events are sorted into metrics, val bpb, other evals and samples", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([
    {seq: 1, kind: "metric", stage: "tok_train", chars: 10, fraction: 0.5},
    {seq: 2, kind: "setup", stage: "base_train", flops_per_token: 100},
    metric(3, 1, 5),
    {seq: 4, kind: "eval", stage: "base_train", name: "val_bpb", step: 1, val_bpb: 2.5},
    {seq: 5, kind: "eval", stage: "tok_eval", name: "tokenizer", ratio: 4},
    {seq: 6, kind: "sample", stage: "base_train", step: 1, samples: [{prompt: "a", completion: "b"}]},
  ]));
  assert.deepEqual([...data.metrics.keys()], ["base_train"]);
  assert.deepEqual(data.vals.get("base_train").cols.val_bpb, [2.5]);
  assert.deepEqual(data.evals.map((e) => e.name), ["tokenizer"]);
  assert.equal(data.samples.length, 1);
  assert.equal(data.setups.base_train.flops_per_token, 100);
});

test("tokens are steps times the total batch size", () => {
  assert.equal(C.stepToTokens(120, 524288), 62914560);
  assert.equal(C.stepToTokens(120, undefined), null);
});

test("FLOPs are tokens times the stage's flops per token", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([{seq: 1, kind: "setup", stage: "base_train", flops_per_token: 1.5e7}, metric(2, 10, 3)],
    {started_ts: 1000, total_batch_size: 2048}));
  const ctx = C.stageContext(data, "base_train");
  assert.equal(C.xValue("tokens", ctx, 10, 0, C.timeUnit(0)), 20480);
  assert.equal(C.xValue("flops", ctx, 10, 0, C.timeUnit(0)), 20480 * 1.5e7);
});

test("the setup event's batch size wins over the run's", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([{seq: 1, kind: "setup", stage: "base_train", total_tokens: 4000, num_iterations: 10}],
    {total_batch_size: 8}));
  assert.equal(C.stageContext(data, "base_train").batch, 400);
});

test("wall time is measured from the run start, in minutes or hours", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([metric(1, 1, 5)], {started_ts: 1000}));
  const ctx = C.stageContext(data, "base_train");
  assert.equal(C.xValue("wall", ctx, 1, 1000 + 90, C.timeUnit(600)), 1.5);
  assert.equal(C.xValue("wall", ctx, 1, 1000 + 5400, C.timeUnit(4 * 3600)), 1.5);
  assert.equal(C.timeUnit(4 * 3600).label, "h");
});

test("relative time is measured from the stage's first event", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([
    {seq: 1, time: 1000, kind: "stage_start", stage: "tok_train"},
    {seq: 2, time: 1600, kind: "stage_start", stage: "base_train"},
  ], {started_ts: 1000}));
  assert.equal(C.xValue("relative", C.stageContext(data, "base_train"), 5, 1720, C.timeUnit(0)), 2);
  assert.equal(C.xValue("wall", C.stageContext(data, "base_train"), 5, 1720, C.timeUnit(0)), 12);
});

test("a run keeps its colour across calls and ids spread over the palette", () => {
  const id = "20261124-101500-3fa9c1";
  assert.equal(C.colorFor(id), C.colorFor(String(id)));
  assert.ok(C.PALETTE.includes(C.colorFor(id)));
  const colours = new Set(Array.from({length: 40}, (_, i) => C.colorFor(`20261124-1015${String(i).padStart(2, "0")}-abc`)));
  assert.ok(colours.size >= 6, `only ${colours.size} colours for 40 ids`);
});

test("summaries give min, last and best (minimum of the smoothed curve)", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 2, 1), metric(3, 3, 4), metric(4, 4, 3)]));
  const s = C.summarize(data.metrics.get("base_train"), "loss", 0);
  assert.deepEqual([s.min, s.minStep, s.last, s.lastStep, s.count], [1, 2, 3, 4, 4]);
  assert.equal(s.best, 1);  // without smoothing best == min
  const smoothed = C.summarize(data.metrics.get("base_train"), "loss", 0.9);
  assert.ok(smoothed.best > 1);
});

test("the ETA is the mean recent step time times the steps left", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([metric(1, 1, 5, {dt: 1}), metric(2, 2, 5, {dt: 3})]));
  assert.equal(C.etaSeconds(data.metrics.get("base_train"), 2, 12), 20);
  assert.equal(C.etaSeconds(data.metrics.get("base_train"), 12, 12), null);
});

test("numbers and durations are formatted compactly", () => {
  assert.equal(C.formatNumber(1229), "1229");
  assert.equal(C.formatNumber(3.14159), "3.142");
  assert.equal(C.formatNumber(1.2e-5), "1.200e-5");
  assert.equal(C.formatNumber(null), "—");
  assert.equal(C.formatDuration(245), "4 m 05 s");
  assert.equal(C.formatDuration(3 * 3600 + 7 * 60), "3 h 07 m");
  assert.equal(C.formatDuration(0.4), "0.4 s");
});

test("trace names cannot inject markup into Plotly labels", () => {
  assert.equal(C.escapeLabel("<b>x</b> & y"), "&lt;b&gt;x&lt;/b&gt; &amp; y");
});

test("CSV export lists every point with its step", () => {
  const csv = C.tracesToCsv([{name: "a,b", x: [1, 2], y: [3, 4], customdata: [10, 20]}]);
  assert.equal(csv, 'trace,x,y,step\n"a,b",1,3,10\n"a,b",2,4,20\n');
});

test("the loss chart draws the raw shadow under the smoothed curve, trainer curve hidden", () => {
  const data = C.createRunData("r1");
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 2, 4)]));
  const model = new C.ChartModel(C.CHARTS[0], {sources: () => [{id: "r1", data}], settings: {alpha: 0.5, xMode: "step"}, trainerTrace: true});
  const fig = model.build();
  assert.equal(fig.data.length, 3);
  assert.ok(fig.data[0].opacity < 0.5 && fig.data[0].showlegend === false);
  assert.deepEqual(fig.data[0].y, [5, 4]);
  close(fig.data[1].y[1], (0.25 * 5 + 0.5 * 4) / 0.75);  // de-biased: weights 0.25 and 0.5 over their sum
  assert.equal(fig.data[2].visible, "legendonly");
});

test("live events extend the traces with only their points, once per frame", () => {
  const data = C.createRunData("r1");
  const Plotly = fakePlotly();
  const {b, el} = board(data, Plotly);
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 2, 4)]));
  b.render();
  C.applyEvents(data, [metric(3, 3, 3)]);
  C.applyEvents(data, [metric(4, 4, 2)]);
  const frames = [];
  b.schedule = (cb) => frames.push(cb);
  b.update();
  b.update();
  assert.equal(frames.length, 1);
  frames[0]();
  assert.deepEqual(Plotly.calls.map((c) => c[0]), ["newPlot", "extendTraces"]);
  assert.deepEqual(el.data[0].x, [1, 2, 3, 4]);
});

test("incrementally drawn curves equal a fresh drawing of the same points", () => {
  const data = C.createRunData("r1");
  const Plotly = fakePlotly();
  const {b, el} = board(data, Plotly, {alpha: 0.9});
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 10, 4)]));
  b.render();
  for (let i = 3; i < 30; i++) {
    C.applyEvents(data, [metric(i, 8 + i, 4 - i / 20)]);
    b.update();
  }
  const live = el.data.map((t) => t.y);
  b.render();
  assert.deepEqual(live.length, el.data.length);
  live.forEach((ys, t) => ys.forEach((y, i) => close(y, el.data[t].y[i])));
});

test("a new stage or a resumed stage redraws the chart instead of extending it", () => {
  const data = C.createRunData("r1");
  const Plotly = fakePlotly();
  const {b} = board(data, Plotly);
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 2, 4)]));
  b.render();
  C.applyEvents(data, [{...metric(3, 1, 3), stage: "mid_train"}]);
  b.update();
  C.applyEvents(data, [metric(4, 2, 3.9)]);
  b.update();
  assert.deepEqual(Plotly.calls.map((c) => c[0]), ["newPlot", "react", "react"]);
});

test("lines switch to WebGL above 2,000 points", () => {
  const data = C.createRunData("r1");
  const events = Array.from({length: 2001}, (_, i) => metric(i + 1, i + 1, 3));
  C.applySnapshot(data, snapshot(events));
  const model = new C.ChartModel(C.CHARTS[0], {sources: () => [{id: "r1", data}], settings: {alpha: 0.9, xMode: "step"}});
  assert.equal(model.build().data[0].type, "scattergl");
});

test("changing the smoothing recomputes from the stored points; log-y only relayouts", () => {
  const data = C.createRunData("r1");
  const Plotly = fakePlotly();
  const {b, el} = board(data, Plotly, {alpha: 0});
  C.applySnapshot(data, snapshot([metric(1, 1, 5), metric(2, 2, 1)]));
  b.render();
  assert.deepEqual(el.data[1].y, [5, 1]);
  b.setSettings({alpha: 0.9});
  assert.ok(el.data[1].y[1] > 1);
  b.setSettings({logY: true});
  assert.deepEqual(Plotly.calls.map((c) => c[0]), ["newPlot", "react", "relayout"]);
});

test("the compare page colours each run with its own colour and names it by label", () => {
  const a = C.createRunData("run-a");
  const z = C.createRunData("run-z");
  C.applySnapshot(a, snapshot([metric(1, 1, 5)]));
  C.applySnapshot(z, snapshot([metric(1, 1, 4)]));
  const model = new C.ChartModel(C.CHARTS[0], {
    sources: () => [{id: "run-a", label: "A <1>", data: a}, {id: "run-z", label: "Z", data: z}],
    settings: {alpha: 0.9, xMode: "step"}, colorBy: "run",
  });
  const smooth = model.build().data.filter((t) => t.showlegend !== false);
  assert.deepEqual(smooth.map((t) => t.name), ["A &lt;1&gt;", "Z"]);
  assert.deepEqual(smooth.map((t) => t.line.color), [C.colorFor("run-a"), C.colorFor("run-z")]);
});

test("live redraws wait for the minimum interval since the last one", () => {
  const data = C.createRunData("r1");
  const Plotly = fakePlotly();
  let now = 1000;
  const delays = [];
  const b = new C.Board({
    Plotly, charts: [{spec: C.CHARTS[0], el: {id: "chart-loss"}}], sources: () => [{id: "r1", data}],
    schedule: (cb) => cb(), now: () => now, delay: (cb, ms) => delays.push([cb, ms]), minIntervalMs: 250,
  });
  C.applySnapshot(data, snapshot([metric(1, 1, 5)]));
  b.render();
  C.applyEvents(data, [metric(2, 2, 4)]);
  b.update();  // the first update draws at once
  now += 100;
  C.applyEvents(data, [metric(3, 3, 3)]);
  b.update();
  b.update();
  assert.deepEqual(delays.map(([, ms]) => ms), [150]);
  assert.equal(Plotly.calls.filter((c) => c[0] === "extendTraces").length, 1);
  delays[0][0]();
  assert.equal(Plotly.calls.filter((c) => c[0] === "extendTraces").length, 2);
});
