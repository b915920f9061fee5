"""What every spectral method shares: matrices go through the method's spectral steps; tensors
that are not matrices, and excluded ones (embeddings, heads), are merged as the mean of w_i·Δ_i
(METHODS.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, MethodSettings, TensorReport


class SpectralSettings(MethodSettings):
    seed: int = 0  # randomized SVDs are seeded per (seed, source)


class SpectralMethod(Method):
    Settings = SpectralSettings
    state_tensors = 2
    matrix_wise = True

    def begin(self, name: str, base: Tensor) -> None:
        self.tensor_name = name
        self.like = base.new_empty(0)  # dtype and device of the result, without its size
        self._cache_key: str | None = None
        self.report = TensorReport()
        self.is_matrix = self.options.is_spectral_matrix(name, base.shape)
        if self.is_matrix:
            self.passes = self.max_passes
            self.begin_matrix(base)
        else:
            self.passes = 1
            self.weighted_sum = torch.zeros_like(base)

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        weight = self.weights[source_index]
        if not self.is_matrix:
            self.weighted_sum.add_(delta, alpha=weight)
            return
        weighted = delta if weight == 1.0 else delta.mul_(weight)
        self.update_matrix(pass_index, source_index, weighted)

    def streams(self, pass_index: int) -> bool:
        return not self.is_matrix  # the weighted sum of a tensor that is not a matrix

    def update_slice(self, pass_index: int, source_index: int, start: int,
                     delta_slice: Tensor) -> None:
        self.weighted_sum.view(-1)[start:start + delta_slice.numel()].add_(
            delta_slice, alpha=self.weights[source_index])

    def update_factored(self, pass_index: int, source_index: int, left: Tensor,
                        right: Tensor) -> None:
        """Δ_i = left·rightᵀ (a LoRA source, left m×r, right n×r)."""
        weight = self.weights[source_index]
        if not self.is_matrix:
            self.weighted_sum.addmm_(left, right.mT, alpha=weight)
            return
        self.update_matrix_factored(pass_index, source_index,
                                    left if weight == 1.0 else left * weight, right)

    def finish(self) -> Tensor:
        if not self.is_matrix:
            merged, self.weighted_sum = self.weighted_sum, None
            return merged.div_(self.num_sources)
        return self.finish_matrix()

    def cached_update(self, pass_index: int, source_index: int) -> bool:
        """Take this source's factors from the factor cache when they are there; True: the
        engine need not read the source for this pass. On a miss, the factors the method then
        computes are stored (remember_source_factors)."""
        self._cache_key = None
        cache = self.options.factor_cache
        settings = (self.cache_settings(pass_index, source_index)
                    if cache is not None and self.is_matrix else None)
        if settings is None:
            return False
        key = cache.key(source_index, self.tensor_name,
                        {**settings, "weight": self.weights[source_index]})
        factors = cache.get(key, self.like.device)
        if factors is None:
            self._cache_key = key
            return False
        self.use_source_factors(source_index, factors)
        return True

    def remember_source_factors(self, factors: dict[str, Tensor]) -> None:
        if self._cache_key is not None:
            self.options.factor_cache.put(self._cache_key, factors)
            self._cache_key = None

    # subclasses whose per-source work depends on that source alone may cache it
    def cache_settings(self, pass_index: int, source_index: int) -> dict | None:
        """What the source's factors depend on besides base, source, tensor and weight; None:
        not cacheable."""
        return None

    def use_source_factors(self, source_index: int, factors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    # subclasses: the spectral steps of one matrix, fed weighted deltas w_i·Δ_i
    def begin_matrix(self, base: Tensor) -> None:
        raise NotImplementedError

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        raise NotImplementedError

    def finish_matrix(self) -> Tensor:
        raise NotImplementedError

    def update_matrix_factored(self, pass_index: int, source_index: int, left: Tensor,
                               right: Tensor) -> None:
        """Default: the dense delta. Methods with a factored path override this."""
        self.update_matrix(pass_index, source_index, left @ right.mT)

    def svd_seed(self, source_index: int) -> int:
        """Randomized SVDs are seeded per (seed, source): reruns give identical bytes."""
        return self.settings.seed * 1_000_003 + source_index
