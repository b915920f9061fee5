"""TSV-M, Task Singular Vectors merging (reference code AntoAndGar/task_singular_vectors).

k = r // N; each source keeps its top-k triplets; the stacks U_cat (m×Nk), σ_cat, V_cat (n×Nk)
are orthogonalised by their polar factors: M = polar(U_cat)·diag(σ_cat)·polar(V_cat)ᵀ. The stacks
hold N·k ≤ r columns whatever N is."""

from __future__ import annotations

from torch import Tensor

from raymerge.errors import RecipeError
from raymerge.methods.spectral import SpectralMethod
from raymerge.spectral.svd import polar, truncated_svd


class Tsv(SpectralMethod):
    state_tensors = 2

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        for name, shape in shapes.items():
            if options.is_spectral_matrix(name, shape) and min(shape) // num_sources == 0:
                raise RecipeError(
                    f"method tsv: tensor {name} has rank {min(shape)}, fewer than the "
                    f"{num_sources} sources (k = r // N = 0); merge fewer sources or exclude it"
                )

    def begin_matrix(self, base: Tensor) -> None:
        rows, cols = base.shape
        self.per_source = min(base.shape) // self.num_sources
        if self.per_source == 0:
            self.check(self.settings, {self.name: tuple(base.shape)}, self.num_sources,
                       self.options)
        width = self.per_source * self.num_sources
        self.stack_U = base.new_zeros(rows, width)
        self.stack_S = base.new_zeros(width)
        self.stack_V = base.new_zeros(cols, width)

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        U, S, V = truncated_svd(weighted, self.per_source, self.options.svd,
                                self.svd_seed(source_index))
        columns = slice(source_index * self.per_source, (source_index + 1) * self.per_source)
        self.stack_U[:, columns] = U
        self.stack_S[columns] = S
        self.stack_V[:, columns] = V

    def finish_matrix(self) -> Tensor:
        left, right = polar(self.stack_U), polar(self.stack_V)
        self.report.factors = (left, self.stack_S, right)  # an SVD of M, σ unsorted
        del self.stack_U, self.stack_S, self.stack_V
        return (left * self.report.factors[1]) @ right.mT
