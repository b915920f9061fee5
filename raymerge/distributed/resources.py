"""What a job asks of the cluster against what the cluster's nodes have, before anything starts.

Ray keeps a task or actor that no node can ever hold pending forever (a warning in a log, no
error). So a merge's task and a tuning job's workers, with Ray Data's own tasks beside them, are
placed on the nodes' total resources first-fit; what cannot be placed is a one-line ClusterError
naming what is missing. On a cluster that starts nodes on demand (an autoscaler), the check is
turned off with `runtime.resource_check: false` (merge) or `resource_check: false` (tune)."""

from __future__ import annotations

from raymerge.errors import ClusterError
from raymerge.sizes import format_size

Bundle = dict[str, float]  # resource name -> amount, as Ray's num_cpus / num_gpus / memory


def node_resources() -> list[Bundle]:
    """Total CPU, GPU and memory of every alive node of the connected cluster."""
    import ray

    return [{key: float(node["Resources"].get(key, 0.0)) for key in ("CPU", "GPU", "memory")}
            for node in ray.nodes() if node["Alive"]]


def unplaced(bundles: list[Bundle], nodes: list[Bundle]) -> list[Bundle]:
    """The bundles that do not fit when placed largest first, each on the first node with room."""
    free = [dict(node) for node in nodes]
    left = []
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        node = next((n for n in free if all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items())),
                    None)
        if node is None:
            left.append(bundle)
            continue
        for key, value in bundle.items():
            node[key] = node.get(key, 0) - value
    return left


def describe(bundle: Bundle) -> str:
    parts = []
    for key, value in bundle.items():
        if key == "memory":
            parts.append(f"{format_size(int(value))} memory")
        elif value or len(bundle) == 1:
            parts.append(f"{value:g} {key}")
    return ", ".join(parts) or "nothing"


def describe_nodes(nodes: list[Bundle]) -> str:
    if not nodes:
        return "no alive node"
    return "; ".join(f"node {index + 1}: {describe(node)}" for index, node in enumerate(nodes))


def check_placeable(what: str, bundles: list[Bundle], settings: dict[str, str], fix: str,
                    nodes: list[Bundle] | None = None) -> None:
    """ClusterError when the cluster's nodes can never hold all `bundles` at once. `settings`
    names the setting that asks for each resource (CPU -> runtime.num_cpus, ...)."""
    nodes = node_resources() if nodes is None else nodes
    left = unplaced(bundles, nodes)
    if not left:
        return
    part = left[0]
    largest = {key: max((node.get(key, 0.0) for node in nodes), default=0.0) for key in part}
    short = [key for key, amount in part.items() if amount > largest[key] + 1e-9]
    if short:
        missing = "; ".join(f"{settings[key]} asks for {describe({key: part[key]})} and no node "
                            f"has more than {describe({key: largest[key]})}"
                            for key in short)
    else:
        total = {key: sum(b.get(key, 0.0) for b in bundles) for key in part}
        missing = (f"together it needs {describe(total)} and the nodes cannot hold all of it "
                   f"at once; lower {' or '.join(settings[key] for key in part if total[key])}")
    raise ClusterError(f"{what} cannot be scheduled: {missing} ({describe_nodes(nodes)}); {fix}")


def check_task_fits_cluster(runtime) -> None:
    """A merge task (runtime.num_cpus, num_gpus, memory) must fit on at least one node."""
    if not runtime.resource_check:
        return
    task: Bundle = {"CPU": runtime.num_cpus,
                    "GPU": 0.0 if runtime.num_gpus == "auto" else runtime.num_gpus}
    if runtime.memory:
        task["memory"] = float(runtime.memory)
    check_placeable("a merge task", [task],
                    {"CPU": "runtime.num_cpus", "GPU": "runtime.num_gpus",
                     "memory": "runtime.memory"},
                    "lower it, or add a node that has it (runtime.resource_check: false on an "
                    "autoscaling cluster)")


def resolve_runtime(runtime, nodes: list[Bundle], task_bytes: int):
    """The runtime with `auto` resolved against the cluster's nodes: num_gpus 1 where any node
    has a GPU (else 0); max_in_flight the tasks the nodes can run at once, each node's count the
    smallest of its CPUs, GPUs and memory over what one task asks for (its `memory`, else the
    plan's estimate `task_bytes`), at least 1; plus one, for a result being written while every
    slot merges (the runner counts both)."""
    num_gpus = runtime.num_gpus
    if num_gpus == "auto":
        num_gpus = 1.0 if any(node.get("GPU", 0) >= 1 for node in nodes) else 0.0
    max_in_flight = runtime.max_in_flight
    if max_in_flight == "auto":
        per_task = {"CPU": runtime.num_cpus, "GPU": num_gpus,
                    "memory": float(runtime.memory or task_bytes)}
        slots = 0
        for node in nodes:
            counts = [int(node.get(key, 0) / amount + 1e-9)
                      for key, amount in per_task.items() if amount > 0]
            slots += min(counts) if counts else 0
        max_in_flight = max(1, slots) + 1
    return runtime.model_copy(update={"num_gpus": num_gpus, "max_in_flight": max_in_flight})


def gpu_memory_per_task(num_gpus: float) -> int:
    """The device memory one task gets: a GPU's total (asked of a task scheduled on one) times
    its share of it (num_gpus below 1 packs several tasks on a GPU)."""
    import ray

    def total_memory() -> int:
        import torch

        return torch.cuda.mem_get_info()[1]

    probe = ray.remote(total_memory).options(num_gpus=num_gpus, num_cpus=0)
    return int(ray.get(probe.remote()) * min(1.0, num_gpus))


def check_device_memory(units, device_bytes: int, num_gpus: float) -> None:
    """ClusterError naming the first unit whose estimated peak on the device (its working set,
    with an exact SVD's workspace where the method takes SVDs) is more than a task's share of
    the GPU, before any work."""
    for unit in units:
        if unit.device_peak_bytes > device_bytes:
            share = "a whole GPU" if num_gpus >= 1 else f"{num_gpus:g} of a GPU"
            svd = (f", with an exact SVD's workspace of "
                   f"{format_size(unit.device_peak_bytes - unit.peak_bytes)}"
                   if unit.device_peak_bytes > unit.peak_bytes else "")
            raise ClusterError(
                f"unit {unit.name} needs about {format_size(unit.device_peak_bytes)} of GPU "
                f"memory (merging {unit.peak_tensor}{svd}) and a task gets "
                f"{format_size(device_bytes)} "
                f"({share}); raise runtime.num_gpus (fewer tasks per GPU), or merge this "
                "recipe on the CPU (runtime.device: cpu)")
