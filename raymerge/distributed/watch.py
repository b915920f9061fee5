"""Notice, within seconds, that the Ray cluster this process uses has gone away.

When the GCS of the cluster a driver is connected to stops (its head is stopped, its node dies),
Ray blocks every ray.get and ray.wait, retries for a minute, then ends the process itself with
its own log lines. A ClusterWatch checks the cluster's GCS and this node's raylet with a gRPC
handshake every CHECK_EVERY_S; after LOST_AFTER checks in a row without an answer it raises
ClusterLostError in the main thread. A signal carries it there: it interrupts a blocked ray.get
or ray.wait as Ctrl-C does."""

from __future__ import annotations

import signal
import threading

from raymerge.errors import ClusterLostError

CHECK_EVERY_S = 1.0
ANSWER_TIMEOUT_S = 2.0
LOST_AFTER = 3
_SIGNAL = signal.SIGUSR2


def answers(address: str, timeout: float) -> bool:
    """Whether a gRPC server (a GCS, a raylet) at host:port completes a handshake in time.
    A process that is stopped or hung keeps its port open but does not answer."""
    import grpc

    address = address.removeprefix("ray://")
    try:
        from ray._private.grpc_utils import init_grpc_channel  # TLS when RAY_USE_TLS is set

        channel = init_grpc_channel(address)
    except Exception:  # a Ray without that helper: plain channel
        channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


class ClusterWatch:
    """Use as a context manager around the work of a Ray session."""

    def __init__(self, gcs_address: str, raylet_address: str | None) -> None:
        self.addresses = [gcs_address] + ([raylet_address] if raylet_address else [])
        self.stopped = threading.Event()
        self.lost: str | None = None
        self.thread: threading.Thread | None = None
        self.previous_handler = None

    @classmethod
    def for_this_session(cls) -> ClusterWatch:
        import ray

        context = ray.get_runtime_context()
        node_id = context.get_node_id()
        raylet = next((f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
                       for node in ray.nodes() if node["NodeID"] == node_id), None)
        return cls(context.gcs_address, raylet)

    def __enter__(self) -> ClusterWatch:
        # Only the main thread can take a signal handler; elsewhere the watch stays silent and
        # Ray's own handling applies.
        if threading.current_thread() is threading.main_thread():
            self.main_thread = threading.main_thread().ident
            self.previous_handler = signal.signal(_SIGNAL, self._raise_lost)
            self.thread = threading.Thread(target=self._run, name="raymerge-cluster-watch",
                                           daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=ANSWER_TIMEOUT_S * len(self.addresses) + CHECK_EVERY_S)
            signal.signal(_SIGNAL, self.previous_handler)

    def _run(self) -> None:
        silent = 0
        while not self.stopped.wait(CHECK_EVERY_S):
            silent = 0 if all(answers(a, ANSWER_TIMEOUT_S) for a in self.addresses) else silent + 1
            if silent >= LOST_AFTER and not self.stopped.is_set():
                self.lost = self.addresses[0]
                signal.pthread_kill(self.main_thread, _SIGNAL)
                return

    def _raise_lost(self, signum, frame) -> None:
        raise ClusterLostError(
            f"the Ray cluster at {self.lost} was lost (it stopped answering for "
            f"{LOST_AFTER * CHECK_EVERY_S:g} s: its head was stopped or this node died)")
