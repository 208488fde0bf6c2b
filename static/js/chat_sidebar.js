/* chat_sidebar.js: the sidebar of the chat page (window.NanoChatSidebar): the person's
   conversations (#conv-list, rendered by the server, newest first), new chat, rename, delete and
   search.

   - Search: titles are filtered here at once (titleMatches); the server also searches the messages
     (chat_config.search_url), and conversations it finds stay shown.
   - Rename and delete post the server-rendered forms with fetch (Accept: application/json); the
     delete form's confirm question is asked by common.js. Leaving the title field saves it, Esc
     gives up.
   - Ctrl+Shift+O opens a new chat.

   NanoChatSidebar.create(deps) starts it; chat.js passes deps:
     searchUrl, newUrl      from chat_config
     currentId()            the open conversation's id, or null
     renamed(id, title)     a conversation was renamed (id as in data-id, a string)
   and gets {added(conv), bump(id), highlight(), filter()}.
*/
(function (root) {
  "use strict";

  /** Whether a sidebar title matches the filter (case-insensitive substring; blank matches all). */
  function titleMatches(title, query) {
    const q = (query || "").trim().toLowerCase();
    return !q || String(title || "").toLowerCase().includes(q);
  }

  /** The rename / delete URL of a conversation from its page URL (studio/urls.py: chat/<id>/rename/). */
  function actionUrl(conversationUrl, action) {
    return conversationUrl.replace(/\/?$/, "/") + `${action}/`;
  }

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

  function create(deps) {
    const {el} = root.NanoDom;
    const $ = (id) => document.getElementById(id);
    const {currentId} = deps;

    /** Whether `li` is the open conversation. */
    function isCurrent(li) {
      const id = currentId();
      return id !== null && id !== undefined && String(id) === li.dataset.id;
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
        const current = isCurrent(li);
        li.classList.toggle("current", !!current);
        const link = li.querySelector(".conv-link");
        if (link) {
          if (current) link.setAttribute("aria-current", "page");
          else link.removeAttribute("aria-current");
        }
      }
    }

    /** A conversation the server just created: listed first (unless it is there), and current. */
    function added(conv) {
      const list = $("conv-list");
      if (list && !list.querySelector(`.conv[data-id="${CSS.escape(String(conv.id))}"]`)) list.prepend(sidebarItem(conv));
      const empty = $("conv-empty");
      if (empty) empty.hidden = true;
      highlightCurrent();
      applyFilter();
    }

    /** A conversation that just got a message goes to the top of the sidebar (the list is newest first). */
    function bump(id) {
      const list = $("conv-list");
      const li = list && list.querySelector(`.conv[data-id="${CSS.escape(String(id))}"]`);
      if (li && list.firstElementChild !== li) list.prepend(li);
    }

    function setSidebarTitle(id, title) {
      const li = document.querySelector(`#conv-list .conv[data-id="${CSS.escape(String(id))}"]`);
      if (!li) return;
      li.dataset.title = title;
      const span = li.querySelector(".conv-title");
      if (span) span.textContent = title;
    }

    // ---------------------------------------------------------- search

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
      if (!query || !deps.searchUrl) return;
      searchTimer = root.setTimeout(async () => {
        searchTimer = null;
        try {
          const response = await fetch(`${deps.searchUrl}?q=${encodeURIComponent(query)}`,
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

    // ---------------------------------------------------------- rename and delete

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
        deps.renamed(li.dataset.id, result.title);
        endRename(li);
      } catch (err) {
        sidebarError(err.message);
      }
    }

    async function submitDelete(form) {
      const li = form.closest(".conv");
      try {
        const result = await postJson(form.action, {});
        if (isCurrent(li)) {
          root.location.assign(result.url || deps.newUrl || "/chat/");
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

    // ---------------------------------------------------------- events

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

    document.addEventListener("keydown", (event) => {
      if ((event.ctrlKey || event.metaKey) && event.shiftKey && (event.key === "o" || event.key === "O")) {
        event.preventDefault();  // Ctrl+Shift+O is also "bookmarks" in some browsers
        root.location.assign(deps.newUrl || "/chat/");
      }
    });

    return {added, bump, highlight: highlightCurrent, filter: applyFilter};
  }

  const NanoChatSidebar = {titleMatches, actionUrl, create};
  root.NanoChatSidebar = NanoChatSidebar;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoChatSidebar;
})(typeof window !== "undefined" ? window : globalThis);
