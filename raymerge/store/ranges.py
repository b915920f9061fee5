"""Run a few blocking reads at once (the store clients release the GIL while they wait)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

PART_BYTES = 8 << 20  # one range request


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


def read_in_parts(view: memoryview, offset: int, read_part: Callable[[memoryview, int], None],
                  part_bytes: int, in_flight: int) -> None:
    """Fill view with the bytes at offset.. by read_part(sub-view, its offset), parts of
    part_bytes fetched in_flight at a time (one stream stalls near 100 MB/s; parallel range
    requests reach the network's speed)."""
    parts = [(view[start:start + part_bytes], offset + start)
             for start in range(0, len(view), part_bytes)]
    if len(parts) == 1:
        read_part(*parts[0])
    else:
        parallel([lambda part=part: read_part(*part) for part in parts], in_flight)
