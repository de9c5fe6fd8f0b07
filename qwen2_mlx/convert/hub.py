"""Resolve `--hf-path`: a local folder is read in place, a repo id is fetched with huggingface_hub.

`snapshot_download` gives us the normal hub cache, resumable downloads, a progress bar, HF_TOKEN,
HF_HUB_OFFLINE and `--revision`. Before downloading, one metadata request with a short timeout
tells "no network" and "no such repo" apart quickly instead of after a long retry loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .errors import ConvertError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
]
PROBE_TIMEOUT_S = 10.0

WHAT_TO_DO = "use --gguf FILE or --hf-path LOCAL_FOLDER, or retry when the hub can be reached"


class HubUnreachable(ConvertError):
    """The hub cannot be reached (no network, DNS failure, timeout): callers may fall back."""

    def __init__(self, repo: str, reason: str):
        super().__init__(f"{repo}: cannot reach the Hugging Face hub ({reason}); {WHAT_TO_DO}")
        self.reason = reason


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve(hf_path: str, revision: Optional[str] = None, log: Callable[[str], None] = lambda m: None) -> Path:
    """A local folder holding the checkpoint named by `hf_path` (downloading it if it is a repo id)."""
    local = Path(hf_path).expanduser()
    if local.exists():
        return local
    if not looks_like_repo_id(hf_path):
        raise ConvertError(f"{hf_path}: no such folder (and not a hub repo id like Qwen/Qwen2-0.5B-Instruct)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = os.environ.get("HF_TOKEN") or None
    rev = f" at revision {revision}" if revision else ""
    try:
        if not offline():
            _probe(hf_path, revision, token)
            log(f"Fetching {hf_path}{rev} (config, tokenizer and safetensors files) into the hub cache")
        path = snapshot_download(hf_path, revision=revision, allow_patterns=ALLOW_PATTERNS, token=token)
        if offline():
            log(f"Using {hf_path}{rev} from the hub cache (HF_HUB_OFFLINE is set): {path}")
    except GatedRepoError:
        raise ConvertError(
            f"{hf_path}: the repo is gated; accept its license on huggingface.co and set HF_TOKEN "
            f"to a token with access (or {WHAT_TO_DO})"
        ) from None
    except RevisionNotFoundError:
        raise ConvertError(f"{hf_path}: revision {revision!r} not found on the hub") from None
    except RepositoryNotFoundError:
        raise ConvertError(
            f"{hf_path}: repo not found on the hub (check the name; for a private repo set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        if offline():
            raise ConvertError(
                f"{hf_path}{rev}: not in the local hub cache and HF_HUB_OFFLINE is set "
                f"(unset it to download, or {WHAT_TO_DO})"
            ) from None
        raise HubUnreachable(hf_path, "file not found in the cache and no connection") from None
    except HubUnreachable:
        raise
    except OSError as e:  # connection errors are OSErrors (httpx wraps them too)
        raise HubUnreachable(hf_path, _short(e)) from None
    return Path(path)


def _probe(repo: str, revision: Optional[str], token: Optional[str]) -> None:
    """One quick metadata request: raises RepositoryNotFoundError/GatedRepoError, or HubUnreachable."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().model_info(repo, revision=revision, token=token, timeout=PROBE_TIMEOUT_S)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is None or status >= 500:
            raise HubUnreachable(repo, f"the hub answered {_short(e)}") from None
        raise
    except Exception as e:  # httpx.ConnectError / timeouts / DNS failures
        if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise
        raise HubUnreachable(repo, _short(e)) from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]
