"""Tiny, offline, seeded ``StableDiffusion3Pipeline`` builders, and SD3.5 Large's real configs (for the scale
simulator)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .components import (
    _CLIP_BOS_ID,
    _CLIP_EOS_ID,
    _CLIP_VOCAB_SIZE,
    seeded,
    tiny_autoencoder,
    tiny_clip_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)

# The scheduler_config.json of stabilityai/stable-diffusion-3.5-large (and of SD3 Medium): a static shift of 3.
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}

# The transformer/config.json of stabilityai/stable-diffusion-3.5-large (8.1B): 38 blocks of 38 heads x 64 = 2432
# wide, QK RMSNorm, no dual-attention blocks (those are SD3.5 Medium's). Written from memory of the published file and
# checked against third-party copies of it (e.g. the diffusers-format configs quoted in open-source loaders).
SD35_LARGE_TRANSFORMER_CONFIG = {
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

# The text encoders' widths the transformer sees: CLIP-L (768) and OpenCLIP bigG (1280), whose projections concatenate
# into the 2048-wide pooled vector, and T5-XXL (4096, joint_attention_dim).
SD35_CLIP_L_DIM = 768
SD35_CLIP_G_DIM = 1280
SD35_T5_DIM = 4096

# SD3's VAE latent statistics (vae/config.json of SD3 Medium and SD3.5 Large/Medium).
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609

# The vae/config.json of stabilityai/stable-diffusion-3.5-large (AutoencoderKL's arguments; the same in SD3 Medium).
SD3_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": SD3_VAE_SCALING_FACTOR,
    "shift_factor": SD3_VAE_SHIFT_FACTOR,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


@dataclass
class TinySD3Config:
    """Sizes of the tiny SD3.5-shaped pipeline. The defaults run a 32x32 generation in well under a second."""

    # At least 2 blocks: the last one is context_pre_only (no attn.to_add_out), so only then every default LoRA target
    # exists, as in the real model.
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    patch_size: int = 2
    qk_norm: str | None = "rms_norm"
    # SD3.5 Medium has dual-attention (attn2) blocks, SD3.5 Large none.
    dual_attention_layers: tuple[int, ...] = ()
    # Latent side of the learned position grid (SD3's pos_embed_max_size): images up to 2 * 2 * 32 = 128 pixels.
    pos_embed_max_size: int = 32
    # CLIP-L and CLIP-G widths (hidden = projection, as in SD3): the pooled vector is their sum, their token states are
    # concatenated and zero-padded to the T5 width, which is the transformer's joint_attention_dim.
    clip_l_dim: int = 16
    clip_g_dim: int = 24
    clip_layers: int = 2
    clip_heads: int = 2
    # CLIP feed-forward width; 0: 4 * the CLIP width.
    clip_ff_dim: int = 0
    t5_dim: int = 48
    t5_layers: int = 2
    t5_heads: int = 4
    # T5 feed-forward and per-head widths; 0: 2 * t5_dim and t5_dim // t5_heads.
    t5_ff_dim: int = 0
    t5_head_dim: int = 0
    # SD3's VAE has 16 latent channels; each block halves the resolution after the first.
    vae_block_out_channels: tuple[int, ...] = (8, 16)
    vae_norm_num_groups: int = 4
    latent_channels: int = 16
    scheduler_config: dict = field(default_factory=lambda: dict(SD3_SCHEDULER_CONFIG))

    def __post_init__(self):
        if self.clip_l_dim + self.clip_g_dim > self.t5_dim:
            raise ValueError(
                f"clip_l_dim + clip_g_dim = {self.clip_l_dim + self.clip_g_dim} must not exceed t5_dim={self.t5_dim} "
                "(SD3 pads the CLIP token states to the T5 width)"
            )


def _clip_text_encoder(seed: int, width: int, hidden_act: str, cfg: TinySD3Config):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=_CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=cfg.clip_ff_dim or 4 * width,
        num_hidden_layers=cfg.clip_layers,
        num_attention_heads=cfg.clip_heads,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=_CLIP_BOS_ID,
        eos_token_id=_CLIP_EOS_ID,
        pad_token_id=_CLIP_EOS_ID,
        hidden_act=hidden_act,
    )
    return seeded(seed, lambda: CLIPTextModelWithProjection(config))


def tiny_sd3_components(
    seed: int = 0, config: TinySD3Config | None = None, build_transformer_and_vae: bool = True
) -> dict:
    """The keyword arguments of ``StableDiffusion3Pipeline(...)``: all modules built from configs, in eval mode
    (without the transformer and the VAE, which the caller adds, when not ``build_transformer_and_vae``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    cfg = config or TinySD3Config()
    t5_tokenizer = tiny_t5_tokenizer()
    # SD3's second tokenizer (OpenCLIP bigG's) pads with "!" (id 0), as open_clip does; the first pads with EOS.
    clip_g_tokenizer = tiny_clip_tokenizer()
    clip_g_tokenizer.pad_token = "!"

    transformer = vae = None
    if build_transformer_and_vae:
        width = cfg.num_attention_heads * cfg.attention_head_dim
        transformer = seeded(
            seed,
            lambda: SD3Transformer2DModel(
                sample_size=32 // 2,  # latent side of the default 32-pixel image (VAE factor 2)
                patch_size=cfg.patch_size,
                in_channels=cfg.latent_channels,
                num_layers=cfg.num_layers,
                attention_head_dim=cfg.attention_head_dim,
                num_attention_heads=cfg.num_attention_heads,
                joint_attention_dim=cfg.t5_dim,
                caption_projection_dim=width,
                pooled_projection_dim=cfg.clip_l_dim + cfg.clip_g_dim,
                out_channels=cfg.latent_channels,
                pos_embed_max_size=cfg.pos_embed_max_size,
                dual_attention_layers=tuple(cfg.dual_attention_layers),
                qk_norm=cfg.qk_norm,
            ),
        )
    # CLIP ViT-L/14's text tower uses quick GELU, OpenCLIP bigG's exact GELU.
    text_encoder = _clip_text_encoder(seed + 1, cfg.clip_l_dim, "quick_gelu", cfg)
    text_encoder_2 = _clip_text_encoder(seed + 2, cfg.clip_g_dim, "gelu", cfg)
    text_encoder_3 = tiny_t5_encoder(
        seed + 3, len(t5_tokenizer), cfg.t5_dim, cfg.t5_layers, cfg.t5_heads, cfg.t5_ff_dim, cfg.t5_head_dim
    )
    if build_transformer_and_vae:
        vae = tiny_autoencoder(
            seed + 4,
            AutoencoderKL,
            cfg.vae_block_out_channels,
            cfg.latent_channels,
            cfg.vae_norm_num_groups,
            scaling_factor=SD3_VAE_SCALING_FACTOR,
            shift_factor=SD3_VAE_SHIFT_FACTOR,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    for module in (transformer, text_encoder, text_encoder_2, text_encoder_3, vae):
        if module is not None:
            module.eval()
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**cfg.scheduler_config),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": clip_g_tokenizer,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": t5_tokenizer,
    }


def tiny_sd3_pipeline(seed: int = 0, config: TinySD3Config | None = None):
    """A tiny ``StableDiffusion3Pipeline`` shaped like SD3.5 Large (three text encoders, 16-channel latents that the
    transformer patchifies 2x2, QK RMSNorm, a static shift of 3).

    Deterministic for a given ``seed``; image sizes must be multiples of 4 (VAE factor 2 times the 2x2 patches) with
    the default two-block VAE.
    """
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**tiny_sd3_components(seed, config))


def sd35_shaped_pipeline(
    num_layers: int = 38,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    text_encoder_layers: int = 1,
):
    """A ``StableDiffusion3Pipeline`` at SD3.5 Large's real size with random weights: its transformer and VAE configs
    (the depth settable: 38 is the 8.1B model) in ``dtype``.

    The text encoders keep only the widths the transformer sees (CLIP-L 768 and CLIP-G 1280, T5 4096) with
    ``text_encoder_layers`` narrow layers and the tiny tokenizers: training encodes every prompt once, before the
    first update, and sends the encoders away. Built in the current device context (``with torch.device("cuda")``
    initialises on the GPU) or fake tensor mode (no memory at all); in eval mode.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    config = TinySD3Config(
        clip_l_dim=SD35_CLIP_L_DIM,
        clip_g_dim=SD35_CLIP_G_DIM,
        clip_layers=text_encoder_layers,
        clip_heads=4,
        clip_ff_dim=256,
        t5_dim=SD35_T5_DIM,
        t5_layers=text_encoder_layers,
        t5_heads=4,
        t5_ff_dim=256,
        t5_head_dim=64,
    )
    components = tiny_sd3_components(seed, config, build_transformer_and_vae=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the weight dtype: an 8B model never exists in fp32
    try:
        transformer_config = {**SD35_LARGE_TRANSFORMER_CONFIG, "num_layers": num_layers}
        components["transformer"] = seeded(seed, lambda: SD3Transformer2DModel(**transformer_config)).eval()
        components["vae"] = seeded(seed + 4, lambda: AutoencoderKL(**SD3_VAE_CONFIG)).eval()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            components[name] = components[name].to(dtype)
    finally:
        torch.set_default_dtype(previous)
    return StableDiffusion3Pipeline(**components)
