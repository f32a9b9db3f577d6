"""Upload a fine-tuned pipeline folder to the Hugging Face Hub."""

from pathlib import Path

# Training leftovers that do not belong in a published model repo.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", ".*"]


def push_to_hub(folder, repo_id, token=None, private=False) -> str:
    """Create the model repo if needed and upload `folder` as one commit; returns the commit URL.

    Network and authentication failures become one ValueError line naming the repo and what to check.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--push_to_hub: {folder} is not a folder to upload")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message="Upload fine-tuned pipeline from t2i",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except OSError as e:  # requests' connection and HTTP errors, huggingface_hub's auth errors are all OSErrors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"--push_to_hub: could not upload to {repo_id} ({reason}); check the network, the repo id "
            "--hub_model_id, and that --hub_token (or HF_TOKEN / `huggingface-cli login`) has write access"
        ) from None
    return commit.commit_url
