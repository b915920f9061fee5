"""The spectral linear layer, the swap into a transformers model, and the fold-back."""

from __future__ import annotations

import torch
from helpers import axis_merge_of, load_tensors

from raymerge.tune.factors import load_factors
from raymerge.tune.fold import write_folded_checkpoint
from raymerge.tune.spectral_linear import SpectralLinear
from raymerge.tune.swap import attach_spectral_layers, trainable_count


def test_spectral_linear_equals_the_dense_layer_and_trains_only_sigma():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(12, 20, generator=generator)
    U = torch.linalg.qr(torch.randn(12, 5, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(20, 5, generator=generator)).Q
    S = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5])
    bias = torch.randn(12, generator=generator)
    layer = SpectralLinear(base, U, S, V, trainable=3, bias=bias)
    x = torch.randn(4, 7, 20, generator=generator)
    dense = torch.nn.functional.linear(x, base + (U * S) @ V.T, bias)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
    assert [name for name, _ in layer.named_parameters()] == ["sigma"]
    assert layer.sigma.numel() == 3
    layer(x).square().sum().backward()
    assert layer.sigma.grad is not None and layer.sigma.grad.abs().sum() > 0
    torch.testing.assert_close(layer.folded_weight(), base + (U * S) @ V.T)
    assert trainable_count(None, 8) == 8 and trainable_count(0.5, 8) == 4
    assert trainable_count(20, 8) == 8


def test_swap_and_fold_reproduce_the_axis_merge(ray_cluster, float32_family, tmp_path):
    from transformers import AutoModelForCausalLM

    merged_dir = axis_merge_of(float32_family, tmp_path, sources=3, k=6)
    factors = load_factors(merged_dir)
    base = load_tensors(float32_family["base"])
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    reference = AutoModelForCausalLM.from_pretrained(merged_dir)
    swapped = attach_spectral_layers(model, factors, base, n=4)
    assert set(swapped) == set(factors)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * len(factors)
    tokens = torch.tensor([[3, 17, 5, 60, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits,
                                   rtol=1e-4, atol=1e-4)
        for layer in swapped.values():
            layer.sigma.mul_(1.5)  # as if tuned
        tuned_logits = model(tokens).logits

    folded = {name: layer.folded_weight() for name, layer in swapped.items()}
    out = write_folded_checkpoint(merged_dir, tmp_path / "tuned", folded, {"steps": 0}, "card")
    folded_model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(folded_model(tokens).logits, tuned_logits, rtol=1e-4,
                                   atol=1e-4)
    merged, tuned = load_tensors(merged_dir), load_tensors(out)
    for name in merged:
        if name not in factors:
            assert torch.equal(merged[name], tuned[name]), name  # byte-identical
    assert not torch.equal(merged[next(iter(factors))], tuned[next(iter(factors))])
