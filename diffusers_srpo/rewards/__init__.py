"""Differentiable reward models and Semantic Relative Preference.

Every reward is a frozen ``torch.nn.Module`` called as ``reward(images, prompts) -> Tensor[B]`` (float32),
with images ``[B, 3, H, W]`` in [0, 1] and gradients flowing to the pixels only.

>>> from diffusers_srpo.rewards import HPSv2Reward, SemanticRelativeReward
>>> hps = HPSv2Reward.from_pretrained("HPS_v2.1_compressed.pt")  # doctest: +SKIP
>>> srp = SemanticRelativeReward(hps)  # doctest: +SKIP
>>> scores = srp(images, prompts, k=0.1, step=step)  # doctest: +SKIP
"""

from .aesthetic import AestheticMLP, AestheticReward
from .base import CLIP_MEAN, CLIP_STD, CallableReward, CLIPLikeReward, PromptTemplateReward, Reward, clip_preprocess
from .clip import CLIPReward, HPSv2Reward, PickScoreReward
from .hpsv3 import HPSv3Reward
from .registry import REWARD_NAMES, load_reward
from .srp import DEFAULT_NEGATIVE_WORDS, DEFAULT_POSITIVE_WORDS, SemanticRelativeReward

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_NEGATIVE_WORDS",
    "DEFAULT_POSITIVE_WORDS",
    "REWARD_NAMES",
    "AestheticMLP",
    "AestheticReward",
    "CLIPLikeReward",
    "CLIPReward",
    "CallableReward",
    "HPSv2Reward",
    "HPSv3Reward",
    "PickScoreReward",
    "PromptTemplateReward",
    "Reward",
    "SemanticRelativeReward",
    "clip_preprocess",
    "load_reward",
]
