"""The README.md model card of a merged checkpoint. Local text only: no network call."""

from __future__ import annotations

from raymerge.recipe import Recipe
from raymerge.settings import shown


def model_card(recipe: Recipe, revisions: dict[str, str | None], summary: dict,
               title: str, paper: str) -> str:
    """`title` and `paper`: the method's own (and SVC's, when it calibrated)."""

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
                     f"{shown(source.weight)} |")
    described = method.described()
    lines += [  # without a paper, nothing was merged (slices copied): no method to describe
        "",
        f"Method: {title} (`{method.name}`), scale λ = {shown(method.scale)}"
        + (f"; {described}" if described else "") + "." if paper else f"Method: {title}.",
        "",
        *([f"Reference: {paper}.", ""] if paper else []),
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
