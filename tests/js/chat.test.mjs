// Unit tests of the pure logic in static/js/chat.js (the chat page). Run: node --test tests/js/
import test from "node:test";
import assert from "node:assert/strict";
import {createRequire} from "node:module";

const require = createRequire(import.meta.url);
const C = require("../../static/js/chat.js");

const LIMITS = {max_message_chars: 8000, temperature: [0, 2], top_k: [0, 1000], max_tokens: [1, 2048], seed: [0, 2147483647]};

function msg(id, parent, role, extra = {}) {
  return {id, parent, role, content: "", parts: [], status: "done", probs: [], ...extra};
}

// A tree: 1 (user) -> 2, 4 (answers); 2 -> 3 (user); 1' = 5 (edited user) -> 6.
const TREE = [
  msg(1, null, "user", {content: "hi"}),
  msg(2, 1, "assistant"),
  msg(3, 2, "user", {content: "more"}),
  msg(4, 1, "assistant"),
  msg(5, null, "user", {content: "hello"}),
  msg(6, 5, "assistant"),
];

test("branch path follows parents from the leaf up to the root, oldest first", () => {
  assert.deepEqual(C.branchPath(TREE, 3).map((m) => m.id), [1, 2, 3]);
  assert.deepEqual(C.branchPath(TREE, 4).map((m) => m.id), [1, 4]);
  assert.deepEqual(C.branchPath(TREE, 6).map((m) => m.id), [5, 6]);
});

test("branch path is empty without a leaf and stops at a parent loop", () => {
  assert.deepEqual(C.branchPath(TREE, null), []);
  assert.deepEqual(C.branchPath(TREE, 99), []);
  const loop = [msg(1, 2, "user"), msg(2, 1, "assistant")];
  assert.deepEqual(C.branchPath(loop, 2).map((m) => m.id), [1, 2]);
});

test("siblings share parent and role and are ordered by id", () => {
  assert.deepEqual(C.siblingsOf(TREE, TREE[3]).map((m) => m.id), [2, 4]);
  // Root user messages are versions of each other (parent null).
  assert.deepEqual(C.siblingsOf(TREE, TREE[4]).map((m) => m.id), [1, 5]);
  assert.deepEqual(C.siblingsOf(TREE, TREE[2]).map((m) => m.id), [3]);
});

test("version info gives the 1-based index, the count and the neighbours to select", () => {
  assert.deepEqual(C.versionInfo(TREE, TREE[1]), {index: 1, count: 2, prev: null, next: 4});
  assert.deepEqual(C.versionInfo(TREE, TREE[3]), {index: 2, count: 2, prev: 2, next: null});
  assert.deepEqual(C.versionInfo(TREE, TREE[2]), {index: 1, count: 1, prev: null, next: null});
  const byId = new Map(TREE.map((m) => [m.id, m]));
  assert.deepEqual(C.versionInfo(byId, byId.get(5)), {index: 2, count: 2, prev: 1, next: null});
});

test("a delta appends to an existing part", () => {
  const m = msg(7, 1, "assistant", {parts: [{type: "text", text: "Hel", html: "<p>Hel</p>"}], status: "streaming"});
  C.applyDelta(m, [[0, "text", "lo"], [0, "text", "!"]], [], "chat");
  assert.deepEqual(m.parts, [{type: "text", text: "Hello!"}]);  // the stale html is gone
  assert.equal(m.content, "Hello!");
});

test("a delta with a new index opens a part of its type", () => {
  const m = msg(7, 1, "assistant", {status: "streaming"});
  C.applyDelta(m, [[0, "text", "2+2 is "], [1, "python", "2+2"], [2, "python_output", "4"], [3, "text", " 4."]], null, "chat");
  assert.deepEqual(m.parts.map((p) => [p.type, p.text]), [["text", "2+2 is "], ["python", "2+2"], ["python_output", "4"], ["text", " 4."]]);
  // Chat answers read as their text parts; completion documents keep everything.
  assert.equal(m.content, "2+2 is  4.");
  assert.equal(C.messageText(m, "completion"), "2+2 is 2+24 4.");
});

test("a delta's probs are appended in order", () => {
  const m = msg(8, 1, "assistant", {probs: [{t: "a", p: 0.5, top: []}]});
  C.applyDelta(m, [[0, "text", "ab"]], [{t: "b", p: 0.25, top: []}], "completion");
  assert.deepEqual(m.probs.map((p) => p.t), ["a", "b"]);
});

test("valid settings become numbers and a blank seed means random", () => {
  const {settings, errors} = C.validateSettings({temperature: "0.7", top_k: "40", max_tokens: "128", seed: ""}, LIMITS);
  assert.deepEqual(errors, {});
  assert.deepEqual(settings, {temperature: 0.7, top_k: 40, max_tokens: 128, seed: null});
});

test("settings outside the limits get a message naming the bounds", () => {
  const {errors} = C.validateSettings({temperature: "2.5", top_k: "1001", max_tokens: "0", seed: "-1"}, LIMITS);
  assert.equal(errors.temperature, "Temperature must be between 0 and 2, not 2.5.");
  assert.equal(errors.top_k, "Top-k must be between 0 and 1000, not 1001.");
  assert.equal(errors.max_tokens, "Max tokens must be between 1 and 2048, not 0.");
  assert.equal(errors.seed, "Seed must be between 0 and 2147483647 or blank for random, not -1.");
});

test("settings that are not whole numbers or are blank are refused", () => {
  const {settings, errors} = C.validateSettings({temperature: "", top_k: "2.5", max_tokens: "abc", seed: "7"}, LIMITS);
  assert.equal(errors.temperature, "Temperature is required (between 0 and 2).");
  assert.equal(errors.top_k, "Top-k must be a whole number between 0 and 1000.");
  assert.equal(errors.max_tokens, "Max tokens must be a whole number between 1 and 2048.");
  assert.equal(settings.seed, 7);
  assert.ok(!("top_k" in settings));
});

test("step options list latest first, then every step newest first", () => {
  assert.deepEqual(C.stepOptions([5, 10, 20]), [
    {value: "", label: "latest (step 20)"}, {value: "20", label: "step 20"},
    {value: "10", label: "step 10"}, {value: "5", label: "step 5"},
  ]);
  assert.deepEqual(C.stepOptions([]), [{value: "", label: "latest"}]);
});

test("the completion document is the branch's texts in order, the model's tokens aligned to their probs", () => {
  const branch = [
    msg(1, null, "user", {content: "Once upon"}),
    msg(2, 1, "assistant", {parts: [{type: "text", text: " a time"}], probs: [{t: " a", p: 0.9, top: []}, {t: " time", p: 0.6, top: []}]}),
    msg(3, 2, "user", {content: ", there"}),
    msg(4, 3, "assistant", {parts: [{type: "text", text: " was"}], probs: [{t: " was", p: 0.8, top: []}]}),
  ];
  assert.equal(C.documentText(branch), "Once upon a time, there was");
  const segments = C.documentSegments(branch);
  assert.deepEqual(segments.map((s) => [s.role, s.text]), [["user", "Once upon"], ["assistant", " a time"], ["user", ", there"], ["assistant", " was"]]);
  assert.deepEqual(segments[1].tokens.map((t) => [t.text, t.prob.p]), [[" a", 0.9], [" time", 0.6]]);
  assert.equal(segments[0].tokens, null);
});

test("token texts that do not match the stored text leave the rest as one plain segment", () => {
  // A token that is half a UTF-8 character decodes alone to U+FFFD, not to the text the answer holds.
  const segments = C.alignTokens("café!", [{t: "caf", p: 0.5}, {t: "\uFFFD", p: 0.1}, {t: "\uFFFD!", p: 0.2}]);
  assert.deepEqual(segments.map((s) => [s.text, s.prob && s.prob.p]), [["caf", 0.5], ["é!", null]]);
});

test("auto-continue picks an interrupted leaf, or a streaming one nobody is writing", () => {
  const base = [msg(1, null, "user"), msg(2, 1, "assistant", {status: "interrupted"})];
  assert.equal(C.autoContinueTarget({messages: base, leaf: 2, generating: null}), 2);
  const streaming = [msg(1, null, "user"), msg(2, 1, "assistant", {status: "streaming"})];
  assert.equal(C.autoContinueTarget({messages: streaming, leaf: 2, generating: null}), 2);
  assert.equal(C.autoContinueTarget({messages: streaming, leaf: 2, generating: 2}), null);
  const done = [msg(1, null, "user"), msg(2, 1, "assistant", {status: "done"})];
  assert.equal(C.autoContinueTarget({messages: done, leaf: 2, generating: null}), null);
  assert.equal(C.autoContinueTarget({messages: base, leaf: 1, generating: null}), null);
});

test("the character counter says when a message is over the limit", () => {
  assert.deepEqual(C.charCounter(12, 8000), {text: "12 / 8,000", over: false});
  assert.deepEqual(C.charCounter(8001, 8000), {text: "8,001 / 8,000", over: true});
});

test("the sidebar filter matches titles case-insensitively", () => {
  assert.ok(C.titleMatches("Hello World", "world"));
  assert.ok(C.titleMatches("anything", "  "));
  assert.ok(!C.titleMatches("Hello", "bye"));
});

test("rename and delete URLs hang off the conversation URL", () => {
  assert.equal(C.actionUrl("/chat/12/", "rename"), "/chat/12/rename/");
  assert.equal(C.actionUrl("/chat/12", "delete"), "/chat/12/delete/");
});

test("the picker finds the checkpoint of the settings by run and stage", () => {
  const checkpoints = [{run: "b", stage: "sft_train"}, {run: "a", stage: "sft_train"}, {run: "a", stage: "base_train"}];
  assert.equal(C.findCheckpoint(checkpoints, {run: "a", stage: "base_train"}), 2);
  assert.equal(C.findCheckpoint(checkpoints, {run: "gone", stage: "sft_train"}), -1);
  assert.equal(C.findCheckpoint(checkpoints, null), -1);
});

test("a conversation sent in frames is put back together, in order, once its last frame came", () => {
  const a = C.conversationAssembler();
  const conv = {id: 7};
  assert.equal(a.feed({type: "conversation", conversation: conv, messages: [msg(1, null, "user")], leaf: 3, generating: null, more: true}), null);
  assert.equal(a.waiting, true);
  assert.equal(a.feed({type: "messages", conversation: 7, messages: [msg(2, 1, "assistant")], more: true}), null);
  // A piece of another conversation (one the page opened before) is not mixed in.
  assert.equal(a.feed({type: "messages", conversation: 8, messages: [msg(99, null, "user")], more: false}), null);
  const whole = a.feed({type: "messages", conversation: 7, messages: [msg(3, 2, "user")], more: false});
  assert.deepEqual(whole.messages.map((m) => m.id), [1, 2, 3]);
  assert.equal(whole.leaf, 3);
  assert.equal("more" in whole, false);
  assert.equal(a.waiting, false);
});

test("a conversation in one frame is whole at once, and a new one starts the assembly over", () => {
  const a = C.conversationAssembler();
  const one = a.feed({type: "conversation", conversation: {id: 1}, messages: [msg(1, null, "user")], leaf: 1, more: false});
  assert.deepEqual(one.messages.map((m) => m.id), [1]);
  a.feed({type: "conversation", conversation: {id: 2}, messages: [msg(5, null, "user")], more: true});
  a.feed({type: "conversation", conversation: {id: 2}, messages: [msg(6, null, "user")], more: true});  // re-opened
  const whole = a.feed({type: "messages", conversation: 2, messages: [msg(7, 6, "assistant")], more: false});
  assert.deepEqual(whole.messages.map((m) => m.id), [6, 7]);
  assert.equal(a.feed({type: "messages", conversation: 2, messages: [], more: false}), null);  // nothing pending
});

test("probs frames fill a message's token probabilities from their offset", () => {
  const m = msg(4, 3, "assistant", {probs: []});
  C.applyProbs(m, 0, [{t: "a", p: 0.5, top: []}, {t: "b", p: 0.4, top: []}]);
  C.applyProbs(m, 2, [{t: "c", p: 0.3, top: []}]);
  assert.deepEqual(m.probs.map((p) => p.t), ["a", "b", "c"]);
  C.applyProbs(m, 2, [{t: "c", p: 0.3, top: []}]);  // a piece seen twice (a re-open) changes nothing
  assert.equal(m.probs.length, 3);
  C.applyProbs(m, 5, [{t: "f", p: 0.1, top: []}]);  // a lost piece leaves a gap, the rest stays in place
  assert.equal(m.probs.length, 6);
  assert.equal(m.probs[5].t, "f");
  C.applyProbs(m, -1, [{t: "x"}]);
  C.applyProbs(m, "2", [{t: "x"}]);
  assert.equal(m.probs[2].t, "c");
});
