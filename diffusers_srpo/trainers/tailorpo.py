"""TailorPO and TailorPO-G (Ren et al. 2025), and the trajectory-level DPO baseline they argue against (SPEC section 4).

One update, for each prompt of the batch:

1. Sample a trajectory with the flow SDE (``diffusers_srpo.flow_sde``) along the rollout schedule, no gradient.
   At every ranked step, from the SAME state ``x_t`` draw two next states, score each by its step-wise reward
   (the reward of its one-step clean estimate ``x - sigma * v(x)``, decoded), and keep the preferred one as the
   next state. TailorPO-G first moves the preferred state up its reward gradient.
2. For each trained step, the DPO loss of the pair against the reference policy (the base model: the LoRA
   disabled, or a frozen copy for a full fine-tune). Both states share ``x_t``, so one transformer forward with
   gradient gives the policy's mean for both. Pairs whose rewards (nearly) tie carry no preference: their loss
   has weight 0 (the forward still runs, so that every process back-propagates through the same modules).

``trajectory-dpo`` samples two whole trajectories from the same noise instead, ranks them by their FINAL images,
and labels every step pair ``(x_t^w -> x_{t-1}^w)`` vs ``(x_t^l -> x_{t-1}^l)`` with that ranking (D3PO).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..flow_sde import dpo_log_ratio
from .base import StepOutput
from .config import TailorPOConfig
from .sde_policy import SDEPolicyTrainer

# Independent random streams of one update (see BaseTrainer.generator).
_SDE_STREAM, _TRAINED_STEPS_STREAM = 4, 5


@dataclass
class PreferencePair:
    """One trained step: the preferred and the other next state, from ``state``, per sample of the batch.

    TailorPO: both next states leave the same ``state`` ``[B, ...]``; ``next_state`` is ``[preferred; other]``
    ``[2B, ...]``. Trajectory-level DPO: ``state`` and ``next_state`` hold both trajectories ``[2B, ...]`` (the first
    trajectory first) and ``first_preferred`` ``[B]`` says which one won. Latents are float32.
    """

    state: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    next_state: torch.Tensor
    reference_mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [B]: 0 for ties
    first_preferred: torch.Tensor | None = None


class TailorPOTrainer(SDEPolicyTrainer):
    """Step-wise preference optimisation of a flow pipeline; ``train()`` writes a LoRA for ``load_lora_weights``.

    ``reward`` is any reward ``reward(images, prompts) -> Tensor[B]`` (written with ``reward_template``). TailorPO
    and trajectory-level DPO only rank samples, so the reward need not be differentiable; TailorPO-G needs its
    gradient. The sampler state is kept in float32 whatever the weights' dtype (a bf16 state would round the
    guidance step and the late steps' noise away); the transformer sees it in its own dtype.
    """

    config_class = TailorPOConfig
    config_file_name = "tailorpo_config.json"

    @property
    def needs_differentiable_reward(self) -> bool:
        return self.config.method == "tailorpo-g"

    def setup_method(self) -> None:
        self.reference_model = None if self.config.use_lora else self.frozen_reference()

    def model_card_details(self) -> dict[str, str]:
        config = self.config
        ranked = config.ranked_steps()
        details = {
            "reward": type(self.reward).__name__,
            "reward template": config.reward_template,
            "DPO beta": str(config.beta),
            "SDE noise level": str(config.noise_level),
            "ranked steps": f"{ranked[0]}-{ranked[-1]} of {config.rollout_steps}",
            "ranking": "final images (trajectory-level)" if config.method == "trajectory-dpo" else "step-wise reward",
        }
        if config.method == "tailorpo-g":
            details["guidance"] = f"eta {config.guidance_eta}, gradient through {config.guidance_gradient}"
        return details

    # ----------------------------------------------------------------------------------- the two policies
    # ----------------------------------------------------------------------------------- step-wise reward
    @torch.no_grad()
    def stepwise_reward(self, latents, sigma, text, prompts) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reward of the one-step clean estimate ``x - sigma * v(x)`` of ``latents`` at ``sigma``, and ``v``
        (``None`` at sigma 0, where the latents are their own estimate)."""
        if float(sigma) == 0:
            return self.decode_and_score(latents.float(), prompts), None
        velocity = self.model_velocity(self.model, latents, sigma, text)
        return self.decode_and_score(self.scheduler.one_step_x0(velocity, latents.float(), sigma), prompts), velocity

    def guide(self, latents, sigma, text, prompts, velocity: torch.Tensor | None = None) -> torch.Tensor:
        """TailorPO-G: ``x + eta * grad_x r(x0_hat(x))``, float32.

        ``guidance_gradient="model"`` differentiates through the model's velocity at ``x`` (the step-wise reward's
        exact gradient, one transformer backward); ``"fixed"`` holds ``velocity`` (the one the ranking used) fixed,
        so ``dx0_hat/dx`` is the identity and only the VAE and the reward are differentiated.
        """
        config = self.config
        with torch.enable_grad():
            x = latents.detach().float().requires_grad_(True)
            if float(sigma) == 0:
                x0_estimate = x
            elif config.guidance_gradient == "model":
                # The unwrapped module: a gradient to the input only must not trigger a wrapper's gradient sync.
                x0_estimate = self.scheduler.one_step_x0(self.model_velocity(self.accelerator.unwrap_model(self.model), x, sigma, text), x, sigma)
            elif velocity is None:
                raise ValueError("guidance_gradient='fixed' needs the velocity at the state being guided")
            else:
                x0_estimate = self.scheduler.one_step_x0(velocity.detach().float(), x, sigma)
            scores = self.decode_and_score(x0_estimate, prompts)
            (gradient,) = torch.autograd.grad(scores.sum(), x)
        return (x + config.guidance_eta * gradient).detach()

    # ----------------------------------------------------------------------------------- sampling
    def _reference_mean(self, latents, sigma, sigma_next, text) -> torch.Tensor:
        with self.reference_policy() as reference:
            return self.transition(latents, self.model_velocity(reference, latents, sigma, text), sigma, sigma_next).mean

    @torch.no_grad()
    def _sample_stepwise_pairs(self, noise, text, prompts, generator, trained_steps, logs) -> tuple[list[PreferencePair], torch.Tensor]:
        """A TailorPO trajectory from ``noise``: the pairs of the ``trained_steps`` and the final latents."""
        config, sigmas = self.config, self.rollout_sigmas
        ranked = set(config.ranked_steps())
        doubled_text = type(text).cat([text, text])
        batch = len(prompts)
        latents, velocity = noise.float(), None
        pairs, gaps, ties = [], [], 0
        for index in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[index], sigmas[index + 1]
            if velocity is None:
                velocity = self.model_velocity(self.model, latents, sigma, text)
            if index not in ranked:
                latents, velocity = latents + (sigma_next - sigma) * velocity, None
                continue
            transition = self.transition(latents, velocity, sigma, sigma_next)
            candidates = torch.cat([transition.sample(generator), transition.sample(generator)])
            rewards, candidate_velocity = self.stepwise_reward(candidates, sigma_next, doubled_text, prompts * 2)
            first, second = rewards.chunk(2)
            first_wins = _expand(first >= second, candidates[:batch])
            winner = torch.where(first_wins, candidates[:batch], candidates[batch:])
            loser = torch.where(first_wins, candidates[batch:], candidates[:batch])
            next_velocity = None
            if candidate_velocity is not None:
                velocity_first, velocity_second = candidate_velocity.chunk(2)
                next_velocity = torch.where(first_wins, velocity_first, velocity_second)
            gap = (first - second).abs()
            weight = (gap > config.tie_threshold).float()
            ties += int((weight == 0).sum())
            gaps.append(gap)
            if config.method == "tailorpo-g":
                winner, next_velocity = self.guide(winner, sigma_next, text, prompts, next_velocity), None
            if index in trained_steps:
                pairs.append(
                    PreferencePair(
                        state=latents,
                        sigma=sigma,
                        sigma_next=sigma_next,
                        next_state=torch.cat([winner, loser]),
                        reference_mean=self._reference_mean(latents, sigma, sigma_next, text),
                        std=transition.std,
                        weight=weight,
                    )
                )
            latents, velocity = winner, next_velocity
        logs["stepwise_reward_gap"] = torch.cat(gaps).mean().item()
        logs["tie_fraction"] = ties / (len(gaps) * batch)
        return pairs, latents

    @torch.no_grad()
    def _sample_trajectory_pairs(self, noise, text, prompts, generator, trained_steps, logs) -> tuple[list[PreferencePair], torch.Tensor]:
        """Two SDE trajectories from the same ``noise`` (as D3PO), ranked by their final images: the pairs of the
        ``trained_steps`` and the final rewards ``[2B]`` (first trajectory first)."""
        config, sigmas = self.config, self.rollout_sigmas
        ranked = set(config.ranked_steps())
        doubled_text = type(text).cat([text, text])
        latents = torch.cat([noise, noise]).float()
        steps = []
        for index in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[index], sigmas[index + 1]
            velocity = self.model_velocity(self.model, latents, sigma, doubled_text)
            if index not in ranked:
                latents = latents + (sigma_next - sigma) * velocity
                continue
            transition = self.transition(latents, velocity, sigma, sigma_next)
            next_latents = transition.sample(generator)
            if index in trained_steps:
                reference_mean = self._reference_mean(latents, sigma, sigma_next, doubled_text)
                steps.append((latents, sigma, sigma_next, next_latents, reference_mean, transition.std))
            latents = next_latents
        final_rewards = self.decode_and_score(latents, prompts * 2)
        first, second = final_rewards.chunk(2)
        gap = (first - second).abs()
        weight = (gap > config.tie_threshold).float()
        logs["final_reward_gap"] = gap.mean().item()
        logs["tie_fraction"] = (weight == 0).float().mean().item()
        pairs = [
            PreferencePair(state, sigma, sigma_next, next_state, reference_mean, std, weight, first_preferred=first >= second)
            for state, sigma, sigma_next, next_state, reference_mean, std in steps
        ]
        return pairs, final_rewards

    # ----------------------------------------------------------------------------------- one update
    def dpo_loss(self, pair: PreferencePair, text, stats: dict[str, list[float]]) -> torch.Tensor:
        """The DPO loss of one trained step, with gradient through one transformer forward."""
        config = self.config
        trajectory_level = pair.first_preferred is not None
        inputs_text = type(text).cat([text, text]) if trajectory_level else text
        velocity = self.model_velocity(self.model, pair.state, pair.sigma, inputs_text)
        policy_mean = self.transition(pair.state, velocity, pair.sigma, pair.sigma_next).mean
        if trajectory_level:
            # Each trajectory's next state under the Gaussian of its own state.
            log_ratio = dpo_log_ratio(pair.next_state, policy_mean, pair.reference_mean, pair.std, config.log_prob_reduction)
            first, second = log_ratio.chunk(2)
            preferred = torch.where(pair.first_preferred, first, second)
            other = torch.where(pair.first_preferred, second, first)
        else:
            # Both next states leave the same state: one policy mean and one reference mean serve both.
            log_ratio = dpo_log_ratio(
                pair.next_state,
                torch.cat([policy_mean, policy_mean]),
                torch.cat([pair.reference_mean, pair.reference_mean]),
                torch.cat([pair.std, pair.std]),
                config.log_prob_reduction,
            )
            preferred, other = log_ratio.chunk(2)
        margin = config.beta * (preferred - other)
        losses = -F.logsigmoid(margin)
        # A tie, or a margin of exactly 0 (policy = reference), carries no preference: it counts as chance.
        correct = torch.where((pair.weight > 0) & (margin != 0), (margin > 0).float(), torch.full_like(margin, 0.5))
        stats["implicit_accuracy"].extend(correct.tolist())
        stats["log_ratio_preferred"].extend(preferred.detach().tolist())
        stats["log_ratio_other"].extend(other.detach().tolist())
        return (losses * pair.weight).sum() / len(losses)

    def training_step(self, step: int, micro_step: int = 0) -> StepOutput:
        config = self.config
        prompts, text = self.step_prompts(step, micro_step)
        noise = self.step_noise(step, len(prompts), torch.float32, micro_step)
        # Which ranked steps enter the loss is drawn first, so that only those pay for a reference forward.
        ranked = config.ranked_steps()
        trained_count = max(1, round(config.trained_step_fraction * len(ranked)))
        order = torch.randperm(len(ranked), generator=self.generator(step, _TRAINED_STEPS_STREAM, per_process=True, micro_step=micro_step))
        trained_steps = {ranked[int(i)] for i in order[:trained_count]}
        sde_generator = self.generator(step, _SDE_STREAM, per_process=True, micro_step=micro_step)
        logs: dict[str, float] = {"trained_steps": float(trained_count)}
        if config.method == "trajectory-dpo":
            pairs, final_rewards = self._sample_trajectory_pairs(noise, text, prompts, sde_generator, trained_steps, logs)
        else:
            pairs, final_latents = self._sample_stepwise_pairs(noise, text, prompts, sde_generator, trained_steps, logs)
            with torch.no_grad():
                final_rewards = self.decode_and_score(final_latents, prompts)
        logs["reward"] = final_rewards.mean().item()

        stats: dict[str, list[float]] = {"implicit_accuracy": [], "log_ratio_preferred": [], "log_ratio_other": []}

        def loss_of(pair: PreferencePair) -> Callable[[], torch.Tensor]:
            def compute() -> torch.Tensor:
                loss = self.dpo_loss(pair, text, stats)
                if pair is pairs[-1]:
                    logs.update({key: sum(values) / len(values) for key, values in stats.items()})
                return loss

            return compute

        # Named by position: which rollout steps are trained differs between processes, their number does not.
        return StepOutput(losses={f"pair {i + 1}": loss_of(pair) for i, pair in enumerate(pairs)}, logs=logs)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))
