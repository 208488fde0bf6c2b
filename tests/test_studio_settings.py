"""Settings from the environment, the deployment checklist, committed migrations."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import call_command

from nanostudio.env import database_config, envbool, envint, envlist, load_or_create_secret_key
from tests.conftest import REPO

# Warnings `check --deploy` may give on a plain-HTTP install: all about TLS.
TLS_CHECKS = {"security.W004", "security.W008", "security.W012", "security.W016"}


def manage(env, *args, timeout=120):
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("text, expected", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                            ("0", False), ("false", False), ("off", False), ("", False)])
def test_envbool(text, expected):
    assert envbool("DEBUG", not expected, {"DEBUG": text}) is expected


def test_envbool_default_and_typos():
    assert envbool("DEBUG", False, {}) is False
    with pytest.raises(ValueError, match="DEBUG='ture'"):
        envbool("DEBUG", False, {"DEBUG": "ture"})


def test_envint_and_envlist():
    assert envint("N", 3, {}) == 3 and envint("N", 3, {"N": " 7 "}) == 7
    with pytest.raises(ValueError):
        envint("N", 3, {"N": "seven"})
    assert envlist("H", ["a"], {}) == ["a"]
    assert envlist("H", ["a"], {"H": "x.org, y.org,,"}) == ["x.org", "y.org"]


def test_default_database_is_sqlite_tuned_for_several_processes(tmp_path):
    db = database_config({}, default_sqlite=tmp_path / "db.sqlite3")
    assert db["ENGINE"] == "django.db.backends.sqlite3" and db["NAME"] == str(tmp_path / "db.sqlite3")
    assert db["OPTIONS"]["timeout"] >= 20
    assert db["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in db["OPTIONS"]["init_command"]


def test_database_url_is_parsed(tmp_path):
    pg = database_config({"DATABASE_URL": "postgres://app:secret@db.local:5433/studio"})
    assert (pg["ENGINE"], pg["NAME"], pg["USER"], pg["PASSWORD"], pg["HOST"], pg["PORT"]) == (
        "django.db.backends.postgresql", "studio", "app", "secret", "db.local", 5433)
    assert "init_command" not in pg.get("OPTIONS", {})
    lite = database_config({"DATABASE_URL": f"sqlite:///{tmp_path}/other.sqlite3"})
    assert lite["NAME"] == f"{tmp_path}/other.sqlite3" and lite["OPTIONS"]["timeout"] >= 20


def test_secret_key_is_generated_once_private_and_kept(tmp_path):
    path = tmp_path / "runs" / ".secret_key"
    key = load_or_create_secret_key(path)
    assert len(key) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == [".secret_key"]  # no temporary left behind


def test_settings_module_reads_the_environment(manage_env, tmp_path):
    manage_env.update(DEBUG="1", ALLOWED_HOSTS="studio.example,10.0.0.5", CSRF_TRUSTED_ORIGINS="https://studio.example",
                      NANOSTUDIO_RUNS_DIR=str(tmp_path / "elsewhere"))
    script = (
        "import json, django; django.setup(); from django.conf import settings as s;"
        "print(json.dumps({'debug': s.DEBUG, 'hosts': s.ALLOWED_HOSTS, 'csrf': s.CSRF_TRUSTED_ORIGINS,"
        "'runs': str(s.NANOSTUDIO_RUNS_DIR), 'db': s.DATABASES['default']['NAME'], 'key': s.SECRET_KEY,"
        "'layer': s.CHANNEL_LAYERS['default']['BACKEND'], 'q': s.Q_CLUSTER, 'asgi': s.ASGI_APPLICATION,"
        "'apps': s.INSTALLED_APPS}))"
    )
    first = json.loads(subprocess.run([sys.executable, "-c", script], cwd=REPO, env=manage_env, capture_output=True, text=True, check=True).stdout)
    assert first["debug"] is True
    assert first["hosts"] == ["studio.example", "10.0.0.5"] and first["csrf"] == ["https://studio.example"]
    assert first["runs"] == str(tmp_path / "elsewhere")
    assert first["db"] == manage_env["DATABASE_URL"].removeprefix("sqlite:///")
    assert first["layer"] == "channels.layers.InMemoryChannelLayer"
    assert first["q"]["orm"] == "default" and first["q"]["retry"] > first["q"]["timeout"]
    assert first["asgi"] == "nanostudio.asgi.application" and first["apps"][0] == "daphne"
    assert (tmp_path / "elsewhere" / ".secret_key").read_text().strip() == first["key"]

    manage_env.update(REDIS_URL="redis://127.0.0.1:6379/0", DEBUG="0")
    second = json.loads(subprocess.run([sys.executable, "-c", script], cwd=REPO, env=manage_env, capture_output=True, text=True, check=True).stdout)
    assert second["key"] == first["key"]  # restarts keep sessions
    assert second["debug"] is False
    assert second["layer"] == "channels_redis.core.RedisChannelLayer"
    assert second["q"]["redis"] == "redis://127.0.0.1:6379/0" and "orm" not in second["q"]


def test_deploy_check_warns_only_about_tls(manage_env):
    result = manage(manage_env, "check", "--deploy")
    assert result.returncode == 0, result.stderr
    found = set(re.findall(r"\((\w+\.[EW]\d+)\)", result.stdout + result.stderr))
    assert found <= TLS_CHECKS, found - TLS_CHECKS


def test_deploy_check_is_clean_behind_tls(manage_env):
    manage_env.update(NANOSTUDIO_HTTPS="1", SECURE_HSTS_SECONDS="31536000",
                      SECURE_HSTS_INCLUDE_SUBDOMAINS="1", SECURE_HSTS_PRELOAD="1")
    result = manage(manage_env, "check", "--deploy")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.django_db
def test_migrations_are_committed():
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)  # exits 1 on missing migrations
    assert "No changes detected" in out.getvalue()
