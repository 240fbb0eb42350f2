"""The toy world's CLIP-like reward: a small open_clip model trained contrastively on the toy captions.

The trained weights ship in ``weights/reward/`` next to this file, in open_clip's local-folder format
(``open_clip_config.json`` + ``open_clip_model.safetensors``, fp16), so the library's public loader reads them:
``CLIPReward.from_pretrained(REWARD_WEIGHTS_DIR)``; :func:`load_reward` is that call, in float32. Its text tower uses
the real CLIP BPE vocabulary, so ``open_clip.get_tokenizer("ViT-H-14")`` tokenizes for it.

The reward understands the captions' form: ``"a red circle"``, ``"bright. a red circle"``,
``"dark, grainy. a red circle"``; in particular Semantic Relative Preference's ``"{word}. {prompt}"`` with a
lighting or texture word. :func:`zero_shot_accuracy` measures what it knows: each attribute of an image is
classified by the highest cosine among prompts that differ only in that attribute.

``benchmarks/toyworld/train_reward.py`` trains it; ``benchmarks/toyworld/RESULTS.md`` has its numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..rewards import CLIPReward, SemanticRelativeReward
from ..testing import TinyCLIPConfig
from .data import ATTRIBUTE_VALUES, ATTRIBUTES, COLOURS, SHAPES, STYLE_ATTRIBUTES, content_prompt, style_prompt

__all__ = [
    "REWARD_CLIP_CONFIG",
    "REWARD_WEIGHTS_DIR",
    "load_reward",
    "srp_difference",
    "zero_shot_accuracy",
    "zero_shot_predictions",
    "zero_shot_prompts",
]

#: Folder of the shipped reward weights (open_clip local-folder format).
REWARD_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "reward")

#: The reward's architecture. The token embedding (49,408 x text_width) is most of the weights, so the text tower
#: stays narrow. 8-pixel patches (16 per image) learn every attribute, grain included, and cost a quarter of
#: 4-pixel ones in training and in every SRPO step that calls the reward.
REWARD_CLIP_CONFIG = TinyCLIPConfig(
    embed_dim=64,
    image_size=32,
    patch_size=8,
    vision_width=64,
    vision_layers=3,
    vision_head_width=32,
    text_width=32,
    text_layers=2,
    text_heads=2,
    context_length=77,
)


def load_reward(directory: str | None = None, device: torch.device | str | None = None):
    """The trained toy reward as a frozen, float32, eval-mode :class:`~diffusers_srpo.rewards.CLIPReward`.

    Loads ``directory`` (default: the shipped :data:`REWARD_WEIGHTS_DIR`) with ``CLIPReward.from_pretrained``;
    no network access.
    """
    return CLIPReward.from_pretrained(directory or REWARD_WEIGHTS_DIR, device=device, dtype=torch.float32)


def srp_difference(reward, images: torch.Tensor, prompts: Sequence[str], positive: str, negative: str) -> torch.Tensor:
    """``[B]``: Semantic Relative Preference with ``k = 0``, ``<f_img(x), f_txt("{positive}. p") - f_txt("{negative}. p")>``.

    Positive where the images look more like ``positive`` than ``negative`` to ``reward`` (e.g. ``"bright"`` and
    ``"dark"``); computed by :class:`~diffusers_srpo.rewards.SemanticRelativeReward`, as SRPO computes it.
    """
    srp = SemanticRelativeReward(reward, positive_words=[positive], negative_words=[negative], word_schedule="fixed")
    return srp(images, list(prompts), k=0.0)


def zero_shot_prompts(attribute: str, colour: str, shape: str) -> list[str]:
    """The prompts, one per value of ``attribute``, that differ only in that attribute, for an image's content.

    Colour and shape: content prompts (``"a red circle"``, ``"a green circle"``, ...). Lighting and texture:
    SRP's ``"{word}. {prompt}"`` (``"bright. a red circle"``, ``"dark. a red circle"``).
    """
    if attribute == "colour":
        return [content_prompt(value, shape) for value in COLOURS]
    if attribute == "shape":
        return [content_prompt(colour, value) for value in SHAPES]
    if attribute in STYLE_ATTRIBUTES:
        return [style_prompt(value, content_prompt(colour, shape)) for value in ATTRIBUTE_VALUES[attribute]]
    raise ValueError(f"attribute must be one of {ATTRIBUTES}; got {attribute!r}")


@torch.no_grad()
def zero_shot_predictions(
    reward, images: torch.Tensor, labels: dict[str, torch.Tensor], attribute: str, batch_size: int = 512
) -> torch.Tensor:
    """``LongTensor[B]``: for each image, the value of ``attribute`` whose prompt has the highest cosine.

    ``reward`` is any :class:`~diffusers_srpo.rewards.CLIPLikeReward`; the candidate prompts
    (:func:`zero_shot_prompts`) keep the other content attribute at its true value from ``labels``.
    """
    colours = [COLOURS[i] for i in labels["colour"].tolist()]
    shapes = [SHAPES[i] for i in labels["shape"].tolist()]
    candidates = [zero_shot_prompts(attribute, colour, shape) for colour, shape in zip(colours, shapes, strict=True)]
    texts = sorted({text for prompts in candidates for text in prompts})
    text_embeds = reward.encode_text(texts)
    row = {text: i for i, text in enumerate(texts)}
    index = torch.tensor([[row[text] for text in prompts] for prompts in candidates], device=text_embeds.device)
    image_embeds = torch.cat([reward.encode_image(chunk) for chunk in images.split(batch_size)])
    cosines = torch.einsum("bd,bkd->bk", image_embeds, text_embeds[index])
    return cosines.argmax(dim=1).cpu()


def zero_shot_accuracy(
    reward, images: torch.Tensor, labels: dict[str, torch.Tensor], attributes: Sequence[str] = ATTRIBUTES
) -> dict[str, float]:
    """``{attribute: accuracy}`` of :func:`zero_shot_predictions` against ``labels`` on ``images``."""
    return {
        name: (zero_shot_predictions(reward, images, labels, name) == labels[name].cpu()).float().mean().item()
        for name in attributes
    }
