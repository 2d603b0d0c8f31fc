"""Device, number format and memory layout: where and how fast the U-Net computes.

No lesson teaches this module (notebook 03's appendix shows its effect); its names are also
su.<name>: pick_device, cpu_supports_bf16, pick_precision, autocast, to_layout.
"""

from __future__ import annotations

from pathlib import Path

import torch


def pick_device() -> torch.device:
    """CUDA if present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    """True if the CPU has native bf16 instructions (AVX512-BF16 or AMX); else bf16 is slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(device: torch.device, requested: str = "auto") -> str:
    """ "bf16" where the hardware runs it natively (several times faster than fp32 there), else "fp32"."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', not {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for the chosen precision (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_layout(x, precision: str):
    """bf16 runs in channels_last (NHWC), the fast bf16 path of oneDNN and cuDNN; fp32 stays NCHW.
    A model is converted in place, a batch (B, 3, H, W) as a copy; both are returned."""
    return x.to(memory_format=torch.channels_last) if precision == "bf16" else x
