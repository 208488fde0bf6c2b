/* new_run.js: the live estimate of the new-run page.

   The page is rendered complete by the server (form, field errors and a first
   estimate), so it works without this script. With it, every change to the
   form asks the estimate endpoint again (debounced, stale requests aborted)
   and updates the panel and the field errors in place:

     GET <form data-estimate-url>?<the form's fields, minus the CSRF token>
       -> {"ok": true, "estimate": {...}}  or  {"ok": false, "errors": {field: message}}

   Numbers arrive already written for people (estimate["display"], made by
   pipeline/estimate.py, the same text as the CLI and the server-rendered page),
   so this file formats nothing and the two renderings cannot drift apart.
   Everything from the server is inserted as text (textContent), never as HTML.
*/
(function () {
  "use strict";

  const DEBOUNCE_MS = 250;

  const form = document.getElementById("new-run-form");
  const panel = document.getElementById("estimate");
  if (!form || !panel || !form.dataset.estimateUrl) return;
  const url = form.dataset.estimateUrl;
  const problem = panel.querySelector(".estimate-error");

  let timer = null;
  let inflight = null; // AbortController of the request whose answer we still want

  /** The form's values as a query string: the same fields a submit would send, minus the CSRF token. */
  function query() {
    const data = new FormData(form);
    data.delete("csrfmiddlewaretoken");
    return new URLSearchParams(data).toString();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, DEBOUNCE_MS);
  }

  async function refresh() {
    if (inflight) inflight.abort(); // its answer would describe settings that are no longer on screen
    const mine = new AbortController();
    inflight = mine;
    panel.classList.add("loading");
    panel.setAttribute("aria-busy", "true");
    try {
      const response = await fetch(`${url}?${query()}`, {
        signal: mine.signal,
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (!response.ok) throw new Error(`the server answered ${response.status} ${response.statusText}`);
      if (!(response.headers.get("Content-Type") || "").includes("json")) {
        // The login middleware answers a signed-out request with the login page, not JSON.
        throw new Error("the session has ended; reload the page and sign in");
      }
      const body = await response.json();
      if (inflight !== mine) return;
      showProblem("");
      if (body.ok) {
        showFieldErrors({});
        showEstimate(body.estimate);
      } else {
        showFieldErrors(body.errors || {});
        panel.dataset.state = "empty";
        setText(panel.querySelector(".estimate-empty"), "Fix the highlighted settings to see an estimate.");
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      showProblem(`Could not update the estimate: ${err.message}`);
    } finally {
      if (inflight === mine) {
        inflight = null;
        panel.classList.remove("loading");
        panel.removeAttribute("aria-busy");
      }
    }
  }

  function setText(el, text) {
    if (el) el.textContent = text;
  }

  function showProblem(text) {
    if (!problem) return;
    problem.textContent = text;
    problem.hidden = !text;
  }

  /** Fill every [data-est=key] with display[key], rebuild the stage rows and the warning lists. */
  function showEstimate(est) {
    const display = est.display || {};
    panel.dataset.state = "ready";
    for (const el of panel.querySelectorAll("[data-est]")) {
      const value = display[el.dataset.est];
      el.textContent = value === undefined || value === null ? "–" : String(value);
    }
    const memory = panel.querySelector("[data-est-memory]");
    if (memory) memory.classList.toggle("over", est.memory_fraction > 1);

    const rows = panel.querySelector("[data-est-stages]");
    if (rows) {
      rows.replaceChildren(...(display.stages || []).map((s) => {
        const tr = document.createElement("tr");
        tr.title = s.basis || "";
        const th = document.createElement("th");
        th.scope = "row";
        th.textContent = s.stage;
        const td = document.createElement("td");
        td.className = "num";
        td.textContent = s.time;
        tr.append(th, td);
        return tr;
      }));
    }
    for (const list of panel.querySelectorAll("[data-est-list]")) {
      const items = est[list.dataset.estList] || [];
      list.replaceChildren(...items.map((text) => {
        const li = document.createElement("li");
        li.textContent = text;
        return li;
      }));
      list.hidden = items.length === 0;
    }
  }

  /** Replace every field error on the page (server-rendered ones included) with `errors`. */
  function showFieldErrors(errors) {
    for (const old of form.querySelectorAll(".field .error")) old.remove();
    for (const field of form.querySelectorAll(".field.has-error")) field.classList.remove("has-error");
    const elsewhere = [];
    for (const [name, message] of Object.entries(errors)) {
      const text = Array.isArray(message) ? message.join(" ") : String(message);
      const field = form.querySelector(`.field[data-field="${CSS.escape(name)}"]`);
      if (!field) {
        elsewhere.push(name === "__all__" ? text : `${name}: ${text}`);
        continue;
      }
      field.classList.add("has-error");
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = text;
      field.append(p);
    }
    showProblem(elsewhere.join(" "));

    // The summary line above the form says whether anything needs fixing.
    let summary = form.querySelector(".form-errors-summary");
    const any = Object.keys(errors).length > 0;
    if (any && !summary) {
      summary = document.createElement("p");
      summary.className = "form-errors-summary";
      summary.setAttribute("role", "alert");
      summary.textContent = "Please fix the highlighted settings.";
      const first = form.querySelector(".field");
      form.insertBefore(summary, first);
    }
    if (summary) summary.hidden = !any;
  }

  /** Preset links keep the chosen hardware, so switching presets does not reset it. */
  function syncPresetLinks() {
    const hardware = form.elements.namedItem("hardware");
    if (!hardware) return;
    for (const link of document.querySelectorAll("a.preset[data-preset]")) {
      const params = new URLSearchParams({ preset: link.dataset.preset, hardware: hardware.value });
      link.href = `?${params}`;
    }
  }

  form.addEventListener("input", schedule);
  form.addEventListener("change", (event) => {
    if (event.target.name === "hardware") syncPresetLinks();
    schedule();
  });
  if (panel.dataset.state !== "ready") refresh();
})();
