"""The toy world's second-generation generator (in training): larger images, a wider transformer, stock-call safe.

It sits beside the shipped first generation (:mod:`.generator`), which stays what the demo, the tests and
``benchmarks/compare_methods.py`` load, until it is trained and checked. It is built and trained by
``benchmarks/toyworld/train_gen2.py`` (staged and resumable; ``benchmarks/toyworld/RESULTS.md``).

What changes from the first generation:

- 64 x 64 images through a three-block ``AutoencoderKL`` (factor 4, FLUX's 16 latent channels), so the
  transformer still sees 8 x 8 = 64 packed tokens while the shapes are drawn twice as large;
- a wider ``FluxTransformer2DModel`` (:data:`GEN2_CONFIG`);
- **a position-free T5 encoder**: its relative-attention bias is zero, so the encoder is permutation-equivariant
  and every ``<pad>`` token it encodes comes out identical, at any padding length. The transformer's text ids are
  all zero (FLUX's), so identical pad tokens stay identical through every block, and ``N`` of them weigh in
  attention exactly as one of them with ``log N`` added to its attention logit. Training uses that identity
  (:func:`collapse_padding`): each caption is encoded at a random padding length up to FluxPipeline's default 512,
  but the transformer is run on the caption's tokens plus one pad token carrying the bias, at the cost of a
  17-token context; the stock call (``max_sequence_length=512``) then runs the very function that was trained.
  (Captions are still told apart: T5 sees them as bags of words, CLIP's pooled embedding keeps the order.)
"""

from __future__ import annotations

import math

import torch

from ..testing import TinyFluxConfig, tiny_flux_components

#: The resolution, and FluxPipeline's default (and maximum) T5 length, which training covers.
GEN2_IMAGE_SIZE = 64
STOCK_MAX_SEQUENCE_LENGTH = 512
#: The T5 length the toy trainers use (cheap): it covers the longest caption (12 tokens with the end token).
GEN2_SHORT_SEQUENCE_LENGTH = 16

GEN2_CONFIG = TinyFluxConfig(
    num_layers=3,
    num_single_layers=4,
    num_attention_heads=4,
    attention_head_dim=32,
    axes_dims_rope=(8, 12, 12),
    t5_dim=64,
    t5_layers=2,
    t5_heads=4,
    clip_dim=64,
    clip_layers=2,
    clip_heads=4,
    vae_block_out_channels=(32, 64, 64),
    vae_norm_num_groups=8,
)


def make_t5_position_free(text_encoder_2) -> None:
    """Zero the T5 encoder's relative-attention bias (in place): pad tokens then encode identically anywhere."""
    for module in text_encoder_2.modules():
        bias = getattr(module, "relative_attention_bias", None)
        if isinstance(bias, torch.nn.Embedding):
            with torch.no_grad():
                bias.weight.zero_()


def gen2_components(seed: int = 0, config: TinyFluxConfig | None = None) -> dict:
    """``FluxPipeline(**...)`` arguments of an untrained second-generation pipeline (seeded)."""
    components = tiny_flux_components(seed=seed, config=config or GEN2_CONFIG)
    make_t5_position_free(components["text_encoder_2"])
    return components


def collapse_padding(prompt_embeds: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int = 0):
    """Drop all pad tokens but one from T5 embeddings ``[B, L, D]``; return the shortened embeddings ``[B, K, D]``
    and the additive attention bias ``[B, K]`` over them (``log`` of how many pads the kept one stands for, 0 on
    the other tokens).

    Exact for a position-free T5 (identical pad embeddings) and a FLUX transformer (all-zero text ids). Every row
    must have the same number of non-pad tokens (the caller groups rows by it) and at least one pad.
    """
    is_pad = input_ids == pad_token_id
    pads = is_pad.sum(dim=1)
    kept = (~is_pad).sum(dim=1)
    if not torch.all(kept == kept[0]) or int(pads.min()) < 1:
        raise ValueError("collapse_padding needs rows of equal caption length, each with at least one pad token")
    count = int(kept[0])
    # T5's tokens come first, the pads after them (right padding).
    short = prompt_embeds[:, : count + 1]
    bias = torch.zeros(short.shape[:2], dtype=prompt_embeds.dtype)
    bias[:, count] = pads.to(prompt_embeds.dtype).log()
    return short, bias


def joint_attention_bias(text_bias: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """``[B, 1, 1, K + I]``: the attention mask FLUX's attention processors add to every logit (text first)."""
    image = torch.zeros(text_bias.shape[0], image_tokens, dtype=text_bias.dtype)
    return torch.cat([text_bias, image], dim=1)[:, None, None, :]


def log_count(n: int) -> float:
    return math.log(n)
