"""`raymerge merge` with WUDI and STAR, with and without SVC, on the tiny float32 Llama family
(square, wide and tall matrices), equals the dense float64 official algorithms
(tests/reference_wudi_star.py). WUDI runs 40 Adam steps at lr 1e-4 here (the default 300 at
1e-5 is tested on a tiny matrix in tests/methods/test_wudi_star.py): enough to move M well away
from the sum in a few seconds."""

from __future__ import annotations

import pytest
from helpers import compare_with_float64, load_tensors, manifest, weighted_merge
from reference_wudi_star import reference_wudi_star

WEIGHTS = [1.0, 0.5, 1.5, 0.75, 1.25]
WUDI_STEPS = {"iter_num": 40, "lr": 1e-4}
MATRIX = "model.layers.0.mlp.up_proj.weight"


def _merge(tmp_path, base, sources, method: dict, calibrate: bool, compute_dtype: str):
    return weighted_merge(tmp_path, base, sources, WEIGHTS, method, calibrate,
                          {"compute_dtype": compute_dtype})


# (method, N, SVC, compute dtype): float32 merges against the float64 reference within 5e-5
# relative, as the other spectral methods' end-to-end test; float64 merges (written as float32,
# the family's dtype) equal the float64 reference rounded to float32, to one float32 step
CASES = [
    ("wudi", 3, False, "float32"), ("wudi", 5, True, "float32"), ("wudi", 4, False, "float64"),
    ("star", 3, False, "float32"), ("star", 5, True, "float32"), ("star", 4, True, "float64"),
]


@pytest.mark.parametrize("method, n, calibrate, compute_dtype", CASES)
def test_wudi_and_star_merges_equal_the_official_algorithms(ray_cluster, nine_sources, tmp_path,
                                                            method, n, calibrate, compute_dtype):
    base_dir, sources = nine_sources
    sources = sources[:n]
    settings = {"name": method, "scale": 0.9, **(WUDI_STEPS if method == "wudi" else {})}
    out = _merge(tmp_path, base_dir, sources, settings, calibrate, compute_dtype)
    alpha = (1.0 if method == "wudi" else 1.0 / n) if calibrate else None  # alpha: auto

    base, merged = load_tensors(base_dir), load_tensors(out)
    loaded = [load_tensors(p) for p in sources]
    errors = {}
    for name, base_tensor in base.items():
        expected = reference_wudi_star(method, name, base_tensor, [s[name] for s in loaded],
                                       WEIGHTS[:n], scale=0.9, svc_alpha=alpha,
                                       **(WUDI_STEPS if method == "wudi" else {}))
        compare_with_float64(merged[name], expected, base_tensor, name, compute_dtype, errors)
    if errors:
        worst = max(errors, key=errors.get)
        assert errors[worst] < 5e-5, f"{worst}: relative error {errors[worst]:.2e}"

    stats = manifest(out)["tensors"][MATRIX]
    if method == "wudi":
        assert 0 < stats["wudi_loss_after"] < stats["wudi_loss_before"]
    else:
        assert len(stats["star_rank_per_source"]) == n
        assert all(1 <= rank < 32 for rank in stats["star_rank_per_source"])
    assert ("svc_gamma_median" in stats) == calibrate
