/* chat.js: the chat page (templates/studio/chat.html), a ChatGPT-style client of /ws/chat/.

   The server renders the sidebar (the person's conversations), the checkpoint picker and the
   sampling panel; the scripts loaded before this one do the rest, one part each:
     chat_thread.js    the messages of the shown branch: streaming, versions, edit, completion mode
     chat_composer.js  the message box, Send / Stop and the character counter
     chat_settings.js  the checkpoint picker and the sampling settings
     chat_sidebar.js   the conversation list: new chat, search, rename, delete
     chat_socket.js    the link (live.js), frames put back together, each message to its handler
   This file wires them: it holds the open conversation, "open"s the one in the URL, and passes
   each part what it needs from the others as functions (see each file's header for its deps).
   A reconnect re-"open"s the conversation, and an interrupted answer is continued.

   The pure functions of the parts are gathered here as window.NanoChat and exported for node
   tests: `const C = require("static/js/chat.js")`. Exposes window.NanoChatPage for debugging and
   the browser test.
*/
(function (root) {
  "use strict";

  /** A part: its global in the browser (loaded first by the template), required under node. */
  function part(name, file) {
    return root[name] || (typeof require === "function" ? require(file) : null);
  }

  const Thread = part("NanoChatThread", "./chat_thread.js");
  const Composer = part("NanoChatComposer", "./chat_composer.js");
  const Settings = part("NanoChatSettings", "./chat_settings.js");
  const Sidebar = part("NanoChatSidebar", "./chat_sidebar.js");
  const Socket = part("NanoChatSocket", "./chat_socket.js");

  const NanoChat = {
    branchPath: Thread.branchPath, siblingsOf: Thread.siblingsOf, versionInfo: Thread.versionInfo,
    messageText: Thread.messageText, applyDelta: Thread.applyDelta, validateSettings: Settings.validateSettings,
    stepOptions: Settings.stepOptions, findCheckpoint: Settings.findCheckpoint, alignTokens: Thread.alignTokens,
    documentSegments: Thread.documentSegments, documentText: Thread.documentText,
    autoContinueTarget: Thread.autoContinueTarget, charCounter: Composer.charCounter, waitingText: Thread.waitingText,
    titleMatches: Sidebar.titleMatches, actionUrl: Sidebar.actionUrl,
    conversationAssembler: Socket.conversationAssembler, applyProbs: Thread.applyProbs,
  };
  root.NanoChat = NanoChat;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoChat;

  if (typeof document === "undefined" || !root.NanoDom) return;
  const page = document.getElementById("chat-page");
  if (page) startPage(page);

  function startPage(page) {
    const config = root.NanoDom.readJson("chat-config") || {};
    const limits = config.limits || {};
    const checkpoints = config.checkpoints || [];

    let conv = null;  // CONV once known ("conversation" or "created")
    let convId = config.conversation === undefined ? null : config.conversation;  // before that: the URL's
    let reopened = false;  // the one extra "open" of opened() was sent

    const mode = () => (conv ? conv.mode : settings.checkpointMode());
    const conversation = () => conv;

    const thread = Thread.create({
      mode, conversation,
      send: (msg) => socket.send(msg),
      showError: (text) => composer.showError(text),
      clearError: () => composer.clearError(),
      showFieldError: (field, text) => settings.showError(field, text),
      renderComposer: () => composer.render(),
      focusComposer: () => composer.focusIfIdle(),
    });
    const settings = Settings.create({
      checkpoints, limits, initial: config.settings, conversation,
      hasMessages: thread.hasMessages,
      send: (msg) => socket.send(msg),
      changed: () => thread.schedule(true),
    });
    const composer = Composer.create({
      page, limits, noCheckpoint: !checkpoints.length, mode, settings,
      busy: thread.busy, leaf: thread.leaf, startJob: thread.startJob, stop: thread.stop, schedule: thread.schedule,
      conversationId: () => (conv ? conv.id : null),
    });
    const sidebar = Sidebar.create({
      searchUrl: config.search_url, newUrl: config.new_url,
      currentId: () => (conv ? conv.id : null),
      renamed(id, title) {
        if (conv && String(conv.id) === id) {
          conv.title = title;
          document.title = `${title} · nanostudio`;
        }
      },
    });
    const socket = Socket.create({
      path: config.ws_path,
      conversationId: () => (conv ? conv.id : convId),
      linkDown: thread.dropJob,
      handlers: {
        conversation: opened,
        created,
        message(message) {
          const added = thread.onMessage(message);
          if (added && added.role === "user" && conv) sidebar.bump(conv.id);
        },
        settings(msg) {
          if (!conv || msg.conversation !== conv.id) return;
          conv.settings = msg.settings;
          settings.load(msg.settings);
          thread.schedule(true);
        },
        probs: thread.onProbs, leaf: thread.onLeaf, phase: thread.onPhase, delta: thread.onDelta,
        done: thread.onDone, error: thread.onError,
      },
    });

    /** The whole conversation (after "open", or a reconnect): draw it, and pick up an interrupted answer. */
    function opened(msg) {
      conv = msg.conversation;
      convId = conv.id;
      thread.open(msg);
      settings.load(conv.settings || settings.values());
      sidebar.highlight();
      thread.schedule(true);
      // A refresh (or a server restart) mid-answer: pick the answer up where it was saved.
      const target = Thread.autoContinueTarget(msg);
      if (target !== null && !thread.busy()) thread.startJob({type: "continue", message: target});
      // Right after a refresh the server may not have seen the old page's socket close yet, and still
      // lists the answer as generating; ask once more a moment later, when it is marked interrupted.
      if (target === null && thread.generating() !== null && thread.generating() === thread.leaf() && !reopened) {
        reopened = true;
        root.setTimeout(() => socket.send({type: "open", conversation: conv.id}), 1500);
      }
    }

    /** The server created the conversation of a first message: the URL, title and sidebar follow. */
    function created(c) {
      conv = c;
      convId = c.id;
      if (root.history && root.history.replaceState) root.history.replaceState(null, "", c.url);
      document.title = `${c.title || `Chat ${c.id}`} · nanostudio`;
      sidebar.added(c);
    }

    // ---------------------------------------------------------- start

    settings.fill();
    sidebar.highlight();
    sidebar.filter();
    thread.schedule(true);
    if (checkpoints.length || convId !== null) socket.connect();
    else socket.showConnection("closed", "no checkpoints to chat with");
    root.NanoChatPage = {
      // A read-only view of the page's state, part by part.
      state: {
        get conv() { return conv; },
        get convId() { return convId; },
        get messages() { return thread.state.messages; },
        get leaf() { return thread.state.leaf; },
        get generating() { return thread.state.generating; },
        get job() { return thread.state.job; },
        get settings() { return settings.values(); },
        get editing() { return thread.state.editing; },
        get editDraft() { return thread.state.editDraft; },
        get error() { return composer.error; },
      },
      send: socket.send,
      branch: () => thread.branch(),
    };
  }
})(typeof window !== "undefined" ? window : globalThis);
