"""Semantic Relative Preference: a CLIP-like reward made relative with control words (SPEC section 2).

``r_srp(x) = score_scale * < f_img(x), (1 + k) * f_txt("{pos}. {prompt}") - f_txt("{neg}. {prompt}") >``.
The difference of two text embeddings cancels whatever the reward model likes regardless of the text
(its general biases, which reward hacking exploits); ``k`` weighs the positive direction; ``swap``
exchanges the two prompts for the inversion branch. The arithmetic is ``diffusers_srpo.ops.srp_score``,
so a fused kernel dispatched there runs underneath unchanged.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .. import ops
from .base import CLIPLikeReward, Reward

# The reference's control words (SPEC section 2), cycled by step as pos[step % 4], neg[step % 5].
DEFAULT_POSITIVE_WORDS = ("Natural-lighting", "Detail", "Detailed", "Real")
DEFAULT_NEGATIVE_WORDS = ("Concept art", "Painting", "Anime", "Flat", "Oil")
CONTROL_TEMPLATE = "{word}. {prompt}"
WORD_SCHEDULES = ("cycle", "fixed")


def _word_list(words, default: Sequence[str], name: str) -> tuple[str, ...]:
    words = tuple(default if words is None else ([words] if isinstance(words, str) else words))
    if not words:
        raise ValueError(f"{name} must hold at least one word; got an empty list")
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"{name} must be non-empty strings; got {list(words)}")
    return words


class SemanticRelativeReward(Reward):
    """SRP on top of a :class:`~diffusers_srpo.rewards.CLIPLikeReward`.

    Args:
        base: the CLIP-like reward (HPSv2, PickScore, CLIP) whose encoders and ``score_scale`` are used.
        positive_words, negative_words: control words; default to the SPEC's (reference) words.
        word_schedule: ``"cycle"`` picks ``words[step % len(words)]`` for each list; ``"fixed"`` always the first.
        template: how a control word is attached to a prompt; the reference's ``"{word}. {prompt}"``.
        cache_size: how many text embeddings are kept (least recently used dropped first).

    Text embeddings are cached by their full text, per device, dtype and autocast setting of ``base``:
    prompts repeat every step with the same few words, and the text encoder does not run again for a text
    already seen. The images go through ``base.encode_image`` (L2-normalised); ``ops.srp_score`` normalises
    once more, which is idempotent and keeps the op usable on raw embeddings.
    """

    def __init__(
        self,
        base: CLIPLikeReward,
        positive_words: Sequence[str] | None = None,
        negative_words: Sequence[str] | None = None,
        word_schedule: str = "cycle",
        template: str = CONTROL_TEMPLATE,
        cache_size: int = 65536,
    ):
        super().__init__()
        if not isinstance(base, CLIPLikeReward):
            raise TypeError(
                f"base must be a CLIPLikeReward (with encode_image, encode_text and score_scale); got {type(base).__name__}"
            )
        if word_schedule not in WORD_SCHEDULES:
            raise ValueError(f"word_schedule must be one of {WORD_SCHEDULES}; got {word_schedule!r}")
        if "{word}" not in template or "{prompt}" not in template:
            raise ValueError(f"template must contain '{{word}}' and '{{prompt}}'; got {template!r}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1; got {cache_size}")
        self.base = base
        self.positive_words = _word_list(positive_words, DEFAULT_POSITIVE_WORDS, "positive_words")
        self.negative_words = _word_list(negative_words, DEFAULT_NEGATIVE_WORDS, "negative_words")
        self.word_schedule = word_schedule
        self.template = template
        self.cache_size = cache_size
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._freeze()

    def words_at(self, step: int) -> tuple[str, str]:
        """The (positive, negative) control words of optimisation step ``step``."""
        if self.word_schedule == "fixed":
            return self.positive_words[0], self.negative_words[0]
        positive = self.positive_words[step % len(self.positive_words)]
        return positive, self.negative_words[step % len(self.negative_words)]

    def control_prompts(self, prompts: Sequence[str], step: int = 0, swap: bool = False) -> tuple[list[str], list[str]]:
        """The texts whose embeddings take the positive and the negative role (exchanged when ``swap``)."""
        positive_word, negative_word = self.words_at(step)
        positive = [self.template.format(word=positive_word, prompt=p) for p in prompts]
        negative = [self.template.format(word=negative_word, prompt=p) for p in prompts]
        return (negative, positive) if swap else (positive, negative)

    def encode_text_cached(self, texts: Sequence[str]) -> torch.Tensor:
        """``base.encode_text(texts)``, running the text encoder only for texts not seen before in this setting.

        Each new text is encoded on its own. Batched matmuls round differently with the batch, so an embedding
        computed beside other texts would depend on which texts happened to be new in the same call: encoded
        alone, it is a function of its text, and a score does not depend on the history of the cache (a
        resumed run reproduces an uninterrupted one bit for bit).
        """
        device = self.base.device
        # Besides the text, what changes the encoder's numbers: an embedding is reused only where it was made.
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        setting = (str(device), self.base.dtype, autocast)
        embeddings: dict[str, torch.Tensor] = {}
        for text in dict.fromkeys(texts):
            key = (text, *setting)
            if key not in self._text_cache:
                with torch.no_grad():
                    self._text_cache[key] = self.base.encode_text([text])[0]
            self._text_cache.move_to_end(key)
            embeddings[text] = self._text_cache[key]
        while len(self._text_cache) > self.cache_size:
            self._text_cache.popitem(last=False)
        return torch.stack([embeddings[text] for text in texts])

    def clear_text_cache(self) -> None:
        """Forget every cached text embedding (e.g. after changing the base model's weights)."""
        self._text_cache.clear()

    def _check_k(self, k, batch_size: int):
        if isinstance(k, torch.Tensor):
            if k.ndim > 1 or (k.ndim == 1 and k.shape[0] != batch_size):
                raise ValueError(f"k must be a float or a tensor of shape [{batch_size}]; got shape {tuple(k.shape)}")
            return k.float()
        if not isinstance(k, numbers.Real):  # numpy scalars too
            raise TypeError(f"k must be a float or a tensor of shape [{batch_size}]; got {type(k).__name__}")
        return float(k)

    def forward(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        k: float | torch.Tensor = 0.0,
        swap: bool = False,
        step: int = 0,
    ) -> torch.Tensor:
        """The SRP score ``[B]`` (float32) of a batch.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1].
            prompts: ``B`` plain prompts (the control words are added here, for the reward only).
            k: weight of the positive direction, a float or a per-sample ``[B]`` tensor.
            swap: exchange the positive and negative texts (SRPO's inversion branch).
            step: optimisation step, which picks the control words when they cycle.
        """
        self.check_inputs(images, prompts)
        return self.score(images, prompts, self._check_k(k, images.shape[0]), swap, step)

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        k: float | torch.Tensor = 0.0,
        swap: bool = False,
        step: int = 0,
    ) -> torch.Tensor:
        """The SRP score of already validated inputs (see :meth:`forward`)."""
        positive_texts, negative_texts = self.control_prompts(prompts, step, swap)
        text_embeds = self.encode_text_cached(positive_texts + negative_texts)
        batch_size = images.shape[0]
        return ops.srp_score(
            self.base.encode_image(images),
            text_embeds[:batch_size],
            text_embeds[batch_size:],
            k,
            scale=self.base.score_scale,
        ).float()

    def plain(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The base reward of the plain prompts (through the text cache), e.g. for logging."""
        self.check_inputs(images, prompts)
        image_embeds = self.base.encode_image(images)
        return self.base.score_scale * (image_embeds * self.encode_text_cached(prompts)).sum(dim=-1)
