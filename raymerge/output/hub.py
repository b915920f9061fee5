"""Upload a finished output directory to the Hugging Face Hub (only when the recipe asks)."""

from __future__ import annotations

from pathlib import Path

from raymerge.errors import OutputError


def push_to_hub(directory: Path, repo_id: str) -> str:
    """Create (if needed) and upload to `repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                                   commit_message="Merged with raymerge")
    except Exception as error:  # network, auth and Hub errors come in many types
        reason = " ".join(str(error).split())[:300]
        raise OutputError(
            f"output is complete at {directory}, but pushing it to the Hub as {repo_id} failed "
            f"({reason}); fix access (`hf auth login`) and run `hf upload {repo_id} {directory}`"
        ) from None
    return str(commit.commit_url)
