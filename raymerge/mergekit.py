"""A mergekit 0.1.5 YAML as a raymerge recipe. Every key of mergekit's configuration either has
its effect here, or is accepted and recorded in the recipe's `no_effect` (an option that changes
nothing in mergekit's result either: `int8_mask`, ...), or is a one-line RecipeError naming it:
none is dropped unread. `slices:` are mapped by raymerge.mergekit_slices.

mergekit's methods map onto raymerge methods with the settings that reproduce them exactly
(`MERGEKIT_METHODS`: mergekit's defaults written out where raymerge's differ); mergekit's
parameters keep their names, values, gradients and filters. Per-model parameters become the
source's `weight` and `parameters:` (a parameter mergekit binds once for all models, given per
model, is an error: mergekit would not use it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymerge.errors import RecipeError

TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "slices", "modules"}
COMPUTE_DTYPES = {"float64": "float64", "float32": "float32", "bfloat16": "float32",
                  "float16": "float32"}


@dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit method becomes a raymerge one."""

    method: str  # the raymerge method
    shared: tuple[str, ...] = ()  # mergekit parameters bound once for all models
    per_model: tuple[str, ...] = ()  # mergekit parameters each model may set (besides weight)
    weights: bool = True  # whether models carry a `weight` (required where mergekit requires)
    weight_required: bool = False
    # required | optional (nuslerp: without one, the first model is v0) | symmetric (every model
    # a point of the merge, base_model too: raymerge's base is the first)
    base: str = "required"
    settings: dict[str, Any] = field(default_factory=dict)  # raymerge settings always written
    defaults: dict[str, Any] = field(default_factory=dict)  # mergekit's defaults raymerge lacks
    sources: tuple[int, int | None] = (1, None)  # how many non-base models mergekit takes
    # mergekit parameters that change nothing in its result: accepted, reported (NO_EFFECT)
    no_effect: tuple[str, ...] = ()


_GTA = dict(weight_required=True, no_effect=("int8_mask",))
MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    "task_arithmetic": MergekitMethod("task_arithmetic", ("normalize", "lambda"), **_GTA),
    "ties": MergekitMethod("ties", ("normalize", "rescale", "lambda"), ("density",),
                           settings={"zero_sum_sign": "positive"},
                           defaults={"density": 1.0, "normalize": True, "rescale": False},
                           **_GTA),
    "dare_linear": MergekitMethod("dare", ("normalize", "rescale", "lambda"), ("density",),
                                  defaults={"rescale": True}, **_GTA),
    "dare_ties": MergekitMethod("dare_ties", ("normalize", "rescale", "lambda"), ("density",),
                                **_GTA),
    "breadcrumbs": MergekitMethod("breadcrumbs", ("normalize", "rescale", "lambda"),
                                  ("density", "gamma"), **_GTA),
    "breadcrumbs_ties": MergekitMethod("breadcrumbs_ties", ("normalize", "rescale", "lambda"),
                                       ("density", "gamma"), **_GTA),
    "della": MergekitMethod("della", ("normalize", "rescale", "lambda"), ("density", "epsilon"),
                            **_GTA),
    "della_linear": MergekitMethod("della_linear", ("normalize", "rescale", "lambda"),
                                   ("density", "epsilon"), **_GTA),
    "sce": MergekitMethod("sce", ("select_topk",), weights=False, no_effect=("int8_mask",)),
    "linear": MergekitMethod("task_arithmetic", ("normalize",), base="symmetric",
                             weight_required=True),
    "slerp": MergekitMethod("slerp", ("t",), weights=False, sources=(1, 1)),
    "nuslerp": MergekitMethod("nuslerp", ("nuslerp_flatten", "nuslerp_row_wise"),
                              base="optional", sources=(1, 2), weight_required=True),
    "multislerp": MergekitMethod("multislerp", ("normalize_weights", "eps"), base="optional",
                                 weight_required=True),
    "karcher": MergekitMethod("karcher", ("max_iter", "tol"), weights=False, base="symmetric",
                              sources=(2, None)),
    "model_stock": MergekitMethod("model_stock", ("filter_wise",), weights=False,
                                  sources=(2, None)),
    "nearswap": MergekitMethod("nearswap", ("t",), weights=False, sources=(1, 1)),
    "arcee_fusion": MergekitMethod("arcee_fusion", (), weights=False, sources=(1, 1)),
    "ram": MergekitMethod("ram", ("epsilon",), weights=False),
    "ramplus_tl": MergekitMethod("ramplus_tl", ("r", "alpha", "epsilon"), weights=False),
}
# mergekit parameters that change nothing in mergekit's result: accepted, and reported by
# `raymerge plan` and the merge summary as having no effect, with the reason
NO_EFFECT = {
    "int8_mask": "it only picks the dtype of mergekit's 0/1 sign and keep masks (int8 or the "
                 "deltas' dtype); a 0/1 factor is exact in either, so mergekit's result is the "
                 "same bytes with or without it",
}
BASE_PARAMETERS = ("mergekit resolves no per-model parameter for base_model in {method}: the base "
                   "is not one of the merged task vectors")


def recipe_from_mergekit(data: dict[str, Any], origin: Path) -> dict[str, Any]:
    """The raymerge recipe (a mapping, validated by the caller) for a mergekit configuration."""
    unknown = sorted(set(map(str, data)) - TOP_LEVEL)
    if unknown:
        raise RecipeError(f"{origin}: {unknown[0]!r} is not a key of a mergekit 0.1.5 "
                          f"configuration (they are: {', '.join(sorted(TOP_LEVEL))}); fix it")
    if data.get("modules") is not None:
        raise RecipeError(
            f"{origin}: modules (a separate models: or slices: per module of a multimodal "
            "model) are not supported; raymerge merges every module of the models alike: use "
            "models: (or mergekit for per-module recipes)")
    name = data.get("merge_method")
    if data.get("slices") is not None or name == "passthrough":
        from raymerge.mergekit_slices import sliced_recipe

        return sliced_recipe(data, origin)
    if not isinstance(name, str) or name not in MERGEKIT_METHODS:
        raise RecipeError(f"{origin}: merge_method {name!r} is not a mergekit 0.1.5 method "
                          f"raymerge knows; use one of {', '.join(sorted(MERGEKIT_METHODS))}")
    spec = MERGEKIT_METHODS[name]
    notes: dict[str, str] = {}
    data = _take_no_effect(origin, data, spec, notes)
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{origin}: models: give at least one model")
    entries = [_model_entry(origin, index, entry) for index, entry in enumerate(models)]
    base = model_reference(origin, "base_model", data["base_model"], allow_lora=False) \
        if data.get("base_model") is not None else None
    top = _parameters(origin, "parameters", data.get("parameters"), spec, shared=True)
    if "weight" in top:  # checked here too: a weight every model sets itself is not used below
        _check_weight(origin, "parameters.weight", top["weight"])
    base, sources, base_weight = _roles(origin, name, spec, base, entries, notes)
    method = {"name": spec.method, **spec.settings, **_method_values(spec, top, name)}
    if base_weight is not None:
        method["base_weight"] = base_weight
    recipe: dict[str, Any] = {"base": base, "method": method, "sources": [
        _source(origin, spec, name, index, _adapter_path(origin, index, path, base), params, top)
        for index, (path, params) in sources]}
    if name == "linear":
        recipe["sources"] = _linear_weights(origin, entries, recipe["sources"], top)
    recipe |= dtype_keys(origin, data)
    recipe |= vocabulary_keys(origin, data)
    if notes:
        recipe["no_effect"] = notes
    return recipe


def _take_no_effect(origin: Path, data: dict, spec: MergekitMethod, notes: dict[str, str]
                    ) -> dict:
    """`data` without the parameters that have no effect in mergekit (int8_mask, ...), each
    recorded in `notes` (where -> its value and why it has none); a value mergekit would not
    take either is an error."""
    data = dict(data)

    def taken(where: str, params: Any) -> Any:
        if not isinstance(params, dict):
            return params  # refused later, with the mapping's message
        kept = dict(params)
        for key in spec.no_effect:
            if key in kept:
                value = kept.pop(key)
                if not isinstance(value, bool):
                    raise RecipeError(f"{origin}: {where}.{key}: expected true or false, got "
                                      f"{value!r}")
                notes[f"{where}.{key}"] = f"{str(value).lower()}: {NO_EFFECT[key]}"
        return kept

    if data.get("parameters") is not None:
        data["parameters"] = taken("parameters", data["parameters"])
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**entry, "parameters": taken(f"models.{index}.parameters", entry["parameters"])}
            if isinstance(entry, dict) and entry.get("parameters") is not None else entry
            for index, entry in enumerate(data["models"])]
    return data


def _roles(origin: Path, name: str, spec: MergekitMethod, base: str | None,
           entries: list[tuple[int, str, dict]], notes: dict[str, str]):
    """(base, [(model index, (source path, its parameters))], base_weight), with mergekit's
    roles: a base-aware method's base_model is not one of its merged models (a listed one is
    dropped); for linear and karcher every model is a point of the merge, base_model among them
    (mergekit appends it when it is not listed), and the first is raymerge's base."""
    base_weight = None
    if spec.base == "symmetric":
        if base is not None and all(path != base for _, path, _ in entries):
            if name == "linear":
                raise RecipeError(f"{origin}: base_model is not among the models, and linear "
                                  "weighs every model (mergekit adds it without a weight, an "
                                  "error there too); list it under models with a weight")
            entries = [*entries, (len(entries), base, {})]
        (first_index, base, first), entries = entries[0], entries[1:]
        _model_parameters(origin, spec, first_index, first)
    elif base is None:
        if spec.base == "required":
            raise RecipeError(f"{origin}: base_model is required for {name} (mergekit requires "
                              "it too); add base_model")
        if name == "multislerp":
            raise RecipeError(f"{origin}: multislerp without base_model interpolates the models' "
                              "weights themselves; raymerge's multislerp interpolates task "
                              "vectors from a base: add base_model")
        (first_index, base, first), entries = entries[0], entries[1:]  # nuslerp: v0 first
        _model_parameters(origin, spec, first_index, first)
        base_weight = first.get("weight")
        if len(entries) != 1:
            raise RecipeError(f"{origin}: nuslerp without base_model merges exactly two models, "
                              f"got {len(entries) + 1}")
    sources = []
    for index, path, params in entries:
        if path == base and spec.base != "symmetric":
            _parameters(origin, f"models.{index}.parameters", params, spec, shared=False)
            for key, value in params.items():  # checked, then reported: mergekit reads none
                notes[f"models.{index}.parameters.{key}"] = \
                    f"{value!r}: {BASE_PARAMETERS.format(method=name)}"
            continue
        sources.append((index, (path, params)))
    low, high = spec.sources
    count = len(sources) + (1 if spec.base == "symmetric" else 0)
    if count < low or (high is not None and count > high):
        wanted = f"{low}" if low == high else f"{low} to {high}" if high else f"at least {low}"
        raise RecipeError(f"{origin}: {name} merges {wanted} model(s) besides the base, got "
                          f"{count}; list them under models:")
    return base, sources, base_weight


def _model_entry(origin: Path, index: int, entry: Any) -> tuple[int, str, dict]:
    if not isinstance(entry, dict) or "model" not in entry:
        raise RecipeError(f"{origin}: models.{index}: expected a mapping with 'model'")
    extra = sorted(set(map(str, entry)) - {"model", "parameters"})
    if extra:
        raise RecipeError(f"{origin}: models.{index}.{extra[0]}: not a key of a mergekit model "
                          "entry (model, parameters)")
    path = model_reference(origin, f"models.{index}.model", entry["model"], allow_lora=True)
    return index, path, _mapping(origin, f"models.{index}.parameters", entry.get("parameters"))


def model_reference(origin: Path, where: str, reference: Any, allow_lora: bool) -> str:
    """A mergekit ModelReference: 'path[@revision][+lora]' or {model: {path, revision}, lora}."""
    if isinstance(reference, dict):
        unknown = sorted(set(map(str, reference)) - {"model", "lora"})
        if unknown:
            raise RecipeError(f"{origin}: {where}.{unknown[0]}: not supported (raymerge reads the "
                              "architecture from config.json); remove it")
        model, lora = reference.get("model"), reference.get("lora")
        if isinstance(model, dict):
            model = f"{model['path']}@{model['revision']}" if model.get("revision") \
                else model.get("path")
        if isinstance(lora, dict):
            lora = f"{lora['path']}@{lora['revision']}" if lora.get("revision") \
                else lora.get("path")
        reference = f"{model}+{lora}" if lora else model
    if not isinstance(reference, str) or not reference:
        raise RecipeError(f"{origin}: {where}: expected a model path or Hub id, got {reference!r}")
    model, plus, lora = reference.partition("+")
    if not plus:
        return reference
    if not allow_lora:
        raise RecipeError(f"{origin}: {where}: a LoRA on the base model ({reference}) is not "
                          "supported; merge the adapter into it first")
    return f"{model}+{lora}"


def _adapter_path(origin: Path, index: int, path: str, base: str) -> str:
    """mergekit's 'model+lora' (the model with the adapter merged in) as a raymerge source: a
    LoRA adapter source when the model is the base (raymerge merges it in factored form)."""
    model, plus, lora = path.partition("+")
    if not plus:
        return path
    if model != base:
        raise RecipeError(
            f"{origin}: models.{index}.model: {path} is a LoRA on {model}, not on base_model "
            f"{base}; raymerge's LoRA sources are adapters of the base: merge the adapter into "
            f"{model} first (peft merge_and_unload) and list the result")
    return lora


def _mapping(origin: Path, where: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{origin}: {where}: expected a mapping, got {value!r}")
    return value


def _parameters(origin: Path, where: str, value: Any, spec: MergekitMethod,
                shared: bool) -> dict:
    """mergekit parameters checked against what the method takes (in that scope)."""
    params = _mapping(origin, where, value)
    allowed = set(spec.shared) | set(spec.per_model) | ({"weight"} if spec.weights else set())
    for key in params:
        if key not in allowed:
            takes = ", ".join(sorted(allowed)) or "no parameters"
            raise RecipeError(f"{origin}: {where}.{key}: not a parameter of mergekit's "
                              f"{_mergekit_name(spec)} (it takes: {takes}); fix or remove it")
    return params


def _check_weight(origin: Path, where: str, value: Any) -> None:
    from pydantic import ValidationError

    from raymerge.recipe import SourceSpec

    try:
        SourceSpec.model_validate({"path": "-", "weight": value})
    except ValidationError as error:
        raise RecipeError(f"{origin}: {where}: {error.errors()[0]['msg']}") from None


def _mergekit_name(spec: MergekitMethod) -> str:
    return next(name for name, other in MERGEKIT_METHODS.items() if other is spec)


def _method_values(spec: MergekitMethod, top: dict, name: str) -> dict:
    """The method block: mergekit's shared parameters (lambda is raymerge's scale), then
    mergekit's defaults where raymerge's differ; per-model keys given at the top level too."""
    values = dict(spec.defaults)
    for key, value in top.items():
        if key == "weight":
            continue
        values["scale" if key == "lambda" else key] = value
    if name == "dare_linear":
        density = values.pop("density", None)
        if density is not None:
            values["p"] = _one_minus(density)
    if name == "linear":
        values.pop("normalize", None)  # the weights are divided by their sum instead
    return values


def _model_parameters(origin: Path, spec: MergekitMethod, index: int, params: dict) -> dict:
    """One model's parameters: the method's, and none that mergekit binds once for all."""
    params = _parameters(origin, f"models.{index}.parameters", params, spec, shared=False)
    shared_given = sorted(set(params) & (set(spec.shared) - set(spec.per_model)))
    if shared_given:
        raise RecipeError(
            f"{origin}: models.{index}.parameters.{shared_given[0]}: {_mergekit_name(spec)} "
            "binds it once for all models (mergekit ignores a per-model value); put it under "
            "parameters:")
    return params


def _source(origin: Path, spec: MergekitMethod, name: str, index: int, path: str, params: dict,
            top: dict) -> dict:
    params = _model_parameters(origin, spec, index, params)
    source: dict[str, Any] = {"path": path}
    weight = params.get("weight", top.get("weight"))
    if spec.weights and weight is None and spec.weight_required and name != "linear":
        raise RecipeError(f"{origin}: models.{index}: weight is required for {name} (mergekit "
                          "requires it too); add parameters: {weight: 1.0}")
    if weight is not None:
        source["weight"] = weight
    own = {key: value for key, value in params.items() if key in spec.per_model}
    if name == "dare_linear" and "density" in own:
        own = {"p": _one_minus(own.pop("density")), **own}
    if own:
        source["parameters"] = own
    return source


def _one_minus(value: Any) -> Any:
    """mergekit's density as raymerge's drop probability p = 1 − density, through gradients and
    filters."""
    if isinstance(value, list):
        return [_one_minus(entry) for entry in value]
    if isinstance(value, dict):
        return {**value, "value": _one_minus(value.get("value"))}
    return 1.0 - value if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else value


def _linear_weights(origin: Path, entries, sources: list[dict], top: dict) -> list[dict]:
    """mergekit linear: Σ w_i W_i / Σ w_i over every model, the first as the base. As deltas
    from it: each other model's weight becomes w_i / Σ w (the base's share is what is left)."""
    weights = []
    for index, _path, params in entries:
        weight = params.get("weight", top.get("weight"))
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise RecipeError(f"{origin}: models.{index}.parameters.weight: linear needs a number "
                              f"per model (a gradient or filter cannot be normalized), got "
                              f"{weight!r}")
        weights.append(float(weight))
    normalize = top.get("normalize", True)
    total = sum(weights)
    if normalize is not True:
        if total != 1:
            raise RecipeError(f"{origin}: parameters.normalize: false with weights summing to "
                              f"{total:g} scales the base too; raymerge merges deltas from a "
                              "base: use normalize: true or weights that sum to 1")
        total = 1.0
    if total == 0:
        raise RecipeError(f"{origin}: linear weights sum to 0; give positive weights")
    return [{**source, "weight": weight / total}
            for source, weight in zip(sources, weights[1:])]


def dtype_keys(origin: Path, data: dict) -> dict:
    """out_dtype (else dtype) is the output's dtype; dtype float64 computes in float64. Lower
    precisions compute in float32 in raymerge (mergekit computes in them)."""
    result: dict[str, Any] = {}
    dtype, out_dtype = data.get("dtype"), data.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None and (not isinstance(value, str) or value not in COMPUTE_DTYPES):
            raise RecipeError(f"{origin}: {key}: {value!r} is not one of "
                              f"{', '.join(COMPUTE_DTYPES)}")
    output = out_dtype or dtype
    if output is not None:
        result["output"] = {"dtype": output}
    if dtype == "float64":
        result["runtime"] = {"compute_dtype": "float64"}
    return result


def vocabulary_keys(origin: Path, data: dict) -> dict:
    """tokenizer_source / tokenizer / chat_template onto the recipe's tokenizer and
    chat_template keys."""
    result: dict[str, Any] = {}
    source, tokenizer = data.get("tokenizer_source"), data.get("tokenizer")
    if source is not None and tokenizer is not None:
        raise RecipeError(f"{origin}: give tokenizer_source or tokenizer, not both (mergekit "
                          "refuses both too)")
    if source is not None:
        result["tokenizer"] = {"source": model_reference(origin, "tokenizer_source", source,
                                                     allow_lora=False)}
    if tokenizer is not None:
        tokenizer = _mapping(origin, "tokenizer", tokenizer)
        unknown = sorted(set(tokenizer) - {"source", "pad_to_multiple_of", "tokens"})
        if unknown:
            raise RecipeError(f"{origin}: tokenizer.{unknown[0]}: not a key of mergekit's "
                              "tokenizer block (source, tokens, pad_to_multiple_of)")
        if tokenizer.get("tokens"):
            raise RecipeError(f"{origin}: tokenizer.tokens (an embedding source per token) is not "
                              "supported: a token new to the base takes the mean of the rows of "
                              "the sources that have it; remove tokens")
        result["tokenizer"] = {"source": model_reference(origin, "tokenizer.source",
                                                     tokenizer.get("source", "union"),
                                                     allow_lora=False)}
        if tokenizer.get("pad_to_multiple_of") is not None:
            result["tokenizer"]["pad_to_multiple_of"] = tokenizer["pad_to_multiple_of"]
    template = data.get("chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise RecipeError(f"{origin}: chat_template: expected a string, got {template!r}")
        if "{" not in template and template != "auto":
            from raymerge.chat_templates import NAMES, named_template

            text = named_template(template)
            if text is None:  # mergekit: "Invalid chat template"
                raise RecipeError(
                    f"{origin}: chat_template {template!r} is none of mergekit's bundled "
                    f"templates ({', '.join(NAMES)}), auto, or a Jinja template; fix it")
            template = text
        result["chat_template"] = template
    return result
