"""Fuzzing: malformed safetensors files and recipes make the loaders raise the project's own
errors (one line each), never anything else, never crash or hang the process."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymerge.errors import RaymergeError
from raymerge.recipe import load_recipe, recipe_from_dict
from raymerge.sources import resolve_checkpoint, validate_sources
from raymerge.sources.safetensors_header import read_header

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=2000,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
dtypes = st.one_of(st.sampled_from(["F32", "BF16", "F16", "I8", "F8_E4M3", "bogus"]), json_values)
entries = st.one_of(json_values, st.fixed_dictionaries({
    "dtype": dtypes,
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=3), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-10, 2**40), min_size=2, max_size=2),
                              json_values),
}))
headers = st.dictionaries(st.text(max_size=20), entries, max_size=4)


def safetensors_bytes(header: object, claimed: int | None, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if claimed is None else claimed) + text + data


def one_line_error(error: RaymergeError) -> bool:
    return len(str(error).splitlines()) == 1 and len(str(error)) > 10


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_as_source_errors(tmp_path, blob):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    try:
        read_header(path)
    except RaymergeError as error:
        assert one_line_error(error)


@FUZZ
@given(headers, st.one_of(st.none(), st.integers(0, 2**64 - 1)), st.binary(max_size=64))
def test_malformed_headers_raise_only_source_errors(tmp_path, header, claimed, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, claimed, data))
    try:
        tensors = read_header(path)
    except RaymergeError as error:
        assert one_line_error(error)
        return
    for info in tensors.values():  # what it accepts is self-consistent
        assert info.nbytes >= 0 and all(dim >= 0 for dim in info.shape)


@FUZZ
@given(header=headers, config=st.one_of(json_values, st.dictionaries(
    st.sampled_from(["model_type", "architectures", "vocab_size", "hidden_size"]),
    json_values)))
def test_a_fuzzed_source_beside_a_real_base_is_refused_cleanly(float32_family, tmp_path, header,
                                                               config):
    source = tmp_path / "fuzzed"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    (source / "model.safetensors").write_bytes(safetensors_bytes(header, None, b"\0" * 64))
    (source / "config.json").write_text(json.dumps(config))
    base = resolve_checkpoint(str(float32_family["base"]))
    with pytest.raises(RaymergeError) as caught:
        validate_sources(base, [resolve_checkpoint(str(source))])
    assert one_line_error(caught.value)


recipe_keys = st.sampled_from(["base", "sources", "method", "calibrate", "exclude", "output",
                               "runtime", "allow_pickle", "name", "k", "density", "p", "scale",
                               "svc", "alpha", "path", "weight", "shard_size", "memory",
                               "merge_method", "base_model", "models", "parameters"])
recipes = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(recipe_keys, inner, max_size=5)), max_leaves=15)


@FUZZ
@given(st.dictionaries(recipe_keys, recipes, max_size=6))
def test_fuzzed_recipes_raise_only_recipe_errors(data):
    try:
        recipe_from_dict(data)
    except RaymergeError as error:
        assert one_line_error(error)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.dictionaries(recipe_keys, recipes, max_size=6).map(
    lambda data: yaml.safe_dump(data))))
def test_fuzzed_recipe_files_raise_only_recipe_errors(tmp_path, text):
    path = Path(tmp_path) / "recipe.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RaymergeError as error:
        assert one_line_error(error)
