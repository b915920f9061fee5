"""Finding, reading and checking the base and the sources."""

from raymerge.sources.checkpoint import Checkpoint, TensorInfo
from raymerge.sources.resolve import resolve_checkpoint
from raymerge.sources.validate import validate_sources

__all__ = ["Checkpoint", "TensorInfo", "resolve_checkpoint", "validate_sources"]
