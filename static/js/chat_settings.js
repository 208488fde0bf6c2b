/* chat_settings.js: the settings of the chat page (window.NanoChatSettings): the checkpoint picker
   (#ckpt-select, #step-select) and the sampling panel (#set-temperature, #set-top_k,
   #set-max_tokens, #set-seed).

   The server renders the inputs with chat_config.limits as min/max; values are checked against the
   same limits here (validateSettings, exported for node tests through chat.js), each field showing
   its own error. A change is remembered at once and sent to the open conversation as a "settings"
   message after a pause in typing (SETTINGS_DEBOUNCE_MS).

   NanoChatSettings.create(deps) starts it; chat.js passes deps:
     checkpoints, limits    from chat_config
     initial                chat_config.settings (run, stage, step and the sampling values)
     conversation()         the open conversation, or null
     hasMessages()          whether it has messages (then the picker keeps its mode)
     send(msg)              the socket's send
     changed()              after every change: redraw (the mode may have changed)
   and gets {values, load, fill, current, check, invalid, showError, checkpointMode}.
*/
(function (root) {
  "use strict";

  const SETTINGS_DEBOUNCE_MS = 600;
  const SAMPLING_FIELDS = ["temperature", "top_k", "max_tokens", "seed"];
  const FIELD_LABELS = {temperature: "Temperature", top_k: "Top-k", max_tokens: "Max tokens", seed: "Seed"};

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

  function create(deps) {
    const {el} = root.NanoDom;
    const $ = (id) => document.getElementById(id);
    const {checkpoints, limits, send} = deps;
    const ckptSelect = $("ckpt-select");
    const stepSelect = $("step-select");
    let settings = Object.assign({}, deps.initial || {});
    let settingsTimer = null;

    function fillCheckpointPicker() {
      if (!ckptSelect) return;
      const i = findCheckpoint(checkpoints, settings);
      const hasMessages = deps.hasMessages();
      const conv = deps.conversation();
      ckptSelect.replaceChildren(...checkpoints.map((c, k) => {
        const label = `${c.run_label} · ${c.stage}${c.mode === "completion" ? " (completion)" : ""}`;
        const option = el("option", {value: String(k), text: label});
        // An answered conversation keeps its mode: the server refuses the other kind.
        if (hasMessages && conv && c.mode !== conv.mode) {
          option.disabled = true;
          option.textContent = `${label} — new chat needed`;
        }
        return option;
      }));
      if (i < 0 && settings.run) {
        ckptSelect.prepend(el("option", {value: "", text: `${settings.run} · ${settings.stage || "?"} (not available)`}));
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
      const want = settings.step === null || settings.step === undefined ? "" : String(settings.step);
      stepSelect.value = [...stepSelect.options].some((o) => o.value === want) ? want : "";
    }

    function fillSampling() {
      for (const field of SAMPLING_FIELDS) {
        const node = $(`set-${field}`);
        if (!node || node === document.activeElement) continue;
        const value = settings[field];
        node.value = value === null || value === undefined ? "" : String(value);
      }
      checkSampling();
    }

    /** Picker and panel drawn from the remembered settings. */
    function fill() {
      fillCheckpointPicker();
      fillSampling();
    }

    /** Settings from the server (the conversation's, or a "settings" message): remembered and shown. */
    function load(values) {
      settings = Object.assign({}, values);
      fill();
    }

    function readSampling() {
      const values = {};
      for (const field of SAMPLING_FIELDS) {
        const node = $(`set-${field}`);
        values[field] = node ? node.value : settings[field];
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
      const out = Object.assign({}, settings);
      const i = ckptSelect && ckptSelect.value !== "" ? Number(ckptSelect.value) : -1;
      if (checkpoints[i]) {
        out.run = checkpoints[i].run;
        out.stage = checkpoints[i].stage;
      }
      if (stepSelect) out.step = stepSelect.value === "" ? null : Number(stepSelect.value);
      Object.assign(out, validateSettings(readSampling(), limits).settings);
      return out;
    }

    /** A change in the panel: remember it, and tell an open conversation after a pause in typing. */
    function settingsChanged() {
      const result = checkSampling();
      settings = currentSettings();
      deps.changed();  // the mode may have changed (chat <-> completion)
      if (Object.keys(result.errors).length || !deps.conversation()) return;
      if (settingsTimer !== null) root.clearTimeout(settingsTimer);
      settingsTimer = root.setTimeout(() => {
        settingsTimer = null;
        const conv = deps.conversation();
        if (conv) send({type: "settings", conversation: conv.id, settings: currentSettings()});
      }, SETTINGS_DEBOUNCE_MS);
    }

    /** An error the server gave for a setting, under its field; false when no field shows it. */
    function showSettingsError(field, text) {
      const note = $(`err-${field}`) || (["run", "stage", "step"].includes(field) ? $("err-checkpoint") : null);
      if (!note) return false;
      note.textContent = text;
      note.hidden = false;
      return true;
    }

    /** The mode of the picked checkpoint ("chat" when none is known). */
    function checkpointMode() {
      const i = findCheckpoint(checkpoints, settings);
      return i >= 0 ? checkpoints[i].mode : "chat";
    }

    ckptSelect?.addEventListener("change", () => {
      // A new checkpoint starts at its latest step.
      settings.step = null;
      const i = Number(ckptSelect.value);
      if (checkpoints[i]) Object.assign(settings, {run: checkpoints[i].run, stage: checkpoints[i].stage});
      fillSteps();
      const note = $("err-checkpoint");
      if (note) note.hidden = true;
      settingsChanged();
    });
    stepSelect?.addEventListener("change", settingsChanged);
    for (const field of SAMPLING_FIELDS) $(`set-${field}`)?.addEventListener("input", settingsChanged);

    return {
      values: () => settings, load, fill, current: currentSettings, check: checkSampling,
      invalid: settingsInvalid, showError: showSettingsError, checkpointMode,
    };
  }

  const NanoChatSettings = {SAMPLING_FIELDS, validateSettings, stepOptions, findCheckpoint, create};
  root.NanoChatSettings = NanoChatSettings;
  if (typeof module !== "undefined" && module.exports) module.exports = NanoChatSettings;
})(typeof window !== "undefined" ? window : globalThis);
