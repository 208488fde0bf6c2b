"""Runs the front end's unit tests (tests/js/*.mjs) with node's built-in test runner.

    node --test tests/js/          # the same tests, directly

They cover static/js/charts.js (smoothing, x axes, colours, seq merging, the
incremental chart updates) and static/js/live.js (the WebSocket protocol
client: hello/after, de-duplication, heartbeat, backoff, final close codes).
Without node the test is skipped locally and fails in CI (env CI set), so CI
cannot pass without running them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_js_unit_tests_pass():
    node = shutil.which("node")
    if node is None:
        message = "node is not installed: the JavaScript unit tests in tests/js/ did not run"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Files named explicitly: how node treats a directory argument changed across versions.
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests" / "js").glob("*.test.mjs"))
    assert files, "no tests/js/*.test.mjs found"
    result = subprocess.run([node, "--test", *files], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"node --test {' '.join(files)} failed:\n{result.stdout}\n{result.stderr}"
    assert "# fail 0" in result.stdout, result.stdout
