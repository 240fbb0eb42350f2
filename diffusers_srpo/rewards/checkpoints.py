"""Finding and reading reward checkpoints: local files first, the Hugging Face hub only when allowed.

Every failure here is a one-line error that names the path (or hub file) and where the real file comes
from, raised before any model is built, so a typo does not cost the minutes of building a ViT-H-14.
"""

from __future__ import annotations

import os
import re

import torch

# Values of HF_HUB_OFFLINE that huggingface_hub itself treats as true.
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}

# "owner/name": the shape of a hub repository id (no leading "/", ".", "~", no deeper folders).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# How many missing / unexpected keys an error message lists before "and N more".
_KEYS_SHOWN = 5


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set, read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE_VALUES


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the ``owner/name`` shape of a hub repository id rather than a filesystem path."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def hub_file(repo_id: str, filename: str, *, what: str, cache_dir: str | None = None) -> str:
    """Local path of ``filename`` from hub repository ``repo_id``: the cache when offline, else a download.

    Offline (``HF_HUB_OFFLINE`` set) only the local cache is consulted, so nothing can hang on the network.
    """
    import huggingface_hub

    location = f"{filename} from the Hugging Face repo {repo_id} (https://huggingface.co/{repo_id})"
    if hub_offline():
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return cached
        raise FileNotFoundError(
            f"{what}: HF_HUB_OFFLINE is set and {location} is not in the local cache; "
            "download it once online, or pass the path of a local copy"
        )
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir)
    except Exception as error:  # network, auth and missing-file errors all mean the same to the caller
        raise FileNotFoundError(
            f"{what}: could not download {location} ({type(error).__name__}: {error}); "
            "download it by hand and pass the local path"
        ) from error


def read_state_dict(path: str, *, what: str, source: str) -> dict[str, torch.Tensor]:
    """Read a state dict safely from a ``.safetensors`` file or a torch file (``weights_only=True``).

    A torch file may hold the state dict at top level or under ``"state_dict"`` (HPSv2's format); keys
    saved from a ``DistributedDataParallel`` wrapper lose their ``module.`` prefix. ``source`` says where
    the real file comes from and goes into the error when ``path`` does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} checkpoint not found at '{path}'; {source}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(path)
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # an UnpicklingError names the offending global; keep it in the message
            raise ValueError(
                f"{what} checkpoint '{path}' cannot be read with torch.load(weights_only=True) "
                f"({type(error).__name__}: {str(error).splitlines()[0]}); re-save its state dict as safetensors"
            ) from error
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{what} checkpoint '{path}' holds no state dict of tensors (got {type(state_dict).__name__})")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def _first_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown + (f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else "")


def check_keys(expected: list[str], missing: list[str], unexpected: list[str], *, what: str, path: str) -> None:
    """Raise one clear error when a checkpoint's keys do not match its model (listing the first few of each)."""
    if not missing and not unexpected:
        return
    raise ValueError(
        f"{what} checkpoint '{path}' does not match the model ({len(expected)} keys expected): "
        f"missing {len(missing)} [{_first_keys(sorted(missing))}], "
        f"unexpected {len(unexpected)} [{_first_keys(sorted(unexpected))}]; "
        "is the architecture the one this checkpoint was trained with?"
    )


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, *, what: str, path: str) -> None:
    """``module.load_state_dict(state_dict)`` with the key check of :func:`check_keys` first."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    check_keys(sorted(expected), missing, unexpected, what=what, path=path)
    own = module.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items() if v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"{what} checkpoint '{path}' does not match the model: {len(mismatched)} tensors have other shapes "
            f"(checkpoint vs model) [{_first_keys(mismatched)}]; is the architecture the right one?"
        )
    module.load_state_dict(state_dict, strict=True)
