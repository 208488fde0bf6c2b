#!/usr/bin/env bash
# One entry point for a fresh machine (Linux, Python >= 3.10, a Rust toolchain).
#
#   ./setup.sh            set up only: .venv, Python packages, the Rust extension, the database
#   ./setup.sh run [PRESET] [runjob options...]
#                         set up, then run the pipeline: `manage.py runjob PRESET`
#                         (default: speedrun on a machine with NVIDIA GPUs, tiny otherwise)
#   ./setup.sh test [pytest options...]
#                         set up, then run the whole test suite (fast and slow tests)
#
# Offline machines: when NANOSTUDIO_DATA_MIRROR is unset and ../shared/data
# exists beside the checkout, it is used as the data mirror.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "no $PY on PATH; install Python 3.10+ or set PYTHON=/path/to/python3"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "Python 3.10+ needed, $PY is $("$PY" -V 2>&1)"
command -v cargo >/dev/null || [ -x "$HOME/.cargo/bin/cargo" ] || die "the Rust toolchain (cargo) is needed to build bpe_rust: https://rustup.rs"
export PATH="$HOME/.cargo/bin:$PATH"

# System packages the tests need: Debian's chromium (browser tests; Playwright
# drives it, never downloads its own), PostgreSQL and Redis (the studio's scale
# mode is tested against real servers). Installed once, when missing, as root.
# NANOSTUDIO_NO_APT=1 skips this (those tests then skip with a message).
need_apt() {
    [ "${NANOSTUDIO_NO_APT:-0}" = 1 ] && return 1
    command -v chromium >/dev/null && command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 1
    return 0
}
if [ "${1:-}" = test ] && need_apt; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        say "installing chromium, postgresql and redis-server (apt)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium postgresql redis-server >/dev/null
    elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
        say "installing chromium, postgresql and redis-server (sudo apt)"
        sudo apt-get update -qq >/dev/null
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium postgresql redis-server >/dev/null
    else
        say "chromium/postgresql/redis-server missing and no apt: browser and scale-mode tests will be skipped"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PY" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
    say "installing uv into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv>=0.5,<1"
fi
say "installing nanostudio (Python packages + Rust extension)"
# uv keeps its cache in ~/.cache/uv, so a second setup does not download torch again.
# The lock is resolved for CPython 3.11 on x86-64 Linux (our machines); other
# interpreters resolve from the ranges in pyproject.toml.
constraints=()
if .venv/bin/python -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64"))'; then
    constraints=(-c requirements.lock)
fi
.venv/bin/uv pip install --quiet --python .venv/bin/python "${constraints[@]}" -e ".[dev]"

if [ -z "${NANOSTUDIO_DATA_MIRROR:-}" ] && [ -d "$ROOT/../shared/data/pretrain" ]; then
    export NANOSTUDIO_DATA_MIRROR="$(cd "$ROOT/../shared/data" && pwd)"
    say "using the offline data mirror at $NANOSTUDIO_DATA_MIRROR"
fi

say "preparing the database"
.venv/bin/python manage.py migrate --noinput >/dev/null

cmd=${1:-setup}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        say "ready: .venv/bin/python manage.py runjob tiny   (or ./setup.sh run)"
        ;;
    run)
        preset=tiny
        if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then preset=$1; shift
        elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then preset=speedrun
        fi
        say "running: manage.py runjob $preset $*"
        exec .venv/bin/python manage.py runjob "$preset" "$@"
        ;;
    test)
        say "running the test suite"
        set +e
        .venv/bin/python -m pytest "$@"
        code=$?
        # pytest exits 5 when it collected nothing: that is a failure here.
        [ $code -eq 5 ] && echo "setup.sh: pytest collected no tests" >&2
        exit $code
        ;;
    *) die "unknown command '$cmd'; use: ./setup.sh [setup|run [PRESET]|test]";;
esac
