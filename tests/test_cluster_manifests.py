"""The cluster manifests parse and hold the fields their tools require."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
    for container in (head, worker):
        assert {"/dev/shm", "/models"} <= {mount["mountPath"] for mount in
                                           container["volumeMounts"]}

    job = _load("kuberay-rayjob-merge.yaml")
    cron = _load("kuberay-raycronjob-merge.yaml")
    assert (job["kind"], cron["kind"]) == ("RayJob", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert _entrypoint_module(cron["spec"]["jobTemplate"]["entrypoint"]) == "pipelines.regenerate"
    for spec in (job["spec"], cron["spec"]["jobTemplate"]):
        module = _entrypoint_module(spec["entrypoint"])
        assert importlib.util.find_spec(module) is not None, module
        assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]


def test_runtime_env_lists_the_dependencies():
    runtime_env = _load("runtime-env.yaml")
    assert runtime_env["working_dir"] == "."
    assert {"torch", "safetensors", "pydantic"} <= set(runtime_env["pip"])


def test_example_registry_is_valid():
    from raymerge.regenerate import load_registry

    registry, root = load_registry(CLUSTER / "registry.yaml")
    assert root == CLUSTER.resolve() and registry.factor_cache
    assert [model.name for model in registry.models] == ["team-axis", "team-ties"]
    for model in registry.models:  # every recipe it names exists and is a valid recipe
        if isinstance(model.recipe, str):
            from raymerge.recipe import load_recipe

            recipe = load_recipe(root / model.recipe)
            assert recipe.output.path == model.output
