"""A matrix of architectures: tiny random checkpoints of every family users merge, built offline
from `transformers` config classes, each with 3 synthetic fine-tunes, merged through `raymerge
merge` with TIES and with AXIS + SVC; every output tensor equals the dense float64 reference, and
the output loads back with its Auto class and runs forward.

raymerge knows no architecture: roles come from name patterns (raymerge/roles.py). What each
family exercises: tied embeddings (no lm_head in the file), an integer buffer (BERT's
position_ids), vision towers beside a language model (LLaVA, Gemma 3), MoE routers and per-expert
matrices (Mixtral, Qwen-MoE, DeepSeek-V3), 3-D expert stacks (GPT-OSS), fused projections
(Phi-3's qkv_proj, GPT-2's transposed Conv1D, Falcon's query_key_value), MLA low-rank
projections (DeepSeek-V3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import assert_merged_close, load_tensors, manifest, write_recipe
from reference import reference_merge
from reference_spectral import reference_spectral, spectral_role
from safetensors.torch import save_file

from raymerge.cli import main
from raymerge.roles import DEFAULT_EXCLUDE, is_vocabulary_role
from raymerge.synthetic import write_finetune

transformers = pytest.importorskip("transformers")

VOCAB = 96
WEIGHTS = [1.0, 0.5, 0.75]  # exactly representable (tests/test_merge_end_to_end.py)
TIES = {"name": "ties", "density": 0.5}
AXIS_K = 0.25
SVC_ALPHA = 1 / len(WEIGHTS)  # alpha: auto after AXIS is 1/N
TOKENS = [[1, 5, 9, 3]]
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=False)


@dataclass(frozen=True)
class Architecture:
    name: str
    config: str  # transformers config class
    model: str  # the class that builds (and saves) the random base
    settings: dict = field(default_factory=dict)
    loader: str = "AutoModelForCausalLM"  # the class that loads the merge back
    exercises: str = ""
    integer_buffer: str | None = None  # an I64 tensor added to the file when transformers omits it
    tied: bool = False  # the output head is the input embedding: the file has no head
    image_tokens: int = 0  # an image-text model: the image's tokens in the prompt


MOE = dict(num_experts_per_tok=2)
ARCHITECTURES = [
    Architecture("llama", "LlamaConfig", "LlamaForCausalLM", DECODER),
    Architecture("llama-tied", "LlamaConfig", "LlamaForCausalLM",
                 {**DECODER, "tie_word_embeddings": True}, tied=True),
    Architecture("mistral", "MistralConfig", "MistralForCausalLM", DECODER),
    Architecture("qwen2", "Qwen2Config", "Qwen2ForCausalLM", DECODER, exercises="q/k/v biases"),
    Architecture("qwen3", "Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 8},
                 exercises="q/k norms"),
    Architecture("gemma", "GemmaConfig", "GemmaForCausalLM", {**DECODER, "head_dim": 8,
                                                             "tie_word_embeddings": True},
                 tied=True),
    Architecture("gemma2", "Gemma2Config", "Gemma2ForCausalLM", {**DECODER, "head_dim": 8,
                                                               "tie_word_embeddings": True},
                 exercises="pre/post feed-forward norms", tied=True),
    Architecture("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
                 {**DECODER, "head_dim": 8, "tie_word_embeddings": True},
                 exercises="q/k norms, gemma3_text", tied=True),
    Architecture("phi", "PhiConfig", "PhiForCausalLM", DECODER,
                 exercises="biases, lm_head.bias (vocabulary-indexed)"),
    Architecture("phi3", "Phi3Config", "Phi3ForCausalLM", {**DECODER, "pad_token_id": 0},
                 exercises="fused qkv_proj and gate_up_proj"),
    Architecture("gpt2", "GPT2Config", "GPT2LMHeadModel",
                 dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
                 exercises="transformer.h blocks, Conv1D [in, out] weights, wte/wpe",
                 tied=True),
    Architecture("falcon", "FalconConfig", "FalconForCausalLM",
                 dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4), exercises="word_embeddings, query_key_value",
                 tied=True),
    Architecture("olmo2", "Olmo2Config", "Olmo2ForCausalLM", DECODER,
                 exercises="post-norms only, q/k norms over the full width"),
    Architecture("granite", "GraniteConfig", "GraniteForCausalLM", DECODER,
                 exercises="multipliers in config.json"),
    Architecture("mixtral", "MixtralConfig", "MixtralForCausalLM",
                 {**DECODER, **MOE, "num_local_experts": 4},
                 exercises="router block_sparse_moe.gate, per-expert w1/w2/w3"),
    Architecture("qwen2-moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                 {**DECODER, **MOE, "num_experts": 4, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 24},
                 exercises="router, experts, shared expert and its [1, hidden] gate"),
    Architecture("qwen3-moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 {**DECODER, **MOE, "head_dim": 8, "num_experts": 4,
                  "moe_intermediate_size": 16}),
    Architecture("deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
                 {**DECODER, **MOE, "num_key_value_heads": 4, "moe_intermediate_size": 16,
                  "first_k_dense_replace": 1, "n_routed_experts": 4, "n_shared_experts": 1,
                  "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 8,
                  "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8},
                 exercises="MLA low-rank q/kv projections, a dense then an MoE layer, "
                           "e_score_correction_bias"),
    Architecture("gpt-oss", "GptOssConfig", "GptOssForCausalLM",
                 {**DECODER, **MOE, "intermediate_size": 16, "head_dim": 8,
                  "num_local_experts": 4, "sliding_window": 16},
                 exercises="3-D expert stacks [E, m, n] and [E, n] expert biases, "
                           "attention sinks"),
    Architecture("bert", "BertConfig", "BertModel",
                 dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=48, max_position_embeddings=64),
                 loader="AutoModel", exercises="encoder.layer blocks, I64 position_ids",
                 integer_buffer="embeddings.position_ids"),
    Architecture("llava", "LlavaConfig", "LlavaForConditionalGeneration",
                 dict(vision_config=dict(model_type="clip_vision_model", hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=16, patch_size=8,
                                         projection_dim=16),
                      text_config=dict(model_type="llama", **DECODER),
                      image_token_index=VOCAB - 1),
                 loader="AutoModelForImageTextToText", image_tokens=4,
                 exercises="CLIP vision tower, projector, nested text_config"),
    Architecture("gemma3-vision", "Gemma3Config", "Gemma3ForConditionalGeneration",
                 dict(vision_config=dict(model_type="siglip_vision_model", hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=16, patch_size=8),
                      text_config=dict(model_type="gemma3_text", **{**DECODER, "head_dim": 8,
                                                                  "tie_word_embeddings": True}),
                      mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                      boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2),
                 loader="AutoModelForImageTextToText", image_tokens=4, tied=True,
                 exercises="SigLIP vision tower with its attention-pooling head (a 3-D "
                           "probe), a projection matrix named without .weight"),
]
BY_NAME = {architecture.name: architecture for architecture in ARCHITECTURES}


def _available(architecture: Architecture) -> bool:
    return all(hasattr(transformers, name) for name in (architecture.config, architecture.model,
                                                        architecture.loader))


def _build_base(architecture: Architecture, directory: Path) -> Path:
    settings = architecture.settings
    torch.manual_seed(0)
    config = getattr(transformers, architecture.config)(**settings)
    model = getattr(transformers, architecture.model)(config)
    model.save_pretrained(directory)
    if architecture.integer_buffer:
        _add_integer_buffer(directory / "model.safetensors", architecture.integer_buffer,
                            settings["max_position_embeddings"])
    return directory


def _add_integer_buffer(path: Path, name: str, positions: int) -> None:
    """Recent transformers no longer saves BERT's position_ids buffer; checkpoints on the Hub
    carry it, so the file gets it back (an I64 tensor raymerge copies from the base)."""
    tensors = load_tensors(path.parent)
    if name not in tensors:
        tensors[name] = torch.arange(positions, dtype=torch.int64)[None]
        save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=[a.name for a in ARCHITECTURES])
def family(request, tmp_path_factory) -> dict:
    """The base and 3 fine-tunes of one architecture, shared by both methods."""
    architecture = BY_NAME[request.param]
    if not _available(architecture):
        pytest.skip(f"transformers {transformers.__version__} has no {architecture.model}")
    root = tmp_path_factory.mktemp(architecture.name)
    base = _build_base(architecture, root / "base")
    sources = [write_finetune(base, root / f"ft-{index}", seed=index, strength=0.2, noise=0.01)
               for index in range(len(WEIGHTS))]
    return {"architecture": architecture, "base": base, "sources": sources,
            "tensors": load_tensors(base), "source_tensors": [load_tensors(p) for p in sources]}


def _merge(family: dict, out: Path, method: dict, calibrate: bool) -> dict[str, torch.Tensor]:
    recipe = {
        "base": str(family["base"]),
        "sources": [{"path": str(p), "weight": w} for p, w in zip(family["sources"], WEIGHTS)],
        "method": method,
        "runtime": {"svd": "exact"},
        "output": {"path": str(out)},
    }
    if calibrate:
        recipe["calibrate"] = {"svc": {"alpha": "auto"}}
    assert main(["merge", str(write_recipe(out.parent / "recipe.yaml", recipe)),
                 "--no-progress"]) == 0
    return load_tensors(out)


def _axis_svc_reference(name: str, base: torch.Tensor, sources: list[torch.Tensor]
                        ) -> torch.Tensor:
    """AXIS + SVC as raymerge applies it: matrices (2-D, not excluded by default) and each
    slice of an expert stack (3-D) through the spectral steps; anything else the mean of
    w_i·Δ_i."""
    def one(part_name, part_base, part_sources):
        return reference_spectral("axis", part_name, part_base, part_sources, WEIGHTS, k=AXIS_K,
                                  svc_alpha=SVC_ALPHA, exclude=DEFAULT_EXCLUDE)

    if spectral_role(name, base.shape, DEFAULT_EXCLUDE) == "stack":
        return torch.stack([one(f"{name}[{e}]", base[e], [s[e] for s in sources])
                            for e in range(base.shape[0])])
    return one(name, base, sources)


def _relative_delta_error(merged: torch.Tensor, expected: torch.Tensor,
                          base: torch.Tensor) -> float:
    expected_delta = expected.double() - base.double()
    actual_delta = merged.double() - base.double()
    return float((actual_delta - expected_delta).norm()) / max(float(expected_delta.norm()),
                                                               1e-12)


def _check_loads_and_runs(architecture: Architecture, directory: Path) -> None:
    """Loaded with its Auto class, every parameter from the file (none left at its random
    initialization), forward on a few tokens: finite outputs of the right shape."""
    loader = getattr(transformers, architecture.loader)
    model, info = loader.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], f"{architecture.name}: not in the merge {info['missing_keys']}"
    assert not info["mismatched_keys"], info["mismatched_keys"]
    if architecture.tied:
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        assert head.weight.data_ptr() == embedding.weight.data_ptr(), "the head is not tied"
    model.eval()
    with torch.no_grad():
        if architecture.image_tokens:
            values = _image_text_forward(model, architecture.image_tokens).logits
            assert values.shape == (1, architecture.image_tokens + 4, VOCAB)
        elif architecture.loader == "AutoModel":
            values = model(torch.tensor(TOKENS)).last_hidden_state
            assert values.shape == (1, 4, 32)
        else:
            values = model(torch.tensor(TOKENS)).logits
            assert values.shape == (1, 4, VOCAB)
    assert torch.isfinite(values).all(), architecture.name


def _image_text_forward(model, image_tokens: int):
    """One 16×16 image in the prompt (patches of 8), so the vision tower runs."""
    config = model.config
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    tokens = torch.tensor([[1, *[image_token] * image_tokens, 5, 9, 3]])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model(input_ids=tokens, pixel_values=pixels)


@pytest.mark.parametrize("method", ["ties", "axis+svc"])
def test_architecture_merges_to_the_dense_reference_and_loads(ray_cluster, family, tmp_path,
                                                              method):
    architecture = family["architecture"]
    base, sources = family["tensors"], family["source_tensors"]
    out = tmp_path / "merged"
    if method == "ties":
        merged = _merge(family, out, TIES, calibrate=False)
    else:
        merged = _merge(family, out, {"name": "axis", "k": AXIS_K}, calibrate=True)
    assert set(merged) == set(base)
    errors = {}
    for name, base_tensor in base.items():
        assert merged[name].dtype == base_tensor.dtype, name
        if not base_tensor.is_floating_point():  # integer buffers: the base's values
            assert torch.equal(merged[name], base_tensor), name
            continue
        source_tensors = [source[name] for source in sources]
        if method == "ties":
            expected = reference_merge("ties", base_tensor, source_tensors, WEIGHTS,
                                       density=TIES["density"])
            assert_merged_close(merged[name], expected.to(base_tensor.dtype), name)
        else:
            expected = _axis_svc_reference(name, base_tensor, source_tensors)
            errors[name] = _relative_delta_error(merged[name], expected, base_tensor)
    if errors:
        worst = max(errors, key=errors.get)
        assert errors[worst] < 5e-5, f"{architecture.name} {worst}: relative error " \
                                     f"{errors[worst]:.2e}"
        _check_spectral_roles(base, manifest(out)["tensors"])
    if architecture.integer_buffer:
        assert merged[architecture.integer_buffer].dtype == torch.int64
        assert manifest(out)["summary"]["copied_tensors"] == [architecture.integer_buffer]
    if architecture.tied:
        heads = [name for name in merged if is_vocabulary_role(name)]
        assert len(heads) == 1, f"a tied model's file holds its embedding only, not {heads}"
    _check_loads_and_runs(architecture, out)


def _check_spectral_roles(base: dict[str, torch.Tensor], stats: dict[str, dict]) -> None:
    """The manifest says raymerge took the tensors the reference treats as matrices through
    AXIS and SVC (an expert stack slice by slice), and no other."""
    for name, tensor in base.items():
        role = spectral_role(name, tensor.shape, DEFAULT_EXCLUDE)
        if role == "matrix":
            assert stats[name]["axis_rank"] == max(1, int(AXIS_K * min(tensor.shape))), name
            assert stats[name]["svc_gamma_min"] > 0, name
        elif role == "stack":
            assert stats[name]["expert_slices"] == tensor.shape[0], name
            assert all(stats[f"{name}[{e}]"]["svc_gamma_min"] > 0
                       for e in range(tensor.shape[0])), name
        else:
            assert stats[name].get("axis_rank") is None, name
