// Shared by every page: forms marked data-confirm ask before they submit, and
// small DOM helpers (window.NanoDom) for the page scripts. Loaded without
// `defer` in <head>, so it runs before any page script.
"use strict";
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement && form.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
}, true);

window.NanoDom = {
  /** el("a", {href, text, className, ...attributes}, ...children): text always goes in as text, never as HTML. */
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "className") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  },

  /** The value of a json_script element; tolerates a view that passed an already-encoded JSON string. */
  readJson(id) {
    const node = document.getElementById(id);
    if (!node) return null;
    try {
      let value = JSON.parse(node.textContent);
      if (typeof value === "string") value = JSON.parse(value);
      return value;
    } catch (err) {
      return null;
    }
  },
};
