"""``load_reward("name[:source]")``: one string per reward, for configs and the command line."""

from __future__ import annotations

from .aesthetic import AestheticReward
from .base import Reward
from .clip import CLIPReward, HPSv2Reward, PickScoreReward
from .hpsv3 import HPSv3Reward

# name -> (loader, whether the part after "name:" is required)
_LOADERS = {
    "hpsv2": (HPSv2Reward.from_pretrained, False),
    "pickscore": (PickScoreReward.from_pretrained, False),
    "clip": (CLIPReward.from_pretrained, True),
    "aesthetic": (AestheticReward.from_pretrained, True),
    "hpsv3": (HPSv3Reward.from_pretrained, True),
}
REWARD_NAMES = tuple(_LOADERS)


def load_reward(spec: str, **kwargs) -> Reward:
    """Load a reward from ``"name"`` or ``"name:source"``; ``kwargs`` go to the loader.

    ``hpsv2[:checkpoint]`` (a path, or ``v2.1`` (default) / ``v2.0`` from the hub),
    ``pickscore[:folder_or_hub_id]``, ``clip:name_or_path`` (with ``pretrained=`` for an open_clip
    architecture name), ``aesthetic:mlp_weights`` (with ``clip=`` for a local CLIP), ``hpsv3:checkpoint``
    (``HPSv3.safetensors`` or a folder holding it, with ``base_model=`` for the local Qwen2-VL-7B-Instruct folder
    unless the checkpoint lies in it).
    Only the first ``:`` separates, so ``clip:local-dir:/models/clip`` works.
    """
    name, source = check_reward_spec(spec)
    loader, _ = _LOADERS[name]
    return loader(source, **kwargs) if source else loader(**kwargs)


def check_reward_spec(spec: str) -> tuple[str, str]:
    """``(name, source)`` of a ``load_reward`` spec, checked without loading anything."""
    name, _, source = spec.partition(":")
    if name.lower() not in _LOADERS:
        raise ValueError(f"unknown reward {name!r} in {spec!r}; expected one of {', '.join(REWARD_NAMES)}")
    _, needs_source = _LOADERS[name.lower()]
    if needs_source and not source:
        raise ValueError(f"reward {name!r} needs a source: '{name}:PATH_OR_ID'; got {spec!r}")
    return name.lower(), source
