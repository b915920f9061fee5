"""Text data for tuning: read with Ray Data, tokenized with the checkpoint's tokenizer, packed
into fixed-length sequences (input_ids, labels; -100 where no loss is taken)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..store.download import local_copy
from ..store.objects import filesystem_for, scheme_of
from ..store.settings import StorageSettings

IGNORE = -100
# Ray Data's own share of the cluster beside the training workers: its read tasks and the packing
# actor, a quarter CPU each (a read task asks for a whole CPU by default, which a cluster whose
# CPUs the workers hold never has).
READ_CPUS = 0.25
PACK_CPUS = 0.25
DATA_CPUS = READ_CPUS + PACK_CPUS


def read_text_dataset(path: str, storage: StorageSettings | None = None):
    """A parquet or JSON Lines file, or a directory of them (local, or an object-store URI read
    by Ray Data itself, with raymerge's endpoint and credentials), as a Ray Dataset."""
    import ray.data

    remote_args = {"num_cpus": READ_CPUS}
    if scheme_of(path):
        from pyarrow import fs

        filesystem, location = filesystem_for(path, storage or StorageSettings())
        found = filesystem.get_file_info(fs.FileSelector(location, recursive=True,
                                                         allow_not_found=True))
        names = [info.path for info in found if info.type == fs.FileType.File] or [location]
        remote_args["filesystem"] = filesystem
    else:
        location = Path(path)
        names = [str(f) for f in (sorted(location.rglob("*")) if location.is_dir()
                                  else [location])]
    if any(name.endswith(".parquet") for name in names):
        return ray.data.read_parquet(str(location), **remote_args)
    if "filesystem" in remote_args:  # Arrow's reader: JSON Lines too, from the filesystem given
        return ray.data.read_json(str(location), **remote_args)
    return ray.data.read_json(str(location), lines=True, **remote_args)


class Packer:
    """map_batches callable: tokenize texts (or prompt/response pairs) and cut the stream into
    rows of seq_len tokens. Prompt tokens get label -100, so the loss is on responses only."""

    def __init__(self, tokenizer_path: str, seq_len: int, text_column: str = "text",
                 prompt_column: str | None = None, response_column: str | None = None,
                 storage: StorageSettings | None = None) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(local_copy(tokenizer_path, storage),
                                                       trust_remote_code=False)
        self.seq_len = seq_len
        self.text_column = text_column
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.separator = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None \
            else []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids: list[int] = []
        labels: list[int] = []
        if self.prompt_column:
            for prompt, response in zip(batch[self.prompt_column], batch[self.response_column]):
                prompt_ids = self._encode(prompt)
                response_ids = self._encode(response) + self.separator
                ids += prompt_ids + response_ids
                labels += [IGNORE] * len(prompt_ids) + response_ids
        else:
            for text in batch[self.text_column]:
                text_ids = self._encode(text) + self.separator
                ids += text_ids
                labels += text_ids
        rows = len(ids) // self.seq_len
        shape = (rows, self.seq_len)
        return {
            "input_ids": np.asarray(ids[: rows * self.seq_len], dtype=np.int64).reshape(shape),
            "labels": np.asarray(labels[: rows * self.seq_len], dtype=np.int64).reshape(shape),
        }

    def _encode(self, text) -> list[int]:
        return self.tokenizer(str(text), add_special_tokens=False)["input_ids"]


def packed_datasets(config, tokenizer_path: str):
    """(train, eval) Ray Datasets of packed sequences."""
    data = config.data
    train = read_text_dataset(data.train, config.storage)
    if data.eval:
        evaluation = read_text_dataset(data.eval, config.storage)
    else:
        train, evaluation = train.train_test_split(test_size=data.eval_fraction,
                                                   seed=config.seed)
    packer_args = dict(fn_constructor_args=(tokenizer_path, config.seq_len, data.text_column,
                                            data.prompt_column, data.response_column,
                                            config.storage),
                       batch_size=256, concurrency=1, num_cpus=PACK_CPUS)
    # Tokenized once, before the workers start: each epoch and each evaluation then reads the
    # packed rows from the object store (spilled to disk when large) instead of starting a
    # tokenizer actor per pass and per worker.
    return (train.map_batches(Packer, **packer_args).materialize(),
            evaluation.map_batches(Packer, **packer_args).materialize())
