"""The toy world's generator: a small FLUX-architecture pipeline trained on the toy world, shipped in the package.

It was trained by ``benchmarks/toyworld/train_generator.py`` (seeded, on a 2-core CPU) and is an ordinary
``FluxPipeline`` folder: every code path of the library runs on it unchanged, offline.
"""

from __future__ import annotations

import os

import torch

from ..testing import TinyFluxConfig

PIPELINE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "pipeline")
# The resolution it was trained at, and the T5 length that covers its longest caption.
IMAGE_SIZE = 32
MAX_SEQUENCE_LENGTH = 16
# Sized for a 2-core CPU: about 0.1 s per transformer update of 32 images (64 latent tokens + 16 text tokens).
GENERATOR_CONFIG = TinyFluxConfig(
    num_layers=2,
    num_single_layers=3,
    num_attention_heads=3,
    attention_head_dim=32,
    axes_dims_rope=(8, 12, 12),
    t5_dim=64,
    t5_layers=2,
    t5_heads=4,
    clip_dim=64,
    clip_layers=2,
    clip_heads=4,
    vae_block_out_channels=(32, 64),
    vae_norm_num_groups=8,
)


def load_pipeline(torch_dtype: torch.dtype = torch.float32):
    """The shipped toy-world ``FluxPipeline`` (weights stored in fp16, returned in ``torch_dtype``), offline."""
    from diffusers import FluxPipeline

    if not os.path.isfile(os.path.join(PIPELINE_DIR, "model_index.json")):
        raise FileNotFoundError(
            f"the toy-world pipeline is missing from {PIPELINE_DIR}; it ships with diffusers-srpo "
            "(rebuild it with benchmarks/toyworld/train_generator.py)"
        )
    pipe = FluxPipeline.from_pretrained(PIPELINE_DIR, torch_dtype=torch_dtype, local_files_only=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    return pipe
