"""pipeline/hardware.py: one row per device kind, read by the trainer's MFU, the estimate and the report card."""

from __future__ import annotations

import pytest

from pipeline import hardware

# Names as torch.cuda.get_device_name() and `nvidia-smi -L` print them.
GPU_NAMES = {
    "NVIDIA H100 80GB HBM3": "h100",
    "GPU 0: NVIDIA L4 (UUID: GPU-a1004b2c-a100-4090-b200-123456789abc)": "l4",
    "NVIDIA H100 PCIe": "h100_pcie",
    "NVIDIA H100 NVL": "h100_nvl",
    "NVIDIA H800": "h100",
    "NVIDIA H200": "h200",
    "NVIDIA GH200 480GB": "gh200",
    "NVIDIA B200": "b200",
    "NVIDIA A100-SXM4-80GB": "a100",
    "NVIDIA A100-PCIE-40GB": "a100",
    "NVIDIA A800-SXM4-80GB": "a800",
    "AMD Instinct MI300X": "mi300x",
    "NVIDIA L40S": "l40s",
    "NVIDIA L4": "l4",
    "NVIDIA A10G": "a10g",
    "NVIDIA A10": "a10",
    "NVIDIA RTX 6000 Ada Generation": "rtx6000ada",
    "NVIDIA RTX A6000": "a6000",
    "NVIDIA GeForce RTX 5090": "rtx5090",
    "NVIDIA GeForce RTX 4090": "rtx4090",
    "NVIDIA GeForce RTX 3090": "rtx3090",
}


@pytest.mark.parametrize("name, key", GPU_NAMES.items())
def test_gpu_names_find_their_row(name, key):
    assert hardware.hardware_for_gpu_name(name) == key
    assert hardware.hardware_for_gpu_name(name.lower()) == key  # case does not matter


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA GeForce GTX 1080", "Tesla T4", "cpu", "mps", ""])
def test_unknown_names_find_no_row(name):
    # L40 is neither the L4 nor the L40S: unknown is better than another card's peak.
    assert hardware.device_for_name(name) is None


def test_every_row_is_complete_and_found_by_its_own_label():
    assert len({d.key for d in hardware.DEVICES}) == len(hardware.DEVICES)
    for d in hardware.DEVICES:
        assert d.label and d.short and d.peak_flops > 0 and 0 < d.mfu < 1 and d.usd_per_hour >= 0, d.key
        assert d.memory_gb is None or d.memory_gb > 0
        if d.key != "cpu":
            assert d.match and hardware.hardware_for_gpu_name(d.label) == d.key, d.key
    assert hardware.HARDWARE["cpu"].match == () and hardware.HARDWARE["cpu"].memory_gb is None


def test_every_device_the_old_tables_knew_keeps_its_numbers():
    # gpt.common.PEAK_FLOPS, pipeline.estimate.HARDWARE and pipeline.report.GPU_HOUR_PRICES, before they became this table.
    peaks = {"NVIDIA H100 NVL": 835e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
             "NVIDIA GH200": 989e12, "NVIDIA B200": 2.25e15, "NVIDIA A100": 312e12, "NVIDIA A800": 312e12,
             "NVIDIA H800": 989e12, "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "NVIDIA A10G": 125e12,
             "NVIDIA RTX A6000": 155e12, "NVIDIA RTX 6000 Ada": 365e12, "RTX 5090": 209.5e12, "RTX 4090": 165.2e12,
             "RTX 3090": 71e12, "AMD MI300X": 1.3074e15}
    for name, peak in peaks.items():
        assert hardware.device_for_name(name).peak_flops == peak, name
    prices = {"H200": 3.50, "H100": 3.00, "A100": 1.80, "L40S": 1.00, "A10": 0.75, "A800": 1.50}  # A800: one price now
    for name, price in prices.items():
        assert hardware.device_for_name(f"NVIDIA {name}").usd_per_hour == price, name
    assert hardware.HARDWARE["cpu"].peak_flops == 370e9  # measured, BENCHMARKS.md


def test_the_trainer_the_estimate_and_the_report_read_this_table(monkeypatch):
    from gpt import common
    from pipeline import estimate

    monkeypatch.delenv(hardware.PRICE_ENV, raising=False)
    assert estimate.HARDWARE is hardware.HARDWARE
    assert hardware.hardware_choices() == [(d.key, d.label) for d in hardware.DEVICES]
    assert hardware.hardware_choices()[0] == ("cpu", "CPU (this machine)")  # the new-run page's first option
    for d in hardware.DEVICES[1:]:
        assert common.peak_flops(d.label) == d.peak_flops
        assert hardware.gpu_hour_price(d.label) == d.usd_per_hour
    assert common.peak_flops("cpu") is None  # no MFU on CPU
    assert hardware.gpu_hour_price("Some Future GPU") == hardware.DEFAULT_GPU_HOUR_PRICE
    monkeypatch.setenv(hardware.PRICE_ENV, "1.25")
    assert hardware.gpu_hour_price("NVIDIA H100") == 1.25
    monkeypatch.setenv(hardware.PRICE_ENV, "one dollar")  # a typo does not stop the report
    assert hardware.gpu_hour_price("NVIDIA H100") == 3.00


def test_default_hardware_reads_nvidia_smi(monkeypatch):
    import subprocess

    class Done:
        stdout = "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-b200-1234)\nGPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-5678)\n"

    hardware.default_hardware.cache_clear()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    try:
        assert hardware.default_hardware() == "a100"
    finally:
        hardware.default_hardware.cache_clear()

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    try:
        assert hardware.default_hardware() == "cpu"
    finally:
        hardware.default_hardware.cache_clear()


@pytest.mark.parametrize("override", [None, "9.25"])
def test_the_estimate_and_the_report_card_price_a_gpu_hour_the_same(monkeypatch, override):
    """One run is priced once: the price setting reaches the estimate as it reaches the report card."""
    from pipeline import config, estimate

    if override is None:
        monkeypatch.delenv(hardware.PRICE_ENV, raising=False)
    else:
        monkeypatch.setenv(hardware.PRICE_ENV, override)
    est = estimate.estimate(config.resolve("speedrun"), "a800")
    assert est["usd_per_device_hour"] == hardware.gpu_hour_price("NVIDIA A800-SXM4-80GB")
    assert est["usd_per_device_hour"] == (1.50 if override is None else 9.25)
    assert estimate.estimate(config.resolve("tiny"), "cpu")["usd_per_device_hour"] == 0.0  # a GPU price, not a CPU's
