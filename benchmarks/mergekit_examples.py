"""mergekit's own examples/ (copied as they are from github.com/arcee-ai/mergekit, commit a6e4028,
into benchmarks/mergekit_examples/) rewritten onto tiny local models of the right architecture:
each Hub id becomes a local checkpoint of the same family (the Llama-2-13B fine-tunes: Llama,
40 layers like the originals, so that every layer_range stays as written; the Mistral-7B ones:
Mistral), everything else in the file is kept. Used by mergekit_equivalence.py --examples."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from raymerge.synthetic import llama_config, write_base, write_finetune

EXAMPLES = Path(__file__).parent / "mergekit_examples"
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=40, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=256)
MISTRAL = dict(LLAMA, num_hidden_layers=8, num_key_value_heads=2)
# Hub id in the examples -> (family, fine-tune seed; None: the family's base)
MODELS = {
    "TheBloke/Llama-2-13B-fp16": ("llama", None),
    "psmathur/orca_mini_v3_13b": ("llama", 0),
    "garage-bAInd/Platypus2-13B": ("llama", 1),
    "WizardLM/WizardLM-13B-V1.2": ("llama", 2),
    "WizardLM/WizardMath-13B-V1.0": ("llama", 3),
    "model_a": ("llama", 4),
    "model_b": ("llama", 5),
    "mistralai/Mistral-7B-v0.1": ("mistral", None),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", 0),
    "BioMistral/BioMistral-7B": ("mistral", 1),
}


def family_config(family: str) -> dict:
    if family == "llama":
        return llama_config(dtype="float16", **LLAMA)
    config = llama_config(dtype="float16", **MISTRAL)
    return {**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "sliding_window": None}


def local_model(work: Path, hub_id: str) -> Path:
    """The local checkpoint standing for `hub_id` (made on first use, float16 as the originals
    are stored)."""
    family, seed = MODELS[hub_id]
    base = work / f"{family}-base"
    if not (base / "config.json").exists():
        write_base(base, family_config(family))
    if seed is None:
        return base
    path = work / f"{family}-ft-{seed}"
    if not (path / "config.json").exists():
        write_finetune(base, path, seed=seed, strength=0.2, noise=0.01)
    return path


def rewritten(name: str, work: Path, dtype: str | None = None) -> dict:
    """Example `name` (its file name without .yml) with every model on a local checkpoint;
    with `dtype`, its dtype replaced (float32: mergekit computes in float32, as raymerge
    does, which separates the mapping from the precision of the computation)."""
    config = yaml.safe_load((EXAMPLES / f"{name}.yml").read_text())
    if dtype is not None:
        config["dtype"] = dtype

    def local(value):
        if isinstance(value, dict):
            return {key: (str(local_model(work, item)) if key in ("model", "base_model")
                          and isinstance(item, str) else local(item))
                    for key, item in value.items()}
        if isinstance(value, list):
            return [local(item) for item in value]
        return value

    return local(config)


def example_names() -> list[str]:
    return sorted(path.stem for path in EXAMPLES.glob("*.yml"))


def compare_outputs(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Whole-output comparison, for layouts with no base to take deltas from: tensor names,
    how many tensors are the same bytes, max ‖W_raymerge − W_mergekit‖ / ‖W_mergekit‖ over
    tensors, and the largest entry difference in ulps of the output dtype at the tensor's
    largest |W_mergekit| entry."""
    if sorted(ours) != sorted(theirs):
        missing = sorted(set(theirs) ^ set(ours))
        return {"same_names": False, "names_differing": missing[:5]}
    identical, worst, worst_tensor, worst_ulps = 0, 0.0, "", 0.0
    for name, reference in theirs.items():
        mine = ours[name]
        if mine.dtype == reference.dtype and torch.equal(mine, reference):
            identical += 1
            continue
        difference = (mine.double() - reference.double())
        relative = float(difference.norm()) / max(float(reference.double().norm()), 1e-30)
        # one ulp of the output dtype at the tensor's largest |W| (near-zero entries, where a
        # sum rounded in another order moves by many of their own tiny ulps, do not dominate)
        ulp = 2.0 ** -_mantissa_bits(reference.dtype) * float(reference.double().abs().max())
        worst_ulps = max(worst_ulps, float(difference.abs().max()) / max(ulp, 1e-300))
        if relative > worst:
            worst, worst_tensor = relative, name
    return {"same_names": True, "tensors": len(theirs), "identical_tensors": identical,
            "max_relative_difference": worst, "tensor": worst_tensor,
            "max_difference_in_ulps_of_output_dtype": worst_ulps}


def _mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[dtype]
