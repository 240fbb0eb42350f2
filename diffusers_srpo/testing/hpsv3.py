"""A tiny HPSv3, offline and seeded, saved as the release is: ``HPSv3.safetensors`` plus a Qwen2-VL base folder.

The model is the release's architecture (``Qwen2VLRewardModelBT`` of MizzenAI/HPSv3: a whole Qwen2-VL, ``lm_head``
included, plus the float32 "ranknet" ``rm_head``) with small widths and depths; the image geometry is the real one
(14-pixel patches, 2 frames, 2 x 2 merge, CLIP normalisation, 256 * 28 * 28-pixel images). The base folder is laid out
as Qwen/Qwen2-VL-7B-Instruct's hub folder is: a ``config.json`` in the flat format of transformers 4.4x,
``preprocessor_config.json``, ``chat_template.json`` and the tokenizer files (no weights: HPSv3 does not read them).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from .components import seeded

#: Qwen2-VL-7B-Instruct's chat template (its chat_template.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

#: Qwen2-VL-7B-Instruct's preprocessor_config.json.
QWEN2_VL_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

# Qwen2's special tokens, in the order of their ids in the real tokenizer (151643...).
_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
_EXTRA_WORDS = "system user assistant You are a helpful red circle blue square photo of cat dog on the grass".split()


@dataclass
class TinyHPSv3Config:
    """Sizes of the tiny HPSv3 (the real model: 3584 wide, 28 layers, 28 / 4 heads; vision 1280 wide, 32 blocks)."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    # Half the head width (32 / 2 / 2 = 8) split over the temporal, height and width RoPE axes.
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_heads: int = 2
    vision_mlp_ratio: int = 2


def tiny_hpsv3_tokenizer():
    """A transformers ``Qwen2Tokenizer`` built in memory: byte-level BPE over the 256 byte symbols, whole tokens for
    the words of HPSv3's instruction (space-prefixed, as GPT-2-style BPE has them), and Qwen2's special tokens with
    ``<|endoftext|>`` as the padding, as Qwen2-VL's tokenizer has them."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import Qwen2Tokenizer

    from diffusers_srpo.rewards.hpsv3 import INSTRUCTION, PROMPT_WITH_SPECIAL_TOKEN

    byte_symbols = bytes_to_unicode()
    vocab = {byte_symbols[b]: b for b in range(256)}
    merges = []
    words = re.findall(r"[A-Za-z]+", INSTRUCTION + PROMPT_WITH_SPECIAL_TOKEN) + _EXTRA_WORDS
    for word in dict.fromkeys(" " + w for w in words):
        symbols = "".join(byte_symbols[b] for b in word.encode())
        # Merge left to right: every prefix of a word is a token, so the whole word is one.
        for end in range(2, len(symbols) + 1):
            if symbols[:end] not in vocab:
                vocab[symbols[:end]] = len(vocab)
                merges.append((symbols[: end - 1], symbols[end - 1]))
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL_TOKENS[1:])})
    return tokenizer


def qwen2_vl_config_json(tokenizer, config: TinyHPSv3Config | None = None) -> dict:
    """A ``config.json`` in Qwen2-VL-7B-Instruct's own (flat, transformers 4.4x) format with the tiny sizes.

    As in the real folder, ``vocab_size`` is the embedding table's padded size, not the tokenizer's length.
    """
    cfg = config or TinyHPSv3Config()

    def token_id(token):
        return tokenizer.convert_tokens_to_ids(token)

    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
        "vision_token_id": token_id("<|vision_pad|>"),
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": cfg.num_layers,
        "model_type": "qwen2_vl",
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": cfg.vision_depth,
            "embed_dim": cfg.vision_embed_dim,
            "mlp_ratio": cfg.vision_mlp_ratio,
            "num_heads": cfg.vision_heads,
            "in_chans": 3,
            "hidden_size": cfg.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "vocab_size": 64 * math.ceil(len(tokenizer) / 64),
    }


def save_qwen2_vl_base(directory: str, tokenizer=None, config: TinyHPSv3Config | None = None) -> str:
    """Write a tiny Qwen2-VL-7B-Instruct-shaped base folder (config, processor, tokenizer; no weights)."""
    tokenizer = tokenizer or tiny_hpsv3_tokenizer()
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(qwen2_vl_config_json(tokenizer, config), f, indent=2)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(QWEN2_VL_PREPROCESSOR_CONFIG, f, indent=2)
    with open(os.path.join(directory, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, f, indent=2)
    return directory


def _reward_model_class():
    from transformers import Qwen2VLForConditionalGeneration

    from diffusers_srpo.rewards.hpsv3 import hpsv3_head

    class TinyQwen2VLRewardModel(Qwen2VLForConditionalGeneration):
        """The release's ``Qwen2VLRewardModelBT`` layout: the whole Qwen2-VL plus ``rm_head``."""

        def __init__(self, config):
            super().__init__(config)
            self.rm_head = hpsv3_head(config.text_config.hidden_size).float()

    return TinyQwen2VLRewardModel


def tiny_hpsv3_model(base_directory: str, seed: int = 0):
    """The tiny reward model built as the release builds it from a base folder: Qwen2-VL from its config, the
    embeddings sized to the tokenizer plus ``<|Reward|>``, the head in float32. Returns ``(model, processor)``, the
    model in float32 and eval mode, the processor's tokenizer with ``<|Reward|>`` (right padding)."""
    from transformers import AutoConfig, AutoProcessor

    from diffusers_srpo.rewards.hpsv3 import REWARD_TOKEN

    processor = AutoProcessor.from_pretrained(base_directory, padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    config = AutoConfig.from_pretrained(base_directory)
    config.text_config.vocab_size = len(processor.tokenizer)
    config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    model_class = _reward_model_class()
    model = seeded(seed, lambda: model_class(config))
    # Unit-gain random weights (transformers' 0.02 init leaves a 32-wide model near a constant), the norms and biases
    # random too: every part of the model moves the score, so a wrong step shows in it.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name or "ln_q" in name:
                parameter.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif parameter.ndim >= 2:
                fan_in = parameter[0].numel() if "embed_tokens" not in name else 1
                parameter.copy_(noise / math.sqrt(fan_in))
            else:
                parameter.copy_(0.1 * noise)
    return model.float().eval(), processor


def _released_key(key: str) -> str:
    """A transformers-5 ``Qwen2VLForConditionalGeneration`` key as transformers 4.45 named it."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def released_state_dict(model, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's state dict as the release saved it under transformers 4.45: ``visual.*``, ``model.*`` (the
    language model), ``lm_head.weight`` and ``rm_head.*``; the backbone in ``dtype``, the head in float32."""
    state_dict = {}
    for key, value in model.state_dict().items():
        key = _released_key(key)
        value = value.detach().to(torch.float32 if key.startswith("rm_head.") else dtype)
        state_dict[key] = value.contiguous().clone()
    return state_dict


def save_tiny_hpsv3(
    directory: str,
    base_directory: str | None = None,
    seed: int = 0,
    config: TinyHPSv3Config | None = None,
    dtype: torch.dtype = torch.bfloat16,
):
    """Save a tiny HPSv3 as released: ``directory/HPSv3.safetensors`` and a Qwen2-VL base folder (by default the same
    folder, which ``load_reward("hpsv3:" + directory)`` reads alone). Returns ``(checkpoint_path, base_directory,
    model, processor)``, the model in float32 with the weights as saved (rounded through ``dtype``)."""
    from safetensors.torch import save_file

    from diffusers_srpo.rewards.hpsv3 import HPSV3_CHECKPOINT_FILE

    base_directory = base_directory or directory
    save_qwen2_vl_base(base_directory, config=config)
    model, processor = tiny_hpsv3_model(base_directory, seed)
    state_dict = released_state_dict(model, dtype)
    # The model as saved: its float32 weights rounded through dtype, so that it scores what the file holds.
    with torch.no_grad():
        for key, value in model.state_dict().items():
            value.copy_(state_dict[_released_key(key)])
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, HPSV3_CHECKPOINT_FILE)
    save_file(state_dict, path, metadata={"format": "pt"})
    return path, base_directory, model, processor
