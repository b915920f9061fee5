"""`raymerge tune`: run the σ-tuning TorchTrainer on the cluster and fold σ back."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file

from ..errors import RaymergeError
from ..output.remote import RemoteOutput, local_directory
from ..output.staging import check_output_path
from ..store import is_remote
from ..store.download import local_copy
from ..store.objects import filesystem_for, scheme_of
from .config import TuneConfig
from .data import DATA_CPUS, packed_datasets
from .fold import write_folded_checkpoint
from .train import PROGRESS_FILE, SIGMA_FILE, folded_weights, train_loop


def run_tune(settings: TuneConfig, address: str | None = None,
             extra_loop_config: dict | None = None) -> dict:
    """Train, fold, publish; returns the run's figures."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..distributed.cluster import ray_session

    merged = local_copy(settings.merged, settings.storage, complete_output=True)
    base = local_copy(settings.base, settings.storage)
    remote = None
    if scheme_of(settings.output):
        remote = RemoteOutput(settings.output, settings.storage)
        remote.check([settings.merged, settings.base])
        target = local_directory(settings.output)
        target.parent.mkdir(parents=True, exist_ok=True)
    else:
        target = Path(settings.output).resolve()
        check_output_path(target, [merged, base])
    check_tokenizer(merged)
    settings = settings.model_copy(update={  # a store's URIs stay: each worker copies them
        "merged": settings.merged if is_remote(settings.merged) else str(merged),
        "base": settings.base if is_remote(settings.base) else str(base),
        "storage_path": settings.storage_path if scheme_of(settings.storage_path)
        else str(Path(settings.storage_path).resolve())})
    run_name = settings.run_name or f"tune-{settings.merged.rstrip('/').rsplit('/', 1)[-1]}"
    started = time.perf_counter()
    with ray_session(address):
        settings = fit_to_cluster(settings)
        train, evaluation = packed_datasets(settings, settings.merged)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"tune": settings.model_dump(mode="json"), "run_name": run_name,
                               **(extra_loop_config or {})},
            scaling_config=ScalingConfig(num_workers=settings.num_workers,
                                         use_gpu=settings.use_gpu,
                                         resources_per_worker={"CPU": settings.cpus_per_worker}),
            run_config=RunConfig(name=run_name, **_storage(settings),
                                 failure_config=FailureConfig(max_failures=settings.max_failures)),
            datasets={"train": train, "eval": evaluation},
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RaymergeError(f"tuning run {run_name} reported no checkpoint; check its logs")
    with result.checkpoint.as_directory() as directory:
        sigmas = load_file(Path(directory) / SIGMA_FILE)
        progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
    report = {
        "run_name": run_name,
        "eval_loss_before": progress["eval_loss_before"],
        "eval_loss_after": progress["eval_loss"],
        "eval_perplexity_before": math.exp(min(progress["eval_loss_before"], 50)),
        "eval_perplexity_after": math.exp(min(progress["eval_loss"], 50)),
        "trainable_parameters": _trainable(settings, sigmas),
        "steps": progress["steps"],
        "epochs": progress["epoch"] + 1,
        "starts": progress["starts"],
        "seconds_per_step": progress["train_seconds"] / max(1, progress["steps"]),
        "seconds": time.perf_counter() - started,
    }
    write_folded_checkpoint(merged, target, folded_weights(settings, sigmas),
                            {"tuning": report}, _card(settings, report))
    if remote is not None:  # staged here, then into the store, manifest last
        remote.publish(target, [])
        shutil.rmtree(target, ignore_errors=True)
    return {**report, "output": settings.output if remote else str(target), "sigmas": sigmas}


def _storage(settings: TuneConfig) -> dict:
    """RunConfig's storage: a local directory, or an object-store prefix through the same
    filesystem (endpoint, credentials) as the rest of raymerge."""
    if not scheme_of(settings.storage_path):
        return {"storage_path": settings.storage_path}
    filesystem, path = filesystem_for(settings.storage_path, settings.storage)
    return {"storage_path": path, "storage_filesystem": filesystem}


def check_tokenizer(merged: Path) -> None:
    """The training text is tokenized with the merged checkpoint's tokenizer: refuse a
    checkpoint without one before any cluster work."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(merged, trust_remote_code=False)
    except Exception as error:  # transformers raises OSError, ValueError, TypeError ...
        from ..recipe import one_line

        raise RaymergeError(
            f"merged {merged} has no usable tokenizer ({one_line(error)[:200]}); copy the base "
            "model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it"
        ) from None


def fit_to_cluster(settings: TuneConfig) -> TuneConfig:
    """cpus_per_worker chosen when left out (1, or what the cluster leaves beside Ray Data),
    then every worker and Ray Data's share placed on the cluster's nodes: a job that can never
    be scheduled fails now, in one line, instead of waiting forever."""
    from ..distributed.resources import check_placeable, node_resources

    if not settings.resource_check:
        return settings if settings.cpus_per_worker else settings.model_copy(
            update={"cpus_per_worker": 1.0})
    nodes = node_resources()
    cpus = settings.cpus_per_worker
    if cpus is None:
        spare = sum(node["CPU"] for node in nodes) - DATA_CPUS
        largest = max((node["CPU"] for node in nodes), default=0.0)
        fitting = min(spare / max(1, settings.num_workers), largest)
        cpus = max(0.25, min(1.0, int(fitting * 4) / 4))  # in quarter CPUs
    workers = [{"CPU": cpus, "GPU": 1.0 if settings.use_gpu else 0.0}] * settings.num_workers
    check_placeable(
        f"the tuning job ({settings.num_workers} workers × {cpus:g} CPU"
        f"{' + 1 GPU' if settings.use_gpu else ''}, and {DATA_CPUS:g} CPU for Ray Data)",
        [*workers, {"CPU": DATA_CPUS, "GPU": 0.0}],
        {"CPU": "cpus_per_worker", "GPU": "use_gpu"},
        "lower num_workers or cpus_per_worker, set use_gpu: false on a cluster without GPUs, "
        "or add nodes (resource_check: false on an autoscaling cluster)", nodes)
    return settings.model_copy(update={"cpus_per_worker": cpus})


def _trainable(settings: TuneConfig, sigmas: dict) -> int:
    from .swap import trainable_count

    return sum(trainable_count(settings.n, sigma.numel()) for sigma in sigmas.values())


def _card(settings: TuneConfig, report: dict) -> str:
    return "\n".join([
        "---", "library_name: transformers", "tags: [merge, raymerge, axis]", "---", "",
        f"# AXIS merge with tuned singular values (from `{settings.merged}`)", "",
        f"Only the top singular values of each merged matrix were trained "
        f"({report['trainable_parameters']} parameters) on `{settings.data.train}` for "
        f"{report['steps']} steps ({settings.epochs} epochs, {settings.optimizer.name}, "
        f"lr {settings.optimizer.lr:g}).", "",
        "| held-out | before | after |", "| --- | --- | --- |",
        f"| loss | {report['eval_loss_before']:.4f} | {report['eval_loss_after']:.4f} |",
        f"| perplexity | {report['eval_perplexity_before']:.2f} | "
        f"{report['eval_perplexity_after']:.2f} |",
        "", "Reference: AXIS, arXiv 2508.19353 (stage 2).", "",
    ])
