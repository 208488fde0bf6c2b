"""Django settings for nanostudio, read from the environment.

Defaults give a working single-node studio with nothing to install: SQLite,
django-q2's ORM broker, Channels' in-memory layer. Set DATABASE_URL and
REDIS_URL to scale out (PostgreSQL, Redis). Variables:

    SECRET_KEY            signing key; if unset one is generated once and kept
                          in NANOSTUDIO_SECRET_KEY_FILE (default <runs>/.secret_key, mode 0600)
    DEBUG                 1/0 (default 0)
    ALLOWED_HOSTS         comma list (default localhost,127.0.0.1,[::1])
    CSRF_TRUSTED_ORIGINS  comma list of scheme://host[:port] (for a reverse proxy)
    DATABASE_URL          e.g. postgres://user:pw@host/db (default SQLite <home>/db.sqlite3)
    REDIS_URL             enables channels-redis and django-q2's Redis broker
    NANOSTUDIO_HOME       where the SQLite file and collected static files live (default: repo root)
    NANOSTUDIO_RUNS_DIR   where run directories live (default <home>/runs)
    NANOSTUDIO_HTTPS      1 when served over TLS: secure cookies, SSL redirect, proxy header
    SECURE_HSTS_SECONDS   HSTS max-age (default 0 = off; only meaningful with TLS)
    NANOSTUDIO_RUN_TIMEOUT  longest pipeline a queue worker may run, seconds (default 7 days)
    NANOSTUDIO_CANCEL_GRACE seconds between SIGTERM and SIGKILL when a run is cancelled (default 10)
    NANOSTUDIO_PAUSE_GRACE  seconds a paused stage may take to save its checkpoint (default 900)
    NANOSTUDIO_GPUS       GPUs of this node to lease to runs (default: what nvidia-smi -L lists)
    NANOSTUDIO_Q_WORKERS  pipelines run at once by one qcluster (default 1: they share the GPUs)
    NANOSTUDIO_CHAT_DEVICE  where the chat page's models run: auto (every GPU, else CPU), cuda or cpu
    NANOSTUDIO_CHAT_SLOTS   answers generated at once on the CPU (default 1; on GPUs one per GPU)
    NANOSTUDIO_CHAT_GPUS    GPUs the chat may use, e.g. 6,7 (default: all; training leases are not consulted)
    NANOSTUDIO_CHAT_MODELS  checkpoints kept loaded per slot, least recently used unloaded (default 2)
    NANOSTUDIO_CHAT_COMPILE 1: decode through torch.compile (bf16 where the CPU has it): ~2.5x faster
                          decoding on an AMX CPU, ~20 s more to load a checkpoint (default 0)
    NANOSTUDIO_CHAT_MAX_MESSAGE_CHARS / _MAX_TURNS / _MAX_TOTAL_CHARS / _MAX_NEW_TOKENS
                          chat limits: characters per message (8000), user turns per branch (100),
                          characters per branch (100000), tokens per answer (2048)
    LOG_LEVEL             console log level (default INFO)
    NANOSTUDIO_UMASK      umask of the studio's processes and the stages they start (default 077:
                          the database, secret key and run folders are readable by their owner only;
                          027 lets the owner's group read them)
    NANOSTUDIO_LOGIN_FAILURE_LIMIT   wrong passwords for one username from one IP address before
                          logins for it are refused (default 5)
    NANOSTUDIO_LOGIN_LOCKOUT_MINUTES how long such a lockout lasts, counted from the last attempt (default 15);
                          `manage.py axes_reset` lifts every lockout at once
    EMAIL_HOST, EMAIL_PORT, EMAIL_HOST_USER, EMAIL_HOST_PASSWORD, EMAIL_USE_TLS, DEFAULT_FROM_EMAIL
                          outgoing mail; the password-reset pages exist only when EMAIL_HOST
                          or EMAIL_BACKEND is set
    EMAIL_BACKEND         e.g. django.core.mail.backends.console.EmailBackend to print mails instead
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path

import django

from nanostudio.env import (
    database_config, envbool, envint, envlist, load_or_create_secret_key, plotly_js_dir, restrict_mode, sqlite_files,
    umask_from_env,
)

# Set first, before anything below creates a file. A GPU node is shared: with
# the usual 022, any local user (the code sandbox's uid among them) could read
# the SQLite file (password hashes, sessions), the secret key and every run's
# checkpoints and logs. Every process that loads these settings (daphne,
# qcluster, runjob, manage.py) and every stage it starts inherits the mask.
NANOSTUDIO_UMASK = umask_from_env()
os.umask(NANOSTUDIO_UMASK)

BASE_DIR = Path(__file__).resolve().parent.parent  # the repository root
NANOSTUDIO_HOME = Path(os.environ.get("NANOSTUDIO_HOME") or BASE_DIR).resolve()
NANOSTUDIO_RUNS_DIR = Path(os.environ.get("NANOSTUDIO_RUNS_DIR") or NANOSTUDIO_HOME / "runs").resolve()

DEBUG = envbool("DEBUG", False)

# A generated key lives next to the runs (git-ignored), never in the code, and
# survives restarts so sessions and signed queue payloads stay valid.
SECRET_KEY = os.environ.get("SECRET_KEY", "").strip() or load_or_create_secret_key(
    Path(os.environ.get("NANOSTUDIO_SECRET_KEY_FILE") or NANOSTUDIO_RUNS_DIR / ".secret_key")
)

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",  # first: its runserver replaces Django's, so development is ASGI too
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_q",
    "axes",  # login throttling, see AXES_* below
    "studio",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Every page needs a login except the login page itself (see LOGIN_URL).
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Django 6 has the Content-Security-Policy middleware built in; 5.2 (the LTS for Python 3.10/3.11) uses ours.
    "django.middleware.csp.ContentSecurityPolicyMiddleware" if django.VERSION >= (6,)
    else "nanostudio.security.ContentSecurityPolicyMiddleware",
    # Last, as django-axes asks: it turns a lockout noticed during the login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "nanostudio.urls"
WSGI_APPLICATION = "nanostudio.wsgi.application"
ASGI_APPLICATION = "nanostudio.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": database_config(default_sqlite=NANOSTUDIO_HOME / "db.sqlite3")}
# Files and folders made before the umask above (an older install) lose their
# group/other bits at start-up; new ones are created private. SQLite gives its
# -wal/-shm/-journal files the database file's mode.
for _path in [*sqlite_files(DATABASES["default"]), NANOSTUDIO_RUNS_DIR]:
    restrict_mode(_path, NANOSTUDIO_UMASK)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "studio:dashboard"
LOGOUT_REDIRECT_URL = "login"

# Login throttling (django-axes): after NANOSTUDIO_LOGIN_FAILURE_LIMIT wrong
# passwords for one username from one IP address, that pair is refused for
# NANOSTUDIO_LOGIN_LOCKOUT_MINUTES, counted from its last attempt. Keyed on the
# pair so that one mistyping person locks neither their colleagues nor
# themselves from another machine. Sessions (force_login, WebSockets) are
# unaffected: only authenticate() is guarded, and it needs the request.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses a locked-out pair before any password is checked
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = envint("NANOSTUDIO_LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=envint("NANOSTUDIO_LOGIN_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True  # a correct password clears the pair's earlier mistakes
AXES_LOCKOUT_CALLABLE = "nanostudio.security.login_locked_out"  # the login page, saying why (HTTP 429)
AXES_VERBOSE = False  # no start-up banner in every manage.py command; failures are still logged

# Outgoing mail. Password reset mails a link; without a configured mail server
# Django would try localhost:25, so the reset pages are only mounted (see
# urls.py) when EMAIL_HOST or EMAIL_BACKEND is set.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "").strip() or "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = os.environ.get("EMAIL_HOST", "").strip() or "localhost"
EMAIL_PORT = envint("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", False)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "").strip() or "nanostudio@localhost"
PASSWORD_RESET_ENABLED = bool(os.environ.get("EMAIL_HOST", "").strip() or os.environ.get("EMAIL_BACKEND", "").strip())

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

# Static files are served by WhiteNoise from the app process itself (daphne
# has no static handler and GPU nodes often have no web server in front).
# Finders let it serve straight from static/ without a collectstatic step;
# collectstatic into STATIC_ROOT still works for a proxy in front.
STATIC_URL = "static/"
# plotly.js comes from the plotly Python package (no CDN: GPU nodes are often offline).
STATICFILES_DIRS = [BASE_DIR / "static", ("plotly", plotly_js_dir())]
STATIC_ROOT = NANOSTUDIO_HOME / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Static files are public (a proxy in front may serve STATIC_ROOT as another
    # user): collected world-readable despite the private umask.
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage",
                    "OPTIONS": {"file_permissions_mode": 0o644, "directory_permissions_mode": 0o755}},
}
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG
# Until someone runs collectstatic, STATIC_ROOT does not exist; with the
# finders above nothing is missing, so WhiteNoise's warning about it is noise.
warnings.filterwarnings("ignore", message=r"No directory at: .*staticfiles")

# Security headers. TLS-only settings switch on with NANOSTUDIO_HTTPS=1, so
# `check --deploy` on a plain-HTTP localhost install warns only about TLS.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
HTTPS = envbool("NANOSTUDIO_HTTPS", False)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", HTTPS)
if HTTPS:
    # TLS is usually terminated by a proxy that sets this header.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", False)

# Content-Security-Policy (Django 6's setting name and format; see MIDDLEWARE).
# Every script and style comes from /static/ (plotly.js too, no CDN) and data
# reaches the pages in json_script blocks, so no inline script or style is
# allowed: injected markup cannot run code. connect-src 'self' covers the
# same-origin WebSockets (ws: and wss:) in current browsers.
SECURE_CSP = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    # No 'unsafe-inline': two hashes admit the only inline <style> elements, both plotly.js's.
    # It creates an empty one and adds its rules through the CSSOM (which CSP does not
    # restrict): the first hash is that of the empty string. The second is that of the
    # maplibre-gl stylesheet plotly.js 4.x injects at load (for map traces, unused here);
    # a plotly upgrade may change it, and the browser test then prints the new hash.
    "style-src": ["'self'", "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='",
                  "'sha256-ji27qzEtxXZW+7dun6UwjHXJ18e6WAin1VvNtkzIE/o='"],
    "img-src": ["'self'", "data:"],
    "font-src": ["'self'"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'none'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}

REDIS_URL = os.environ.get("REDIS_URL", "").strip()

# Channels: the in-memory layer is per process, so with it the WebSocket
# consumers tail events.jsonl themselves; with Redis a worker can push.
# The backend is a dotted path, imported only when used, so this stays
# importable without channels-redis installed.
if REDIS_URL:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# django-q2. A pipeline is one task that runs for hours (studio.tasks.run_pipeline).
# The ORM broker re-delivers a task whose acknowledgement has not arrived
# `retry` seconds after it was taken, and django-q2 has no cancel API. So:
#   - `timeout` is the longest a pipeline may run (SIGALRM in the worker; our
#     execute_run catches it, kills the stage's process group and marks the
#     run failed) and `retry` is larger, so a running pipeline is never
#     handed to a second worker;
#   - even if it were, actions.execute_run only starts a run whose status it
#     can switch from queued to running in one conditional UPDATE, so a
#     redelivered task finds the run running/finished and returns;
#   - max_attempts=1 and ack_failures: a failed pipeline is recorded on the
#     Run (with the log tail) and is resumed by a person, not retried blindly;
#   - one worker by default: runs queue up for the node's GPUs.
#   - a cluster killed with SIGKILL takes its tasks with it (locked for `retry`
#     with the ORM broker, gone with Redis): each worker, as it starts, enqueues
#     the runs still queued again and adopts a run whose stage still runs
#     (studio/tasks.py, on_worker_start).
# Cancellation is ours: a DB flag polled by execute_run plus signals to the
# stage's process group (studio/supervisor.py, studio/processes.py).
NANOSTUDIO_RUN_TIMEOUT = envint("NANOSTUDIO_RUN_TIMEOUT", 7 * 24 * 3600)
# Cancel: SIGTERM to the stage's process group, then SIGKILL after this many
# seconds. Pause: SIGTERM and wait this long for the checkpoint to be saved.
NANOSTUDIO_CANCEL_GRACE = float(os.environ.get("NANOSTUDIO_CANCEL_GRACE", "10"))
NANOSTUDIO_PAUSE_GRACE = float(os.environ.get("NANOSTUDIO_PAUSE_GRACE", "900"))
# The chat page (studio/serving.py, studio/chat.py).
NANOSTUDIO_CHAT_DEVICE = os.environ.get("NANOSTUDIO_CHAT_DEVICE", "auto")
if NANOSTUDIO_CHAT_DEVICE not in ("auto", "cuda", "cpu"):
    raise ValueError(f"NANOSTUDIO_CHAT_DEVICE must be auto, cuda or cpu, not {NANOSTUDIO_CHAT_DEVICE!r}")
NANOSTUDIO_CHAT_SLOTS = max(1, envint("NANOSTUDIO_CHAT_SLOTS", 1))
try:
    NANOSTUDIO_CHAT_GPUS = [int(i) for i in envlist("NANOSTUDIO_CHAT_GPUS", [])]
except ValueError:
    raise ValueError("NANOSTUDIO_CHAT_GPUS must be a comma list of GPU indices, e.g. 6,7") from None
NANOSTUDIO_CHAT_MODELS = max(1, envint("NANOSTUDIO_CHAT_MODELS", 2))
NANOSTUDIO_CHAT_COMPILE = envbool("NANOSTUDIO_CHAT_COMPILE", False)
NANOSTUDIO_CHAT_LIMITS = {
    "max_message_chars": envint("NANOSTUDIO_CHAT_MAX_MESSAGE_CHARS", 8000),
    "max_turns": envint("NANOSTUDIO_CHAT_MAX_TURNS", 100),
    "max_total_chars": envint("NANOSTUDIO_CHAT_MAX_TOTAL_CHARS", 100_000),
    "max_new_tokens": envint("NANOSTUDIO_CHAT_MAX_NEW_TOKENS", 2048),
}

Q_CLUSTER = {
    "name": "nanostudio",
    "workers": envint("NANOSTUDIO_Q_WORKERS", 1),
    "timeout": NANOSTUDIO_RUN_TIMEOUT,
    "retry": NANOSTUDIO_RUN_TIMEOUT + 3600,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "poll": 1,  # seconds between ORM broker polls: gentle on SQLite
    "save_limit": 500,
    "label": "Task queue",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO").upper()},
    "loggers": {
        # Request lines are printed by daphne already.
        "django.server": {"level": "WARNING"},
        # django-axes logs every successful login and clean-up at INFO; failures and lockouts are WARNINGs.
        "axes": {"level": "WARNING"},
    },
}
