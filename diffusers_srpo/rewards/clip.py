"""CLIP-like rewards: HPSv2 / HPSv2.1 (open_clip ViT-H-14), PickScore (transformers CLIP-H), any CLIP.

One class, :class:`CLIPReward`, wraps either an open_clip model with its tokenizer or a transformers
``CLIPModel`` with its tokenizer; :class:`HPSv2Reward` and :class:`PickScoreReward` add the loaders and
the defaults of their checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch

from .base import CLIP_MEAN, CLIP_STD, CLIPLikeReward
from .checkpoints import check_keys, hub_file, hub_offline, load_state_dict_strict, looks_like_hub_id, read_state_dict

HPS_HUB_REPO = "xswu/HPSv2"
# The HPSv2 package's own version map (hpsv2/utils.py: hps_version_map).
HPS_HUB_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_SOURCE = (
    "the HPSv2 checkpoints are HPS_v2_compressed.pt and HPS_v2.1_compressed.pt in the Hugging Face repo "
    f"{HPS_HUB_REPO} (https://huggingface.co/{HPS_HUB_REPO}, see https://github.com/tgxs002/HPSv2); "
    "download one and pass its path, or pass 'v2.1' / 'v2.0' to download it"
)

PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_SOURCE = (
    f"the real PickScore is the hub repo {PICKSCORE_HUB_ID} (https://huggingface.co/{PICKSCORE_HUB_ID}): "
    "pass its id or the folder of a local copy"
)
# PickScore ships no tokenizer; its authors load the processor of the CLIP-H model it was fine-tuned from.
PICKSCORE_TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# The reference divides exp(logit_scale) * cosine by 20 so that PickScore sits on HPS's scale.
HF_CLIP_SCALE_DIVISOR = 20.0

# Files whose presence in a folder says which library saved it.
_OPEN_CLIP_CONFIG = "open_clip_config.json"
_TRANSFORMERS_CONFIG = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _square_size(size, where: str) -> int:
    """An image size given as an int or an ``(h, w)`` pair, which must be square for CLIP's centre crop."""
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"{where} has a non-square image size {tuple(size)}; expected a square input")
    return int(height)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _open_clip_architecture(architecture: str) -> torch.nn.Module:
    """An open_clip model of ``architecture`` without its pretrained weights, which the caller loads next.

    open_clip warns on the root logger that such a model is "initialized randomly"; that is true only
    for a moment here, so the warning is dropped rather than shown to every user.
    """
    import open_clip

    root = logging.getLogger()
    drop = _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        return open_clip.create_model(architecture, load_weights=False, pretrained_image=False, pretrained_text=False)
    finally:
        root.removeFilter(drop)


class CLIPReward(CLIPLikeReward):
    """``score_scale * <f_img(x), f_txt(p)>`` for an open_clip model or a transformers ``CLIPModel``.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` or a transformers ``CLIPModel``.
        tokenizer: open_clip's tokenizer (``texts -> LongTensor``) or a transformers tokenizer.
        score_scale: multiplier of the cosine; default 1 for open_clip models and
            ``exp(logit_scale) / 20`` for transformers models.
        image_size, image_mean, image_std: preprocessing; default to what the model declares
            (open_clip's ``visual.preprocess_cfg``, transformers' ``vision_config.image_size``) and CLIP's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        score_scale: float | None = None,
        image_size: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        # transformers' CLIPModel has get_image_features; open_clip's models have encode_image.
        self.is_transformers = hasattr(model, "get_image_features")
        if self.is_transformers:
            declared = {"size": model.config.vision_config.image_size}
            default_scale = math.exp(float(model.logit_scale.detach())) / HF_CLIP_SCALE_DIVISOR
            self.embed_dim = model.config.projection_dim
        else:
            declared = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
            declared.setdefault("size", model.visual.image_size)
            default_scale = 1.0
            # open_clip's ViT and timm towers both expose the projected width as output_dim.
            self.embed_dim = getattr(model.visual, "output_dim", None)
        where = type(model).__name__
        self.image_size = image_size or _square_size(declared["size"], where)
        self.image_mean = tuple(image_mean or declared.get("mean") or CLIP_MEAN)
        self.image_std = tuple(image_std or declared.get("std") or CLIP_STD)
        self.score_scale = float(default_scale if score_scale is None else score_scale)
        self._freeze()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.is_transformers:
            output = self.model.get_image_features(pixel_values=pixel_values)
            # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding.
            return output if isinstance(output, torch.Tensor) else output.pooler_output
        return self.model.encode_image(pixel_values)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        if self.is_transformers:
            max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            output = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            return output if isinstance(output, torch.Tensor) else output.pooler_output
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pretrained: str | None = None,
        *,
        tokenizer=None,
        score_scale: float | None = None,
        cache_dir: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CLIPReward:
        """Load any CLIP as a reward.

        ``name_or_path`` is one of: a folder saved by transformers (``config.json``) or by open_clip
        (``open_clip_config.json``, or ``local-dir:FOLDER``); an open_clip architecture name
        (``"ViT-L-14"``, or one registered with ``open_clip.add_model_config``) with ``pretrained`` a
        local weight file or an open_clip tag such as ``"openai"``; an ``hf-hub:`` open_clip id; or a
        transformers hub id such as ``"openai/clip-vit-large-patch14"``.
        """
        if os.path.isdir(name_or_path):
            if os.path.isfile(os.path.join(name_or_path, _OPEN_CLIP_CONFIG)):
                name_or_path = "local-dir:" + name_or_path
            elif os.path.isfile(os.path.join(name_or_path, _TRANSFORMERS_CONFIG)):
                reward = cls._from_transformers(name_or_path, tokenizer, score_scale, cache_dir)
                return reward.to(device=device, dtype=dtype)
            else:
                raise FileNotFoundError(
                    f"'{name_or_path}' holds neither {_TRANSFORMERS_CONFIG} (transformers) nor "
                    f"{_OPEN_CLIP_CONFIG} (open_clip); expected a folder saved by one of them"
                )
        import open_clip

        if name_or_path.startswith(("local-dir:", "hf-hub:")) or name_or_path in open_clip.list_models():
            reward = cls._from_open_clip(name_or_path, pretrained, tokenizer, score_scale, cache_dir)
        elif looks_like_hub_id(name_or_path):
            reward = cls._from_transformers(name_or_path, tokenizer, score_scale, cache_dir)
        else:
            raise FileNotFoundError(
                f"CLIP model '{name_or_path}' is not a local folder, an open_clip architecture "
                "(open_clip.list_models()) or a hub id 'owner/name'"
            )
        return reward.to(device=device, dtype=dtype)

    @classmethod
    def _from_open_clip(cls, architecture, pretrained, tokenizer, score_scale, cache_dir) -> CLIPReward:
        import open_clip

        if architecture.startswith("hf-hub:") and hub_offline():
            raise FileNotFoundError(f"open_clip model '{architecture}' needs the hub, and HF_HUB_OFFLINE is set")
        state_dict = None
        if pretrained is not None and (os.path.sep in pretrained or os.path.splitext(pretrained)[1]):
            # A path, not an open_clip tag: read it ourselves for the clear missing-file and key errors.
            state_dict = read_state_dict(
                pretrained, what=f"open_clip {architecture}", source="pass a weight file saved from this architecture"
            )
        elif pretrained is None and not architecture.startswith(("local-dir:", "hf-hub:")):
            tags = open_clip.list_pretrained_tags_by_model(architecture)
            raise ValueError(
                f"open_clip architecture '{architecture}' needs pretrained= (a weight file or a tag such as "
                f"{', '.join(tags[:3]) or 'none known'}); without it the weights are random"
            )
        tag = pretrained if state_dict is None else None
        if tag is not None and hub_offline():
            raise FileNotFoundError(
                f"open_clip weights '{architecture}' / '{tag}' are downloaded from the hub, and HF_HUB_OFFLINE "
                "is set; pass a local weight file as pretrained="
            )
        if state_dict is None:
            model = open_clip.create_model(
                architecture, pretrained=tag, pretrained_image=False, pretrained_text=False, cache_dir=cache_dir
            )
        else:
            model = _open_clip_architecture(architecture)
            load_state_dict_strict(model, state_dict, what=f"open_clip {architecture}", path=pretrained)
        return cls(model, tokenizer or open_clip.get_tokenizer(architecture), score_scale=score_scale)

    @classmethod
    def _from_transformers(cls, name_or_path, tokenizer, score_scale, cache_dir, default_tokenizer=None, source=""):
        """Load a transformers ``CLIPModel``; ``source`` (where the real model comes from) ends the not-found error."""
        from transformers import AutoTokenizer, CLIPModel

        # Offline, transformers may still read the hub cache, but must not touch the network (no hang).
        offline = hub_offline()
        where = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if offline else ""
        try:
            model, info = CLIPModel.from_pretrained(
                name_or_path, cache_dir=cache_dir, local_files_only=offline, output_loading_info=True
            )
        except OSError as error:
            # A mistyped relative path has the shape of a hub id; say that it was not found as a folder either.
            looked_up = "" if os.path.isdir(name_or_path) else " (no such folder, so it was looked up as a hub id)"
            raise FileNotFoundError(
                f"could not load the CLIP model '{name_or_path}'{looked_up}{where}: {str(error).splitlines()[0]}"
                + (f"; {source}" if source else "")
            ) from error
        check_keys(
            list(model.state_dict()),
            list(info.get("missing_keys", [])),
            list(info.get("unexpected_keys", [])),
            what="CLIPModel",
            path=name_or_path,
        )
        if tokenizer is None:
            local = os.path.isdir(name_or_path)
            has_tokenizer = not local or any(os.path.isfile(os.path.join(name_or_path, f)) for f in _TOKENIZER_FILES)
            tokenizer = name_or_path if has_tokenizer else default_tokenizer
            if tokenizer is None:
                raise FileNotFoundError(f"'{name_or_path}' holds no tokenizer files; pass tokenizer=")
        if isinstance(tokenizer, str):
            try:
                tokenizer = AutoTokenizer.from_pretrained(tokenizer, cache_dir=cache_dir, local_files_only=offline)
            except OSError as error:
                raise FileNotFoundError(
                    f"could not load the tokenizer '{tokenizer}' for '{name_or_path}'{where}: "
                    f"{str(error).splitlines()[0]}; pass tokenizer="
                ) from error
        return cls(model, tokenizer, score_scale=score_scale)


class HPSv2Reward(CLIPReward):
    """Human Preference Score v2 / v2.1: open_clip ViT-H-14 with the HPS checkpoint; score = cosine."""

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str = "v2.1",
        architecture: str = "ViT-H-14",
        *,
        tokenizer=None,
        cache_dir: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> HPSv2Reward:
        """Load an HPS checkpoint.

        Args:
            checkpoint: path of ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt`` (a torch file with the
                state dict under ``"state_dict"``, HPSv2's format, or at top level; ``module.`` prefixes are
                stripped) or a ``.safetensors`` conversion; or ``"v2.1"`` / ``"v2.0"`` for the file in the hub
                repo ``xswu/HPSv2`` (the cache only, when ``HF_HUB_OFFLINE`` is set).
            architecture: the open_clip architecture: ``"ViT-H-14"`` for the real checkpoints; a registered
                config name or ``"local-dir:FOLDER"`` (only its ``open_clip_config.json`` is used) for tests.
        """
        import open_clip

        if os.path.isfile(checkpoint):
            path = checkpoint
        elif checkpoint in HPS_HUB_FILES:
            path = hub_file(HPS_HUB_REPO, HPS_HUB_FILES[checkpoint], what="HPSv2 checkpoint", cache_dir=cache_dir)
        else:
            raise FileNotFoundError(f"HPSv2 checkpoint not found at '{checkpoint}'; {HPS_SOURCE}")
        state_dict = read_state_dict(path, what="HPSv2", source=HPS_SOURCE)
        model = _open_clip_architecture(architecture)
        load_state_dict_strict(model, state_dict, what=f"HPSv2 ({architecture})", path=path)
        reward = cls(model, tokenizer or open_clip.get_tokenizer(architecture), score_scale=1.0)
        return reward.to(device=device, dtype=dtype)


class PickScoreReward(CLIPReward):
    """PickScore: a transformers CLIP-H fine-tuned on Pick-a-Pic; score = ``exp(logit_scale) * cosine / 20``."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = PICKSCORE_HUB_ID,
        *,
        tokenizer=None,
        cache_dir: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> PickScoreReward:
        """Load PickScore from a local folder (``save_pretrained`` format) or a hub id.

        The tokenizer comes from ``tokenizer`` (an object or an id), else the folder, else
        ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as PickScore's own example does.
        """
        if not os.path.isdir(name_or_path) and not looks_like_hub_id(name_or_path):
            raise FileNotFoundError(f"PickScore model not found at '{name_or_path}'; {PICKSCORE_SOURCE}")
        if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, _TRANSFORMERS_CONFIG)):
            raise FileNotFoundError(
                f"'{name_or_path}' has no {_TRANSFORMERS_CONFIG}; expected a CLIPModel folder saved with save_pretrained"
            )
        reward = cls._from_transformers(
            name_or_path, tokenizer, None, cache_dir, default_tokenizer=PICKSCORE_TOKENIZER_ID, source=PICKSCORE_SOURCE
        )
        return reward.to(device=device, dtype=dtype)
