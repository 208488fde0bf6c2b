"""The stage harness: events, exit codes, signal policies, handler restore and teardown on every path."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipeline.events import EventWriter, read_events
from pipeline.harness import (CANCEL, END_STATUS_CODES, EXIT_CANCELLED, EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, STOP,
                              Stage, teardown_distributed)
from tests.helpers import REPO


def events_of(run):
    return read_events(run)[0]


def kinds(run):
    return [e["kind"] for e in events_of(run)]


def signal_self(sig, until=lambda: False):
    """Send `sig` to this process and give Python the moment it needs to run the handler.

    A handler that raises ends the wait at once; one that sets a flag ends it through `until`.
    """
    os.kill(os.getpid(), sig)
    deadline = time.time() + 5
    while time.time() < deadline and not until():
        time.sleep(0.01)


class Recorder:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


@pytest.fixture
def caller_handlers():
    """Install handlers of 'the caller' (a test, a notebook) and put the originals back afterwards."""
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    signal.signal(signal.SIGINT, mine)
    yield mine
    signal.signal(signal.SIGTERM, saved[0])
    signal.signal(signal.SIGINT, saved[1])


def test_status_codes_are_the_documented_exit_codes():
    assert END_STATUS_CODES == {"done": 0, "failed": 1, "interrupted": 75, "cancelled": 130}
    assert (EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_CANCELLED) == (0, 1, 75, 130)


def test_a_stage_that_finishes_writes_start_and_end_done(tmp_path):
    with Stage("demo", teardown=None) as stage:
        stage.start(EventWriter(tmp_path, "demo"), args={"x": 1}, world_size=2)
        stage.events.emit("result", value=3)
    assert stage.exit_code == 0 and stage.status == "done"
    start, result, end = events_of(tmp_path)
    assert start["kind"] == "stage_start" and start["args"] == {"x": 1} and start["world_size"] == 2
    assert start["pid"] == os.getpid() and "host" in start and start["stage"] == "demo"
    assert result["kind"] == "result" and result["value"] == 3
    assert end["kind"] == "stage_end" and end["status"] == "done" and end["seconds"] >= 0
    assert set(end) == {"time", "stage", "kind", "status", "seconds", "seq"}


def test_an_exception_fails_the_stage_with_an_error_event_and_a_line_on_stderr(tmp_path, capsys):
    def work():
        raise ValueError("bad input")

    with Stage("demo", teardown=None) as stage:
        stage.start(EventWriter(tmp_path, "demo"), args={})
        work()
    assert stage.exit_code == 1 and stage.status == "failed"
    assert kinds(tmp_path) == ["stage_start", "error", "stage_end"]
    _, error, end = events_of(tmp_path)
    assert error["message"] == "ValueError: bad input"
    assert "in work" in error["traceback"] and "ValueError: bad input" in error["traceback"]
    assert end["status"] == "failed" and end["seconds"] >= 0
    assert "demo failed: bad input" in capsys.readouterr().err


def test_a_failure_before_start_has_no_events_but_a_traceback_on_stderr(tmp_path, capsys):
    with Stage("demo", teardown=None) as stage:
        raise RuntimeError("no such device")
    assert stage.exit_code == 1
    assert events_of(tmp_path) == []
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: no such device" in err and "demo failed: no such device" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_cancels_a_cancel_stage_with_exit_130(tmp_path, sig):
    reached = []
    with Stage("demo", signals=CANCEL, teardown=None) as stage:
        stage.start(EventWriter(tmp_path, "demo"), args={})
        signal_self(sig)
        reached.append(True)  # never: the signal raised KeyboardInterrupt
    assert not reached
    assert stage.exit_code == 130 and stage.status == "cancelled"
    assert kinds(tmp_path) == ["stage_start", "error", "stage_end"]
    _, error, end = events_of(tmp_path)
    assert error["message"] == "interrupted" and error["seconds"] >= 0
    assert end["status"] == "cancelled"


def test_the_first_signal_asks_a_stop_stage_to_stop_and_it_ends_interrupted(tmp_path):
    with Stage("demo", signals=STOP, teardown=None) as stage:
        stage.start(EventWriter(tmp_path, "demo"), args={})
        assert not stage.stop_requested
        signal_self(signal.SIGTERM, until=lambda: stage.stop_requested)
        assert stage.stop_requested  # the work goes on: it saves, then says how it ended
        stage.events.emit("checkpoint", step=3)
        stage.status = "interrupted"
    assert stage.exit_code == 75
    assert kinds(tmp_path) == ["stage_start", "checkpoint", "stage_end"]
    assert events_of(tmp_path)[-1]["status"] == "interrupted"


def test_a_second_signal_cancels_a_stop_stage(tmp_path):
    saved = []
    with Stage("demo", signals=STOP, teardown=None) as stage:
        stage.start(EventWriter(tmp_path, "demo"), args={})
        signal_self(signal.SIGINT, until=lambda: stage.stop_requested)
        assert stage.stop_requested
        signal_self(signal.SIGTERM)
        saved.append(True)  # never: the second signal raised KeyboardInterrupt
    assert not saved and stage.exit_code == 130
    assert events_of(tmp_path)[-1]["status"] == "cancelled"


def test_a_stop_requested_by_the_work_itself_counts_as_the_first_signal(tmp_path):
    with Stage("demo", signals=STOP, teardown=None) as stage:
        stage.stop_requested = True  # e.g. --stop-after-step
        signal_self(signal.SIGTERM)
    assert stage.exit_code == 130


@pytest.mark.parametrize("outcome", ["done", "failed", "cancelled", "interrupted"])
@pytest.mark.parametrize("policy", [CANCEL, STOP])
def test_the_callers_signal_handlers_come_back_and_teardown_runs_on_every_path(tmp_path, caller_handlers, outcome, policy):
    teardown = Recorder()
    with Stage("demo", signals=policy, teardown=teardown) as stage:
        assert signal.getsignal(signal.SIGTERM) is not caller_handlers
        stage.start(EventWriter(tmp_path, "demo"), args={})
        if outcome == "failed":
            raise OSError("disk full")
        if outcome == "cancelled":
            raise KeyboardInterrupt
        if outcome == "interrupted":
            stage.status = "interrupted"
    assert stage.status == outcome and stage.exit_code == END_STATUS_CODES[outcome]
    assert events_of(tmp_path)[-1]["status"] == outcome
    assert signal.getsignal(signal.SIGTERM) is caller_handlers and signal.getsignal(signal.SIGINT) is caller_handlers
    assert teardown.calls == 1


def test_system_exit_passes_through_after_restore_and_teardown(caller_handlers):
    teardown = Recorder()
    with pytest.raises(SystemExit):
        with Stage("demo", teardown=teardown):
            sys.exit(3)
    assert teardown.calls == 1 and signal.getsignal(signal.SIGTERM) is caller_handlers


def test_teardown_runs_even_when_writing_the_end_event_fails(tmp_path, caller_handlers):
    teardown = Recorder()
    events = EventWriter(tmp_path, "demo")
    with pytest.raises(OSError):
        with Stage("demo", teardown=teardown) as stage:
            stage.start(events, args={})
            events.path = tmp_path / "missing-dir" / "events.jsonl"  # the next write fails
    assert teardown.calls == 1 and signal.getsignal(signal.SIGINT) is caller_handlers


def test_only_rank_zero_writes_events(tmp_path):
    with Stage("demo", teardown=None) as stage:
        stage.start(EventWriter(tmp_path, "demo", enabled=False), args={})
        raise ValueError("on rank 1")
    assert stage.exit_code == 1 and events_of(tmp_path) == []


def test_an_unknown_status_is_refused():
    stage = Stage("demo", teardown=None)
    with pytest.raises(ValueError, match="unknown stage status"):
        stage.status = "paused"
    with pytest.raises(ValueError, match="CANCEL or STOP"):
        Stage("demo", signals="ignore")


def test_a_stage_in_another_thread_runs_without_touching_signals(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def run():
        with Stage("demo", teardown=None) as stage:
            stage.start(EventWriter(tmp_path, "demo"), args={})
            seen["handler"] = signal.getsignal(signal.SIGTERM)
        seen["code"] = stage.exit_code

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == {"handler": before, "code": 0}


def test_teardown_destroys_a_process_group_this_process_set_up(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with Stage("demo"):  # the default teardown
            assert dist.is_initialized()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    teardown_distributed()  # nothing left to destroy: a no-op


def test_importing_the_harness_does_not_import_torch():
    code = "import sys, pipeline.harness; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


STAGE_SCRIPT = textwrap.dedent("""
    import sys, time
    from pipeline.events import EventWriter
    from pipeline.harness import Stage

    def main():
        with Stage("demo", signals=sys.argv[2]) as stage:
            stage.start(EventWriter(sys.argv[1], "demo"), args={})
            print("working", flush=True)
            while not stage.stop_requested:
                time.sleep(0.01)
            stage.status = "interrupted"
        return stage.exit_code

    sys.exit(main())
""")


@pytest.mark.parametrize("policy, signals, code, status", [
    (CANCEL, [signal.SIGTERM], 130, "cancelled"),
    (STOP, [signal.SIGTERM], 75, "interrupted"),
    (STOP, [signal.SIGINT], 75, "interrupted"),
])
def test_a_stage_process_exits_with_the_code_of_its_stage_end(tmp_path, policy, signals, code, status):
    proc = subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(tmp_path), policy], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "working"
        for sig in signals:
            proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, proc.stderr.read()
    end = events_of(tmp_path)[-1]
    assert end["kind"] == "stage_end" and end["status"] == status and END_STATUS_CODES[status] == proc.returncode
