"""DRaFT-K (Clark et al. 2024): back-propagate the reward through the last K sampler steps (SPEC section 3)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .base import BaseTrainer, StepOutput
from .config import DRaFTConfig


class DRaFTTrainer(BaseTrainer):
    """DRaFT-K in the SRPO machinery: the rollout runs without gradient to ``K`` steps before the end, then the
    last ``K`` Euler steps run with gradient, the final latents are decoded and scored, and the hinge loss is
    back-propagated through the whole truncated chain. ``draft_k=0`` is the full chain (AlignProp-like).

    The steps with gradient are steps of the same sampler as the rollout (``rollout_guidance``), so ``draft_k=0``
    differentiates exactly the sampler the model is evaluated with. With ``gradient_checkpointing`` each step with
    gradient is one activation checkpoint: only the ``K`` latents between steps stay in memory. Inside it the
    transformer's own block checkpointing stays on, so a step's backward first re-runs the step's forward and then
    each block's: three transformer passes per step, for the memory of one block at a time.
    """

    config_class = DRaFTConfig
    config_file_name = "draft_config.json"

    def model_card_details(self) -> dict[str, str]:
        k = self.config.gradient_steps
        return {
            "reward": type(self.reward).__name__,
            "reward template": self.config.reward_template,
            "gradient steps": f"the last {k} of {self.config.rollout_steps}" + (" (full chain)" if k == self.config.rollout_steps else ""),
        }

    def training_step(self, step: int, micro_step: int = 0) -> StepOutput:
        config, accelerator = self.config, self.accelerator
        prompts, text = self.step_prompts(step, micro_step)
        noise = self.step_noise(step, len(prompts), micro_step=micro_step)
        sigmas = self.rollout_sigmas
        first_gradient_step = len(sigmas) - 1 - config.gradient_steps
        start = self.sample_latents(noise, text, sigmas[: first_gradient_step + 1], config.rollout_guidance)
        logs: dict[str, float] = {}

        def compute() -> torch.Tensor:
            latents = start
            with accelerator.autocast():
                for sigma, sigma_next in zip(sigmas[first_gradient_step:-1], sigmas[first_gradient_step + 1 :], strict=True):
                    if config.gradient_checkpointing:
                        # The recompute calls the prepared (DDP) model again during backward: safe because every
                        # trainable parameter takes part in every step.
                        latents = checkpoint(
                            self.euler_step, latents, sigma, sigma_next, text, config.rollout_guidance, use_reentrant=False
                        )
                    else:
                        latents = self.euler_step(latents, sigma, sigma_next, text, config.rollout_guidance)
                scores = self.decode_and_score(latents, prompts)
            logs["reward"] = scores.detach().mean().item()
            return self.hinge_loss(scores, logs)

        return StepOutput(losses={"draft": compute}, logs=logs)
