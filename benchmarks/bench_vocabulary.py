"""Re-indexing into a union vocabulary against a plain merge: one unit of embeddings and head
(V × H each) through `merge_unit` in this process, N sources; time (best of 3, page cache warm)
and the task's measured peak memory, which must not grow with N.

    python benchmarks/bench_vocabulary.py --work /tmp/rm-vocab --sources 4 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from raymerge.execute import merge_unit
from raymerge.merge import _job, prepare
from raymerge.recipe import recipe_from_dict


def checkpoint(directory: Path, words: list[str], hidden: int, generator) -> str:
    """A word-level tokenizer and embeddings + head with one row per word."""
    directory.mkdir(parents=True)
    vocabulary = {word: index for index, word in enumerate(words)}
    Tokenizer(WordLevel(vocabulary, unk_token=words[0])).save(str(directory / "tokenizer.json"))
    save_file({name: torch.randn(len(words), hidden, generator=generator)
               for name in ("model.embed_tokens.weight", "lm_head.weight")},
              directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"vocab_size": len(words)}))
    return str(directory)


def timed(recipe: dict) -> tuple[float, int, int]:
    prepared = prepare(recipe_from_dict(recipe))
    job, unit = _job(prepared), prepared.plan.units[0]
    merge_unit(job, unit)  # warm the page cache
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        stats, _ = merge_unit(job, unit)
        seconds.append(time.perf_counter() - started)
    return min(seconds), stats["peak_bytes"], unit.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sources", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    for count in args.sources:
        root = args.work / f"n{count}"
        shutil.rmtree(root, ignore_errors=True)
        generator = torch.Generator().manual_seed(0)
        words = [f"w{i}" for i in range(args.vocab)]
        base = checkpoint(root / "base", words, args.hidden, generator)
        same = [checkpoint(root / f"same-{i}", words, args.hidden, generator)
                for i in range(count)]
        grown = [checkpoint(root / f"grown-{i}", [*words, f"<t{i}>", "<shared>"], args.hidden,
                            generator) for i in range(count)]
        plain = timed({"base": base, "sources": same})
        union = timed({"base": base, "sources": grown, "tokenizer": {"source": "union"}})
        for label, (seconds, peak, estimate) in (("plain", plain), ("union", union)):
            print(f"{count} sources, {label}: {seconds:.2f} s, peak {peak / 2**20:.0f} MiB "
                  f"(estimated {estimate / 2**20:.0f} MiB)")
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
