"""Reading cluster/: the launcher YAMLs, the KubeRay manifests and the facts they must match.

Shared by the config checks (test_configs.py) and the run of the RayJob's entrypoint
(test_rayjob_run.py).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAYJOBS = ["rayjob.yaml", "rayjob-cassava.yaml"]
KUBERAY_CLUSTERS = ["raycluster.yaml", *RAYJOBS]
GIB = 2**30


@dataclass(frozen=True)
class Machine:
    vcpus: int
    memory_gib: float
    gpus: int
    gpu: str | None  # Ray's accelerator_type for the GPU model


# The providers' published shapes (AWS "Accelerated computing" instance specs, Google Cloud
# "GPU machine types"). GCP gives memory in GB: converted to GiB.
AWS_MACHINES = {
    "m5.2xlarge": Machine(8, 32, 0, None),
    "p4d.24xlarge": Machine(96, 1152, 8, "A100"),
    "p5.48xlarge": Machine(192, 2048, 8, "H100"),
    "g5.48xlarge": Machine(192, 768, 8, "A10G"),
    "g5.xlarge": Machine(4, 16, 1, "A10G"),
}
GCP_MACHINES = {
    "n2-standard-8": Machine(8, 32 * 1e9 / GIB, 0, None),
    "a2-highgpu-8g": Machine(96, 680 * 1e9 / GIB, 8, "A100"),
    "a3-highgpu-8g": Machine(208, 1872 * 1e9 / GIB, 8, "H100"),
    "g2-standard-96": Machine(96, 384 * 1e9 / GIB, 8, "L4"),
    "g2-standard-8": Machine(8, 32 * 1e9 / GIB, 1, "L4"),
}


# The oldest Linux driver of each CUDA toolkit (NVIDIA's CUDA Toolkit release notes, "CUDA
# Toolkit and Corresponding Driver Versions"; CUDA 13.x minor-version compatibility: >= 580).
# Used only until attnpipe.devices (which holds the same table) is on this branch.
def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def locked_cuda() -> str:
    """The CUDA version of the torch build that uv.lock installs (this venv's)."""
    assert torch.version.cuda, "the locked torch is a CUDA build; this venv's is not"
    return torch.version.cuda


def required_driver() -> str:
    """The oldest NVIDIA driver that runs the locked torch's CUDA build."""
    from attnpipe.devices import required_driver as from_devices

    needed = from_devices(locked_cuda())
    assert needed, f"attnpipe.devices knows no driver for CUDA {locked_cuda()}"
    return needed


# --------------------------------------------------------------------------- KubeRay
def cluster_spec(manifest: dict) -> dict:
    """The RayCluster spec of a RayCluster or RayJob manifest."""
    spec = manifest["spec"]
    return spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group) for the head ('head') and every worker group."""
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def gpus(group: dict) -> int:
    limits = ray_container(group).get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def mounts(group: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there, in the Ray container."""
    pod = group["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {
        m["mountPath"]: volumes.get(m["name"], {}) for m in ray_container(group)["volumeMounts"]
    }


def shared_mount(spec: dict) -> tuple[str, str]:
    """(mountPath, claimName) of the PersistentVolumeClaim that the head mounts."""
    head = spec["headGroupSpec"]
    claims = [
        (path, volume["persistentVolumeClaim"]["claimName"])
        for path, volume in mounts(head).items()
        if "persistentVolumeClaim" in volume
    ]
    assert len(claims) == 1, f"the head mounts one shared claim, not {claims}"
    return claims[0]


def entrypoint_argv(job: dict) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "attnpipe", f"the entrypoint runs attnpipe, not {argv[0]!r}"
    return argv[1:]


def head_init_script(spec: dict) -> str:
    """The shell script of the head's init container that puts the project on the volume."""
    inits = spec["headGroupSpec"]["template"]["spec"].get("initContainers", [])
    scripts = [c["args"][0] for c in inits if c.get("command") == ["/bin/bash", "-c"]]
    assert len(scripts) == 1, "the head has one init script (the project on the volume)"
    return scripts[0]


def dockerfile_workdir() -> str:
    text = (CLUSTER / "Dockerfile").read_text()
    return re.findall(r"^WORKDIR\s+(\S+)", text, flags=re.MULTILINE)[-1]


def start_params(group: dict) -> dict[str, Any]:
    return group.get("rayStartParams") or {}
