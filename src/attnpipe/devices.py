"""Whether this machine's NVIDIA driver can run the locked torch's CUDA build, and why not.

A node that was given a GPU must train on it or fail at once with what to do: never a silent
CPU run. The torch wheel in uv.lock carries its own CUDA libraries, so the one thing a GPU node
must provide is a kernel driver new enough for that CUDA version.

    python -m attnpipe.devices check               # exit 0: usable (or no GPU here), 1: not
    python -m attnpipe.devices check --require-gpu  # a GPU node: no usable GPU is an error

The cluster files run the second form on GPU nodes before `ray start`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from attnpipe.errors import AttnpipeError

# The oldest Linux driver of each CUDA toolkit (NVIDIA's CUDA release notes, "CUDA Toolkit and
# Corresponding Driver Versions"). Newer minor versions of a major release also run on the
# major's first driver through minor-version compatibility, but JIT-compiled kernels may not.
MIN_DRIVER = {
    "12.4": "550.54.14",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}
DRIVER_FILE = Path("/proc/driver/nvidia/version")


class DeviceError(AttnpipeError, RuntimeError):
    """A GPU that was asked for cannot be used; the message names driver found and needed."""


@dataclass(frozen=True)
class CudaStatus:
    usable: bool
    devices: int
    driver: str | None  # the kernel driver version, None when no NVIDIA driver is loaded
    cuda: str | None  # the CUDA version torch was built for, None for a CPU-only build
    problem: str = ""  # why not usable, with what to do


def required_driver(cuda: str | None = None) -> str | None:
    """The minimum driver for `cuda` (default: the running torch's build), None if unknown."""
    cuda = cuda if cuda is not None else torch.version.cuda
    if not cuda:
        return None
    major_minor = ".".join(cuda.split(".")[:2])
    if major_minor in MIN_DRIVER:
        return MIN_DRIVER[major_minor]
    older = [v for v in MIN_DRIVER if _version(v) <= _version(major_minor)]
    return MIN_DRIVER[max(older, key=_version)] if older else None


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (from /proc, else nvidia-smi), or None."""
    try:
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", DRIVER_FILE.read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = done.stdout.strip().splitlines()
    return found[0].strip() if done.returncode == 0 and found else None


def cuda_status(driver: str | None = None) -> CudaStatus:
    """Can torch use a GPU here? `driver` overrides the detected driver version (tests)."""
    driver = driver if driver is not None else driver_version()
    cuda = torch.version.cuda
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        return CudaStatus(True, count, driver, cuda)
    return CudaStatus(False, 0, driver, cuda, explain(driver, cuda))


def explain(driver: str | None, cuda: str | None) -> str:
    """One line: why CUDA cannot start with this driver, and what to do."""
    torch_build = f"torch {torch.__version__}"
    if not cuda:
        return (
            f"{torch_build} is a CPU-only build: install the locked environment "
            "(`uv sync --frozen`), whose torch is built for CUDA"
        )
    needed = required_driver(cuda)
    need = f"NVIDIA driver >= {needed}" if needed else "a recent NVIDIA driver"
    fix = (
        f"install {need} on the GPU nodes (cluster/README.md, 'GPU driver'), "
        "or set train.use_gpu: false to train on CPUs"
    )
    if driver is None:
        return (
            f"no NVIDIA driver found ({torch_build} is built for CUDA {cuda}, needs {need}): {fix}"
        )
    if needed and _version(driver) < _version(needed):
        return (
            f"NVIDIA driver {driver} is too old for CUDA {cuda} ({torch_build} needs {need}): {fix}"
        )
    return (
        f"CUDA {cuda} cannot start with NVIDIA driver {driver} although it is new enough: "
        "check `nvidia-smi` (a GPU in a bad state, CUDA_VISIBLE_DEVICES naming no device, a "
        "container without the GPU device files)"
    )


def nvidia_gpus() -> int:
    """GPUs on this machine as Ray counts them (through the NVIDIA driver's management library,
    not CUDA): a GPU whose CUDA cannot start is still counted, so wanting it fails loudly
    instead of training on the CPU."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    return get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()


def wants_gpu(use_gpu: bool | str) -> bool:
    """`train.use_gpu` for work on this machine: auto = whenever it has an NVIDIA GPU."""
    return use_gpu is True or (use_gpu == "auto" and nvidia_gpus() > 0)


def require_cuda(context: str) -> torch.device:
    """The GPU Ray (or torchrun) gave this process, or DeviceError saying why it is unusable."""
    status = cuda_status()
    if not status.usable:
        raise DeviceError(f"{context}: {status.problem}")
    return torch.device("cuda", torch.cuda.current_device())


# Mixed precision, shared by training and evaluation. `amp: auto` picks bf16 only where the GPU
# computes it natively (compute capability 8.0 or newer: Ampere, Hopper, Blackwell). torch's
# `is_bf16_supported()` also says yes on older GPUs (V100, T4) where bf16 is emulated, several
# times slower than fp16; those run fp16 with the gradient scaler. CPUs run float32.
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


def memory_format_for(setting: bool | str, device: torch.device) -> torch.memory_format:
    """`train.channels_last`: auto = NHWC on GPUs (tensor cores want it), NCHW on CPUs."""
    on = device.type == "cuda" if setting == "auto" else bool(setting)
    return torch.channels_last if on else torch.contiguous_format


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attnpipe.devices", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["check"])
    parser.add_argument(
        "--require-gpu", action="store_true", help="fail when this machine has no usable GPU"
    )
    args = parser.parse_args(argv)
    status = cuda_status()
    if status.usable:
        print(
            f"attnpipe: {status.devices} GPU(s) usable: NVIDIA driver {status.driver}, "
            f"torch {torch.__version__} built for CUDA {status.cuda} "
            f"(needs driver >= {required_driver(status.cuda)})"
        )
        return 0
    if status.driver is None and not args.require_gpu:
        print("attnpipe: no NVIDIA driver on this machine: CPU only")
        return 0
    print(f"attnpipe: error: {status.problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
