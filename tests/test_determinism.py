"""The same recipe gives byte-identical files whatever the number of tasks in flight and the
order in which units are submitted and finish (nodes: tests/distributed/test_two_node_cluster)."""

from __future__ import annotations

import random

import pytest
from helpers import file_digests, write_recipe

from raymerge.cli import main
from raymerge.plan import Plan


@pytest.mark.parametrize("method", [
    {"name": "ties", "density": 0.5},
    {"name": "axis", "k": 6},
    {"name": "wudi", "iter_num": 20, "lr": 1e-4},  # an optimiser's 20 steps, state in G and B
])
def test_output_bytes_do_not_depend_on_scheduling(ray_cluster, float32_family, tmp_path,
                                                  monkeypatch, method):
    largest_first = Plan.largest_first
    orders = {
        "largest-first": largest_first,
        "reversed": lambda plan: largest_first(plan)[::-1],
        "shuffled": lambda plan: random.Random(7).sample(largest_first(plan),
                                                         len(plan.units)),
    }
    digests = {}
    for (order, submit), in_flight in zip(orders.items(), (1, 4, 2)):
        monkeypatch.setattr(Plan, "largest_first", submit)
        out = tmp_path / f"out-{order}"
        recipe = write_recipe(tmp_path / f"recipe-{order}.yaml", {
            "base": str(float32_family["base"]),
            "sources": [str(p) for p in float32_family["sources"]],
            "method": method, "calibrate": {"svc": {"alpha": "auto"}},
            "output": {"path": str(out), "shard_size": "40KB"},
            "runtime": {"max_in_flight": in_flight}})
        assert main(["merge", str(recipe), "--no-progress"]) == 0
        digests[order] = file_digests(out)
    assert len(digests["largest-first"]) >= 3
    assert digests["reversed"] == digests["largest-first"] == digests["shuffled"]
