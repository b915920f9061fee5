"""mergekit's geometric and two-model methods, streamed one delta at a time, equal dense float64
implementations of mergekit's definitions (tests/reference_mergekit_geometric.py), including its
edge cases; their state does not grow with the number of sources."""

from __future__ import annotations

import pytest
import torch
from reference_mergekit_geometric import (
    arcee_fusion,
    karcher,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    ram,
    ramplus_tl,
    slerp,
)

from raymerge.errors import RecipeError
from raymerge.methods import METHODS, MergeOptions
from raymerge.methods.sphere import offset_slerp_coefficients, slerp_coefficients
from raymerge.recipe import method_settings, recipe_from_dict

NAME = "model.layers.0.mlp.up_proj.weight"


def _stream(name: str, base: torch.Tensor, deltas: list[torch.Tensor], weights=None,
            track_state: bool = False, **settings):
    """The engine's loop (execute._merge_tensor): passes × sources, a cached source skipped,
    a fresh copy of each delta. Returns M, how many deltas were read, and the most tensor
    elements the method held between updates."""
    weights = weights if weights is not None else [1.0] * len(deltas)
    method = METHODS[name](method_settings({"name": name, **settings}), weights)
    method.begin(NAME, base.clone())
    reads, held = 0, 0
    for pass_index in range(method.passes):
        for index, delta in enumerate(deltas):
            if method.cached_update(pass_index, index):
                continue
            reads += 1
            method.update(pass_index, index, delta.clone())
            if track_state:
                held = max(held, _held_elements(method))
    return method.finish(), reads, held


def _held_elements(method) -> int:
    total = 0
    for value in vars(method).values():
        values = value if isinstance(value, (list, tuple)) else [value]
        total += sum(v.numel() for v in values if isinstance(v, torch.Tensor))
    return total


def _assert_delta_close(actual: torch.Tensor, expected_weight: torch.Tensor, base: torch.Tensor,
                        tolerance: float) -> None:
    """|M − M_ref| ≤ tolerance·|M_ref| (+ tolerance·1e-6·|B| for M_ref = 0), M_ref from the
    reference's merged weight."""
    expected = expected_weight.double() - base.double()
    error = float((actual.double() - expected).norm())
    bound = tolerance * (float(expected.norm()) + 1e-6 * float(base.double().norm()) + 1e-30)
    assert actual.shape == expected.shape
    assert error <= bound, f"error {error:.3e} > {bound:.3e} (|M_ref| {float(expected.norm()):.3e})"


def _problem(shape, sources: int, strength: float, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    deltas = [strength * torch.randn(shape, generator=generator, dtype=torch.float64)
              for _ in range(sources)]
    return base.to(dtype), [delta.to(dtype) for delta in deltas]


def _models(base, deltas):
    return [base.double() + delta.double() for delta in deltas]


SHAPES = [(24, 16), (40,), (3, 5, 7), ()]


# --- slerp -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.4])
@pytest.mark.parametrize("strength", [0.01, 1.0])  # the linear branch, the spherical one
def test_slerp_equals_mergekit(shape, t, strength):
    base, deltas = _problem(shape, 1, strength, seed=len(shape))
    merged, reads, _ = _stream("slerp", base, deltas, t=t)
    _assert_delta_close(merged, slerp(t, base, _models(base, deltas)[0]), base, 1e-5)
    assert reads == 1


@pytest.mark.parametrize("case", ["parallel", "antiparallel", "zero_delta", "zero_base",
                                  "zero_source", "orthogonal"])
def test_slerp_edge_cases_as_mergekit(case):
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(30, 8, generator=generator)
    other = torch.randn(30, 8, generator=generator)
    source = {"parallel": 2 * base, "antiparallel": -base, "zero_delta": base.clone(),
              "zero_base": other, "zero_source": torch.zeros_like(base),
              "orthogonal": other - (other * base).sum() / (base * base).sum() * base}[case]
    if case == "zero_base":
        base = torch.zeros_like(base)
    t = 0.3
    merged, _, _ = _stream("slerp", base, [source - base], t=t)
    expected = slerp(t, base, source)
    _assert_delta_close(merged, expected, base, 1e-5)
    if case in ("parallel", "antiparallel", "zero_delta"):  # |cos θ| > 0.9995: linear
        torch.testing.assert_close(merged, t * (source - base), rtol=1e-6, atol=1e-6)
    if case == "zero_base":  # mergekit takes the zero norm as 1: θ = π/2
        torch.testing.assert_close(merged, torch.sin(torch.tensor(t * torch.pi / 2)) * source)


def test_the_cancellation_free_coefficients_equal_shoemakes():
    theta = torch.tensor([1e-6, 1e-3, 0.3, 1.5, 3.0], dtype=torch.float64)
    for t in (0.0, 0.25, 0.5, 1.0, 1.3):
        a, b = slerp_coefficients(t, theta)
        base_coefficient, delta_coefficient = offset_slerp_coefficients(t, theta)
        torch.testing.assert_close(base_coefficient, a + b - 1, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(delta_coefficient, b)


# --- nuslerp ---------------------------------------------------------------------------------

LAYOUTS = [{"nuslerp_flatten": True}, {"nuslerp_flatten": False},
           {"nuslerp_flatten": False, "nuslerp_row_wise": True}]


@pytest.mark.parametrize("shape", [(24, 16), (40,), (3, 5, 7)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.3, 0.9], [1.0, 0.0], [0.0, 2.0],
                                     [1.0, -1.0]])
def test_nuslerp_of_two_task_vectors_equals_mergekit(shape, layout, weights):
    base, deltas = _problem(shape, 2, 0.5, seed=3)
    merged, _, _ = _stream("nuslerp", base, deltas, weights, **layout)
    expected = nuslerp(_models(base, deltas), weights, base,
                       layout.get("nuslerp_row_wise", False), layout["nuslerp_flatten"])
    _assert_delta_close(merged, expected, base, 1e-5)
    if weights == [1.0, 0.0]:  # t = 0: the first task vector
        torch.testing.assert_close(merged, deltas[0])


@pytest.mark.parametrize("shape", [(24, 16), (40,), (3, 5, 7)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strength", [1e-3, 0.3, 3.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)])  # (base_weight, the source's)
def test_nuslerp_of_the_base_and_one_source_equals_mergekit_without_base(shape, layout,
                                                                       strength, weights):
    base, deltas = _problem(shape, 1, strength, seed=4)
    merged, _, _ = _stream("nuslerp", base, deltas, [weights[1]], base_weight=weights[0],
                           **layout)
    expected = nuslerp([base, _models(base, deltas)[0]], list(weights), None,
                       layout.get("nuslerp_row_wise", False), layout["nuslerp_flatten"])
    _assert_delta_close(merged, expected, base, 1e-5)


def test_nuslerp_from_the_base_keeps_its_accuracy_for_nearly_parallel_weights():
    """A fine-tune 1e-4 rad from its base: in float32, cos θ rounds to 1 and acos gives θ = 0
    (the linear branch, 2.5e-5 off the definition); raymerge's float32 M is within 1e-6."""
    base, deltas = _problem((64, 256), 1, 1e-4, seed=5)
    merged, _, _ = _stream("nuslerp", base, deltas, [1.0])
    expected = nuslerp([base, _models(base, deltas)[0]], [1.0, 1.0])
    _assert_delta_close(merged, expected, base, 1e-6)
    with pytest.raises(AssertionError):
        _assert_delta_close(0.5 * deltas[0], expected, base, 1e-5)


@pytest.mark.parametrize("case", ["parallel", "antiparallel", "zero_row", "zero_vector"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nuslerp_edge_cases_as_mergekit(case, layout):
    base, (first, other) = _problem((12, 10), 2, 0.5, seed=6)
    second = {"parallel": 3 * first, "antiparallel": -first, "zero_row": other.clone(),
              "zero_vector": torch.zeros_like(first)}[case]
    if case == "zero_row":
        second[2] = 0.0
        second[:, 3] = 0.0
    weights = [1.0, 0.6]
    merged, _, _ = _stream("nuslerp", base, [first, second], weights, **layout)
    t = 0.6 / 1.6
    if case == "antiparallel":
        # sin θ = 0 exactly: linear, mergekit's colinear branch. (A float64 acos of the rounded
        # cos θ = −1 ± 1e-16 falls on either side of 1 − cos²θ ≤ 1e-16, and the spherical
        # formula does not tend to the linear one at θ = π: the reference is not used here.)
        torch.testing.assert_close(merged, (1 - t) * first + t * second)
        return
    expected = nuslerp(_models(base, [first, second]), weights, base,
                       layout.get("nuslerp_row_wise", False), layout["nuslerp_flatten"])
    _assert_delta_close(merged, expected, base, 1e-5)
    if case == "parallel":  # θ ≈ 0 (3·Δ_0 rounded): linear interpolation to 1e-7
        torch.testing.assert_close(merged, (1 - t) * first + t * second)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nuslerp_of_the_base_and_its_negation_is_linear(layout):
    base, _ = _problem((12, 10), 0, 0.0, seed=7)
    merged, _, _ = _stream("nuslerp", base, [-2 * base], [0.25], **layout)  # W = −B, t = 0.2
    torch.testing.assert_close(merged, 0.2 * (-2 * base))


# --- multislerp ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("shape", [(24, 16), (40,)])
def test_multislerp_equals_mergekit(n, normalize_weights, shape):
    base, deltas = _problem(shape, n, 0.5, seed=n)
    weights = [0.5 + 0.25 * i for i in range(n)]
    merged, reads, _ = _stream("multislerp", base, deltas, weights,
                               normalize_weights=normalize_weights)
    expected = multislerp(base, _models(base, deltas), weights, normalize_weights)
    _assert_delta_close(merged, expected, base, 1e-5)
    assert reads == n
    if n == 1:  # mergekit returns the one model unweighted
        torch.testing.assert_close(merged, deltas[0])


def test_multislerp_edge_cases_as_mergekit():
    base, (first, second, third) = _problem((16, 8), 3, 0.5, seed=8)
    # antipodal pair with equal weights: the linear fallback (exactly zero here)
    merged, _, _ = _stream("multislerp", base, [first, -first], [1.0, 1.0])
    _assert_delta_close(merged, multislerp(base, _models(base, [first, -first]), [1.0, 1.0]),
                        base, 1e-6)
    # a zero task vector among others counts with its weight, with no direction
    sources = [first, torch.zeros_like(first), third]
    merged, _, _ = _stream("multislerp", base, sources, [1.0, 2.0, 1.0])
    _assert_delta_close(merged, multislerp(base, _models(base, sources), [1.0, 2.0, 1.0]),
                        base, 1e-5)
    # balanced antipodal sets of more than two: mergekit's error, in one line
    with pytest.raises(RecipeError, match="multislerp: tensor .* sum of the sources' unit"):
        _stream("multislerp", base, [first, -first, second, -second], [1.0] * 4)


# --- karcher ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("strength", [0.05, 1.0])
@pytest.mark.parametrize("max_iter", [0, 1, 3, 10])
def test_karcher_equals_mergekit_and_stops_reading_once_converged(n, strength, max_iter):
    base, deltas = _problem((20, 12), n, strength, seed=n, dtype=torch.float64)
    merged, reads, _ = _stream("karcher", base, deltas, max_iter=max_iter)
    expected, iterations = karcher([base, *_models(base, deltas)], max_iter=max_iter)
    _assert_delta_close(merged, expected, base, 1e-9)
    assert reads == n * (1 + iterations)  # pass 0, then one pass per iteration it computed


@pytest.mark.parametrize("strength", [0.01, 0.5])
def test_karcher_in_float32_is_close_to_the_float64_definition(strength):
    base, deltas = _problem((32, 24), 5, strength, seed=9)
    merged, _, _ = _stream("karcher", base, deltas)
    expected, _ = karcher([base, *_models(base, deltas)])
    _assert_delta_close(merged, expected, base, 2e-5)


def test_karcher_then_svc_calibrates_the_karcher_mean_after_its_early_stop():
    from reference_spectral import svc

    from raymerge.methods import build_method

    base, deltas = _problem((20, 12), 3, 0.3, seed=15, dtype=torch.float64)
    method = build_method(method_settings({"name": "karcher", "scale": 0.8}), [1.0] * 3,
                          MergeOptions(), svc_alpha=0.5)
    method.begin(NAME, base.clone())
    reads = 0
    for pass_index in range(method.passes):
        for index, delta in enumerate(deltas):
            if not method.cached_update(pass_index, index):
                reads += 1
                method.update(pass_index, index, delta.clone())
    merged = method.finish()
    karcher_mean, iterations = karcher([base, *_models(base, deltas)])
    expected = svc(0.8 * (karcher_mean - base), deltas, 0.5)
    torch.testing.assert_close(merged, expected, rtol=1e-9, atol=1e-12)
    assert iterations < 10 and reads == 3 * (1 + iterations) + 3  # + SVC's pass


@pytest.mark.parametrize("case", ["zero_source", "zero_base", "all_zero", "tol"])
def test_karcher_edge_cases_as_mergekit(case):
    base, deltas = _problem((10, 6), 3, 0.4, seed=10, dtype=torch.float64)
    settings = {}
    if case == "zero_source":  # W_1 = 0: not a valid point, but its norm counts in the scale
        deltas[1] = -base
    elif case == "zero_base":
        base = torch.zeros_like(base)
    elif case == "all_zero":
        base = torch.zeros_like(base)
        deltas = [torch.zeros_like(base) for _ in deltas]
    else:
        settings = {"tol": 1e-2}
    merged, _, _ = _stream("karcher", base, deltas, **settings)
    expected, _ = karcher([base, *_models(base, deltas)], **settings)
    _assert_delta_close(merged, expected, base, 1e-9)


# --- model_stock ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 6])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(24, 16), (40,), (3, 5, 7)])
def test_model_stock_equals_mergekit(n, filter_wise, shape):
    base, deltas = _problem(shape, n, 0.5, seed=n)
    shared = _problem(shape, 1, 0.5, seed=100)[1][0]  # correlated task vectors: 0 < cos θ < 1
    deltas = [delta + shared for delta in deltas]
    merged, reads, _ = _stream("model_stock", base, deltas, filter_wise=filter_wise)
    expected = model_stock(base, _models(base, deltas), filter_wise)
    _assert_delta_close(merged, expected, base, 1e-5)
    assert reads == n


@pytest.mark.parametrize("case", ["opposite", "parallel", "zero_source", "zero_row"])
def test_model_stock_edge_cases_as_mergekit(case):
    base, (first, second, third) = _problem((12, 8), 3, 0.5, seed=11)
    sources = {"opposite": [first, -first], "parallel": [first, 2 * first],
               "zero_source": [first, torch.zeros_like(first), third],
               "zero_row": [first, second.index_fill(0, torch.tensor([2]), 0.0)]}[case]
    for filter_wise in (False, True):
        merged, _, _ = _stream("model_stock", base, sources, filter_wise=filter_wise)
        expected = model_stock(base, _models(base, sources), filter_wise)
        _assert_delta_close(merged, expected, base, 1e-5)
    if case == "opposite":  # 1 + (N − 1)·cos θ = 0: mergekit keeps the base
        assert merged.abs().max() < 1e-6


# --- nearswap, arcee_fusion -------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 10.0])
@pytest.mark.parametrize("shape", [(24, 16), (40,), ()])
def test_nearswap_equals_mergekit(t, shape):
    base, deltas = _problem(shape, 1, 0.05, seed=12)
    if deltas[0].dim():
        deltas[0].view(-1)[:3] = 0.0  # unchanged entries
    merged, _, _ = _stream("nearswap", base, deltas, t=t)
    _assert_delta_close(merged, nearswap(t, base, _models(base, deltas)[0]), base, 1e-6)
    if t == 0.0:
        assert not merged.any()


@pytest.mark.parametrize("shape", [(24, 16), (40,), (3, 5, 7), (257, 3)])
@pytest.mark.parametrize("strength", [0.05, 1.0])
def test_arcee_fusion_equals_mergekit(shape, strength):
    base, deltas = _problem(shape, 1, strength, seed=13)
    merged, _, _ = _stream("arcee_fusion", base, deltas)
    expected = arcee_fusion(base, _models(base, deltas)[0])
    _assert_delta_close(merged, expected, base, 1e-6)
    kept = merged != 0
    assert 0 < int(kept.sum()) < merged.numel()  # the threshold keeps some, not all
    torch.testing.assert_close(merged[kept], deltas[0][kept])  # kept changes are whole


def test_arcee_fusion_keeps_everything_when_the_quartiles_coincide():
    base, deltas = _problem((16, 8), 1, 0.5, seed=14)
    deltas[0][:, :6] = 0.0  # most importances 0: threshold 0, every entry passes
    merged, _, _ = _stream("arcee_fusion", base, deltas)
    torch.testing.assert_close(merged, deltas[0])


# --- ram, ramplus_tl --------------------------------------------------------------------------

def _sparse_problem(shape, n, seed):
    """Task vectors that leave many entries unchanged, some by less than epsilon."""
    base, deltas = _problem(shape, n, 0.1, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    sparse = []
    for delta in deltas:
        keep = torch.rand(shape, generator=generator) < 0.4
        tiny = torch.rand(shape, generator=generator) < 0.2
        sparse.append(torch.where(keep, delta, torch.where(tiny, 1e-6, 0.0)))
    return base, sparse


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("shape", [(24, 16), (40,)])
@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_ram_equals_mergekit(n, shape, epsilon):
    base, deltas = _sparse_problem(shape, n, seed=n)
    merged, reads, _ = _stream("ram", base, deltas, epsilon=epsilon)
    _assert_delta_close(merged, ram(base, _models(base, deltas), epsilon), base, 1e-6)
    assert reads == n


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("shape", [(24, 16), (40,)])
@pytest.mark.parametrize("settings", [{}, {"r": 0.5, "alpha": 1.0, "epsilon": 0.05},
                                      {"r": 2.0, "alpha": 0.0}])
def test_ramplus_tl_equals_mergekit(n, shape, settings):
    base, deltas = _sparse_problem(shape, n, seed=n + 20)
    merged, reads, _ = _stream("ramplus_tl", base, deltas, **settings)
    _assert_delta_close(merged, ramplus_tl(base, _models(base, deltas), **settings), base, 1e-6)
    assert reads == 2 * n


def test_ramplus_tl_boosts_unique_changes_of_a_source_that_shares_many():
    # source 0 changes 4 entries, 2 of them shared: ρ = 2/2 → λ = 1 + 0.1·min(1, 0.2) = 1.02
    base = torch.zeros(6)
    deltas = [torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
              torch.tensor([0.0, 0.0, 3.0, 3.0, 0.0, 5.0])]
    merged, _, _ = _stream("ramplus_tl", base, deltas)
    # source 1: 2 shared, 1 unique: ρ = 2 → λ = 1.02 as well
    torch.testing.assert_close(merged, torch.tensor([1.02, 1.02, 2.0, 2.0, 0.0, 5.1]))
    plain, _, _ = _stream("ram", base, deltas)
    torch.testing.assert_close(plain, torch.tensor([1.0, 1.0, 2.0, 2.0, 0.0, 5.0]))


# --- state bounded in N, and the refusals ------------------------------------------------------

@pytest.mark.parametrize("name", ["multislerp", "karcher", "model_stock", "ram", "ramplus_tl"])
def test_state_does_not_grow_with_the_number_of_sources(name):
    held = {}
    for n in (3, 9):
        base, deltas = _problem((32, 16), n, 0.3, seed=n)
        _, _, held[n] = _stream(name, base, deltas, track_state=True)
    assert held[3] == held[9] <= 4 * 32 * 16, held


@pytest.mark.parametrize("name, counts", [("slerp", (0, 2)), ("nearswap", (2, 3)),
                                          ("arcee_fusion", (2,)), ("nuslerp", (3, 4)),
                                          ("model_stock", (1,))])
def test_source_counts_a_method_does_not_take_are_refused_before_reading(name, counts):
    settings = method_settings({"name": name, **({"t": 0.5} if "t" in
                                                 METHODS[name].Settings.model_fields else {})})
    for count in counts:
        with pytest.raises(RecipeError, match=f"method {name} (takes|needs at least)"):
            METHODS[name].check(settings, {NAME: (4, 4)}, count, MergeOptions())


def test_nuslerp_refuses_base_weight_with_two_sources():
    settings = method_settings({"name": "nuslerp", "base_weight": 2.0})
    METHODS["nuslerp"].check(settings, {NAME: (4, 4)}, 1, MergeOptions())
    with pytest.raises(RecipeError, match="base_weight applies only to one source"):
        METHODS["nuslerp"].check(settings, {NAME: (4, 4)}, 2, MergeOptions())


def test_t_is_required_and_must_resolve_for_every_tensor():
    recipe = {"base": "b", "sources": ["s"]}
    with pytest.raises(RecipeError, match="method.t: Field required"):
        recipe_from_dict({**recipe, "method": {"name": "slerp"}})
    settings = method_settings({"name": "slerp", "t": [{"filter": "mlp", "value": 0.4}]})
    METHODS["slerp"].check(settings.at(NAME, 0.0), {NAME: (4, 4)}, 1, MergeOptions())
    attention = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(RecipeError, match=f"slerp: t has no value for tensor {attention}"):
        METHODS["slerp"].check(settings.at(attention, 0.0), {attention: (4, 4)}, 1,
                               MergeOptions())


@pytest.mark.parametrize("name", ["slerp", "karcher", "model_stock", "nearswap", "arcee_fusion",
                                  "ram", "ramplus_tl"])
def test_a_source_weight_is_refused_where_mergekit_takes_none(name):
    method = {"name": name, **({"t": 0.5} if name in ("slerp", "nearswap") else {})}
    recipe_from_dict({"base": "b", "sources": ["s1", "s2"], "method": method})  # weight 1: fine
    with pytest.raises(RecipeError, match=f"sources.1.weight: method {name} does not weigh"):
        recipe_from_dict({"base": "b", "sources": ["s1", {"path": "s2", "weight": 0.5}],
                          "method": method})
    for weighted in ("nuslerp", "multislerp"):
        recipe_from_dict({"base": "b", "sources": ["s1", {"path": "s2", "weight": 0.5}],
                          "method": {"name": weighted}})
