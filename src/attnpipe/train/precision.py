"""Mixed precision: which float type the forward and backward passes run in.

`amp: auto` picks bf16 only where the GPU computes it natively (compute capability 8.0 or newer:
Ampere, Hopper, Blackwell). torch's `is_bf16_supported()` also says yes on older GPUs (V100, T4)
where bf16 is emulated, several times slower than fp16; those train in fp16 with the gradient
scaler (fp16's narrow range needs loss scaling, bf16's does not). CPUs train in float32.
"""

from __future__ import annotations

import torch

NATIVE_BF16 = (8, 0)  # compute capability from which tensor cores take bf16


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU `device` has bf16 in hardware (by compute capability)."""
    return tuple(torch.cuda.get_device_capability(device)) >= NATIVE_BF16


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """`train.amp` on `device`: auto = bf16 on GPUs with native bf16, fp16 on older GPUs, full
    precision on CPUs; off/bf16/fp16 as asked (the CPU runs bf16 autocast too)."""
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if native_bf16(device) else torch.float16


def describe_amp(setting: str, dtype: torch.dtype | None, device: torch.device) -> str:
    """One line saying what `train.amp` chose, and why when it was `auto`."""
    chosen = {
        None: "off (float32)",
        torch.bfloat16: "bf16",
        torch.float16: "fp16 with gradient scaling",
    }[dtype]
    if setting != "auto":
        return f"mixed precision: {chosen} (train.amp: {setting})"
    if device.type != "cuda":
        return f"mixed precision: {chosen} (train.amp: auto, on CPUs)"
    major, minor = torch.cuda.get_device_capability(device)
    native = "has" if dtype == torch.bfloat16 else "has no"
    return (
        f"mixed precision: {chosen} (train.amp: auto; GPU compute capability {major}.{minor} "
        f"{native} native bf16)"
    )
