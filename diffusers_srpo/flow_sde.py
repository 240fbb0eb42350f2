"""The stochastic transition of a flow sampler and its closed-form log-density (../SPEC.md section 4).

A rectified-flow model samples with the ODE ``dx = v dsigma``. Preference methods that need a policy with a
density (TailorPO, trajectory-level DPO, Flow-GRPO) use the SDE with the same marginals instead, discretised
as Flow-GRPO does it: one step from ``sigma`` to ``sigma_next`` is a Gaussian with

    dt   = sigma_next - sigma                        (negative: towards the data)
    s    = a * sqrt(sigma / (1 - sigma))             (the diffusion coefficient, ``a`` the noise level; in
                                                      ``1 - sigma``, sigma = 1 is replaced by ``sigma_at_one``,
                                                      the schedule's second sigma)
    mean = x * (1 + s^2 / (2 sigma) * dt) + v * (1 + s^2 (1 - sigma) / (2 sigma)) * dt
    std  = s * sqrt(-dt)

With ``a = 0`` the mean is the Euler step ``x + dt * v`` and the std is 0. Every number here is computed in
float32 (float64 for float64 inputs): the log-density of a latent sums tens of thousands of terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FlowTransition", "dpo_log_ratio", "flow_sde_transition", "same_std_kl"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A float, 0-d or ``[B]`` value as a ``[B, 1, ...]`` tensor that broadcasts against ``like``."""
    value = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    if value.shape != (like.shape[0],):
        raise ValueError(f"a per-sample sigma must be a float or a tensor of shape [{like.shape[0]}], got {tuple(value.shape)}")
    return value.view(-1, *([1] * (like.ndim - 1)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class FlowTransition:
    """The Gaussian ``N(mean, std^2 I)`` of one stochastic sampler step, per sample.

    ``mean`` has the latents' shape; ``std`` is ``[B, 1, ...]`` (one std per sample, broadcastable).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * z``; ``z`` drawn on ``generator``'s device (the CPU by default) for reproducibility."""
        device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * z.to(self.mean.device)

    def log_prob(self, x_next: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """``log N(x_next; mean, std^2)`` per sample ``[B]``: summed over the latent (the density), or its mean
        per element (``reduction="mean"``: the scale DDPO, D3PO and Flow-GRPO use, independent of resolution)."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if not (self.std > 0).all():
            raise ValueError("log_prob needs std > 0 (a noise level of 0 makes the step deterministic)")
        x_next = x_next.to(self.mean.dtype)
        per_element = -((x_next - self.mean) ** 2) / (2 * self.std**2) - torch.log(self.std) - _LOG_SQRT_2PI
        per_element = per_element.flatten(1)
        return per_element.sum(1) if reduction == "sum" else per_element.mean(1)


def flow_sde_transition(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    sigma_at_one: float,
) -> FlowTransition:
    """The SDE step's Gaussian from ``sample`` at ``sigma`` to ``sigma_next`` given the model's ``velocity``.

    Args:
        sample, velocity: ``[B, ...]`` latents and the model's velocity at them (any float dtype).
        sigma, sigma_next: floats or per-sample ``[B]`` tensors, ``sigma_next < sigma``.
        noise_level: ``a`` (Flow-GRPO uses 0.7); 0 gives the Euler ODE step with std 0.
        sigma_at_one: the sigma that stands for 1 in ``1 - sigma`` (the schedule's second sigma), keeping the
            std finite at pure noise.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level!r}")
    if not 0 < sigma_at_one < 1:
        raise ValueError(f"sigma_at_one must be in (0, 1), got {sigma_at_one!r}")
    dtype = _compute_dtype(sample, velocity)
    sample, velocity = sample.to(dtype), velocity.to(dtype)
    sigma, sigma_next = _per_sample(sigma, sample), _per_sample(sigma_next, sample)
    if not ((sigma_next < sigma) & (sigma <= 1) & (sigma_next >= 0)).all():
        raise ValueError(
            f"a flow SDE step needs 1 >= sigma > sigma_next >= 0 for every sample, got sigma={sigma.flatten().tolist()} "
            f"and sigma_next={sigma_next.flatten().tolist()}"
        )
    dt = sigma_next - sigma
    std_sigma = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_at_one), sigma)))
    mean = sample * (1 + std_sigma**2 / (2 * sigma) * dt) + velocity * (1 + std_sigma**2 * (1 - sigma) / (2 * sigma)) * dt
    return FlowTransition(mean=mean, std=std_sigma * torch.sqrt(-dt))


def dpo_log_ratio(
    x_next: torch.Tensor, policy_mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``log pi_theta(x_next) - log pi_ref(x_next)`` per sample for two Gaussians with the same ``std``.

    Equals ``policy.log_prob(x) - reference.log_prob(x)`` but is computed as
    ``(mu_theta - mu_ref) * (2 x - mu_theta - mu_ref) / (2 std^2)``, without the two large terms that cancel, so
    it is exactly 0 when the means agree (a LoRA at initialisation) and accurate when they barely differ.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    dtype = _compute_dtype(x_next, policy_mean, reference_mean)
    x_next, policy_mean, reference_mean = x_next.to(dtype), policy_mean.to(dtype), reference_mean.to(dtype)
    per_element = (policy_mean - reference_mean) * (2 * x_next - policy_mean - reference_mean) / (2 * std.to(dtype) ** 2)
    per_element = per_element.flatten(1)
    return per_element.sum(1) if reduction == "sum" else per_element.mean(1)


def same_std_kl(mean: torch.Tensor, other_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``KL(N(mean, std^2 I) || N(other_mean, std^2 I))`` per sample ``[B]``: ``(mean - other_mean)^2 / (2 std^2)``
    per element, summed over the latent (the KL) or its mean per element (``reduction="mean"``, the scale of the
    per-element log-probabilities). Two steps of the flow SDE from the same state share their std, so this is the
    KL between the policy's and the reference's Gaussian of one step (GRPO's KL term, SPEC section 5)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    dtype = _compute_dtype(mean, other_mean)
    per_element = (mean.to(dtype) - other_mean.to(dtype)) ** 2 / (2 * std.to(dtype) ** 2)
    per_element = per_element.flatten(1)
    return per_element.sum(1) if reduction == "sum" else per_element.mean(1)
