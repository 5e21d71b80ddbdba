"""The device a stage computes on, and what it can do (peak FLOP/s, for model-FLOPs utilisation)."""

from __future__ import annotations

import torch

from nextscale.config import ConfigError

# dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' datasheets
PEAK_FLOPS_16BIT = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
                    "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "4090": 165e12, "V100": 125e12}


def pick_device(device: str | torch.device = "auto", *, key: str = "device",
                cluster_gpus: float | None = None) -> torch.device:
    """The device of a stage's ``device`` setting (``config.Device``, the same values in every stage config):
    ``auto`` = cuda when there is a GPU, else cpu; ``cpu``; ``cuda``, an error naming ``key`` when there is none.

    ``cluster_gpus``: for a Ray job's actors or workers, the GPUs of its cluster; None = the GPUs this process sees.
    """
    device = str(device)
    if cluster_gpus is None:
        gpus, where, fix = torch.cuda.is_available(), "no CUDA device is visible here", f"{key}=cpu"
    else:
        gpus, where, fix = cluster_gpus > 0, "the Ray cluster has no GPUs", "run on a cluster with GPUs"
    if device == "auto":
        return torch.device("cuda" if gpus else "cpu")
    if device.startswith("cuda") and not gpus:
        raise ConfigError(f"{key}={device} but {where}; set {key}=auto or {fix}")
    return torch.device(device)


def peak_flops(device: torch.device, precision: str = "bf16") -> float:
    """Peak FLOP/s of one device at ``precision``, or 0 where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_16BIT.items():
        if key in name:
            return flops if precision in ("bf16", "fp16") else flops / 2  # fp32 matmuls run as TF32
    return 0.0
