"""The merge recipe: pydantic models, loading of our YAML and of mergekit's.

The `method` block is validated against the settings model of the method it names, which the
method declares itself (raymerge.settings.method_settings_class): a key that method does not
take is an error that names the method. This module imports no method code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from raymerge.errors import RecipeError
from raymerge.roles import DEFAULT_EXCLUDE
from raymerge.settings import (
    MethodSettings,
    StrictModel,
    Varying,
    method_settings_class,
    method_settings_classes,
    one_line,
    read_yaml,
    validate_config,
)
from raymerge.sizes import parse_size
from raymerge.store.settings import StorageSettings

__all__ = ["DEFAULT_EXCLUDE", "OUTPUT_DTYPES", "Recipe", "SourceSpec", "StrictModel",
           "load_recipe", "method_settings", "one_line", "read_yaml", "recipe_from_dict",
           "validate_config"]

OUTPUT_DTYPES = ("float64", "float32", "float16", "bfloat16")
DEFAULT_METHOD = "task_arithmetic"


class SourceSpec(StrictModel):
    path: str
    weight: Varying[float] = 1.0
    # this source's own values of the method's per-source keys (mergekit's per-model parameters)
    parameters: dict[str, Any] = Field(default_factory=dict)


def method_settings(block: Any, origin: str | None = None) -> MethodSettings:
    """A recipe's method block as the settings of the method it names. An unknown method, a key
    the method does not take (naming the methods that do) or a value out of range is a
    ValueError, or with `origin` a RecipeError naming the key as `origin: method.key: ...`."""
    if isinstance(block, MethodSettings):
        return block
    if not isinstance(block, dict):
        raise ValueError(f"expected a mapping with the method's name and settings, got {block!r}")
    block = {"name": DEFAULT_METHOD, **block}
    name = block["name"]
    if not isinstance(name, str):
        raise ValueError(f"name must be a method's name, got {name!r}")
    settings_class = method_settings_class(name)
    unknown = [key for key in block if key not in settings_class.model_fields]
    if unknown:
        raise ValueError(_foreign_keys(name, unknown, settings_class))
    if origin is not None:
        return validate_config(settings_class, block, origin, prefix="method")
    return settings_class.model_validate(block)


def _foreign_keys(name: str, unknown: list[str], settings_class) -> str:
    owners = {key: sorted(other for other, settings in method_settings_classes().items()
                          if key in settings.model_fields) for key in unknown}
    described = ", ".join(f"{key!r}" + (f" (a key of {', '.join(owners[key])})"
                                          if owners[key] else "") for key in unknown)
    takes = ", ".join(key for key in settings_class.model_fields if key != "name")
    return f"{name} does not take {described}; {name} takes: {takes}"


class SvcSpec(StrictModel):
    alpha: Literal["auto"] | float = "auto"  # auto: the SVC authors' setting for the method

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
    dtype: Literal["float64", "float32", "float16", "bfloat16"] | None = None
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
    # auto: one GPU per task where the cluster has GPUs, none otherwise
    num_gpus: Literal["auto"] | Annotated[float, Field(ge=0)] = "auto"
    memory: int | None = None
    # auto: as many tasks as the cluster has slots for (its GPUs or CPUs, by what a task asks
    # for), bounded by memory
    max_in_flight: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    # a directory (shared by every node) caching per-source spectral factors across merges
    factor_cache: str | None = None
    # refuse a task no node can hold (false on a cluster whose autoscaler adds nodes on demand)
    resource_check: bool = True
    # a node-local directory (e.g. NVMe) where a unit keeps the byte ranges it fetched from a
    # store until it is done, so that a second pass over the sources fetches nothing again;
    # at most source_cache_size bytes per unit
    source_cache: str | None = None
    source_cache_size: int = parse_size("64GB")

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int | None:
        return None if value is None else parse_size(value)

    @field_validator("source_cache_size", mode="before")
    @classmethod
    def _cache_size(cls, value: Any) -> int:
        return parse_size(value)


class TokenizerSpec(StrictModel):
    """The output's vocabulary: the base's, the union of every checkpoint's (the base's tokens
    in order, then each source's new ones), or one source's (its path as the recipe writes
    it). Tokens are matched by their strings."""

    source: str
    pad_to_multiple_of: int | None = Field(None, ge=1)


class SliceSource(StrictModel):
    path: str  # the base or a source, as written in the recipe
    layer_range: tuple[int, int]  # [start, end): the blocks this slice takes from it
    weight: Varying[float] | None = None  # this slice's weight (else the source's)
    parameters: dict[str, Any] = Field(default_factory=dict)  # over the source's own


class SliceSpec(StrictModel):
    """Output blocks taken from the same layer range of each listed checkpoint (mergekit's
    `slices`), in order. One checkpoint: its blocks are copied (mergekit's passthrough).
    Several: merged by the recipe's method onto the slice's base (which is one of them), with
    this slice's method keys over the recipe's."""

    sources: list[SliceSource] = Field(min_length=1)
    base: str | None = None  # the slice's base; the recipe's when absent
    method: dict[str, Any] = Field(default_factory=dict)


class Recipe(StrictModel):
    base: str
    sources: list[SourceSpec] = Field(default_factory=list)  # ≥ 1 unless slices copy blocks
    method: SerializeAsAny[MethodSettings] = Field(
        default_factory=lambda: {"name": DEFAULT_METHOD}, validate_default=True)
    calibrate: CalibrateSpec | None = None
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    output: OutputSpec = OutputSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    allow_pickle: bool = False
    tokenizer: TokenizerSpec | None = None
    # the output's chat template: "base", "auto" (the most common one), a source's path as
    # written, or a Jinja template
    chat_template: str | None = None
    # the output's blocks as layer ranges of the checkpoints (mergekit's slices); absent: the
    # base's blocks, each merged
    slices: list[SliceSpec] | None = None
    # options written in a mergekit recipe that change nothing in its result: where -> the
    # value and why (accepted, and reported by `raymerge plan` and the merge summary)
    no_effect: dict[str, str] = Field(default_factory=dict)
    # where models in object stores are and how to reach them (never credentials)
    storage: StorageSettings | None = None

    @field_validator("sources", mode="before")
    @classmethod
    def _string_sources(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("method", mode="before")
    @classmethod
    def _method_settings(cls, value: Any) -> MethodSettings:
        return method_settings(value)

    @model_validator(mode="after")
    def _some_source(self) -> Recipe:
        if not self.sources and not self.slices:
            raise ValueError("sources: List should have at least 1 item")
        return self

    @model_validator(mode="after")
    def _source_parameters(self) -> Recipe:
        """Each source's own parameters: keys the method takes per source, in range."""
        settings_class = type(self.method)
        for index, source in enumerate(self.sources):
            if not source.parameters:
                continue
            foreign = sorted(set(source.parameters) - settings_class.per_source)
            if foreign:
                per_source = ", ".join(sorted(settings_class.per_source)) or "none"
                raise ValueError(
                    f"sources.{index}.parameters: {', '.join(map(repr, foreign))} cannot be set "
                    f"per source for method {self.method.name} (per source: {per_source}; "
                    "weight is the source's own key)")
            try:
                checked = settings_class.model_validate(
                    {**self.method.model_dump(), **source.parameters})
            except ValidationError as error:
                item = error.errors()[0]
                where = ".".join(str(p) for p in item["loc"] if not str(p).startswith("="))
                message = item["msg"].removeprefix("Value error, ")
                raise ValueError(f"sources.{index}.parameters.{where}: {message}") from None
            source.parameters = {key: getattr(checked, key) for key in source.parameters}
        return self

    @model_validator(mode="after")
    def _weights_have_effect(self) -> Recipe:
        """A source weight on a method that weighs no source would be silently ignored."""
        if type(self.method).takes_weights:
            return self
        for index, source in enumerate(self.sources):
            if source.weight != 1.0:
                raise ValueError(
                    f"sources.{index}.weight: method {self.method.name} does not weigh its "
                    "sources (as in mergekit, it takes no weight); remove the weight")
        return self

    @model_validator(mode="after")
    def _vocabulary_choices(self) -> Recipe:
        """tokenizer.source and chat_template name the base or a source as the recipe writes
        them (or, for chat_template, are a Jinja template)."""
        paths = [source.path for source in self.sources]
        if self.tokenizer is not None and self.tokenizer.source not in (
                "base", "union", self.base, *paths):
            raise ValueError(
                f"tokenizer.source: {self.tokenizer.source!r} is none of base, union, or a "
                "source's path as written in sources")
        template = self.chat_template
        if template is not None and template not in ("base", "auto", self.base, *paths) and \
                not ("{{" in template or "{%" in template):
            raise ValueError(
                f"chat_template: {template[:60]!r} is none of base, auto, a source's path as "
                "written in sources, or a Jinja template (with {{ ... }} or {% ... %})")
        return self

    def svc_alpha(self) -> float | None:
        """SVC's α, or None when the recipe does not calibrate."""
        if self.calibrate is None or self.calibrate.svc is None:
            return None
        return self.svc_alpha_rule()[0]

    def svc_alpha_rule(self) -> tuple[float, str]:
        """SVC's α and why: `auto` follows the SVC authors' setting for the method."""
        alpha = self.calibrate.svc.alpha
        if alpha == "auto":
            value, rule = type(self.method).svc_auto_alpha(len(self.sources))
            return value, f"auto: {rule}"
        return float(alpha), "given in the recipe"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path) -> Recipe:
    """Read a raymerge or mergekit YAML file (a local path or an object-store URI) into a
    validated Recipe."""
    data = read_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping with 'base', 'sources' and 'method'")
    if "merge_method" in data:
        from raymerge.mergekit import recipe_from_mergekit

        data = recipe_from_mergekit(data, path)
    return recipe_from_dict(data, origin=str(path))


def recipe_from_dict(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    if isinstance(data, dict) and isinstance(data.get("method"), dict):
        try:  # first, so that its errors name the method's keys as method.KEY
            data = {**data, "method": method_settings(data["method"], origin)}
        except ValueError as error:
            raise RecipeError(f"{origin}: method: {error}") from None
    return validate_config(Recipe, data, origin)
