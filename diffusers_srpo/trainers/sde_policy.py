"""What the trainers that sample the flow SDE share (TailorPO, GRPO): the sampler's velocity and transition, and
the reference policy their losses compare against."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from ..flow_sde import flow_sde_transition
from . import sharding
from .base import BaseTrainer


class SDEPolicyTrainer(BaseTrainer):
    """A trainer whose policy is the flow SDE along the rollout schedule (``config.noise_level``), with a reference
    policy: the model with its LoRA disabled, or :meth:`frozen_reference` for a full fine-tune."""

    reference_model: torch.nn.Module | None = None

    def frozen_reference(self) -> torch.nn.Module:
        """A frozen copy of the base, made before accelerate wraps the transformer and in the trained weights' dtype,
        so that policy and reference agree exactly at the start. It costs a second transformer in memory (sharded
        under FSDP)."""
        if self.config.fsdp:
            reference = sharding.shard_copy(self.pipe.transformer, self.accelerator.device, self.fsdp_param_dtype)
        else:
            reference = copy.deepcopy(self.pipe.transformer)
        return reference.requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[torch.nn.Module]:
        """The reference model: the prepared model with its LoRA disabled, or the frozen copy of a full fine-tune."""
        if self.reference_model is not None:
            yield self.reference_model
            return
        transformer = self.accelerator.unwrap_model(self.model)
        transformer.disable_adapters()
        try:
            yield self.model
        finally:
            transformer.enable_adapters()

    def model_velocity(self, model: torch.nn.Module, latents: torch.Tensor, sigma, text) -> torch.Tensor:
        """The sampler's velocity (``rollout_guidance``) of ``model`` at ``latents`` (any dtype), float32."""
        size = self.config.resolution
        with self.accelerator.autocast():
            velocity = self.adapter.predict_velocity(
                model, latents.to(self.weight_dtype), sigma, text, self.config.rollout_guidance, size, size
            )
        return velocity.float()

    def transition(self, latents, velocity, sigma, sigma_next):
        return flow_sde_transition(
            latents, velocity, sigma, sigma_next, self.config.noise_level, sigma_at_one=float(self.rollout_sigmas[1])
        )
