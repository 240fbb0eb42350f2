"""The toy world's generator: a small FLUX-architecture pipeline trained on the toy world, shipped in the package.

It is an ordinary ``FluxPipeline`` folder (fp16, 17.4 MiB) that every code path of the library runs on unchanged,
offline. It was trained in stages on a 2-core CPU by ``benchmarks/toyworld/train_gen2.py`` (the run's settings,
log and weights: ``benchmarks/toyworld/gen2-run``; every stage: ``benchmarks/toyworld/RESULTS.md``). On fresh noises
its prompted images show the asked colour, lighting and texture >= 0.99 of the time and the asked shape >= 0.94
(pixel oracles), and content-only prompts ("a red circle") draw bright or dark, smooth or grainy scenes 39-59 %
of the time: a style to steer.

How it is built:

- 64 x 64 images through a three-block ``AutoencoderKL`` (factor 4, FLUX's 16 latent channels), so the
  transformer sees 8 x 8 = 64 packed tokens;
- a ``FluxTransformer2DModel`` of 3 double and 4 single blocks, width 128 (:data:`GENERATOR_CONFIG`);
- **a position-free T5 encoder**: its relative-attention bias is zero, so the encoder is permutation-equivariant
  and every ``<pad>`` token it encodes comes out identical, at any padding length. The transformer's text ids are
  all zero (FLUX's), so identical pad tokens stay identical through every block, and ``N`` of them weigh in
  attention exactly as one of them with ``log N`` added to its attention logit. Training uses that identity
  (:func:`collapse_padding`): each caption is encoded at a random padding length up to FluxPipeline's default 512,
  but the transformer is run on the caption's tokens plus one pad token carrying the bias, at the cost of a
  17-token context; the stock call (``max_sequence_length=512``) then runs the very function that was trained, and
  the toy trainers' cheap 16 tokens (:data:`MAX_SEQUENCE_LENGTH`) the same function too.
  (Captions are still told apart: T5 sees them as bags of words, CLIP's pooled embedding keeps the order.)

FluxPipeline's default image size is hard-coded (``default_sample_size = 128``: 512 px with this VAE), so
:func:`load_pipeline` sets it to 64 px: ``load_pipeline()("a red circle")`` with every other argument stock
draws what was trained.
"""

from __future__ import annotations

import os

import torch

from ..testing import TinyFluxConfig, tiny_flux_components

PIPELINE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "pipeline")
#: The resolution it was trained at.
IMAGE_SIZE = 64
#: FluxPipeline's default (and maximum) T5 length, which training covers.
STOCK_MAX_SEQUENCE_LENGTH = 512
#: The T5 length the toy trainers use (cheap): it covers the longest caption (12 tokens with the end token).
MAX_SEQUENCE_LENGTH = 16

GENERATOR_CONFIG = TinyFluxConfig(
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


def load_pipeline(torch_dtype: torch.dtype = torch.float32):
    """The shipped toy-world ``FluxPipeline`` (weights stored in fp16, returned in ``torch_dtype``), offline, in
    eval mode, its default image size set to the trained 64 px."""
    from diffusers import FluxPipeline

    if not os.path.isfile(os.path.join(PIPELINE_DIR, "model_index.json")):
        raise FileNotFoundError(
            f"the toy-world pipeline is missing from {PIPELINE_DIR}; it ships with diffusers-srpo "
            "(rebuild it with benchmarks/toyworld/train_gen2.py ... export)"
        )
    pipe = FluxPipeline.from_pretrained(PIPELINE_DIR, torch_dtype=torch_dtype, local_files_only=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor
    return pipe


def make_t5_position_free(text_encoder_2) -> None:
    """Zero the T5 encoder's relative-attention bias (in place): pad tokens then encode identically anywhere."""
    for module in text_encoder_2.modules():
        bias = getattr(module, "relative_attention_bias", None)
        if isinstance(bias, torch.nn.Embedding):
            with torch.no_grad():
                bias.weight.zero_()


def generator_components(seed: int = 0, config: TinyFluxConfig | None = None) -> dict:
    """``FluxPipeline(**...)`` arguments of an untrained generator (seeded; :data:`GENERATOR_CONFIG` by default)."""
    components = tiny_flux_components(seed=seed, config=config or GENERATOR_CONFIG)
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
