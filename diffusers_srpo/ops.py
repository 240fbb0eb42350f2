"""The element-wise arithmetic of Direct-Align and SRP, in one place.

These PyTorch functions are the specification: the fused Triton kernels in
``diffusers_srpo.kernels`` must agree with them, and they are what runs on CPU.
Sigmas are per-sample: a Python float, a 0-d tensor, or a tensor of shape ``[B]``
that broadcasts over the trailing dimensions of the latents.
"""

from __future__ import annotations

import torch


def _per_sample(sigma, like: torch.Tensor) -> torch.Tensor:
    """Shape a scalar or ``[B]`` sigma so that it broadcasts against ``like`` (``[B, ...]``)."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.ndim == 1:
        sigma = sigma.reshape(-1, *([1] * (like.ndim - 1)))
    return sigma


def add_noise_prior(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``sigma * noise + (1 - sigma) * x0``: the rectified-flow interpolation with a known noise."""
    sigma = _per_sample(sigma, x0).to(x0.dtype)
    return sigma * noise + (1 - sigma) * x0


def step_and_recover(
    model_output: torch.Tensor, sample: torch.Tensor, sigma_from, sigma_to, noise: torch.Tensor
) -> torch.Tensor:
    """One Euler step from ``sigma_from`` to ``sigma_to``, then recovery of x0 with the known noise.

    ``x_to = sample + (sigma_to - sigma_from) * v`` and ``x0_hat = (x_to - sigma_to * noise) / (1 - sigma_to)``.
    If ``v == noise - x0`` exactly, ``x0_hat == x0`` for any pair of sigmas.
    """
    sigma_from = _per_sample(sigma_from, sample).to(sample.dtype)
    sigma_to = _per_sample(sigma_to, sample).to(sample.dtype)
    stepped = sample + (sigma_to - sigma_from) * model_output
    return (stepped - sigma_to * noise) / (1 - sigma_to)


def one_step_x0(model_output: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
    """The model-only clean estimate ``sample - sigma * v`` (ReFL's, with no noise prior)."""
    sigma = _per_sample(sigma, sample).to(sample.dtype)
    return sample - sigma * model_output


def srp_score(
    image_embeds: torch.Tensor,
    positive_text_embeds: torch.Tensor,
    negative_text_embeds: torch.Tensor,
    k,
    scale: float = 1.0,
) -> torch.Tensor:
    """``scale * <e / |e|, (1 + k) * t_pos - t_neg>`` row by row: the Semantic Relative Preference score.

    ``image_embeds`` is ``[B, D]`` and need not be normalised; the text embeddings are ``[B, D]``
    (already L2-normalised by the reward); ``k`` is a float or ``[B]``.
    """
    k = torch.as_tensor(k, device=image_embeds.device, dtype=image_embeds.dtype)
    if k.ndim == 1:
        k = k[:, None]
    direction = (1 + k) * positive_text_embeds - negative_text_embeds
    image_unit = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    return scale * (image_unit * direction).sum(dim=-1)
