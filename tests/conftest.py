"""Shared fixtures: one Ray cluster per test session, tiny Llama checkpoints built on the spot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test S3 server's credentials, in the environment before any Ray cluster starts so that
# every worker has them, as every node of a real cluster has its own (pod env, Secret). Its
# endpoint (a port chosen at start) goes in each recipe's `storage: {endpoint: ...}`.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "raymerge-test-admin")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raymerge-test-secret-3f9c")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from raymerge.synthetic import write_finetune  # noqa: E402

pytest_plugins = ["servers.fixtures"]  # s3_server (and hub_server): tests/servers/

TINY_LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  max_position_embeddings=64)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    os.environ["RAYMERGE_CACHE"] = str(tmp_path_factory.mktemp("raymerge-cache"))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20,
             include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def save_tiny_llama(directory: Path, dtype: torch.dtype, seed: int = 0,
                    max_shard_size: str | None = None) -> Path:
    """A real transformers LlamaForCausalLM checkpoint with a word-level tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    vocab = {f"w{i}": i for i in range(TINY_LLAMA["vocab_size"] - 1)} | {"[UNK]": 95}
    word_level = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    tokenizer.save_pretrained(directory)
    return directory


def build_family(root: Path, dtype: str) -> dict:
    """A base (sharded) and 4 fine-tunes (some sharded, some single-file) in one dtype."""
    base = save_tiny_llama(root / "base", getattr(torch, dtype), max_shard_size="20KB")
    sources = []
    for index in range(4):
        shard = 30_000 if index % 2 else None
        sources.append(write_finetune(base, root / f"ft-{index}", seed=index, strength=0.2,
                                      noise=0.01, max_shard_bytes=shard))
    return {"root": root, "base": base, "sources": sources, "dtype": dtype}


@pytest.fixture(scope="session", params=["float32", "bfloat16"])
def tiny_family(request, tmp_path_factory) -> dict:
    return build_family(tmp_path_factory.mktemp(f"family-{request.param}"), request.param)


@pytest.fixture(scope="session")
def float32_family(tmp_path_factory) -> dict:
    return build_family(tmp_path_factory.mktemp("family-f32"), "float32")


@pytest.fixture(scope="session")
def nine_sources(float32_family, tmp_path_factory):
    """The float32 family's base with 9 fine-tunes."""
    root = tmp_path_factory.mktemp("nine")
    extra = [write_finetune(float32_family["base"], root / f"ft-{i}", seed=100 + i, strength=0.2,
                            noise=0.01) for i in range(5)]
    return float32_family["base"], [*float32_family["sources"], *extra]
