"""Validated configuration shared by the recipe, the methods and the other config files: strict
pydantic models, one-line validation errors, YAML reading, and parameter values that vary by
tensor (mergekit's gradients and filters).

Both the recipe and the methods import this module; neither imports the other. A method's
settings are its own `MethodSettings` subclass, declared in the method's file; the recipe finds
it by the method's name through `method_settings_class`, which asks the methods' registry."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError

from raymerge.errors import RecipeError

T = TypeVar("T")


class StrictModel(BaseModel):
    # extra="forbid": an unknown key is an error, never silently dropped.
    model_config = ConfigDict(extra="forbid")


def _shape(value: Any) -> str:
    """Which form of a Varying value this is, so that pydantic validates (and reports on) that
    form alone. The tags start with '=' so that error locations can drop them."""
    if isinstance(value, list):
        mappings = value and all(isinstance(e, (dict, Conditional)) for e in value)
        return "=filters" if mappings else "=gradient"
    return "=filter" if isinstance(value, (dict, Conditional)) else "=scalar"


class ScalarOrGradient:
    """ScalarOrGradient[X]: one X, or a list of them (a gradient over the layers)."""

    def __class_getitem__(cls, leaf):
        return Annotated[Union[Annotated[leaf, Tag("=scalar")],  # noqa: UP007 (runtime)
                               Annotated[list[leaf], Tag("=gradient")]], Discriminator(_shape)]


class Conditional(StrictModel, Generic[T]):
    """A value for the tensors whose name contains `filter` (every tensor when it is absent or
    '*'); in a list, the first entry that matches wins (mergekit's `filter:` entries)."""

    filter: str | None = None
    value: ScalarOrGradient[T]


class Varying:
    """Varying[X], a parameter as a recipe may give it: one X; a list of numbers interpolated
    over the layers (a gradient); or {filter, value} entries matched against tensor names.
    (A class so that X reaches every form, constraints included: Varying[Annotated[...]].)"""

    def __class_getitem__(cls, leaf):
        return Annotated[Union[Annotated[leaf, Tag("=scalar")],  # noqa: UP007 (runtime)
                               Annotated[list[leaf], Tag("=gradient")],
                               Annotated[Conditional[leaf], Tag("=filter")],
                               Annotated[list[Conditional[leaf]], Tag("=filters")]],
                         Discriminator(_shape)]


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """A Varying setting's value for one tensor at layer position t ∈ [0, 1], as mergekit 0.1.5
    evaluates it (`evaluate_setting`): a list of numbers is interpolated linearly at
    t·(len − 1), a list of other values is indexed at int(t·(len − 1)), and filters match by
    substring of the tensor name. None when no filter matches (the next scope decides)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(isinstance(entry, Conditional) for entry in setting):
        for entry in setting:
            if entry.filter in (None, "*") or (tensor_name and entry.filter in tensor_name):
                return evaluate(entry.value, tensor_name, t)
        return None
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    low = int(scaled)
    high = min(len(setting) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * setting[low] + fraction * setting[high]


def shown(setting: Any) -> str:
    """A setting as text: a number as %g, a gradient or filter list as its YAML-like form."""
    if isinstance(setting, bool) or not isinstance(setting, (int, float, list, Conditional)):
        return str(setting)
    if isinstance(setting, (int, float)):
        return f"{setting:g}"
    if isinstance(setting, Conditional):
        return shown([setting])
    return "[" + ", ".join(
        f"{{filter: {entry.filter}, value: {shown(entry.value)}}}" if isinstance(entry, Conditional)
        else shown(entry) for entry in setting) + "]"


def varies(setting: Any) -> bool:
    """Whether a setting can take different values on different tensors."""
    return isinstance(setting, (list, Conditional))


class MethodSettings(StrictModel):
    """What every method's settings hold: its name and the scale λ (output = B + λ·M). Each
    method subclasses this with its own keys, so a key of another method is an error."""

    name: str
    scale: Varying[float] = 1.0

    # keys a source may set for itself (sources[i].parameters), as mergekit's per-model
    # parameters; every other key is one value (or gradient, or filter list) for all sources
    per_source: ClassVar[frozenset[str]] = frozenset()
    # whether the sources' `weight` w_i has an effect (mergekit's slerp, karcher, model_stock, ...
    # take no weights): where it has none, a weight other than 1 is refused
    takes_weights: ClassVar[bool] = True

    @classmethod
    def svc_auto_alpha(cls, num_sources: int) -> tuple[float, str]:
        """SVC's α for `alpha: auto` after this method, and where the choice comes from."""
        return 1.0 / num_sources, "1/N (the SVC authors' setting after every method but TSV-M)"

    def at(self, tensor_name: str, t: float, overrides: dict[str, Any] | None = None
           ) -> MethodSettings:
        """These settings with every value resolved for one tensor: a source's own value
        first (`overrides`), then the method block's, then the key's default."""
        resolved = {}
        for key, field in type(self).model_fields.items():
            value = None
            for scope in (overrides or {}, {key: getattr(self, key)}):
                if key in scope:
                    value = evaluate(scope[key], tensor_name, t)
                    if value is not None:
                        break
            resolved[key] = field.default if value is None else value
        return self.model_copy(update=resolved)

    def described(self) -> str:
        """The method's own keys and values, for the model card and summaries."""
        return ", ".join(f"{key} {shown(getattr(self, key))}"
                         for key in type(self).model_fields if key not in ("name", "scale"))


def settings_for_tensor(method: MethodSettings, source_parameters: list[dict[str, Any]],
                        weights: list[Any], tensor_name: str, t: float
                        ) -> tuple[MethodSettings, list[MethodSettings], list[float]]:
    """The method's settings, each source's settings and the weights w_i, resolved for one
    tensor at layer position t."""
    resolved_weights = []
    for weight in weights:
        value = evaluate(weight, tensor_name, t)
        resolved_weights.append(1.0 if value is None else float(value))
    return (method.at(tensor_name, t),
            [method.at(tensor_name, t, overrides=parameters) for parameters in source_parameters],
            resolved_weights)


def method_settings_classes() -> dict[str, type[MethodSettings]]:
    """Every registered method's settings model, by method name (from the methods' registry,
    imported on first use)."""
    registry = import_module("raymerge.methods").METHODS
    return {name: method.Settings for name, method in registry.items()}


def method_settings_class(name: str) -> type[MethodSettings]:
    """The settings model the method `name` declares; ValueError naming the known methods."""
    known = method_settings_classes()
    if name not in known:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(known))}")
    return known[name]


def read_yaml(path: Path | str, what: str) -> Any:
    """A YAML file's data (safe_load: no tags that construct objects), from a local path or an
    object-store URI (s3://…, credentials and endpoint from the environment); RecipeError in one
    line naming `what` (recipe, tune config, registry) when it is missing or not YAML."""
    from raymerge.store import read_text

    try:
        return yaml.safe_load(read_text(str(path)))
    except FileNotFoundError:
        raise RecipeError(f"{what} {path} not found: check the path") from None
    except OSError as error:
        raise RecipeError(f"{what} {path}: {one_line(error)}; check the credentials and "
                          "AWS_ENDPOINT_URL (or the path)") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{what} {path} is not valid YAML: {one_line(error)}") from None


ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


def validate_config(model: type[ConfigModel], data: Any, origin: str,
                    prefix: str | None = None) -> ConfigModel:
    """model.model_validate, failing with one line that names every offending key (under
    `prefix`, for a model that is one block of a larger file)."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(_problem(item, prefix) for item in error.errors())
        raise RecipeError(f"{origin}: {problems}") from None


def _problem(item: dict, prefix: str | None = None) -> str:
    """'key.path: message'; the tags of a Varying value's forms ('=scalar', ...) left out of the
    path, and a whole-recipe check's message (which names its keys) without one."""
    parts = [prefix] if prefix else []
    where = ".".join(str(part) for part in [*parts, *item["loc"]] if not str(part).startswith("="))
    message = item["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())
