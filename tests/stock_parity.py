"""The two sides of a family's sampler parity test: the stock pipeline's ``__call__`` from given noise, and the
adapter's Euler steps along ``adapter.stock_sigmas``."""

import torch


def stock_call(pipe, adapter, noise, guidance, prompts, size, steps, max_sequence_length, output_type="latent"):
    """``pipe(prompts, latents=noise, ...)`` with the guidance settings ``adapter`` says reproduce its own."""
    return pipe(
        prompts,
        height=size,
        width=size,
        num_inference_steps=steps,
        latents=noise.clone(),
        output_type=output_type,
        **adapter.pipeline_call_kwargs(guidance, max_sequence_length),
    ).images


@torch.no_grad()
def euler_rollout(adapter, noise, text, guidance, size, steps, sigma_scale=1.0):
    """``x <- x + (sigma_next - sigma) v(x, sigma * sigma_scale)`` along the stock sigmas (``sigma_scale`` puts the
    timestep off, to show that the parity test would see it)."""
    sigmas = adapter.stock_sigmas(steps, size, size)
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = adapter.predict_velocity(adapter.transformer, x, sigma * sigma_scale, text, guidance, size, size)
        x = x + (sigma_next - sigma) * v
    return x
