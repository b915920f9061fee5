"""Run a few blocking reads at once (the store clients release the GIL while they wait)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="raymerge-range")


def parallel(reads: list[Callable[[], None]], in_flight: int) -> None:
    """Every read, at most in_flight at a time; the first error is raised once all are done."""
    futures = [_pool(in_flight).submit(read) for read in reads]
    errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
