"""The frame every stage runs in: events, signals, exit codes, distributed teardown.

A stage's main() is its arguments plus its work; this module holds the rest once:

    from pipeline.events import EventWriter
    from pipeline.harness import STOP, Stage

    def main(argv=None):
        args = parse_args(argv)
        with Stage("base_train", signals=STOP) as stage:   # CANCEL (the default) for short stages
            ctx = common.setup(args.device, args.dtype, args.seed)   # rank known only now
            stage.start(EventWriter(args.run_dir, "base_train", enabled=ctx.master),
                        args=vars(args), world_size=ctx.world_size)     # -> stage_start
            ...                              # the work; STOP stages poll stage.stop_requested
            stage.status = "interrupted"     # only if it stopped early with its state saved
        return stage.exit_code               # 0 done, 1 failed, 75 interrupted, 130 cancelled

    if __name__ == "__main__":
        sys.exit(main())

On leaving the block the stage writes stage_end {status, seconds}. An exception
becomes an error event {message, traceback} and status "failed" (with
"<stage> failed: ..." on stderr); KeyboardInterrupt, which a signal becomes,
an error {message: "interrupted", seconds} and status "cancelled". Then the
caller's SIGTERM/SIGINT handlers come back (main() called as a function must
not leave its handlers in a test or notebook) and torch.distributed, if a
process group is up, is destroyed. Set stage.status inside the block, never
`return` from it: the exit code is read after the block has ended.

Signal policies (SIGTERM, which the studio sends to cancel, and SIGINT mean the same):
    CANCEL  raise KeyboardInterrupt at once: the stage has nothing worth saving.
    STOP    the first signal sets stage.stop_requested, so a training loop can finish
            its step, save a checkpoint and end "interrupted" (exit 75, resumable);
            a second signal raises KeyboardInterrupt (someone really wants it gone).

Torch-free at import: the studio is to import END_STATUS_CODES, and the tokenizer
stages must not pay for torch.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback

# Exit codes of a stage process. 75 is EX_TEMPFAIL (sysexits.h): stopped on
# request with a checkpoint saved, try again with --resume. 130 is what a shell
# reports for a process ended by SIGINT (128 + 2).
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75
EXIT_CANCELLED = 130

# stage_end's status <-> the process's exit code. The studio derives a stage's
# exit code from its stage_end event when it cannot wait for the process (a
# stage adopted after a supervisor restart), so this is the one place that fact lives.
END_STATUS_CODES = {"done": EXIT_DONE, "failed": EXIT_FAILED, "interrupted": EXIT_INTERRUPTED, "cancelled": EXIT_CANCELLED}

CANCEL = "cancel"
STOP = "stop"

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TRACEBACK_FRAMES = 10  # from the stage's main() down: enough to see where, small enough for an event


def teardown_distributed() -> None:
    """Destroy torch.distributed's process group if this process set one up.

    Never imports torch: a stage that did not import torch.distributed has no
    group to destroy. No barrier first (unlike gpt.common.teardown): after a
    failure on one rank the others may never reach it, and this must not hang.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _can_handle_signals() -> bool:
    # signal.signal() works only in the main thread; a stage run in another
    # thread (never a process) cannot receive signals, so there is nothing to install.
    return threading.current_thread() is threading.main_thread()


def _save_handlers() -> dict:
    return {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS} if _can_handle_signals() else {}


def _restore_handlers(saved: dict) -> None:
    for sig, handler in saved.items():
        # getsignal() gives None for a handler installed outside Python, which cannot be
        # put back; the default beats leaving the stage's handler (or SIG_IGN) behind.
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


class Stage:
    """One run of one stage: a context manager around its work (see the module docstring)."""

    def __init__(self, name: str, signals: str = CANCEL, teardown=teardown_distributed):
        if signals not in (CANCEL, STOP):
            raise ValueError(f"signals must be CANCEL or STOP, not {signals!r}")
        self.name = name
        self.signals = signals
        self.teardown = teardown
        self.events = None  # the EventWriter, from start(); None until then
        self.stop_requested = False  # STOP policy: set by the first signal; the work may set it too
        self._status = "done"
        self._t0 = None
        self._saved = {}

    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        if value not in END_STATUS_CODES:
            raise ValueError(f"unknown stage status {value!r}; one of {sorted(END_STATUS_CODES)}")
        self._status = value

    @property
    def exit_code(self) -> int:
        return END_STATUS_CODES[self._status]

    def seconds(self) -> float:
        return round(time.monotonic() - self._t0, 3) if self._t0 is not None else 0.0

    def start(self, events, **fields) -> None:
        """Write stage_start with `fields`; `events` then records the stage's end.

        A separate step because a distributed stage knows whether it is rank 0
        (the only writer) only after its device setup, which may itself fail.
        """
        self.events = events
        events.start(**fields)
        self._t0 = time.monotonic()  # like before: stage_end's seconds count from stage_start

    def _request_stop(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True

    def __enter__(self) -> Stage:
        self._saved = _save_handlers()
        if self._saved:
            handler = signal.default_int_handler if self.signals == CANCEL else self._request_stop
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self._saved:
                # The stage is ending: a signal now would only tear its end events.
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_IGN)
            if exc_type is None:
                pass
            elif issubclass(exc_type, KeyboardInterrupt):
                self._status = "cancelled"
                if self.events is not None:
                    self.events.error("interrupted", seconds=self.seconds())
            elif issubclass(exc_type, Exception):
                self._status = "failed"
                message = f"{exc_type.__name__}: {exc}"
                if self.events is not None:
                    self.events.error(message, traceback="".join(traceback.format_exception(exc_type, exc, tb, limit=TRACEBACK_FRAMES)))
                else:
                    # No event stream yet (it failed in its setup): the log is the only record.
                    traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
                print(f"{self.name} failed: {exc}", file=sys.stderr, flush=True)
            else:
                return False  # SystemExit, GeneratorExit: not a stage outcome, let them through
            if self.events is not None:
                self.events.end(status=self._status, seconds=self.seconds())
            return True
        finally:
            # Handlers first: if the teardown hangs, a signal must act as the caller expects.
            try:
                _restore_handlers(self._saved)
            finally:
                if self.teardown is not None:
                    self.teardown()
