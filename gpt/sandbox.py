"""Run untrusted Python code (HumanEval solutions, future tools) in a child process.

    from gpt.sandbox import run
    result = run("print(sum(range(10)))", timeout=5.0)
    result.ok, result.stdout          # (True, '45\\n')
    result.network_isolated           # False when this machine refused a network namespace

How it works. ``run`` starts a small *intermediate* Python process (this file
run with ``--bootstrap``) in a new session, with a scrubbed environment
(PATH, LANG, HOME=TMPDIR=the work dir). The intermediate tries to enter new
network, mount, PID, IPC and UTS namespaces (directly when it is root, inside a
new user namespace otherwise), remounts the whole filesystem read-only in its
private mount namespace and mounts a small empty tmpfs as the work directory,
reports what it achieved on a private pipe, then forks the program's process,
which (as PID 1 of the new PID namespace when available) mounts a fresh /proc,
drops privileges (as root: to a random unprivileged uid; the interpreter's
prefix is bind-mounted where that uid can reach it), sets resource limits and
execs ``python -I -S program.py`` (standard library only, no site-packages).
The parent reads stdout/stderr (capped), and at the deadline kills the whole
process group; when the program exits it kills the group too, so nothing it
started survives.

What it protects against (each only where the flag says so):
- CPU: RLIMIT_CPU, plus the wall-clock deadline (always).
- Memory: RLIMIT_AS = memory_mb of address space per process (always).
- Files: RLIMIT_FSIZE per file (always); the work dir is a tmpfs capped at
  WORK_DIR_MB when ``fs_isolated``; core dumps are off.
- Processes: when the parent runs as root, the program runs as a random
  unprivileged uid (``uid_isolated``) with its own RLIMIT_NPROC count, so a
  fork bomb hits the limit; root itself is exempt from RLIMIT_NPROC, hence the
  uid switch. If that uid cannot reach the interpreter and there is no mount
  namespace to fix it, the program stays root: then nothing limits its process
  count until the deadline kill. Without root, RLIMIT_NPROC counts the caller's
  own processes. In a PID namespace (``pid_isolated``) every process dies with
  the program's PID 1; without one, a process that calls setsid() leaves the
  process group and can outlive the deadline kill.
- Killing the caller: the program runs in its own session under the
  intermediate, so killing its parent kills only the intermediate. In a PID
  namespace it cannot name processes outside; as another uid it may not
  signal them. With neither (root fallback), kill(-1) would reach everything.
- Environment secrets: the environment is rebuilt from scratch (always).
- Network: a new network namespace has only a loopback that is down, so no
  connection to anything, local or remote (``network_isolated``).
- Filesystem: everything but the work dir is read-only (``fs_isolated``).
  Without it, a program running as the caller's uid can write whatever the
  caller can (as root: anything), and only the work dir is cleaned up.

What it does NOT protect against: kernel exploits, reading files its uid may
read (the filesystem stays visible; all of it when the program stays root), CPU and memory-bandwidth
contention with other processes, and, when a flag is False, the threat that
flag names. There is no seccomp filter and no cgroup.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import random
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback

WORK_DIR_MB = 64            # tmpfs size of the work dir when the mount namespace works
MAX_FILE_BYTES = 16 << 20   # RLIMIT_FSIZE: largest file the program may write
MAX_PROCESSES = 64          # RLIMIT_NPROC (threads count too)
MAX_OPEN_FILES = 256
KILL_GRACE = 0.5            # seconds to drain pipes after the program's group was killed

# Linux constants (sched.h, mount.h, prctl.h); Python 3.11's os has no unshare().
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 0x1000, 0x4000, 0x40000
SYS_MOUNT_SETATTR = 442     # same number on every architecture (new-style syscall)
MOUNT_ATTR_RDONLY, AT_RECURSIVE, AT_FDCWD = 0x1, 0x8000, -100
PR_SET_NO_NEW_PRIVS = 38


@dataclasses.dataclass
class SandboxResult:
    ok: bool                  # exited with status 0 before the deadline
    exit_code: int | None     # negative: killed by that signal (like subprocess)
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool           # stdout or stderr was cut at max_output bytes
    network_isolated: bool
    duration: float           # seconds, wall clock
    fs_isolated: bool = False     # everything outside the work dir is read-only
    pid_isolated: bool = False    # own PID namespace: all its processes die together
    uid_isolated: bool = False    # ran as a different, unprivileged uid


def run(code: str, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 64_000,
        stdin: str = "") -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox and return what happened."""
    root = tempfile.mkdtemp(prefix="nanostudio-sandbox-")
    try:
        return _run_in(root, code, timeout, memory_mb, max_output, stdin)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_in(root, code, timeout, memory_mb, max_output, stdin) -> SandboxResult:
    # root/ holds the program and its stdin; root/work/ is the (empty) cwd.
    # 0o711: another uid may reach program.py by name but not list root/.
    os.chmod(root, 0o711)
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    os.mkdir(os.path.join(root, "python"), 0o755)  # mount point for the interpreter, see _bootstrap
    program = os.path.join(root, "program.py")
    stdin_path = os.path.join(root, "stdin.txt")
    for path, text in ((program, code), (stdin_path, stdin)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o644)
    config = {
        "program": program, "work": work, "memory_mb": int(memory_mb),
        "cpu_seconds": max(1, int(timeout + 1)),
        "python": os.path.realpath(sys.executable), "python_prefix": sys.base_prefix,
        "python_mount": os.path.join(root, "python"),
    }
    status_read, status_write = os.pipe()
    start = time.monotonic()
    with open(stdin_path, "rb") as stdin_file:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--bootstrap",
             json.dumps(config), str(status_write)],
            stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=work, env=_clean_env(work), start_new_session=True,
            pass_fds=(status_write,))
    os.close(status_write)
    try:
        out, err, timed_out = _collect(proc, start + timeout, max_output)
        # Pipes can close before the program exits (it may close them itself).
        while not timed_out and not _has_exited(proc):
            timed_out = time.monotonic() >= start + timeout
            time.sleep(0.005)
    finally:
        _kill_group(proc)
        proc.wait()
        _wait_group_gone(proc.pid)
        proc.stdout.close()
        proc.stderr.close()
    duration = time.monotonic() - start
    status = _read_status(status_read)
    exit_code = proc.returncode
    return SandboxResult(
        ok=exit_code == 0 and not timed_out, exit_code=exit_code,
        stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
        timed_out=timed_out, truncated=out.truncated or err.truncated,
        network_isolated=status.get("net", False), duration=duration,
        fs_isolated=status.get("fs", False), pid_isolated=status.get("pid", False),
        uid_isolated=status.get("uid", False))


def _clean_env(work: str) -> dict:
    # Nothing is inherited: secrets in the caller's environment never reach the program.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "HOME": work, "TMPDIR": work}


class _Capped(bytes):
    truncated = False


def _collect(proc, deadline, max_output):
    """Read stdout/stderr until both close or the deadline; keep max_output bytes of each.

    Output past the cap is read and dropped (rather than left in the pipe) so a
    program that prints a lot and then exits normally is not mistaken for a hang.
    """
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    cut = {fd: False for fd in buffers}
    open_fds = set(buffers)
    timed_out = exited = False
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = not exited  # after an exit, only stragglers held the pipes
            break
        if not exited and _has_exited(proc):
            # The program is gone; whatever it left running in the background
            # must not keep the pipes open until the deadline.
            exited = True
            _kill_group(proc)
            deadline = min(deadline, time.monotonic() + KILL_GRACE)
        ready, _, _ = select.select(list(open_fds), [], [], min(left, 0.05))
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
                continue
            room = max_output - len(buffers[fd])
            if len(chunk) > room:
                cut[fd] = True
            buffers[fd] += chunk[:max(room, 0)]
    results = []
    for fd in (proc.stdout.fileno(), proc.stderr.fileno()):
        data = _Capped(bytes(buffers[fd]))
        data.truncated = cut[fd]
        results.append(data)
    return results[0], results[1], timed_out


def _has_exited(proc) -> bool:
    """True once the intermediate exited, without reaping it.

    Not reaping keeps its pid (the process group id) from being reused, so a
    later killpg() can never hit an unrelated group.
    """
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _kill_group(proc) -> None:
    _kill_group_id(proc.pid)


def _kill_group_id(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, limit: float = 2.0) -> None:
    """Kill the process group until no live member is left, so run() returns clean.

    Safe after the leader was reaped: the kernel does not reuse a pid while a
    process group still carries it. Zombies count as gone: they run nothing,
    and those orphaned by the kill wait for the system's init to reap them.
    """
    end = time.monotonic() + limit
    while _live_members(pgid) and time.monotonic() < end:
        _kill_group_id(pgid)
        time.sleep(0.01)


def _live_members(pgid: int) -> bool:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # After the command name: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _read_status(fd) -> dict:
    # The intermediate writes one JSON line before starting the program and
    # closes the pipe, so the program itself can never forge this report.
    try:
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read() or b"{}")
    except ValueError:
        return {}


# ---------------------------------------------------------------------------
# The intermediate process (runs as `python -I -S sandbox.py --bootstrap CONFIG FD`).
# Only the standard library, and it must stay single-threaded.

def _bootstrap(config: dict, status_fd: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    as_root = os.geteuid() == 0
    # Root keeps its uid namespace (so it can switch to an unprivileged uid);
    # anyone else needs a user namespace to be allowed the other namespaces.
    uid = random.randint(200_000, 265_000) if as_root else os.getuid()
    status = {"net": False, "fs": False, "pid": False, "uid": as_root}
    wanted = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    attempts = [wanted, wanted | CLONE_NEWUSER] if as_root else [wanted | CLONE_NEWUSER]
    for flags in attempts:
        if libc.unshare(flags) == 0:
            if flags & CLONE_NEWUSER:
                _map_ids(os.getuid(), os.getgid())
            status.update(net=True, pid=True)
            status["fs"] = _private_filesystem(libc, config["work"], uid if as_root else None)
            break
    if as_root:
        python = _python_for_other_uid(libc, config, status["fs"])
        if python is None:
            status["uid"] = False  # the interpreter is only reachable as root: stay root
        else:
            config.update(python)
            if not status["fs"]:
                os.chown(config["work"], uid, uid)
    os.write(status_fd, json.dumps(status).encode())
    os.close(status_fd)

    pid = os.fork()
    if pid == 0:
        try:
            _exec_program(libc, config, uid if status["uid"] else None, status["pid"])
        except BaseException:
            traceback.print_exc()
        os._exit(127)
    # Hand the pipes over entirely to the program: EOF then means it (and
    # everything it started) closed them.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)  # report the same death to the caller
    os._exit(os.waitstatus_to_exitcode(wait_status) & 0xFF)


def _map_ids(uid: int, gid: int) -> None:
    # Map our own ids onto themselves: the program keeps a non-root identity
    # inside the namespace and loses the namespace capabilities at exec.
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _mount(libc, source, target, fstype, flags, data) -> bool:
    args = [None if a is None else a.encode() for a in (source, target, fstype)]
    return libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags),
                      None if data is None else data.encode()) == 0


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _private_filesystem(libc, work: str, owner: int | None) -> bool:
    """In the new mount namespace: everything read-only, the work dir a fresh tmpfs."""
    if not _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, None):
        return False  # without this, our mounts would propagate to the host
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE,
                    ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        return False
    options = f"size={WORK_DIR_MB}m,mode=0700"
    if owner is not None:
        options += f",uid={owner},gid={owner}"
    return _mount(libc, "sandbox", work, "tmpfs", MS_NOSUID | MS_NODEV, options)


def _python_for_other_uid(libc, config: dict, own_mounts: bool) -> dict | None:
    """How an unprivileged uid can run this interpreter, or None if it cannot.

    Interpreters often live under a private home (pyenv in /root, mode 0700).
    With our own mount namespace, the interpreter's prefix is bind-mounted at a
    reachable path; LD_LIBRARY_PATH wins over an absolute RUNPATH to libpython.
    """
    prefix, python = config["python_prefix"], config["python"]
    relative = os.path.relpath(python, prefix)
    if own_mounts and not relative.startswith(".."):
        mount = config["python_mount"]
        if _mount(libc, prefix, mount, None, MS_BIND | MS_REC, None):
            return {"python": os.path.join(mount, relative),
                    "library_path": os.path.join(mount, "lib")}
    if _world_reachable(python):
        return {}
    return None


def _world_reachable(path: str) -> bool:
    """Can any uid execute path (every parent directory searchable by others)?"""
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def _exec_program(libc, config: dict, uid: int | None, own_pid_namespace: bool) -> None:
    """In the forked child: fresh /proc, drop privileges, set limits, exec Python."""
    if own_pid_namespace:
        # The host's /proc would still show (and, for the same uid, expose the
        # environment of) processes outside the namespace. Best effort: some
        # containers refuse a new proc mount.
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries give nothing back
    memory = config["memory_mb"] << 20
    for limit, value in ((resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_CPU, config["cpu_seconds"]),
                         (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
                         (resource.RLIMIT_NPROC, MAX_PROCESSES),
                         (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
                         (resource.RLIMIT_CORE, 0)):
        # For RLIMIT_CPU the soft limit sends SIGXCPU, the hard one a second later SIGKILL.
        resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
    os.chdir(config["work"])
    env = _clean_env(config["work"])
    if config.get("library_path"):
        env["LD_LIBRARY_PATH"] = config["library_path"]
    os.execve(config["python"], [config["python"], "-I", "-S", config["program"]], env)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--bootstrap":
    _bootstrap(json.loads(sys.argv[2]), int(sys.argv[3]))
