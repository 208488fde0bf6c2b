/* chat_thread.js: the thread of the chat page (window.NanoChatThread), drawn in #chat-thread.

   - The message tree, as pure functions (exported for node tests through chat.js): the shown branch
     follows "parent" up from the leaf; versions are messages with the same parent and role; a
     "delta" or a "probs" frame changes one message in place.
   - Streaming: "delta" texts go into the message object at once, but the DOM is touched only once
     per animation frame (a long answer arrives as hundreds of deltas).
   - Chat mode: each message with its parts (text, calculator calls), the line under an answer
     (waiting / loading / error / stopped / interrupted) and its tools (versions, copy, edit,
     regenerate, continue).
   - Completion mode (base checkpoints): the branch is one document, the model's tokens are spans
     with their probability and top alternatives in a popover.
   - This socket's generation (the "job"): one at a time; Esc stops it.

   Text from people and models goes in with textContent. The only innerHTML is the server's "html"
   of finished text parts: Markdown rendered without raw HTML and sanitised by nh3.

   NanoChatThread.create(deps) starts the DOM part; chat.js passes deps:
     mode()                  "chat" or "completion"
     conversation()          the open conversation, or null
     send(msg)               the socket's send; false while the link is down
     showError(text), clearError()   the composer's error line
     showFieldError(field, text)     a settings field's error; false when no field shows it
     renderComposer()        called once per frame, after the thread
     focusComposer()         after an answer, when nothing else has the focus
*/
(function (root) {
  "use strict";

  // ------------------------------------------------------------------ the message tree (pure)

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

  /** A "probs" frame: the token probabilities of a message too big for one frame, from `offset` on
      (they follow its "done", or the conversation that holds it). Returns the message. */
  function applyProbs(message, offset, probs) {
    if (!Array.isArray(message.probs)) message.probs = [];
    if (!Array.isArray(probs) || !Number.isInteger(offset) || offset < 0) return message;
    while (message.probs.length < offset) message.probs.push(null);  // a lost piece stays a gap, not a shift
    for (let i = 0; i < probs.length; i++) message.probs[offset + i] = probs[i];
    return message;
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

  function waitingText(position) {
    return `Waiting for a free model slot — ${position} ahead`;
  }

  // ------------------------------------------------------------------ DOM pieces without state

  const el = (...args) => root.NanoDom.el(...args);

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

  /** A "Copy" button on every code block of rendered html. */
  function addCodeCopyButtons(container) {
    for (const pre of container.querySelectorAll("pre")) {
      const wrap = el("div", {className: "code-wrap"});
      pre.replaceWith(wrap);
      wrap.append(el("button", {type: "button", className: "tool code-copy", "data-act": "copy-code", text: "Copy"}), pre);
    }
  }

  function versionButton(label, title, target) {
    const attrs = {type: "button", className: "tool version", title, "aria-label": title, text: label};
    if (target === null) attrs.disabled = "";
    else attrs["data-select"] = String(target);
    return el("button", attrs);
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

  // ------------------------------------------------------------------ the thread on the page

  function create(deps) {
    const $ = (id) => document.getElementById(id);
    const {mode, send} = deps;

    const state = {
      messages: new Map(),      // id -> MSG, every branch
      leaf: null,
      generating: null,         // "generating" of the last "conversation": an answer another socket writes
      job: null,                // this socket's generation: {answer: id|null, phase, position}
      editing: null,            // id of the user message being edited
      editDraft: null,          // its text so far (null: the box is not open yet)
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
      deps.renderComposer();
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

    // ---------------------------------------------------------- this socket's generation

    /** Send a message that starts a generation; the composer locks until its "done" (or an "error"). */
    function startJob(msg) {
      if (busy()) return false;
      if (!send(msg)) {
        deps.showError("Not connected to the server: wait for the connection to come back.");
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
      deps.clearError();
      schedule(true);
      return true;
    }

    function stop() {
      if (!busy()) return;
      send({type: "stop"});
    }

    /** The link went down: the server ends a generation whose socket closed ("interrupted"), and
        "open" after the reconnect continues it. */
    function dropJob() {
      if (state.job) {
        state.job = null;
        schedule(true);
      }
    }

    // ---------------------------------------------------------- what the server sent

    /** A whole "conversation": every message of every branch, the leaf shown, who is writing. */
    function open(msg) {
      state.messages = indexMessages((msg.messages || []).map((m) => Object.assign({}, m)));
      state.leaf = msg.leaf;
      state.generating = msg.generating === undefined ? null : msg.generating;
    }

    /** A new or changed message; returns it, or null for one without an id. */
    function onMessage(message) {
      if (!message || message.id === undefined) return null;
      state.messages.set(message.id, Object.assign({}, message));
      // The empty answer this socket is about to write: the job now knows its id.
      if (state.job && state.job.answer === null && message.role === "assistant" && message.status === "streaming") {
        state.job.answer = message.id;
      }
      schedule(true);
      return message;
    }

    function onLeaf(msg) {
      const conv = deps.conversation();
      if (conv && msg.conversation !== conv.id) return;
      state.leaf = msg.leaf;
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
      if (message.status === "error") deps.clearError();  // shown under the answer itself
      schedule(true);
      deps.focusComposer();
    }

    function onProbs(msg) {
      const message = state.messages.get(msg.message);
      if (!message) return;
      applyProbs(message, msg.offset, msg.probs);
      schedule(true);
    }

    function onError(msg) {
      // An error before any answer exists means the request was refused: unlock the composer.
      if (state.job && state.job.answer === null) state.job = null;
      // The conversation was deleted (another tab) while its answer was written: nothing runs any more.
      if (state.job && msg.field === "conversation") state.job = null;
      if (!(msg.field && deps.showFieldError(msg.field, msg.error))) deps.showError(msg.error || "Something went wrong.");
      schedule(true);
    }

    // ---------------------------------------------------------- clicks and keys in the thread

    function messageOf(node) {
      const holder = node.closest("[data-id]");
      return holder ? state.messages.get(Number(holder.dataset.id)) : null;
    }

    const threadNode = $("chat-thread");
    threadNode?.addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) {
        const tok = event.target.closest(".tok[data-prob]");
        if (tok) showProbs(tok);
        return;
      }
      const message = messageOf(button);
      if (button.dataset.select) {
        const conv = deps.conversation();
        if (!busy() && conv) send({type: "select", conversation: conv.id, message: Number(button.dataset.select)});
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
          if (!text.trim()) return deps.showError("type a message first");
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
    threadNode?.addEventListener("mouseover", (event) => {
      const tok = event.target.closest(".tok[data-prob]");
      if (tok) showProbs(tok);
    });
    threadNode?.addEventListener("mouseout", (event) => {
      if (event.target.closest(".tok[data-prob]")) hideProbs();
    });
    threadNode?.addEventListener("focusin", (event) => {
      const tok = event.target.closest(".tok[data-prob]");
      if (tok) showProbs(tok);
    });
    threadNode?.addEventListener("focusout", hideProbs);

    threadNode?.addEventListener("input", (event) => {
      if (event.target.closest(".edit-text")) state.editDraft = event.target.value;
    });
    threadNode?.addEventListener("keydown", (event) => {
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

    // Esc anywhere stops this socket's generation, or else hides the token popover.
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && busy()) {
        event.preventDefault();
        stop();
      } else if (event.key === "Escape") {
        hideProbs();
      }
    });

    return {
      state, schedule, branch, busy, startJob, stop, dropJob,
      open, onMessage, onLeaf, onPhase, onDelta, onDone, onProbs, onError,
      leaf: () => state.leaf,
      generating: () => state.generating,
      hasMessages: () => state.messages.size > 0,
    };
  }

  const NanoChatThread = {
    indexMessages, branchPath, siblingsOf, versionInfo, messageText, applyDelta, applyProbs,
    alignTokens, documentSegments, documentText, autoContinueTarget, waitingText, create,
  };
  root.NanoChatThread = NanoChatThread;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoChatThread;
})(typeof window !== "undefined" ? window : globalThis);
