"""The reward protocol: ``reward(images, prompts) -> Tensor[B]``, differentiable in the images, frozen in its weights.

Images are ``[B, 3, H, W]`` floats in [0, 1] (what the VAE decode of the trainer gives after ``x / 2 + 0.5``);
prompts are a list of ``B`` strings. Inputs are checked before any model work, so a wrong shape fails in
microseconds with a message that names it instead of deep inside a vision tower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation, used by HPSv2, PickScore, LAION CLIP models and the LAION aesthetic predictor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_images(images) -> None:
    """Raise ``ValueError`` unless ``images`` is a floating ``[B, 3, H, W]`` tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape [B, 3, H, W]; got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W] (RGB, channels first); got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1]; got dtype {images.dtype}")


def check_prompts(prompts, batch_size: int | None = None) -> None:
    """Raise unless ``prompts`` is a list (or tuple) of strings, of length ``batch_size`` when given."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings; got {type(prompts).__name__}")
    if not all(isinstance(p, str) for p in prompts):
        kinds = sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})
        raise TypeError(f"prompts must be a list of strings; it contains {', '.join(kinds)}")
    if batch_size is not None and len(prompts) != batch_size:
        raise ValueError(
            f"got {len(prompts)} prompts for a batch of {batch_size} images; expected one prompt per image"
        )


def clip_preprocess(
    images: torch.Tensor,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP's evaluation preprocessing as differentiable tensor ops.

    Bicubic resize of the shorter side to ``image_size`` with antialiasing (torch's antialiased bicubic
    uses PIL's kernel, so this matches the PIL pipeline of open_clip and CLIP to about one uint8 level),
    centre crop to a square, then per-channel normalisation. Runs in float32 whatever the input dtype.
    Unlike PIL it does not clip the resize's overshoot to [0, 1], which keeps gradients everywhere; that
    only shows when sharp edges are upscaled.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    pixels = images.float()
    if min(pixels.shape[-2:]) != image_size:
        pixels = TF.resize(pixels, [image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pixels = TF.center_crop(pixels, [image_size, image_size])
    return TF.normalize(pixels, list(mean), list(std))


class Reward(torch.nn.Module):
    """Base class of every reward: ``forward(images, prompts) -> Tensor[B]`` in float32.

    Subclasses implement :meth:`score` and call :meth:`_freeze` at the end of ``__init__``: the reward's
    own weights never train (``requires_grad_(False)``) and it never leaves eval mode, even when a
    trainer calls ``.train()`` on a parent module, because dropout in a reward would make it noisy.
    """

    #: Whether the score depends on the prompts. Text-free rewards also accept ``prompts=None``.
    uses_text: bool = True

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        """Stay in eval mode whatever ``mode`` is: a reward is a fixed function of the images."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the reward's weights (CPU for a reward without any)."""
        tensor = next(self.parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the reward's weights (float32 for a reward without any)."""
        tensor = next(self.parameters(), None)
        return tensor.dtype if tensor is not None else torch.float32

    def check_inputs(self, images, prompts) -> None:
        """Raise a clear error for a malformed batch, before any model work."""
        check_images(images)
        if prompts is None and not self.uses_text:
            return
        check_prompts(prompts, images.shape[0])

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """Score a batch: ``[B, 3, H, W]`` images in [0, 1] and ``B`` prompts -> float32 ``[B]``."""
        self.check_inputs(images, prompts)
        return self.score(images, prompts).float()

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """The reward of already validated inputs; what subclasses implement."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(images, prompts)")


class CLIPLikeReward(Reward):
    """A reward of the form ``score_scale * <f_img(x), f_txt(p)>`` with L2-normalised embeddings.

    Subclasses set ``image_size`` (and ``image_mean`` / ``image_std`` when not CLIP's) and implement
    :meth:`image_features` and :meth:`text_features`, the raw tower outputs. ``score_scale`` is 1 for
    HPSv2 and open_clip models and ``exp(logit_scale) / 20`` for PickScore and transformers CLIP models
    (the reference's way of bringing PickScore to HPS's range).
    """

    score_scale: float = 1.0
    image_size: int = 224
    #: Width ``D`` of the embeddings, when the model declares it.
    embed_dim: int | None = None
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [0, 1] -> the model's normalised ``[B, 3, S, S]`` input, differentiably."""
        return clip_preprocess(images, self.image_size, self.image_mean, self.image_std)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings ``[B, D]`` of preprocessed pixels."""
        raise NotImplementedError(f"{type(self).__name__} must implement image_features(pixel_values)")

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised text embeddings ``[N, D]`` of a list of strings."""
        raise NotImplementedError(f"{type(self).__name__} must implement text_features(texts)")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings ``[B, D]``, differentiable with respect to ``images``."""
        check_images(images)
        features = self.image_features(self.preprocess(images).to(self.dtype))
        return F.normalize(features.float(), dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings ``[N, D]``."""
        check_prompts(prompts)
        return F.normalize(self.text_features(list(prompts)).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score_scale * (self.encode_image(images) * self.encode_text(prompts)).sum(dim=-1)


class CallableReward(Reward):
    """Wrap a user's differentiable ``fn(images, prompts) -> Tensor[B]`` as a :class:`Reward`.

    The wrapper checks the inputs before calling ``fn`` and the shape of what it returns. When ``fn`` is
    a ``torch.nn.Module`` it becomes a submodule, so ``.to(device, dtype)`` moves it and it is frozen; the
    images reach it in the dtype of its weights.
    With ``uses_text=False`` the reward also accepts ``prompts=None`` and passes ``None`` on to ``fn``.
    """

    def __init__(self, fn: Callable[[torch.Tensor, list[str] | None], torch.Tensor], uses_text: bool = True):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(images, prompts) -> Tensor[B]; got {type(fn).__name__}")
        self.fn = fn
        self.uses_text = uses_text
        self._freeze()

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        if next(self.parameters(), None) is not None:
            # As the CLIP rewards do: after .to(dtype) the reward still takes float32 (or any float) images.
            images = images.to(self.dtype)
        scores = self.fn(images, None if prompts is None else list(prompts))
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (images.shape[0],):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"the reward function must return a tensor of shape [{images.shape[0]}]; got {shape}")
        return scores


class PromptTemplateReward(Reward):
    """``base`` scoring each image against ``template.format(prompt=p)`` instead of the plain prompt ``p``.

    What a plain-reward method uses to aim the reward (``"bright. {prompt}"``, ``"a photo. {prompt}"``) while the
    generator keeps the plain prompt: SRP's positive word without its negative counterpart.
    """

    def __init__(self, base: Reward, template: str):
        super().__init__()
        if not isinstance(base, Reward):
            raise TypeError(f"base must be a Reward; got {type(base).__name__}")
        if not base.uses_text:
            raise ValueError(f"{type(base).__name__} does not read the prompt, so a prompt template cannot change it")
        self.base = base
        self.template = template
        template.format(prompt="")  # a malformed template fails here, not at the first step
        self._freeze()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.base(images, [self.template.format(prompt=p) for p in prompts])
