"""Every method merged through `raymerge merge`, its λ chosen on the validation split, then scored
on the test split: the loop both quality suites share.

Without SVC every method's output is `B + λ·M` with M independent of λ (METHODS.md; held to it by
tests/test_merge_end_to_end.py and tests/test_spectral_end_to_end.py). So one real merge at λ = 1
gives every λ of the grid in memory, as `B + λ·(W₁ − B)` (float32, so exact up to rounding), and
the grid can be wide. SVC's γ depends on λ (through the clip at α), so a calibrated variant is
merged once per λ it tries.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


class Scorer:
    """One model under evaluation, held in the evaluation dtype (`evaluation_dtype`), whose
    weights the suite replaces; scored on every task's data. A suite says how
    one task's split is scored (`score_split`) and which number of that selects λ (`metric`)."""

    def __init__(self, model: torch.nn.Module, data: dict[str, dict]) -> None:
        self.model, self.data = model, data

    def score_split(self, task: str, data):
        raise NotImplementedError

    def metric(self, score) -> float:
        raise NotImplementedError

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        load_weights(self.model, tensors)

    def scores(self, split: str, tasks=None) -> dict:
        return {name: self.score_split(name, self.data[name][split])
                for name in tasks or self.data}

    def validation(self) -> float:
        """The selection metric, mean over tasks."""
        scores = self.scores("validation")
        return sum(self.metric(score) for score in scores.values()) / len(scores)

    def test(self) -> dict:
        return self.scores("test")


def choose_scale(grid, validation_score: Callable[[float], float],
                 extend: int) -> tuple[float, dict[float, float]]:
    """The λ with the best validation score; when that is at an edge of the grid, the grid is
    extended past it (×1.4 above, ÷2 below; at most `extend` points) until the score drops.
    Returns (λ, score per λ tried)."""
    scores = {scale: validation_score(scale) for scale in grid}
    for _ in range(extend):
        best = max(scores, key=scores.get)
        if best == max(scores):
            new = round(best * 1.4, 3)
        elif best == min(scores):
            new = round(best / 2, 3)
        else:
            break
        scores[new] = validation_score(new)
    return max(scores, key=scores.get), dict(sorted(scores.items()))


def evaluation_dtype(choice: str, cpu_flags: set[str] | None = None) -> torch.dtype:
    """bfloat16 where the CPU computes it natively (AVX-512 BF16 or AMX: ~3× faster than float32
    on MiniLM), float32 elsewhere: without those instructions PyTorch emulates bfloat16 matrix
    products, ~80× slower than float32 (1.2 against 95 GFLOP/s measured on a 2-core AMD EPYC
    without AVX-512). `choice` is "auto", "bfloat16" or "float32"; `cpu_flags` defaults to
    this machine's (/proc/cpuinfo)."""
    if choice == "auto":
        flags = cpu_flags if cpu_flags is not None else _cpu_flags()
        choice = "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[choice]


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def add_suite_arguments(parser, default_work: str, option_example: str) -> None:
    """The command-line arguments both suites take."""
    parser.add_argument("--work", default=default_work)
    parser.add_argument("--eval-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="the dtype models are scored in (auto: bfloat16 where the CPU has "
                             "AVX-512 BF16 or AMX, float32 elsewhere); merges are unaffected")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help=f"a method setting other than the default, e.g. {option_example} "
                             "(investigations; repeatable)")
    parser.add_argument("--results", default="results.json", help="file name under --work")
    parser.add_argument("--svc", choices=("both", "without", "with"), default="both",
                        help="which variants of each method: without SVC, with it, or both")


def svc_variants(choice: str) -> tuple[bool, ...]:
    """The `--svc` choice as the SVC flags to run, without first."""
    return {"both": (False, True), "without": (False,), "with": (True,)}[choice]


def open_work(directory: str) -> Path:
    """The work directory, created; torch on the machine's 2 threads; the command printed."""
    torch.set_num_threads(2)
    work = Path(directory).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    return work


def with_options(methods: dict, options: list[str]) -> dict:
    """The methods with `METHOD.KEY=VALUE` settings applied (a number where it parses as one)."""
    methods = {name: dict(settings) for name, settings in methods.items()}
    for option in options:
        target, _, value = option.partition("=")
        name, _, key = target.partition(".")
        if name not in methods or not key or not value:
            raise SystemExit(f"--option {option}: expected METHOD.KEY=VALUE, METHOD one of "
                             f"{', '.join(methods)}")
        try:
            methods[name][key] = int(value) if value.isdigit() else float(value)
        except ValueError:
            methods[name][key] = value
    return methods


def variant_label(name: str, methods: dict, defaults: dict, svc: bool,
                  svc_alpha: float | str = "auto") -> str:
    """"ties", "ties+svc", or with the settings that differ from the defaults:
    "axis+svc(k=0.1, alpha=0.5)"."""
    label = name + ("+svc" if svc else "")
    changed = {k: v for k, v in methods[name].items() if defaults[name].get(k) != v}
    if svc and svc_alpha != "auto":
        changed["alpha"] = svc_alpha
    if changed:
        label += "(" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")"
    return label


def merge(base: Path, sources: list[Path], method: dict, scale: float, svc: bool, out: Path,
          factor_cache: Path | None = None, svc_alpha: float | str = "auto") -> Path:
    """`raymerge merge` of a recipe, in this process (the CLI's code path) on the Ray cluster it
    keeps open. Always a fresh merge: a rerun of the suite merges again."""
    from raymerge.cli import main

    recipe = {"base": str(base), "sources": [str(s) for s in sources],
              "method": {**method, "scale": scale}, "output": {"path": str(out)},
              "runtime": {"max_in_flight": 2}}
    if factor_cache is not None:  # AXIS and TSV-M: one SVD per source and matrix for all runs
        recipe["runtime"]["factor_cache"] = str(factor_cache)
    if svc:
        recipe["calibrate"] = {"svc": {"alpha": svc_alpha}}
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if main(["merge", str(path), "--no-progress"]) != 0:
        sys.exit(f"raymerge merge {path} failed")
    return out


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as float32."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update({name: t.float() for name, t in load_file(file).items()})
    return tensors


def scaled(base: dict[str, torch.Tensor], merged_at_one: dict[str, torch.Tensor],
           scale: float) -> dict[str, torch.Tensor]:
    """The output of the same merge at λ = `scale`: B + λ·(W₁ − B)."""
    return {name: base[name] + scale * (merged_at_one[name] - base[name])
            for name in merged_at_one}


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies a checkpoint's tensors into the model (cast to its dtype); every parameter must be
    among them (a tied one through the tensor it shares)."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    parameters = dict(model.named_parameters())  # one name per tied tensor
    if unexpected or set(missing) & set(parameters):
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: missing "
                         f"{sorted(set(missing) & set(parameters))}, unexpected {unexpected}")


class MethodRunner:
    """Merges, selects λ and tests one method variant at a time; `timings` records where the
    time went (merging vs evaluating)."""

    def __init__(self, base: Path, sources: list[Path], scorer: Scorer, work: Path,
                 grid, extend: int, svc_grid, svc_extend: int,
                 svc_alpha: float | str = "auto") -> None:
        self.base, self.sources, self.scorer, self.work = base, sources, scorer, work
        self.grid, self.extend = grid, extend
        self.svc_grid, self.svc_extend, self.svc_alpha = svc_grid, svc_extend, svc_alpha
        self.base_tensors = read_tensors(base)
        self.factor_cache = work / "factor-cache"
        shutil.rmtree(self.factor_cache, ignore_errors=True)  # every run computes its SVDs
        self.timings = {"merge_seconds": 0.0, "merges": 0, "evaluate_seconds": 0.0,
                        "evaluations": 0}

    def run(self, label: str, method: dict, svc: bool, keep: bool = False) -> dict:
        """One row: the chosen λ, test scores, validation score of every λ tried. With `keep`
        the merged checkpoint at the chosen λ stays, as `merged_path(label)`; every other
        merged checkpoint is removed once read."""
        if svc:
            merged = {}  # λ → tensors of the calibrated merge at that λ

            def validation(scale: float) -> float:
                merged[scale] = self._merge(method, scale, True, label, keep)
                return self._validate(merged[scale])

            best, scores = choose_scale(self.svc_grid, validation, self.svc_extend)
            tensors = merged[best]
        else:
            at_one = self._merge(method, 1.0, False, label, keep=False)
            best, scores = choose_scale(
                self.grid, lambda scale: self._validate(scaled(self.base_tensors, at_one, scale)),
                self.extend)
            tensors = scaled(self.base_tensors, at_one, best)
            if keep:
                self._merge(method, best, False, label, keep=True)
        self.scorer.load(tensors)
        started = time.perf_counter()
        test = self.scorer.test()
        self._spent("evaluate", started)
        if keep:
            shutil.rmtree(self.merged_path(label), ignore_errors=True)
            self.merged_path(label, best).rename(self.merged_path(label))
        for scale in scores:
            shutil.rmtree(self.merged_path(label, scale), ignore_errors=True)
        return {"method": label, "scale": best, "test": test,
                "validation_by_scale": {str(s): v for s, v in scores.items()}}

    def merged_path(self, label: str, scale: float | None = None) -> Path:
        return self.work / "merged" / (label if scale is None else f"{label}@{scale}")

    def _merge(self, method: dict, scale: float, svc: bool, label: str,
               keep: bool) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        out = merge(self.base, self.sources, method, scale, svc, self.merged_path(label, scale),
                    self.factor_cache, self.svc_alpha)
        tensors = read_tensors(out)
        if not keep:
            shutil.rmtree(out)
        self._spent("merge", started)
        return tensors

    def _validate(self, tensors: dict[str, torch.Tensor]) -> float:
        started = time.perf_counter()
        self.scorer.load(tensors)
        score = self.scorer.validation()
        self._spent("evaluate", started)
        return score

    def _spent(self, kind: str, started: float) -> None:
        self.timings[f"{kind}_seconds"] += time.perf_counter() - started
        self.timings["merges" if kind == "merge" else "evaluations"] += 1
