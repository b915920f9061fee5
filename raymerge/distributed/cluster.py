"""Attach to a Ray cluster, or start a local one when there is none."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

_QUIET = {"logging_level": logging.WARNING, "log_to_driver": True}


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Use the running Ray session if there is one; else connect to `address` or RAY_ADDRESS, or
    to a cluster started with `ray start` on this machine; else start a local cluster for this
    run. Shuts down only what it started or connected."""
    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, **_QUIET)
    else:
        try:
            ray.init(address="auto", **_QUIET)
        except ConnectionError:
            # A cluster for one merge: no dashboard (it doubles start-up time). For the
            # dashboard, start one with `ray start --head`; raymerge attaches to it.
            ray.init(include_dashboard=False, **_QUIET)
    try:
        yield
    finally:
        ray.shutdown()
