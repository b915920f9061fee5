"""Fine-tunes with added tokens: the `tokenizer` key re-indexes every vocabulary-indexed tensor
into the output vocabulary (base, union or a source's), tokens matched by their strings, each
row as the dense float64 reference of the definition gives it; the output's tokenizer encodes
the new tokens to those rows and transformers loads the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from helpers import assert_merged_close, load_tensors, manifest, published, write_recipe
from reference import reference_merge
from safetensors.torch import save_file
from vocabulary_models import (
    BASE_TEMPLATE,
    CHATML,
    VOCABULARY_TENSORS,
    add_tokens_to_finetune,
    pad_vocabulary,
    reference_rows,
    save_tied_llama,
    token_ids,
)

from raymerge.cli import main
from raymerge.errors import SourceError
from raymerge.execute import merge_unit
from raymerge.merge import _job, prepare
from raymerge.output.files import copy_checkpoint_files, remap_token_ids
from raymerge.output.tokenizer import write_tokenizer
from raymerge.progress import format_vocabulary
from raymerge.recipe import recipe_from_dict
from raymerge.synthetic import write_finetune
from raymerge.vocabulary import TokenTable, build_output_vocabulary, runs_of, vocabulary_tensors

WEIGHTS = [1.0, 0.5, 0.75]
SETTINGS = {"scale": 0.8, "density": 0.5, "p": 0.3, "seed": 3}


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict:
    """A base (96 tokens, a chat template in chat_template.jinja, no pad token) and three
    fine-tunes: `a` added <|im_start|> and <|im_end|> (its pad token, and a ChatML template),
    `b` added <|im_end|> and <tool>, `c` kept the base's vocabulary and has no tokenizer."""
    root = tmp_path_factory.mktemp("chat")
    base = save_tiny_llama(root / "base", torch.float32)
    (base / "chat_template.jinja").write_text(BASE_TEMPLATE)
    return {
        "base": base,
        "a": add_tokens_to_finetune(base, root / "a", 1, ["<|im_start|>", "<|im_end|>"],
                                    chat_template=CHATML, pad_token="<|im_end|>"),
        "b": add_tokens_to_finetune(base, root / "b", 2, ["<|im_end|>", "<tool>"]),
        "c": write_finetune(base, root / "c", seed=3, strength=0.2, noise=0.01),
    }


def recipe_of(family: dict, out: Path, method: str = "task_arithmetic", **keys) -> dict:
    settings = {key: value for key, value in SETTINGS.items()
                if key in {"task_arithmetic": ("scale",), "ties": ("scale", "density"),
                           "dare": ("scale", "p", "seed")}[method]}
    return {"base": str(family["base"]),
            "sources": [{"path": str(family[k]), "weight": w} for k, w in zip("abc", WEIGHTS)],
            "method": {"name": method, **settings}, "output": {"path": str(out)}, **keys}


def merged_without_ray(recipe: dict):
    """prepare() and every unit through merge_unit, in this process: the merged tensors."""
    prepared = prepare(recipe_from_dict(recipe))
    job, tensors = _job(prepared), {}
    for unit in prepared.plan.units:
        _, payload = merge_unit(job, unit)
        tensors.update({name: torch.from_numpy(array) for name, array in
                        payload["tensors"].items()})
    return prepared, tensors


def expected_tensor(family: dict, name: str, output_ids: dict[str, int], rows: int,
                    method: str, base_tokens: int = 96) -> torch.Tensor:
    base = load_tensors(family["base"])[name]
    sources = [load_tensors(family[k])[name] for k in "abc"]
    ids = [token_ids(family[k]) if (family[k] / "tokenizer.json").exists()
           else token_ids(family["base"]) for k in "abc"]
    out_base, out_sources = reference_rows(base, token_ids(family["base"]), base_tokens,
                                           sources, ids, output_ids, rows)
    return reference_merge(method, out_base, out_sources, WEIGHTS, name=name, **SETTINGS)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_union_keeps_every_added_token_with_the_rows_of_the_sources_that_have_it(
        chat, tmp_path, method):
    prepared, merged = merged_without_ray(recipe_of(chat, tmp_path / "out", method,
                                                    tokenizer={"source": "union"}))
    vocabulary = prepared.vocabulary
    assert vocabulary.summary()["added_tokens"] == ["<|im_start|>", "<|im_end|>", "<tool>"]
    assert [vocabulary.tokens[t] for t in ("<|im_start|>", "<|im_end|>", "<tool>")] == [96, 97, 98]
    assert vocabulary.rows == 99
    for name in VOCABULARY_TENSORS:
        assert merged[name].shape == (99, 32)
        expected = expected_tensor(chat, name, vocabulary.tokens, 99, method)
        assert_merged_close(merged[name], expected.float(), name)
    if method == "task_arithmetic":  # a token only `a` has: the base's row is a's, Δ_a = 0
        a_rows = load_tensors(chat["a"])
        for name in VOCABULARY_TENSORS:
            assert torch.equal(merged[name][96], a_rows[name][96])
    other = "model.layers.1.mlp.up_proj.weight"  # not vocabulary-indexed: merged as before
    expected = reference_merge(method, load_tensors(chat["base"])[other],
                               [load_tensors(chat[k])[other] for k in "abc"], WEIGHTS,
                               name=other, **SETTINGS)
    assert_merged_close(merged[other], expected.float(), other)


def test_pad_to_multiple_of_pads_with_the_mean_of_the_base_token_rows(chat, tmp_path):
    prepared, merged = merged_without_ray(recipe_of(
        chat, tmp_path / "out", tokenizer={"source": "union", "pad_to_multiple_of": 64}))
    assert prepared.vocabulary.rows == 128
    base = load_tensors(chat["base"])
    for name in VOCABULARY_TENSORS:
        assert merged[name].shape == (128, 32)
        mean = base[name].double().mean(0)
        torch.testing.assert_close(merged[name][99:].double(), mean.expand(29, 32),
                                   rtol=1e-5, atol=1e-6)
        expected = expected_tensor(chat, name, prepared.vocabulary.tokens, 128,
                                   "task_arithmetic")
        assert_merged_close(merged[name], expected.float(), name)


def test_base_vocabulary_drops_the_added_tokens_and_says_so(chat, tmp_path):
    prepared, merged = merged_without_ray(recipe_of(chat, tmp_path / "out",
                                                    tokenizer={"source": "base"}))
    summary = prepared.vocabulary.summary()
    assert summary["rows"] == 96 and summary["added_tokens"] == []
    assert summary["dropped_tokens"] == {str(chat["a"]): 2, str(chat["b"]): 2}
    assert format_vocabulary(summary) == (f"base: 96 tokens in 96 rows; 2 tokens of {chat['a']} "
                                          f"dropped; 2 tokens of {chat['b']} dropped")
    for name in VOCABULARY_TENSORS:
        expected = expected_tensor(chat, name, token_ids(chat["base"]), 96, "task_arithmetic")
        assert merged[name].shape == (96, 32)
        assert_merged_close(merged[name], expected.float(), name)


def test_a_source_path_gives_that_source_s_vocabulary(chat, tmp_path):
    prepared, merged = merged_without_ray(recipe_of(chat, tmp_path / "out",
                                                    tokenizer={"source": str(chat["a"])}))
    assert prepared.vocabulary.tokens == token_ids(chat["a"])
    assert prepared.vocabulary.summary()["dropped_tokens"] == {str(chat["b"]): 1}  # <tool>
    assert prepared.tokenizer_directory == chat["a"]
    for name in VOCABULARY_TENSORS:
        expected = expected_tensor(chat, name, token_ids(chat["a"]), 98, "task_arithmetic")
        assert_merged_close(merged[name], expected.float(), name)


def test_plan_shows_the_output_vocabulary(chat, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_of(chat, tmp_path / "out",
                                                          tokenizer={"source": "union"}))
    assert main(["plan", str(recipe)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "vocabulary: union: 99 tokens in 99 rows, 3 added (<|im_start|>, <|im_end|>, <tool>)")


def test_differing_vocabularies_without_the_key_name_both_choices(chat, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_of(chat, out))
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and published(out) == []
    assert f"source {chat['a']}: vocabulary size 98 differs from the base's 96" in error
    assert "tokenizer: {source: union} to keep its new tokens" in error
    assert "tokenizer: {source: base} to drop them" in error


def test_padded_embeddings_padding_rows_are_not_tokens(tmp_path):
    """A base padded to 128 rows (96 tokens); `p` added 2 tokens inside the padding (still 128
    rows), `q` fine-tuned every row, padding included, and has no tokenizer."""
    base = pad_vocabulary(save_tiny_llama(tmp_path / "base", torch.float32), 128)
    p = add_tokens_to_finetune(base, tmp_path / "p", 1, ["<a>", "<b>"], rows=128)
    q = write_finetune(base, tmp_path / "q", seed=2, strength=0.2, noise=0.01)
    recipe = {"base": str(base), "sources": [str(p), str(q)], "output": {"path": "unused"}}
    with pytest.raises(SourceError, match=r"its tokenizer differs from the base's \(2 tokens "
                                          r"the base lacks, e.g. '<a>'\); set tokenizer"):
        prepare(recipe_from_dict(recipe))
    prepared, merged = merged_without_ray({**recipe, "tokenizer": {"source": "union"}})
    assert (prepared.vocabulary.rows, len(prepared.vocabulary.tokens)) == (128, 98)
    base_tensors, p_tensors = load_tensors(base), load_tensors(p)
    q_tensors = load_tensors(q)
    for name in VOCABULARY_TENSORS:
        # the new tokens: only p has them, so base row = p's and Δ_p = 0 there
        assert torch.equal(merged[name][96:98], p_tensors[name][96:98])
        # padding: the base's own padding rows; q's trained padding rows do not leak in
        assert torch.equal(merged[name][98:], base_tensors[name][98:])
        assert not torch.equal(q_tensors[name][98:], base_tensors[name][98:])
        out_base, out_sources = reference_rows(
            base_tensors[name], token_ids(base), 96, [p_tensors[name], q_tensors[name]],
            [token_ids(p), token_ids(base)], prepared.vocabulary.tokens, 128)
        expected = reference_merge("task_arithmetic", out_base, out_sources, [1.0, 1.0])
        assert_merged_close(merged[name], expected.float(), name)
    padded = merged_without_ray({**recipe, "tokenizer": {"source": "union",
                                                         "pad_to_multiple_of": 48}})[0]
    assert padded.vocabulary.rows == 144


def test_a_lora_head_adapter_is_reindexed_onto_the_output_vocabulary(chat, tmp_path):
    """An adapter has the base's vocabulary: its lm_head delta lands on the base tokens' rows,
    zero on the new ones."""
    generator = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, 32, generator=generator), torch.randn(96, 2, generator=generator)
    adapter = tmp_path / "lora"
    adapter.mkdir()
    save_file({"base_model.model.lm_head.lora_A.weight": down,
               "base_model.model.lm_head.lora_B.weight": up}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lm_head"]}))
    recipe = {"base": str(chat["base"]), "sources": [str(chat["a"]), str(adapter)],
              "tokenizer": {"source": "union"}, "output": {"path": "unused"}}
    prepared, merged = merged_without_ray(recipe)
    name = "lm_head.weight"
    base = load_tensors(chat["base"])[name]
    ids = token_ids(chat["a"])
    out_base, (out_a, out_lora) = reference_rows(
        base, token_ids(chat["base"]), 96, [load_tensors(chat["a"])[name], base],
        [ids, token_ids(chat["base"])], prepared.vocabulary.tokens, 98)
    out_lora[:96] += 2.0 * up.double() @ down.double()  # s = alpha / r; rows 96, 97: no delta
    expected = reference_merge("task_arithmetic", out_base, [out_a, out_lora], [1.0, 1.0])
    assert_merged_close(merged[name], expected.float(), name)


def test_an_adapter_that_adds_tokens_is_refused(chat, tmp_path):
    adapter = tmp_path / "lora"
    adapter.mkdir()
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(96, 2)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(chat["a"] / name, adapter / name)
    recipe = recipe_from_dict({"base": str(chat["base"]), "sources": [str(adapter)],
                               "tokenizer": {"source": "union"}})
    with pytest.raises(SourceError, match="the adapter's tokenizer adds 2 tokens to the base's "
                                          r"\(e.g. '<\|im_start\|>'\)"):
        prepare(recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**config, "trainable_token_indices": [96, 97]}))
    with pytest.raises(SourceError, match="adapter uses trainable_token_indices, which raymerge "
                                          "does not merge"):
        prepare(recipe)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 96),
               "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(32, 2)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(SourceError, match="is a LoRA factor of an embedding layer, which "
                                          "raymerge does not merge"):
        prepare(recipe)


@pytest.mark.parametrize("style", ["jinja", "config"])
@pytest.mark.parametrize("choice", ["base", "a", "jinja"])
def test_chat_template_from_the_base_a_source_or_the_recipe(chat, tmp_path, choice, style):
    """Stored where the base stores its own: chat_template.jinja, or tokenizer_config.json."""
    base = chat["base"]
    if style == "config":
        base = tmp_path / "base"
        shutil.copytree(chat["base"], base)
        (base / "chat_template.jinja").unlink()
        config = json.loads((base / "tokenizer_config.json").read_text())
        (base / "tokenizer_config.json").write_text(json.dumps(
            {**config, "chat_template": BASE_TEMPLATE}))
    template = "{{ messages[0]['content'] }}!"
    value = {"base": "base", "a": str(chat["a"]), "jinja": template}[choice]
    expected = {"base": BASE_TEMPLATE, "a": CHATML, "jinja": template}[choice]
    prepared = prepare(recipe_from_dict({**recipe_of({**chat, "base": base}, tmp_path / "o"),
                                         "tokenizer": {"source": "union"},
                                         "chat_template": value}))
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(out, prepared.tokenizer_directory, prepared.vocabulary,
                    prepared.tokenizer_json, prepared.chat_template)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == expected
    config = json.loads((out / "tokenizer_config.json").read_text())
    if style == "jinja":
        assert (out / "chat_template.jinja").read_text() == expected
        assert "chat_template" not in config
    else:
        assert config["chat_template"] == expected and not (out / "chat_template.jinja").exists()


def test_a_chat_template_that_is_none_of_the_forms_is_refused(chat):
    from raymerge.errors import RecipeError

    with pytest.raises(RecipeError, match="chat_template: 'chatml' is none of base, auto, a "
                                          "source's path as written in sources, or a Jinja "
                                          "template"):
        recipe_from_dict({**recipe_of(chat, Path("o")), "chat_template": "chatml"})
    with pytest.raises(SourceError, match=f"chat_template: {chat['c']} has no chat template"):
        prepare(recipe_from_dict({**recipe_of(chat, Path("o")), "tokenizer": {"source": "union"},
                                  "chat_template": str(chat["c"])}))


def test_checkpoint_files_beside_the_weights_are_copied(tmp_path):
    base, out = tmp_path / "base", tmp_path / "out"
    files = ["model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "training_args.bin", "config.json", "README.md",
             ".gitattributes", ".cache/huggingface/x.lock", "tokenizer.json", "vocab.txt",
             "generation_config.json", "modules.json", "sentence_bert_config.json",
             "config_sentence_transformers.json", "1_Pooling/config.json",
             "2_Dense/config.json", "2_Dense/model.safetensors", "onnx/model.onnx",
             "openvino/openvino_model.xml", "model.gguf", "preprocessor_config.json",
             "processor_config.json", "modeling_custom.py", "raymerge_manifest.json",
             "spectral_factors/index.json"]
    for name in files:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(name)
    out.mkdir()
    copied = copy_checkpoint_files(base, out)
    assert copied == ["1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
                      "config_sentence_transformers.json", "generation_config.json",
                      "modeling_custom.py", "modules.json", "preprocessor_config.json",
                      "processor_config.json", "sentence_bert_config.json"]
    assert all((out / name).read_text() == name for name in copied)


def test_vocabulary_tensors_are_found_by_role_and_size():
    from raymerge.sources.checkpoint import Checkpoint
    from raymerge.sources.safetensors_header import TensorInfo

    shapes = {"model.embed_tokens.weight": (100, 8), "lm_head.weight": (8, 100),
              "lm_head.bias": (100,), "model.layers.0.mlp.up_proj.weight": (100, 8),
              "model.norm.weight": (8,)}
    checkpoint = Checkpoint("x", Path("."), {n: TensorInfo(n, "F32", s, "f")
                                             for n, s in shapes.items()},
                            config={"vocab_size": 100})
    assert vocabulary_tensors(checkpoint) == {"model.embed_tokens.weight": 0,
                                              "lm_head.weight": 1, "lm_head.bias": 0}


def test_union_order_and_runs():
    base = TokenTable({"a": 0, "b": 1, "c": 2})
    first, second = TokenTable({"a": 0, "b": 1, "c": 2, "x": 3}), TokenTable({"c": 0, "y": 1,
                                                                               "x": 2, "a": 3})
    vocabulary = build_output_vocabulary("union", base, 4, [first, second], [4, 4],
                                         ["first", "second"], {"e": 0})
    assert vocabulary.tokens == {"a": 0, "b": 1, "c": 2, "x": 3, "y": 4}
    assert vocabulary.rows == 5  # more tokens than the base's 4 rows: unpadded
    reindexing = vocabulary.reindexing
    assert reindexing.base_tokens == ((0, 0, 3),)
    assert reindexing.new_tokens == ((3, ((0, 3), (1, 2))), (4, ((1, 1),)))
    assert reindexing.sources == (((0, 0, 4),), ((0, 3, 1), (2, 0, 1), (3, 2, 1), (4, 1, 1)))
    assert runs_of([(0, 5), (1, 6), (2, 9), (4, 10)]) == ((0, 5, 2), (2, 9, 1), (4, 10, 1))
    same = build_output_vocabulary("union", base, 4, [base, None], [4, None], ["s", "l"], {})
    assert same.reindexing is None  # nothing to re-index: merged row by row, as before


def test_union_merge_loads_in_transformers_and_encodes_the_new_tokens(ray_cluster, chat,
                                                                      tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_of(
        chat, out, tokenizer={"source": "union", "pad_to_multiple_of": 64},
        chat_template=str(chat["a"])))
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("<|im_start|> w1 <tool> <|im_end|>")["input_ids"] == [96, 1, 98, 97]
    assert tokenizer.chat_template == CHATML
    assert {"<|im_start|>", "<|im_end|>", "<tool>"} <= set(tokenizer.all_special_tokens)
    assert tokenizer.pad_token == "<|im_end|>"  # a role the base lacks, from the first source
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 128
    model = LlamaForCausalLM.from_pretrained(out)
    merged = load_tensors(out)
    assert torch.equal(model.get_input_embeddings().weight.detach(),
                       merged["model.embed_tokens.weight"])
    expected = expected_tensor(chat, "lm_head.weight", tokenizer.get_vocab(), 128,
                               "task_arithmetic")
    assert_merged_close(merged["lm_head.weight"], expected.float(), "lm_head.weight")
    logits = model(torch.tensor([[96, 1, 98, 97]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
    facts = manifest(out)
    assert facts["summary"]["vocabulary"]["added_tokens"] == ["<|im_start|>", "<|im_end|>",
                                                              "<tool>"]
    assert facts["files"]["tokenizer"]["chat_template"] == str(chat["a"])
    assert "tokenizer.json" in facts["files"]["tokenizer"]["files"]


def test_tied_embeddings_are_reindexed(ray_cluster, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    base = save_tied_llama(tmp_path / "base")
    source = add_tokens_to_finetune(base, tmp_path / "ft", 1, ["<tool>"])
    assert "lm_head.weight" not in load_tensors(base)
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "r.yaml", {
        "base": str(base), "sources": [str(source)], "tokenizer": {"source": "union"},
        "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    merged, tuned = load_tensors(out), load_tensors(source)
    name = "model.embed_tokens.weight"
    assert set(merged) == set(load_tensors(base)) and merged[name].shape == (97, 32)
    assert torch.equal(merged[name][96], tuned[name][96])  # only the fine-tune has <tool>
    torch.testing.assert_close(merged[name][:96], tuned[name][:96])  # Δ of one source, λ = 1
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    ids = AutoTokenizer.from_pretrained(out)("w3 <tool>")["input_ids"]
    assert ids == [3, 96] and torch.isfinite(model(torch.tensor([ids])).logits).all()


def _word_level_checkpoint(directory: Path, words: list[str], tensors: dict) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    directory.mkdir()
    Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])).save(
        str(directory / "tokenizer.json"))
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"vocab_size": len(words)}))
    return directory


def test_a_vocabulary_on_another_axis_read_in_small_slices(tmp_path, monkeypatch):
    """A head stored as hidden × vocabulary (axis 1) and a bias, re-indexed a few elements at a
    time (the reading chunk shrunk to 8 elements)."""
    import raymerge.execute

    monkeypatch.setattr(raymerge.execute, "READ_CHUNK_ELEMENTS", 8)
    generator = torch.Generator().manual_seed(0)

    def tensors(vocab: int) -> dict:
        return {"embed_tokens.weight": torch.randn(vocab, 5, generator=generator),
                "lm_head.weight": torch.randn(5, vocab, generator=generator),
                "lm_head.bias": torch.randn(vocab, generator=generator)}

    base_words, source_words = ["u", "a", "b", "c", "d", "e"], ["u", "b", "a", "x", "c", "d", "e"]
    base = _word_level_checkpoint(tmp_path / "base", base_words, tensors(6))
    source = _word_level_checkpoint(tmp_path / "source", source_words, tensors(7))
    prepared, merged = merged_without_ray({"base": str(base), "sources": [str(source)],
                                           "method": {"name": "task_arithmetic", "scale": 0.5},
                                           "tokenizer": {"source": "union"}})
    assert prepared.vocabulary.reindexing.axes == {"embed_tokens.weight": 0,
                                                   "lm_head.weight": 1, "lm_head.bias": 0}
    output_ids = prepared.vocabulary.tokens
    assert output_ids == {**{w: i for i, w in enumerate(base_words)}, "x": 6}
    base_tensors, source_tensors = load_tensors(base), load_tensors(source)
    ids = [{w: i for i, w in enumerate(base_words)}, {w: i for i, w in enumerate(source_words)}]
    for name, axis in prepared.vocabulary.reindexing.axes.items():
        out_base, (out_source,) = reference_rows(base_tensors[name].movedim(axis, 0), ids[0], 6,
                                                 [source_tensors[name].movedim(axis, 0)],
                                                 ids[1:], output_ids, 7)
        expected = reference_merge("task_arithmetic", out_base, [out_source], [1.0], scale=0.5)
        assert_merged_close(merged[name], expected.movedim(0, axis).float(), name)
    # the source's vocabulary: a and b swap ids, so the config's token ids follow them
    chosen = prepare(recipe_from_dict({"base": str(base), "sources": [str(source)],
                                       "tokenizer": {"source": str(source)}})).vocabulary
    assert chosen.moved_ids == {1: 2, 2: 1, 3: 4, 4: 5, 5: 6}
    config = {"bos_token_id": 1, "eos_token_id": [2, 0], "text_config": {"pad_token_id": 5},
              "vocab_size": 6}
    assert remap_token_ids(config, chosen.moved_ids.get) == {
        "bos_token_id": 2, "eos_token_id": [1, 0], "text_config": {"pad_token_id": 6},
        "vocab_size": 6}


def test_the_submission_id_names_the_vocabulary_source_by_its_identity():
    from raymerge.identity import recipe_digest

    def digest(prefix: str) -> str:
        recipe = recipe_from_dict({"base": f"{prefix}/b", "sources": [f"{prefix}/x"],
                                   "tokenizer": {"source": f"{prefix}/x"},
                                   "chat_template": f"{prefix}/x"})
        return recipe_digest(recipe, {f"{prefix}/b": "sha256:B", f"{prefix}/x": "sha256:X"})

    assert digest("/here") == digest("/moved")  # moving the directories changes nothing
    plain = {"base": "b", "sources": ["x"]}
    assert recipe_digest(recipe_from_dict(plain)) != recipe_digest(
        recipe_from_dict({**plain, "tokenizer": {"source": "union"}}))


def test_union_lists_the_new_tokens_where_the_base_lists_its_own(chat, tmp_path):
    """A base saved the transformers-4 way (added_tokens_decoder, special_tokens_map.json,
    added_tokens.json): the appended tokens are listed in each, with their attributes."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(chat["base"], base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    unk = {"content": "[UNK]", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}
    (base / "tokenizer_config.json").write_text(json.dumps(
        {**config, "added_tokens_decoder": {"95": unk}}))
    (base / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]"}))
    (base / "added_tokens.json").write_text(json.dumps({}))
    prepared = prepare(recipe_from_dict({**recipe_of({**chat, "base": base}, tmp_path / "o"),
                                         "tokenizer": {"source": "union"}}))
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(out, prepared.tokenizer_directory, prepared.vocabulary,
                    prepared.tokenizer_json, prepared.chat_template)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["96"] == {**unk, "content": "<|im_start|>"}
    assert sorted(config["added_tokens_decoder"]) == ["95", "96", "97", "98"]
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>", "<tool>"]
    assert config["pad_token"] == "<|im_end|>"
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {"unk_token": "[UNK]", "pad_token": "<|im_end|>",
                       "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<tool>"]}
    assert json.loads((out / "added_tokens.json").read_text()) == {
        "<|im_start|>": 96, "<|im_end|>": 97, "<tool>": 98}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w2 <tool>")["input_ids"] == [2, 98] and tokenizer.pad_token_id == 97
