"""TUNE.yaml: what `raymerge tune` trains and where it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..recipe import StrictModel, read_yaml, validate_config
from ..store.settings import StorageSettings


class DataSpec(StrictModel):
    train: str  # a parquet or JSON Lines file, or a directory of them
    eval: str | None = None  # held-out data; default: eval_fraction of train
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    text_column: str = "text"
    prompt_column: str | None = None  # with response_column: loss on the response only
    response_column: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> DataSpec:
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError("prompt_column and response_column go together")
        return self


class OptimizerSpec(StrictModel):
    # AXIS stage 2 (arXiv 2508.19353) tunes σ with learning rate 0.1; we use Adam.
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class TuneConfig(StrictModel):
    # merged, base, data, output and storage_path may be local paths or object-store URIs
    # (s3://, gs://; merged and base also Hub ids), credentials from the environment
    merged: str  # an AXIS merge: a checkpoint with spectral_factors/
    base: str  # the base model the merge was made from
    data: DataSpec
    n: int | float | None = None  # trainable σ per matrix: count, fraction of rank, or all
    optimizer: OptimizerSpec = OptimizerSpec()
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # per epoch
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=2)
    num_workers: int = Field(2, ge=0)  # 0: Ray Train's local mode, in the driver
    # None (auto): 1, or less on a cluster too small for the workers and Ray Data beside them
    cpus_per_worker: float | None = Field(None, gt=0)
    use_gpu: bool = False
    resource_check: bool = True  # false on a cluster whose autoscaler adds nodes on demand
    max_failures: int = Field(2, ge=0)
    output: str = "./tuned"
    storage_path: str = "./raymerge_tune_runs"
    run_name: str | None = None  # same name and storage_path: a rerun continues
    seed: int = 0
    storage: StorageSettings = StorageSettings()  # endpoint, region for the URIs above


def load_tune_config(path: str | Path) -> TuneConfig:
    return validate_config(TuneConfig, read_yaml(path, "tune config"), str(path))
