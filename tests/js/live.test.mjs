// Tests of static/js/live.js against a fake WebSocket and a fake clock. Run: node --test tests/js/
import test from "node:test";
import assert from "node:assert/strict";
import {createRequire} from "node:module";

const require = createRequire(import.meta.url);
const NanoLive = require("../../static/js/live.js");

/** A manual clock: setTimeout registers, tick(ms) fires what is due. */
function fakeClock() {
  let now = 0;
  let nextId = 1;
  const timers = new Map();
  return {
    setTimeout(fn, ms) {
      const id = nextId++;
      timers.set(id, {fn, at: now + ms});
      return id;
    },
    clearTimeout(id) {
      timers.delete(id);
    },
    tick(ms) {
      const end = now + ms;
      for (;;) {
        const due = [...timers.entries()].filter(([, t]) => t.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
        if (!due) break;
        timers.delete(due[0]);
        now = due[1].at;
        due[1].fn();
      }
      now = end;
    },
    get now() {
      return now;
    },
  };
}

/** A WebSocket the test drives: open(), receive(msg), serverClose(code). */
function fakeSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedByClient = null;
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code) {
      this.closedByClient = code;
      this.readyState = 3;
    }
    open() {
      this.readyState = 1;
      this.onopen && this.onopen({});
    }
    receive(msg) {
      this.onmessage && this.onmessage({data: JSON.stringify(msg)});
    }
    serverClose(code = 1006, reason = "") {
      this.readyState = 3;
      this.onclose && this.onclose({code, reason});
    }
  }
  return {FakeWebSocket, sockets};
}

function setup(handlers = {}) {
  const clock = fakeClock();
  const {FakeWebSocket, sockets} = fakeSocketClass();
  const states = [];
  const conn = NanoLive.connect("/ws/runs/r1/", {onState: (s, d) => states.push([s, d]), ...handlers}, {
    WebSocket: FakeWebSocket, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
  });
  return {clock, sockets, states, conn};
}

const ev = (seq) => ({seq, kind: "metric", stage: "base_train", step: seq});

test("the first hello asks for a snapshot with after null", () => {
  const {sockets} = setup();
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, [{type: "hello", after: null}]);
});

test("a reconnect says hello with the last seq it has", () => {
  const {sockets, clock} = setup();
  sockets[0].open();
  sockets[0].receive({type: "snapshot", run: {}, events: [ev(1), ev(2)], last_seq: 5});
  sockets[0].receive({type: "events", events: [ev(6), ev(7)], last_seq: 7});
  sockets[0].serverClose(1006);
  clock.tick(1000);
  assert.equal(sockets.length, 2);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent, [{type: "hello", after: 7}]);
});

test("an empty run reconnects with after 0, not null", () => {
  const {sockets, clock} = setup();
  sockets[0].open();
  sockets[0].receive({type: "snapshot", run: {}, events: [], last_seq: 0});
  sockets[0].serverClose(1006);
  clock.tick(1000);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent, [{type: "hello", after: 0}]);
});

test("events at or below the last seq are dropped", () => {
  const got = [];
  const {sockets} = setup({onEvents: (events) => got.push(events.map((e) => e.seq))});
  sockets[0].open();
  sockets[0].receive({type: "snapshot", run: {}, events: [ev(1), ev(2), ev(3)], last_seq: 3});
  sockets[0].receive({type: "events", events: [ev(2), ev(3), ev(4)], last_seq: 4});
  sockets[0].receive({type: "events", events: [ev(4)], last_seq: 4});
  assert.deepEqual(got, [[4]]);
});

test("reconnect delays back off 1, 2, 4, 8, 15, 15 seconds", () => {
  const {sockets, clock, states} = setup();
  for (let i = 0; i < 6; i++) {
    sockets[i].serverClose(1006);  // each attempt fails at once
    clock.tick(15000);
  }
  const delays = states.filter(([s, d]) => s === "reconnecting" && d.delay).map(([, d]) => d.delay);
  assert.deepEqual(delays, [1000, 2000, 4000, 8000, 15000, 15000]);
});

test("a message from the server resets the backoff", () => {
  const {sockets, clock, states} = setup();
  sockets[0].serverClose(1006);
  clock.tick(1000);
  sockets[1].serverClose(1006);
  clock.tick(2000);
  sockets[2].open();
  sockets[2].receive({type: "snapshot", run: {}, events: [], last_seq: 0});
  sockets[2].serverClose(1006);
  const delays = states.filter(([s, d]) => s === "reconnecting" && d.delay).map(([, d]) => d.delay);
  assert.deepEqual(delays, [1000, 2000, 1000]);
});

test("30 seconds of silence drops the socket and reconnects", () => {
  const {sockets, clock} = setup();
  sockets[0].open();
  sockets[0].receive({type: "snapshot", run: {}, events: [ev(1)], last_seq: 1});
  clock.tick(29000);
  sockets[0].receive({type: "ping", time: 1});
  clock.tick(29000);
  assert.equal(sockets.length, 1);  // the ping kept it alive
  clock.tick(1000);
  assert.notEqual(sockets[0].closedByClient, null);
  clock.tick(1000);
  assert.equal(sockets.length, 2);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent, [{type: "hello", after: 1}]);
});

test("pings are answered with pong", () => {
  const {sockets} = setup();
  sockets[0].open();
  sockets[0].receive({type: "ping", time: 1764000000.5});
  assert.deepEqual(sockets[0].sent.at(-1), {type: "pong"});
});

test("close code 4401 stops reconnecting and says why", () => {
  const {sockets, clock, states} = setup();
  sockets[0].open();
  sockets[0].serverClose(4401);
  clock.tick(60000);
  assert.equal(sockets.length, 1);
  const [state, detail] = states.at(-1);
  assert.equal(state, "closed");
  assert.equal(detail.code, 4401);
  assert.match(detail.reason, /login/);
});

test("close code 4404 stops reconnecting", () => {
  const {sockets, clock, states} = setup();
  sockets[0].open();
  sockets[0].serverClose(4404);
  clock.tick(60000);
  assert.equal(sockets.length, 1);
  assert.match(states.at(-1)[1].reason, /not found/);
});

test("the state goes connecting, live, reconnecting, live", () => {
  const {sockets, clock, states} = setup();
  sockets[0].open();
  sockets[0].receive({type: "snapshot", run: {}, events: [], last_seq: 0});
  sockets[0].serverClose(1006);
  clock.tick(1000);
  sockets[1].open();
  sockets[1].receive({type: "events", events: [], last_seq: 0});
  const names = states.map(([s]) => s).filter((s, i, a) => s !== a[i - 1]);
  assert.deepEqual(names, ["connecting", "live", "reconnecting", "live"]);
});

test("run, log and report messages reach their handlers", () => {
  const seen = [];
  const {sockets} = setup({
    onRun: (run) => seen.push(["run", run.status]),
    onLog: (msg) => seen.push(["log", msg.lines.length]),
    onReport: (html) => seen.push(["report", html]),
  });
  sockets[0].open();
  sockets[0].receive({type: "run", run: {status: "running"}});
  sockets[0].receive({type: "log", stage: "base_train", lines: ["a", "b"], reset: false});
  sockets[0].receive({type: "report", html: "<p>ok</p>"});
  assert.deepEqual(seen, [["run", "running"], ["log", 2], ["report", "<p>ok</p>"]]);
});

test("a failing handler does not break the connection", () => {
  const got = [];
  const {sockets} = setup({
    onSnapshot: () => { throw new Error("page bug"); },
    onEvents: (events) => got.push(...events.map((e) => e.seq)),
  });
  const original = console.error;
  console.error = () => {};
  try {
    sockets[0].open();
    sockets[0].receive({type: "snapshot", run: {}, events: [ev(1)], last_seq: 1});
    sockets[0].receive({type: "events", events: [ev(2)], last_seq: 2});
  } finally {
    console.error = original;
  }
  assert.deepEqual(got, [2]);
});

test("two connections on one page keep separate positions", () => {
  const clock = fakeClock();
  const {FakeWebSocket, sockets} = fakeSocketClass();
  const opts = {WebSocket: FakeWebSocket, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout};
  NanoLive.connect("/ws/runs/a/", {}, opts);
  NanoLive.connect("/ws/runs/b/", {}, opts);
  sockets[0].open();
  sockets[1].open();
  sockets[0].receive({type: "snapshot", run: {}, events: [], last_seq: 10});
  sockets[1].receive({type: "snapshot", run: {}, events: [], last_seq: 3});
  sockets[0].serverClose(1006);
  sockets[1].serverClose(1006);
  clock.tick(1000);
  sockets[2].open();
  sockets[3].open();
  assert.deepEqual([sockets[2].url, sockets[2].sent[0].after], ["/ws/runs/a/", 10]);
  assert.deepEqual([sockets[3].url, sockets[3].sent[0].after], ["/ws/runs/b/", 3]);
});

test("close() stops the connection for good", () => {
  const {sockets, clock, conn} = setup();
  sockets[0].open();
  conn.close();
  clock.tick(60000);
  assert.equal(sockets.length, 1);
  assert.equal(conn.state, "closed");
});

test("socket URLs follow the page's scheme and host", () => {
  assert.equal(NanoLive.socketUrl("/ws/runs/x/", {protocol: "https:", host: "studio:8443"}), "wss://studio:8443/ws/runs/x/");
  assert.equal(NanoLive.socketUrl("/ws/runs/x/", {protocol: "http:", host: "localhost:8000"}), "ws://localhost:8000/ws/runs/x/");
});
