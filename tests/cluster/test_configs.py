"""The cluster files in cluster/ describe real GPU machines and a runnable job.

Real clouds and a real Kubernetes cannot be reached from here. The launcher YAMLs go through
the same `prepare_config` + `validate_config` (ray-schema.json) that `ray up` runs before it
calls the provider, and are compared with the providers' published machine shapes; the KubeRay
manifests are checked against the fields the ray.io/v1 CRDs require, with every pod template
deserialized into the `kubernetes` client's models and compared back (a misspelt or misplaced
field is dropped by the models, so the round trip shows it). The RayJob's entrypoint is parsed
by attnpipe's own CLI and its recipe changes applied to the repository's recipes; running it
for real is test_rayjob_run.py.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from kubernetes.utils import parse_quantity

from tests.cluster.manifests import (
    AWS_MACHINES,
    CLUSTER,
    GCP_MACHINES,
    GIB,
    KUBERAY,
    KUBERAY_CLUSTERS,
    RAYJOBS,
    REPO,
    cluster_spec,
    dockerfile_workdir,
    entrypoint_argv,
    gpus,
    groups,
    load,
    locked_cuda,
    mounts,
    ray_container,
    required_driver,
    shared_mount,
    start_params,
    version,
)

LAUNCHERS = {"aws.yaml": AWS_MACHINES, "gcp.yaml": GCP_MACHINES}
DRIVER_CHECK = "~/attnpipe/.venv/bin/python -m attnpipe.devices check --require-gpu"

# The GPU images the launcher configs boot, with the NVIDIA driver their publisher documents.
# AWS: the "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)" release notes
# (docs.aws.amazon.com/dlami/latest/devguide/, per-release pages: 580.95.05 in the 2025-10-31
# release, 580.105.08 in December 2025, 595.x through 2026); the SSM parameter resolves to the
# newest release. GCP: Deep Learning VM families name their driver branch (`-nvidia-580`); 580's
# first production release, 580.65.06, is CUDA 13.0's minimum, so any 580.x qualifies.
GPU_IMAGE_DRIVERS = {
    "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
    "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id": "580.95.05",
    "projects/deeplearning-platform-release/global/images/family/"
    "common-cu129-ubuntu-2204-nvidia-580": "580.65.06",
}


def _prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)  # raises on any schema or consistency error
    return prepared


def _machine_type(node: dict) -> str:
    return node["node_config"].get("InstanceType") or node["node_config"]["machineType"]


def _image(node: dict) -> str:
    config = node["node_config"]
    if "ImageId" in config:
        return config["ImageId"]
    return next(d for d in config["disks"] if d.get("boot"))["initializeParams"]["sourceImage"]


def _gpu_types(config: dict) -> dict[str, dict]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if node.get("resources", {}).get("GPU", 0) >= 1
    }


# --------------------------------------------------------------------------- the driver
def test_the_driver_requirement_follows_the_locked_cuda_build():
    """uv.lock's CUDA runtime is the one torch was built for; its minimum driver is 580.65.06."""
    lock = (REPO / "uv.lock").read_text()
    runtime = re.search(r'name = "nvidia-cuda-runtime"\nversion = "([\d.]+)"', lock).group(1)
    assert runtime.split(".")[:2] == locked_cuda().split(".")[:2]
    assert version(required_driver()) >= (580, 65, 6)  # CUDA 13.x needs the 580 branch


def test_every_driver_statement_names_the_requirement():
    """Where a file states the driver floor it states the current one (and how to check it)."""
    needed = required_driver()
    readme = (CLUSTER / "README.md").read_text()
    assert f"driver >= {needed}" in readme and "nvidia-smi" in readme
    for name in ["aws.yaml", "gcp.yaml", "kuberay/rayjob.yaml", "Dockerfile"]:
        text = (CLUSTER / name).read_text()
        stated = set(re.findall(r"driver\s+>=\s*(\d+(?:\.\d+)*)", text, flags=re.IGNORECASE))
        assert stated <= {needed, needed.split(".")[0]}, f"{name} states driver >= {stated}"
    assert needed in (CLUSTER / "aws.yaml").read_text()


def test_the_image_carries_the_locked_cuda_user_space():
    """The KubeRay image's CUDA is torch's CUDA (the host brings only the driver)."""
    base = re.search(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z]+-ubuntu[\d.]+", base.group(1))
    assert match, f"the image is built on an NVIDIA CUDA base image, not {base.group(1)}"
    assert match.groups() == tuple(locked_cuda().split(".")[:2])


# --------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_config_passes_rays_validation(name):
    prepared = _prepared(name)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    assert LAUNCHERS[name][_machine_type(head)].gpus == 0, "the head is a CPU machine"
    assert _gpu_types(prepared), "no GPU worker type"
    for node in types.values():
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= prepared["max_workers"]
    setup = " && ".join(prepared["setup_commands"])
    assert "uv sync --frozen" in setup and "uv" in setup.split("uv sync")[0]
    assert any("ray start --head" in c for c in prepared["head_start_ray_commands"])
    for excluded in ("data", ".venv", "models/*/checkpoints"):
        assert excluded in prepared["rsync_exclude"]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_gpu_node_types_advertise_their_machines(name):
    """Ray's CPU, GPU and accelerator_type resources are the machine's real ones."""
    machines = LAUNCHERS[name]
    for node_type, node in _gpu_types(load(name)).items():
        machine = machines[_machine_type(node)]
        resources = node["resources"]
        assert (resources["CPU"], resources["GPU"]) == (machine.vcpus, machine.gpus), node_type
        accelerators = {k for k in resources if k.startswith("accelerator_type:")}
        assert accelerators == {f"accelerator_type:{machine.gpu}"}, node_type
        for accelerator in node["node_config"].get("guestAccelerators", []):
            assert accelerator["acceleratorCount"] == machine.gpus, node_type


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_two_8_gpu_nodes_fit_and_a_small_node_exists(name):
    config = load(name)
    gpu_types = _gpu_types(config)
    enabled_8x = [
        n for n, t in gpu_types.items() if t["resources"]["GPU"] == 8 and t["max_workers"]
    ]
    # One enabled 8-GPU type: the autoscaler never mixes A100s with H100s in one run.
    assert len(enabled_8x) == 1, f"enabled 8-GPU types: {enabled_8x}"
    assert gpu_types[enabled_8x[0]]["max_workers"] >= 2 and config["max_workers"] >= 2
    small = [t for t in gpu_types.values() if t["resources"]["GPU"] == 1 and t["max_workers"]]
    assert small, "no 1-GPU type for trying things"


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_gpu_nodes_boot_a_new_enough_driver_and_check_it(name):
    config = load(name)
    needed = version(required_driver())
    for node_type, node in _gpu_types(config).items():
        image = _image(node)
        assert image in GPU_IMAGE_DRIVERS, f"{node_type}: no documented driver for {image}"
        assert version(GPU_IMAGE_DRIVERS[image]) >= needed, f"{node_type}: {image}"
        branch = re.search(r"-nvidia-(\d+)$", image)
        if branch:  # the family's name says its driver branch: it must agree with the table
            assert int(branch.group(1)) == version(GPU_IMAGE_DRIVERS[image])[0]
        # Run before `ray start` (setup precedes start), with the locked environment's python.
        assert DRIVER_CHECK in node.get("worker_setup_commands", []), node_type
    assert DRIVER_CHECK not in " ".join(config["setup_commands"]), "the CPU head has no GPU"


def test_gcp_gpu_nodes_can_be_created():
    """GPU VMs cannot live-migrate; G2 and A3 take no pd-standard disk; one zone for all."""
    config = load("gcp.yaml")
    zone = config["provider"]["availability_zone"]
    for node_type, node in config["available_node_types"].items():
        node_config = node["node_config"]
        disk_type = node_config["disks"][0]["initializeParams"]["diskType"]
        assert disk_type == f"zones/{zone}/diskTypes/pd-balanced", node_type
        if node.get("resources", {}).get("GPU"):
            assert node_config["scheduling"] == {
                "onHostMaintenance": "TERMINATE",
                "automaticRestart": True,
            }, node_type
        if node_config["machineType"].startswith("a3-"):
            assert node_config["networkInterfaces"][0]["nicType"] == "GVNIC"


def test_validation_rejects_a_broken_launcher_config():
    """The check above can fail: a typo and an inconsistent bound are both caught."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = load("aws.yaml")
    typo["available_node_types"]["gpu_1x"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(typo))
    too_many = load("aws.yaml")
    too_many["available_node_types"]["gpu_1x"]["min_workers"] = 100
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(too_many))


# --------------------------------------------------------------------------- KubeRay
def _model_problems(obj: dict, model: str, where: str) -> list[str]:
    """Deserialize into a kubernetes client model (required fields enforced), compare back."""
    from kubernetes.client import ApiClient

    client = ApiClient()
    try:
        parsed = client.deserialize(json.dumps(obj), model, "application/json")
    except ValueError as invalid:  # a required field missing, a wrong type
        return [f"{where}: {' '.join(str(invalid).split())}"]
    back = client.sanitize_for_serialization(parsed)
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

    compare(obj, back, "")
    return problems


def _group_problems(group: dict, here: str) -> list[str]:
    problems = []
    counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
    if not all(isinstance(c, int) for c in counts):
        problems.append(f"{here}: replicas, minReplicas and maxReplicas must be integers")
    elif not counts[0] <= counts[1] <= counts[2]:
        problems.append(f"{here}: needs minReplicas <= replicas <= maxReplicas")
    if not isinstance(group.get("rayStartParams", {}), dict):
        problems.append(f"{here}.rayStartParams must be a mapping")
    if not all(isinstance(v, str) for v in (group.get("rayStartParams") or {}).values()):
        problems.append(f"{here}.rayStartParams values must be strings")
    return problems


def _ray_cluster_spec_problems(spec: dict, where: str) -> list[str]:
    problems = []
    head = spec.get("headGroupSpec") or {}
    if "rayStartParams" in head and not isinstance(head["rayStartParams"], dict):
        problems.append(f"{where}.headGroupSpec.rayStartParams must be a mapping")
    if not (head.get("template") or {}).get("spec", {}).get("containers"):
        problems.append(f"{where}.headGroupSpec.template.spec.containers is required")
    else:
        problems += _model_problems(head["template"], "V1PodTemplateSpec", f"{where}.head")
    worker_groups = spec.get("workerGroupSpecs") or []
    if not worker_groups:
        problems.append(f"{where}.workerGroupSpecs: at least one worker group")
    names = [g.get("groupName") for g in worker_groups]
    if len(set(names)) != len(names) or not all(names):
        problems.append(f"{where}.workerGroupSpecs: groupName required and unique")
    for i, group in enumerate(worker_groups):
        here = f"{where}.workerGroupSpecs[{i}]"
        problems += _group_problems(group, here)
        template = group.get("template") or {}
        pods = template.get("spec", {}).get("containers") or []
        if not pods:
            problems.append(f"{here}.template.spec.containers is required")
            continue
        problems += _model_problems(template, "V1PodTemplateSpec", f"{here}.template")
        requests = pods[0].get("resources", {}).get("requests", {})
        limits = pods[0].get("resources", {}).get("limits", {})
        if str(requests.get("nvidia.com/gpu", "")) != str(limits.get("nvidia.com/gpu", "")):
            problems.append(f"{here}: GPU requests must equal limits")
    if not any(
        "nvidia.com/gpu" in ray_container(g).get("resources", {}).get("limits", {})
        for g in worker_groups
        if g.get("template", {}).get("spec", {}).get("containers")
    ):
        problems.append(f"{where}: no worker group has nvidia.com/gpu limits")
    for group in [head, *worker_groups]:
        pod = (group.get("template") or {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", container.get("name", "")):
                problems.append(
                    f"{where}: container name {container.get('name')!r} is not DNS-1123"
                )
    return problems


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


@pytest.mark.parametrize("name", KUBERAY_CLUSTERS)
def test_kuberay_manifest_is_structurally_valid(name):
    manifest = load(f"kuberay/{name}")
    assert kuberay_problems(manifest) == []
    text = (KUBERAY / name).read_text()
    assert "secretRef" in text and not re.search(r"(?i)aws_secret_access_key\s*:", text)


def test_kuberay_check_catches_broken_manifests():
    broken = load("kuberay/raycluster.yaml")
    broken["apiVersion"] = "ray.io/v1alpha1"
    del broken["spec"]["workerGroupSpecs"][1:]
    group = broken["spec"]["workerGroupSpecs"][0]
    group["minReplicas"] = 9  # above maxReplicas
    group["rayStartParams"]["num-gpus"] = 8  # KubeRay wants strings
    container = group["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # a typo the API would drop
    del broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    problems = kuberay_problems(broken)
    text = "\n".join(problems)
    assert "apiVersion" in text
    assert "minReplicas <= replicas <= maxReplicas" in text
    assert "rayStartParams values must be strings" in text
    assert ".resource: not a field" in text
    assert "no worker group has nvidia.com/gpu" in text
    assert "V1Container name" in text  # the models enforce required fields


@pytest.mark.parametrize("name", KUBERAY_CLUSTERS)
def test_kuberay_pods_advertise_their_gpus_and_cpus(name):
    """A pod's nvidia.com/gpu and CPUs are the Ray resources it advertises; the head has none."""
    spec = cluster_spec(load(f"kuberay/{name}"))
    head = spec["headGroupSpec"]
    assert start_params(head)["num-cpus"] == "0" and gpus(head) == 0
    for group_name, group in groups(spec)[1:]:
        resources = ray_container(group)["resources"]
        params = start_params(group)
        assert params["num-gpus"] == str(gpus(group)), group_name
        assert params["num-cpus"] == str(resources["requests"]["cpu"]), group_name
        assert resources["requests"] == resources["limits"], f"{group_name}: not Guaranteed"
    sizes = {gpus(g): g for _, g in groups(spec)[1:]}
    assert 8 in sizes and sizes[8]["maxReplicas"] >= 2, "two 8-GPU pods (one per machine)"
    assert 1 in sizes, "a 1-GPU group for trying things"


@pytest.mark.parametrize("name", KUBERAY_CLUSTERS)
def test_kuberay_pods_fit_their_machines(name):
    """An 8-GPU pod fits every 8-GPU machine of the tables, a 1-GPU pod every 1-GPU machine
    and the head every CPU machine (the README's CPU node pools), leaving a CPU and 10% of
    the memory to the kubelet and daemon sets."""
    machines = list(AWS_MACHINES.values()) + list(GCP_MACHINES.values())
    for group_name, group in groups(cluster_spec(load(f"kuberay/{name}"))):
        requests = ray_container(group)["resources"]["requests"]
        cpu, memory = parse_quantity(requests["cpu"]), parse_quantity(requests["memory"]) / GIB
        for machine in (m for m in machines if m.gpus == gpus(group)):
            assert cpu <= machine.vcpus - 1, f"{group_name}: {cpu} CPUs on {machine}"
            assert memory <= 0.9 * machine.memory_gib, f"{group_name}: {memory} GiB on {machine}"


@pytest.mark.parametrize("name", KUBERAY_CLUSTERS)
def test_kuberay_gpu_pods_have_shared_memory_for_nccl(name):
    """/dev/shm is memory-backed and holds the object store plus 4 GiB per GPU (NCCL's
    intra-node buffers, DataLoader batches); the container default is 64 MiB."""
    for group_name, group in groups(cluster_spec(load(f"kuberay/{name}")))[1:]:
        shm = mounts(group).get("/dev/shm", {}).get("emptyDir", {})
        assert shm.get("medium") == "Memory", f"{group_name}: /dev/shm is not in memory"
        size = parse_quantity(shm["sizeLimit"])
        store = parse_quantity(start_params(group).get("object-store-memory", "0"))
        assert size >= store + 4 * GIB * gpus(group), f"{group_name}: /dev/shm {size}"


@pytest.mark.parametrize("name", KUBERAY_CLUSTERS)
def test_kuberay_gpu_pods_check_the_driver_before_ray_starts(name):
    """An init container (it runs before the Ray container) sees the pod's GPUs and checks
    the driver with the locked environment's python."""
    for group_name, group in groups(cluster_spec(load(f"kuberay/{name}")))[1:]:
        inits = group["template"]["spec"].get("initContainers", [])
        checks = [c for c in inits if "attnpipe.devices" in c["command"]]
        assert len(checks) == 1, f"{group_name}: no driver check"
        assert checks[0]["command"][-2:] == ["check", "--require-gpu"]
        assert checks[0]["command"][0] == f"{dockerfile_workdir()}/.venv/bin/python"
        limits = checks[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == gpus(group), group_name


@pytest.mark.parametrize("name", KUBERAY_CLUSTERS)
def test_kuberay_every_pod_mounts_the_shared_volume(name):
    spec = cluster_spec(load(f"kuberay/{name}"))
    path, claim = shared_mount(spec)
    for group_name, group in groups(spec):
        volume = mounts(group).get(path, {})
        assert volume.get("persistentVolumeClaim", {}).get("claimName") == claim, group_name
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert (gpus(group) > 0) == any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_the_shared_claim_is_declared_read_write_many():
    claim = yaml.safe_load((KUBERAY / "storage.yaml").read_text())
    assert _model_problems(claim, "V1PersistentVolumeClaim", "storage.yaml") == []
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in KUBERAY_CLUSTERS:
        assert shared_mount(cluster_spec(load(f"kuberay/{name}")))[1] == claim["metadata"]["name"]
    results = yaml.safe_load((KUBERAY / "results.yaml").read_text())
    assert _model_problems(results, "V1Pod", "results.yaml") == []
    volumes = results["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_the_readme_creates_the_storage_class_the_claim_names():
    """EKS (EFS) and GKE (Filestore) each get a StorageClass of that name in the README."""
    claim = yaml.safe_load((KUBERAY / "storage.yaml").read_text())
    readme = (CLUSTER / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"<<'EOF'\n(.*?)\nEOF", readme, re.DOTALL)]
    classes = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "StorageClass"]
    provisioners = {c["provisioner"] for c in classes}
    assert provisioners == {"efs.csi.aws.com", "filestore.csi.storage.gke.io"}
    for storage_class in classes:
        assert _model_problems(storage_class, "V1StorageClass", "README") == []
        assert storage_class["metadata"]["name"] == claim["spec"]["storageClassName"]


# --------------------------------------------------------------------------- the RayJobs
def _job_recipe(name: str):
    """The RayJob's parsed arguments and the recipe with its --set changes applied."""
    from attnpipe.cli import build_parser
    from attnpipe.config import apply_overrides, load_recipe, parse_assignments

    args = build_parser().parse_args(entrypoint_argv(load(f"kuberay/{name}")))
    recipe = load_recipe(args.pipeline, REPO)
    return args, apply_overrides(recipe, parse_assignments(args.set), origin=name)


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_entrypoint_is_a_valid_attnpipe_run(name):
    from attnpipe.cli.stages import run_all

    args, recipe = _job_recipe(name)
    assert args.handler is run_all, "the job runs every stage: fetch ... export"
    assert recipe.train.use_gpu is True, "true: a cluster without GPUs fails, never trains on CPU"
    job = load(f"kuberay/{name}")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_ranks_fill_the_8_gpu_pods(name):
    """16 ranks on the 8-GPU pods: enough GPUs and CPUs there, too many CPUs for the 1-GPU
    group (so the autoscaler never spreads a run over small pods), a shard per loader slot."""
    _, recipe = _job_recipe(name)
    train = recipe.train
    spec = cluster_spec(load(f"kuberay/{name}"))
    by_size = {gpus(g): g for _, g in groups(spec)[1:]}
    big, small = by_size[8], by_size[1]
    assert train.workers * train.gpus_per_worker == 8 * big["replicas"] == 16
    assert train.cpus_per_worker * 8 <= float(start_params(big)["num-cpus"])
    assert train.cpus_per_worker > float(start_params(small)["num-cpus"])
    assert recipe.shard.min_shards >= train.workers * max(1, train.loader_workers)


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_paths_are_on_the_shared_volume(name):
    args, recipe = _job_recipe(name)
    path, _ = shared_mount(cluster_spec(load(f"kuberay/{name}")))
    for used in (str(args.root), recipe.shard.publish_to, recipe.train.storage_path):
        assert used.startswith(f"{path}/"), f"{used} is not on the shared volume {path}"


# --------------------------------------------------------------------------- README, image
def test_the_readmes_recipe_changes_are_valid_recipes():
    """Each `# pipelines/<name>.yaml` block merged into that recipe passes its validation,
    and the 2 x 8-GPU one asks for 16 GPU ranks with more CPUs than a small node has."""
    from attnpipe.config import load_recipe, parse_recipe

    readme = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```yaml\n# pipelines/(\w+)\.yaml[^\n]*\n(.*?)```", readme, re.DOTALL)
    assert {name for name, _ in blocks} == {"digits", "cassava"}
    for name, block in blocks:
        data = load_recipe(name, REPO).model_dump(mode="json")
        for section, values in yaml.safe_load(block).items():
            data[section] = {**data[section], **values}
        recipe = parse_recipe(data, name=name, origin=f"README: pipelines/{name}.yaml")
        assert recipe.train.use_gpu is True
        if name == "cassava":
            assert recipe.train.workers == 16
            small = [t for t in _gpu_types(load("aws.yaml")).values() if t["resources"]["GPU"] == 1]
            assert all(recipe.train.cpus_per_worker > t["resources"]["CPU"] for t in small)


def test_the_image_build_context_holds_what_the_dockerfile_copies():
    """cluster/Dockerfile.dockerignore ignores everything else (.venv, data: gigabytes)."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    copied = set()
    for line in re.findall(r"^COPY\s+(?!--from)(.*)$", dockerfile, flags=re.MULTILINE):
        copied.update(p for p in line.split()[:-1] if not p.startswith("--"))
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore and copied == kept
    assert all((REPO / path).exists() for path in kept)
