"""DELLA without sign consensus (mergekit `della_linear`; DELLA, arXiv 2406.11617): MAGPRUNE
each Δ_i (sparsify.keep_magprune: keep probabilities rising with the entry's magnitude rank in
its row, from density − ε to density + ε), rescale the survivors, weight, and sum."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from ..errors import RecipeError
from .base import MethodSettings, Varying
from .generalized import GeneralizedTaskArithmetic
from .sparsify import Density, Rescale, keep_magprune

Epsilon = Annotated[float, Field(ge=0.0, lt=1.0)]


def keep_window_problem(density: float, epsilon: float) -> str | None:
    """Why density ± epsilon leaves (0, 1), as mergekit refuses it (None: it does not; density
    0 or 1 keeps none or all, with no probabilities to draw)."""
    if 0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        return (f"density {density:g} ± epsilon {epsilon:g} must stay inside (0, 1) (DELLA's "
                "keep probabilities); lower epsilon or move density away from 0 and 1")
    return None


class MagpruneSettings(MethodSettings):
    """The keys DELLA and DELLA-linear share."""

    density: Varying[Density] = 1.0  # mean keep probability (mergekit's default)
    # keep probabilities span density ± epsilon (checked against density even by default)
    epsilon: Varying[Epsilon] = Field(0.15, validate_default=True)
    seed: int = 0
    rescale: Rescale = "l1"  # l1 (mergekit rescale: true) | inverse: 1/p per entry | none
    per_source = frozenset({"density", "epsilon"})

    @field_validator("epsilon")
    @classmethod
    def _keep_window(cls, epsilon: Any, info: ValidationInfo) -> Any:
        """Checked here where both are numbers; per tensor (check, sparsify) where they vary."""
        density = info.data.get("density")
        numbers = (int, float)
        if isinstance(density, numbers) and isinstance(epsilon, numbers):
            problem = keep_window_problem(density, epsilon)
            if problem:
                raise ValueError(problem)
        return epsilon


class DellaLinearSettings(MagpruneSettings):
    normalize: bool = False  # divide M by Σ w_i (mergekit normalize)


class DellaLinear(GeneralizedTaskArithmetic):
    name = "della_linear"
    title = "DELLA-Merging without sign consensus"
    paper = "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based " \
            "Sampling, arXiv 2406.11617"
    Settings = DellaLinearSettings
    state_tensors = 3  # running sum, the current source's draws, row-block temporaries
    random = True

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        problem = keep_window_problem(settings.density, settings.epsilon)
        if problem:
            raise RecipeError(f"method {cls.name}: tensor {', '.join(shapes)}: {problem}")

    def sparsify(self, source_index: int, delta: Tensor, inverse_rescale: bool) -> float:
        source = self.source_settings[source_index]
        problem = keep_window_problem(source.density, source.epsilon)
        if problem:  # a per-source value that varies by tensor, checked here
            raise RecipeError(f"method {self.name}: sources.{source_index}, tensor "
                              f"{self.tensor_name}: {problem}")
        keep_magprune(delta, source.density, source.epsilon, self.generator(source_index),
                      inverse_rescale)
        return 1.0
