"""The cluster manifests parse and hold the fields their tools require."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import ray
import yaml

CLUSTER = Path(__file__).parents[1] / "cluster"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _entrypoint_module(entrypoint: str) -> str:
    words = entrypoint.split()
    assert words[:2] == ["python", "-m"], entrypoint
    return words[2]


def test_cluster_launcher_config():
    config = _load("ray-cluster.yaml")
    assert config["cluster_name"] and config["provider"]["type"]
    assert config["head_node_type"] in config["available_node_types"]
    assert any("--shm-size" in option for option in config["docker"]["run_options"])
    assert any(command.startswith("ray start --head") for command in
               config["head_start_ray_commands"])
    assert ray.__version__ in config["docker"]["image"]


def test_kuberay_cluster_job_and_cronjob_agree():
    cluster = _load("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert ray.__version__ in head["image"]
    worker_group = cluster["spec"]["workerGroupSpecs"][0]
    worker = worker_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    secret = _load("secret-example.yaml")
    for group in (cluster["spec"]["headGroupSpec"], worker_group):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert ray.__version__ in container["image"]
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert set(mounts.values()) == {"/dev/shm", "/scratch"}  # node-local only: no shared volume
        assert all("persistentVolumeClaim" not in volume for volume in pod["volumes"])
        assert {volume["name"] for volume in pod["volumes"]} == set(mounts)
        # credentials from the Secret, in every pod
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} <= set(secret["stringData"])

    job = _load("kuberay-rayjob-merge.yaml")
    cron = _load("kuberay-raycronjob-merge.yaml")
    assert (job["kind"], cron["kind"]) == ("RayJob", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert _entrypoint_module(cron["spec"]["jobTemplate"]["entrypoint"]) == "pipelines.regenerate"
    for spec in (job["spec"], cron["spec"]["jobTemplate"]):
        module = _entrypoint_module(spec["entrypoint"])
        assert importlib.util.find_spec(module) is not None, module
        assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        # raymerge is in the image; the recipe or registry is in the store, no path a pod lacks
        assert "runtimeEnvYAML" not in spec
        assert spec["entrypoint"].split()[3].startswith("s3://")


def test_the_dockerfile_builds_from_the_cluster_ray_and_passes_hadolint():
    import subprocess
    import sysconfig

    dockerfile = CLUSTER / "Dockerfile"
    text = dockerfile.read_text()
    assert f"rayproject/ray:{ray.__version__}" in text and "pip install --no-cache-dir ./" in text
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    run = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_runtime_env_lists_the_dependencies():
    runtime_env = _load("runtime-env.yaml")
    assert runtime_env["working_dir"] == "."
    assert {"torch", "safetensors", "pydantic"} <= set(runtime_env["pip"])


def test_example_registry_is_valid():
    from raymerge.regenerate import load_registry

    registry, root = load_registry(CLUSTER / "registry.yaml")
    assert root == str(CLUSTER.resolve()) and registry.factor_cache.startswith("s3://")
    assert [model.name for model in registry.models] == ["team-axis", "team-ties"]
    for model in registry.models:  # every recipe it names exists and is a valid recipe
        if isinstance(model.recipe, str):
            from raymerge.recipe import load_recipe

            recipe = load_recipe(Path(root) / model.recipe)
            assert recipe.output.path == model.output


def _unknown_fields(value, schema: dict, where: str) -> list[str]:
    """Fields the schema does not declare (the API server would prune them silently)."""
    if isinstance(value, dict) and "properties" in schema and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        found = [f"{where}.{key}" for key in value if key not in schema["properties"]]
        for key, item in value.items():
            if key in schema["properties"]:
                found += _unknown_fields(item, schema["properties"][key], f"{where}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [field for index, item in enumerate(value)
                for field in _unknown_fields(item, schema["items"], f"{where}[{index}]")]
    return []


@pytest.mark.parametrize("manifest, crd", [
    ("kuberay-raycluster.yaml", "rayclusters"),
    ("kuberay-rayjob-merge.yaml", "rayjobs"),
    ("kuberay-raycronjob-merge.yaml", "raycronjobs"),
])
def test_kuberay_manifests_validate_against_the_crd_schemas(manifest, crd):
    import gzip
    import json

    import jsonschema

    data = json.loads(gzip.decompress((Path(__file__).parent / "data" / "kuberay" /
                                       f"ray.io_{crd}.v1.json.gz").read_bytes()))
    document = _load(manifest)
    assert document["kind"] == data["kind"]
    jsonschema.Draft7Validator(data["schema"]).validate(document)
    assert _unknown_fields(document, data["schema"], document["kind"]) == []


def test_the_strict_check_catches_a_misspelt_field():
    import gzip
    import json

    data = json.loads(gzip.decompress((Path(__file__).parent / "data" / "kuberay" /
                                       "ray.io_rayjobs.v1.json.gz").read_bytes()))
    job = _load("kuberay-rayjob-merge.yaml")
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    assert _unknown_fields(job, data["schema"], "RayJob") == ["RayJob.spec.entryPoint"]
