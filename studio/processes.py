"""Processes and process groups of this host: identity tokens, liveness, signals (psutil, no Django).

A stage runs in its own session, so its pid is also the id of a process
group holding every process it starts; stopping it means signalling that
group. Pids are reused, so a process is named by a token rather than its pid:

    token = process_token(pid)     # "boot id:pid:start time" (start in clock ticks since boot)
    token_alive(token)             # is that very process still there (a zombie counts)?
    process_running(token)         # ... and not a zombie?
    signal_token_group(pid, token, signal.SIGTERM)   # never reaches another process that got the pid

No other process, now or after a reboot, has the same token: the boot id
changes with every boot and the start time tells a reused pid from the
original. The start time is counted from boot, so it does not move when
the wall clock is set. Tokens are stored in the database (Run.supervisor_token,
StageRun.token, GpuLease.holder_token) and compared by later processes, so
their format must not change.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import psutil

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- identity --------------------------------------------------------------------------------


def process_token(pid: int | None = None) -> str:
    """boot id : pid : start time of a process, which no other process (now or after a reboot) shares.

    The start time is empty for a process that is gone (such a token is never alive).
    """
    pid = pid or os.getpid()
    try:
        start = str(_start_ticks(psutil.Process(pid)))
    except psutil.Error:
        start = ""
    return f"{_boot_id()}:{pid}:{start}"


def token_pid(token: str) -> int | None:
    """The pid in a process_token(), None if it is not one."""
    try:
        return int(token.rsplit(":", 2)[1])
    except (ValueError, IndexError):
        return None


def token_alive(token: str) -> bool:
    """Is the process a process_token() names still there (a zombie counts)?"""
    return _token_process(token) is not None


def process_running(token: str) -> bool:
    """Is the process a process_token() names still running: there, and not a zombie?

    A stage whose supervisor died is nobody's child to reap; in a container
    whose init does not reap orphans it may stay a zombie forever.
    """
    proc = _token_process(token)
    if proc is None:
        return False
    try:
        return proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def process_started_at(pid: int) -> float | None:
    """Unix time at which process `pid` started (to ~10 ms), None if it is gone."""
    try:
        ticks = _start_ticks(psutil.Process(pid))
    except psutil.Error:
        return None
    # Start times count from boot, CLOCK_BOOTTIME's zero (psutil's boot time is whole seconds).
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / CLOCK_TICKS


def pid_alive(pid: int) -> bool:
    """Is there a process with this pid (any process: check a token to know it is the one meant)?"""
    return psutil.pid_exists(pid)


def _token_process(token: str) -> psutil.Process | None:
    """The process a token names, if it is still there and still that process."""
    pid = token_pid(token)
    if pid is None:
        return None
    boot, _, start = token.rsplit(":", 2)
    if boot != _boot_id():
        return None
    try:
        proc = psutil.Process(pid)
        return proc if str(_start_ticks(proc)) == start else None
    except psutil.Error:  # gone, or not ours to inspect: not the process the token names as far as we can tell
        return None


def _start_ticks(proc: psutil.Process) -> int:
    # Clock ticks from boot to the process's start (field 22 of /proc/<pid>/stat): psutil adds
    # the boot time to it, which moves with the wall clock, so it is taken off again.
    return round((proc.create_time() - psutil.boot_time()) * CLOCK_TICKS)


@lru_cache(maxsize=1)
def _boot_id() -> str:
    # Unique per boot (psutil has no such thing: its boot time is a wall-clock reading).
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# --- process groups --------------------------------------------------------------------------


def signal_process_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but is not ours: leave it alone
    return True


def signal_token_group(pid: int, token: str, sig: int) -> bool:
    """Signal the process group led by `pid`, unless that pid now belongs to a process other than `token`'s.

    For a stage recorded without a token (older rows) the pid alone decides.
    """
    if not pid:
        return False
    if token and not token_alive(token) and pid_alive(pid):
        return False  # its pid now belongs to another process: never signal that one
    return signal_process_group(pid, sig)


def group_alive(pgid: int) -> bool:
    """True while a process group has a member that is not a zombie.

    Zombies count for killpg(pgid, 0), and orphaned ones may never be reaped
    in a container whose init does not wait() for them.
    """
    if not signal_process_group(pgid, 0):
        return False
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        try:
            if os.getpgid(proc.pid) == pgid:
                return True
        except OSError:  # gone meanwhile
            continue
    return False


def terminate_process_group(proc: subprocess.Popen, grace: float) -> int:
    """SIGTERM the process group led by `proc`, SIGKILL it after `grace` seconds; return the exit code."""
    signal_process_group(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        signal_process_group(proc.pid, signal.SIGKILL)
        return proc.wait()
    finally:
        kill_leftovers(proc.pid)


def kill_leftovers(pgid: int, grace: float = 2.0) -> None:
    """Stop what is left of a process group whose leader exited: SIGTERM, then SIGKILL after `grace` s.

    Processes a stage started and left behind keep its group alive after the
    stage exited: no stage may outlive its StageRun.
    """
    if not group_alive(pgid):
        return
    signal_process_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not group_alive(pgid):
            return
    signal_process_group(pgid, signal.SIGKILL)
