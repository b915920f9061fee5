"""Dense float64 references of mergekit 0.1.5's geometric and two-model methods, written from
their definitions (mergekit/merge_methods/{slerp,nuslerp,multislerp,karcher,model_stock,nearswap,
arcee_fusion,ram}.py) as directly as possible: every model's tensor at once, mergekit's order of
steps, acos for angles, all pairs for Model Stock. Each returns the merged weight."""

from __future__ import annotations

import torch


def _f64(tensors):
    return [tensor.double() for tensor in tensors]


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """v0 the base, v1 the other model; the whole tensor one vector."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    norm_a, norm_b = a.norm(), b.norm()
    norm_a = norm_a if norm_a > eps else torch.tensor(1.0, dtype=torch.float64)
    norm_b = norm_b if norm_b > eps else torch.tensor(1.0, dtype=torch.float64)
    cosine = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    if cosine.abs() > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(cosine)
    result = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return result.reshape(v0.shape)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False,
                    flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    a, b = v0.double(), v1.double()
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)

    def normalized(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cosine = (normalized(a) * normalized(b)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cosine**2) <= eps**2
    theta = torch.acos(torch.where(colinear, 0.0, cosine))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(models: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None,
            row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """Two models with weights; with a base, of their task vectors."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    first, second = _f64(models)
    if base is None:
        return nuslerp_vectors(t, first, second, row_wise, flatten)
    base = base.double()
    return base + nuslerp_vectors(t, first - base, second - base, row_wise, flatten)


def multislerp(base: torch.Tensor, models: list[torch.Tensor], weights: list[float],
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    base = base.double()
    if len(models) == 1:
        return models[0].double()
    deltas = torch.stack([model.double() - base for model in models])
    flat = deltas.reshape(len(models), -1)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if mean.norm() < eps:
        if len(models) == 2:
            return base + (deltas[0] * w[0] + deltas[1] * w[1])
        raise ValueError("the weighted sum of the unit task vectors is zero")
    mean = mean / mean.norm()
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w[:, None]).sum(0)
    tangent_norm = tangent.norm() + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return base + (result * (norms.squeeze(-1) * w).sum()).reshape(base.shape)


def karcher(points: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5
            ) -> tuple[torch.Tensor, int]:
    """The Karcher mean of the points (mergekit: every model, the base among them), each of
    weight 1/P; also how many iterations computed a tangent."""
    points = _f64(points)
    alphas = [1.0 / len(points)] * len(points)
    norms = [float(point.norm()) for point in points]
    units = [point / norm if norm > 0 else torch.zeros_like(point)
             for point, norm in zip(points, norms)]
    valid = [index for index, norm in enumerate(norms) if norm > tol]
    if not valid:
        return torch.zeros_like(points[0]), 0
    weights = [alphas[index] / sum(alphas[i] for i in valid) for index in valid]
    valid_units = [units[index] for index in valid]
    mean = sum(w * u for w, u in zip(weights, valid_units))
    mean = valid_units[0].clone() if mean.norm() < tol else mean / mean.norm()
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        tangent = torch.zeros_like(mean)
        for w, unit in zip(weights, valid_units):
            cosine = torch.dot(mean.reshape(-1), unit.reshape(-1)).clamp(-1, 1)
            theta = torch.arccos(cosine)
            if theta < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (unit - cosine * mean)
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step
        if mean.norm() > tol:
            mean = mean / mean.norm()
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean, iterations


def model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool = False
                ) -> torch.Tensor:
    w0, ws = base.double(), _f64(models)
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0[None], [w[None] for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            product = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(-1) / product.clamp(min=1e-6))
                           .clamp(-1, 1))
    cosine = torch.stack(cosines).mean(0)[..., None]
    count = len(ws)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cosine / torch.where(singular, 1.0, denominator))
    return (t * (sum(ws) / count) + (1 - t) * w0).reshape(shape)


def nearswap(t: float, base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    a, b = base.double(), model.double()
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * b + (1 - weight) * a


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Small tensors (under mergekit's 10⁶-entry sampling limit): exact quantiles."""
    a, b = base.double(), model.double()
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (b - a).abs() * divergence
    ordered = importance.reshape(-1).sort().values
    q1, median, q3 = (ordered[int(q * (ordered.numel() - 1))] for q in (0.25, 0.5, 0.75))
    mask = importance >= median + 1.5 * (q3 - q1)
    return a + (b - a) * mask


def _ram_masks(base, models, epsilon):
    deltas = torch.stack([model.double() - base.double() for model in models])
    changed = deltas.abs() > epsilon
    counts = changed.sum(0, keepdim=True)
    return deltas, changed, counts, counts > 1, counts == 1


def ram(base: torch.Tensor, models: list[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    deltas, changed, counts, overlap, unique = _ram_masks(base, models, epsilon)
    kept = deltas * changed
    return base.double() + (kept * unique + kept * overlap / counts.clamp(min=1)).sum(0)


def ramplus_tl(base: torch.Tensor, models: list[torch.Tensor], r: float = 0.1,
               alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    deltas, changed, counts, overlap, unique = _ram_masks(base, models, epsilon)
    dims = tuple(range(1, deltas.dim()))
    shared = (changed & overlap).sum(dim=dims) if dims else (changed & overlap).long()
    unique_count = (changed & unique).sum(dim=dims) if dims else (changed & unique).long()
    rho = shared / unique_count.clamp(min=epsilon)
    boost = (1 + r * rho.clamp(0, alpha)).reshape(-1, *([1] * len(dims)))
    kept = deltas * changed
    return base.double() + (kept * unique * boost + kept * overlap / counts.clamp(min=1)).sum(0)


def reference_geometric(method: str, base: torch.Tensor, models: list[torch.Tensor],
                        weights: list[float], settings: dict) -> torch.Tensor:
    """The merged weight B + λ·M for one raymerge recipe of these methods (settings as in the
    recipe's method block), mapped as docs/notes/geometric.md says."""
    scale = settings.get("scale", 1.0)
    base64 = base.double()
    if method == "slerp":
        merged = slerp(settings["t"], base, models[0])
    elif method == "nuslerp":
        row_wise = settings.get("nuslerp_row_wise", False)
        flatten = settings.get("nuslerp_flatten", True)
        if len(models) == 1:
            merged = nuslerp([base, models[0]], [settings.get("base_weight", 1.0), weights[0]],
                             None, row_wise, flatten)
        else:
            merged = nuslerp(models, weights, base, row_wise, flatten)
    elif method == "multislerp":
        merged = multislerp(base, models, weights, settings.get("normalize_weights", True),
                            settings.get("eps", 1e-8))
    elif method == "karcher":
        merged, _ = karcher([base, *models], settings.get("max_iter", 10),
                            settings.get("tol", 1e-5))
    elif method == "model_stock":
        merged = model_stock(base, models, settings.get("filter_wise", False))
    elif method == "nearswap":
        merged = nearswap(settings["t"], base, models[0])
    elif method == "arcee_fusion":
        merged = arcee_fusion(base, models[0])
    elif method == "ram":
        merged = ram(base, models, settings.get("epsilon", 1e-5))
    elif method == "ramplus_tl":
        merged = ramplus_tl(base, models, settings.get("r", 0.1), settings.get("alpha", 0.2),
                            settings.get("epsilon", 1e-5))
    else:
        raise ValueError(method)
    return base64 + scale * (merged - base64)


__all__ = ["arcee_fusion", "karcher", "model_stock", "multislerp", "nearswap",
           "nuslerp", "nuslerp_vectors", "ram", "ramplus_tl", "reference_geometric", "slerp"]
