"""Streaming merge methods, registered in one place. Pure torch: no Ray, no file I/O."""

from __future__ import annotations

from raymerge.methods.base import Method
from raymerge.methods.dare import Dare
from raymerge.methods.task_arithmetic import TaskArithmetic
from raymerge.methods.ties import Ties

METHODS: dict[str, type[Method]] = {
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
    "dare": Dare,
}

__all__ = ["METHODS", "Method"]
