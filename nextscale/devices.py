"""The device a stage computes on, and what it can do (peak FLOP/s, for model-FLOPs utilisation)."""

from __future__ import annotations

import torch

from nextscale.config import ConfigError

# dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' datasheets
PEAK_FLOPS_16BIT = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
                    "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "4090": 165e12, "V100": 125e12}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` = the GPU when one is visible, else the CPU; ``cuda`` without a visible GPU is an error."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA device is visible here; use device=auto or device=cpu")
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
