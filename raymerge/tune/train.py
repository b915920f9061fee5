"""The σ-tuning job: a Ray Train TorchTrainer (DDP: gloo on CPU, NCCL on GPU) whose checkpoints
hold only the σ tensors, then the fold-back into a standard checkpoint."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..sources.checkpoint import Checkpoint, read_tensor
from ..store.download import local_copy
from ..store.objects import scheme_of
from .config import TuneConfig
from .factors import load_factors
from .swap import attach_spectral_layers

SIGMA_FILE = "sigma.safetensors"
PROGRESS_FILE = "progress.json"


def build_spectral_model(settings: TuneConfig):
    """The merged model (float32) with its AXIS matrices as SpectralLinear layers."""
    from transformers import AutoModelForCausalLM

    merged = local_copy(settings.merged, settings.storage)
    factors = load_factors(merged)
    base = Checkpoint.open(settings.base, local_copy(settings.base, settings.storage))
    base_weights = {name: read_tensor(base.tensors[name]).float() for name in factors}
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32,
                                                 trust_remote_code=False)
    swapped = attach_spectral_layers(model, factors, base_weights, settings.n)
    return model, swapped


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    settings = TuneConfig.model_validate(loop_config["tune"])
    torch.manual_seed(settings.seed)
    if not settings.use_gpu:  # use the CPUs this worker holds (Ray sets 1 thread by default)
        torch.set_num_threads(max(1, round(settings.cpus_per_worker)))
    model, swapped = build_spectral_model(settings)
    progress = {"epoch": -1, "steps": 0, "train_seconds": 0.0, "starts": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker or a rerun of the same run: continue
        with checkpoint.as_directory() as directory:
            sigmas = load_file(Path(directory) / SIGMA_FILE)
            progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
        with torch.no_grad():
            for name, layer in swapped.items():
                layer.sigma.copy_(sigmas[name][: layer.sigma.numel()])
    progress["starts"] += 1  # > 1: this run continued from a checkpoint
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = torch.optim.Adam if settings.optimizer.name == "adam" else torch.optim.SGD
    optimizer = optimizer_class(trainable, lr=settings.optimizer.lr,
                                weight_decay=settings.optimizer.weight_decay)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    if "eval_loss_before" not in progress:
        progress["eval_loss_before"] = _evaluate(model, eval_shard, settings.batch_size, device)

    for epoch in range(progress["epoch"] + 1, settings.epochs):
        _maybe_fail_once(loop_config, epoch)
        model.train()
        started, losses = time.perf_counter(), []
        for step, batch in enumerate(train_shard.iter_torch_batches(
                batch_size=settings.batch_size, dtypes=torch.long, device=device)):
            if settings.max_steps and step >= settings.max_steps:
                break
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        progress["train_seconds"] += time.perf_counter() - started
        progress["steps"] += len(losses)
        progress["epoch"] = epoch
        progress["train_loss"] = sum(losses) / max(1, len(losses))
        progress["eval_loss"] = _evaluate(model, eval_shard, settings.batch_size, device)
        # Ray Train uploads a reported checkpoint to storage_path, except in local mode
        # (num_workers: 0), where the reported directory itself is the checkpoint.
        keep = None if settings.num_workers else (
            _local_runs(settings) / loop_config["run_name"] / f"local-epoch-{epoch:04d}")
        _report(progress, swapped, keep)


def _local_runs(settings: TuneConfig) -> Path:
    """Where local mode keeps its checkpoints: storage_path, or for one in a store (which Ray
    Train does not upload to in local mode) a directory on this node."""
    if scheme_of(settings.storage_path):
        return Path(tempfile.gettempdir()) / "raymerge-tune-runs"
    return Path(settings.storage_path)


def _evaluate(model, shard, batch_size: int, device) -> float:
    """Mean token loss over the held-out shard, averaged over all workers."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long,
                                              device=device):
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            total += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64,
                                  device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _report(progress: dict, swapped: dict, keep: Path | None) -> None:
    """Metrics from every worker; the σ checkpoint from rank 0 only."""
    import ray.train

    metrics = {key: value for key, value in progress.items()}
    metrics["eval_perplexity"] = math.exp(min(progress["eval_loss"], 50))
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as scratch:
        directory = keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({name: layer.full_sigma.detach().cpu().contiguous()
                   for name, layer in swapped.items()}, directory / SIGMA_FILE)
        (directory / PROGRESS_FILE).write_text(json.dumps(progress))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _maybe_fail_once(loop_config: dict, epoch: int) -> None:
    """Fault injection for tests: fail at the start of epoch `fail_at_epoch`, once."""
    marker = loop_config.get("fail_once_marker")
    if marker and epoch == loop_config.get("fail_at_epoch", 1) and not Path(marker).exists():
        Path(marker).write_text("failed once")
        raise RuntimeError("injected failure (fail_once_marker)")


def folded_weights(settings: TuneConfig, sigmas: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """W = W_base + U·diag(σ_tuned)·Vᵀ, σ in the descending order the layers used."""
    factors = load_factors(local_copy(settings.merged, settings.storage))
    base = Checkpoint.open(settings.base, local_copy(settings.base, settings.storage))
    folded = {}
    for name, (U, S, V) in factors.items():
        order = S.argsort(descending=True, stable=True)
        update = (U[:, order].double() * sigmas[name].double()) @ V[:, order].double().mT
        folded[name] = read_tensor(base.tensors[name]).double() + update
    return folded
