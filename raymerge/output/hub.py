"""Upload a finished output directory to the Hugging Face Hub (only when the recipe asks): one
commit, whose message carries the submission id, the recipe hash and every source's identity;
a repository it creates is private unless the recipe says `output.private: false`.

One commit, not one per shard (or `upload_large_folder`'s several): the repository's main
revision then never holds half of a new merge beside half of the old one. A push that fails on
the network or the Hub (connection errors, 429, 5xx) is retried with backoff; each retry
re-sends only what the Hub lacks (its LFS batch answers no upload for a blob it has), so a
retry after most shards went up costs the local hashing, not the upload. Refusals (401, 403,
404) are not retried. A push that still fails leaves the complete local output, and the next
`regenerate` pushes it (the Hub's manifest decides)."""

from __future__ import annotations

import time
from pathlib import Path

from raymerge.errors import OutputError

PUSH_ATTEMPTS = 4
PUSH_FIRST_WAIT_S = 5.0  # then ×2
_REFUSED = (401, 403, 404)


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
    wait = PUSH_FIRST_WAIT_S
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True, repo_type="model", private=private)
            commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                                       repo_type="model", commit_message=title,
                                       commit_description=description.strip())
            return str(commit.commit_url)
        except Exception as error:  # network, auth and Hub errors come in many types
            if attempt < PUSH_ATTEMPTS and not _refused(error):
                time.sleep(wait)
                wait *= 2
                continue
            failure = error
            break
    reason = " ".join(str(failure).split())[:300]
    raise OutputError(
        f"output is complete at {directory}, but pushing it to the Hub as {repo_id} failed "
        f"({reason}); fix access (`hf auth login`) and run `hf upload {repo_id} {directory}` "
        "(or the next `raymerge regenerate` pushes it)")


def _refused(error: Exception) -> bool:
    """The Hub said no (authentication, permission, no such repo): a retry cannot help."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) in _REFUSED or \
        type(error).__name__ in ("RepositoryNotFoundError", "GatedRepoError",
                                 "OfflineModeIsEnabled")


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
