"""Model references to local paths: a folder or weight file as is, a repo id through the Hub.

Repo ids are fetched with ``huggingface_hub.snapshot_download`` (weights, configs and tokenizer
files only), which uses the local cache when the hub cannot be reached or ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import re
from pathlib import Path

from alloykit.errors import CheckpointError

# What a merge needs from a repository; safetensors are preferred, so *.bin is fetched only
# when a repository has no safetensors weights.
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "tokenizer*"]
# single files a model reference may name: raw state dicts and GGUF files
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_repo_id(text: str) -> bool:
    """True for ``name`` or ``org/name`` (not ``./x``, ``/abs/path`` or ``a/b/c``)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith(".")


def resolve_model(path: str, revision: str | None = None) -> Path:
    """The local folder or file holding model ``path``: a folder, a weight file (``.safetensors``,
    ``.pt``, ``.bin``, ``.gguf``), or a repo id fetched or cached.

    Raises CheckpointError naming the model when it is none of these, nor a repository the hub
    (or its local cache) can provide.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        if local.is_file() and local.suffix in WEIGHT_FILE_SUFFIXES:
            return local
        raise CheckpointError(
            f"model '{path}': not a model folder, a .safetensors, .pt or .bin state dict, "
            "nor a .gguf file"
        )
    if local.suffix in WEIGHT_FILE_SUFFIXES:
        raise CheckpointError(f"model '{path}': no such file")
    if not looks_like_repo_id(path):
        raise CheckpointError(f"model '{path}': no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(path, revision=revision, allow_patterns=_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            patterns = [*_PATTERNS, "*.bin"]
            folder = Path(snapshot_download(path, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        raise CheckpointError(
            f"model '{path}': no such folder, and the Hugging Face Hub cannot provide it "
            f"(not in the local cache and the hub is unreachable: {_first_line(e)})"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"model '{path}': no such folder, and the Hugging Face Hub cannot provide it "
            f"({_first_line(e)}); check the name and revision"
        ) from e
    return folder


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
