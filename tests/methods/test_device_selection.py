"""The exact magnitude thresholds of TIES, DARE-TIES, breadcrumbs and DELLA on a GPU (a radix
select on the float bits, where torch.kthvalue is slow) equal the CPU path's, ties included.
Run here on CPU tensors: the algorithm is the same on any device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymerge.methods.sparsify import radix_select


def cpu_order_statistic(values: torch.Tensor, position: int) -> float:
    """What the CPU path computes: numpy's introselect on the magnitudes."""
    magnitudes = values.abs().float().numpy().ravel().copy() if values.dtype in (
        torch.bfloat16, torch.float16) else values.abs().numpy().ravel().copy()
    magnitudes.partition(position)
    return float(magnitudes[position])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_radix_select_equals_the_cpu_selection_with_many_ties(dtype):
    generator = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(200_003, generator=generator),
        torch.randint(-3, 4, (100_000,), generator=generator) * 0.125,  # 7 values, many ties
        torch.zeros(5000),
        torch.full((33,), -2.5),
        torch.tensor([7.0]),
    ]
    for values in cases:
        values = values.to(dtype)
        count = values.numel()
        for position in sorted({0, 1, count // 5, count // 2, count - 2, count - 1} - {-1}):
            position = min(max(position, 0), count - 1)
            assert radix_select(values.abs(), position) == cpu_order_statistic(values, position)


def test_the_threshold_keeps_the_same_entries_as_the_cpu_path():
    generator = torch.Generator().manual_seed(1)
    values = torch.randint(-50, 51, (300, 301), generator=generator).float() / 7
    keep = max(1, int(0.2 * values.numel()))
    position = values.numel() - keep
    threshold = radix_select(values.abs(), position)
    expected = cpu_order_statistic(values, position)
    assert threshold == expected
    assert torch.equal(values.abs() >= threshold, values.abs() >= expected)
    assert int((values.abs() >= threshold).sum()) >= keep  # ties at the threshold are kept
    assert np.isclose(threshold, np.sort(values.abs().numpy().ravel())[position])
