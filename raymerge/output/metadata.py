"""What a merge writes beside its shards: the config (dtype, vocabulary, layers), the tokenizer
files, the base's other files, the resolved recipe, the model card, the statistics table and the
manifest, written last."""

from __future__ import annotations

import json
import time
from pathlib import Path

from raymerge.layout import block_stacks, relayered_config
from raymerge.methods import METHODS, statistics_of
from raymerge.methods.calibrated import SVC_PAPER
from raymerge.output.card import model_card
from raymerge.output.files import (
    copy_checkpoint_files,
    module_weights,
    remap_token_ids,
    write_config,
)
from raymerge.output.manifest import describe_checkpoint, library_versions
from raymerge.output.staging import MANIFEST_NAME
from raymerge.output.stats_table import STATS_NAME, manifest_stats, write_stats_table
from raymerge.output.tokenizer import write_tokenizer
from raymerge.recipe import Recipe


def write_metadata(prepared, directory: Path, layout, unit_stats: list[dict], summary: dict,
                   hashes: dict[str, str], identities: dict[str, str]) -> None:
    """Everything beside the shards: config, tokenizer, the base's other files, recipe, model
    card, statistics table and, last, the manifest."""
    recipe, base, vocabulary = prepared.recipe, prepared.base, prepared.vocabulary
    reindexed = vocabulary is not None and vocabulary.reindexing is not None
    token_ids = vocabulary.moved_ids.get if reindexed and vocabulary.moved_ids else None
    write_config(base.directory, directory, {t.output_dtype for t in prepared.plan.tensors},
                 vocabulary_rows=vocabulary.rows if reindexed else None, token_ids=token_ids)
    if prepared.slices is not None and (directory / "config.json").exists():
        (layer_count,) = map(len, block_stacks(base).values())
        config = relayered_config(json.loads((directory / "config.json").read_text()),
                                  layer_count, [n for s in prepared.slices for n in s.layers])
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_files = write_tokenizer(directory, prepared.tokenizer_directory or base.directory,
                                      vocabulary, prepared.tokenizer_json, prepared.chat_template)
    copied = copy_checkpoint_files(base.directory, directory)
    generation_config = directory / "generation_config.json"
    if token_ids is not None and generation_config.exists():  # ids in the output's vocabulary
        generation_config.write_text(json.dumps(remap_token_ids(
            json.loads(generation_config.read_text()), token_ids), indent=2) + "\n")
    summary["copied_files"] = copied
    (directory / "raymerge_recipe.yaml").write_text(recipe.to_yaml())
    revisions = {c.label: c.revision for c in [base, *prepared.sources]}
    method = METHODS[recipe.method.name]
    title, paper = method.title, method.paper
    if recipe.svc_alpha() is not None:
        title, paper = f"{title}, then SVC (α = {recipe.svc_alpha():g})", f"{paper}; {SVC_PAPER}"
    if prepared.slices is not None and all(job.copied for job in prepared.slices):
        title, paper = "passthrough: blocks copied from the layer ranges of slices", ""
    (directory / "README.md").write_text(model_card(recipe, revisions, summary, title, paper))
    tensor_stats = {}
    for stats in sorted(unit_stats, key=lambda s: s["unit"]):
        tensor_stats.update(stats["tensors"])
    statistics = statistics_of(recipe.method.name, recipe.svc_alpha() is not None)
    write_stats_table(directory / STATS_NAME, tensor_stats, statistics)
    manifest = {
        "format": "raymerge-manifest/1",
        "submission_id": summary["submission_id"],
        "created_unix": int(time.time()),
        "versions": library_versions(),
        "method": recipe.method.model_dump(mode="json"),
        "calibration": _calibration(recipe),
        "base": describe_checkpoint(base, hashes),
        "identities": identities,
        "sources": [
            describe_checkpoint(source, hashes, **spec.model_dump(mode="json", exclude={"path"}))
            for source, spec in zip(prepared.sources, recipe.sources)
        ],
        "output": {"shards": [s.file_name for s in layout.shards], "total_size": layout.total_size},
        "files": {
            "tokenizer": {"from": _label_of(prepared, prepared.tokenizer_directory),
                          "files": tokenizer_files,
                          "chat_template": prepared.chat_template.origin
                          if prepared.chat_template else None},
            "copied_from_base": copied,
            "unmerged_module_weights": module_weights(copied),
        },
        "summary": summary,
        "tensors": {name: manifest_stats(stats, statistics)
                    for name, stats in tensor_stats.items()},
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _label_of(prepared, directory: Path | None) -> str:
    for checkpoint in [prepared.base, *prepared.sources]:
        if checkpoint.directory == directory:
            return checkpoint.label
    return prepared.base.label


def _calibration(recipe: Recipe) -> dict | None:
    """SVC's settings as applied: α and where it comes from (auto: the authors' per method)."""
    if recipe.svc_alpha() is None:
        return None
    alpha, rule = recipe.svc_alpha_rule()
    return {"method": "svc", "alpha": alpha, "alpha_rule": rule}
