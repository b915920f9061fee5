"""Refusals that several methods share, made in `Method.check` before any tensor is read: how
many sources a method takes, and a required key that a filter list leaves without a value."""

from __future__ import annotations

from ..errors import RecipeError
from ..settings import MethodSettings


def require_sources(method: str, num_sources: int, allowed: tuple[int, ...], roles: str) -> None:
    """Refuse a source count the method does not take; `roles` says what the base and the
    sources are to it (in mergekit's words)."""
    if num_sources not in allowed:
        counts = " or ".join(map(str, allowed))
        raise RecipeError(
            f"method {method} takes {counts} source{'' if allowed == (1,) else 's'} ({roles}), "
            f"got {num_sources}; list {counts} under sources"
        )


def require_at_least(method: str, num_sources: int, minimum: int, roles: str) -> None:
    if num_sources < minimum:
        raise RecipeError(
            f"method {method} needs at least {minimum} sources ({roles}), got {num_sources}; "
            "add sources"
        )


def require_value(method: str, settings: MethodSettings, key: str, tensor_name: str) -> None:
    """A key without a default must resolve to a number for every tensor: a filter list none of
    whose filters matches this tensor leaves it without one (mergekit: 'Missing required
    parameter')."""
    value = getattr(settings, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(
            f"method {method}: {key} has no value for tensor {tensor_name} (no filter matches "
            f"it); add a {key} entry without a filter"
        )
