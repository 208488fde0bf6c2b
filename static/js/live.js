/* live.js: the WebSocket client of the run-page protocol (window.NanoLive).

   const conn = NanoLive.connect("/ws/runs/<id>/", {
     onSnapshot(msg) {},        // replace everything you had
     onEvents(events, msg) {},  // only events newer than the last seq seen
     onRun(run) {}, onLog(msg) {}, onReport(html) {},
     onMessage(msg) {},         // every message, after the specific handler
     onState(state, detail) {}, // "connecting" | "live" | "reconnecting" | "closed"
   });
   conn.close();
   conn.send({...});              // false while the link is down

   Other protocols pass options.onOpen(send), called on every (re)connect instead of the hello
   (the chat page opens its conversation there); every message still reaches onMessage.

   The client says hello with `after: null` the first time and `after: <last
   seq>` on every reconnect, so the server can resume the stream without gaps;
   duplicates across a reconnect are dropped by seq. 30 s without any message
   (the server pings every 10 s) counts as a dead connection: the socket is
   dropped and reopened with backoff 1, 2, 4 ... 15 s. Close codes 4401 (not
   logged in), 4404 (unknown run) and 4400 (protocol error) are final:
   retrying cannot help.

   Each connect() call is independent, so a page may hold several (the
   compare page opens one per run). Timers and the WebSocket class can be
   injected through the third argument, which the node tests use.
*/
(function (root) {
  "use strict";

  const HEARTBEAT_MS = 30000;
  const MIN_DELAY_MS = 1000;
  const MAX_DELAY_MS = 15000;

  // Close codes after which reconnecting cannot help, with what to tell the user.
  const FINAL_CLOSE = {
    4400: "protocol error (reload the page)",
    4401: "login required: sign in and reload the page",
    4403: "permission denied",
    4404: "run not found",
  };

  /** Delay before reconnect attempt `attempt` (0-based): 1, 2, 4, 8, 15, 15 ... s. */
  function backoffDelay(attempt, minMs = MIN_DELAY_MS, maxMs = MAX_DELAY_MS) {
    return Math.min(maxMs, minMs * Math.pow(2, attempt));
  }

  /** A ws:// or wss:// URL for a path, on the page's own host. */
  function socketUrl(path, loc) {
    if (/^wss?:\/\//.test(path)) return path;
    const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${loc.host}${path.startsWith("/") ? "" : "/"}${path}`;
  }

  function isNum(v) {
    return typeof v === "number" && Number.isFinite(v);
  }

  function connect(url, handlers = {}, options = {}) {
    const WS = options.WebSocket || root.WebSocket;
    const setTimer = options.setTimeout || ((fn, ms) => setTimeout(fn, ms));
    const clearTimer = options.clearTimeout || ((id) => clearTimeout(id));
    const heartbeatMs = options.heartbeatMs || HEARTBEAT_MS;
    const minDelayMs = options.minDelayMs || MIN_DELAY_MS;
    const maxDelayMs = options.maxDelayMs || MAX_DELAY_MS;
    const fullUrl = root.location ? socketUrl(url, root.location) : url;

    let ws = null;
    let lastSeq = null;  // null until the first snapshot: hello asks for one
    let attempt = 0;
    let stopped = false;
    let connectedOnce = false;
    let gotMessage = false;
    let watchdog = null;
    let retry = null;
    let state = null;

    function call(name, ...args) {
      const fn = handlers[name];
      if (typeof fn !== "function") return;
      try {
        fn(...args);
      } catch (err) {
        // A bug in a page handler must not kill the connection.
        if (root.console) root.console.error(`NanoLive ${name} handler failed`, err);
      }
    }

    function setState(next, detail = {}) {
      state = next;
      call("onState", next, detail);
    }

    function send(msg) {
      if (!ws || ws.readyState !== 1) return false;
      ws.send(JSON.stringify(msg));
      return true;
    }

    function armWatchdog() {
      if (watchdog !== null) clearTimer(watchdog);
      watchdog = setTimer(() => {
        watchdog = null;
        drop();
        scheduleReconnect({reason: "no message for 30 s"});
      }, heartbeatMs);
    }

    /** Forget the current socket without waiting for its close handshake (a dead link may never finish it). */
    function drop() {
      if (watchdog !== null) {
        clearTimer(watchdog);
        watchdog = null;
      }
      const old = ws;
      ws = null;
      if (!old) return;
      old.onopen = old.onmessage = old.onclose = old.onerror = null;
      try {
        old.close(4000, "client closing");
      } catch (err) {
        // already closed
      }
    }

    function scheduleReconnect(detail) {
      if (stopped) return;
      const delay = backoffDelay(attempt, minDelayMs, maxDelayMs);
      attempt++;
      setState("reconnecting", Object.assign({delay}, detail));
      retry = setTimer(() => {
        retry = null;
        open();
      }, delay);
    }

    function open() {
      if (stopped) return;
      gotMessage = false;
      setState(connectedOnce ? "reconnecting" : "connecting", {attempt});
      let sock;
      try {
        sock = new WS(fullUrl);
      } catch (err) {
        scheduleReconnect({reason: String(err)});
        return;
      }
      ws = sock;
      armWatchdog();  // also bounds a connection attempt that never opens
      sock.onopen = () => {
        connectedOnce = true;
        armWatchdog();
        // The run protocol starts with hello; another protocol (the chat page) says what it sends.
        if (options.onOpen) options.onOpen(send);
        else send({type: "hello", after: lastSeq});
      };
      sock.onmessage = (e) => {
        armWatchdog();
        receive(e.data);
      };
      sock.onerror = () => {};  // a close event follows and decides
      sock.onclose = (e) => {
        drop();
        const code = e && e.code;
        if (stopped) return;
        if (FINAL_CLOSE[code]) {
          stopped = true;
          setState("closed", {code, reason: FINAL_CLOSE[code]});
          return;
        }
        scheduleReconnect({code, reason: (e && e.reason) || "connection closed"});
      };
    }

    function receive(text) {
      let msg;
      try {
        msg = JSON.parse(text);
      } catch (err) {
        return;
      }
      if (!msg || typeof msg !== "object") return;
      if (!gotMessage) {
        // The server answered our hello: the link works, so the next failure starts the backoff over.
        gotMessage = true;
        attempt = 0;
        setState("live");
      }
      switch (msg.type) {
        case "snapshot": {
          let seq = isNum(msg.last_seq) ? msg.last_seq : 0;
          for (const ev of msg.events || []) if (isNum(ev.seq) && ev.seq > seq) seq = ev.seq;
          lastSeq = seq;
          call("onSnapshot", msg);
          break;
        }
        case "events": {
          const fresh = [];
          const sorted = (msg.events || []).filter((ev) => isNum(ev.seq)).sort((a, b) => a.seq - b.seq);
          for (const ev of sorted) {
            if (lastSeq !== null && ev.seq <= lastSeq) continue;
            fresh.push(ev);
            lastSeq = ev.seq;
          }
          if (isNum(msg.last_seq) && (lastSeq === null || msg.last_seq > lastSeq)) lastSeq = msg.last_seq;
          if (fresh.length) call("onEvents", fresh, msg);
          break;
        }
        case "ping":
          send({type: "pong"});
          break;
        case "run":
          call("onRun", msg.run);
          break;
        case "log":
          call("onLog", msg);
          break;
        case "report":
          call("onReport", msg.html || "");
          break;
        default:
          break;
      }
      call("onMessage", msg);
    }

    open();

    return {
      /** Close for good (the page is going away or no longer needs the run). */
      close() {
        stopped = true;
        if (retry !== null) clearTimer(retry);
        retry = null;
        drop();
        setState("closed", {reason: "closed by the page"});
      },
      /** Skip the backoff wait (the browser is back online). */
      reconnectNow() {
        if (stopped || retry === null) return;
        clearTimer(retry);
        retry = null;
        open();
      },
      /** Send a JSON message now; false when the socket is not open. */
      send,
      get lastSeq() {
        return lastSeq;
      },
      get state() {
        return state;
      },
    };
  }

  const NanoLive = {connect, backoffDelay, socketUrl, FINAL_CLOSE, HEARTBEAT_MS};
  root.NanoLive = NanoLive;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoLive;
})(typeof window !== "undefined" ? window : globalThis);
