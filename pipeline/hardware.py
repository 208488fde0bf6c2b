"""The one table of hardware: what the project assumes about each kind of device.

    from pipeline import hardware
    h100 = hardware.HARDWARE["h100"]
    h100.peak_flops, h100.mfu, h100.memory_gb, h100.usd_per_hour
    hardware.device_for_name("NVIDIA H100 80GB HBM3")     # the h100 row (None for an unknown GPU)
    hardware.gpu_hour_price("NVIDIA A100-SXM4-80GB")      # 1.80, or $NANOSTUDIO_GPU_HOUR_PRICE

Read by the trainer's MFU (gpt.common.peak_flops), the pre-launch estimate (pipeline/estimate.py,
whose hardware select box lists every row, in table order) and the report card's cost
(pipeline/report.py). Torch-free, like the rest of `pipeline/`.

The columns:
- peak_flops: vendor datasheet dense bf16 FLOP/s per device (no sparsity), except the CPU's, which
  is the measured bf16 2048^3 GEMM peak of this project's 2-core machines (bench/train.py,
  BENCHMARKS.md: 370 GFLOP/s).
- mfu: assumed model-FLOPs utilisation of pretraining.
  - H100: the reference (nanochat) reported 47-51% on 8xH100 for its d32/d34 runs; 45% leaves room
    for our trainer, not measured on GPU yet. H200 and GH200: the same compute with more memory
    bandwidth, a little higher.
  - A100/A800: a community 8xA100 d20 run of the reference printed 20.8% MFU against the H100 peak,
    i.e. ~66% of the A100's 312e12 (6.6 h of pretraining); a reported 8xA800 reproduction (~7 h)
    agrees. We assume 60%.
  - CPU: bench/train.py measured 39.8% on the tiny preset (BENCHMARKS.md); 35% is the prudent round-down.
  - The others: no reference run; 40% (30% for the MI300X, whose kernels are less tuned) assumes
    less tuned kernels or less memory bandwidth than an H100's.
- memory_gb: per device, decimal GB; None = this machine's RAM.
- usd_per_hour: rough on-demand price per device-hour in 2025 (the reference's "$100 run" assumes
  $3/GPU-hour for an H100); change them for your provider, or set NANOSTUDIO_GPU_HOUR_PRICE for
  the report card.
- match: model names as `nvidia-smi -L` and torch print them. A name matches as a whole model
  name: not followed by a letter or digit and not preceded by a digit, case-insensitively (so A10
  is neither A100 nor A10G, and L4 is not L40S). When several rows match, the longest name wins
  (H100 NVL over H100, GH200 over H200).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    key: str  # the estimate's --hardware value (and the new-run page's ?hardware=)
    label: str  # the select box's text
    short: str  # "the 80 GB of one H100"
    match: tuple[str, ...]
    peak_flops: float
    mfu: float
    memory_gb: float | None
    usd_per_hour: float


DEVICES: tuple[Device, ...] = (
    Device("cpu", "CPU (this machine)", "CPU", (), 370e9, 0.35, None, 0.0),
    # The H800 is an H100 with slower NVLink: same peak, priced and timed as one.
    Device("h100", "NVIDIA H100 SXM 80 GB", "H100", ("H100", "H800"), 989e12, 0.45, 80, 3.00),
    Device("h100_pcie", "NVIDIA H100 PCIe 80 GB", "H100 PCIe", ("H100 PCIe",), 756e12, 0.40, 80, 2.50),
    Device("h100_nvl", "NVIDIA H100 NVL 94 GB", "H100 NVL", ("H100 NVL",), 835e12, 0.40, 94, 2.80),
    Device("h200", "NVIDIA H200 141 GB", "H200", ("H200",), 989e12, 0.47, 141, 3.50),
    Device("gh200", "NVIDIA GH200 96 GB", "GH200", ("GH200",), 989e12, 0.47, 96, 3.00),
    Device("b200", "NVIDIA B200 180 GB", "B200", ("B200",), 2.25e15, 0.40, 180, 6.00),
    Device("a100", "NVIDIA A100 80 GB", "A100", ("A100",), 312e12, 0.60, 80, 1.80),
    # A800 (the A100 sold in China, slower NVLink): $1.50, the estimate's figure; the report card
    # used to say $1.60. Rental offers for it sit a little below the A100's.
    Device("a800", "NVIDIA A800 80 GB", "A800", ("A800",), 312e12, 0.60, 80, 1.50),
    Device("mi300x", "AMD MI300X 192 GB", "MI300X", ("MI300X",), 1.3074e15, 0.30, 192, 2.50),
    Device("l40s", "NVIDIA L40S 48 GB", "L40S", ("L40S",), 362e12, 0.40, 48, 1.00),
    Device("l4", "NVIDIA L4 24 GB", "L4", ("L4",), 121e12, 0.40, 24, 0.70),
    Device("a10g", "NVIDIA A10G 24 GB", "A10G", ("A10G",), 125e12, 0.40, 24, 0.75),
    Device("a10", "NVIDIA A10 24 GB", "A10", ("A10",), 125e12, 0.40, 24, 0.75),
    Device("rtx6000ada", "NVIDIA RTX 6000 Ada 48 GB", "RTX 6000 Ada", ("RTX 6000 Ada",), 365e12, 0.40, 48, 0.80),
    Device("a6000", "NVIDIA RTX A6000 48 GB", "RTX A6000", ("A6000",), 155e12, 0.40, 48, 0.50),
    Device("rtx5090", "NVIDIA RTX 5090 32 GB", "RTX 5090", ("5090",), 209.5e12, 0.40, 32, 0.70),
    Device("rtx4090", "NVIDIA RTX 4090 24 GB", "RTX 4090", ("4090",), 165.2e12, 0.40, 24, 0.40),
    Device("rtx3090", "NVIDIA RTX 3090 24 GB", "RTX 3090", ("3090",), 71e12, 0.40, 24, 0.25),
)
HARDWARE: dict[str, Device] = {d.key: d for d in DEVICES}

# The report card's price of a GPU no row knows, and the variable that overrides every GPU's price there.
DEFAULT_GPU_HOUR_PRICE = 2.50
PRICE_ENV = "NANOSTUDIO_GPU_HOUR_PRICE"

# (pattern, row), longest name first: the most specific name wins.
_PATTERNS = [(re.compile(rf"(?<![0-9]){re.escape(name.upper())}(?![A-Z0-9])"), d)
             for name, d in sorted(((m, d) for d in DEVICES for m in d.match), key=lambda pair: -len(pair[0]))]


def device_for_name(name: str) -> Device | None:
    """The row of a GPU name as nvidia-smi or torch print it, or None if unknown."""
    upper = name.upper().split("(UUID")[0]  # "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)": hex could read as a model
    for pattern, device in _PATTERNS:
        if pattern.search(upper):
            return device
    return None


def hardware_for_gpu_name(name: str) -> str | None:
    """The HARDWARE key of a GPU name as nvidia-smi or torch print it, or None if unknown."""
    device = device_for_name(name)
    return device.key if device else None


def hardware_choices() -> list[tuple[str, str]]:
    """(key, label) pairs for a select box, in table order."""
    return [(d.key, d.label) for d in DEVICES]


@functools.lru_cache(maxsize=1)
def default_hardware() -> str:
    """The kind of GPU `nvidia-smi -L` lists on this machine, else "cpu". Cached: the GPUs do not change."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    for line in out.splitlines():
        key = hardware_for_gpu_name(line)
        if key:
            return key
    return "cpu"


def _price_override() -> float | None:
    """$NANOSTUDIO_GPU_HOUR_PRICE as a number, or None when unset (or mistyped: the table applies then)."""
    override = os.environ.get(PRICE_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            pass  # a typo in the variable should not stop a report or an estimate
    return None


def hourly_price(device: Device) -> float:
    """$ per hour of one `device`: $NANOSTUDIO_GPU_HOUR_PRICE for a GPU if set, else its row's.

    The estimate and the report card both price through here, so one run is priced once.
    """
    override = _price_override()
    return override if override is not None and device.key != "cpu" else device.usd_per_hour


def gpu_hour_price(name: str) -> float:
    """$ per hour of one GPU called `name` (as torch or nvidia-smi print it); the default for an unknown one."""
    device = device_for_name(name)
    if device is None:
        override = _price_override()
        return DEFAULT_GPU_HOUR_PRICE if override is None else override
    return hourly_price(device)
