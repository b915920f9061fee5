"""`raymerge merge`: resolve and validate, plan, run the tasks, assemble, publish."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from raymerge.dtypes import RECIPE_TO_CODE
from raymerge.errors import ClusterLostError, RaymergeError, RecipeError
from raymerge.execute import MergeJob
from raymerge.factor_cache import FactorCacheSpec
from raymerge.identity import checkpoint_identity, resume_key, submission_id
from raymerge.layout import SliceJob, slice_jobs
from raymerge.methods import METHODS, MergeOptions, footprint, takes_svds
from raymerge.output.hub import commit_message, push_to_hub
from raymerge.output.layout import ShardLayout, layout_shards
from raymerge.output.manifest import SourceHasher
from raymerge.output.metadata import write_metadata
from raymerge.output.remote import RemoteOutput, local_directory
from raymerge.output.shard_writer import disk_errors
from raymerge.output.staging import (
    Staging,
    check_free_space,
    check_output_path,
)
from raymerge.output.tokenizer import extended_tokenizer_json
from raymerge.plan import Plan, check_fits, combine_plans, make_plan
from raymerge.progress import MergeProgress
from raymerge.recipe import Recipe
from raymerge.settings import MethodSettings
from raymerge.sources import Checkpoint, resolve_checkpoint, validate_sources
from raymerge.sources.tokenizer_files import ChatTemplate
from raymerge.sources.vocabularies import (
    choose_chat_template,
    output_vocabulary,
    vocabulary_directory,
)
from raymerge.store.objects import scheme_of
from raymerge.vocabulary import OutputVocabulary


@dataclass
class Prepared:
    """Everything known before any tensor data is read."""

    recipe: Recipe
    target: Path
    base: Checkpoint
    sources: list[Checkpoint]
    plan: Plan
    identities: dict[str, str] | None = None  # label -> identity, once computed
    # the output's vocabulary (None: the base's, unchanged) and tokenizer
    vocabulary: OutputVocabulary | None = None
    tokenizer_directory: Path | None = None  # whose tokenizer files the output takes
    tokenizer_json: str | None = None  # the base's tokenizer.json with the union's new tokens
    chat_template: ChatTemplate | None = None
    slices: list[SliceJob] | None = None  # the layout's slices, when the recipe changes it
    # an output in a store (s3://, gs://): `target` is then where this node stages it
    remote: RemoteOutput | None = None

    @property
    def output(self) -> Path | str:
        """Where the output is published, as the user names it."""
        return self.remote.uri if self.remote else self.target


@dataclass
class MergeResult:
    output: Path
    plan: Plan
    summary: dict


def prepare(recipe: Recipe, out: str | Path | None = None, allow_pickle: bool = False) -> Prepared:
    """Resolve, validate and plan: cheap (headers and configs only), fails before heavy work."""
    allow_pickle = allow_pickle or recipe.allow_pickle
    base = resolve_checkpoint(recipe.base, allow_pickle, storage=recipe.storage)
    sources = [resolve_checkpoint(source.path, allow_pickle, storage=recipe.storage)
               for source in recipe.sources]
    validate_sources(base, sources, vocabularies_may_differ=recipe.tokenizer is not None)
    slices = slice_jobs(recipe, {recipe.base: base, **{
        spec.path: checkpoint for spec, checkpoint in zip(recipe.sources, sources)}})
    spec = recipe.tokenizer
    vocabulary = output_vocabulary(base, sources, spec.source if spec else None,
                                   spec.pad_to_multiple_of if spec else None)
    tokenizer_directory = vocabulary_directory(base, sources, vocabulary)
    tokenizer_json = (extended_tokenizer_json(base.label, base.directory, vocabulary)
                      if vocabulary is not None and vocabulary.appended else None)
    chat_template = choose_chat_template(recipe.chat_template, base, sources, tokenizer_directory)
    location, remote = str(out or recipe.output.path), None
    if scheme_of(location):
        remote = _remote_output(recipe, location, [base.label, *(s.label for s in sources)])
        target = local_directory(location)
    else:
        target = Path(location).expanduser().resolve()
        check_output_path(target, [directory for directory in (
            base.directory, *(source.directory for source in sources)) if directory])
    _device(recipe)  # refuse a device the resources cannot give, before planning
    passes, state_tensors = footprint(recipe.method.name, recipe.svc_alpha() is not None)
    planned = partial(
        make_plan,
        output_dtype=RECIPE_TO_CODE[recipe.output.dtype] if recipe.output.dtype else None,
        compute_itemsize=8 if recipe.runtime.compute_dtype == "float64" else 4,
        passes=passes,
        state_tensors=state_tensors,
        svds=takes_svds(recipe.method.name, recipe.svc_alpha() is not None),
    )
    if slices is None:
        plan = planned(base, sources, reindexing=vocabulary.reindexing if vocabulary else None)
        _check_method(recipe.method, plan.tensors, len(sources), _options(recipe))
    else:  # each slice planned on its views, merged slices checked with their settings
        plans = [planned(job.base, job.sources) for job in slices]
        for job, slice_plan in zip(slices, plans):
            if not job.copied:
                _check_method(job.method, slice_plan.tensors, len(job.sources), _options(recipe))
        plan = combine_plans(plans, len(sources))
    for unit in plan.units:  # refuse a task memory the largest unit cannot fit in
        check_fits(unit, recipe.runtime.memory)
    return Prepared(recipe=recipe, target=target, base=base, sources=sources, plan=plan,
                    vocabulary=vocabulary, tokenizer_directory=tokenizer_directory,
                    tokenizer_json=tokenizer_json, chat_template=chat_template, slices=slices,
                    remote=remote)


def _remote_output(recipe: Recipe, location: str, inputs: list[str]) -> RemoteOutput:
    if recipe.output.push_to_hub:
        raise RecipeError(f"output.push_to_hub: pushing an output stored at {location} is not "
                          "supported yet; merge to a local output.path to push it, or drop "
                          "push_to_hub")
    remote = RemoteOutput(location, recipe.storage)
    remote.check(inputs)
    return remote


def _check_method(settings: MethodSettings, tensors, num_sources: int,
                  options: MergeOptions) -> None:
    """The method's own refusals (K or N too large for a matrix's rank, ...), per tensor with
    the settings resolved for it: before any tensor is read."""
    method = METHODS[settings.name]
    for tensor in tensors:
        if tensor.copied:  # integer tensors are copied, never merged
            continue
        method.check(settings.at(tensor.name, tensor.layer_position),
                     {tensor.name: tensor.shape}, num_sources, options)


def run_merge(prepared: Prepared, address: str | None = None, show_progress: bool = True
              ) -> MergeResult:
    """Merge into a staging directory and publish it; on any failure nothing is published.

    An interrupted merge (driver killed, cluster lost) leaves its staging directory and progress
    log behind: the same command resumes it, skipping finished units, to identical bytes. A
    merge that fails on bad input removes its staging directory."""
    from raymerge.distributed.cluster import ray_session
    from raymerge.distributed.resources import (
        check_device_memory,
        check_task_fits_cluster,
        gpu_memory_per_task,
        node_resources,
        resolve_runtime,
    )
    from raymerge.distributed.writer import refuse_concurrent_writer

    recipe, plan = prepared.recipe, prepared.plan
    layout, key = layout_and_key(prepared)
    staging = Staging(prepared.target)
    with ray_session(address) as session:
        runtime = resolve_runtime(recipe.runtime, node_resources(), plan.peak_bytes)
        device = _device(recipe, runtime)
        jobs = _jobs(prepared)
        job = [replace(one, device=device) for one in jobs] if isinstance(jobs, list) \
            else replace(jobs, device=device)
        check_task_fits_cluster(runtime)  # before anything waits for the cluster's resources
        if device == "cuda":
            check_device_memory(plan.units, gpu_memory_per_task(runtime.num_gpus),
                                runtime.num_gpus)
        remote = prepared.remote
        # before touching another merge's directory
        refuse_concurrent_writer(remote.staging_uri if remote else staging.path)
        hasher = SourceHasher([prepared.base, *prepared.sources])
        try:
            directory = staging.open(key)
            if remote:
                remote.progress(key)  # the store answers, and another merge's staging goes
            check_free_space(directory, layout, at_most=(runtime.max_in_flight + 1) * max(
                shard.size for shard in layout.shards) if remote else None)
            unit_stats, seconds, resumed = _merge_units(job, plan, layout, directory, key,
                                                        runtime, show_progress, remote)
            summary = _summary(plan, unit_stats, seconds) | {
                "resumed_units": resumed, "cluster": session.address,
                "private_cluster": session.private, "device": device,
                "num_gpus": runtime.num_gpus, "max_in_flight": runtime.max_in_flight}
            if prepared.vocabulary is not None:
                summary["vocabulary"] = prepared.vocabulary.summary()
            if recipe.no_effect:
                summary["no_effect"] = dict(recipe.no_effect)
            hashes = hasher.result()
            summary["submission_id"] = submission_id(recipe, identities_of(prepared))
            with disk_errors(directory, "writing metadata"):
                write_metadata(prepared, directory, layout, unit_stats, summary, hashes,
                               identities_of(prepared))
                if remote:
                    remote.publish(directory, [shard.file_name for shard in layout.shards])
                    staging.discard()
                else:
                    staging.publish()
        except ClusterLostError as error:  # not the input's fault: keep what is done
            hasher.cancel()
            kept = remote.staging_uri if remote else staging.path
            raise ClusterLostError(f"{error}; the finished units are kept in {kept}: "
                                   "rerun the same command to resume") from None
        except RaymergeError:  # bad input or output: nothing to resume
            hasher.cancel()
            staging.discard()
            if remote:
                _discard_quietly(remote)
            raise
        except BaseException:
            hasher.cancel()
            raise
    if recipe.output.push_to_hub:
        summary["hub_commit"] = push_to_hub(prepared.target, recipe.output.push_to_hub,
                                            commit_message(prepared, summary),
                                            private=recipe.output.private)
    return MergeResult(output=prepared.output, plan=plan, summary=summary)


def _discard_quietly(remote: RemoteOutput) -> None:
    """Remove a failed merge's staging prefix; the merge's own error is the one to report."""
    try:
        remote.discard()
    except RaymergeError:
        pass


def _jobs(prepared: Prepared) -> MergeJob | list[MergeJob]:
    """The merge's job, or with slices one per slice (units name theirs by index)."""
    job = _job(prepared)
    if prepared.slices is None:
        return job
    # a view's tensor names are the output's: never from, nor into, the per-source cache
    return [replace(job, base=s.base, sources=s.sources, weights=s.weights,
                    source_parameters=s.parameters, method=s.method, copy=s.copied,
                    copy_scale=s.scale, factor_cache=None) for s in prepared.slices]


def _job(prepared: Prepared) -> MergeJob:
    recipe = prepared.recipe
    return MergeJob(
        base=prepared.base,
        sources=prepared.sources,
        weights=[source.weight for source in recipe.sources],
        source_parameters=[source.parameters for source in recipe.sources],
        method=recipe.method,
        options=_options(recipe),
        svc_alpha=recipe.svc_alpha(),
        compute_dtype=recipe.runtime.compute_dtype,
        device=_device(recipe),
        num_threads=max(1, int(recipe.runtime.num_cpus)),
        factor_cache=_factor_cache(prepared),
        memory=recipe.runtime.memory,
        reindexing=prepared.vocabulary.reindexing if prepared.vocabulary else None,
        source_cache=(recipe.runtime.source_cache, recipe.runtime.source_cache_size)
        if recipe.runtime.source_cache else None,
    )


def layout_and_key(prepared: Prepared) -> tuple[ShardLayout, str]:
    """The output's shard layout, and the resume key of this merge (its progress log's and its
    writer actor's): equal for the same recipe, unchanged inputs and the same layout."""
    layout = layout_shards(prepared.plan.tensors, prepared.recipe.output.shard_size)
    inputs = [prepared.base, *prepared.sources]
    return layout, resume_key(prepared.recipe, inputs, layout.fingerprint())


def identities_of(prepared: Prepared) -> dict[str, str]:
    """Source label -> immutable identity (memoised hashes: cheap after SourceHasher ran)."""
    if prepared.identities is None:
        prepared.identities = {c.label: checkpoint_identity(c)
                               for c in [prepared.base, *prepared.sources]}
    return prepared.identities


def _factor_cache(prepared: Prepared) -> FactorCacheSpec | None:
    """Where per-source spectral factors are cached, with the keys' source identities."""
    root = prepared.recipe.runtime.factor_cache
    if root is None:
        return None
    identities = identities_of(prepared)
    return FactorCacheSpec(
        root=root.rstrip("/") if scheme_of(root) else str(Path(root).expanduser().resolve()),
        storage=prepared.recipe.storage,
        base=identities[prepared.base.label],
        sources=tuple(identities[source.label] for source in prepared.sources),
    )


def _merge_units(job: MergeJob | list[MergeJob], plan: Plan, layout, directory: Path, key: str,
                 runtime, show_progress: bool, remote: RemoteOutput | None = None
                 ) -> tuple[list[dict], float, int]:
    """Every unfinished unit through the Ray tasks into the writer actor; (unit statistics,
    seconds, units resumed from the progress log). For an output in a store, units run in the
    layout's order, so that shards fill (and upload) one after another."""

    from raymerge.distributed.runner import run_units, writer_call
    from raymerge.distributed.writer import start_writer, stop_writer

    started = time.perf_counter()  # merge time: the cluster's start-up is not counted
    writer = start_writer(directory, layout, key, remote)
    try:
        finished = writer_call(writer.finished.remote())
        unit_stats: list[dict] = list(finished.values())
        with MergeProgress(plan, enabled=show_progress) as progress:
            for stats in unit_stats:
                progress.advance(stats)

            def done(stats: dict) -> None:
                unit_stats.append(stats)
                progress.advance(stats)

            order = sorted(plan.units, key=lambda unit: unit.index) if remote else \
                plan.largest_first()
            todo = [unit for unit in order if unit.index not in finished]
            run_units(job, todo, writer, runtime, done)
        writer_call(writer.close.remote())
    finally:  # also on failure: on a long-lived cluster nothing may outlive the merge
        stop_writer(writer)
    return unit_stats, time.perf_counter() - started, len(finished)


def _options(recipe: Recipe) -> MergeOptions:
    return MergeOptions(exclude=tuple(recipe.exclude), svd=recipe.runtime.svd)


def _device(recipe: Recipe, runtime=None) -> str:
    """The tasks' device: cuda where each task gets a GPU (or the recipe asks for it), else the
    CPU. Before the cluster is known (`runtime` None), num_gpus may still be auto."""
    runtime = runtime or recipe.runtime
    if runtime.device == "cuda":
        if runtime.num_gpus == 0:
            raise RecipeError("runtime.device is cuda but the tasks get no GPU (num_gpus is 0, "
                              "or auto on a cluster without GPUs); set num_gpus: 1 on a "
                              "cluster with GPUs, or runtime.device: cpu")
        return "cuda"
    if runtime.device == "cpu" or runtime.num_gpus == "auto":
        return "cpu"
    return "cuda" if runtime.num_gpus > 0 else "cpu"


def _summary(plan: Plan, unit_stats: list[dict], seconds: float) -> dict:
    return {
        "copied_tensors": [tensor.name for tensor in plan.tensors if tensor.copied],
        "seconds": seconds,
        "units": len(plan.units),
        "num_tensors": len(plan.tensors),
        "num_sources": plan.num_sources,
        "read_bytes": plan.read_bytes,
        "output_bytes": plan.output_bytes,
        "read_bytes_per_second": plan.read_bytes / seconds if seconds > 0 else 0.0,
        "peak_task_bytes_measured": max(stats["peak_bytes"] for stats in unit_stats),
        "peak_task_bytes_estimated": plan.peak_bytes,
        "peak_device_bytes_measured": max(stats.get("peak_device_bytes", 0)
                                          for stats in unit_stats),
        "peak_device_bytes_estimated": max(stats.get("peak_device_bytes_estimated", 0)
                                           for stats in unit_stats),
        "task_seconds_total": sum(stats["seconds"] for stats in unit_stats),
        "nodes": len({stats["node"] for stats in unit_stats}),
        "factor_cache_hits": sum(stats.get("factor_cache_hits", 0) for stats in unit_stats),
        "factor_cache_misses": sum(stats.get("factor_cache_misses", 0) for stats in unit_stats),
        "fetched_bytes_by_node": _fetched_by_node(unit_stats),
    }


def _fetched_by_node(unit_stats: list[dict]) -> dict[str, int]:
    """Bytes the tasks fetched from stores (object stores, the Hub), by node id."""
    fetched: dict[str, int] = {}
    for stats in unit_stats:
        fetched[stats["node"]] = fetched.get(stats["node"], 0) + stats.get("fetched_bytes", 0)
    return fetched
