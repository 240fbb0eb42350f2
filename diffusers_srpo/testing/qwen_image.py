"""Tiny, offline, seeded ``QwenImagePipeline`` builders, and Qwen-Image's real configs (for the scale simulator)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .components import _T5_WORDS, seeded

# The scheduler/scheduler_config.json of Qwen/Qwen-Image: a dynamic exponential shift (mu from the image's token
# count between 256 and 8192 tokens, 0.5 to 0.9) stretched so that the last sigma before 0 is 0.02. Written from
# memory and checked against several third-party copies of the published file (no hub access here).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# The transformer/config.json of Qwen/Qwen-Image (20.4B): 60 dual-stream blocks of 24 heads x 128 = 3072 wide, text
# from Qwen2.5-VL-7B's 3584-wide last hidden state, 16 latent channels packed 2x2 into 64. The published file also has
# "pooled_projection_dim": 768, which QwenImageTransformer2DModel does not take (left out). From memory, checked
# against third-party copies (e.g. the one quoted in musubi-tuner's Qwen-Image loader).
QWEN_IMAGE_TRANSFORMER_CONFIG = {
    "attention_head_dim": 128,
    "axes_dims_rope": (16, 56, 56),
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}

# Qwen-Image's VAE latent statistics (vae/config.json; the Wan 2.1 VAE's, also AutoencoderKLQwenImage's defaults).
QWEN_IMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWEN_IMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
QWEN_IMAGE_LATENT_CHANNELS = 16

# The vae/config.json of Qwen/Qwen-Image (AutoencoderKLQwenImage's arguments): a causal 3D VAE, 8x spatial.
QWEN_IMAGE_VAE_CONFIG = {
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": list(QWEN_IMAGE_LATENTS_MEAN),
    "latents_std": list(QWEN_IMAGE_LATENTS_STD),
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": QWEN_IMAGE_LATENT_CHANNELS,
}

# The text model of Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder): what the shaped pipeline keeps of it.
QWEN_IMAGE_TEXT_HIDDEN_SIZE = 3584
QWEN_IMAGE_TEXT_HEADS = 28  # x 128, with multimodal RoPE sections (16, 24, 24) of the 64 frequencies
QWEN_IMAGE_TEXT_KV_HEADS = 4

# QwenImagePipeline's prompt template starts with this system prompt; the real tokenizer makes its first 34 tokens
# (`prompt_template_encode_start_idx`), which encode_prompt drops. The tiny tokenizer has these words whole, so that
# the same 34 tokens are dropped and the embeddings start with the user's prompt, as with the real model.
_TEMPLATE_WORDS = ("system", "Describe", "user", "assistant")
_SYSTEM_PROMPT_WORDS = (
    "the image by detailing color shape size texture quantity text spatial relationships of objects and background"
).split()
_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


def tiny_qwen2_tokenizer():
    """A transformers ``Qwen2Tokenizer`` built in memory: byte-level BPE over the 256 byte symbols, whole tokens for
    the pipeline template's words and some common words (space-prefixed, as GPT-2-style BPE has them), and Qwen's
    special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` as the padding, the vision tokens)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import Qwen2Tokenizer

    byte_symbols = bytes_to_unicode()
    vocab = {byte_symbols[b]: b for b in range(256)}
    merges = []
    words = [*_TEMPLATE_WORDS, *(" " + w for w in dict.fromkeys(_SYSTEM_PROMPT_WORDS + list(_T5_WORDS)))]
    for word in words:
        symbols = "".join(byte_symbols[b] for b in word.encode())
        # Merge left to right: every prefix of a word is a token, so the whole word is one.
        for end in range(2, len(symbols) + 1):
            if symbols[:end] not in vocab:
                vocab[symbols[:end]] = len(vocab)
                merges.append((symbols[: end - 1], symbols[end - 1]))
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL_TOKENS[1:])})
    return tokenizer


@dataclass
class TinyQwenImageConfig:
    """Sizes of the tiny Qwen-Image-shaped pipeline. The defaults run a 32x32 generation in well under a second."""

    num_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    # Width of the Qwen2.5-VL text model, which is the transformer's joint_attention_dim.
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 2
    # 0: 2 * text_dim. The multimodal RoPE sections split the head's text_dim // text_heads // 2 frequencies.
    text_ff_dim: int = 0
    text_mrope_section: tuple[int, int, int] = (2, 3, 3)
    # The VAE keeps Qwen-Image's 16 latent channels and their statistics; one downsampling per temporal flag.
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    vae_temperal_downsample: tuple[bool, ...] = (False, True)
    scheduler_config: dict = field(default_factory=lambda: dict(QWEN_IMAGE_SCHEDULER_CONFIG))

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope={tuple(self.axes_dims_rope)} must sum to attention_head_dim={self.attention_head_dim}"
            )
        if 2 * sum(self.text_mrope_section) != self.text_dim // self.text_heads:
            raise ValueError(
                f"text_mrope_section={tuple(self.text_mrope_section)} must sum to half the text head width "
                f"({self.text_dim // self.text_heads // 2})"
            )


def _text_encoder(cfg: TinyQwenImageConfig, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    def token_id(token):
        return tokenizer.convert_tokens_to_ids(token)

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": cfg.text_dim,
            "intermediate_size": cfg.text_ff_dim or 2 * cfg.text_dim,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_kv_heads,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": list(cfg.text_mrope_section),
            },
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
        },
        # The vision tower is never run (text only); the smallest one whose output has the text width.
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": cfg.text_dim,
            "fullatt_block_indexes": [0],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen_image_components(
    seed: int = 0, config: TinyQwenImageConfig | None = None, build_transformer_and_vae: bool = True
) -> dict:
    """The keyword arguments of ``QwenImagePipeline(...)``: all modules built from configs, in eval mode (without
    the transformer and the VAE, which the caller adds, when not ``build_transformer_and_vae``)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    cfg = config or TinyQwenImageConfig()
    tokenizer = tiny_qwen2_tokenizer()
    transformer = vae = None
    if build_transformer_and_vae:
        transformer = seeded(
            seed,
            lambda: QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=4 * QWEN_IMAGE_LATENT_CHANNELS,  # 2x2 latent patches packed into one token
                out_channels=QWEN_IMAGE_LATENT_CHANNELS,
                num_layers=cfg.num_layers,
                attention_head_dim=cfg.attention_head_dim,
                num_attention_heads=cfg.num_attention_heads,
                joint_attention_dim=cfg.text_dim,
                guidance_embeds=False,
                axes_dims_rope=tuple(cfg.axes_dims_rope),
            ),
        )
        vae = seeded(
            seed + 2,
            lambda: AutoencoderKLQwenImage(
                base_dim=cfg.vae_base_dim,
                z_dim=QWEN_IMAGE_LATENT_CHANNELS,
                dim_mult=list(cfg.vae_dim_mult),
                num_res_blocks=1,
                temperal_downsample=list(cfg.vae_temperal_downsample),
                latents_mean=list(QWEN_IMAGE_LATENTS_MEAN),
                latents_std=list(QWEN_IMAGE_LATENTS_STD),
            ),
        )
    text_encoder = seeded(seed + 1, lambda: _text_encoder(cfg, tokenizer))
    for module in (transformer, text_encoder, vae):
        if module is not None:
            module.eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**cfg.scheduler_config),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def tiny_qwen_image_pipeline(seed: int = 0, config: TinyQwenImageConfig | None = None):
    """A tiny ``QwenImagePipeline`` shaped like Qwen-Image (Qwen2.5-VL text encoder with the pipeline's prompt
    template, true CFG, 16-channel latents packed 2x2 with the real latent statistics, the real scheduler config).

    Deterministic for a given ``seed``; image sizes must be multiples of 8 (VAE factor 4 times 2x2 packing) with
    the default VAE.
    """
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**tiny_qwen_image_components(seed, config))


def qwen_image_shaped_pipeline(
    num_layers: int = 60,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    text_encoder_layers: int = 1,
):
    """A ``QwenImagePipeline`` at Qwen-Image's real size with random weights: its transformer and VAE configs (the
    depth settable: 60 is the 20.4B model) in ``dtype``.

    The text encoder keeps only the width the transformer sees (Qwen2.5-VL-7B's 3584, its 28 heads of 128) with
    ``text_encoder_layers`` narrow layers and the tiny tokenizer: training encodes every prompt once, before the
    first update, and sends the encoder away. Built in the current device context (``with torch.device("cuda")``
    initialises on the GPU) or fake tensor mode (no memory at all, except the text encoder, which has real weights
    there: encode_prompt keeps the attended tokens by a boolean mask, whose count fake tensors cannot know; about
    35M parameters a layer); in eval mode.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    config = TinyQwenImageConfig(
        text_dim=QWEN_IMAGE_TEXT_HIDDEN_SIZE,
        text_layers=text_encoder_layers,
        text_heads=QWEN_IMAGE_TEXT_HEADS,
        text_kv_heads=QWEN_IMAGE_TEXT_KV_HEADS,
        text_ff_dim=256,
        text_mrope_section=(16, 24, 24),
    )
    with unset_fake_temporarily():
        components = tiny_qwen_image_components(seed, config, build_transformer_and_vae=False)
        components["text_encoder"] = components["text_encoder"].to(dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the weight dtype: a 20B model never exists in fp32
    try:
        transformer_config = {**QWEN_IMAGE_TRANSFORMER_CONFIG, "num_layers": num_layers}
        components["transformer"] = seeded(seed, lambda: QwenImageTransformer2DModel(**transformer_config)).eval()
        components["vae"] = seeded(seed + 2, lambda: AutoencoderKLQwenImage(**QWEN_IMAGE_VAE_CONFIG)).eval()
    finally:
        torch.set_default_dtype(previous)
    return QwenImagePipeline(**components)
