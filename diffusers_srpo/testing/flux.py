"""Tiny, offline, seeded ``FluxPipeline`` builders, and FLUX.1-dev's real configs (for the scale simulator)."""

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

# The scheduler_config.json of black-forest-labs/FLUX.1-dev.
FLUX_DEV_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# FLUX.1's VAE latent statistics (vae/config.json of FLUX.1-dev).
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159

# The transformer/config.json of black-forest-labs/FLUX.1-dev: 19 double and 38 single blocks, 3072 wide.
FLUX_DEV_TRANSFORMER_CONFIG = {
    "attention_head_dim": 128,
    "axes_dims_rope": (16, 56, 56),
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# The vae/config.json of black-forest-labs/FLUX.1-dev (AutoencoderKL's arguments).
FLUX_DEV_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": FLUX_VAE_SCALING_FACTOR,
    "shift_factor": FLUX_VAE_SHIFT_FACTOR,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


@dataclass
class TinyFluxConfig:
    """Sizes of the tiny FLUX-shaped pipeline. The defaults run a 32x32 generation in well under a second."""

    num_layers: int = 1
    num_single_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 4, 8)
    # Width of the T5 encoder, which is the transformer's joint_attention_dim.
    t5_dim: int = 32
    t5_layers: int = 2
    t5_heads: int = 4
    # T5 feed-forward and per-head widths; 0: 2 * t5_dim and t5_dim // t5_heads.
    t5_ff_dim: int = 0
    t5_head_dim: int = 0
    # Width of the CLIP text encoder, which is the transformer's pooled_projection_dim.
    clip_dim: int = 32
    clip_layers: int = 2
    clip_heads: int = 4
    # FLUX's VAE has 16 latent channels; each block halves the resolution after the first.
    vae_block_out_channels: tuple[int, ...] = (8, 16)
    vae_norm_num_groups: int = 4
    latent_channels: int = 16
    scheduler_config: dict = field(default_factory=lambda: dict(FLUX_DEV_SCHEDULER_CONFIG))

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope={tuple(self.axes_dims_rope)} must sum to attention_head_dim={self.attention_head_dim}"
            )


def tiny_flux_components(
    seed: int = 0, config: TinyFluxConfig | None = None, build_transformer_and_vae: bool = True
) -> dict:
    """The keyword arguments of ``FluxPipeline(...)``: all modules built from configs, in eval mode (without the
    transformer and the VAE, which the caller adds, when not ``build_transformer_and_vae``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = config or TinyFluxConfig()
    t5_tokenizer = tiny_t5_tokenizer()

    transformer = vae = None
    if build_transformer_and_vae:
        transformer = seeded(
            seed,
            lambda: FluxTransformer2DModel(
                patch_size=1,
                in_channels=4 * cfg.latent_channels,  # FLUX packs 2x2 latent patches into one token
                num_layers=cfg.num_layers,
                num_single_layers=cfg.num_single_layers,
                attention_head_dim=cfg.attention_head_dim,
                num_attention_heads=cfg.num_attention_heads,
                joint_attention_dim=cfg.t5_dim,
                pooled_projection_dim=cfg.clip_dim,
                guidance_embeds=True,
                axes_dims_rope=tuple(cfg.axes_dims_rope),
            ),
        )
    text_encoder = seeded(
        seed + 1,
        lambda: CLIPTextModel(
            CLIPTextConfig(
                vocab_size=_CLIP_VOCAB_SIZE,
                hidden_size=cfg.clip_dim,
                intermediate_size=4 * cfg.clip_dim,
                num_hidden_layers=cfg.clip_layers,
                num_attention_heads=cfg.clip_heads,
                max_position_embeddings=77,
                projection_dim=cfg.clip_dim,
                bos_token_id=_CLIP_BOS_ID,
                eos_token_id=_CLIP_EOS_ID,
                pad_token_id=_CLIP_EOS_ID,
                hidden_act="quick_gelu",
            )
        ),
    )
    text_encoder_2 = tiny_t5_encoder(
        seed + 2, len(t5_tokenizer), cfg.t5_dim, cfg.t5_layers, cfg.t5_heads, cfg.t5_ff_dim, cfg.t5_head_dim
    )
    if build_transformer_and_vae:
        vae = tiny_autoencoder(
            seed + 3,
            AutoencoderKL,
            cfg.vae_block_out_channels,
            cfg.latent_channels,
            cfg.vae_norm_num_groups,
            scaling_factor=FLUX_VAE_SCALING_FACTOR,
            shift_factor=FLUX_VAE_SHIFT_FACTOR,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    for module in (transformer, text_encoder, text_encoder_2, vae):
        if module is not None:
            module.eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**cfg.scheduler_config),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": t5_tokenizer,
        "transformer": transformer,
    }


def tiny_flux_pipeline(seed: int = 0, config: TinyFluxConfig | None = None):
    """A tiny ``FluxPipeline`` shaped like FLUX.1-dev (guidance-embedded, 16-channel latents packed 2x2).

    Deterministic for a given ``seed``; image sizes must be multiples of 4 (VAE factor 2 times 2x2 packing)
    with the default two-block VAE.
    """
    from diffusers import FluxPipeline

    return FluxPipeline(**tiny_flux_components(seed, config))


def flux_dev_shaped_pipeline(
    num_layers: int = 19,
    num_single_layers: int = 38,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    text_encoder_layers: int = 1,
):
    """A ``FluxPipeline`` at FLUX.1-dev's real size with random weights: its transformer and VAE configs (the depth
    settable: 19 + 38 is the 11.9B model) in ``dtype``.

    The text encoders keep only the widths the transformer sees (T5 4096, CLIP pooled 768) with
    ``text_encoder_layers`` narrow layers and the tiny tokenizers: training encodes every prompt once, before the
    first update, and sends the encoders away. Built in the current device context (``with torch.device("cuda")``
    initialises on the GPU) or fake tensor mode (no memory at all); in eval mode.
    """
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    config = TinyFluxConfig(
        t5_dim=FLUX_DEV_TRANSFORMER_CONFIG["joint_attention_dim"],
        t5_layers=text_encoder_layers,
        t5_heads=4,
        t5_ff_dim=256,
        t5_head_dim=64,
        clip_dim=FLUX_DEV_TRANSFORMER_CONFIG["pooled_projection_dim"],
        clip_layers=text_encoder_layers,
        clip_heads=4,
    )
    components = tiny_flux_components(seed, config, build_transformer_and_vae=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the weight dtype: a 12B model never exists in fp32
    try:
        transformer_config = {
            **FLUX_DEV_TRANSFORMER_CONFIG,
            "num_layers": num_layers,
            "num_single_layers": num_single_layers,
        }
        components["transformer"] = seeded(seed, lambda: FluxTransformer2DModel(**transformer_config)).eval()
        components["vae"] = seeded(seed + 3, lambda: AutoencoderKL(**FLUX_DEV_VAE_CONFIG)).eval()
        for name in ("text_encoder", "text_encoder_2"):
            components[name] = components[name].to(dtype)
    finally:
        torch.set_default_dtype(previous)
    return FluxPipeline(**components)
