"""raymerge: merge many fine-tunes of one model, layer by layer, on a Ray cluster."""

from __future__ import annotations

__version__ = "0.1.0"

from raymerge.errors import RaymergeError  # noqa: E402

__all__ = ["RaymergeError", "__version__"]
