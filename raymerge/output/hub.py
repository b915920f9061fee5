"""Upload a finished output directory to the Hugging Face Hub (only when the recipe asks): one
commit, whose message carries the submission id, the recipe hash and every source's identity;
a repository it creates is private unless the recipe says `output.private: false`."""

from __future__ import annotations

from pathlib import Path

from raymerge.errors import OutputError


def commit_message(prepared, summary: dict) -> str:
    from raymerge.identity import recipe_digest

    identities = prepared.identities or {}
    lines = [
        f"raymerge {prepared.recipe.method.name} merge {summary['submission_id']}",
        "",
        f"recipe sha256: {recipe_digest(prepared.recipe, identities)}",
        f"base: {prepared.base.label} = {identities.get(prepared.base.label)}",
        *(f"source: {source.label} = {identities.get(source.label)}"
          for source in prepared.sources),
    ]
    return "\n".join(lines)


def push_to_hub(directory: Path, repo_id: str, message: str, private: bool = True) -> str:
    """Create (if needed) and upload to `repo_id` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    title, _, description = message.partition("\n")
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, repo_type="model", private=private)
        commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                                   repo_type="model", commit_message=title,
                                   commit_description=description.strip())
    except Exception as error:  # network, auth and Hub errors come in many types
        reason = " ".join(str(error).split())[:300]
        raise OutputError(
            f"output is complete at {directory}, but pushing it to the Hub as {repo_id} failed "
            f"({reason}); fix access (`hf auth login`) and run `hf upload {repo_id} {directory}`"
        ) from None
    return str(commit.commit_url)
