"""Tiny, offline, seeded rewards: open_clip and transformers CLIPs, HPS v2.1's architecture, the aesthetic head, and
the checkpoint formats each reward loads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from .components import _CLIP_BOS_ID, _CLIP_EOS_ID, _CLIP_VOCAB_SIZE, seeded

# open_clip's architecture of HPS v2 / v2.1 (and of PickScore's CLIP-H).
HPS_ARCHITECTURE = "ViT-H-14"


@dataclass
class TinyCLIPConfig:
    """Sizes of the tiny open_clip model used as a CLIP-like reward."""

    embed_dim: int = 32
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 2
    vision_head_width: int = 16
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 77

    def open_clip_model_cfg(self) -> dict:
        """The ``model_cfg`` dictionary in open_clip's own JSON schema."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "head_width": self.vision_head_width,
                "patch_size": self.patch_size,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": _CLIP_VOCAB_SIZE,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


def hps_shaped_reward(
    vision_layers: int = 32, text_layers: int = 24, *, seed: int = 0, dtype: torch.dtype | None = None
):
    """An ``HPSv2Reward`` on a randomly initialised open_clip ViT-H-14 (HPS v2.1's architecture: 1280 / 1024 wide,
    224 px, patch 14) with the given depths (32 and 24 are the real model) and open_clip's real tokenizer."""
    import open_clip

    from diffusers_srpo.rewards import HPSv2Reward

    model_cfg = open_clip.get_model_config(HPS_ARCHITECTURE)
    model_cfg = {
        **model_cfg,
        "vision_cfg": {**model_cfg["vision_cfg"], "layers": vision_layers},
        "text_cfg": {**model_cfg["text_cfg"], "layers": text_layers},
    }
    model = seeded(seed, lambda: open_clip.CLIP(**model_cfg)).eval()
    reward = HPSv2Reward(model, open_clip.get_tokenizer(HPS_ARCHITECTURE), score_scale=1.0)
    return reward if dtype is None else reward.to(dtype=dtype)


def tiny_open_clip_model(seed: int = 0, config: TinyCLIPConfig | None = None):
    """A randomly initialised open_clip ``CLIP`` model from a custom config, in eval mode.

    Its text tower uses the standard CLIP BPE vocabulary, so ``open_clip.get_tokenizer("ViT-H-14")`` applies.
    """
    import open_clip

    cfg = (config or TinyCLIPConfig()).open_clip_model_cfg()
    model = seeded(seed, lambda: open_clip.CLIP(**cfg))
    return model.eval()


def tiny_clip_reward(seed: int = 0, config: TinyCLIPConfig | None = None):
    """A ``CLIPReward`` on :func:`tiny_open_clip_model` with open_clip's real CLIP tokenizer: the trainers' test reward."""
    import open_clip

    from diffusers_srpo.rewards import CLIPReward

    return CLIPReward(tiny_open_clip_model(seed, config), open_clip.get_tokenizer("ViT-H-14"))


def save_open_clip_local_dir(model, directory: str, config: TinyCLIPConfig | None = None) -> str:
    """Save an open_clip model so that ``open_clip.create_model("local-dir:" + directory)`` loads it."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    cfg = config or TinyCLIPConfig()
    model_cfg = cfg.open_clip_model_cfg()
    preprocess_cfg = {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "size": cfg.image_size,
    }
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "tiny_config": asdict(cfg)}, f, indent=2)
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, os.path.join(directory, "open_clip_model.safetensors"))
    return directory


def tiny_transformers_clip_model(seed: int = 0, config: TinyCLIPConfig | None = None):
    """A randomly initialised transformers ``CLIPModel`` with the sizes of ``config``, in eval mode.

    The text tower uses the real CLIP vocabulary and special-token ids, so :func:`tiny_clip_tokenizer`
    applies; it stands in for PickScore (a CLIP-H) and transformers CLIP checkpoints.
    """
    from transformers import CLIPConfig, CLIPModel

    cfg = config or TinyCLIPConfig()
    clip_config = CLIPConfig(
        text_config={
            "vocab_size": _CLIP_VOCAB_SIZE,
            "hidden_size": cfg.text_width,
            "intermediate_size": 4 * cfg.text_width,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "max_position_embeddings": cfg.context_length,
            "bos_token_id": _CLIP_BOS_ID,
            "eos_token_id": _CLIP_EOS_ID,
            "pad_token_id": _CLIP_EOS_ID,
        },
        vision_config={
            "hidden_size": cfg.vision_width,
            "intermediate_size": 4 * cfg.vision_width,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_width // cfg.vision_head_width,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
        },
        projection_dim=cfg.embed_dim,
    )
    model = seeded(seed, lambda: CLIPModel(clip_config))
    return model.eval()


def save_transformers_clip_dir(model, directory: str, tokenizer=None) -> str:
    """Save a transformers CLIP as a hub checkpoint folder is laid out (``save_pretrained``).

    With ``tokenizer=None`` the folder has no tokenizer files, as PickScore_v1's hub repo.
    """
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def save_hps_checkpoint(model, path: str, key_prefix: str = "") -> str:
    """Save an open_clip model in HPSv2's checkpoint format: ``torch.save({"state_dict": ...})``.

    HPSv2 loads its files with ``model.load_state_dict(torch.load(path)["state_dict"])``; ``key_prefix``
    ``"module."`` imitates a checkpoint saved from a DistributedDataParallel wrapper.
    """
    state_dict = {key_prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state_dict}, path)
    return path


def tiny_aesthetic_mlp(seed: int = 0, input_dim: int = 32):
    """The LAION aesthetic predictor head with a small input width, seeded, in eval mode."""
    from diffusers_srpo.rewards import AestheticMLP

    return seeded(seed, lambda: AestheticMLP(input_dim=input_dim)).eval()


def save_aesthetic_mlp(mlp, path: str) -> str:
    """Save the aesthetic head as LAION's ``sac+logos+ava1-l14-linearMSE.pth`` is: ``torch.save(state_dict)``."""
    torch.save({k: v.detach().clone() for k, v in mlp.state_dict().items()}, path)
    return path
