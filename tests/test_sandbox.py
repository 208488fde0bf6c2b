"""The code sandbox: normal programs run, hostile ones are contained.

Where this machine does not offer an isolation (the result's *_isolated flags
are False), the tests check that the result says so and that the documented
weaker behaviour is what happens, never a protection the code lacks.
"""

from __future__ import annotations

import os
import socket
import textwrap

from gpt.sandbox import run

SANDBOX_PREFIX = "nanostudio-sandbox-"


def leftover_sandbox_processes() -> list[str]:
    """Command lines of live processes started from a sandbox directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if SANDBOX_PREFIX in cmdline and state != "Z":
            found.append(cmdline)
    return found


def test_normal_program_runs_and_prints():
    result = run("print(sum(range(10)))")
    assert result.ok and result.exit_code == 0
    assert result.stdout == "45\n"
    assert not result.timed_out and not result.truncated


def test_stdin_reaches_the_program():
    result = run("print(input().upper())", stdin="hello\n")
    assert result.stdout == "HELLO\n"


def test_program_starts_in_an_empty_writable_work_dir():
    code = """
        import os
        print(os.listdir("."))
        with open("note.txt", "w") as f:
            f.write("kept")
        print(open("note.txt").read())
    """
    result = run(textwrap.dedent(code))
    assert result.ok, result.stderr
    assert result.stdout == "[]\nkept\n"


def test_work_dir_is_removed_afterwards():
    result = run("import os; print(os.getcwd())")
    work = result.stdout.strip()
    assert os.path.basename(os.path.dirname(work)).startswith(SANDBOX_PREFIX)
    assert not os.path.exists(os.path.dirname(work))


def test_humaneval_style_check_passes():
    code = '''
        def add(a, b):
            """Return a + b."""
            return a + b

        def check(candidate):
            assert candidate(2, 3) == 5
            assert candidate(-1, 1) == 0

        check(add)
    '''
    result = run(textwrap.dedent(code))
    assert result.ok, result.stderr


def test_failing_check_is_reported_with_its_assertion():
    code = """
        def add(a, b):
            return a - b

        def check(candidate):
            assert candidate(2, 3) == 5

        check(add)
    """
    result = run(textwrap.dedent(code))
    assert not result.ok
    assert result.exit_code == 1
    assert "AssertionError" in result.stderr


def test_exit_status_is_reported():
    result = run("import sys; sys.exit(3)")
    assert not result.ok and result.exit_code == 3 and not result.timed_out


def test_infinite_loop_is_killed_at_the_deadline():
    result = run("while True: pass", timeout=1.0)
    assert result.timed_out and not result.ok
    assert result.exit_code < 0  # killed by a signal
    assert leftover_sandbox_processes() == []


def test_large_output_is_capped_and_the_program_still_succeeds():
    result = run("print('x' * 1_000_000)", max_output=10_000)
    assert result.ok and result.truncated
    assert result.stdout == "x" * 10_000


def test_printing_forever_is_cut_and_killed_at_the_deadline():
    result = run("while True: print('spam' * 100)", timeout=1.0, max_output=5_000)
    assert result.timed_out and result.truncated and not result.ok
    assert len(result.stdout) == 5_000


def test_memory_bomb_fails_with_memory_error():
    code = "blocks = []\nwhile True: blocks.append(bytearray(10**7))"
    result = run(code, memory_mb=128, timeout=5.0)
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr


def test_big_file_is_stopped_by_the_file_size_limit():
    code = "with open('big', 'wb') as f:\n    for _ in range(64): f.write(bytes(1 << 20))"
    result = run(code)
    assert not result.ok


def test_fork_bomb_is_contained_and_leaves_no_process():
    code = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    result = run(textwrap.dedent(code), timeout=2.0)
    assert not result.ok
    assert leftover_sandbox_processes() == []


def test_background_process_dies_when_the_program_exits():
    code = """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("started")
    """
    result = run(textwrap.dedent(code), timeout=5.0)
    assert result.ok and result.stdout == "started\n"
    assert leftover_sandbox_processes() == []


def test_killing_its_parent_does_not_kill_the_caller():
    code = f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as exc:
                print(pid, type(exc).__name__)
        print("still here")
    """
    result = run(textwrap.dedent(code), timeout=5.0)
    # Reaching this line is the point: the test process survived.
    assert result.exit_code is not None
    assert leftover_sandbox_processes() == []


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("SECRET", "hunter2")
    result = run("import os; print(os.environ.get('SECRET')); print(sorted(os.environ))")
    assert result.ok
    assert "hunter2" not in result.stdout
    assert result.stdout.startswith("None\n")


def test_writing_outside_the_work_dir_fails_when_fs_is_isolated(tmp_path):
    target = tmp_path / "escaped.txt"
    code = f"open({str(target)!r}, 'w').write('escaped')"
    result = run(code)
    if result.fs_isolated:
        assert not result.ok
        assert not target.exists()
    else:
        # Documented: without a mount namespace only file permissions protect
        # the filesystem; a program running as another uid cannot write here.
        assert target.exists() != result.uid_isolated


def test_network_connection_fails_when_net_is_isolated():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code = f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                print("connected")
            except OSError as exc:
                print("blocked", type(exc).__name__)
        """
        result = run(textwrap.dedent(code), timeout=5.0)
    assert result.ok, result.stderr
    if result.network_isolated:
        assert result.stdout.startswith("blocked")
    else:
        # Documented: without a network namespace the program can connect.
        assert result.stdout == "connected\n"
