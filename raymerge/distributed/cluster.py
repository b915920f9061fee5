"""Which Ray cluster a merge uses, connected to in bounded time.

In this order:
1. a Ray session this process already holds (a library caller, a notebook, the tests): as it is;
2. `--address`, else `RAY_ADDRESS` (which `ray job submit` sets for a job's driver): as given.
   `local` starts a private cluster; anything else must answer a gRPC handshake within
   CONNECT_TIMEOUT_S, or the merge stops with a one-line ClusterError naming the address;
3. the cluster `ray start` recorded last in Ray's temp directory (`ray_current_cluster`, written
   by `ray start` alone): attached when it answers within CONNECT_TIMEOUT_S, passed over with a
   one-line notice when it does not (a stale record of a stopped or hung cluster);
4. otherwise a private local cluster for this run, shut down when the run ends.

Never `ray.init(address="auto")`: it also attaches to any GCS process it finds on the machine,
including another driver's private cluster, which goes away when that driver ends. While a
session opened here is in use, a ClusterWatch turns the loss of the cluster into a
ClusterLostError in this process instead of Ray's own exit a minute later."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray

from raymerge.distributed.watch import ClusterWatch, answers
from raymerge.errors import ClusterError

_QUIET = {"logging_level": logging.WARNING, "log_to_driver": True}
CONNECT_TIMEOUT_S = 5.0
FIX = ("start it (`ray start --head`), fix the address, or leave --address and RAY_ADDRESS unset "
       "for a private local cluster")


@dataclass(frozen=True)
class Session:
    address: str  # the GCS address of the cluster in use
    private: bool  # a local cluster started for this run alone


@contextmanager
def ray_session(address: str | None = None) -> Iterator[Session]:
    """A Ray session for one run (see the module's docstring for which cluster); shuts down only
    what it started or connected."""
    if ray.is_initialized():
        yield Session(ray.get_runtime_context().gcs_address, private=False)
        return
    target = choose_cluster(address)
    if target is None:
        # A cluster for this run alone: no dashboard (it doubles start-up time). For the
        # dashboard, start one with `ray start --head`; raymerge attaches to it.
        ray.init(address="local", include_dashboard=False, **_QUIET)
    else:
        ray.init(address=target, **_QUIET)
    try:
        with ClusterWatch.for_this_session():
            yield Session(ray.get_runtime_context().gcs_address, private=target is None)
    finally:
        ray.shutdown()


def choose_cluster(address: str | None = None) -> str | None:
    """The address to connect to, or None for a private local cluster. ClusterError when an
    address given explicitly does not answer."""
    given = address or os.environ.get("RAY_ADDRESS") or None
    if given == "local":
        return None
    if given is not None and given != "auto":
        _check_given(given, "--address" if address else "RAY_ADDRESS")
        return given
    recorded = recorded_cluster()
    if recorded is not None and answers(recorded, CONNECT_TIMEOUT_S):
        return recorded
    if given == "auto":
        raise ClusterError(
            "RAY_ADDRESS is 'auto' but no cluster started with `ray start` answers on this "
            f"machine{f' (the last one recorded, {recorded}, does not)' if recorded else ''}; "
            f"{FIX}")
    if recorded is not None:
        print(f"raymerge: the Ray cluster `ray start` recorded at {recorded} does not answer; "
              "starting a private local cluster for this run", file=sys.stderr)
    return None


def _check_given(address: str, where: str) -> None:
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{where} {address} is a dashboard URL (what `ray job submit` takes); give the "
            "cluster's GCS address host:port (6379 unless `ray start --port` chose another)")
    if not answers(address, CONNECT_TIMEOUT_S):
        raise ClusterError(
            f"no Ray cluster answers at {address} ({where}) within {CONNECT_TIMEOUT_S:g} s; "
            f"{FIX}")


def recorded_cluster() -> str | None:
    """The GCS address the last `ray start` on this machine wrote, if any."""
    try:
        text = (ray_temp_dir() / "ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return text or None


def ray_temp_dir() -> Path:
    """Ray's default temp directory, as Ray computes it (RAY_TMPDIR, TMPDIR, /tmp) + /ray."""
    for variable in ("RAY_TMPDIR", "TMPDIR"):
        if os.environ.get(variable):
            return Path(os.environ[variable]) / "ray"
    return Path("/tmp/ray")
