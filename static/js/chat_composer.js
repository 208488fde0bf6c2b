/* chat_composer.js: the composer of the chat page (window.NanoChatComposer): the message box
   (#composer-input), Send / Continue, Stop, the character counter and the error line under them.

   Enter sends, Shift+Enter is a new line; the Stop button stops the generation. In completion
   mode an empty box may still be sent once there is a document: the model continues it.

   NanoChatComposer.create(deps) starts it; chat.js passes deps:
     page                   #chat-page: gets data-busy and data-mode on every render
     limits                 chat_config.limits (max_message_chars)
     noCheckpoint           true when there is nothing to chat with
     mode(), busy(), leaf() from the thread (leaf: the shown branch's last message id, or null)
     conversationId()       the open conversation's id, or null (a new chat)
     settings               the sampling panel: check(), current(), invalid()
     startJob(msg), stop()  the thread's generation
     schedule(full)         the thread's once-per-frame render (which calls render() here)
   and gets {render, showError, clearError, focusIfIdle, error}.
*/
(function (root) {
  "use strict";

  /** "12 / 8,000" and whether it is over the limit. */
  function charCounter(length, max) {
    return {text: `${length.toLocaleString("en")} / ${Number(max).toLocaleString("en")}`, over: length > max};
  }

  function create(deps) {
    const $ = (id) => document.getElementById(id);
    const {page, limits, busy, mode} = deps;
    const input = $("composer-input");
    const sendButton = $("send-button");
    const stopButton = $("stop-button");
    let error = "";

    function render() {
      const counter = $("composer-counter");
      const text = input ? input.value : "";
      const count = charCounter(text.length, limits.max_message_chars || Infinity);
      if (counter) {
        counter.textContent = count.text;
        counter.classList.toggle("over", count.over);
      }
      const noCheckpoint = deps.noCheckpoint;
      const completion = mode() === "completion";
      const hasParent = deps.leaf() !== null;
      if (input) {
        input.disabled = busy() || noCheckpoint;
        input.placeholder = completion
          ? (hasParent ? "Add text (optional) and press Send: the model continues the document" : "Start a document: the model continues it")
          : "Message the model (Enter sends, Shift+Enter for a new line)";
      }
      if (sendButton) {
        const empty = !text.trim() && !(completion && hasParent);
        sendButton.disabled = busy() || noCheckpoint || empty || count.over || deps.settings.invalid();
        sendButton.textContent = completion ? "Continue" : "Send";
      }
      if (stopButton) stopButton.hidden = !busy();
      const errorNode = $("composer-error");
      if (errorNode) {
        errorNode.textContent = count.over ? `The message is over the limit of ${limits.max_message_chars} characters.` : error;
        errorNode.hidden = !errorNode.textContent;
      }
      page.dataset.busy = busy() ? "true" : "false";
      page.dataset.mode = completion ? "completion" : "chat";
    }

    function showError(text) {
      error = text || "";
      deps.schedule(false);
    }

    /** Forget the error without a render (the caller renders anyway). */
    function clearError() {
      error = "";
    }

    /** After an answer: back to the box, unless the person is somewhere else on the page. */
    function focusIfIdle() {
      if (input && !input.disabled && document.activeElement === document.body) input.focus();
    }

    function submit() {
      if (!input || busy()) return;
      const text = input.value;
      const completion = mode() === "completion";
      const leaf = deps.leaf();
      if (!text.trim() && !(completion && leaf !== null)) return;
      if (text.length > (limits.max_message_chars || Infinity)) return;
      const checked = deps.settings.check();
      if (Object.keys(checked.errors).length) {
        showError("Fix the sampling settings first.");
        return;
      }
      const msg = {
        type: "send", conversation: deps.conversationId(), parent: leaf,
        text, settings: deps.settings.current(),
      };
      if (deps.startJob(msg)) input.value = "";
    }

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
      if (error) error = "";
      deps.schedule(false);
    });
    stopButton?.addEventListener("click", deps.stop);

    return {
      render, showError, clearError, focusIfIdle,
      get error() {
        return error;
      },
    };
  }

  const NanoChatComposer = {charCounter, create};
  root.NanoChatComposer = NanoChatComposer;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoChatComposer;
})(typeof window !== "undefined" ? window : globalThis);
