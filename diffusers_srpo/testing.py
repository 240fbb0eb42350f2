"""Tiny, offline, seeded stand-ins for FLUX.1-dev and a CLIP-like reward.

Everything here is built from configs in memory: no file or network access beyond the
CLIP BPE vocabulary that ships inside ``open_clip``. The components are the real diffusers,
transformers and open_clip classes, so every code path of the library runs unchanged on them.
Sizes are parameters: the defaults are for unit tests, larger values give FLUX-shaped models
for CPU benchmarks.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

__all__ = [
    "FLUX_DEV_SCHEDULER_CONFIG",
    "FLUX_DEV_TRANSFORMER_CONFIG",
    "FLUX_DEV_VAE_CONFIG",
    "HPS_ARCHITECTURE",
    "flux_dev_shaped_pipeline",
    "hps_shaped_reward",
    "TinyFluxConfig",
    "TinyCLIPConfig",
    "clip_bpe_vocab_path",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "tiny_flux_components",
    "tiny_flux_pipeline",
    "tiny_open_clip_model",
    "save_open_clip_local_dir",
    "tiny_clip_reward",
    "tiny_trainer_config",
    "tiny_transformers_clip_model",
    "save_transformers_clip_dir",
    "save_hps_checkpoint",
    "tiny_aesthetic_mlp",
    "save_aesthetic_mlp",
]

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

# open_clip's architecture of HPS v2 / v2.1 (and of PickScore's CLIP-H).
HPS_ARCHITECTURE = "ViT-H-14"

_CLIP_VOCAB_SIZE = 49408
_CLIP_BOS_ID = 49406
_CLIP_EOS_ID = 49407


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


def clip_bpe_vocab_path() -> str:
    """Path of the CLIP BPE vocabulary file that ships inside open_clip."""
    import open_clip

    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    # The same construction as open_clip.tokenizer.SimpleTokenizer, so the ids agree with open_clip.
    from open_clip.tokenizer import bytes_to_unicode

    with gzip.open(clip_bpe_vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def tiny_clip_tokenizer():
    """A transformers ``CLIPTokenizer`` with the real CLIP BPE vocabulary (49,408 entries), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


_T5_WORDS = (
    "a an the of in on with and at to is photo picture image painting drawing art style "
    "red green blue yellow white black orange purple pink brown gray dark bright light "
    "circle square triangle cat dog man woman tree house car sky sun city portrait "
    "natural lighting detail detailed real concept anime flat oil smooth grainy"
).split()


def tiny_t5_tokenizer():
    """A small in-memory T5 (Unigram) tokenizer: special tokens, characters, and common words."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{word}", -5.0) for word in _T5_WORDS]
    characters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
    pieces += [(c, -10.0) for c in characters]
    pieces += [(f"\u2581{c}", -9.0) for c in characters]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _seeded(seed: int, build):
    # Module constructors draw their initial weights from the global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_flux_components(seed: int = 0, config: TinyFluxConfig | None = None, build_transformer_and_vae: bool = True) -> dict:
    """The keyword arguments of ``FluxPipeline(...)``: all modules built from configs, in eval mode (without the
    transformer and the VAE, which the caller adds, when not ``build_transformer_and_vae``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = config or TinyFluxConfig()
    t5_tokenizer = tiny_t5_tokenizer()

    transformer = vae = None
    if build_transformer_and_vae:
        transformer = _seeded(
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
    text_encoder = _seeded(
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
    text_encoder_2 = _seeded(
        seed + 2,
        lambda: T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=cfg.t5_dim,
                d_ff=cfg.t5_ff_dim or 2 * cfg.t5_dim,
                d_kv=cfg.t5_head_dim or cfg.t5_dim // cfg.t5_heads,
                num_layers=cfg.t5_layers,
                num_heads=cfg.t5_heads,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
                pad_token_id=0,
                eos_token_id=1,
            )
        ),
    )
    if build_transformer_and_vae:
        num_blocks = len(cfg.vae_block_out_channels)
        vae = _seeded(
            seed + 3,
            lambda: AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * num_blocks,
                up_block_types=("UpDecoderBlock2D",) * num_blocks,
                block_out_channels=tuple(cfg.vae_block_out_channels),
                layers_per_block=1,
                latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.vae_norm_num_groups,
                sample_size=32,
                scaling_factor=FLUX_VAE_SCALING_FACTOR,
                shift_factor=FLUX_VAE_SHIFT_FACTOR,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
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
        transformer_config = {**FLUX_DEV_TRANSFORMER_CONFIG, "num_layers": num_layers, "num_single_layers": num_single_layers}
        components["transformer"] = _seeded(seed, lambda: FluxTransformer2DModel(**transformer_config)).eval()
        components["vae"] = _seeded(seed + 3, lambda: AutoencoderKL(**FLUX_DEV_VAE_CONFIG)).eval()
        for name in ("text_encoder", "text_encoder_2"):
            components[name] = components[name].to(dtype)
    finally:
        torch.set_default_dtype(previous)
    return FluxPipeline(**components)


def hps_shaped_reward(vision_layers: int = 32, text_layers: int = 24, *, seed: int = 0, dtype: torch.dtype | None = None):
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
    model = _seeded(seed, lambda: open_clip.CLIP(**model_cfg)).eval()
    reward = HPSv2Reward(model, open_clip.get_tokenizer(HPS_ARCHITECTURE), score_scale=1.0)
    return reward if dtype is None else reward.to(dtype=dtype)


def tiny_open_clip_model(seed: int = 0, config: TinyCLIPConfig | None = None):
    """A randomly initialised open_clip ``CLIP`` model from a custom config, in eval mode.

    Its text tower uses the standard CLIP BPE vocabulary, so ``open_clip.get_tokenizer("ViT-H-14")`` applies.
    """
    import open_clip

    cfg = (config or TinyCLIPConfig()).open_clip_model_cfg()
    model = _seeded(seed, lambda: open_clip.CLIP(**cfg))
    return model.eval()


def tiny_clip_reward(seed: int = 0, config: TinyCLIPConfig | None = None):
    """A ``CLIPReward`` on :func:`tiny_open_clip_model` with open_clip's real CLIP tokenizer: the trainers' test reward."""
    import open_clip

    from diffusers_srpo.rewards import CLIPReward

    return CLIPReward(tiny_open_clip_model(seed, config), open_clip.get_tokenizer("ViT-H-14"))


def tiny_trainer_config(method: str, output_dir: str, **overrides):
    """The config of ``method``'s trainer for :func:`tiny_flux_pipeline` at 32x32: 2 fp32 updates of a rank-4 LoRA
    at lr 1e-3, 4 rollout steps, no checkpoint or validation; ``overrides`` set any field."""
    from diffusers_srpo.trainers import trainer_class_for

    values = dict(
        method=method,
        output_dir=str(output_dir),
        seed=0,
        max_train_steps=2,
        resolution=32,
        rollout_steps=4,
        max_sequence_length=16,
        mixed_precision="no",
        learning_rate=1e-3,
        max_grad_norm=1.0,
        lora_rank=4,
        lora_alpha=4.0,
        checkpointing_steps=0,
        validation_steps=0,
    )
    values.update(overrides)
    return trainer_class_for(method).config_class(**values)


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
    model = _seeded(seed, lambda: CLIPModel(clip_config))
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

    return _seeded(seed, lambda: AestheticMLP(input_dim=input_dim)).eval()


def save_aesthetic_mlp(mlp, path: str) -> str:
    """Save the aesthetic head as LAION's ``sac+logos+ava1-l14-linearMSE.pth`` is: ``torch.save(state_dict)``."""
    torch.save({k: v.detach().clone() for k, v in mlp.state_dict().items()}, path)
    return path
