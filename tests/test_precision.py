"""`amp: auto` decides by the GPU's compute capability: bf16 only where it is native.

No GPU here: the capability query (`torch.cuda.get_device_capability`) is patched to what a
V100 (7.0), a T4 (7.5), an A100 (8.0) and an H100 (9.0) report. `is_bf16_supported` is patched
to say yes everywhere, as the locked torch does on GPUs that only emulate bf16, to show that it
is not what decides.
"""

from __future__ import annotations

import pytest
import torch

from attnpipe.devices import describe_amp, resolve_amp

GPU = torch.device("cuda", 0)


@pytest.fixture
def capability(monkeypatch):
    """Set the simulated GPU's compute capability."""

    def simulate(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    return simulate


@pytest.mark.parametrize(
    ("major", "minor", "expected"),
    [(7, 0, torch.float16), (7, 5, torch.float16), (8, 0, torch.bfloat16), (9, 0, torch.bfloat16)],
)
def test_auto_is_bf16_only_where_the_gpu_has_it_natively(capability, major, minor, expected):
    capability(major, minor)
    assert resolve_amp("auto", GPU) == expected


def test_the_choice_is_said_with_its_reason(capability):
    capability(7, 0)
    line = describe_amp("auto", resolve_amp("auto", GPU), GPU)
    assert line == (
        "mixed precision: fp16 with gradient scaling (train.amp: auto; GPU compute capability "
        "7.0 has no native bf16)"
    )
    capability(8, 0)
    assert "bf16 (train.amp: auto; GPU compute capability 8.0 has native bf16)" in describe_amp(
        "auto", resolve_amp("auto", GPU), GPU
    )


def test_explicit_settings_and_cpus_do_not_ask_the_gpu(monkeypatch):
    def no_gpu_here(device=None):
        raise AssertionError("the capability must not be queried")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu_here)
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert (
        describe_amp("auto", None, cpu)
        == "mixed precision: off (float32) (train.amp: auto, on CPUs)"
    )
    assert resolve_amp("fp16", GPU) == torch.float16 and resolve_amp("bf16", GPU) == torch.bfloat16
    assert resolve_amp("off", GPU) is None
    assert describe_amp("bf16", torch.bfloat16, GPU) == "mixed precision: bf16 (train.amp: bf16)"
