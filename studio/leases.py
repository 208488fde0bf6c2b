"""GPU leases: which running stage holds which GPU of this host, so two runs never share one.

    gpus = lease_gpus(run, stage, 4, stop_check)   # [0, 1, 2, 3], waiting while others hold them
    release_gpus(run, stage)                       # when the stage has ended

A lease is a GpuLease row, unique per (host, index): taking one is an INSERT
that only one supervisor can win. It names its holder by process token
(studio/processes.py), so the lease of a supervisor that is gone can be told
apart and taken over, unless its stage still runs (a killed supervisor
leaves its stage training until a new one adopts it).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from functools import lru_cache
from typing import Callable

from django.db import IntegrityError, transaction

from studio.ingest import notify
from studio.models import GpuLease, Run, StageRun
from studio.processes import process_running, process_token, token_alive

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a stage waiting for GPUs looks again


@lru_cache(maxsize=1)
def host_gpu_count() -> int:
    """GPUs on this node: NANOSTUDIO_GPUS if set, else what `nvidia-smi -L` lists (0 without)."""
    if os.environ.get("NANOSTUDIO_GPUS", "").strip():
        return int(os.environ["NANOSTUDIO_GPUS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def lease_gpus(run: Run, stage: StageRun, n: int, stop_check: Callable[[], bool] | None = None) -> list[int] | None:
    """Take `n` free GPUs of this host for the stage, waiting while others hold them.

    Returns the GPU indices, or None once stop_check() says to stop waiting
    (the supervisor passes one that reads the run's stop requests).
    Leases of supervisors that are gone (killed, rebooted) are taken over.
    """
    host, token, total = socket.gethostname(), process_token(), host_gpu_count()
    if n > total:
        raise RuntimeError(f"stage {stage.name} needs {n} GPUs but this node has {total}")
    waiting = False
    while True:
        for lease in GpuLease.objects.filter(host=host).exclude(holder_token=token):
            if not token_alive(lease.holder_token) and not _stage_still_running(lease):
                log.warning("taking over GPU %s from %s (its supervisor is gone)", lease.index, lease.run_id)
                lease.delete()
        held = dict(GpuLease.objects.filter(host=host).values_list("index", "run_id"))
        free = [i for i in range(total) if i not in held]
        if len(free) >= n:
            try:
                with transaction.atomic():
                    GpuLease.objects.bulk_create(
                        GpuLease(host=host, index=i, run=run, stage=stage.name, holder_token=token) for i in free[:n]
                    )
            except IntegrityError:
                continue  # another supervisor took one of them first: look again
            if stage.note:
                stage.note = ""
                stage.save(update_fields=["note"])
            return free[:n]
        if not waiting:
            waiting = True
            busy = ", ".join(sorted(set(held.values())))
            stage.note = f"waiting for {n} GPU(s): {len(held)} of {total} in use by {busy}"
            stage.save(update_fields=["note"])
            stage.append_log(stage.note)
            notify(run)
        if stop_check is not None and stop_check():
            return None
        time.sleep(POLL_SECONDS)


def release_gpus(run: Run, stage: StageRun) -> None:
    """Give back the stage's GPUs that this process holds."""
    GpuLease.objects.filter(run=run, stage=stage.name, holder_token=process_token()).delete()


def _stage_still_running(lease: GpuLease) -> bool:
    # A supervisor killed with SIGKILL leaves its stage training on the GPUs
    # until a new supervisor adopts it (or it ends): they are not free yet.
    tokens = StageRun.objects.filter(run_id=lease.run_id, name=lease.stage, status=StageRun.Status.RUNNING).exclude(
        token="").values_list("token", flat=True)
    return any(process_running(t) for t in tokens)
