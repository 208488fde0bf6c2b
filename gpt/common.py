"""Device, precision and distributed setup shared by the training stages.

    ctx = common.setup(device="auto")      # reads torchrun's environment
    with ctx.autocast():
        loss = model(x, y)
    ...

(pipeline/harness.py tears torch.distributed down when the stage ends.)

One process per GPU under torchrun (NCCL on CUDA, gloo on CPU); a plain
`python -m ...` is a world of one. Rank 0 is the only one that writes events,
checkpoint metadata and logs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline import hardware


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU named `device_name` (torch.cuda.get_device_name), for MFU.

    From the one hardware table, pipeline/hardware.py; None when unknown (then MFU is not reported).
    """
    device = hardware.device_for_name(device_name)
    return device.peak_flops if device else None


@dataclass
class Context:
    device: torch.device
    device_type: str  # cuda / mps / cpu
    rank: int
    local_rank: int
    world_size: int
    dtype: torch.dtype  # compute dtype under autocast
    device_name: str

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def synchronize(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def max_memory_mb(self) -> float:
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autodetect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_supports_bf16() -> bool:
    """True when bf16 matmuls run natively (AVX-512 BF16 / AMX); elsewhere bf16 on CPU is slow emulation."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(device_type: str, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[requested]
    if device_type == "cuda":
        major, _ = torch.cuda.get_device_capability()
        return torch.bfloat16 if major >= 8 else torch.float32
    if device_type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def setup(device: str = "auto", dtype: str = "auto", seed: int = 42) -> Context:
    """Initialise torch.distributed from torchrun's environment (if present) and pick device and dtype."""
    device_type = autodetect_device() if device == "auto" else device
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(local_rank)
    else:
        dev = torch.device(device_type)
        name = device_type
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    torch.manual_seed(seed)
    return Context(dev, device_type, rank, local_rank, world_size, choose_dtype(device_type, dtype), name)

