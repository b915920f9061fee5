"""The merge recipe: pydantic models, loading of our YAML and of mergekit's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raymerge.errors import RecipeError
from raymerge.sizes import parse_size

DEFAULT_EXCLUDE = ["embed_tokens", "lm_head", "wte", "wpe", "embeddings"]
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


class StrictModel(BaseModel):
    # extra="forbid": an unknown key is an error, never silently dropped.
    model_config = ConfigDict(extra="forbid")


class SourceSpec(StrictModel):
    path: str
    weight: float = 1.0


class MethodSpec(StrictModel):
    name: str = "task_arithmetic"
    scale: float = 1.0
    k: int | float = 0.1  # axis: a count, or a fraction of r = min(m, n)
    density: float = Field(0.2, gt=0.0, le=1.0)
    p: float = Field(0.9, ge=0.0, lt=1.0)
    seed: int = 0

    @field_validator("k")
    @classmethod
    def _k_range(cls, k: int | float) -> int | float:
        if k <= 0 or (isinstance(k, float) and k > 1):
            raise ValueError("k must be a positive integer, or a fraction in (0, 1] of the rank")
        return k

    @field_validator("name")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from raymerge.methods import METHODS

        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
        return name


class SvcSpec(StrictModel):
    alpha: Literal["auto"] | float = "auto"  # auto = 1/N

    @field_validator("alpha")
    @classmethod
    def _positive(cls, alpha: Any) -> Any:
        if alpha != "auto" and alpha <= 0:
            raise ValueError("alpha must be positive or 'auto' (1/N)")
        return alpha


class CalibrateSpec(StrictModel):
    svc: SvcSpec | None = None


class OutputSpec(StrictModel):
    path: str = "./merged"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    shard_size: int = parse_size("2GB")
    push_to_hub: str | None = None
    private: bool = True  # a Hub repository created by push_to_hub

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)


class RuntimeSpec(StrictModel):
    compute_dtype: Literal["float32", "float64"] = "float32"
    svd: Literal["auto", "exact", "randomized"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    memory: int | None = None
    max_in_flight: int = Field(4, ge=1)
    # a directory (shared by every node) caching per-source spectral factors across merges
    factor_cache: str | None = None
    # refuse a task no node can hold (false on a cluster whose autoscaler adds nodes on demand)
    resource_check: bool = True

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int | None:
        return None if value is None else parse_size(value)


class Recipe(StrictModel):
    base: str
    sources: list[SourceSpec] = Field(min_length=1)
    method: MethodSpec = MethodSpec()
    calibrate: CalibrateSpec | None = None
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    output: OutputSpec = OutputSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    allow_pickle: bool = False

    @field_validator("sources", mode="before")
    @classmethod
    def _string_sources(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, str) else item for item in value]
        return value

    def svc_alpha(self) -> float | None:
        """SVC's α, or None when the recipe does not calibrate."""
        if self.calibrate is None or self.calibrate.svc is None:
            return None
        alpha = self.calibrate.svc.alpha
        return 1.0 / len(self.sources) if alpha == "auto" else float(alpha)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's data (safe_load: no tags that construct objects); RecipeError in one line
    naming `what` (recipe, tune config, registry) when it is missing or not YAML."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{what} {path} not found: check the path") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{what} {path} is not valid YAML: {one_line(error)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read a raymerge or mergekit YAML file into a validated Recipe."""
    path = Path(path)
    data = read_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping with 'base', 'sources' and 'method'")
    if "merge_method" in data:
        from raymerge.mergekit import recipe_from_mergekit

        data = recipe_from_mergekit(data, path)
    return recipe_from_dict(data, origin=str(path))


def recipe_from_dict(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    return validate_config(Recipe, data, origin)


ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


def validate_config(model: type[ConfigModel], data: Any, origin: str) -> ConfigModel:
    """model.model_validate, failing with one line that names every offending key."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '(top level)'}: {item['msg']}"
            for item in error.errors()
        )
        raise RecipeError(f"{origin}: {problems}") from None


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())
