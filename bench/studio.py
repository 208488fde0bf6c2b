"""Benchmark the studio's live path: event-to-page latency, run page load, training overhead.

Usage:
    python bench/studio.py                        # everything: 20 s of streaming, 10^5 points, 2 x 150 steps
    python bench/studio.py --quick                # smoke run (< 3 min): 3 s of streaming, 10^4 points, 40 steps
    python bench/studio.py --only latency --redis # one part; --redis adds the Redis-woken measurement
    python bench/studio.py --steps 300 --repeats 3 --out bench/results/studio.json

Everything runs the way a person runs the studio: a temporary NANOSTUDIO_HOME
with its own SQLite file, `manage.py migrate`, a superuser from
`createsuperuser --noinput`, daphne serving nanostudio.asgi, and each run
executed by a supervisor process that calls studio.actions.execute_run (the
code the queue worker runs: the stage is a real subprocess, its events.jsonl
is followed and stored every POLL_SECONDS). Clients log in over HTTP like a
browser and open the run page's WebSocket with the session cookie.

What each number means (ours vs a peer measured in the same run):

1. latency: a stage writes a metric event every 50 ms for --stream-seconds,
   with the write time in the event ("time", set by EventWriter). A WebSocket
   client of the run page records receive time - write time for every metric
   event it gets live (median, p95; and how many of the written events came).
   Peer, at the same time on the same run: a page that polls
   /runs/<id>/status.json every 2 s (as Gradio-style studios do) and "sees"
   step s when progress.step reaches s: latency = time seen - write time of s.
   With --redis (and redis-server installed) the WebSocket measurement is
   repeated against a daphne and a supervisor both given REDIS_URL, where the
   supervisor's group_send wakes the consumer instead of its 0.5 s poll.
2. pageload: a finished run whose events.jsonl holds --points metric events
   (+ an eval every 250 steps), stored with studio.ingest.ingest_events.
   Ours: time from opening the WebSocket to the snapshot message received
   (down-sampled history: bytes and metric points), median of 3; and, both in
   this process with no network, building the snapshot + json.dumps vs the
   peer "send the whole history" (read every event from the database +
   json.dumps). With /usr/bin/chromium and playwright: the time from
   navigation start to the run page's loss chart holding its points, in
   headless Chromium (median of 3 loads).
3. throughput: the real pretraining stage (tiny model, same flags) run bare
   (python -m trainer.base_train, no studio at all) and as a studio run's
   stage (execute_run, daphne up, a WebSocket client on the run page the whole
   time). Median step time (the `dt` of metric events) after the first 20
   steps of each; overhead = watched / bare - 1 (goal < 1 %). With --repeats
   the order alternates and the step times of all repeats are pooled.
   --compile is passed to both runs (auto, as the studio runs it; --quick
   turns it off to save the compilation time of a smoke run).

Not a test: nothing asserts on time. CPU timings on a shared machine are noisy;
run on a quiet one and compare ratios. Every server is stopped by process
group and the temporary directory removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
USERNAME, PASSWORD = "bench", "bench-password-not-for-production"
MARKER_VAR = "NANOSTUDIO_BENCH_MARKER"  # set in every child's environment, so cleanup can find strays
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when stopping a process group
POLL_PEER_SECONDS = 2.0  # how often the peer page polls status.json
WRITE_INTERVAL = 0.05  # seconds between the writer stage's metric events
SKIP_STEPS = 20  # warm-up steps (compilation, loader start) left out of the step-time median
TRAIN_TIMEOUT = 1800  # seconds a training run of the throughput part may take
LOADS = 3  # page loads / snapshot fetches per measurement (median reported)
TERMINAL = {"done", "failed", "cancelled", "paused"}

# Settings a developer's shell may hold that must not leak into the temporary studio.
STUDIO_SETTINGS = {"SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "REDIS_URL", "DATABASE_URL",
                   "NANOSTUDIO_HTTPS", "NANOSTUDIO_SECRET_KEY_FILE", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS",
                   "NANOSTUDIO_HOME", "NANOSTUDIO_RUNS_DIR"}

# A stage that writes one metric event every `interval` seconds, on a fixed
# schedule (no drift), like a fast trainer. EventWriter stamps "time".
WRITER_STAGE = r'''
import sys, time
from pipeline.events import EventWriter

run_dir, stage, seconds, interval = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
steps = max(1, round(seconds / interval))
events = EventWriter(run_dir, stage)
events.start()
events.emit("setup", num_iterations=steps, flops_per_token=1.2e7, total_batch_size=2048, world_size=1, device="cpu")
t0 = time.time()
for step in range(1, steps + 1):
    delay = t0 + step * interval - time.time()
    if delay > 0:
        time.sleep(delay)
    events.metric(step=step, loss=4.0 - step / steps, smooth_loss=4.0 - step / steps, lrm=1.0, dt=interval,
                  tok_per_sec=2048 / interval, fraction=step / steps)
events.end(status="done")
'''

# The supervisor: Django set up from the environment (the benchmark's studio),
# the run's stage command replaced by the argv in the spec, then the real
# execute_run. SIGTERM becomes KeyboardInterrupt, as in `runjob`, so an
# interrupted benchmark makes execute_run kill the stage's process group.
SUPERVISOR = r'''
import json, os, signal, sys
sys.path.insert(0, os.environ["NANOSTUDIO_BENCH_REPO"])
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nanostudio.settings")

def interrupted(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, interrupted)

import django
django.setup()
from studio import actions
from studio.models import Run
from pipeline import config

with open(sys.argv[1]) as f:
    spec = json.load(f)

def stage_commands(cfg, run_dir, python=None):
    argv = [a.replace("{run_dir}", str(run_dir)) for a in spec["argv"]]
    return [config.StageCommand(name, argv, env=spec.get("env", {})) for name in cfg["stages"]]

config.stage_commands = stage_commands
run = actions.execute_run(Run.objects.get(pk=spec["run_id"]))
print(f"run {run.id}: {run.status} {run.error}", flush=True)
'''


# --------------------------------------------------------------------------- small helpers


STARTED = time.monotonic()


def say(message: str) -> None:
    """A progress line with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - STARTED:5.0f} s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_metrics(run_dir: Path) -> list[dict]:
    from pipeline.events import read_events

    events, _ = read_events(run_dir)
    return [e for e in events if e.get("kind") == "metric" and "step" in e]


def fmt_ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:,.0f} ms"


def fmt_ratio(peer: float, ours: float) -> str:
    if math.isnan(peer) or math.isnan(ours) or ours <= 0:
        return "n/a"
    return f"{peer / ours:.2f}x"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    """A Markdown table: metric | ours | peer | peer / ours."""
    header = ("metric", "ours", "peer (same run)", "peer / ours")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    print(f"\n== {title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for r in rows:
        print("| " + r[0].ljust(widths[0]) + " | " + " | ".join(c.rjust(w) for c, w in zip(r[1:], widths[1:])) + " |")


def machine() -> dict:
    import django

    info = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "django": django.get_version(), "load_average": os.getloadavg()}
    for module in ("channels", "daphne", "websockets"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    return info


# --------------------------------------------------------------------------- processes


class Processes:
    """Every child process of the benchmark, each in its own session (= process group).

    stop_all() signals the groups (SIGTERM, then SIGKILL after STOP_GRACE), then
    SIGKILLs any straggler that still carries this benchmark's marker in its
    environment (a stage whose supervisor died before it could stop it).
    """

    def __init__(self):
        self.marker = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=REPO, env={**env, MARKER_VAR: self.marker}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass
        _killpg(proc.pid, signal.SIGKILL)  # what is left of the group (the leader may have exited first)
        proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        self.kill_marked()

    def kill_marked(self) -> None:
        needle = f"{MARKER_VAR}={self.marker}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- the studio


class Studio:
    """A temporary studio: its own home (SQLite, runs), a superuser, daphnes started on demand."""

    def __init__(self, workdir: Path, procs: Processes):
        self.workdir = workdir
        self.procs = procs
        home = workdir / "home"
        home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in STUDIO_SETTINGS}
        self.env.update(
            NANOSTUDIO_HOME=str(home),
            NANOSTUDIO_RUNS_DIR=str(home / "runs"),
            DJANGO_SETTINGS_MODULE="nanostudio.settings",
            PYTHONUNBUFFERED="1",
            NANOSTUDIO_BENCH_REPO=str(REPO),
        )
        self.env.setdefault("NANOSTUDIO_DATA_MIRROR", str(REPO.parent / "shared" / "data"))
        self.env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
        self.supervisor_script = workdir / "supervisor.py"
        self.supervisor_script.write_text(SUPERVISOR)
        self.writer_script = workdir / "writer_stage.py"
        self.writer_script.write_text(WRITER_STAGE)

    def manage(self, *args: str, env: dict | None = None) -> None:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")

    def prepare(self) -> None:
        """Migrate, create the superuser, and set up Django in this process on the same database."""
        self.manage("migrate", "--noinput")
        self.manage("createsuperuser", "--noinput", env={
            "DJANGO_SUPERUSER_USERNAME": USERNAME, "DJANGO_SUPERUSER_PASSWORD": PASSWORD,
            "DJANGO_SUPERUSER_EMAIL": f"{USERNAME}@example.com"})
        for key in STUDIO_SETTINGS:
            os.environ.pop(key, None)
        os.environ.update({k: self.env[k] for k in ("NANOSTUDIO_HOME", "NANOSTUDIO_RUNS_DIR", "DJANGO_SETTINGS_MODULE")})
        import logging

        import django

        django.setup()
        logging.getLogger("studio").setLevel(logging.WARNING)  # "created run ..." lines would break up the tables

    @contextmanager
    def daphne(self, extra_env: dict | None = None):
        """A daphne serving the studio; yields its base URL; stopped (by process group) on leaving."""
        import requests

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = self.workdir / f"daphne-{port}.log"
        exe = Path(sys.executable).with_name("daphne")
        proc = self.procs.start([str(exe), "-b", "127.0.0.1", "-p", str(port), "nanostudio.asgi:application"],
                                {**self.env, **(extra_env or {})}, log)

        def answers():
            if proc.poll() is not None:
                raise RuntimeError(f"daphne exited with {proc.returncode}:\n{tail(log)}")
            try:
                requests.get(base + "/accounts/login/", timeout=5, allow_redirects=False)
            except requests.ConnectionError:
                return False
            return True

        try:
            wait_until(answers, 60, f"daphne on {base}")
            yield base
        finally:
            self.procs.stop(proc)

    def execute(self, run_id: str, argv: list[str], timeout: float, extra_env: dict | None = None) -> None:
        """execute_run the run in a supervisor process, its stage running `argv` ({run_dir} filled in); wait for it."""
        spec = self.workdir / f"spec-{run_id}.json"
        spec.write_text(json.dumps({"run_id": run_id, "argv": argv, "env": {"PYTHONPATH": str(REPO)}}))
        log = self.workdir / f"supervisor-{run_id}.log"
        proc = self.procs.start([sys.executable, str(self.supervisor_script), str(spec)],
                                {**self.env, **(extra_env or {})}, log)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc)
            raise RuntimeError(f"run {run_id} did not finish within {timeout:.0f} s:\n{tail(log)}") from None
        if proc.returncode or f"run {run_id}: done" not in tail(log, 10):
            raise RuntimeError(f"run {run_id} did not finish cleanly (supervisor exit {proc.returncode}):\n{tail(log)}")


def create_run(stages: str = "base_train"):
    """A queued run (tiny preset) in the studio's database; its stage command is set by the supervisor."""
    from django.db import connections

    from studio import actions

    run = actions.create_run("tiny", {"stages": stages}, name="bench")
    connections.close_all()  # SQLite: hold no connection (or WAL snapshot) while others write
    return run


def login(base: str):
    """A requests.Session logged in through the login form, as a browser does."""
    import requests

    session = requests.Session()
    url = base + "/accounts/login/"
    session.get(url, timeout=30).raise_for_status()
    response = session.post(url, data={"username": USERNAME, "password": PASSWORD,
                                       "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                            headers={"Referer": url}, allow_redirects=False, timeout=30)
    if response.status_code != 302 or "/accounts/login/" in response.headers.get("Location", ""):
        raise RuntimeError(f"login failed: {response.status_code}")
    return session


def open_socket(base: str, session, run_id: str):
    """The run page's WebSocket with the session cookie and the page's Origin (hello not sent yet)."""
    from websockets.sync.client import connect

    cookie = "; ".join(f"{c.name}={c.value}" for c in session.cookies)
    url = base.replace("http://", "ws://") + f"/ws/runs/{run_id}/"
    # max_size=None: the snapshot of a long run is larger than the 1 MiB default.
    return connect(url, origin=base, additional_headers={"Cookie": cookie}, open_timeout=30, max_size=None)


# --------------------------------------------------------------------------- 1. latency


class SocketWatcher(threading.Thread):
    """A run page's WebSocket: records (receive time, event) for every live metric event until the run ends."""

    def __init__(self, base: str, session, run_id: str, deadline: float):
        super().__init__(daemon=True)
        self.connection = open_socket(base, session, run_id)
        self.deadline = deadline
        self.received: list[tuple[float, dict]] = []
        self.messages = 0
        self.final_status = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        try:
            self.connection.send(json.dumps({"type": "hello", "after": None}))
            while not self.stop.is_set() and time.time() < self.deadline:
                try:
                    raw = self.connection.recv(timeout=0.5)
                except TimeoutError:
                    continue
                now = time.time()  # before parsing: parsing is the client's cost, not the delivery's
                message = json.loads(raw)
                self.messages += 1
                if message["type"] == "events":
                    self.received += [(now, e) for e in message["events"] if e.get("kind") == "metric"]
                elif message["type"] == "run" and message["run"]["status"] in TERMINAL:
                    self.final_status = message["run"]["status"]
                    return
        except BaseException as e:  # reported by the main thread
            if not self.stop.is_set():
                self.error = e
        finally:
            self.connection.close()


class StatusPoller(threading.Thread):
    """The peer page: GET status.json every POLL_PEER_SECONDS; records (time seen, progress.step)."""

    def __init__(self, base: str, session, run_id: str, deadline: float):
        super().__init__(daemon=True)
        self.url = f"{base}/runs/{run_id}/status.json"
        self.session = session
        self.deadline = deadline
        self.seen: list[tuple[float, int]] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        try:
            t0 = time.time()
            k = 0
            while not self.stop.is_set() and time.time() < self.deadline:
                state = self.session.get(self.url, timeout=30).json()
                now = time.time()
                step = (state.get("progress") or {}).get("step")
                if step is not None:
                    self.seen.append((now, step))
                if state["status"] in TERMINAL:
                    return
                k += 1
                self.stop.wait(max(0.0, t0 + k * POLL_PEER_SECONDS - time.time()))
        except BaseException as e:
            self.error = e


def poll_latencies(seen: list[tuple[float, int]], written: dict[int, float]) -> list[float]:
    """Each step is seen at the first poll whose progress.step reached it."""
    out, last = [], 0
    for t, step in seen:
        for s in range(last + 1, step + 1):
            if s in written:
                out.append(t - written[s])
        last = max(last, step)
    return out


def stream_run(studio: Studio, base: str, seconds: float, with_peer: bool, extra_env: dict | None = None) -> dict:
    """One streaming run watched by a WebSocket client (and the polling peer); latencies in seconds."""
    run = create_run()
    session = login(base)
    deadline = time.time() + seconds + 120
    watcher = SocketWatcher(base, session, run.id, deadline)
    poller = StatusPoller(base, login(base), run.id, deadline) if with_peer else None
    watcher.start()
    if poller:
        poller.start()
    try:
        time.sleep(1.0)  # the snapshot (of nothing yet) is out of the way before the first event
        argv = [sys.executable, str(studio.writer_script), "{run_dir}", "base_train", str(seconds), str(WRITE_INTERVAL)]
        studio.execute(run.id, argv, timeout=seconds + 120, extra_env=extra_env)
        watcher.join(timeout=30)
        if poller:
            poller.join(timeout=30)
    finally:
        for t in (watcher, poller):
            if t is not None:
                t.stop.set()
    for t in (watcher, poller):
        if t is not None and t.error is not None:
            raise RuntimeError(f"{type(t).__name__} failed: {t.error!r}")
    written = {e["step"]: e["time"] for e in read_metrics(run.run_dir)}
    ws = [now - e["time"] for now, e in watcher.received]
    result = {"written": len(written), "ws_received": len({e["step"] for _, e in watcher.received}),
              "ws_median": median(ws), "ws_p95": percentile(ws, 95), "ws_max": max(ws, default=float("nan"))}
    if poller:
        peer = poll_latencies(poller.seen, written)
        result.update(poll_seen=len(peer), poll_median=median(peer), poll_p95=percentile(peer, 95), polls=len(poller.seen))
    return result


def start_redis(studio: Studio) -> str | None:
    server = shutil.which("redis-server")
    if server is None:
        return None
    import redis

    port = free_port()
    data = studio.workdir / "redis"
    data.mkdir()
    proc = studio.procs.start([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", str(data)], studio.env, studio.workdir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=2)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{tail(studio.workdir / 'redis.log')}")
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_until(ready, 30, "redis-server")
    client.close()
    return url


def bench_latency(studio: Studio, args) -> dict:
    say(f"latency: streaming a metric event every {WRITE_INTERVAL * 1000:.0f} ms for {args.stream_seconds:g} s")
    with studio.daphne() as base:
        result = {"embedded": stream_run(studio, base, args.stream_seconds, with_peer=True)}
    notes = []
    if args.redis:
        url = start_redis(studio)
        if url is None:
            notes.append("--redis: redis-server is not installed; skipped")
        else:
            say("latency: again with REDIS_URL (channels-redis wakes the consumer)")
            with studio.daphne({"REDIS_URL": url}) as base:
                result["redis"] = stream_run(studio, base, args.stream_seconds, with_peer=False, extra_env={"REDIS_URL": url})
    e = result["embedded"]
    rows = [
        ("event -> page, median (WebSocket, embedded mode)", fmt_ms(e["ws_median"]), fmt_ms(e["poll_median"]),
         fmt_ratio(e["poll_median"], e["ws_median"])),
        ("event -> page, p95", fmt_ms(e["ws_p95"]), fmt_ms(e["poll_p95"]), fmt_ratio(e["poll_p95"], e["ws_p95"])),
        ("steps delivered / written", f"{e['ws_received']:,} / {e['written']:,}", f"{e['poll_seen']:,} / {e['written']:,}", ""),
    ]
    if "redis" in result:
        r = result["redis"]
        rows += [
            ("event -> page, median (WebSocket, Redis wake-up)", fmt_ms(r["ws_median"]), fmt_ms(e["poll_median"]),
             fmt_ratio(e["poll_median"], r["ws_median"])),
            ("event -> page, p95 (Redis wake-up)", fmt_ms(r["ws_p95"]), fmt_ms(e["poll_p95"]), fmt_ratio(e["poll_p95"], r["ws_p95"])),
            ("steps delivered / written (Redis)", f"{r['ws_received']:,} / {r['written']:,}", "", ""),
        ]
    print_table(f"1. event-to-page latency: metric every {WRITE_INTERVAL * 1000:.0f} ms for {args.stream_seconds:g} s; "
                f"peer polls status.json every {POLL_PEER_SECONDS:g} s (Redis peer row: the embedded run's)", rows)
    from studio import consumers, supervisor

    print(f"by design: the supervisor reads events.jsonl every {supervisor.POLL_SECONDS:g} s and the consumer polls the "
          f"database every {consumers.POLL_SECONDS:g} s (Redis wakes it instead), so about "
          f"{(supervisor.POLL_SECONDS + consumers.POLL_SECONDS) / 2 * 1000:.0f} ms on average in the embedded mode and "
          f"{supervisor.POLL_SECONDS / 2 * 1000:.0f} ms with Redis, plus processing")
    for note in notes:
        print("note:", note)
    result["notes"] = notes
    return result


# --------------------------------------------------------------------------- 2. page load


def write_history(run_dir: Path, points: int) -> None:
    """events.jsonl of a finished pretraining stage: `points` metric events and an eval every 250 steps."""
    t = time.time() - points * 0.4
    lines = [{"time": t, "stage": "base_train", "kind": "stage_start", "pid": 1, "host": "bench"},
             {"time": t, "stage": "base_train", "kind": "setup", "num_iterations": points, "flops_per_token": 1.2e7,
              "total_tokens": points * 2048, "params": 5_242_880, "world_size": 1, "device": "cpu"}]
    smooth = 8.3
    for step in range(1, points + 1):
        t += 0.4
        loss = 2.0 + 6.0 / (1 + step / 200) + 0.05 * math.sin(step)
        smooth = 0.9 * smooth + 0.1 * loss
        lines.append({"time": t, "stage": "base_train", "kind": "metric", "step": step, "loss": round(loss, 6),
                      "smooth_loss": round(smooth, 6), "lrm": 1.0, "dt": 0.4, "tok_per_sec": 5120.0, "mfu": 39.8,
                      "peak_mem_mb": 1075.0, "epoch": 0, "fraction": round(step / points, 5),
                      "train_seconds": round(step * 0.4, 3)})
        if step % 250 == 0:
            lines.append({"time": t, "stage": "base_train", "kind": "eval", "name": "val_bpb", "step": step,
                          "val_bpb": round(1.0 + 2.0 / (1 + step / 500), 4), "seconds": 1.5})
    lines.append({"time": t, "stage": "base_train", "kind": "stage_end", "status": "done"})
    with open(run_dir / "events.jsonl", "w") as f:
        f.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in lines))


def history_run(points: int):
    """A finished run holding `points` metric events, stored the way the supervisor stores them."""
    from datetime import timedelta

    from django.db import connections
    from django.utils import timezone

    from studio import ingest
    from studio.models import Run, StageRun

    run = create_run()
    write_history(run.run_dir, points)
    t0 = time.perf_counter()
    ingest.ingest_events(Run.objects.get(pk=run.pk))
    ingest_s = time.perf_counter() - t0
    now = timezone.now()
    started = now - timedelta(seconds=points * 0.4)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.DONE, started_at=started, finished_at=now)
    run.stages.update(status=StageRun.Status.DONE, started_at=started, finished_at=now, exit_code=0)
    run.refresh_from_db()
    connections.close_all()
    return run, ingest_s


def build_in_process(run_id: str) -> dict:
    """Snapshot vs whole history, built and serialised here (same ORM, same event_dict; no network)."""
    from django.db import connections

    from studio.live import Follower, event_dict
    from studio.models import Run, RunEvent

    ours_t, peer_t = [], []
    for _ in range(LOADS):
        t0 = time.perf_counter()
        ours = json.dumps(Follower(run_id).snapshot(Run.objects.get(pk=run_id)))
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        peer = json.dumps([event_dict(r) for r in RunEvent.objects.filter(run_id=run_id).order_by("seq")])
        peer_t.append(time.perf_counter() - t0)
    connections.close_all()
    return {"ours_s": median(ours_t), "ours_bytes": len(ours.encode()), "peer_s": median(peer_t),
            "peer_bytes": len(peer.encode())}


def snapshot_over_socket(base: str, session, run_id: str, last_seq: int) -> dict:
    """WebSocket open -> hello -> the whole history received, median of LOADS.

    A long history arrives as a snapshot followed by `events` messages (each
    under daphne's 1 MiB message limit); the clock stops at the one that
    reaches the run's last event.
    """
    times = []
    for _ in range(LOADS):
        t0 = time.perf_counter()
        with open_socket(base, session, run_id) as ws:
            ws.send(json.dumps({"type": "hello", "after": None}))
            messages = []
            while not messages or messages[-1].get("last_seq", 0) < last_seq:
                raw = ws.recv(timeout=300)
                message = json.loads(raw)
                if message["type"] in ("snapshot", "events"):
                    messages.append({**message, "bytes": len(raw.encode())})
            times.append(time.perf_counter() - t0)
        if messages[0]["type"] != "snapshot":
            raise RuntimeError(f"expected a snapshot after hello, got {messages[0]['type']!r}")
    events = [e for m in messages for e in m["events"]]
    metrics = [e for e in events if e.get("kind") == "metric"]
    return {"seconds": median(times), "bytes": sum(m["bytes"] for m in messages), "points": len(metrics),
            "events": len(events), "messages": len(messages), "downsampled": messages[0]["downsampled"]}


# The loss chart's first trace, once Plotly has drawn it: [ms since navigation start, points], else false.
CHART_READY = """(expected) => {
    const chart = document.getElementById('chart-loss');
    const trace = chart && chart.data && chart.data[0];
    const n = trace && trace.x ? trace.x.length : 0;
    return n >= expected ? [performance.now(), n] : false;
}"""


def browser_load(base: str, run_id: str, points: int) -> dict:
    """Navigation start -> loss chart drawn with all `points`, in headless Chromium logged in through the form."""
    if not os.access(CHROMIUM, os.X_OK):
        return {"note": f"{CHROMIUM} not found: browser load skipped"}
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"note": "playwright is not installed: browser load skipped"}
    url = f"{base}/runs/{run_id}/"
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM)
        except Exception as e:  # playwright's Error: a browser that cannot start here is a note, not a failed run
            return {"note": f"Chromium did not start ({str(e).splitlines()[0]}): browser load skipped"}
        try:
            page = browser.new_page()
            page.goto(base + "/accounts/login/")
            page.fill('input[name="username"]', USERNAME)
            page.fill('input[name="password"]', PASSWORD)
            with page.expect_navigation():
                page.click('form:has(input[name="password"]) [type="submit"]')
            if "/accounts/login/" in page.url:
                raise RuntimeError("Chromium could not log in")
            page.goto(url)  # warm-up load: static files in the browser's cache, as for a returning user
            if not page.evaluate("() => !!document.getElementById('chart-loss')"):
                return {"note": "the run page has no #chart-loss: browser load skipped"}
            loads = []
            for _ in range(LOADS):
                page.goto(url, wait_until="commit")
                ms, n = page.wait_for_function(CHART_READY, arg=points, timeout=120_000).json_value()
                loads.append((ms / 1000, n))
        finally:
            browser.close()
    return {"seconds": median([s for s, _ in loads]), "points": loads[-1][1], "loads": loads}


def bench_pageload(studio: Studio, args) -> dict:
    say(f"pageload: writing and ingesting {args.points:,} metric events")
    run, ingest_s = history_run(args.points)
    result = {"points": args.points, "ingest_s": ingest_s, "in_process": build_in_process(run.id)}
    with studio.daphne() as base:
        result["socket"] = snapshot_over_socket(base, login(base), run.id, run.events_seq)
        say("pageload: the run page in headless Chromium")
        result["browser"] = browser_load(base, run.id, result["socket"]["points"])
    sock, local, browser = result["socket"], result["in_process"], result["browser"]
    rows = [
        (f"history over WebSocket: open -> received ({sock['messages']} messages)", fmt_ms(sock["seconds"]), "", ""),
        ("metric points sent", f"{sock['points']:,}", f"{args.points:,}", fmt_ratio(args.points, sock["points"])),
        ("message size", fmt_bytes(sock["bytes"]), fmt_bytes(local["peer_bytes"]),
         fmt_ratio(local["peer_bytes"], sock["bytes"])),
        ("build + json.dumps in-process (no network)", fmt_ms(local["ours_s"]), fmt_ms(local["peer_s"]),
         fmt_ratio(local["peer_s"], local["ours_s"])),
    ]
    if "seconds" in browser:
        rows.append(("Chromium: navigation start -> loss chart drawn", fmt_ms(browser["seconds"]), "", ""))
        rows.append(("points in the loss chart's first trace", f"{browser['points']:,}", "", ""))
    print_table(f"2. run page load with {args.points:,} metric points (+ an eval every 250 steps); "
                f"peer sends the whole history; medians of {LOADS}", rows)
    print(f"ingest_events of the whole file: {ingest_s:.1f} s; down-sampling: {sock['downsampled']}")
    if "note" in browser:
        print("note:", browser["note"])
    return result


# --------------------------------------------------------------------------- 3. throughput


def train_argv(steps: int, compile: str) -> list[str]:
    # --eval-tokens: eval-every 0 still evaluates once at the end (after the timed steps); keep it short.
    return [sys.executable, "-m", "trainer.base_train", "--run-dir", "{run_dir}", "--depth", "4", "--max-seq-len", "256",
            "--device-batch-size", "8", "--total-batch-size", "2048", "--num-iterations", str(steps),
            "--eval-every", "0", "--eval-tokens", "4096", "--sample-every", "0", "--save-every", "0",
            "--data-source", "fineweb-edu", "--num-shards", "5", "--compile", compile]


def train_tokenizer(studio: Studio, max_chars: int) -> Path:
    run_dir = studio.workdir / "tokenizer-run"
    run_dir.mkdir()
    log = studio.workdir / "tok_train.log"
    proc = studio.procs.start([sys.executable, "-m", "trainer.tok_train", "--run-dir", str(run_dir), "--vocab-size", "4096",
                               f"--max-chars={max_chars}"], studio.env, log)
    if proc.wait(timeout=900):
        raise RuntimeError(f"tok_train failed:\n{tail(log)}")
    return run_dir / "tokenizer"


def step_times(run_dir: Path) -> list[float]:
    return [e["dt"] for e in read_metrics(run_dir) if e["step"] > SKIP_STEPS]


def bare_training(studio: Studio, tokenizer: Path, argv: list[str], k: int) -> dict:
    run_dir = studio.workdir / f"bare-{k}"
    shutil.copytree(tokenizer, run_dir / "tokenizer")
    log = run_dir / "train.log"
    t0 = time.time()
    proc = studio.procs.start([a.replace("{run_dir}", str(run_dir)) for a in argv], studio.env, log)
    if proc.wait(timeout=TRAIN_TIMEOUT):
        raise RuntimeError(f"bare base_train failed:\n{tail(log)}")
    return {"dts": step_times(run_dir), "wall_s": time.time() - t0}


def watched_training(studio: Studio, tokenizer: Path, argv: list[str]) -> dict:
    with studio.daphne() as base:
        run = create_run()
        shutil.copytree(tokenizer, run.run_dir / "tokenizer")
        watcher = SocketWatcher(base, login(base), run.id, deadline=time.time() + TRAIN_TIMEOUT)
        watcher.start()
        try:
            time.sleep(0.5)  # connected and past its snapshot before the stage starts
            t0 = time.time()
            studio.execute(run.id, argv, timeout=TRAIN_TIMEOUT)
            wall = time.time() - t0
            watcher.join(timeout=30)
        finally:
            watcher.stop.set()
    if watcher.error is not None:
        raise RuntimeError(f"the run page's socket failed: {watcher.error!r}")
    return {"dts": step_times(run.run_dir), "wall_s": wall, "ws_metric_events": len(watcher.received),
            "ws_messages": watcher.messages}


def bench_throughput(studio: Studio, args) -> dict:
    say(f"throughput: training a tokenizer on {args.tok_chars:,} characters")
    tokenizer = train_tokenizer(studio, args.tok_chars)
    argv = train_argv(args.steps, args.compile)
    bare, watched, order = [], [], []
    for k in range(args.repeats):
        for mode in (("bare", "watched") if k % 2 == 0 else ("watched", "bare")):
            say(f"throughput: repeat {k + 1}/{args.repeats}, {mode}, {args.steps} steps")
            if mode == "bare":
                bare.append(bare_training(studio, tokenizer, argv, k))
            else:
                watched.append(watched_training(studio, tokenizer, argv))
            order.append(mode)
    b = median([dt for r in bare for dt in r["dts"]])
    w = median([dt for r in watched for dt in r["dts"]])
    overhead = 100 * (w / b - 1) if b > 0 else float("nan")
    n_b = sum(len(r["dts"]) for r in bare)
    n_w = sum(len(r["dts"]) for r in watched)
    rows = [
        ("median step time, steps > 20 (watched vs bare)", fmt_ms(w), fmt_ms(b), fmt_ratio(b, w)),
        ("median step time of each run", ", ".join(fmt_ms(median(r["dts"])) for r in watched),
         ", ".join(fmt_ms(median(r["dts"])) for r in bare), ""),
        ("steps measured", f"{n_w:,}", f"{n_b:,}", ""),
        ("tokens/s at the median step", f"{2048 / w:,.0f}", f"{2048 / b:,.0f}", ""),
        ("run page messages received while training", f"{sum(r['ws_messages'] for r in watched):,}", "", ""),
    ]
    print_table(f"3. training throughput with the studio watching (ours) vs bare (peer): depth 4, seq 256, "
                f"2,048 tokens/step, compile {args.compile}, {args.steps} steps x {args.repeats}, order {' -> '.join(order)}", rows)
    print(f"overhead of the studio: {overhead:+.2f} % (goal < 1 %)")
    return {"bare_median_s": b, "watched_median_s": w, "overhead_pct": overhead, "order": order,
            "bare": bare, "watched": watched}


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Studio benchmark: live latency, run page load, training overhead "
                                            "(see the module docstring for what each number means).")
    p.add_argument("--quick", action="store_true",
                   help="smoke sizes: 3 s of streaming, 10^4 points, 40 steps without torch.compile, "
                        "a 2M-character tokenizer")
    p.add_argument("--only", choices=["latency", "pageload", "throughput"], help="run one part only")
    p.add_argument("--redis", action="store_true",
                   help="latency: also measure with REDIS_URL (channels-redis wake-up); needs redis-server")
    p.add_argument("--stream-seconds", type=float, help="latency: seconds the writer stage streams (default 20)")
    p.add_argument("--points", type=int, help="pageload: metric events in the long run (default 100,000)")
    p.add_argument("--steps", type=int, help="throughput: training steps per run (default 150; the first 20 are skipped)")
    p.add_argument("--repeats", type=int, default=1, help="throughput: bare/watched pairs, order alternating (default 1)")
    p.add_argument("--compile", choices=["auto", "yes", "no"],
                   help="throughput: base_train's --compile for both runs (default auto, as a studio run; --quick: no)")
    p.add_argument("--tok-chars", type=int, help="throughput: characters the tokenizer trains on (default 20,000,000)")
    p.add_argument("--out", help="also write the results here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, run directories) for inspection")
    args = p.parse_args(argv)
    quick = {"stream_seconds": 3.0, "points": 10_000, "steps": 40, "tok_chars": 2_000_000, "compile": "no"}
    full = {"stream_seconds": 20.0, "points": 100_000, "steps": 150, "tok_chars": 20_000_000, "compile": "auto"}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps <= SKIP_STEPS:
        p.error(f"--steps must be more than {SKIP_STEPS} (the warm-up steps left out)")
    return args


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="nanostudio-bench-"))
    procs = Processes()
    parts = [args.only] if args.only else ["latency", "pageload", "throughput"]
    results: dict = {}
    try:
        studio = Studio(workdir, procs)
        say(f"setting up a studio in {workdir} (migrate, createsuperuser)")
        studio.prepare()
        results["machine"] = machine()
        for part in parts:
            results[part] = {"latency": bench_latency, "pageload": bench_pageload, "throughput": bench_throughput}[part](studio, args)
        m = results["machine"]
        print(f"\nmachine: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, Django {m['django']}, "
              f"channels {m.get('channels')}, daphne {m.get('daphne')}, websockets {m.get('websockets')}; "
              f"load average at start {m['load_average'][0]:.2f}, now {os.getloadavg()[0]:.2f}; "
              f"benchmark took {time.monotonic() - STARTED:.0f} s")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every server and removing the temporary files", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
