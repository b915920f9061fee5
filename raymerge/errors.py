"""The error family for what a user can cause. Each message is one line: what, where, how to fix."""

from __future__ import annotations


class RaymergeError(Exception):
    """Base class of every error a user can cause (bad recipe, bad source, bad output path).
    Its message stays on one line: control characters from file contents (a tensor name with a
    newline, say) are shown escaped."""

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


class RecipeError(RaymergeError):
    """The recipe file is unreadable or invalid."""


class SourceError(RaymergeError):
    """A source or the base cannot be found, read, or does not match the base."""


class OutputError(RaymergeError):
    """The output path cannot be written or would overwrite something it should not."""


class ClusterError(RaymergeError):
    """The Ray cluster asked for cannot be reached, or cannot run what the job asks for."""


class ClusterLostError(ClusterError):
    """The cluster went away mid-run. Not the input's fault: the same command resumes."""

    exit_status = 3
