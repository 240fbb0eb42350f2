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

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..flow_sde import dpo_log_ratio, flow_sde_transition
from ..models import PromptEmbeds
from .base import BaseTrainer, StepOutput
from .config import TailorPOConfig

# Independent random streams of one update (see BaseTrainer.generator).
_NOISE_STREAM, _SDE_STREAM, _TRAINED_STEPS_STREAM = 1, 4, 5


@dataclass
class PreferencePair:
    """One ranked step: the preferred and the other next state, from ``state`` (per sample of the batch).

    For TailorPO both next states leave the same ``state`` ``[B, ...]``; for trajectory-level DPO ``state`` holds
    both trajectories' states ``[2B, ...]`` (first trajectory first) and ``next_state`` their next states.
    """

    state: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    next_state: torch.Tensor  # TailorPO: [preferred; other] stacked as [2B, ...]; trajectory DPO: [2B, ...]
    reference_mean: torch.Tensor
    std: torch.Tensor
    first_preferred: torch.Tensor  # trajectory DPO: [B] bool, whether trajectory 0 won; TailorPO: all True
    weight: torch.Tensor  # [B]: 0 for ties


class TailorPOTrainer(BaseTrainer):
    """Step-wise preference optimisation of a FLUX pipeline; ``train()`` writes a LoRA for ``load_lora_weights``.

    ``reward`` is any reward ``reward(images, prompts) -> Tensor[B]`` (written with ``reward_template``). TailorPO
    and trajectory-level DPO only rank samples, so the reward need not be differentiable; TailorPO-G needs its
    gradient.
    """

    config_class = TailorPOConfig
    config_file_name = "tailorpo_config.json"

    @property
    def needs_differentiable_reward(self) -> bool:
        return self.config.method == "tailorpo-g"

    def setup_method(self) -> None:
        self.reference_model = None
        if not self.config.use_lora:
            # A frozen copy in the trained weights' dtype, so that policy and reference agree exactly at the start.
            self.reference_model = copy.deepcopy(self.accelerator.unwrap_model(self.model)).requires_grad_(False).eval()

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
    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[torch.nn.Module]:
        """The reference model: the base (LoRA disabled) or the frozen copy of a full fine-tune."""
        if self.reference_model is not None:
            yield self.reference_model
            return
        transformer = self.accelerator.unwrap_model(self.model)
        transformer.disable_adapters()
        try:
            yield transformer
        finally:
            transformer.enable_adapters()

    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, sigma, text) -> torch.Tensor:
        """The sampler's velocity (``rollout_guidance``) of ``model``, under the run's autocast."""
        size = self.config.resolution
        with self.accelerator.autocast():
            return self.adapter.predict_velocity(model, latents, sigma, text, self.config.rollout_guidance, size, size)

    def transition(self, latents, velocity, sigma, sigma_next):
        return flow_sde_transition(
            latents, velocity, sigma, sigma_next, self.config.noise_level, sigma_at_one=float(self.rollout_sigmas[1])
        )

    # ----------------------------------------------------------------------------------- step-wise reward
    @torch.no_grad()
    def stepwise_reward(self, latents, sigma, text, prompts) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reward of the one-step clean estimate ``x - sigma * v(x)`` of ``latents`` at ``sigma``, and ``v``
        (``None`` at sigma 0, where the latents are their own estimate)."""
        if float(sigma) == 0:
            return self.decode_and_score(latents.float(), prompts), None
        velocity = self.velocity(self.model, latents, sigma, text)
        x0_estimate = self.scheduler.one_step_x0(velocity.float(), latents.float(), sigma)
        return self.decode_and_score(x0_estimate, prompts), velocity

    def guide(self, latents, sigma, text, prompts, velocity: torch.Tensor | None = None) -> torch.Tensor:
        """TailorPO-G: ``x + eta * grad_x r(x0_hat(x))``.

        ``guidance_gradient="model"`` differentiates through the model's velocity at ``x`` (the step-wise reward's
        exact gradient); ``"fixed"`` holds ``velocity`` (the one ranking used) fixed, so ``dx0_hat/dx`` is the
        identity and no transformer backward is needed.
        """
        config = self.config
        with torch.enable_grad():
            x = latents.detach().float().requires_grad_(True)
            if float(sigma) == 0:
                x0_estimate = x
            else:
                if config.guidance_gradient == "model" or velocity is None:
                    # The unwrapped module: a gradient to the input only must not trigger a wrapper's gradient sync.
                    model = self.accelerator.unwrap_model(self.model)
                    velocity = self.velocity(model, x.to(latents.dtype), sigma, text)
                x0_estimate = x - float(sigma) * velocity.float()
            scores = self.decode_and_score(x0_estimate, prompts)
            (gradient,) = torch.autograd.grad(scores.sum(), x)
        return (x + config.guidance_eta * gradient).to(latents.dtype).detach()

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def _sample_stepwise_pairs(self, noise, text, prompts, generator, logs) -> tuple[list[PreferencePair], torch.Tensor]:
        config, sigmas = self.config, self.rollout_sigmas
        ranked = set(config.ranked_steps())
        doubled_text = PromptEmbeds.cat([text, text])
        latents, velocity = noise, None
        pairs, gaps, ties = [], [], 0
        for index in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[index], sigmas[index + 1]
            if velocity is None:
                velocity = self.velocity(self.model, latents, sigma, text)
            if index not in ranked:
                latents, velocity = latents + (sigma_next - sigma) * velocity, None
                continue
            transition = self.transition(latents, velocity, sigma, sigma_next)
            candidates = torch.cat([transition.sample(generator), transition.sample(generator)]).to(latents.dtype)
            rewards, candidate_velocity = self.stepwise_reward(candidates, sigma_next, doubled_text, prompts * 2)
            first, second = rewards.chunk(2)
            first_wins = first >= second
            batch = len(prompts)
            winner = torch.where(_expand(first_wins, candidates[:batch]), candidates[:batch], candidates[batch:])
            loser = torch.where(_expand(first_wins, candidates[:batch]), candidates[batch:], candidates[:batch])
            next_velocity = None
            if candidate_velocity is not None:
                v_first, v_second = candidate_velocity.chunk(2)
                next_velocity = torch.where(_expand(first_wins, v_first), v_first, v_second)
            gap = (first - second).abs()
            weight = (gap > config.tie_threshold).float()
            ties += int((weight == 0).sum())
            gaps.append(gap)
            if config.method == "tailorpo-g":
                winner = self.guide(winner, sigma_next, text, prompts, next_velocity)
                next_velocity = None
            with self.reference_policy() as reference:
                reference_mean = self.transition(latents, self.velocity(reference, latents, sigma, text), sigma, sigma_next).mean
            pairs.append(
                PreferencePair(
                    state=latents,
                    sigma=sigma,
                    sigma_next=sigma_next,
                    next_state=torch.cat([winner, loser]),
                    reference_mean=reference_mean,
                    std=transition.std,
                    first_preferred=torch.ones(batch, dtype=torch.bool, device=latents.device),
                    weight=weight,
                )
            )
            latents, velocity = winner, next_velocity
        logs["stepwise_reward_gap"] = torch.cat(gaps).mean().item()
        logs["ties"] = float(ties)
        return pairs, latents

    @torch.no_grad()
    def _sample_trajectory_pairs(self, noise, text, prompts, generator, logs) -> tuple[list[PreferencePair], torch.Tensor]:
        config, sigmas = self.config, self.rollout_sigmas
        ranked = set(config.ranked_steps())
        doubled_text = PromptEmbeds.cat([text, text])
        latents = torch.cat([noise, noise])  # two trajectories from the same noise, as D3PO
        steps = []
        for index in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[index], sigmas[index + 1]
            velocity = self.velocity(self.model, latents, sigma, doubled_text)
            if index not in ranked:
                latents = latents + (sigma_next - sigma) * velocity
                continue
            transition = self.transition(latents, velocity, sigma, sigma_next)
            next_latents = transition.sample(generator).to(latents.dtype)
            with self.reference_policy() as reference:
                reference_velocity = self.velocity(reference, latents, sigma, doubled_text)
            reference_mean = self.transition(latents, reference_velocity, sigma, sigma_next).mean
            steps.append((latents, sigma, sigma_next, next_latents, reference_mean, transition.std))
            latents = next_latents
        final = self.decode_and_score(latents.float(), prompts * 2)
        first, second = final.chunk(2)
        gap = (first - second).abs()
        weight = (gap > config.tie_threshold).float()
        logs["final_reward_gap"] = gap.mean().item()
        logs["ties"] = float((weight == 0).sum())
        pairs = [
            PreferencePair(state, sigma, sigma_next, next_state, reference_mean, std, first >= second, weight)
            for state, sigma, sigma_next, next_state, reference_mean, std in steps
        ]
        return pairs, latents

    # ----------------------------------------------------------------------------------- one update
    def dpo_loss(self, pair: PreferencePair, text, logs: dict[str, list[float]]) -> torch.Tensor:
        """The DPO loss of one ranked step, with gradient through one transformer forward."""
        config = self.config
        trajectory_level = config.method == "trajectory-dpo"
        inputs_text = PromptEmbeds.cat([text, text]) if trajectory_level else text
        velocity = self.velocity(self.model, pair.state, pair.sigma, inputs_text)
        policy_mean = self.transition(pair.state, velocity, pair.sigma, pair.sigma_next).mean
        if trajectory_level:
            # Each trajectory's next state under its own state's Gaussian.
            log_ratio = dpo_log_ratio(pair.next_state, policy_mean, pair.reference_mean, pair.std, config.log_prob_reduction)
            first, second = log_ratio.chunk(2)
            preferred = torch.where(pair.first_preferred, first, second)
            other = torch.where(pair.first_preferred, second, first)
        else:
            # Both next states leave the same state: one policy mean and one reference mean serve both.
            doubled = lambda t: torch.cat([t, t])  # noqa: E731
            log_ratio = dpo_log_ratio(
                pair.next_state, doubled(policy_mean), doubled(pair.reference_mean), doubled(pair.std), config.log_prob_reduction
            )
            preferred, other = log_ratio.chunk(2)
        margin = config.beta * (preferred - other)
        losses = -F.logsigmoid(margin)
        valid = pair.weight > 0
        logs["implicit_accuracy"].extend((margin[valid] > 0).float().tolist())
        logs["log_ratio_preferred"].extend(preferred[valid].tolist())
        logs["log_ratio_other"].extend(other[valid].tolist())
        return (losses * pair.weight).sum() / len(losses)

    def training_step(self, step: int) -> StepOutput:
        config, accelerator = self.config, self.accelerator
        size = config.resolution
        prompts = [self.prompts[i] for i in self.indices_for_step(step)]
        text = self.text_for(prompts)
        noise = self.adapter.make_noise(
            len(prompts), size, size, self.generator(step, _NOISE_STREAM, per_process=False), accelerator.device, self.weight_dtype
        )
        sde_generator = self.generator(step, _SDE_STREAM, per_process=True)
        logs: dict[str, float] = {}
        if config.method == "trajectory-dpo":
            pairs, final_latents = self._sample_trajectory_pairs(noise, text, prompts, sde_generator, logs)
            final_prompts = prompts * 2
        else:
            pairs, final_latents = self._sample_stepwise_pairs(noise, text, prompts, sde_generator, logs)
            final_prompts = prompts
        with torch.no_grad():
            logs["reward"] = self.decode_and_score(final_latents.float(), final_prompts).mean().item()

        trained_count = max(1, round(config.trained_step_fraction * len(pairs)))
        order = torch.randperm(len(pairs), generator=self.generator(step, _TRAINED_STEPS_STREAM, per_process=True))
        trained = [pairs[int(i)] for i in order[:trained_count].sort().values]
        per_pair: dict[str, list[float]] = {"implicit_accuracy": [], "log_ratio_preferred": [], "log_ratio_other": []}

        def loss_of(pair: PreferencePair) -> Callable[[], torch.Tensor]:
            def compute() -> torch.Tensor:
                loss = self.dpo_loss(pair, text, per_pair)
                if pair is trained[-1]:
                    # Every process logs the same keys: NaN-free defaults when every trained pair tied.
                    for key, values in per_pair.items():
                        logs[key] = sum(values) / len(values) if values else 0.0
                return loss

            return compute

        logs["trained_steps"] = float(trained_count)
        return StepOutput(losses=[loss_of(pair) for pair in trained], logs=logs)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))
