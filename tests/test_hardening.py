"""What a studio on a shared GPU node needs: login throttling, a Content-Security-Policy on every
response, private files (database, secret key, runs) and no password-reset pages without mail.

The browser half of the CSP check (every page works under it, no violation reported) is
test_every_page_works_under_the_content_security_policy in test_studio_browser.py.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys

import pytest
from django.test import Client
from django.urls import clear_url_caches, reverse

from nanostudio.env import restrict_mode, umask_from_env
from studio import actions
from tests.conftest import REPO
from tests.test_studio_access import all_urls

PASSWORD = "a long password for tests"  # the `user` fixture's


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def defaults(settings, manage_env):
    """The defaults under test, whatever this machine's environment sets."""
    from datetime import timedelta

    settings.AXES_FAILURE_LIMIT = 5
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)
    for name in [k for k in manage_env if k.startswith(("EMAIL_", "NANOSTUDIO_UMASK", "NANOSTUDIO_LOGIN_"))]:
        del manage_env[name]


# --- login throttling ---------------------------------------------------------------------------------------

def log_in(client: Client, username: str, password: str, ip: str = "10.0.0.1"):
    return client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip)


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


@pytest.mark.django_db
def test_five_wrong_passwords_lock_that_username_from_that_address(user, django_user_model):
    attacker = Client()
    for _ in range(4):
        assert log_in(attacker, "ada", "guess").status_code == 200
    assert log_in(attacker, "ada", "guess").status_code == 429  # the fifth failure locks
    refused = log_in(attacker, "ada", PASSWORD)
    assert refused.status_code == 429 and not logged_in(attacker)
    page = refused.content.decode()
    assert "Too many failed logins" in page and "15 minutes" in page and 'name="password"' in page
    assert "script-src 'self'" in refused["Content-Security-Policy"]

    # The same person from another machine, and a colleague from the same address, are not affected.
    elsewhere = Client()
    assert log_in(elsewhere, "ada", PASSWORD, ip="10.0.0.2").status_code == 302 and logged_in(elsewhere)
    django_user_model.objects.create_user("grace", password=PASSWORD)
    colleague = Client()
    assert log_in(colleague, "grace", PASSWORD).status_code == 302 and logged_in(colleague)


@pytest.mark.django_db
def test_the_lockout_page_is_shown_under_asgi_too(user):
    """daphne runs the middleware chain async, where django-axes calls the lockout page with other arguments."""
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    client = AsyncClient()

    async def attempts():
        return [await client.post(reverse("login"), {"username": "ada", "password": password})
                for password in ["guess"] * 5 + [PASSWORD]]

    responses = async_to_sync(attempts)()
    assert [r.status_code for r in responses] == [200] * 4 + [429, 429]
    assert "Too many failed logins" in responses[-1].content.decode()


@pytest.mark.django_db
def test_a_correct_password_clears_earlier_mistakes(user):
    client = Client()
    for _ in range(4):
        log_in(client, "ada", "typo")
    assert log_in(client, "ada", PASSWORD).status_code == 302
    client.logout()
    for _ in range(4):
        log_in(client, "ada", "typo")
    assert log_in(client, "ada", PASSWORD).status_code == 302  # 8 mistakes in all, never 5 in a row


# --- Content-Security-Policy ---------------------------------------------------------------------------------

POLICY = ["default-src 'self'", "script-src 'self'", "connect-src 'self'", "object-src 'none'", "base-uri 'none'",
          "frame-ancestors 'none'", "form-action 'self'"]


@pytest.mark.django_db
def test_every_response_carries_the_content_security_policy(client, anon_client, admin_client, runs_dir):
    run = actions.create_run("tiny", {"stages": "tok_train"})
    pages, posts = all_urls(run.id)
    responses = [client.get(url) for url in pages] + [client.post(url) for url in posts]
    responses += [client.get(reverse("studio:chat_new")), client.get("/no/such/page/"),
                  anon_client.get(reverse("login")), anon_client.get(reverse("studio:dashboard")),
                  admin_client.get(reverse("admin:index"))]
    for response in responses:
        policy = response.get("Content-Security-Policy", "")
        assert all(part in policy for part in POLICY), (response.status_code, response.get("Location"), policy)
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


def test_no_template_has_inline_scripts_styles_or_handlers():
    """What the policy would block: <script> with code, style="...", <style> blocks, on*= attributes."""
    import re

    offending = []
    for path in sorted((REPO / "templates").rglob("*.html")):
        text = path.read_text()
        for pattern in (r"<script(?![^>]*\bsrc=)[^>]*>(?!\s*</script>)", r"\sstyle\s*=", r"<style", r"\son[a-z]+\s*="):
            offending += [f"{path.relative_to(REPO)}: {m.group(0)!r}" for m in re.finditer(pattern, text, re.I)]
    assert offending == []


# --- private files ----------------------------------------------------------------------------------------------

def manage(env, *args):
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    return result


def test_database_and_runs_are_private_to_their_owner(manage_env):
    home = manage_env["NANOSTUDIO_HOME"]
    db = manage_env["DATABASE_URL"].removeprefix("sqlite:///")
    manage(manage_env, "migrate", "--noinput")
    assert mode(db) & 0o077 == 0, oct(mode(db))
    runs = os.path.join(home, "runs")
    assert mode(runs) == 0o700 and mode(os.path.join(runs, ".secret_key")) == 0o600

    # An install from before: a world-readable database, WAL and runs folder are made private at start-up.
    for path in (db, db + "-wal"):
        open(path, "ab").close()
        os.chmod(path, 0o644)
    os.chmod(runs, 0o755)
    manage(manage_env, "check")
    assert mode(db) == 0o600 and mode(db + "-wal") == 0o600 and mode(runs) == 0o700

    # A run created by the web process or runjob: its folder and files are the owner's only.
    script = ("import django, json; django.setup(); from studio import actions;"
              "run = actions.create_run('tiny', {'stages': 'tok_train'}); print(json.dumps(str(run.run_dir)))")
    run_dir = json.loads(subprocess.run([sys.executable, "-c", script], cwd=REPO, env=manage_env, capture_output=True,
                                        text=True, check=True).stdout.splitlines()[-1])
    assert mode(run_dir) == 0o700 and mode(os.path.join(run_dir, "logs")) == 0o700
    assert mode(os.path.join(run_dir, "config.json")) == 0o600


def test_the_umask_comes_from_the_environment_and_is_checked(manage_env, tmp_path):
    assert umask_from_env({}) == 0o077 and umask_from_env({"NANOSTUDIO_UMASK": "027"}) == 0o027
    for bad in ("rw", "999", "-1", "7777"):
        with pytest.raises(ValueError, match="NANOSTUDIO_UMASK"):
            umask_from_env({"NANOSTUDIO_UMASK": bad})
    manage_env["NANOSTUDIO_UMASK"] = "027"
    manage(manage_env, "migrate", "--noinput")
    assert mode(manage_env["DATABASE_URL"].removeprefix("sqlite:///")) == 0o640
    loose = tmp_path / "loose"
    loose.write_text("x")
    loose.chmod(0o666)
    assert restrict_mode(loose, 0o077) and mode(loose) == 0o600
    assert not restrict_mode(loose, 0o077) and not restrict_mode(tmp_path / "missing", 0o077)


def test_collected_static_files_stay_readable_for_a_proxy(manage_env):
    manage(manage_env, "collectstatic", "--noinput")
    root = os.path.join(manage_env["NANOSTUDIO_HOME"], "staticfiles")
    assert mode(root) == 0o755 and mode(os.path.join(root, "js", "common.js")) == 0o644


# --- password reset ---------------------------------------------------------------------------------------------

def reload_urls():
    import nanostudio.urls

    importlib.reload(nanostudio.urls)
    clear_url_caches()


@pytest.mark.django_db
def test_password_reset_pages_exist_only_when_mail_is_configured(anon_client, settings):
    configured = settings.PASSWORD_RESET_ENABLED
    try:
        settings.PASSWORD_RESET_ENABLED = False  # the default (test_mail_settings_come_from_the_environment)
        reload_urls()
        for url in ("/accounts/password_reset/", "/accounts/password_reset/done/", "/accounts/reset/done/"):
            assert anon_client.get(url).status_code == 404, url
        assert "Forgot your password" not in anon_client.get(reverse("login")).content.decode()
        settings.PASSWORD_RESET_ENABLED = True
        reload_urls()
        assert anon_client.get("/accounts/password_reset/").status_code == 200
        assert "Forgot your password" in anon_client.get(reverse("login")).content.decode()
    finally:
        settings.PASSWORD_RESET_ENABLED = configured
        reload_urls()


def test_mail_settings_come_from_the_environment(manage_env):
    script = ("import json, django; django.setup(); from django.conf import settings as s;"
              "print(json.dumps([s.PASSWORD_RESET_ENABLED, s.EMAIL_HOST, s.EMAIL_PORT, s.EMAIL_USE_TLS]))")

    def read(**env):
        return json.loads(subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**manage_env, **env},
                                         capture_output=True, text=True, check=True).stdout)

    assert read()[0] is False
    assert read(EMAIL_HOST="smtp.example.org", EMAIL_PORT="587", EMAIL_USE_TLS="1") == [True, "smtp.example.org", 587, True]
    assert read(EMAIL_BACKEND="django.core.mail.backends.console.EmailBackend")[0] is True
