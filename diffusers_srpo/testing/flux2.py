"""Tiny, offline, seeded ``Flux2Pipeline`` and ``Flux2KleinPipeline`` builders, and FLUX.2-dev's real configs (for
the scale simulator)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .components import _T5_WORDS, seeded, tiny_autoencoder
from .flux import FLUX_DEV_SCHEDULER_CONFIG

# black-forest-labs/FLUX.2-dev's transformer/config.json: 8 double and 48 single blocks, 48 heads x 128 = 6144 wide,
# text features 3 x 5120 (three Mistral-Small layers stacked). The values are those diffusers'
# scripts/convert_flux2_to_diffusers.py writes for "flux2-dev" (get_flux2_transformer_config), checked against
# third-party copies of the published file (the Hub was not reached); guidance_embeds is not in that file and takes the
# class default, True.
FLUX2_DEV_TRANSFORMER_CONFIG = {
    "attention_head_dim": 128,
    "axes_dims_rope": (32, 32, 32, 32),
    "eps": 1e-6,
    "guidance_embeds": True,
    "in_channels": 128,
    "joint_attention_dim": 15360,
    "mlp_ratio": 3.0,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}

# black-forest-labs/FLUX.2-dev's vae/config.json (AutoencoderKLFlux2's arguments; shared by the Klein models):
# 32 latent channels, 2x2 patches normalised by a BatchNorm's running statistics. The published file also has
# "force_upcast": true, which is not an argument of this class. Checked against third-party copies of the file.
FLUX2_VAE_CONFIG = {
    "act_fn": "silu",
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3,
    "latent_channels": 32,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "patch_size": (2, 2),
    "sample_size": 1024,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "use_post_quant_conv": True,
    "use_quant_conv": True,
}

# FLUX.2's scheduler is FLUX.1-dev's: diffusers' conversion script loads it from black-forest-labs/FLUX.1-dev. Only
# its dynamic (exponential) shifting matters: the pipelines compute mu themselves (compute_empirical_mu).
FLUX2_DEV_SCHEDULER_CONFIG = dict(FLUX_DEV_SCHEDULER_CONFIG)

# The hidden layers the pipelines stack into the prompt features by default (encode_prompt's text_encoder_out_layers):
# a text encoder needs at least this many layers.
FLUX2_TEXT_ENCODER_OUT_LAYERS = (10, 20, 30)
FLUX2_KLEIN_TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)

# Mistral's control tokens, in the order of the tiny Mistral3Config's ids (<unk> 0, [IMG] 1, <s> 2, </s> 3, <pad> 4).
_MISTRAL_SPECIAL_TOKENS = (
    "<unk>",
    "[IMG]",
    "<s>",
    "</s>",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)

# Mistral-Small's chat template, cut to what Flux2Pipeline sends: a system turn and a user turn of text parts.
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)

# Qwen3's chat template, cut to what Flux2KleinPipeline sends (one user turn, the generation prompt, no thinking).
_QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _word_piece_tokenizer(special_tokens: list[str], words: list[str], **special_token_names):
    """A fast tokenizer built offline: ``special_tokens`` first (ids 0, 1, ...), then whole ``words`` and single ASCII
    characters (any ASCII text tokenizes; a common word is one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *words, *characters, *(f"##{c}" for c in characters)]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token=special_token_names["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    named = set(special_token_names.values())
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[token for token in special_tokens if token not in named],
        **special_token_names,
    )


def tiny_pixtral_processor():
    """A ``PixtralProcessor`` (FLUX.2's tokenizer) built offline: Mistral's control tokens, FLUX.2's system message as
    one token (the pipeline puts it before every prompt: so a prompt fits in 16 tokens), common prompt words, and a
    chat template that renders what the pipeline sends."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import AddedToken
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokenizer = _word_piece_tokenizer(
        list(_MISTRAL_SPECIAL_TOKENS),
        list(_T5_WORDS),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.add_tokens([AddedToken(SYSTEM_MESSAGE, normalized=False)])
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(),
        tokenizer=tokenizer,
        patch_size=6,
        spatial_merge_size=1,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )


def tiny_qwen3_tokenizer():
    """Klein's tokenizer built offline: Qwen's chat and thinking tokens, the chat template's role names and common
    prompt words, and a chat template that renders what the pipeline sends (a prompt fits in 16 tokens)."""
    tokenizer = _word_piece_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        ["user", "assistant", *_T5_WORDS],
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    return tokenizer


@dataclass
class TinyFlux2Config:
    """Sizes of the tiny FLUX.2-shaped pipelines. The defaults run a 32x32 generation in well under a second."""

    num_layers: int = 1
    num_single_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int, int] = (4, 4, 4, 4)
    timestep_guidance_channels: int = 256
    # Width of the text encoder; the transformer's joint_attention_dim is three times it (three layers stacked).
    text_dim: int = 16
    # None: the fewest the pipeline's default text_encoder_out_layers read (30 for Mistral, 27 for Qwen3).
    text_layers: int | None = None
    text_heads: int = 2
    text_head_dim: int = 8
    text_ff_dim: int = 32
    # FLUX.2's VAE has 32 latent channels, packed 2x2 into 128; each VAE block after the first halves the resolution.
    latent_channels: int = 8
    vae_block_out_channels: tuple[int, ...] = (8, 16)
    vae_norm_num_groups: int = 4
    # Flux2KleinPipeline's flag: a step-distilled Klein samples without classifier-free guidance.
    is_distilled: bool = False
    scheduler_config: dict = field(default_factory=lambda: dict(FLUX2_DEV_SCHEDULER_CONFIG))

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope={tuple(self.axes_dims_rope)} must sum to attention_head_dim={self.attention_head_dim}"
            )


def _tiny_transformer(seed: int, cfg: TinyFlux2Config, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return seeded(
        seed,
        lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * cfg.latent_channels,  # 2x2 latent patches in one token
            num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=3 * cfg.text_dim,
            timestep_guidance_channels=cfg.timestep_guidance_channels,
            axes_dims_rope=tuple(cfg.axes_dims_rope),
            guidance_embeds=guidance_embeds,
        ),
    )


def _tiny_vae(seed: int, cfg: TinyFlux2Config):
    """An ``AutoencoderKLFlux2`` with random BatchNorm statistics, so that the latent (de)normalisation is not the
    identity it is at initialisation."""
    from diffusers import AutoencoderKLFlux2

    vae = tiny_autoencoder(
        seed, AutoencoderKLFlux2, cfg.vae_block_out_channels, cfg.latent_channels, cfg.vae_norm_num_groups
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _tiny_mistral3(seed: int, cfg: TinyFlux2Config, vocab_size: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab_size,
            "hidden_size": cfg.text_dim,
            "intermediate_size": cfg.text_ff_dim,
            "num_hidden_layers": cfg.text_layers or max(FLUX2_TEXT_ENCODER_OUT_LAYERS),
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": 1,
            "head_dim": cfg.text_head_dim,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e9,
            "sliding_window": None,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 4,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        image_token_index=1,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=4,
        spatial_merge_size=1,
    )
    return seeded(seed, lambda: Mistral3ForConditionalGeneration(config))


def _tiny_qwen3(seed: int, cfg: TinyFlux2Config, vocab_size: int, pad_token_id: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.text_dim,
        intermediate_size=cfg.text_ff_dim,
        num_hidden_layers=cfg.text_layers or max(FLUX2_KLEIN_TEXT_ENCODER_OUT_LAYERS),
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=1,
        head_dim=cfg.text_head_dim,
        max_position_embeddings=2048,
        pad_token_id=pad_token_id,
    )
    return seeded(seed, lambda: Qwen3ForCausalLM(config))


def tiny_flux2_components(seed: int = 0, config: TinyFlux2Config | None = None, klein: bool = False) -> dict:
    """The keyword arguments of ``Flux2Pipeline(...)`` (``Flux2KleinPipeline(...)`` when ``klein``), every module
    built from configs and in eval mode."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = config or TinyFlux2Config()
    if klein:
        tokenizer = tiny_qwen3_tokenizer()
        text_encoder = _tiny_qwen3(seed + 1, cfg, len(tokenizer), tokenizer.pad_token_id)
    else:
        tokenizer = tiny_pixtral_processor()
        text_encoder = _tiny_mistral3(seed + 1, cfg, len(tokenizer.tokenizer))
    # FLUX.2-dev embeds a distilled guidance; Klein's transformer has no guidance input.
    transformer = _tiny_transformer(seed, cfg, guidance_embeds=not klein)
    vae = _tiny_vae(seed + 3, cfg)
    for module in (transformer, text_encoder, vae):
        module.eval()
    components = {
        "scheduler": FlowMatchEulerDiscreteScheduler(**cfg.scheduler_config),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }
    if klein:
        components["is_distilled"] = cfg.is_distilled
    return components


def tiny_flux2_pipeline(seed: int = 0, config: TinyFlux2Config | None = None):
    """A tiny ``Flux2Pipeline`` shaped like FLUX.2-dev: guidance-embedded transformer, a Mistral3 text encoder whose
    layers 10, 20 and 30 are stacked, a 2x2-patched VAE with BatchNorm-normalised latents.

    Deterministic for a given ``seed``; image sizes must be multiples of 4 (VAE factor 2 times the 2x2 patches) with
    the default two-block VAE. The chat template and FLUX.2's system message take 6 tokens around a prompt (the
    tiny tokenizer has one token per common word): ``max_sequence_length=16`` leaves room for a short prompt.
    """
    from diffusers import Flux2Pipeline

    return Flux2Pipeline(**tiny_flux2_components(seed, config))


def tiny_flux2_klein_pipeline(seed: int = 0, config: TinyFlux2Config | None = None):
    """A tiny ``Flux2KleinPipeline``: FLUX.2's transformer without guidance input, a Qwen3 text encoder whose layers
    9, 18 and 27 are stacked, the same VAE; classifier-free guidance with the empty negative prompt unless
    ``config.is_distilled``.

    Deterministic for a given ``seed``; image sizes must be multiples of 4. Qwen's chat template takes 7 tokens around
    a prompt: ``max_sequence_length=16`` leaves room for a short prompt.
    """
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline(**tiny_flux2_components(seed, config, klein=True))


def flux2_dev_shaped_pipeline(
    num_layers: int = 8,
    num_single_layers: int = 48,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
):
    """A ``Flux2Pipeline`` at FLUX.2-dev's real size with random weights: its transformer and VAE configs (the depth
    settable: 8 + 48 is the 32B model) in ``dtype``.

    The text encoder keeps only the width the transformer sees (3 x 5120) with narrow layers, as many as the pipeline's
    text_encoder_out_layers read (30), and the tiny tokenizer: training encodes every prompt once, before the first
    update, and sends the encoder away. Built in the current device context (``with torch.device("cuda")``
    initialises on the GPU) or fake tensor mode (no memory at all); in eval mode.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    text_config = TinyFlux2Config(text_dim=FLUX2_DEV_TRANSFORMER_CONFIG["joint_attention_dim"] // 3)
    tokenizer = tiny_pixtral_processor()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the weight dtype: a 32B model never exists in fp32
    try:
        transformer_config = {
            **FLUX2_DEV_TRANSFORMER_CONFIG,
            "num_layers": num_layers,
            "num_single_layers": num_single_layers,
        }
        transformer = seeded(seed, lambda: Flux2Transformer2DModel(**transformer_config))
        text_encoder = _tiny_mistral3(seed + 1, text_config, len(tokenizer.tokenizer))
        vae = seeded(seed + 3, lambda: AutoencoderKLFlux2(**FLUX2_VAE_CONFIG))
    finally:
        torch.set_default_dtype(previous)
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_DEV_SCHEDULER_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )
