"""`raymerge merge` with ACE-Merging, with and without SVC, on the tiny float32 Llama family
(square, wide and tall matrices), equals the dense float64 transcription of the official code
(tests/reference_ace.py), SVC with `alpha: auto` (1/N) after it."""

from __future__ import annotations

import pytest
import torch
from helpers import compare_with_float64, load_tensors, manifest, weighted_merge
from reference_ace import ace
from reference_spectral import svc

WEIGHTS = [1.0, 0.5, 1.5, 0.75]
MATRIX = "model.layers.0.mlp.up_proj.weight"


def _expected(name: str, base: torch.Tensor, sources: list[torch.Tensor], weights, scale,
              svc_alpha) -> torch.Tensor:
    base = base.double()
    deltas = [source.double() - base for source in sources]
    weighted = [w * d for w, d in zip(weights, deltas)]
    if base.dim() != 2 or any(pattern in name for pattern in ("embed_tokens", "lm_head")):
        return base + scale * sum(weighted) / len(weighted)
    merged = scale * ace(weighted)[0]
    return base + (svc(merged, deltas, svc_alpha) if svc_alpha is not None else merged)


# float32 compute within 5e-5 relative of the float64 reference (the other spectral methods'
# end-to-end tolerance); float64 compute, written as float32, to one float32 step
@pytest.mark.parametrize("calibrate, compute_dtype", [(False, "float32"), (True, "float64")])
def test_ace_merges_equal_the_official_code(ray_cluster, nine_sources, tmp_path, calibrate,
                                            compute_dtype):
    base_dir, sources = nine_sources
    sources = sources[:4]
    out = weighted_merge(tmp_path, base_dir, sources, WEIGHTS, {"name": "ace", "scale": 0.9},
                         calibrate, {"compute_dtype": compute_dtype})
    base, merged = load_tensors(base_dir), load_tensors(out)
    loaded = [load_tensors(p) for p in sources]
    errors = {}
    for name, base_tensor in base.items():
        expected = _expected(name, base_tensor, [s[name] for s in loaded], WEIGHTS, 0.9,
                             0.25 if calibrate else None)
        compare_with_float64(merged[name], expected, base_tensor, name, compute_dtype, errors)
    if errors:
        worst = max(errors, key=errors.get)
        assert errors[worst] < 5e-5, f"{worst}: relative error {errors[worst]:.2e}"
    stats = manifest(out)["tensors"][MATRIX]
    assert stats["ace_heterogeneous"] in (0, 1) and stats["ace_gamma"] >= 0
    assert ("svc_gamma_median" in stats) == calibrate
