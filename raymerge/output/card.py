"""The README.md model card of a merged checkpoint. Local text only: no network call."""

from __future__ import annotations

from raymerge.recipe import Recipe

PAPERS = {
    "task_arithmetic": "Editing Models with Task Arithmetic, arXiv 2212.04089",
    "ties": "TIES-Merging: Resolving Interference When Merging Models, arXiv 2306.01708",
    "dare": "Language Models are Super Mario (DARE), arXiv 2311.03099",
}


def model_card(recipe: Recipe, revisions: dict[str, str | None], summary: dict) -> str:
    def revision(label: str) -> str:
        return f" @ `{revisions[label]}`" if revisions.get(label) else ""

    method = recipe.method
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, raymerge]",
        "---",
        "",
        f"# Merged with raymerge: `{method.name}`",
        "",
        f"Base: `{recipe.base}`{revision(recipe.base)}",
        "",
        "| source | revision | weight |",
        "| --- | --- | --- |",
    ]
    for source in recipe.sources:
        lines.append(f"| `{source.path}` | {revisions.get(source.path) or 'local'} | "
                     f"{source.weight:g} |")
    lines += [
        "",
        f"Method: `{method.name}`, scale λ = {method.scale:g}"
        + (f", density {method.density:g}" if method.name == "ties" else "")
        + (f", drop probability {method.p:g}, seed {method.seed}" if method.name == "dare" else ""),
        "",
        f"Reference: {PAPERS.get(method.name, method.name)}.",
        "",
        f"Merged {summary['num_tensors']} tensors in {summary['seconds']:.1f} s.",
        "The full recipe is in `raymerge_recipe.yaml`; source hashes and per-tensor statistics are"
        " in `raymerge_manifest.json`.",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
