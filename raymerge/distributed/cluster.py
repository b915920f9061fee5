"""Attach to a Ray cluster, or start a local one when there is none."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Use the running Ray session if there is one; else connect to `address` (or RAY_ADDRESS,
    or a cluster started with `ray start` on this machine), else start a local cluster. Shuts
    down only what it started."""
    if ray.is_initialized():
        yield
        return
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or None,
        logging_level=logging.WARNING,
        configure_logging=True,
        log_to_driver=True,
    )
    try:
        yield
    finally:
        ray.shutdown()
