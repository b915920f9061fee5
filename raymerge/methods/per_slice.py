"""Expert stacks: a 3-D tensor [E, m, n] (GPT-OSS-style mixture-of-experts weights) is E matrices.
A spectral method (and SVC) merges each expert's m×n slice as the matrix it is, with a method
object per slice; what they keep together is what one [E, m, n] tensor's method would keep, so the
state is still bounded in N. Statistics are reported per slice (as rows `NAME[e]`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .base import Method, TensorReport


class PerSlice(Method):
    """Routes slice e of every delta to its own method built by `make_slice_method()`."""

    def __init__(self, make_slice_method: Callable[[], Method], slices: int) -> None:
        self.slice_methods = [make_slice_method() for _ in range(slices)]
        first = self.slice_methods[0]
        super().__init__(first.settings, first.weights, first.options, first.source_settings)
        self.applies_scale = first.applies_scale

    def begin(self, name: str, base: Tensor) -> None:
        for index, (method, base_slice) in enumerate(zip(self.slice_methods, base)):
            method.begin(f"{name}[{index}]", base_slice)
        self.passes = max(method.passes for method in self.slice_methods)

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        for method, delta_slice in zip(self.slice_methods, delta):
            if pass_index < method.passes:
                method.update(pass_index, source_index, delta_slice)

    def finish(self) -> Tensor:
        merged = torch.stack([method.finish() for method in self.slice_methods])
        self.report = TensorReport(
            stats={"expert_slices": len(self.slice_methods)},
            parts={f"[{index}]": method.report.stats
                   for index, method in enumerate(self.slice_methods)})
        return merged
