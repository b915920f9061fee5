"""The merge-quality suite in small (benchmarks/quality): MiniLM fine-tuned on two real tasks
(SMS spam, TREC question type) for a few steps, merged with TIES through `raymerge merge`; the
merged encoder must beat the pretrained one on both tasks, each with that task's head."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "quality"))

from encoders import (  # noqa: E402
    Encoded,
    accuracy,
    fine_tune,
    load_encoder,
    load_head,
    tokenizer_of,
    write_base,
)
from tasks import load_task  # noqa: E402

from raymerge.cli import main  # noqa: E402

TASKS = ("sms_spam", "trec")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    base = write_base(work / "base")
    tasks = {name: load_task(name, train=320, validation=40, test=160) for name in TASKS}
    for name, task in tasks.items():
        fine_tune(base, task, work / name, steps=24, batch_size=16, lr=1e-4)
    torch.set_num_threads(threads)
    return work, base, tasks


def test_a_ties_merge_of_two_fine_tunes_beats_the_base_on_both_tasks(ray_cluster, finetuned,
                                                                     tmp_path):
    from helpers import write_recipe

    work, base, tasks = finetuned
    merged = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(base), "sources": [str(work / name / "encoder") for name in TASKS],
        "method": {"name": "ties", "density": 0.5}, "output": {"path": str(merged)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0

    tokenizer = tokenizer_of(base)
    pretrained, merged_encoder = load_encoder(base), load_encoder(merged)
    for name, task in tasks.items():
        head, test = load_head(work / name), Encoded(tokenizer, task.test)
        before = accuracy(pretrained, head, tokenizer, test)
        after = accuracy(merged_encoder, head, tokenizer, test)
        print(f"{name}: pretrained encoder {before:.3f}, TIES merge {after:.3f}")
        assert after > before + 0.03, f"{name}: merged {after:.3f} vs base {before:.3f}"
