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


def pushed_submission_id(repo_id: str) -> str | None:
    """The submission id in the manifest of the Hub repository's main revision; None when the
    repository or its manifest does not exist (nothing pushed yet, or a push that failed)."""
    import json

    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from raymerge.output.staging import MANIFEST_NAME

    try:
        path = HfApi().hf_hub_download(repo_id, MANIFEST_NAME, repo_type="model")
        return json.loads(Path(path).read_text()).get("submission_id")
    except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    except Exception as error:  # network, auth and Hub errors come in many types
        reason = " ".join(str(error).split())[:300]
        raise OutputError(f"cannot read {MANIFEST_NAME} of {repo_id} on the Hub to tell whether "
                          f"it holds this merge ({reason}); fix access (`hf auth login`) or the "
                          "network, and run again") from None
