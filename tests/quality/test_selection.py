"""The quality suite's λ selection (benchmarks/quality/selection.py): the in-memory λ of a merge
without SVC is the real merge at that λ, and the grid extends past an edge the best λ sits on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "quality"))

from selection import (  # noqa: E402
    choose_scale,
    evaluation_dtype,
    merge,
    read_tensors,
    scaled,
    svc_variants,
)


@pytest.mark.parametrize("method", [{"name": "iso_cts"}, {"name": "ties", "density": 0.3},
                                    {"name": "axis", "k": 0.5}])
def test_scaling_the_merge_at_one_in_memory_equals_merging_at_that_scale(
        ray_cluster, float32_family, tmp_path, method):
    base, sources = float32_family["base"], float32_family["sources"]
    at_one = read_tensors(merge(base, sources, method, 1.0, False, tmp_path / "one"))
    at_scale = read_tensors(merge(base, sources, method, 2.3, False, tmp_path / "scaled"))
    in_memory = scaled(read_tensors(base), at_one, 2.3)

    assert in_memory.keys() == at_scale.keys()
    base_tensors = read_tensors(base)
    for name, expected in at_scale.items():
        delta = expected - base_tensors[name]
        error = float((in_memory[name] - expected).abs().max())
        # float32 rounding of B + λ·M: a few units in the last place of the weight's magnitude
        tolerance = 1e-6 * float(expected.abs().max()) + 1e-5 * float(delta.abs().max())
        assert error <= tolerance, (name, error, tolerance)
    moved = [n for n in at_scale if not torch.equal(at_scale[n], base_tensors[n])]
    assert moved, "the merge changed nothing: the comparison would be vacuous"


def test_the_grid_extends_past_the_edge_the_best_scale_sits_on():
    tried = []

    def peak_at_two(scale: float) -> float:
        tried.append(scale)
        return -abs(scale - 2.0)

    best, scores = choose_scale((0.3, 0.6, 1.0), peak_at_two, extend=2)
    assert tried == [0.3, 0.6, 1.0, 1.4, 1.96]
    assert best == 1.96 and list(scores) == [0.3, 0.6, 1.0, 1.4, 1.96]

    tried.clear()
    best, _ = choose_scale((0.5, 1.0), lambda s: tried.append(s) or -s, extend=1)
    assert tried == [0.5, 1.0, 0.25] and best == 0.25

    tried.clear()
    best, _ = choose_scale((0.5, 1.0, 2.0), lambda s: tried.append(s) or -abs(s - 1), extend=2)
    assert tried == [0.5, 1.0, 2.0] and best == 1.0


def test_the_evaluation_dtype_is_bfloat16_only_where_the_cpu_has_it_natively():
    assert evaluation_dtype("auto", {"avx2", "avx512f", "avx512_bf16"}) is torch.bfloat16
    assert evaluation_dtype("auto", {"avx2", "amx_bf16"}) is torch.bfloat16
    assert evaluation_dtype("auto", {"avx2", "avx512f"}) is torch.float32  # emulated: ~80× slower
    assert evaluation_dtype("auto", set()) is torch.float32
    assert evaluation_dtype("bfloat16", set()) is torch.bfloat16  # an explicit choice stands
    assert evaluation_dtype("float32", {"avx512_bf16"}) is torch.float32
    assert evaluation_dtype("auto") in (torch.bfloat16, torch.float32)  # this machine's flags


def test_the_svc_choice_names_the_variants_run_without_first():
    assert svc_variants("both") == (False, True)
    assert svc_variants("without") == (False,)
    assert svc_variants("with") == (True,)
