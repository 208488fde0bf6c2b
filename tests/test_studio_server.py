"""The real ASGI server: daphne serves the pages and the static files, with DEBUG off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO


def fetch(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers, response.read()


@pytest.mark.slow
def test_daphne_serves_login_page_static_files_and_plotly(manage_env, free_port):
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=REPO, env=manage_env,
                   check=True, capture_output=True, timeout=120)
    daphne = Path(sys.executable).with_name("daphne")
    server = subprocess.Popen(
        [str(daphne), "-b", "127.0.0.1", "-p", str(free_port), "nanostudio.asgi:application"],
        cwd=REPO, env=manage_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, headers, body = fetch(base + "/")
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "daphne did not answer within 30 s"
                time.sleep(0.2)
        # Anonymous visitors land on the login page (urllib follows the redirect).
        html = body.decode()
        assert status == 200 and 'name="password"' in html and "createsuperuser --noinput" in html
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"

        status, headers, css = fetch(base + "/static/css/studio.css")
        assert status == 200 and headers["Content-Type"].startswith("text/css")
        assert css == (REPO / "static" / "css" / "studio.css").read_bytes()

        # plotly.js comes from the plotly package, served locally (no CDN).
        status, headers, js = fetch(base + "/static/plotly/plotly.min.js")
        assert status == 200 and len(js) > 1_000_000 and b"plotly" in js[:2000].lower()
        with pytest.raises(urllib.error.HTTPError) as missing:
            fetch(base + "/static/css/nope.css")
        assert missing.value.code == 404
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
