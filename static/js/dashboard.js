// Dashboard: refresh the rows of active runs (status, stage, progress, key metrics) every few seconds.
// Finished runs do not change, so only rows marked data-active="1" are polled; when a run finishes
// the page reloads once so its row (actions, final numbers) is rendered by the server again.
"use strict";
(() => {
  const table = document.getElementById("runs-table");
  if (!table) return;
  const POLL_MS = 3000;

  // Bars as the server rendered them: the width comes as data (CSP forbids style attributes).
  for (const bar of table.querySelectorAll(".progress span[data-percent]")) bar.style.width = `${bar.dataset.percent}%`;

  const fmt = (v, digits) => (typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "—");
  const cell = (row, name) => row.querySelector(`[data-cell="${name}"]`);

  function setMetric(row, name, m, digits, withMin) {
    const td = cell(row, name);
    if (!td || !m || m.last === undefined) return;
    td.textContent = fmt(m.last, digits);
    if (withMin) {
      const span = document.createElement("span");
      span.className = "muted";
      span.textContent = ` (${fmt(m.min, digits)})`;
      td.appendChild(span);
    }
  }

  function update(row, run) {
    const badge = cell(row, "status").querySelector(".badge");
    if (badge) {
      badge.textContent = run.status;
      badge.className = `badge status-${run.status}`;
    }
    const stageCell = cell(row, "stage");
    const chips = stageCell.querySelectorAll(".chip");
    run.stages.forEach((s, i) => {
      if (!chips[i]) return;
      chips[i].className = `chip status-${s.status}`;
      chips[i].title = `${s.name}: ${s.status}${s.note ? ` (${s.note})` : ""}`;
    });
    const p = run.progress;
    if (p && typeof p.fraction === "number") {
      let bar = stageCell.querySelector(".progress span");
      if (!bar) {
        const outer = document.createElement("div");
        outer.className = "progress";
        bar = document.createElement("span");
        outer.appendChild(bar);
        stageCell.appendChild(outer);
        const text = document.createElement("div");
        text.className = "muted small progress-text";
        stageCell.appendChild(text);
      }
      bar.style.width = `${Math.round(p.fraction * 100)}%`;
      const text = stageCell.querySelector(".progress-text") || stageCell.lastElementChild;
      const step = p.step !== null && p.step !== undefined ? ` · step ${p.step}${p.total ? "/" + p.total : ""}` : "";
      text.textContent = `${p.stage}${step} · ${Math.round(p.fraction * 100)}%`;
    }
    setMetric(row, "loss", run.metrics.loss, 3, true);
    setMetric(row, "val_bpb", run.metrics.val_bpb, 4, true);
    setMetric(row, "tok_per_sec", run.metrics.tok_per_sec, 0, false);
  }

  async function poll() {
    const rows = [...table.querySelectorAll('tr[data-active="1"]')];
    if (!rows.length) return;
    const ids = rows.map((r) => r.dataset.runId).join(",");
    try {
      const res = await fetch(`${table.dataset.pollUrl}?ids=${encodeURIComponent(ids)}`, { headers: { Accept: "application/json" } });
      if (!res.ok) return;
      const { runs } = await res.json();
      let finished = false;
      for (const run of runs) {
        const row = table.querySelector(`tr[data-run-id="${CSS.escape(run.id)}"]`);
        if (!row) continue;
        update(row, run);
        if (!["queued", "running", "pausing", "stopping"].includes(run.status)) finished = true;
      }
      if (finished) window.location.reload();
    } catch (err) {
      // Offline for a moment: try again at the next tick.
    }
  }
  setInterval(poll, POLL_MS);
})();
