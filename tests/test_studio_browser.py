"""End to end in a real browser: headless Chromium drives the studio served by daphne + qcluster.

Embedded default mode (SQLite, django-q2's ORM broker, in-memory channel
layer): the run page's live view comes from the WebSocket consumer tailing
the run's events, with the pipeline running in a separate worker process.
Needs /usr/bin/chromium (Debian's; never `playwright install`) and the data
mirror. Run with:

    .venv/bin/python -m pytest tests/test_studio_browser.py -q

On failure a screenshot, the page's HTML and its console log are saved under
the test's tmp dir and their paths printed.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers import mirror
from tests.servers import RunSocket, StudioServer, require_chromium

pytestmark = pytest.mark.slow

# The loss chart's x values (steps, tokens, FLOPs or seconds: whatever axis is shown), [] before Plotly draws.
CHART_X = """() => {
    const chart = document.getElementById('chart-loss');
    return chart && chart.data && chart.data.length ? Array.from(chart.data[0].x || []) : [];
}"""


def strictly_increasing(values) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def save_evidence(page, console: list[str], folder) -> None:
    """Screenshot, HTML and console log of a failed page, for reading a CI failure afterwards."""
    paths = {"screenshot": folder / "failure.png", "html": folder / "failure.html", "console": folder / "console.log"}
    try:
        page.screenshot(path=str(paths["screenshot"]), full_page=True)
        paths["html"].write_text(page.content())
    except Exception as e:  # the page may be gone with the error itself; keep what we can
        print(f"could not capture the page: {e}")
    paths["console"].write_text("\n".join(console))
    for what, path in paths.items():
        print(f"{what}: {path}")


def log_in(page, studio: StudioServer) -> None:
    page.goto(studio.url("/accounts/login/"))
    page.fill('input[name="username"]', studio.username)
    page.fill('input[name="password"]', studio.password)
    with page.expect_navigation():
        page.click('form:has(input[name="password"]) [type="submit"]')
    assert "/accounts/login/" not in page.url, "still on the login page after submitting the form"


def queue_smoke_run(page, studio: StudioServer) -> str:
    """Submit the new-run form as shown for the smoke preset; return the run id from the page we land on."""
    page.goto(studio.url("/runs/new/?preset=smoke"))
    with page.expect_navigation():
        page.click('form:has(input[name="preset"]) [type="submit"]')
    landed = re.search(r"/runs/([^/]+)/$", page.url)
    assert landed, f"the form did not lead to a run page but to {page.url}"
    return landed.group(1)


def wait_for_points(page, at_least: int, timeout_s: float) -> list:
    page.wait_for_function(f"() => ({CHART_X})().length >= {at_least}", timeout=timeout_s * 1000)
    return page.evaluate(CHART_X)


def test_run_page_follows_a_smoke_run_live_across_a_reload(manage_env, tmp_path):
    chromium = require_chromium()
    from playwright.sync_api import expect, sync_playwright

    env = {**manage_env, "NANOSTUDIO_DATA_MIRROR": str(mirror())}
    with StudioServer(env, tmp_path / "studio") as studio, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
        try:
            log_in(page, studio)
            run_id = queue_smoke_run(page, studio)
            expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)

            # tok_train and tok_eval come first; base_train's loss points arrive a minute or so later.
            before = wait_for_points(page, 2, timeout_s=240)
            status = page.locator("#run-status").text_content().strip()
            assert status == "running", f"the run is {status!r} already: nothing left to reload into"

            page.reload()
            expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)
            after = wait_for_points(page, len(before), timeout_s=30)
            assert strictly_increasing(after), f"x values after the reload repeat or go back: {after}"
            # The snapshot after the reload starts with the very points the first page had: none lost.
            assert after[:len(before)] == before, f"before reload {before}, after {after}"

            expect(page.locator("#run-status")).to_have_text("done", timeout=300_000)
            report = page.locator("#report")
            expect(report).to_contain_text("Metric", timeout=60_000)
            # The report card is rebuilt and pushed as the stages end: the page shows training's final state.
            expect(report).to_contain_text(re.compile(r"Base model training \(base_train\)\s*Status:\s*done"),
                                           timeout=60_000)

            final = page.evaluate(CHART_X)
            assert strictly_increasing(final), f"x values repeat or go back: {final}"
            with RunSocket(studio, studio.login(), run_id) as ws:
                snapshot = ws.receive_until(lambda m: m["type"] == "snapshot")[-1]
            steps = [e["step"] for e in snapshot["events"]
                     if e["kind"] == "metric" and e["stage"] == "base_train" and "step" in e]
            # Live events plus one reload must add up to every training step exactly once.
            assert len(final) == len(steps), f"the chart has {len(final)} points, the run {len(steps)} steps"

            # The compare page draws the same run from its own socket.
            page.goto(studio.url(f"/compare/?runs={run_id}"))
            assert wait_for_points(page, len(steps), timeout_s=30) == final
            assert [m for m in console if m.startswith("pageerror")] == []
        except BaseException:
            save_evidence(page, console, tmp_path)
            raise
        finally:
            browser.close()


# A run with twenty training steps and two validation points, written as a stage would write them,
# so the run and compare pages have curves to draw without training anything.
SEED_RUN = """
from studio import actions, ingest
from pipeline.events import EventWriter
run = actions.create_run("smoke", {"stages": "tok_train,base_train"}, name="csp check")
events = EventWriter(run.run_dir, "base_train")
events.start()
events.emit("setup", num_iterations=20)
for step in range(1, 21):
    events.metric(step=step, loss=5 - step / 10, smooth_loss=5 - step / 10, lrm=1.0, dt=0.1, tok_per_sec=1000.0,
                  mfu=1.0, peak_mem_mb=100.0, fraction=step / 20)
    if step % 10 == 0:
        events.emit("eval", name="val_bpb", step=step, val_bpb=2 - step / 100)
ingest.ingest_events(run)  # what the worker does as a stage runs: the pages read events from the database
# A checkpoint as the chat page lists it (never loaded here), so the chat page opens its socket.
from pipeline.checkpoints import CHECKPOINT_FILES
step_dir = run.run_dir / "checkpoints" / "base_train" / "step_20"
step_dir.mkdir(parents=True)
for name in CHECKPOINT_FILES:
    (step_dir / name).write_text("{}")
print(run.id)
"""

# Every violation of the page's Content-Security-Policy, as a console line the test collects.
REPORT_CSP_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) => {
    console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"} at ` +
                  `${e.sourceFile}:${e.lineNumber} ${e.sample || ""}`);
});
"""


def test_every_page_works_under_the_content_security_policy(manage_env, tmp_path):
    """Login, dashboard, new run (live estimate), run page (socket, charts), compare, chat and admin:
    no CSP violation reported, and each page does its job (so nothing was silently blocked)."""
    chromium = require_chromium()
    from playwright.sync_api import expect, sync_playwright

    with StudioServer(manage_env, tmp_path / "studio") as studio, sync_playwright() as playwright:
        run_id = studio.manage("shell", "-c", SEED_RUN).stdout.split()[-1]
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        page.add_init_script(REPORT_CSP_VIOLATIONS)
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
        try:
            response = page.goto(studio.url("/accounts/login/"))
            assert "script-src 'self'" in response.headers["content-security-policy"]
            log_in(page, studio)

            page.goto(studio.url("/"))  # dashboard; its progress bars get their width from dashboard.js
            bar = page.locator(f'tr[data-run-id="{run_id}"] .progress span')
            expect(bar).to_be_attached()
            assert bar.evaluate("e => e.getBoundingClientRect().width") > 0, "the progress bar has no width"

            page.goto(studio.url("/runs/new/?preset=smoke"))  # the estimate is fetched again on every change
            params = page.locator('[data-est="params"]')
            before = params.text_content()
            page.fill('input[name="depth"]', "3")
            expect(params).not_to_have_text(before, timeout=10_000)

            page.goto(studio.url(f"/runs/{run_id}/"))
            expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)
            assert wait_for_points(page, 20, timeout_s=30) == list(range(1, 21))
            # Plotly's own stylesheet applies (its layers are stacked, not laid out one below the other).
            assert page.evaluate("getComputedStyle(document.querySelector('#chart-loss .main-svg')).position") == "absolute"

            page.goto(studio.url(f"/compare/?runs={run_id}"))
            assert wait_for_points(page, 20, timeout_s=30) == list(range(1, 21))
            expect(page.locator(f'#compare-rows tr[data-run="{run_id}"] .swatch')).to_have_css(
                "background-color", re.compile(r"rgb\("))

            page.goto(studio.url("/chat/"))
            expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)

            page.goto(studio.url("/admin/"))
            expect(page.locator("#site-name")).to_be_visible()
            page.goto(studio.url(f"/admin/studio/run/{run_id}/change/"))
            expect(page.locator("#run_form")).to_be_visible()

            problems = [m for m in console if "CSP violation" in m or "Content Security Policy" in m
                        or m.startswith("pageerror")]
            assert problems == [], "\n".join(problems)
        except BaseException:
            save_evidence(page, console, tmp_path)
            raise
        finally:
            browser.close()
