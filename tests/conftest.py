"""Fixtures shared by the test files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # pytest resets warning filters per test, dropping the one in settings.py:
    # STATIC_ROOT only exists after collectstatic, and WhiteNoise serves from static/ anyway.
    config.addinivalue_line("filterwarnings", "ignore:No directory at:UserWarning")


@pytest.fixture
def runs_dir(tmp_path, settings):
    """A fresh NANOSTUDIO_RUNS_DIR for the test."""
    path = tmp_path / "runs"
    path.mkdir()
    settings.NANOSTUDIO_RUNS_DIR = path
    return path


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("ada", password="a long password for tests")


@pytest.fixture
def client(client, user):
    """pytest-django's test client, logged in: every studio page needs a login."""
    client.force_login(user)
    return client


@pytest.fixture
def anon_client():
    from django.test import Client

    return Client()


@pytest.fixture
def manage_env(tmp_path):
    """Environment for `manage.py` / daphne subprocesses: own SQLite file, runs dir and secret key."""
    studio_settings = {"SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "REDIS_URL", "NANOSTUDIO_HTTPS",
                       "NANOSTUDIO_SECRET_KEY_FILE", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS"}
    env = {k: v for k, v in os.environ.items() if k not in studio_settings}
    home = tmp_path / "home"
    home.mkdir()
    env.update(
        NANOSTUDIO_HOME=str(home),
        NANOSTUDIO_RUNS_DIR=str(home / "runs"),
        DATABASE_URL=f"sqlite:///{home / 'db.sqlite3'}",
        DJANGO_SETTINGS_MODULE="nanostudio.settings",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting for
    each other turn a 50 us matmul into 15 ms. Restored afterwards for the other test files."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def free_port():
    from tests.helpers import free_port

    return free_port()


# --- fake pipeline stages --------------------------------------------------------------------
# Real subprocesses that behave like stage commands (write events with
# EventWriter, print to their log, exit with a code), so the studio's process
# handling is tested without training anything.

FAKE_STAGE = r'''
import os, signal, subprocess, sys, time
from pipeline.events import EventWriter

run_dir, stage, mode = sys.argv[1:4]
events = EventWriter(run_dir, stage)
events.start()
print(f"{stage}: fake stage in mode {mode}", flush=True)
if mode == "ok":
    for step in range(3):
        events.metric(step=step, loss=3.0 - step)
    events.emit("eval", name="fake", score=0.5)
    events.end(status="done")
elif mode == "fail":
    for i in range(30):
        print(f"log line {i}")
    events.error("fake failure")
    sys.exit(3)
elif mode in ("hang", "stubborn"):
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild too
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(os.path.join(run_dir, stage + ".grandchild"), "w") as f:
        f.write(str(child.pid))
    events.metric(step=0, note="waiting")
    time.sleep(300)
elif mode == "pausable":
    # Like a training stage: steps until SIGTERM, then saves a checkpoint and exits 75;
    # started again with --resume it continues from the checkpoint and finishes.
    ckpt = os.path.join(run_dir, "checkpoints", stage)
    if "--resume" in sys.argv:
        steps = sorted(os.listdir(ckpt))
        events.emit("resume", checkpoint=steps[-1])
        events.end(status="done")
        sys.exit(0)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    step = 0
    while not stop:
        step += 1
        events.metric(step=step, loss=5.0 / step)
        time.sleep(0.05)
    os.makedirs(os.path.join(ckpt, f"step_{step:06d}"))
    open(os.path.join(ckpt, f"step_{step:06d}", "model.safetensors"), "w").close()  # complete = meta.json + weights
    open(os.path.join(ckpt, f"step_{step:06d}", "meta.json"), "w").write("{}")
    events.emit("checkpoint", step=step)
    sys.exit(75)
elif mode == "sigterm-parent":
    os.kill(os.getppid(), signal.SIGTERM)  # as if someone stopped the supervisor
    time.sleep(300)
'''


@pytest.fixture
def fake_stages(monkeypatch, tmp_path, settings):
    """Replace each stage's command by the fake above; returns {stage: mode} to edit (default "ok")."""
    from pipeline import config, stages

    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    modes: dict[str, str] = {}

    def stage_commands(cfg, run_dir, python=None):
        return [
            config.StageCommand(name, [sys.executable, str(script), str(run_dir), name, modes.get(name, "ok")],
                                distributed=stages.get(name).distributed, env={"PYTHONPATH": str(REPO)})
            for name in cfg["stages"]
        ]

    monkeypatch.setattr(config, "stage_commands", stage_commands)
    settings.NANOSTUDIO_CANCEL_GRACE = 1.0
    return modes
