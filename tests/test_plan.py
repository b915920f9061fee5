"""Work units and the shard layout, from headers alone."""

from __future__ import annotations

import json

from helpers import write_recipe

from raymerge.cli import main
from raymerge.output.layout import layout_shards
from raymerge.plan import TensorTask, make_plan
from raymerge.sources import Checkpoint


def test_units_follow_transformer_blocks(float32_family):
    base = Checkpoint.open("base", float32_family["base"])
    sources = [Checkpoint.open(str(p), p) for p in float32_family["sources"]]
    plan = make_plan(base, sources, output_dtype=None, state_tensors=4)
    names = [unit.name for unit in plan.units]
    blocks = [name for name in names if name.startswith("model.layers.")]
    assert blocks == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert len(names) > 3, "embeddings, head and final norm live outside the blocks"
    assert {t.name for t in plan.tensors} == set(base.tensors)
    assert len(plan.tensors) == len(base.tensors)
    layer = plan.units[names.index("model.layers.0")]
    assert all(t.name.startswith("model.layers.0.") for t in layer.tensors)
    expected_read = sum(c.tensors[t.name].nbytes for c in [base, *sources] for t in layer.tensors)
    assert layer.read_bytes == expected_read
    assert plan.largest_first()[0].read_bytes == max(u.read_bytes for u in plan.units)
    # the estimate grows with the method's state, not with the number of sources
    small = make_plan(base, sources[:1], output_dtype=None, state_tensors=4)
    assert small.peak_bytes == plan.peak_bytes


def test_layout_fills_shards_in_order_and_aligns_offsets():
    tensors = [TensorTask(f"t{i}", (10, 3), "F32", "F32" if i % 2 else "BF16") for i in range(6)]
    layout = layout_shards(tensors, shard_size=180)
    assert len(layout.shards) == 3
    assert [layout.slots[f"t{i}"].shard for i in range(6)] == [0, 0, 1, 1, 2, 2]
    for shard in layout.shards:
        header_len = int.from_bytes(shard.header[:8], "little")
        assert header_len % 8 == 0
        header = json.loads(shard.header[8:])
        assert header["__metadata__"] == {"format": "pt"}
    assert all(slot.offset % 4 == 0 for name, slot in layout.slots.items() if name[1] in "135")
    assert layout.total_size == 3 * 120 + 3 * 60


def test_plan_and_dry_run_print_units_without_writing(float32_family, tmp_path, capsys):
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]),
        "sources": [str(p) for p in float32_family["sources"]],
        "method": {"name": "ties"},
        "output": {"path": str(out)},
    })
    assert main(["plan", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.2" in printed and "4 sources" in printed and "peak memory" in printed
    assert main(["merge", str(recipe), "--dry-run"]) == 0
    assert capsys.readouterr().out == printed
    assert not out.exists()
