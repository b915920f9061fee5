"""The `raymerge` command: merge | regenerate | plan | tune | inspect | demo. Reads arguments,
calls the library, reports."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raymerge.errors import RaymergeError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RaymergeError as error:
        if args.debug:
            raise
        print(f"raymerge: error: {error}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"status": "error", "error": str(error)}), flush=True)
        return getattr(error, "exit_status", 2)
    except KeyboardInterrupt:
        print("raymerge: interrupted; nothing was published", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymerge", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    merge = commands.add_parser("merge", help="merge the sources of a recipe into a checkpoint")
    merge.add_argument("recipe", help="raymerge or mergekit YAML recipe")
    merge.add_argument("--out", help="output directory (overrides output.path)")
    merge.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    merge.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="accept pytorch_model.bin sources (loaded with weights_only=True)")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge.add_argument("--json", action="store_true",
                       help="end with one JSON line for schedulers (output, sources, time, bytes)")
    merge.set_defaults(run=_merge)

    regenerate = commands.add_parser(
        "regenerate", help="re-merge the registry's models whose sources or recipe changed")
    regenerate.add_argument("registry", help="REGISTRY.yaml: models and their recipes")
    regenerate.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    regenerate.add_argument("--force", action="store_true", help="re-merge even when unchanged")
    regenerate.add_argument("--dry-run", action="store_true",
                            help="resolve and say what would be merged; merge nothing")
    regenerate.add_argument("--json", action="store_true",
                            help="one JSON line per model, then one for the run")
    regenerate.set_defaults(run=_regenerate)

    plan = commands.add_parser("plan", help="print the work units, bytes and memory of a recipe")
    plan.add_argument("recipe")
    plan.add_argument("--allow-pickle", action="store_true")
    plan.set_defaults(run=_plan, out=None)

    tune = commands.add_parser(
        "tune", help="tune the singular values of an AXIS merge on text data (Ray Train)")
    tune.add_argument("config", help="TUNE.yaml")
    tune.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    tune.set_defaults(run=_tune)

    inspect = commands.add_parser(
        "inspect", help="a checkpoint's tensors; for a raymerge output, its merge statistics")
    inspect.add_argument("directory")
    inspect.add_argument("--tensors", help="regular expression selecting tensors")
    inspect.add_argument("--plot", metavar="FILE.png",
                         help="draw singular values before and after SVC calibration")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser(
        "demo", help="generate a tiny base and 3 fine-tunes, then merge them (no network)")
    demo.add_argument("directory", nargs="?", default="raymerge-demo")
    demo.add_argument("--method", default="ties", help="task_arithmetic | ties | dare")
    demo.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    demo.set_defaults(run=_demo)
    for sub in (merge, regenerate, plan, tune, inspect, demo):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show tracebacks on errors")
    return parser


def _prepare(args: argparse.Namespace):
    from raymerge.merge import prepare
    from raymerge.recipe import load_recipe

    return prepare(load_recipe(args.recipe), out=args.out, allow_pickle=args.allow_pickle)


def _plan(args: argparse.Namespace) -> int:
    print(_plan_text(_prepare(args)))
    return 0


def _plan_text(prepared) -> str:
    from raymerge.progress import (
        format_plan,
        format_runtime,
        format_vocabulary,
        no_effect_lines,
    )
    from raymerge.resolved import resolved_parameters

    text = format_plan(prepared.plan, resolved_parameters(prepared.recipe, prepared.plan,
                                                          prepared.slices))
    text += "\n" + format_runtime(prepared.recipe.runtime)
    if prepared.vocabulary is not None:
        text += f"\nvocabulary: {format_vocabulary(prepared.vocabulary.summary())}"
    for line in no_effect_lines(prepared.recipe.no_effect):
        text += "\n" + line.strip()
    return text


def _merge(args: argparse.Namespace) -> int:
    from raymerge.merge import run_merge
    from raymerge.progress import format_summary

    prepared = _prepare(args)
    if args.dry_run:
        print(_plan_text(prepared))
        return 0
    result = run_merge(prepared, address=args.address, show_progress=not args.no_progress)
    print(format_summary(result.summary, str(result.output)))
    if args.json:
        print(json.dumps(result_record(prepared, result)), flush=True)
    return 0


def _regenerate(args: argparse.Namespace) -> int:
    from raymerge.regenerate import load_registry, regenerate

    registry, root = load_registry(args.registry)

    def report(outcome) -> None:
        if args.json:
            print(json.dumps(outcome.record()), flush=True)
            return
        what = outcome.detail.get("error") or outcome.output
        print(f"{outcome.name}: {outcome.status} ({what})", flush=True)

    outcomes = regenerate(registry, root, address=args.address, force=args.force,
                          dry_run=args.dry_run, on_outcome=report)
    failed = [outcome.name for outcome in outcomes if outcome.status == "error"]
    if args.json:
        print(json.dumps({"status": "error" if failed else "ok", "failed": failed,
                          "models": {o.name: o.status for o in outcomes}}), flush=True)
    elif failed:
        print(f"raymerge: error: {len(failed)} of {len(outcomes)} models failed: "
              f"{', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _tune(args: argparse.Namespace) -> int:
    from raymerge.tune.config import load_tune_config
    from raymerge.tune.job import run_tune

    report = run_tune(load_tune_config(args.config), address=args.address)
    print(f"tuned {report['trainable_parameters']} singular values for {report['steps']} steps "
          f"({report['seconds_per_step']:.2f} s/step): held-out loss "
          f"{report['eval_loss_before']:.4f} -> {report['eval_loss_after']:.4f} (perplexity "
          f"{report['eval_perplexity_before']:.2f} -> {report['eval_perplexity_after']:.2f}); "
          f"folded checkpoint in {report['output']}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from raymerge.inspect import inspect_checkpoint, open_for_inspection, plot_spectra

    print(inspect_checkpoint(args.directory, args.tensors))
    if args.plot:
        drawn = plot_spectra(open_for_inspection(args.directory)[1], Path(args.plot),
                             args.tensors)
        print(f"plotted {len(drawn)} tensors to {args.plot}: {', '.join(drawn)}")
    return 0


def result_record(prepared, result) -> dict:
    """What a scheduler needs to know about a finished merge, as one JSON object."""
    return {
        "status": "ok",
        "output": str(result.output),
        "base": {"source": prepared.base.label, "revision": prepared.base.revision},
        "sources": [{"source": s.label, "revision": s.revision} for s in prepared.sources],
        "seconds": round(result.summary["seconds"], 3),
        "read_bytes": result.summary["read_bytes"],
        "output_bytes": result.summary["output_bytes"],
        "submission_id": result.summary["submission_id"],
        "resumed_units": result.summary["resumed_units"],
        "cluster": result.summary["cluster"],
        "private_cluster": result.summary["private_cluster"],
    }


DEMO_SETTINGS = {"ties": {"density": 0.5}, "dare": {"p": 0.5}}


def _demo(args: argparse.Namespace) -> int:
    import yaml

    from raymerge.synthetic import llama_config, write_base, write_finetune

    root = Path(args.directory).resolve()
    base = root / "base"
    if not (base / "config.json").exists():
        print(f"writing a tiny Llama base and 3 fine-tunes to {root}")
        write_base(base, llama_config(hidden_size=128, intermediate_size=256, num_hidden_layers=4))
        for index in range(3):
            write_finetune(base, root / f"ft-{index}", seed=index)
    recipe = {
        "base": str(base),
        "sources": [str(root / f"ft-{index}") for index in range(3)],
        "method": {"name": args.method, **DEMO_SETTINGS.get(args.method, {})},
        "output": {"path": str(root / "merged"), "dtype": "bfloat16"},
    }
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"recipe: {recipe_path}")
    return _merge(argparse.Namespace(recipe=str(recipe_path), out=None, dry_run=False,
                                     address=args.address, allow_pickle=False, no_progress=False,
                                     json=False))


if __name__ == "__main__":
    sys.exit(main())
