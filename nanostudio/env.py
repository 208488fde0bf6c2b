"""Small helpers that turn environment variables into settings.

Kept out of settings.py so they can be tested without reloading Django.
Every helper takes the environment as an argument (default: os.environ), so
tests pass a plain dict instead of patching the process environment.
"""

from __future__ import annotations

import os
import secrets
import stat
import warnings
from pathlib import Path

import dj_database_url

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def envbool(name: str, default: bool = False, env=None) -> bool:
    env = os.environ if env is None else env
    if name not in env:
        return default
    value = env[name].strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    # A typo such as DEBUG=ture must not silently mean "off" (or "on").
    raise ValueError(f"{name}={env[name]!r}: expected one of {sorted(TRUE_WORDS | FALSE_WORDS - {''})}")


def envint(name: str, default: int, env=None) -> int:
    env = os.environ if env is None else env
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a whole number") from None


def envlist(name: str, default: list[str], env=None) -> list[str]:
    """Comma-separated list; an unset or blank variable gives the default."""
    env = os.environ if env is None else env
    value = env.get(name, "").strip()
    if not value:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def database_config(env=None, default_sqlite: Path | None = None) -> dict:
    """DATABASES['default'] from DATABASE_URL, or an SQLite file.

    SQLite is shared by the web process (daphne), the django-q2 worker and
    `runjob`, so it gets a long busy timeout, WAL (readers never block the
    writer) and IMMEDIATE transactions (a transaction takes the write lock at
    BEGIN instead of failing with "database is locked" when it upgrades).
    """
    env = os.environ if env is None else env
    url = env.get("DATABASE_URL", "").strip()
    if url:
        db = dj_database_url.parse(url, conn_max_age=envint("CONN_MAX_AGE", 0, env), conn_health_checks=True)
    else:
        db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(default_sqlite)}
    if db["ENGINE"] == "django.db.backends.sqlite3":
        options = db.setdefault("OPTIONS", {})
        options.setdefault("timeout", 20)
        options.setdefault("transaction_mode", "IMMEDIATE")
        options.setdefault("init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL")
        # SQLite connections are cheap; a persistent one would pin a WAL snapshot.
        db["CONN_MAX_AGE"] = 0
    return db


def load_or_create_secret_key(path: Path) -> str:
    """Read the key at `path`, creating it (mode 0600) on first use.

    The web process and the queue worker may start at the same moment, so the
    file is written under a temporary name and hard-linked into place: link()
    fails if another process won, and then we read the winner's key.
    """
    path = Path(path)
    if path.exists():
        key = path.read_text().strip()
        if key:
            return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        key = path.read_text().strip()
    finally:
        os.unlink(tmp)
    if not key:
        raise RuntimeError(f"{path} is empty: delete it (a new key is made) or set SECRET_KEY")
    return key


def plotly_js_dir() -> Path:
    """The folder of plotly.min.js inside the installed plotly package."""
    import importlib.util

    spec = importlib.util.find_spec("plotly")
    return Path(spec.origin).parent / "package_data"


def umask_from_env(env=None) -> int:
    """NANOSTUDIO_UMASK as a number: an octal mask such as 077 (the default) or 027."""
    env = os.environ if env is None else env
    value = env.get("NANOSTUDIO_UMASK", "").strip() or "077"
    try:
        mask = int(value, 8)
    except ValueError:
        mask = -1
    if not 0 <= mask <= 0o777:
        raise ValueError(f"NANOSTUDIO_UMASK={value!r}: expected an octal mask such as 077 (owner only) or 027")
    return mask


def restrict_mode(path: Path, umask: int) -> bool:
    """Take the bits `umask` forbids off an existing file or folder (made before the umask was set).

    Returns True when the mode changed. A path owned by someone else is left
    alone with a warning: start-up must not fail over it.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not mode & umask:
        return False
    try:
        os.chmod(path, mode & ~umask)
    except OSError as e:
        warnings.warn(f"could not make {path} private (mode {mode:o}): {e}", RuntimeWarning, stacklevel=2)
        return False
    return True


def sqlite_files(db: dict) -> list[Path]:
    """The files of an SQLite database (the database, its WAL, shared memory and journal); [] for others."""
    name = str(db.get("NAME") or "")
    if db.get("ENGINE") != "django.db.backends.sqlite3" or not os.path.isabs(name):
        return []  # in-memory and file: URIs have no path of ours to guard
    return [Path(name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
