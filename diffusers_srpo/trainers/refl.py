"""ReFL (Xu et al. 2023): one gradient step at a late timestep with the model-only clean estimate (SPEC section 3)."""

from __future__ import annotations

import torch

from .base import BaseTrainer, StepOutput
from .config import ReFLConfig

# Random stream of the late step (see BaseTrainer.generator).
_STEP_STREAM = 3


class ReFLTrainer(BaseTrainer):
    """The ReFL baseline in the SRPO machinery: rollout without gradient to a late step ``i`` of the window, one
    transformer forward with gradient there (the sampler's own step: ``rollout_guidance``), ``x0_hat = x_i - sigma_i * v``,
    decode, reward, hinge.

    Where Direct-Align recovers x0 with the known noise (sharp at any sigma), ReFL's estimate is only sharp late in
    the trajectory, which is why it trains there and why it tends to over-optimise the last steps.
    """

    config_class = ReFLConfig
    config_file_name = "refl_config.json"

    def model_card_details(self) -> dict[str, str]:
        steps = self.config.refl_steps()
        return {
            "reward": type(self.reward).__name__,
            "reward template": self.config.reward_template,
            "gradient step": f"one of rollout steps {steps[0]}-{steps[-1]} of {self.config.rollout_steps}",
        }

    def late_step_index(self, step: int, micro_step: int = 0) -> int:
        """The rollout step of a micro-batch's gradient step, drawn uniformly from the window (one per micro-batch:
        its samples share the rollout up to it)."""
        steps = self.config.refl_steps()
        generator = self.generator(step, _STEP_STREAM, per_process=True, micro_step=micro_step)
        draw = torch.randint(len(steps), (1,), generator=generator)
        return steps[int(draw)]

    def training_step(self, step: int, micro_step: int = 0) -> StepOutput:
        config, accelerator = self.config, self.accelerator
        prompts, text = self.step_prompts(step, micro_step)
        noise = self.step_noise(step, len(prompts), micro_step=micro_step)
        index = self.late_step_index(step, micro_step)
        sigma = self.rollout_sigmas[index]
        latents = self.sample_latents(noise, text, self.rollout_sigmas[: index + 1], config.rollout_guidance)
        logs = {"refl_sigma": sigma.item()}

        def compute() -> torch.Tensor:
            with accelerator.autocast():
                velocity = self.velocity(latents, sigma, text, config.rollout_guidance)
                x0_estimate = self.scheduler.one_step_x0(velocity.float(), latents.float(), sigma)
                scores = self.decode_and_score(x0_estimate, prompts)
            logs["reward"] = scores.detach().mean().item()
            return self.hinge_loss(scores, logs)

        return StepOutput(losses={"refl": compute}, logs=logs)
