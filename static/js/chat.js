/* chat.js: the chat page (templates/studio/chat.html), a ChatGPT-style client of /ws/chat/.

   The server renders the sidebar (the person's conversations), the checkpoint picker and the
   sampling panel; this script connects to the chat socket and does the rest:
   - "open" the conversation in the URL and draw its branch (follow "parent" up from the leaf);
   - "send" / "edit" / "regenerate" / "continue" / "select" / "stop", one generation at a time;
   - stream answers: "delta" texts go into the message object at once, but the DOM is touched
     only once per animation frame (a long answer arrives as hundreds of deltas);
   - completion mode (base checkpoints): the branch is one document, the model's tokens are
     spans with their probability and top alternatives in a popover;
   - the sidebar: filter, rename and delete (fetch with Accept: application/json);
   - settings: checked against chat_config.limits, then sent (debounced) to the open conversation;
   - reconnect with backoff, re-"open" the conversation, and continue an interrupted answer;
   - big payloads come in frames under daphne's 1 MiB limit: a conversation as "conversation" +
     "messages" frames (conversationAssembler), token probabilities as "probs" frames (applyProbs).

   Text from people and models goes in with textContent. The only innerHTML is the server's
   "html" of finished text parts: Markdown rendered without raw HTML and sanitised by nh3.

   The pure functions at the top (branch, versions, deltas, settings, documents) are exported
   for node tests: `const C = require("static/js/chat.js")`. Exposes window.NanoChatPage for
   debugging and the browser test.
*/
(function (root) {
  "use strict";

  // ------------------------------------------------------------------ pure logic

  // The socket (reconnect with backoff, dead-link watchdog, final close codes) is the run page's
  // client, static/js/live.js, loaded first; required directly under node.
  const Live = root.NanoLive || (typeof require === "function" ? require("./live.js") : null);
  const SETTINGS_DEBOUNCE_MS = 600;
  const SAMPLING_FIELDS = ["temperature", "top_k", "max_tokens", "seed"];
  const FIELD_LABELS = {temperature: "Temperature", top_k: "Top-k", max_tokens: "Max tokens", seed: "Seed"};

  /** Map id -> message, from a list or a map. */
  function indexMessages(messages) {
    if (messages instanceof Map) return messages;
    const byId = new Map();
    for (const m of messages || []) byId.set(m.id, m);
    return byId;
  }

  /** The messages from the root down to `leafId`, oldest first ([] for no leaf). */
  function branchPath(messages, leafId) {
    const byId = indexMessages(messages);
    const path = [];
    const seen = new Set();  // a corrupt parent loop must not hang the page
    let node = leafId === null || leafId === undefined ? undefined : byId.get(leafId);
    while (node && !seen.has(node.id)) {
      seen.add(node.id);
      path.push(node);
      node = node.parent === null || node.parent === undefined ? undefined : byId.get(node.parent);
    }
    return path.reverse();
  }

  /** The versions of a message: messages with its parent and role, ordered by id (itself included). */
  function siblingsOf(messages, message) {
    const list = messages instanceof Map ? [...messages.values()] : messages || [];
    const parent = message.parent === undefined ? null : message.parent;
    return list
      .filter((m) => (m.parent === undefined ? null : m.parent) === parent && m.role === message.role)
      .sort((a, b) => a.id - b.id);
  }

  /** {index (1-based), count, prev, next} for "< 2/3 >": prev/next are sibling ids or null. */
  function versionInfo(messages, message) {
    const siblings = siblingsOf(messages, message);
    const i = siblings.findIndex((m) => m.id === message.id);
    return {
      index: i + 1,
      count: siblings.length,
      prev: i > 0 ? siblings[i - 1].id : null,
      next: i >= 0 && i < siblings.length - 1 ? siblings[i + 1].id : null,
    };
  }

  /** The plain text of a message: chat answers show their text parts, completion ones all parts. */
  function messageText(message, mode) {
    if (message.role === "user" || !Array.isArray(message.parts) || !message.parts.length) return message.content || "";
    const parts = mode === "completion" ? message.parts : message.parts.filter((p) => p.type === "text");
    return parts.map((p) => p.text || "").join("");
  }

  /** Apply a "delta" to an answer in place: [[INDEX, TYPE, TEXT], ...] appends TEXT to part INDEX
      (a new index opens a new part of TYPE); probs, when given, are appended. Returns the message. */
  function applyDelta(message, parts, probs, mode) {
    if (!Array.isArray(message.parts)) message.parts = [];
    for (const entry of parts || []) {
      if (!Array.isArray(entry) || entry.length < 3) continue;
      const [index, type, text] = entry;
      if (typeof index !== "number" || index < 0) continue;
      // Parts arrive in order; a gap would mean a lost delta, but filling it keeps indexes honest.
      while (message.parts.length < index) message.parts.push({type: "text", text: ""});
      if (message.parts.length === index) message.parts.push({type: type || "text", text: ""});
      const part = message.parts[index];
      part.text = (part.text || "") + String(text);
      delete part.html;  // stale: the server sends fresh html with "done"
    }
    if (Array.isArray(probs) && probs.length) {
      if (!Array.isArray(message.probs)) message.probs = [];
      message.probs.push(...probs);
    }
    message.content = messageText(message, mode);
    return message;
  }

  /** Check the sampling panel's raw values against chat_config.limits.
      Returns {settings, errors}: settings has numbers (seed null = random), errors maps field -> message. */
  function validateSettings(values, limits) {
    const settings = {};
    const errors = {};
    const rules = {
      temperature: {integer: false, blank: null},
      top_k: {integer: true, blank: null},
      max_tokens: {integer: true, blank: null},
      seed: {integer: true, blank: "random"},
    };
    for (const field of SAMPLING_FIELDS) {
      const rule = rules[field];
      const [low, high] = (limits && limits[field]) || [-Infinity, Infinity];
      const label = FIELD_LABELS[field];
      const raw = values[field] === null || values[field] === undefined ? "" : String(values[field]).trim();
      if (raw === "") {
        if (rule.blank === "random") settings[field] = null;
        else errors[field] = `${label} is required (between ${low} and ${high}).`;
        continue;
      }
      const number = Number(raw);
      const kind = rule.integer ? "a whole number" : "a number";
      const blankNote = rule.blank === "random" ? " or blank for random" : "";
      if (!Number.isFinite(number) || (rule.integer && !Number.isInteger(number))) {
        errors[field] = `${label} must be ${kind} between ${low} and ${high}${blankNote}.`;
      } else if (number < low || number > high) {
        errors[field] = `${label} must be between ${low} and ${high}${blankNote}, not ${raw}.`;
      } else {
        settings[field] = number;
      }
    }
    return {settings, errors};
  }

  /** Options of the step select: "latest" first, then every step newest first. */
  function stepOptions(steps) {
    const sorted = [...(steps || [])].sort((a, b) => b - a);
    const latest = sorted.length ? `latest (step ${sorted[0]})` : "latest";
    return [{value: "", label: latest}, ...sorted.map((s) => ({value: String(s), label: `step ${s}`}))];
  }

  /** Index in `checkpoints` of the entry for settings.run/stage, or -1. */
  function findCheckpoint(checkpoints, settings) {
    if (!settings) return -1;
    return (checkpoints || []).findIndex((c) => c.run === settings.run && c.stage === settings.stage);
  }

  /** Split a model continuation into token segments [{text, prob}] by its probs ("t" = token text).
      Token texts may not match the stored text exactly (a token that is half a UTF-8 character decodes
      to U+FFFD alone): from the first mismatch on the rest is one segment without a prob. */
  function alignTokens(text, probs) {
    const segments = [];
    let pos = 0;
    for (const prob of probs || []) {
      const t = prob && typeof prob.t === "string" ? prob.t : "";
      if (!t) continue;
      if (!text.startsWith(t, pos)) break;
      segments.push({text: t, prob});
      pos += t.length;
    }
    if (pos < text.length) segments.push({text: text.slice(pos), prob: null});
    return segments;
  }

  /** Completion mode: the branch as one document, [{role, id, text, tokens}] in order; model pieces
      carry their token segments. documentText(branch) is the same text as one string. */
  function documentSegments(branch) {
    return branch.map((m) => {
      const text = messageText(m, "completion");
      return m.role === "user"
        ? {role: "user", id: m.id, text, tokens: null}
        : {role: "assistant", id: m.id, text, tokens: alignTokens(text, m.probs)};
    });
  }

  function documentText(branch) {
    return branch.map((m) => messageText(m, "completion")).join("");
  }

  /** The answer to "continue" after a "conversation" message, or null: the leaf is an answer that was
      interrupted, or that is "streaming" while no server process is writing it (a server restart). */
  function autoContinueTarget(payload) {
    if (!payload || payload.leaf === null || payload.leaf === undefined) return null;
    const leaf = (payload.messages || []).find((m) => m.id === payload.leaf);
    if (!leaf || leaf.role !== "assistant") return null;
    if (leaf.status === "interrupted") return leaf.id;
    if (leaf.status === "streaming" && (payload.generating === null || payload.generating === undefined)) return leaf.id;
    return null;
  }

  /** "12 / 8,000" and whether it is over the limit. */
  function charCounter(length, max) {
    return {text: `${length.toLocaleString("en")} / ${Number(max).toLocaleString("en")}`, over: length > max};
  }

  function waitingText(position) {
    return `Waiting for a free model slot — ${position} ahead`;
  }

  /** Whether a sidebar title matches the filter (case-insensitive substring; blank matches all). */
  function titleMatches(title, query) {
    const q = (query || "").trim().toLowerCase();
    return !q || String(title || "").toLowerCase().includes(q);
  }

  /** Puts a conversation sent in frames back together. The server keeps every WebSocket frame under
      daphne's 1 MiB limit (studio.chat.open_frames): "conversation" with the first messages and
      more: true, then "messages" frames {conversation, messages, more} until more is false.
      feed(msg) returns the whole "conversation" message once its last frame came, else null;
      a new "conversation" starts over (the page re-opened it after a reconnect). */
  function conversationAssembler() {
    let pending = null;
    return {
      feed(msg) {
        if (!msg || typeof msg !== "object") return null;
        if (msg.type === "conversation") {
          pending = Object.assign({}, msg, {messages: Array.isArray(msg.messages) ? msg.messages.slice() : []});
        } else if (msg.type === "messages") {
          // A piece of a conversation this page no longer waits for (it opened another): dropped.
          if (!pending || !pending.conversation || pending.conversation.id !== msg.conversation) return null;
          for (const m of Array.isArray(msg.messages) ? msg.messages : []) pending.messages.push(m);
        } else {
          return null;
        }
        if (msg.more) return null;
        const whole = pending;
        pending = null;
        delete whole.more;
        return whole;
      },
      get waiting() {
        return pending !== null;
      },
    };
  }

  /** A "probs" frame: the token probabilities of a message too big for one frame, from `offset` on
      (they follow its "done", or the conversation that holds it). Returns the message. */
  function applyProbs(message, offset, probs) {
    if (!Array.isArray(message.probs)) message.probs = [];
    if (!Array.isArray(probs) || !Number.isInteger(offset) || offset < 0) return message;
    while (message.probs.length < offset) message.probs.push(null);  // a lost piece stays a gap, not a shift
    for (let i = 0; i < probs.length; i++) message.probs[offset + i] = probs[i];
    return message;
  }

  /** The rename / delete URL of a conversation from its page URL (studio/urls.py: chat/<id>/rename/). */
  function actionUrl(conversationUrl, action) {
    return conversationUrl.replace(/\/?$/, "/") + `${action}/`;
  }

  const NanoChat = {
    branchPath, siblingsOf, versionInfo, messageText, applyDelta, validateSettings,
    stepOptions, findCheckpoint, alignTokens, documentSegments, documentText, autoContinueTarget, charCounter,
    waitingText, titleMatches, actionUrl, conversationAssembler, applyProbs,
  };
  root.NanoChat = NanoChat;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoChat;

  if (typeof document === "undefined" || !root.NanoDom) return;
  const page = document.getElementById("chat-page");
  if (page) startPage(page);

  // ------------------------------------------------------------------ the page

  function startPage(page) {
    const {el, readJson} = root.NanoDom;
    const $ = (id) => document.getElementById(id);
    const config = readJson("chat-config") || {};
    const limits = config.limits || {};
    const checkpoints = config.checkpoints || [];

    const state = {
      conv: null,               // CONV once known ("conversation" or "created")
      convId: config.conversation === undefined ? null : config.conversation,
      messages: new Map(),      // id -> MSG, every branch
      leaf: null,
      generating: null,         // "generating" of the last "conversation": an answer another socket writes
      job: null,                // this socket's generation: {answer: id|null, phase, position}
      settings: Object.assign({}, config.settings || {}),
      editing: null,            // id of the user message being edited
      editDraft: null,          // its text so far (null: the box is not open yet)
      error: "",
    };

    // ---------------------------------------------------------- rendering, once per frame

    let frame = null;
    let fullRender = false;
    const streamDirty = new Set();  // answers whose text changed since the last frame

    function schedule(full) {
      if (full) fullRender = true;
      if (frame === null) frame = root.requestAnimationFrame(flush);
    }

    function flush() {
      frame = null;
      const stick = nearBottom();
      if (fullRender) {
        fullRender = false;
        streamDirty.clear();
        renderThread();
      } else {
        for (const id of streamDirty) updateStreaming(id);
        streamDirty.clear();
      }
      renderComposer();
      if (stick) scrollToBottom();
    }

    function nearBottom() {
      const box = $("chat-scroll");
      return !box || box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    }

    function scrollToBottom() {
      const box = $("chat-scroll");
      if (box) box.scrollTop = box.scrollHeight;
    }

    function mode() {
      if (state.conv) return state.conv.mode;
      const i = findCheckpoint(checkpoints, state.settings);
      return i >= 0 ? checkpoints[i].mode : "chat";
    }

    function branch() {
      return branchPath(state.messages, state.leaf);
    }

    function busy() {
      return state.job !== null;
    }

    /** The whole shown branch, drawn from scratch (structure changed: a new message, leaf or version). */
    function renderThread() {
      const thread = $("chat-thread");
      if (!thread) return;
      const path = branch();
      const intro = $("chat-intro");
      if (intro) intro.hidden = path.length > 0;
      thread.classList.toggle("completion", mode() === "completion");
      if (mode() === "completion") thread.replaceChildren(...renderDocument(path));
      else thread.replaceChildren(...path.map((m, i) => renderMessage(m, i === path.length - 1)));
    }

    // ----- chat mode

    function renderMessage(message, isLast) {
      const node = el("article", {
        className: `msg msg-${message.role} msg-status-${message.status || "done"}`,
        "data-id": String(message.id), "data-role": message.role, "data-status": message.status || "done",
      });
      if (message.role === "user" && state.editing === message.id) {
        node.append(editBox(message));
        return node;
      }
      const body = el("div", {className: "msg-body"});
      if (message.role === "user") body.append(el("div", {className: "msg-text", text: message.content || ""}));
      else fillAnswer(body, message);
      node.append(body);
      if (message.role === "assistant") node.append(answerNotes(message));
      node.append(messageTools(message, isLast));
      return node;
    }

    /** An answer's parts: text (plain while streaming, the server's html when finished) and tool calls. */
    function fillAnswer(body, message) {
      const streaming = message.status === "streaming";
      const parts = message.parts || [];
      const nodes = parts.map((part) => partNode(part, streaming));
      if (!parts.length && streaming) nodes.push(el("div", {className: "msg-text part-text streaming"}));
      body.replaceChildren(...nodes);
      if (streaming) body.append(el("span", {className: "cursor", "aria-hidden": "true"}));
    }

    function partNode(part, streaming) {
      if (part.type === "python") {
        return el("div", {className: "tool-call", "data-part": "python"},
          el("span", {className: "tool-label", text: "calculator"}), el("code", {className: "tool-expr", text: part.text || ""}));
      }
      if (part.type === "python_output") {
        return el("div", {className: "tool-result", "data-part": "python_output"}, el("code", {text: `= ${part.text || ""}`}));
      }
      if (!streaming && typeof part.html === "string") {
        const div = el("div", {className: "msg-text part-html markdown", "data-part": "text"});
        div.innerHTML = part.html;  // sanitised by the server (Markdown without raw HTML, then nh3)
        addCodeCopyButtons(div);
        return div;
      }
      return el("div", {className: "msg-text part-text", "data-part": "text", text: part.text || ""});
    }

    /** During streaming only the texts change: one textContent write per changed part per frame. */
    function updateStreaming(id) {
      const message = state.messages.get(id);
      const node = document.querySelector(`#chat-thread [data-id="${CSS.escape(String(id))}"]`);
      if (!message || !node) return;
      if (mode() === "completion") {
        const span = node.matches(".doc-model") ? node : null;
        if (span) fillModelSpan(span, message);
        return;
      }
      const body = node.querySelector(".msg-body");
      const shown = body ? body.querySelectorAll("[data-part], .part-text") : [];
      const parts = message.parts || [];
      // A new part (or a different kind of part) means a rebuild of this message only.
      if (!body || shown.length !== parts.length || parts.some((p, i) => shown[i].dataset.part !== p.type)) {
        if (body) fillAnswer(body, message);
        updatePhase(node, message);
        return;
      }
      parts.forEach((part, i) => {
        const target = part.type === "text" ? shown[i] : shown[i].querySelector("code");
        const text = part.type === "python_output" ? `= ${part.text}` : part.text;
        if (target && target.textContent !== text) target.textContent = text;
      });
      updatePhase(node, message);
    }

    /** The line under an answer: waiting / loading / error / stopped / interrupted, and its meta. */
    function answerNotes(message) {
      const notes = el("div", {className: "msg-notes"});
      fillNotes(notes, message);
      return notes;
    }

    function fillNotes(notes, message) {
      const items = [];
      const job = state.job && state.job.answer === message.id ? state.job : null;
      if (message.status === "streaming") {
        if (job && job.phase === "waiting") items.push(el("span", {className: "phase waiting", text: waitingText(job.position)}));
        else if (job && job.phase === "loading") items.push(el("span", {className: "phase loading", text: "Loading checkpoint…"}));
        else if (job) items.push(el("span", {className: "phase streaming", text: job.phase === "started" ? "Writing…" : "Starting…"}));
        else if (state.generating === message.id) {
          items.push(el("span", {className: "phase", text: "Being written in another tab. "}),
            el("button", {type: "button", className: "linklike", "data-act": "continue", text: "Continue here"}));
        }
      } else if (message.status === "error") {
        items.push(el("span", {className: "msg-error", role: "alert", text: message.error || "The answer failed."}));
      } else if (message.status === "stopped") {
        items.push(el("span", {className: "muted", text: "Stopped."}));
      } else if (message.status === "interrupted") {
        items.push(el("span", {className: "muted", text: "Interrupted. "}),
          el("button", {type: "button", className: "linklike", "data-act": "continue", text: "Continue"}));
      } else if (message.finish === "length") {
        items.push(el("span", {className: "muted", text: "Stopped at the token limit."}));
      }
      notes.replaceChildren(...items);
      notes.hidden = !items.length;
    }

    function updatePhase(node, message) {
      const notes = node.querySelector(".msg-notes");
      if (notes) fillNotes(notes, message);
    }

    /** Versions, copy, edit (user) or regenerate (last answer), and the answer's meta. */
    function messageTools(message, isLast) {
      const tools = el("div", {className: "msg-tools"});
      const info = versionInfo(state.messages, message);
      if (info.count > 1) {
        tools.append(el("span", {className: "versions"},
          versionButton("‹", "Previous version", info.prev),
          el("span", {className: "version-index", text: `${info.index}/${info.count}`}),
          versionButton("›", "Next version", info.next)));
      }
      const streaming = message.status === "streaming";
      if (!streaming) tools.append(el("button", {type: "button", className: "tool", "data-act": "copy", title: "Copy this message", text: "Copy"}));
      if (message.role === "user" && !busy()) {
        tools.append(el("button", {type: "button", className: "tool", "data-act": "edit", title: "Edit this message and answer again", text: "Edit"}));
      }
      if (message.role === "assistant" && isLast && !streaming && !busy()) {
        tools.append(el("button", {type: "button", className: "tool", "data-act": "regenerate", title: "Write another version of this answer", text: "Regenerate"}));
      }
      if (message.role === "assistant" && !streaming) {
        const meta = [message.checkpoint, message.tokens ? `${message.tokens} tokens` : "",
          typeof message.seconds === "number" && message.seconds > 0 ? `${message.seconds.toFixed(1)} s` : ""].filter(Boolean);
        if (meta.length) tools.append(el("span", {className: "msg-meta muted", text: meta.join(" · ")}));
      }
      return tools;
    }

    function versionButton(label, title, target) {
      const attrs = {type: "button", className: "tool version", title, "aria-label": title, text: label};
      if (target === null) attrs.disabled = "";
      else attrs["data-select"] = String(target);
      return el("button", attrs);
    }

    function editBox(message) {
      const area = el("textarea", {className: "edit-text", rows: "3", "aria-label": "Edit your message"});
      // The draft outlives re-renders (a "settings" or "leaf" message redraws the thread).
      area.value = state.editDraft === null ? message.content || "" : state.editDraft;
      const box = el("div", {className: "edit-box"}, area,
        el("div", {className: "edit-actions"},
          el("button", {type: "button", className: "button small", "data-act": "edit-cancel", text: "Cancel"}),
          el("button", {type: "button", className: "button small primary", "data-act": "edit-save", text: "Save & submit"})));
      if (state.editDraft === null) {
        state.editDraft = area.value;
        // Focus once, when the box opens, after the frame has put it in the page.
        root.setTimeout(() => { area.focus(); area.setSelectionRange(area.value.length, area.value.length); }, 0);
      }
      return box;
    }

    /** A "Copy" button on every code block of rendered html. */
    function addCodeCopyButtons(container) {
      for (const pre of container.querySelectorAll("pre")) {
        const wrap = el("div", {className: "code-wrap"});
        pre.replaceWith(wrap);
        wrap.append(el("button", {type: "button", className: "tool code-copy", "data-act": "copy-code", text: "Copy"}), pre);
      }
    }

    // ----- completion mode

    let popover = null;

    function renderDocument(path) {
      const doc = el("div", {className: "document", "aria-label": "Document"});
      for (const message of path) {
        if (message.role === "user") {
          doc.append(el("span", {className: "doc-user", "data-id": String(message.id), text: message.content || ""}));
        } else {
          const span = el("span", {className: "doc-model", "data-id": String(message.id), "data-status": message.status || "done"});
          fillModelSpan(span, message);
          doc.append(span);
        }
      }
      const out = [doc];
      const last = path[path.length - 1];
      if (last && last.role === "assistant") {
        const bar = el("div", {className: "msg doc-bar", "data-id": String(last.id), "data-status": last.status || "done"});
        bar.append(answerNotes(last), messageTools(last, true));
        out.push(bar);
      }
      return out;
    }

    /** The model's tokens as focusable spans (each knows its prob index); the unmatched rest as plain model text. */
    function fillModelSpan(span, message) {
      const segments = alignTokens(messageText(message, "completion"), message.probs);
      let i = 0;
      span.replaceChildren(...segments.map((seg) => {
        if (!seg.prob) return el("span", {className: "tok tok-plain", text: seg.text});
        const tok = el("span", {className: "tok", tabindex: "0", "data-prob": String(i), "data-msg": String(message.id), text: seg.text});
        tok.style.setProperty("--p", String(Math.max(0, Math.min(1, seg.prob.p || 0))));
        i++;
        return tok;
      }));
      if (message.status === "streaming") span.append(el("span", {className: "cursor", "aria-hidden": "true"}));
      const bar = document.querySelector(`#chat-thread .doc-bar[data-id="${CSS.escape(String(message.id))}"]`);
      if (bar) updatePhase(bar, message);
    }

    function showProbs(tok) {
      const message = state.messages.get(Number(tok.dataset.msg));
      const prob = message && (message.probs || [])[Number(tok.dataset.prob)];
      if (!prob) return;
      if (!popover) {
        popover = el("div", {className: "prob-popover", role: "tooltip", id: "prob-popover"});
        document.body.append(popover);
      }
      const rows = (prob.top || []).map(([text, p]) => el("tr", {className: text === prob.t ? "chosen" : ""},
        el("td", {}, el("code", {text: JSON.stringify(text)})), el("td", {className: "num", text: `${(p * 100).toFixed(1)}%`})));
      popover.replaceChildren(
        el("div", {className: "prob-head"}, el("code", {text: JSON.stringify(prob.t)}), ` ${(prob.p * 100).toFixed(1)}%`),
        el("table", {}, el("thead", {}, el("tr", {}, el("th", {text: "alternative"}), el("th", {className: "num", text: "p"}))),
          el("tbody", {}, ...rows)));
      const box = tok.getBoundingClientRect();
      popover.hidden = false;
      popover.style.left = `${Math.max(4, Math.min(root.innerWidth - popover.offsetWidth - 4, box.left + root.scrollX))}px`;
      popover.style.top = `${box.bottom + root.scrollY + 4}px`;
      tok.setAttribute("aria-describedby", "prob-popover");
    }

    function hideProbs() {
      if (popover) popover.hidden = true;
    }

    // ---------------------------------------------------------- composer and status

    const input = $("composer-input");
    const sendButton = $("send-button");
    const stopButton = $("stop-button");

    function renderComposer() {
      const counter = $("composer-counter");
      const text = input ? input.value : "";
      const count = charCounter(text.length, limits.max_message_chars || Infinity);
      if (counter) {
        counter.textContent = count.text;
        counter.classList.toggle("over", count.over);
      }
      const noCheckpoint = !checkpoints.length;
      const completion = mode() === "completion";
      const hasParent = state.leaf !== null;
      if (input) {
        input.disabled = busy() || noCheckpoint;
        input.placeholder = completion
          ? (hasParent ? "Add text (optional) and press Send: the model continues the document" : "Start a document: the model continues it")
          : "Message the model (Enter sends, Shift+Enter for a new line)";
      }
      if (sendButton) {
        const empty = !text.trim() && !(completion && hasParent);
        sendButton.disabled = busy() || noCheckpoint || empty || count.over || settingsInvalid();
        sendButton.textContent = completion ? "Continue" : "Send";
      }
      if (stopButton) stopButton.hidden = !busy();
      const error = $("composer-error");
      if (error) {
        error.textContent = count.over ? `The message is over the limit of ${limits.max_message_chars} characters.` : state.error;
        error.hidden = !error.textContent;
      }
      page.dataset.busy = busy() ? "true" : "false";
      page.dataset.mode = completion ? "completion" : "chat";
    }

    function showError(text) {
      state.error = text || "";
      schedule(false);
    }

    // ---------------------------------------------------------- settings panel

    const ckptSelect = $("ckpt-select");
    const stepSelect = $("step-select");

    function fillCheckpointPicker() {
      if (!ckptSelect) return;
      const i = findCheckpoint(checkpoints, state.settings);
      const hasMessages = state.messages.size > 0;
      ckptSelect.replaceChildren(...checkpoints.map((c, k) => {
        const label = `${c.run_label} · ${c.stage}${c.mode === "completion" ? " (completion)" : ""}`;
        const option = el("option", {value: String(k), text: label});
        // An answered conversation keeps its mode: the server refuses the other kind.
        if (hasMessages && state.conv && c.mode !== state.conv.mode) {
          option.disabled = true;
          option.textContent = `${label} — new chat needed`;
        }
        return option;
      }));
      if (i < 0 && state.settings.run) {
        ckptSelect.prepend(el("option", {value: "", text: `${state.settings.run} · ${state.settings.stage || "?"} (not available)`}));
        ckptSelect.value = "";
      } else if (i >= 0) {
        ckptSelect.value = String(i);
      }
      fillSteps();
    }

    function fillSteps() {
      if (!stepSelect) return;
      const i = ckptSelect ? Number(ckptSelect.value) : -1;
      const steps = ckptSelect && ckptSelect.value !== "" && checkpoints[i] ? checkpoints[i].steps : [];
      stepSelect.replaceChildren(...stepOptions(steps).map((o) => el("option", {value: o.value, text: o.label})));
      const want = state.settings.step === null || state.settings.step === undefined ? "" : String(state.settings.step);
      stepSelect.value = [...stepSelect.options].some((o) => o.value === want) ? want : "";
    }

    function fillSampling() {
      for (const field of SAMPLING_FIELDS) {
        const node = $(`set-${field}`);
        if (!node || node === document.activeElement) continue;
        const value = state.settings[field];
        node.value = value === null || value === undefined ? "" : String(value);
      }
      checkSampling();
    }

    function readSampling() {
      const values = {};
      for (const field of SAMPLING_FIELDS) {
        const node = $(`set-${field}`);
        values[field] = node ? node.value : state.settings[field];
      }
      return values;
    }

    function checkSampling() {
      const result = validateSettings(readSampling(), limits);
      for (const field of SAMPLING_FIELDS) {
        const node = $(`set-${field}`);
        const note = $(`err-${field}`);
        const message = result.errors[field] || "";
        if (node) {
          node.setCustomValidity(message);
          node.closest(".set-field")?.classList.toggle("has-error", !!message);
        }
        if (note) {
          note.textContent = message;
          note.hidden = !message;
        }
      }
      return result;
    }

    function settingsInvalid() {
      return Object.keys(validateSettings(readSampling(), limits).errors).length > 0;
    }

    /** The settings as the panel shows them, for "send" and "settings" messages. */
    function currentSettings() {
      const out = Object.assign({}, state.settings);
      const i = ckptSelect && ckptSelect.value !== "" ? Number(ckptSelect.value) : -1;
      if (checkpoints[i]) {
        out.run = checkpoints[i].run;
        out.stage = checkpoints[i].stage;
      }
      if (stepSelect) out.step = stepSelect.value === "" ? null : Number(stepSelect.value);
      Object.assign(out, validateSettings(readSampling(), limits).settings);
      return out;
    }

    let settingsTimer = null;

    /** A change in the panel: remember it, and tell an open conversation after a pause in typing. */
    function settingsChanged() {
      const result = checkSampling();
      state.settings = currentSettings();
      schedule(true);  // the mode may have changed (chat <-> completion)
      if (Object.keys(result.errors).length || !state.conv) return;
      if (settingsTimer !== null) root.clearTimeout(settingsTimer);
      settingsTimer = root.setTimeout(() => {
        settingsTimer = null;
        if (state.conv) send({type: "settings", conversation: state.conv.id, settings: currentSettings()});
      }, SETTINGS_DEBOUNCE_MS);
    }

    function showSettingsError(field, text) {
      const note = $(`err-${field}`) || (["run", "stage", "step"].includes(field) ? $("err-checkpoint") : null);
      if (!note) return false;
      note.textContent = text;
      note.hidden = false;
      return true;
    }

    // ---------------------------------------------------------- sidebar

    function csrfToken() {
      const field = document.querySelector("input[name=csrfmiddlewaretoken]");
      if (field) return field.value;
      const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
      return match ? decodeURIComponent(match[1]) : "";
    }

    async function postJson(url, data) {
      const body = new URLSearchParams(data || {});
      const response = await fetch(url, {
        method: "POST", body, credentials: "same-origin",
        headers: {"Accept": "application/json", "X-CSRFToken": csrfToken()},
      });
      let json = null;
      try {
        json = await response.json();
      } catch (err) {
        json = null;
      }
      if (!response.ok || !json || !json.ok) throw new Error((json && json.error) || `the server answered ${response.status}`);
      return json;
    }

    function sidebarItem(conv) {
      const title = conv.title || `Chat ${conv.id}`;
      return el("li", {className: "conv", "data-id": String(conv.id), "data-title": title},
        el("a", {className: "conv-link", href: conv.url, title: conv.checkpoint_label || title}, el("span", {className: "conv-title", text: title}),
          conv.mode === "completion" ? el("span", {className: "conv-mode muted", text: "completion"}) : null),
        el("form", {className: "conv-rename", method: "post", action: actionUrl(conv.url, "rename"), hidden: ""},
          el("input", {type: "text", name: "title", maxlength: "200", "aria-label": "New title", required: ""})),
        el("div", {className: "conv-actions"},
          el("button", {type: "button", className: "tool", "data-act": "rename", title: "Rename", "aria-label": `Rename ${title}`, text: "✎"}),
          el("form", {className: "conv-delete", method: "post", action: actionUrl(conv.url, "delete"), "data-confirm": "Delete this conversation? This cannot be undone."},
            el("button", {type: "submit", className: "tool danger", title: "Delete", "aria-label": `Delete ${title}`, text: "✕"}))));
    }

    function highlightCurrent() {
      for (const li of document.querySelectorAll("#conv-list .conv")) {
        const current = state.conv && li.dataset.id === String(state.conv.id);
        li.classList.toggle("current", !!current);
        const link = li.querySelector(".conv-link");
        if (link) {
          if (current) link.setAttribute("aria-current", "page");
          else link.removeAttribute("aria-current");
        }
      }
    }

    function setSidebarTitle(id, title) {
      const li = document.querySelector(`#conv-list .conv[data-id="${CSS.escape(String(id))}"]`);
      if (!li) return;
      li.dataset.title = title;
      const span = li.querySelector(".conv-title");
      if (span) span.textContent = title;
    }

    // Titles are filtered here at once; the server also searches the messages (search_url), and
    // conversations it finds stay shown. `found` holds its answer for the query it was asked.
    let found = {query: "", ids: new Set()};
    let searchTimer = null;

    function applyFilter() {
      const query = ($("conv-filter") || {}).value || "";
      let shown = 0;
      for (const li of document.querySelectorAll("#conv-list .conv")) {
        const hit = found.query === query.trim() && found.ids.has(Number(li.dataset.id));
        li.hidden = !(titleMatches(li.dataset.title, query) || hit);
        if (!li.hidden) shown++;
      }
      const none = $("conv-none");
      if (none) none.hidden = shown > 0 || !document.querySelector("#conv-list .conv");
    }

    function searchMessages() {
      const query = (($("conv-filter") || {}).value || "").trim();
      if (searchTimer !== null) root.clearTimeout(searchTimer);
      if (!query || !config.search_url) return;
      searchTimer = root.setTimeout(async () => {
        searchTimer = null;
        try {
          const response = await fetch(`${config.search_url}?q=${encodeURIComponent(query)}`,
            {headers: {Accept: "application/json"}, credentials: "same-origin"});
          if (!response.ok) return;
          const body = await response.json();
          found = {query, ids: new Set(body.ids || [])};
          applyFilter();
        } catch (err) {
          // offline: the title filter still works
        }
      }, 250);
    }

    function startRename(li) {
      const form = li.querySelector(".conv-rename");
      const link = li.querySelector(".conv-link");
      if (!form) return;
      const field = form.querySelector("input[name=title]");
      field.value = li.dataset.title || "";
      form.hidden = false;
      if (link) link.hidden = true;
      field.focus();
      field.select();
    }

    function endRename(li) {
      const form = li.querySelector(".conv-rename");
      const link = li.querySelector(".conv-link");
      if (form) form.hidden = true;
      if (link) link.hidden = false;
    }

    async function submitRename(form) {
      const li = form.closest(".conv");
      const title = form.querySelector("input[name=title]").value.trim();
      if (!title || title === li.dataset.title) {
        endRename(li);
        return;
      }
      try {
        const result = await postJson(form.action, {title});
        setSidebarTitle(li.dataset.id, result.title);
        if (state.conv && String(state.conv.id) === li.dataset.id) {
          state.conv.title = result.title;
          document.title = `${result.title} · nanostudio`;
        }
        endRename(li);
      } catch (err) {
        sidebarError(err.message);
      }
    }

    async function submitDelete(form) {
      const li = form.closest(".conv");
      try {
        const result = await postJson(form.action, {});
        if (state.conv && String(state.conv.id) === li.dataset.id) {
          root.location.assign(result.url || config.new_url || "/chat/");
          return;
        }
        li.remove();
        applyFilter();
      } catch (err) {
        sidebarError(err.message);
      }
    }

    function sidebarError(text) {
      const node = $("sidebar-error");
      if (!node) return;
      node.textContent = text;
      node.hidden = !text;
    }

    // ---------------------------------------------------------- the socket

    let conn = null;  // NanoLive.connect: reconnect with backoff, dead-link watchdog, answers pings
    let outbox = [];  // messages sent while the socket was down: delivered after "open"

    function showConnection(name, detail) {
      const node = $("conn-state");
      if (node) {
        node.textContent = name;
        node.className = `conn-state conn-${name}`;
      }
      const more = $("conn-detail");
      if (more) more.textContent = detail || "";
    }

    function connect() {
      conn = Live.connect(config.ws_path || "/ws/chat/", {
        onMessage: receive,
        onState(name, detail) {
          const why = detail.delay ? `retry in ${Math.round(detail.delay / 1000)} s` : (detail.reason || "");
          showConnection(name, name === "live" ? "" : why);
          // The server ends a generation whose socket closed ("interrupted"); "open" after the reconnect continues it.
          if (name !== "live" && state.job) {
            state.job = null;
            schedule(true);
          }
        },
      }, {
        onOpen(sendNow) {
          const id = state.conv ? state.conv.id : state.convId;
          if (id !== null && id !== undefined) sendNow({type: "open", conversation: id});
          const queued = outbox;
          outbox = [];
          for (const msg of queued) sendNow(msg);
        },
      });
    }

    function send(msg) {
      if (conn && conn.send(msg)) return true;
      // Only settings wait for the link; a question sent into a dead link would surprise later.
      if (msg.type === "settings") outbox.push(msg);
      return false;
    }

    /** Send a message that starts a generation; the composer locks until its "done" (or an "error"). */
    function startJob(msg) {
      if (busy()) return false;
      if (!send(msg)) {
        showError("Not connected to the server: wait for the connection to come back.");
        return false;
      }
      state.job = {answer: null, phase: "sending", position: 0};
      if (msg.type === "continue") {
        // No "message" comes for a continued answer: it is streaming again from now on.
        state.job.answer = msg.message;
        const answer = state.messages.get(msg.message);
        if (answer) answer.status = "streaming";
        if (state.generating === msg.message) state.generating = null;
      }
      state.error = "";
      schedule(true);
      return true;
    }

    function receive(msg) {
      switch (msg.type) {
        case "conversation":
        case "messages": {
          const whole = assembler.feed(msg);
          return whole ? onConversation(whole) : undefined;
        }
        case "probs": return onProbs(msg);
        case "created": return onCreated(msg.conversation);
        case "message": return onMessage(msg.message);
        case "leaf":
          if (state.conv && msg.conversation !== state.conv.id) return;
          state.leaf = msg.leaf;
          return schedule(true);
        case "waiting": return onPhase(msg.message, "waiting", msg.position);
        case "loading": return onPhase(msg.message, "loading");
        case "started": return onPhase(msg.message, "started");
        case "delta": return onDelta(msg);
        case "done": return onDone(msg.message);
        case "settings":
          if (!state.conv || msg.conversation !== state.conv.id) return;
          state.conv.settings = msg.settings;
          state.settings = Object.assign({}, msg.settings);
          fillCheckpointPicker();
          fillSampling();
          return schedule(true);
        case "error": return onError(msg);
        default: return undefined;
      }
    }

    const assembler = conversationAssembler();

    function onProbs(msg) {
      const message = state.messages.get(msg.message);
      if (!message) return;
      applyProbs(message, msg.offset, msg.probs);
      schedule(true);
    }

    function onConversation(msg) {
      state.conv = msg.conversation;
      state.convId = state.conv.id;
      state.messages = indexMessages((msg.messages || []).map((m) => Object.assign({}, m)));
      state.leaf = msg.leaf;
      state.generating = msg.generating === undefined ? null : msg.generating;
      state.settings = Object.assign({}, state.conv.settings || state.settings);
      fillCheckpointPicker();
      fillSampling();
      highlightCurrent();
      schedule(true);
      // A refresh (or a server restart) mid-answer: pick the answer up where it was saved.
      const target = autoContinueTarget(msg);
      if (target !== null && !busy()) startJob({type: "continue", message: target});
      // Right after a refresh the server may not have seen the old page's socket close yet, and still
      // lists the answer as generating; ask once more a moment later, when it is marked interrupted.
      if (target === null && state.generating !== null && state.generating === state.leaf && !reopened) {
        reopened = true;
        root.setTimeout(() => send({type: "open", conversation: state.conv.id}), 1500);
      }
    }

    let reopened = false;  // the one extra "open" of onConversation was sent

    /** A conversation that just got a message goes to the top of the sidebar (the list is newest first). */
    function bumpInSidebar(id) {
      const list = $("conv-list");
      const li = list && list.querySelector(`.conv[data-id="${CSS.escape(String(id))}"]`);
      if (li && list.firstElementChild !== li) list.prepend(li);
    }

    function onCreated(conv) {
      state.conv = conv;
      state.convId = conv.id;
      if (root.history && root.history.replaceState) root.history.replaceState(null, "", conv.url);
      document.title = `${conv.title || `Chat ${conv.id}`} · nanostudio`;
      const list = $("conv-list");
      if (list && !list.querySelector(`.conv[data-id="${CSS.escape(String(conv.id))}"]`)) list.prepend(sidebarItem(conv));
      const empty = $("conv-empty");
      if (empty) empty.hidden = true;
      highlightCurrent();
      applyFilter();
    }

    function onMessage(message) {
      if (!message || message.id === undefined) return;
      state.messages.set(message.id, Object.assign({}, message));
      // The empty answer this socket is about to write: the job now knows its id.
      if (state.job && state.job.answer === null && message.role === "assistant" && message.status === "streaming") {
        state.job.answer = message.id;
      }
      if (message.role === "user" && state.conv) bumpInSidebar(state.conv.id);
      schedule(true);
    }

    function onPhase(id, phase, position) {
      if (!state.job) return;
      if (state.job.answer === null) state.job.answer = id;
      if (state.job.answer !== id) return;
      state.job.phase = phase;
      if (position !== undefined) state.job.position = position;
      streamDirty.add(id);
      schedule(false);
    }

    function onDelta(msg) {
      const message = state.messages.get(msg.message);
      if (!message) return;
      if (state.job && state.job.answer === msg.message) state.job.phase = "started";
      message.status = "streaming";
      applyDelta(message, msg.parts, msg.probs, mode());
      streamDirty.add(msg.message);
      schedule(false);
    }

    function onDone(message) {
      if (!message) return;
      state.messages.set(message.id, Object.assign({}, message));
      if (state.job && (state.job.answer === message.id || state.job.answer === null)) state.job = null;
      if (state.generating === message.id) state.generating = null;
      if (message.status === "error") state.error = "";  // shown under the answer itself
      schedule(true);
      if (input && !input.disabled && document.activeElement === document.body) input.focus();
    }

    function onError(msg) {
      // An error before any answer exists means the request was refused: unlock the composer.
      if (state.job && state.job.answer === null) state.job = null;
      // The conversation was deleted (another tab) while its answer was written: nothing runs any more.
      if (state.job && msg.field === "conversation") state.job = null;
      if (!(msg.field && showSettingsError(msg.field, msg.error))) showError(msg.error || "Something went wrong.");
      schedule(true);
    }

    // ---------------------------------------------------------- actions

    function submit() {
      if (!input || busy()) return;
      const text = input.value;
      const completion = mode() === "completion";
      if (!text.trim() && !(completion && state.leaf !== null)) return;
      if (text.length > (limits.max_message_chars || Infinity)) return;
      const checked = checkSampling();
      if (Object.keys(checked.errors).length) {
        showError("Fix the sampling settings first.");
        return;
      }
      const msg = {
        type: "send", conversation: state.conv ? state.conv.id : null, parent: state.leaf,
        text, settings: currentSettings(),
      };
      if (startJob(msg)) input.value = "";
    }

    function stop() {
      if (!busy()) return;
      send({type: "stop"});
    }

    async function copyText(text, button) {
      let ok = false;
      try {
        if (root.navigator.clipboard && root.isSecureContext) {
          await root.navigator.clipboard.writeText(text);
          ok = true;
        }
      } catch (err) {
        ok = false;
      }
      if (!ok) {
        // Plain http (not a secure context) has no clipboard API: the old select-and-copy way.
        const area = el("textarea", {"aria-hidden": "true", className: "copy-buffer"});
        area.value = text;
        document.body.append(area);
        area.select();
        try {
          ok = document.execCommand("copy");
        } catch (err) {
          ok = false;
        }
        area.remove();
      }
      if (button) {
        const label = button.textContent;
        button.textContent = ok ? "Copied" : "Copy failed";
        root.setTimeout(() => { button.textContent = label; }, 1500);
      }
    }

    function copyMessage(message) {
      if (message.role === "user") return message.content || "";
      // Tool calls copied as they read on the page.
      return (message.parts || []).map((p) => p.type === "python" ? `[calculator: ${p.text}]`
        : p.type === "python_output" ? `= ${p.text}` : p.text).join("\n").trim() || message.content || "";
    }

    function messageOf(node) {
      const holder = node.closest("[data-id]");
      return holder ? state.messages.get(Number(holder.dataset.id)) : null;
    }

    $("chat-thread")?.addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) {
        const tok = event.target.closest(".tok[data-prob]");
        if (tok) showProbs(tok);
        return;
      }
      const message = messageOf(button);
      if (button.dataset.select) {
        if (!busy() && state.conv) send({type: "select", conversation: state.conv.id, message: Number(button.dataset.select)});
        return;
      }
      if (!message) return;
      switch (button.dataset.act) {
        case "copy": return copyText(mode() === "completion" ? documentText(branch()) : copyMessage(message), button);
        case "copy-code": {
          const pre = button.parentElement.querySelector("pre");
          return copyText(pre ? pre.textContent : "", button);
        }
        case "regenerate": return startJob({type: "regenerate", message: message.id});
        case "continue": return startJob({type: "continue", message: message.id});
        case "edit":
          state.editing = message.id;
          state.editDraft = null;
          return schedule(true);
        case "edit-cancel":
          state.editing = null;
          return schedule(true);
        case "edit-save": {
          const area = button.closest(".edit-box").querySelector("textarea");
          const text = area.value;
          if (!text.trim()) return showError("type a message first");
          if (text === message.content) {
            state.editing = null;
            return schedule(true);
          }
          if (startJob({type: "edit", message: message.id, text})) state.editing = null;
          return schedule(true);
        }
        default: return undefined;
      }
    });

    // Token popovers: hover, keyboard focus or click shows one; leaving hides it.
    $("chat-thread")?.addEventListener("mouseover", (event) => {
      const tok = event.target.closest(".tok[data-prob]");
      if (tok) showProbs(tok);
    });
    $("chat-thread")?.addEventListener("mouseout", (event) => {
      if (event.target.closest(".tok[data-prob]")) hideProbs();
    });
    $("chat-thread")?.addEventListener("focusin", (event) => {
      const tok = event.target.closest(".tok[data-prob]");
      if (tok) showProbs(tok);
    });
    $("chat-thread")?.addEventListener("focusout", hideProbs);

    $("chat-thread")?.addEventListener("input", (event) => {
      if (event.target.closest(".edit-text")) state.editDraft = event.target.value;
    });
    $("chat-thread")?.addEventListener("keydown", (event) => {
      const area = event.target.closest(".edit-text");
      if (!area) return;
      if (event.key === "Escape") {
        event.stopPropagation();
        state.editing = null;
        schedule(true);
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        area.closest(".edit-box").querySelector("[data-act=edit-save]").click();
      }
    });

    $("composer")?.addEventListener("submit", (event) => {
      event.preventDefault();
      submit();
    });
    input?.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        submit();
      }
    });
    input?.addEventListener("input", () => {
      if (state.error) state.error = "";
      schedule(false);
    });
    stopButton?.addEventListener("click", stop);

    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && busy()) {
        event.preventDefault();
        stop();
      } else if (event.key === "Escape") {
        hideProbs();
      } else if ((event.ctrlKey || event.metaKey) && event.shiftKey && (event.key === "o" || event.key === "O")) {
        event.preventDefault();  // Ctrl+Shift+O is also "bookmarks" in some browsers
        root.location.assign(config.new_url || "/chat/");
      }
    });

    ckptSelect?.addEventListener("change", () => {
      // A new checkpoint starts at its latest step.
      state.settings.step = null;
      const i = Number(ckptSelect.value);
      if (checkpoints[i]) Object.assign(state.settings, {run: checkpoints[i].run, stage: checkpoints[i].stage});
      fillSteps();
      const note = $("err-checkpoint");
      if (note) note.hidden = true;
      settingsChanged();
    });
    stepSelect?.addEventListener("change", settingsChanged);
    for (const field of SAMPLING_FIELDS) $(`set-${field}`)?.addEventListener("input", settingsChanged);

    $("conv-filter")?.addEventListener("input", () => {
      applyFilter();
      searchMessages();
    });
    const convList = $("conv-list");
    convList?.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-act=rename]");
      if (button) startRename(button.closest(".conv"));
    });
    convList?.addEventListener("submit", (event) => {
      // common.js asked the confirm question in the capture phase; a "no" already prevented the submit.
      if (event.defaultPrevented) return;
      const form = event.target;
      event.preventDefault();
      if (form.classList.contains("conv-rename")) submitRename(form);
      else if (form.classList.contains("conv-delete")) submitDelete(form);
    });
    convList?.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && event.target.closest(".conv-rename")) {
        event.stopPropagation();
        endRename(event.target.closest(".conv"));
      }
    });
    convList?.addEventListener("focusout", (event) => {
      // Leaving the title field saves it, like most chat apps.
      const form = event.target.closest(".conv-rename");
      if (form && !form.hidden && !form.contains(event.relatedTarget)) submitRename(form);
    });

    root.addEventListener("online", () => {
      if (conn) conn.reconnectNow();
    });

    // ---------------------------------------------------------- start

    fillCheckpointPicker();
    fillSampling();
    highlightCurrent();
    applyFilter();
    schedule(true);
    if (checkpoints.length || state.convId !== null) connect();
    else showConnection("closed", "no checkpoints to chat with");
    root.NanoChatPage = {state, send, branch: () => branch()};
  }
})(typeof window !== "undefined" ? window : globalThis);
