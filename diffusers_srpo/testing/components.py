"""Shared building blocks of the tiny pipelines: seeded construction, and the CLIP and T5 tokenizers built offline
(the CLIP BPE vocabulary ships inside open_clip; the T5 vocabulary is a small one made here)."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache

import torch

_CLIP_VOCAB_SIZE = 49408
_CLIP_BOS_ID = 49406
_CLIP_EOS_ID = 49407


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


def seeded(seed: int, build):
    # Module constructors draw their initial weights from the global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_t5_encoder(
    seed: int, vocab_size: int, width: int, layers: int, heads: int, ff_width: int = 0, head_width: int = 0
):
    """A ``T5EncoderModel`` of ``width`` (the transformer's text width), gated-GELU as T5 v1.1; ``ff_width`` and
    ``head_width`` 0 mean ``2 * width`` and ``width // heads``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_ff=ff_width or 2 * width,
        d_kv=head_width or width // heads,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return seeded(seed, lambda: T5EncoderModel(config))


def tiny_autoencoder(seed: int, vae_class, block_out_channels, latent_channels: int, norm_num_groups: int, **config):
    """A small 2D VAE of diffusers' ``AutoencoderKL`` family (``vae_class``): one layer per block, each block after
    the first halving the resolution; ``config`` adds the class's own settings (scaling and shift factors)."""
    num_blocks = len(block_out_channels)
    return seeded(
        seed,
        lambda: vae_class(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * num_blocks,
            up_block_types=("UpDecoderBlock2D",) * num_blocks,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=32,
            **config,
        ),
    )
