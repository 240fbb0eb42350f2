"""The element-wise arithmetic of Direct-Align and SRP, in one place.

The ``*_reference`` PyTorch functions are the specification: the fused Triton kernels in
``diffusers_srpo.kernels`` must agree with them, and they are what runs on CPU. They compute in
fp32 for fp16/bf16 inputs (fp64 for fp64) and return the inputs' promoted dtype, as the kernels do.
Sigmas (and SRP's ``k``) are per-sample: a Python float, a 0-d tensor, or a tensor of shape ``[B]``
that broadcasts over the trailing dimensions of the latents.

The public functions dispatch: CUDA tensors, with Triton importable, go to the kernels; anything
else (CPU tensors, fp64 on CPU, sigmas that need a gradient, shapes the kernels do not take) runs
the reference. ``use_reference(True)``, ``with reference_only():`` or the environment variable
``DIFFUSERS_SRPO_DISABLE_KERNELS=1`` force the reference everywhere (debugging, benchmarks).
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Iterator

import torch

from diffusers_srpo import kernels

__all__ = [
    "add_noise_prior",
    "add_noise_prior_reference",
    "one_step_x0",
    "reference_only",
    "srp_score",
    "srp_score_reference",
    "step_and_recover",
    "step_and_recover_reference",
    "step_and_recover_to_vae",
    "step_and_recover_to_vae_reference",
    "use_reference",
]

DISABLE_KERNELS_ENV = "DIFFUSERS_SRPO_DISABLE_KERNELS"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_reference_forced = False


def use_reference(enabled: bool = True) -> None:
    """Force the PyTorch reference for every op in this process (``False`` restores dispatch)."""
    global _reference_forced
    _reference_forced = enabled


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Run the PyTorch reference inside the block, whatever the tensors' device."""
    previous = _reference_forced
    use_reference(True)
    try:
        yield
    finally:
        use_reference(previous)


def _reference_is_forced() -> bool:
    return _reference_forced or os.environ.get(DISABLE_KERNELS_ENV, "") not in ("", "0")


def _is_per_sample(value, shape: torch.Size) -> bool:
    """Whether ``value`` is a constant one-per-sample value the kernels take: a number, ``[]``, ``[1]``, ``[B]`` or ``[B, 1, ...]``."""
    if not isinstance(value, torch.Tensor):
        return isinstance(value, numbers.Real)
    if value.requires_grad:  # the kernels treat sigmas and k as constants
        return False
    if value.ndim <= 1:
        return value.numel() in (1, shape[0])
    return value.ndim == len(shape) and value.shape[0] in (1, shape[0]) and all(n == 1 for n in value.shape[1:])


def _kernels_apply(tensors: tuple[torch.Tensor, ...], per_sample_values: tuple = ()) -> bool:
    """Whether the fused kernels take these inputs; otherwise the reference runs."""
    if _reference_is_forced():
        return False
    if any(tensor.dtype not in _KERNEL_DTYPES for tensor in tensors):
        return False
    devices = {tensor.device for tensor in tensors}
    if len(devices) != 1:
        return False
    device = devices.pop()
    # Checked before anything imports Triton: CPU tensors never reach a kernel unless a test opts in.
    if device.type != "cuda" and not (device.type == "cpu" and kernels.accepts_cpu_tensors()):
        return False
    if len({tensor.ndim for tensor in tensors}) != 1 or tensors[0].ndim == 0:
        return False
    try:
        shape = torch.broadcast_shapes(*(tensor.shape for tensor in tensors))
    except RuntimeError:  # the reference raises the broadcasting error
        return False
    return all(_is_per_sample(value, shape) for value in per_sample_values) and kernels.is_available()


def _compute_dtype(*tensors: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype to compute in, dtype to return): fp16/bf16 compute in fp32 and round once at the end."""
    result = tensors[0].dtype
    for tensor in tensors[1:]:
        result = torch.promote_types(result, tensor.dtype)
    return (torch.float32 if result in (torch.float16, torch.bfloat16) else result), result


def _per_sample(value, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Shape a scalar or ``[B]`` value so that it broadcasts against ``like`` (``[B, ...]``)."""
    value = torch.as_tensor(value, device=like.device).to(dtype)
    if value.ndim == 1:
        value = value.reshape(-1, *([1] * (like.ndim - 1)))
    return value


def add_noise_prior_reference(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Reference of :func:`add_noise_prior`."""
    compute, result = _compute_dtype(x0, noise)
    sigma = _per_sample(sigma, x0, compute)
    return (sigma * noise.to(compute) + (1 - sigma) * x0.to(compute)).to(result)


def add_noise_prior(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``sigma * noise + (1 - sigma) * x0``: the rectified-flow interpolation with a known noise."""
    if _kernels_apply((x0, noise), (sigma,)):
        from diffusers_srpo.kernels import flow

        return flow.add_noise_prior(x0, noise, sigma)
    return add_noise_prior_reference(x0, noise, sigma)


def _step_and_recover_in(compute: torch.dtype, model_output, sample, sigma_from, sigma_to, noise) -> torch.Tensor:
    sigma_from = _per_sample(sigma_from, sample, compute)
    sigma_to = _per_sample(sigma_to, sample, compute)
    stepped = sample.to(compute) + (sigma_to - sigma_from) * model_output.to(compute)
    return (stepped - sigma_to * noise.to(compute)) / (1 - sigma_to)


def step_and_recover_reference(
    model_output: torch.Tensor, sample: torch.Tensor, sigma_from, sigma_to, noise: torch.Tensor
) -> torch.Tensor:
    """Reference of :func:`step_and_recover`."""
    compute, result = _compute_dtype(model_output, sample, noise)
    return _step_and_recover_in(compute, model_output, sample, sigma_from, sigma_to, noise).to(result)


def step_and_recover(
    model_output: torch.Tensor, sample: torch.Tensor, sigma_from, sigma_to, noise: torch.Tensor
) -> torch.Tensor:
    """One Euler step from ``sigma_from`` to ``sigma_to``, then recovery of x0 with the known noise.

    ``x_to = sample + (sigma_to - sigma_from) * v`` and ``x0_hat = (x_to - sigma_to * noise) / (1 - sigma_to)``.
    If ``v == noise - x0`` exactly, ``x0_hat == x0`` for any pair of sigmas.
    """
    if _kernels_apply((model_output, sample, noise), (sigma_from, sigma_to)):
        from diffusers_srpo.kernels import flow

        return flow.step_and_recover(model_output, sample, sigma_from, sigma_to, noise)
    return step_and_recover_reference(model_output, sample, sigma_from, sigma_to, noise)


def _check_packed_latents(sample: torch.Tensor, latent_height: int, latent_width: int) -> None:
    if sample.ndim != 3:
        raise ValueError(f"packed latents must be [B, tokens, channels]; got shape {tuple(sample.shape)}")
    if latent_height <= 0 or latent_width <= 0 or latent_height % 2 or latent_width % 2:
        raise ValueError(
            f"latent size must be positive and even (FLUX packs 2x2 patches); got {latent_height}x{latent_width}"
        )
    _, tokens, packed_channels = sample.shape
    if tokens != (latent_height // 2) * (latent_width // 2):
        raise ValueError(
            f"packed latents have {tokens} tokens; a {latent_height}x{latent_width} latent packs into "
            f"{(latent_height // 2) * (latent_width // 2)}"
        )
    if packed_channels % 4:
        raise ValueError(f"packed latents have {packed_channels} channels; expected a multiple of 4 (2x2 patches)")


def step_and_recover_to_vae_reference(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma_from,
    sigma_to,
    noise: torch.Tensor,
    latent_height: int,
    latent_width: int,
    scaling_factor: float,
    shift_factor: float,
) -> torch.Tensor:
    """Reference of :func:`step_and_recover_to_vae`."""
    _check_packed_latents(sample, latent_height, latent_width)
    compute, result = _compute_dtype(model_output, sample, noise)
    x0_hat = _step_and_recover_in(compute, model_output, sample, sigma_from, sigma_to, noise)
    batch, _, packed_channels = x0_hat.shape
    # FluxPipeline._unpack_latents: token (i, j), channel 4c + 2di + dj -> latent[c, 2i + di, 2j + dj].
    latents = x0_hat.reshape(batch, latent_height // 2, latent_width // 2, packed_channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5).reshape(batch, packed_channels // 4, latent_height, latent_width)
    return (latents / scaling_factor + shift_factor).to(result)


def step_and_recover_to_vae(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma_from,
    sigma_to,
    noise: torch.Tensor,
    latent_height: int,
    latent_width: int,
    scaling_factor: float,
    shift_factor: float,
) -> torch.Tensor:
    """:func:`step_and_recover` on packed FLUX latents ``[B, (H/2)*(W/2), 4C]``, returned as the VAE's input.

    The result is ``[B, C, latent_height, latent_width]``: x0_hat unpacked as
    ``FluxPipeline._unpack_latents`` does (which takes pixel sizes; this takes the latent size,
    twice the packed grid), then ``x0_hat / scaling_factor + shift_factor``. One pass on a GPU.
    """
    _check_packed_latents(sample, latent_height, latent_width)
    if _kernels_apply((model_output, sample, noise), (sigma_from, sigma_to)):
        from diffusers_srpo.kernels import flow

        return flow.step_and_recover_to_vae(
            model_output, sample, sigma_from, sigma_to, noise, latent_height, latent_width, scaling_factor, shift_factor
        )
    return step_and_recover_to_vae_reference(
        model_output, sample, sigma_from, sigma_to, noise, latent_height, latent_width, scaling_factor, shift_factor
    )


def one_step_x0(model_output: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
    """The model-only clean estimate ``sample - sigma * v`` (ReFL's, with no noise prior)."""
    compute, result = _compute_dtype(model_output, sample)
    sigma = _per_sample(sigma, sample, compute)
    return (sample.to(compute) - sigma * model_output.to(compute)).to(result)


def srp_score_reference(
    image_embeds: torch.Tensor,
    positive_text_embeds: torch.Tensor,
    negative_text_embeds: torch.Tensor,
    k,
    scale: float = 1.0,
) -> torch.Tensor:
    """Reference of :func:`srp_score`."""
    compute, result = _compute_dtype(image_embeds, positive_text_embeds, negative_text_embeds)
    k = torch.as_tensor(k, device=image_embeds.device).to(compute)
    if k.ndim == 1:
        k = k[:, None]
    direction = (1 + k) * positive_text_embeds.to(compute) - negative_text_embeds.to(compute)
    image = image_embeds.to(compute)
    image_unit = image / image.norm(dim=-1, keepdim=True)
    return (scale * (image_unit * direction).sum(dim=-1)).to(result)


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
    embeds = (image_embeds, positive_text_embeds, negative_text_embeds)
    # The kernel takes the scale as a constant: a per-row scale or one that needs a gradient runs the reference.
    scale_is_constant = isinstance(scale, numbers.Real) or (
        isinstance(scale, torch.Tensor) and scale.ndim == 0 and not scale.requires_grad
    )
    if image_embeds.ndim == 2 and scale_is_constant and _kernels_apply(embeds, (k,)):
        from diffusers_srpo.kernels import srp

        return srp.srp_score(image_embeds, positive_text_embeds, negative_text_embeds, k, float(scale))
    return srp_score_reference(image_embeds, positive_text_embeds, negative_text_embeds, k, scale)
