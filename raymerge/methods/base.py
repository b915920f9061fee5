"""The method contract (DESIGN.md's streaming protocol): what a merge method is and everything
it can do, declared in one place with defaults. The engine (execute.py), the planner (merge.py)
and SVC (calibrated.py) call these hooks; none of them probes a method for what it has.

A method is built for one tensor with that tensor's settings (every gradient and filter already
resolved), then sees the base and the sources' deltas one at a time, in `passes` passes:

    method = Ties(settings, weights, options, source_settings)
    method.begin(name, base)
    for pass_index in range(method.passes):
        for source_index, delta in enumerate(deltas):
            method.update(pass_index, source_index, delta)     # or update_factored, or cached
    merged_delta = method.finish()                               # M (λ applied by the engine)

State kept between updates must be bounded independently of the number of sources.

Adding a method: one file with a `MethodSettings` subclass (its keys, defaults and ranges) and a
`Method` subclass, plus one line in the registry (`raymerge/methods/__init__.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..roles import (
    DEFAULT_EXCLUDE,
    is_bias,
    is_excluded,
    is_expert_stack_name,
    is_vocabulary_role,
)
from ..settings import MethodSettings, Varying

if TYPE_CHECKING:
    from torch import Size, Tensor

__all__ = ["COMMON_STATISTICS", "MergeOptions", "Method", "MethodSettings", "Statistic",
           "TensorReport", "Varying"]


@dataclass(frozen=True)
class MergeOptions:
    """What a method needs beyond its own settings."""

    exclude: tuple[str, ...] = tuple(DEFAULT_EXCLUDE)  # kept out of every spectral step
    svd: str = "auto"  # auto | exact | randomized
    factor_cache: Any = None  # a FactorCache: per-source spectral factors kept across merges

    def is_spectral_matrix(self, name: str, shape: tuple[int, ...] | Size) -> bool:
        """A 2-D tensor that is a linear map: not excluded, not a bias (a stack of per-expert
        biases is 2-D), not an embedding or output head (found by role, roles.py)."""
        return (len(shape) == 2 and not is_excluded(name, list(self.exclude))
                and not is_bias(name) and not is_vocabulary_role(name))

    def is_expert_stack(self, name: str, shape: tuple[int, ...] | Size) -> bool:
        """A 3-D [experts, m, n] tensor of an experts module: E matrices for the spectral steps
        (methods/per_slice.py). Other 3-D tensors (a pooling probe [1, 1, d]) are not."""
        return (len(shape) == 3 and is_expert_stack_name(name)
                and not is_excluded(name, list(self.exclude)) and not is_bias(name))


@dataclass(frozen=True)
class Statistic:
    """One per-tensor statistic a method reports: its key in TensorReport.stats, which is also
    its column in raymerge_stats.parquet and its key in the manifest."""

    key: str
    kind: Literal["int", "float", "int_list", "float_list"]
    header: str = ""  # its column header in `raymerge inspect` ("": not shown there)
    spec: str = ""  # its format there
    in_manifest: bool = True  # long lists (spectra) go to the parquet table only


COMMON_STATISTICS = (
    Statistic("delta_rms", "float", "Δ rms", ".2e"),
    Statistic("delta_max_abs", "float"),
)


@dataclass
class TensorReport:
    """What a method may leave after finish(): factors of the merged delta, and statistics."""

    # U, σ, V with M = U·diag(σ)·Vᵀ, U and V orthonormal: the basis the method built M in. SVC
    # calibrates in it (for an isotropic M, as Iso-C's, any other basis would be arbitrary).
    factors: tuple[Tensor, Tensor, Tensor] | None = None
    save_factors: bool = False  # write them to the spectral_factors/ sidecar (AXIS, for tuning)
    stats: dict = field(default_factory=dict)
    # statistics of the parts of a tensor merged apart (an expert stack's slices), by suffix
    parts: dict[str, dict] = field(default_factory=dict)


class Method:
    """Base of every merge method. Class attributes declare what the method is; the instance
    methods are the streaming protocol. Every hook has a default here."""

    name: ClassVar[str]
    title: ClassVar[str]  # e.g. "TIES-Merging", for the model card
    paper: ClassVar[str]  # where its definition comes from: "arXiv 2306.01708"
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    # Whether finish() returns λ·M itself (SVC calibrates λ·M); otherwise the engine scales M.
    applies_scale: ClassVar[bool] = False
    # The most passes over the sources any tensor takes: the plan's read estimate. An instance
    # sets `passes` for its tensor in begin().
    max_passes: ClassVar[int] = 1
    # Full-size tensors (the tensor's shape, compute dtype) held between updates, beyond the
    # base and the current delta: the plan's memory estimate.
    state_tensors: ClassVar[int] = 1
    # Whether the method draws random numbers (seeded per seed, tensor and source).
    random: ClassVar[bool] = False
    # Whether it treats matrices as matrices (spectral methods): an expert stack [E, m, n] is
    # then merged as E matrices, one method object per slice (methods/per_slice.py).
    matrix_wise: ClassVar[bool] = False
    # Whether it takes full SVDs of a tensor's matrix: the device plan adds the exact path's
    # workspace (methods whose randomized path is taken need less; the plan assumes the most).
    takes_svds: ClassVar[bool] = False
    statistics: ClassVar[tuple[Statistic, ...]] = ()

    def __init__(self, settings: MethodSettings, weights: Sequence[float],
                 options: MergeOptions | None = None,
                 source_settings: Sequence[MethodSettings] | None = None) -> None:
        """`settings` resolved for the tensor about to be merged; `weights` w_i and, for keys a
        source may set for itself, each source's settings (default: the shared ones)."""
        self.settings = settings
        self.weights = list(weights)
        self.options = options or MergeOptions()
        self.source_settings = list(source_settings or [settings] * len(self.weights))
        self.passes = self.max_passes
        self.report = TensorReport()

    @property
    def num_sources(self) -> int:
        return len(self.weights)

    @classmethod
    def check(cls, settings: MethodSettings, shapes: dict[str, tuple[int, ...]],
              num_sources: int, options: MergeOptions) -> None:
        """Refuse, before any tensor is read, settings that cannot work for these shapes and
        this many sources (RecipeError). Default: nothing to check."""

    def begin(self, name: str, base: Tensor) -> None:
        """A new tensor: set up state (and `passes`, when it differs by tensor)."""
        raise NotImplementedError

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        """Consume one source's delta Δ_i = W_i − B. The method may modify `delta` in place but
        must not keep it: the engine reuses the buffer for the next source."""
        raise NotImplementedError

    def update_factored(self, pass_index: int, source_index: int, left: Tensor,
                        right: Tensor) -> None:
        """A source whose delta is left·rightᵀ (a LoRA adapter: left m×r, right n×r). Default:
        the dense delta; methods that can use the factors override this."""
        self.update(pass_index, source_index, left @ right.mT)

    def streams(self, pass_index: int) -> bool:
        """Whether this pass takes each source's delta a slice at a time (update_slice) instead
        of whole: the engine then never forms a source's whole delta, and adds each slice while
        it is in the cache. For methods elementwise over the sources (a running sum): the
        engine may call update_slice source by source or slice-major (every source's slice at
        one start before the next start); each element meets the sources in order either way.
        Default: no."""
        return False

    def update_slice(self, pass_index: int, source_index: int, start: int,
                     delta_slice: Tensor) -> None:
        """Elements start … start + len − 1 of the flattened Δ_i (whole rows), when `streams`."""
        raise NotImplementedError

    def cached_update(self, pass_index: int, source_index: int) -> bool:
        """Take this source's contribution from the factor cache instead of reading it; True:
        the engine skips the read. Default: nothing is cached."""
        return False

    def finish(self) -> Tensor:
        """The merged delta M of the current tensor (λ·M when applies_scale); `report` then
        holds its factors and statistics."""
        raise NotImplementedError
