"""Real servers for end-to-end tests: PostgreSQL, Redis and the studio itself as processes.

The studio is started the way a person starts it (`manage.py migrate`,
`createsuperuser`, `daphne`, `manage.py qcluster`), so these tests catch what
in-process tests cannot: settings read from the environment, two processes
sharing one database and one queue, the ASGI stack, static files, real sockets.

Usage in a test module (import the fixtures the module uses)::

    from tests.servers import RunSocket, StudioServer, fresh_database, postgres_url, redis_url  # noqa: F401

    def test_something(manage_env, postgres_url, redis_url, tmp_path):
        env = {**manage_env, "DATABASE_URL": fresh_database(postgres_url, "t1"), "REDIS_URL": redis_url}
        with StudioServer(env, tmp_path) as studio:
            session = studio.login()                       # a logged-in requests.Session
            run_id = studio.create_run(session, preset="smoke", stages=["tok_train"])
            with RunSocket(studio, session, run_id) as ws:  # sends hello
                snapshot = ws.receive_until(lambda m: m["type"] == "snapshot")[-1]

When a test fails inside the `with StudioServer(...)` block, the tail of the
daphne, qcluster and stage logs is printed, so a CI failure can be read from
the pytest output alone.

Missing binaries (postgres, redis-server, chromium) skip the test locally and
fail it in CI (env CI set): CI must not silently skip the scale and browser tests.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import REPO, free_port

INSTALL_HINT = "run ./setup.sh test, which apt-installs postgresql redis-server chromium"
CHROMIUM = "/usr/bin/chromium"
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when stopping a server


def missing(what: str) -> None:
    """Skip (locally) or fail (in CI) a test whose server binary is not installed."""
    message = f"{what} not found: {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        missing(CHROMIUM)
    return CHROMIUM


# --- processes ---------------------------------------------------------------------------------

def _proc_stat(pid: str) -> tuple[str, int] | None:
    """(state, process group) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[2])


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running.

    kill(-pgid, 0) is not enough here: a zombie counts as alive for kill(), and
    in a container whose PID 1 does not reap orphans, zombies stay forever.
    """
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            stat = _proc_stat(pid)
            if stat and stat[1] == pgid and stat[0] not in ("Z", "X"):
                return True
    return False


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM a process group started with start_new_session, SIGKILL it if still there after `grace`."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so it does not linger as a zombie
        if not group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def processes_marked(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment holds name=value (stage processes inherit it)."""
    needle = f"{name}={value}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        stat = _proc_stat(pid)
        if needle in environ and stat and stat[0] not in ("Z", "X"):
            found.append(int(pid))
    return found


def kill_marked(name: str, value: str, grace: float = 5.0) -> list[int]:
    """End every process carrying our marker: stage groups run in their own sessions, so a
    server stopped mid-run would otherwise leave a training process behind on a 2-core machine."""
    pids = processes_marked(name, value)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while processes_marked(name, value) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in processes_marked(name, value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def tail(path: Path, n: int = 60) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({e})"
    return "\n".join(lines[-n:])


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    """Call `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- PostgreSQL --------------------------------------------------------------------------------

def postgres_bindir() -> Path | None:
    """Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres(argv: list[str]) -> list[str]:
    # The server refuses to run as root; as root we drop to the postgres user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server; yields a URL for role `app` (CREATEDB) and its database `appdb`."""
    bindir = postgres_bindir()
    if bindir is None:
        missing("PostgreSQL (initdb)")
    # Not under pytest's tmp dir: that is mode 0700 for root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="nanostudio-pg-"))
    data, sock, log = base / "data", base / "sock", base / "server.log"
    data.mkdir()
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        for path in (data, sock):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                                     "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
                                     "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        # fsync=off: a test database need not survive a power cut, and it makes DDL fast.
        subprocess.run(_as_postgres([*pg_ctl, "-l", str(log), "-w", "-t", "60", "-o",
                                     f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off",
                                     "start"]),
                       check=True, capture_output=True, timeout=90)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(base, ignore_errors=True)
        raise AssertionError(f"PostgreSQL did not start: {e.stderr.decode()}\n{tail(log)}") from None
    try:
        psql = [str(bindir / "psql"), "-h", str(sock), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        subprocess.run(psql + ["-c", "CREATE ROLE app LOGIN PASSWORD 'app' CREATEDB",
                               "-c", "CREATE DATABASE appdb OWNER app"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgres://app:app@127.0.0.1:{port}/appdb"
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "fast", "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(postgres_url: str, name: str) -> str:
    """Create database `name` on the server of `postgres_url` (owned by its role); return its URL.

    Tests share one server; each gets its own database, so one test's users
    and runs never meet another's.
    """
    import psycopg

    with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(postgres_url)
    return parts._replace(path=f"/{name}").geturl()


def _libpq(url: str) -> str:
    # libpq accepts postgresql:// URLs; Django's dj-database-url also takes postgres://.
    return "postgresql://" + url.split("://", 1)[1]


def pg_connect(url: str):
    """A psycopg connection (autocommit) to a postgres:// URL, for checking what the studio stored."""
    import psycopg

    return psycopg.connect(_libpq(url), autocommit=True)


# --- Redis -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_url():
    """A throwaway redis-server (no persistence); yields redis://127.0.0.1:PORT/0."""
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server")
    import redis

    base = Path(tempfile.mkdtemp(prefix="nanostudio-redis-"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with open(base / "redis.log", "wb") as log:
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(base)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    client = redis.Redis.from_url(url, socket_timeout=5)

    def ready():
        assert proc.poll() is None, f"redis-server exited: {tail(base / 'redis.log')}"
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    try:
        wait_until(ready, 30, "redis-server to answer PING")
        yield url
    finally:
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the connection drops as the server exits: that is the success case
        client.close()
        stop_group(proc)
        shutil.rmtree(base, ignore_errors=True)


# --- the studio --------------------------------------------------------------------------------

class StudioServer:
    """daphne + `manage.py qcluster` as two process groups, sharing `env` (database, broker, runs dir).

    `env` is typically the `manage_env` fixture's dict, plus DATABASE_URL and REDIS_URL for the
    scale mode. Entering migrates, creates a superuser, starts both servers and waits until HTTP
    answers; leaving stops them (SIGTERM, then SIGKILL after 10 s) and any stage process they
    left, and prints the logs' tails if the block raised.
    """

    username = "tester"
    password = "correct-horse-battery-staple"

    def __init__(self, env: dict, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.marker = uuid.uuid4().hex
        # The marker lets teardown find every process this server started, stage processes too.
        self.env = {**env, "NANOSTUDIO_TEST_SERVER": self.marker, "PYTHONUNBUFFERED": "1"}
        self.logs = {name: self.workdir / f"{name}.log" for name in ("daphne", "qcluster")}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle

    def manage(self, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def start(self) -> StudioServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.manage("migrate", "--noinput")
        # The documented headless way: createsuperuser reads these with --noinput.
        self.manage("createsuperuser", "--noinput", env={
            "DJANGO_SUPERUSER_USERNAME": self.username, "DJANGO_SUPERUSER_PASSWORD": self.password,
            "DJANGO_SUPERUSER_EMAIL": f"{self.username}@example.com"})
        daphne = Path(sys.executable).with_name("daphne")
        self._spawn("daphne", [str(daphne), "-b", "127.0.0.1", "-p", str(self.port), "nanostudio.asgi:application"])
        self._spawn("qcluster", [sys.executable, "manage.py", "qcluster"])
        wait_until(self._answers, 60, f"daphne to answer on {self.base_url}")
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.logs[name], "wb") as log:
            self.procs[name] = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def _answers(self) -> bool:
        import requests

        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{tail(self.logs[name])}"
        try:
            requests.get(self.base_url + "/accounts/login/", timeout=5, allow_redirects=False)
        except requests.ConnectionError:
            return False
        return True  # any status: the server is up

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_group(proc)
        kill_marked("NANOSTUDIO_TEST_SERVER", self.marker)

    def __enter__(self) -> StudioServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            self.print_logs()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is not None:
            self.print_logs()

    def print_logs(self, lines: int = 60) -> None:
        """The tails of the servers' and the stages' logs (pytest shows them for a failed test)."""
        paths = list(self.logs.values())
        runs_dir = self.env.get("NANOSTUDIO_RUNS_DIR")
        if runs_dir:
            paths += sorted(Path(runs_dir).glob("*/logs/*.log"))
        for path in paths:
            print(f"\n----- {path} (last {lines} lines) -----\n{tail(path, lines)}")

    # -- HTTP helpers

    def url(self, path: str) -> str:
        return self.base_url + path

    def login(self, session=None):
        """Log `session` (a new requests.Session by default) in through the login form; return it."""
        import requests

        session = session or requests.Session()
        login_url = self.url("/accounts/login/")
        page = session.get(login_url, timeout=10)
        assert page.status_code == 200, f"GET {login_url}: {page.status_code}"
        response = session.post(login_url, data={
            "username": self.username, "password": self.password,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        }, headers={"Referer": login_url}, allow_redirects=False, timeout=10)
        assert response.status_code == 302, f"login answered {response.status_code}, not a redirect"
        assert "/accounts/login/" not in response.headers["Location"], "login redirected back to the form"
        return session

    def create_run(self, session, preset: str, name: str = "", stages: list[str] | None = None,
                   **fields) -> str:
        """POST the new-run form like a browser (blank fields keep the preset's values); return the run id."""
        form_url = self.url(f"/runs/new/?preset={preset}")
        page = session.get(form_url, timeout=10)
        assert page.status_code == 200, f"GET {form_url}: {page.status_code}"
        data = {"preset": preset, "name": name, "csrfmiddlewaretoken": session.cookies["csrftoken"], **fields}
        if stages is not None:
            data["stages"] = stages  # requests sends a list as repeated fields, like checkboxes
        response = session.post(self.url("/runs/new/"), data=data, headers={"Referer": form_url},
                                allow_redirects=False, timeout=30)
        assert response.status_code == 302, f"new run form answered {response.status_code}:\n{response.text[:3000]}"
        parts = urlsplit(response.headers["Location"]).path.strip("/").split("/")
        assert len(parts) == 2 and parts[0] == "runs", f"unexpected redirect to {response.headers['Location']}"
        return parts[1]

    def run_status(self, session, run_id: str) -> dict:
        response = session.get(self.url(f"/runs/{run_id}/status.json"), timeout=10)
        assert response.status_code == 200, f"status.json answered {response.status_code}"
        return response.json()

    def wait_for_run(self, session, run_id: str, timeout: float = 120,
                     until=("done", "failed", "cancelled")) -> dict:
        """Poll status.json until the run's status is one of `until`; return the RUN."""
        def finished():
            run = self.run_status(session, run_id)
            return run if run["status"] in until else None

        return wait_until(finished, timeout, f"run {run_id} to reach {'/'.join(until)}", interval=0.5)


# --- WebSocket ---------------------------------------------------------------------------------

class RunSocket:
    """The run page's WebSocket, with the browser's session cookie and Origin; sends hello on entry.

        with RunSocket(studio, session, run_id) as ws:
            messages = ws.receive_until(lambda m: m["type"] == "snapshot")
    """

    def __init__(self, studio: StudioServer, session, run_id: str, after: int | None = None,
                 origin: str | None = None, hello: bool = True):
        self.url = f"ws://127.0.0.1:{studio.port}/ws/runs/{run_id}/"
        self.cookies = "; ".join(f"{c.name}={c.value}" for c in session.cookies) if session else ""
        self.origin = origin or studio.base_url
        self.after = after
        self.hello = hello
        self.messages: list[dict] = []
        self.connection = None

    def __enter__(self) -> RunSocket:
        from websockets.sync.client import connect

        headers = {"Cookie": self.cookies} if self.cookies else {}
        # max_size=None: a snapshot of a long run is larger than the 1 MiB default.
        self.connection = connect(self.url, origin=self.origin, additional_headers=headers,
                                  open_timeout=10, max_size=None)
        if self.hello:
            self.send({"type": "hello", "after": self.after})
        return self

    def __exit__(self, *exc) -> None:
        self.connection.close()

    def send(self, message: dict) -> None:
        self.connection.send(json.dumps(message))

    def receive(self, timeout: float = 10) -> dict:
        message = json.loads(self.connection.recv(timeout=timeout))
        self.messages.append(message)
        return message

    def receive_until(self, predicate, timeout: float = 30) -> list[dict]:
        """Receive until a message satisfies `predicate`; return the messages received meanwhile (it last)."""
        deadline = time.monotonic() + timeout
        received = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message within {timeout:.0f} s; got types "
                                     f"{[m.get('type') for m in received]}")
            try:
                message = self.receive(timeout=left)
            except TimeoutError:
                continue
            received.append(message)
            if predicate(message):
                return received


def close_code(studio: StudioServer, session, run_id: str, origin: str | None = None, timeout: float = 10):
    """Open the run socket and return the close code the server ends it with (None if it stays open).

    A handshake the server rejects outright (e.g. a bad Origin) raises websockets' InvalidStatus instead.
    """
    from websockets.exceptions import ConnectionClosed

    try:
        with RunSocket(studio, session, run_id, origin=origin) as ws:
            ws.receive_until(lambda m: False, timeout=timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    except AssertionError:
        return None
