"""Llama-shaped checkpoints and synthetic fine-tunes of them, for the demo, tests and benchmarks.

A fine-tune's delta is low rank plus noise on every matrix (the structure real fine-tunes have,
which the spectral methods rely on) and small noise on vectors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from raymerge.dtypes import RECIPE_TO_CODE, is_integer_code
from raymerge.tensor_bits import TORCH_DTYPES

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)
LLAMA_150M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, vocab_size=32000)


def llama_config(dtype: str = "float32", **dims: int) -> dict:
    dims = {**TINY, **dims}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        **dims,
    }


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden)
    }
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inner, hidden),
            prefix + "mlp.up_proj.weight": (inner, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inner),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def write_base(directory: str | Path, config: dict, seed: int = 0,
               max_shard_bytes: int | None = None) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in llama_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * shape[-1] ** -0.5
    dtype = TORCH_DTYPES[RECIPE_TO_CODE[config.get("torch_dtype", "float32")]]
    tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    return _save(Path(directory), config, tensors, max_shard_bytes)


def write_finetune(base_directory: str | Path, directory: str | Path, seed: int,
                   rank: int = 4, strength: float = 0.05, noise: float = 0.002,
                   max_shard_bytes: int | None = None) -> Path:
    """base + (low-rank + noise) delta, with the base's config and dtypes; integer and boolean
    tensors unchanged."""
    from raymerge.sources.checkpoint import Checkpoint, read_tensor

    base = Checkpoint.open(str(base_directory), Path(base_directory))
    generator = torch.Generator().manual_seed(10_000 + seed)
    tensors = {}
    for name, info in base.tensors.items():
        if is_integer_code(info.dtype):  # position ids, masks: a fine-tune keeps them
            tensors[name] = read_tensor(info)
            continue
        weight = read_tensor(info).float()
        if weight.dim() == 2:
            rows, cols = weight.shape
            left = torch.randn(rows, rank, generator=generator)
            right = torch.randn(rank, cols, generator=generator)
            delta = strength * (left @ right) / (rank * cols) ** 0.5
            delta += noise * torch.randn(weight.shape, generator=generator)
        else:
            delta = noise * torch.randn(weight.shape, generator=generator)
        tensors[name] = (weight + delta).to(TORCH_DTYPES[info.dtype])
    return _save(Path(directory), base.config, tensors, max_shard_bytes)


def write_family(root: str | Path, config: dict, count: int,
                 max_shard_bytes: int = 2**30) -> tuple[Path, list[Path]]:
    """A base of this config under root/base and `count` fine-tunes under root/ft-<i> (seed i),
    each written only where it is missing: (the base's directory, the fine-tunes')."""
    root = Path(root)
    base = root / "base"
    if not (base / "config.json").exists():
        write_base(base, config, max_shard_bytes=max_shard_bytes)
    sources = [root / f"ft-{index}" for index in range(count)]
    for index, path in enumerate(sources):
        if not (path / "config.json").exists():
            write_finetune(base, path, seed=index, max_shard_bytes=max_shard_bytes)
    return base, sources


def _save(directory: Path, config: dict, tensors: dict[str, torch.Tensor],
          max_shard_bytes: int | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if max_shard_bytes is None:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory
