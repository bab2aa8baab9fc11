"""`--push_to_hub`: checked when the run starts (offline, no token, token refused), uploaded when it ends.

The token comes from where huggingface_hub itself looks (HF_TOKEN, or the file `hf auth login` writes), never
from an argument. A run that cannot push fails before training, not after hours of it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

LATER = "or drop --push_to_hub and upload output_dir/final afterwards with `hf upload REPO output_dir/final`"


def check_push_to_hub(output_dir: str, hub_model_id: str | None) -> str:
    """The repository the final model will go to; raises ConfigError when the push could not happen."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"--push_to_hub: the Hub is switched off here (HF_HUB_OFFLINE=1): unset it, {LATER}"
        )
    token = get_token()
    if not token:
        raise ConfigError(
            f"--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN, {LATER}"
        )
    try:
        user = HfApi().whoami(token=token)["name"]
    except Exception as exc:  # connection errors and a refused token both end here
        raise ConfigError(
            f"--push_to_hub: the Hub did not accept the token or could not be reached ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); check the network and `hf auth whoami`, {LATER}"
        ) from exc
    name = hub_model_id or Path(output_dir).resolve().name
    return name if "/" in name else f"{user}/{name}"


def push_folder(folder: str | Path, repo_id: str, private: bool | None) -> str:
    """Create the repository if needed and upload `folder`; returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, commit_message="Upload model trained with gpt2-training"
    )
    return str(url)
