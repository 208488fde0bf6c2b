/* chat_socket.js: the chat page's link to the server (window.NanoChatSocket), a client of /ws/chat/
   (studio/consumers.py ChatConsumer).

   - The connection is the run page's client, static/js/live.js (loaded first; required directly
     under node): reconnect with backoff, dead-link watchdog, final close codes. Its state shows in
     #conn-state / #conn-detail; the browser coming back online reconnects at once.
   - On every (re)connect the open conversation is "open"ed again, then the messages sent while the
     link was down are delivered (only "settings" wait for the link).
   - Big payloads come in frames under daphne's 1 MiB limit: a conversation as "conversation" +
     "messages" frames, put back together by conversationAssembler (exported for node tests through
     chat.js); token probabilities come as "probs" frames.
   - Every message is dispatched by its type to one handler.

   NanoChatSocket.create(deps) starts it (connect() opens the link); chat.js passes deps:
     path                   chat_config.ws_path
     conversationId()       the conversation to "open" on (re)connect, or null
     linkDown()             the link is not live (any more)
     handlers               {conversation(whole), probs(msg), created(conversation), message(message),
                             leaf(msg), phase(id, phase, position), delta(msg), done(message),
                             settings(msg), error(msg)}
   and gets {connect, send, showConnection}.
*/
(function (root) {
  "use strict";

  const Live = root.NanoLive || (typeof require === "function" ? require("./live.js") : null);

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

  function create(deps) {
    const $ = (id) => document.getElementById(id);
    const handlers = deps.handlers;
    const assembler = conversationAssembler();
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
      conn = Live.connect(deps.path || "/ws/chat/", {
        onMessage: receive,
        onState(name, detail) {
          const why = detail.delay ? `retry in ${Math.round(detail.delay / 1000)} s` : (detail.reason || "");
          showConnection(name, name === "live" ? "" : why);
          if (name !== "live") deps.linkDown();
        },
      }, {
        onOpen(sendNow) {
          const id = deps.conversationId();
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

    function receive(msg) {
      switch (msg.type) {
        case "conversation":
        case "messages": {
          const whole = assembler.feed(msg);
          return whole ? handlers.conversation(whole) : undefined;
        }
        case "probs": return handlers.probs(msg);
        case "created": return handlers.created(msg.conversation);
        case "message": return handlers.message(msg.message);
        case "leaf": return handlers.leaf(msg);
        case "waiting": return handlers.phase(msg.message, "waiting", msg.position);
        case "loading": return handlers.phase(msg.message, "loading");
        case "started": return handlers.phase(msg.message, "started");
        case "delta": return handlers.delta(msg);
        case "done": return handlers.done(msg.message);
        case "settings": return handlers.settings(msg);
        case "error": return handlers.error(msg);
        default: return undefined;
      }
    }

    root.addEventListener("online", () => {
      if (conn) conn.reconnectNow();
    });

    return {connect, send, showConnection};
  }

  const NanoChatSocket = {conversationAssembler, create};
  root.NanoChatSocket = NanoChatSocket;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoChatSocket;
})(typeof window !== "undefined" ? window : globalThis);
