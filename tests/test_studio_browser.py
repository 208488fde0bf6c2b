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
