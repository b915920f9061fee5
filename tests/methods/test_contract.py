"""The method contract: every method declares what it is and can do; the engine asks nothing
else; the recipe and the methods do not import each other; the README's example method works."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from raymerge.methods import METHODS, MergeOptions, build_method, footprint, statistics_of
from raymerge.methods.base import Method
from raymerge.recipe import method_settings, recipe_from_dict
from raymerge.settings import MethodSettings

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_itself(name):
    method = METHODS[name]
    assert issubclass(method, Method) and method.name == name
    assert method.title and method.paper
    assert issubclass(method.Settings, MethodSettings)
    assert method.Settings.per_source <= set(method.Settings.model_fields)
    assert method.max_passes >= 1 and method.state_tensors >= 0
    passes, state = footprint(name, calibrated=True)
    assert (passes, state) == (method.max_passes + 1, method.state_tensors + 1)
    keys = [stat.key for stat in statistics_of(name, calibrated=True)]
    assert len(keys) == len(set(keys)) and {"delta_rms", "svc_gamma_median"} <= set(keys)


def test_the_engine_probes_no_method_for_what_it_has():
    for path in ("raymerge/execute.py", "raymerge/merge.py", "raymerge/methods/calibrated.py"):
        text = (REPO / path).read_text()
        # hasattr, or getattr with a default: asking an object whether it has something
        assert not re.search(r"\bhasattr\(|\bgetattr\([^()]*,[^()]*,", text), path


def test_the_recipe_and_the_methods_do_not_import_each_other():
    def loaded_after(module: str) -> set[str]:
        run = subprocess.run([sys.executable, "-c", f"import sys, {module}; print(' '.join("
                              "m for m in sys.modules if m.startswith('raymerge')))"],
                             capture_output=True, text=True, check=True, cwd=REPO)
        return set(run.stdout.split())

    assert "raymerge.methods" not in loaded_after("raymerge.recipe")
    assert "raymerge.recipe" not in loaded_after("raymerge.methods")


def test_svc_alpha_auto_follows_the_authors_per_method():
    def recipe(method: str, alpha="auto"):
        return recipe_from_dict({"base": "b", "sources": ["s1", "s2", "s3", "s4"],
                                 "method": {"name": method},
                                 "calibrate": {"svc": {"alpha": alpha}}})

    assert recipe("tsv").svc_alpha() == 1.0 and "run.sh" in recipe("tsv").svc_alpha_rule()[1]
    for other in ("task_arithmetic", "ties", "dare", "axis", "iso_c", "iso_cts"):
        assert recipe(other).svc_alpha() == 0.25
    assert recipe("tsv", 0.3).svc_alpha() == 0.3  # a number overrides auto


def _readme_example(monkeypatch) -> types.ModuleType:
    """The README's example method, loaded as a module of raymerge.methods."""
    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n# raymerge/methods/mean.py\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("raymerge.methods.mean")
    module.__package__ = "raymerge.methods"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md example", "exec"), module.__dict__)
    return module


def test_the_readme_example_method_merges_with_its_own_settings(monkeypatch):
    example = _readme_example(monkeypatch)
    monkeypatch.setitem(METHODS, "mean", example.Mean)
    settings = method_settings({"name": "mean", "shrink": 0.5})
    with pytest.raises(ValueError,
                       match="mean does not take 'density' \\(a key of [^)]*\\bties\\b"):
        method_settings({"name": "mean", "density": 0.2})
    per_source = [settings, settings.model_copy(update={"shrink": 0.0})]
    method = build_method(settings, [1.0, 3.0], MergeOptions(), source_settings=per_source)
    method.begin("w", torch.zeros(3))
    method.update(0, 0, torch.full((3,), 2.0))
    method.update(0, 1, torch.full((3,), 4.0))
    assert method.finish().tolist() == [(0.5 * 2 + 3 * 4) / 4] * 3


def test_the_readme_lists_every_method_with_its_keys():
    """The README's table of methods and keys says what the code declares: no method or key is
    undocumented."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("Each method's keys"):text.index("Every key but")]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`(\w+)`", line.split("|")[1]):
                rows[name] = line
    for name, method in METHODS.items():
        assert name in rows, f"README has no row for method {name}"
        for key in method.Settings.model_fields:
            if key not in ("name", "scale"):
                assert f"`{key}`" in rows[name], f"README's row of {name} lacks key {key}"
