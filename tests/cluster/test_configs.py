"""The cluster configs in cluster/ pass Ray's own validation and a KubeRay structural check.

Real clouds and a real Kubernetes cannot be reached from here: the launcher YAMLs go through
the same `prepare_config` + `validate_config` (ray-schema.json) that `ray up` runs before it
calls the provider, and the KubeRay manifests through the fields the ray.io/v1 CRDs require,
with every pod template deserialized into the `kubernetes` client's models and compared back
(a misspelt or misplaced field is dropped by the models, so the round trip shows it).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises on any schema or consistency error

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu_types = {k: v for k, v in types.items() if v.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for node in gpu_types.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"]
    setup = " && ".join(prepared["setup_commands"])
    assert "uv sync --frozen" in setup and "uv" in setup.split("uv sync")[0]
    assert any("ray start --head" in c for c in prepared["head_start_ray_commands"])
    for excluded in ("data", ".venv", "models/*/checkpoints"):
        assert excluded in prepared["rsync_exclude"]


def test_validation_rejects_a_broken_launcher_config():
    """The check above can fail: a typo and an inconsistent bound are both caught."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = _load("aws.yaml")
    typo["available_node_types"]["gpu_1x"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(typo))
    too_many = _load("aws.yaml")
    too_many["available_node_types"]["gpu_1x"]["min_workers"] = 100
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(too_many))


# --------------------------------------------------------------------------- KubeRay
def _pod_template_problems(template: dict, where: str) -> list[str]:
    """Deserialize into V1PodTemplateSpec (required fields enforced), compare the round trip."""
    from kubernetes.client import ApiClient

    client = ApiClient()
    try:
        model = client.deserialize(json.dumps(template), "V1PodTemplateSpec", "application/json")
    except ValueError as invalid:  # a required field missing, a wrong type
        return [f"{where}: {' '.join(str(invalid).split())}"]
    back = client.sanitize_for_serialization(model)
    problems = []

    def compare(original, kept, path):
        if isinstance(original, dict):
            for key, value in original.items():
                if not isinstance(kept, dict) or key not in kept:
                    problems.append(f"{where}{path}.{key}: not a field of the Kubernetes API")
                else:
                    compare(value, kept[key], f"{path}.{key}")
        elif isinstance(original, list):
            for i, (a, b) in enumerate(zip(original, kept or [], strict=False)):
                compare(a, b, f"{path}[{i}]")

    compare(template, back, "")
    return problems


def _ray_cluster_spec_problems(spec: dict, where: str) -> list[str]:
    problems = []
    head = spec.get("headGroupSpec") or {}
    if "rayStartParams" in head and not isinstance(head["rayStartParams"], dict):
        problems.append(f"{where}.headGroupSpec.rayStartParams must be a mapping")
    containers = (head.get("template") or {}).get("spec", {}).get("containers")
    if not containers:
        problems.append(f"{where}.headGroupSpec.template.spec.containers is required")
    else:
        problems += _pod_template_problems(head["template"], f"{where}.headGroupSpec.template")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}.workerGroupSpecs: at least one worker group")
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names) or not all(names):
        problems.append(f"{where}.workerGroupSpecs: groupName required and unique")
    gpu_groups = 0
    for i, group in enumerate(groups):
        here = f"{where}.workerGroupSpecs[{i}]"
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) for c in counts):
            problems.append(f"{here}: replicas, minReplicas and maxReplicas must be integers")
        elif not counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{here}: needs minReplicas <= replicas <= maxReplicas")
        if not isinstance(group.get("rayStartParams", {}), dict):
            problems.append(f"{here}.rayStartParams must be a mapping")
        template = group.get("template") or {}
        pods = template.get("spec", {}).get("containers") or []
        if not pods:
            problems.append(f"{here}.template.spec.containers is required")
            continue
        problems += _pod_template_problems(template, f"{here}.template")
        limits = pods[0].get("resources", {}).get("limits", {})
        if "nvidia.com/gpu" in limits:
            gpu_groups += 1
            requests = pods[0]["resources"].get("requests", {})
            if str(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) != str(
                limits["nvidia.com/gpu"]
            ):
                problems.append(f"{here}: GPU requests must equal limits")
    if not gpu_groups:
        problems.append(f"{where}: no worker group has nvidia.com/gpu limits")
    for container in _all_containers(spec):
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", container.get("name", "")):
            problems.append(f"{where}: container name {container.get('name')!r} is not DNS-1123")
    return problems


def _all_containers(spec: dict) -> list[dict]:
    groups = [spec.get("headGroupSpec") or {}, *(spec.get("workerGroupSpecs") or [])]
    return [
        c for g in groups for c in (g.get("template") or {}).get("spec", {}).get("containers", [])
    ]


def kuberay_problems(manifest: dict) -> list[str]:
    """What the ray.io/v1 RayCluster / RayJob CRDs (and Kubernetes) would refuse."""
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion must be ray.io/v1, not {manifest.get('apiVersion')!r}")
    name = (manifest.get("metadata") or {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is required and must be DNS-1123 (<= 63)")
    kind = manifest.get("kind")
    spec = manifest.get("spec") or {}
    if kind == "RayCluster":
        problems += _ray_cluster_spec_problems(spec, "spec")
    elif kind == "RayJob":
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            problems.append("spec.entrypoint is required")
        if "runtimeEnvYAML" in spec and not isinstance(
            yaml.safe_load(spec["runtimeEnvYAML"]), dict
        ):
            problems.append("spec.runtimeEnvYAML must hold a YAML mapping")
        if "rayClusterSpec" in spec:
            problems += _ray_cluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
        elif "clusterSelector" not in spec:
            problems.append("spec.rayClusterSpec or spec.clusterSelector is required")
    else:
        problems.append(f"kind must be RayCluster or RayJob, not {kind!r}")
    return problems


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_is_structurally_valid(name):
    manifest = _load(f"kuberay/{name}")
    assert kuberay_problems(manifest) == []
    text = (CLUSTER / "kuberay" / name).read_text()
    assert "secretRef" in text and not re.search(r"(?i)aws_secret_access_key\s*:", text)


def test_kuberay_check_catches_broken_manifests():
    broken = _load("kuberay/raycluster.yaml")
    broken["apiVersion"] = "ray.io/v1alpha1"
    group = broken["spec"]["workerGroupSpecs"][0]
    group["minReplicas"] = 9  # above maxReplicas
    container = group["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # a typo the API would drop
    del broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    problems = kuberay_problems(broken)
    text = "\n".join(problems)
    assert "apiVersion" in text
    assert "minReplicas <= replicas <= maxReplicas" in text
    assert ".resource: not a field" in text
    assert "no worker group has nvidia.com/gpu" in text
    assert "V1Container name" in text  # the models enforce required fields


def test_rayjob_runs_an_attnpipe_stage():
    job = _load("kuberay/rayjob.yaml")
    assert re.fullmatch(r"attnpipe (train|tune|evaluate) \w+", job["spec"]["entrypoint"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True
