"""Device and dtype decisions, in one place."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # compute dtype for the vision tower, resampler and LM

    def describe(self) -> str:
        return f"{self.device.type} ({str(self.dtype).removeprefix('torch.')})"


def resolve(device: str = "auto") -> Placement:
    """`auto`: CUDA with bf16 when available, else CPU with fp32."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    dev = torch.device(device)
    return Placement(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)


def autocast(placement: Placement):
    """bf16 autocast on CUDA; a no-op context on CPU fp32."""
    return torch.autocast(placement.device.type, dtype=torch.bfloat16, enabled=placement.device.type == "cuda")


def cpu_fast_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16/AMX): bf16 autocast is then about
    twice as fast as fp32 for convolutions and matmuls; elsewhere it is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool(torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
