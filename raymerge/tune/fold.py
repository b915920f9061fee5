"""Fold tuned σ back: W = W_base + U·diag(σ_tuned)·Vᵀ into a standard checkpoint, written by the
same layout and shard writer as `raymerge merge`; every other tensor is copied byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import Tensor

from ..output.files import copy_checkpoint_files, copy_tokenizer
from ..output.layout import layout_shards
from ..output.shard_writer import ShardWriter
from ..output.staging import MANIFEST_NAME, Staging, check_output_path
from ..plan import TensorTask
from ..roles import natural_key
from ..sources.checkpoint import Checkpoint, read_tensor
from ..tensor_bits import TORCH_DTYPES, to_numpy_bits


def write_folded_checkpoint(merged: Path, target: Path, folded: dict[str, Tensor],
                            report: dict, card: str, shard_size: int = 2 * 10**9) -> Path:
    checkpoint = Checkpoint.open(str(merged), merged)
    check_output_path(target, [merged])
    names = sorted(checkpoint.tensors, key=natural_key)
    tasks = [TensorTask(n, checkpoint.tensors[n].shape, checkpoint.tensors[n].dtype,
                        checkpoint.tensors[n].dtype) for n in names]
    staging = Staging(target)
    directory = staging.create()
    try:
        writer = ShardWriter(directory, layout_shards(tasks, shard_size))
        for name in names:
            info = checkpoint.tensors[name]
            tensor = folded[name].to(TORCH_DTYPES[info.dtype]) if name in folded \
                else read_tensor(info)
            writer.write({name: to_numpy_bits(tensor)}, flush=False)  # close() syncs
        writer.close()
        if (merged / "config.json").exists():
            shutil.copy2(merged / "config.json", directory / "config.json")
        copy_tokenizer(merged, directory)
        copy_checkpoint_files(merged, directory)  # generation config, sentence-transformers' ...
        (directory / "README.md").write_text(card)
        (directory / MANIFEST_NAME).write_text(json.dumps(
            {"format": "raymerge-tune/1", "merged_from": str(merged), **report}, indent=2) + "\n")
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    return target.resolve()
