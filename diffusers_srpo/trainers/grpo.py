"""GRPO on flow models: Flow-GRPO (Liu et al. 2025) with DanceGRPO's shared group noise as an option (SPEC section 5).

One update (``gradient_accumulation_steps`` micro-batches, one optimizer step):

1. Sampling, no gradient: every prompt of the micro-batch is sampled ``group_size`` times with the flow SDE of
   ``diffusers_srpo.flow_sde`` along the rollout schedule, from its own starting noise (or, with
   ``shared_group_noise``, one noise per group, as DanceGRPO). At the trained steps the state ``x_t``, the next state
   ``x_{t-1}``, the sampling policy's mean ``mu_old`` (its log-density, log pi_old, is that of ``x_{t-1}`` under
   ``N(mu_old, std^2)``) and, with ``beta > 0``, the reference policy's mean are kept. The final images are scored.
2. Advantages: ``A = (r - mean of the group) / (std + 1e-4)`` with the std of the group, or (``advantage_std="global"``)
   of every reward of the update, gathered from all processes and micro-batches (Flow-GRPO's ``global_std``), then
   clipped to ``[-adv_clip_max, adv_clip_max]``.
3. Losses, one per trained step (and per ``trajectories_per_forward`` chunk): one transformer forward with gradient at
   ``x_t`` gives the policy's mean ``mu_theta``; ``log rho = log pi_theta(x_{t-1}) - log pi_old(x_{t-1})`` per latent
   element (Flow-GRPO's mean over the latent), and

       L = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)) + beta * KL(pi_theta || pi_ref)

   with the KL of the step's two Gaussians (same std) per element. The loss of every micro-batch accumulates into the
   update's one optimizer step.

log rho is computed as ``(mu_theta - mu_old) (2 x - mu_theta - mu_old) / (2 std^2)`` (``flow_sde.dpo_log_ratio``),
which equals the difference of the two log-densities without its large terms that cancel, so it is exactly 0 when
the policy's mean is the sampling mean. Sampling and training run the same forwards (the same chunks of the same
states), so at the first and only inner step the ratio is exactly 1 (up to non-deterministic kernels) and the loss of
trajectory i is exactly ``-clip(A_i)``: the gradient is Flow-GRPO's policy gradient ``-A_i grad log pi_theta``.

What differs from Flow-GRPO's scripts (``scripts/train_sd3.py``, ``scripts/train_flux.py``):

- One inner epoch and one optimizer step per sampling round: the base trainer makes exactly one optimizer step per
  update, so the policy that sampled is always the one trained and the clip acts only on rounding. Flow-GRPO's configs
  also set ``num_inner_epochs = 1`` but make two optimizer steps per sampling round (``gradient_accumulation_steps =
  num_batches_per_epoch // 2``), whose second half is slightly off-policy. Several optimizer steps per sampling round
  would need rollouts that outlive an update (and a checkpoint of them for exact resume): not expressed here.
- A group lives on one process and one micro-batch (Flow-GRPO spreads a group's images over GPUs and groups rewards by
  the prompt's text); a group whose rewards all tie has advantages 0 and trains nothing (Flow-GRPO drops those
  samples from the batch instead); logged as ``zero_std_groups``.
- The KL is the exact one of the two Gaussians, ``(mu_theta - mu_ref)^2 / (2 std^2 |dt|)`` per element (SPEC);
  Flow-GRPO's code leaves out ``|dt|`` (``kl_form="flow-grpo"`` reproduces it).
- Classifier-free guidance (SD3, Qwen-Image) is the adapter's, with gradient through both branches (Flow-GRPO detaches
  the unconditional one); no EMA of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..flow_sde import dpo_log_ratio, same_std_kl
from .base import StepOutput
from .config import GRPO_ADVANTAGE_EPSILON, GRPOConfig
from .sde_policy import SDEPolicyTrainer

__all__ = ["GRPOTrainer", "GroupRollout", "SampledStep", "group_advantages", "grpo_policy_loss"]

# Independent random streams of one update (see BaseTrainer.generator); the base's starting noise is stream 1.
_START_NOISE_STREAM, _SDE_STREAM, _TRAINED_STEPS_STREAM = 6, 7, 8


def group_advantages(
    rewards: torch.Tensor, std: torch.Tensor | float | None = None, epsilon: float = GRPO_ADVANTAGE_EPSILON
) -> torch.Tensor:
    """GRPO's advantages of ``rewards`` ``[groups, G]``: ``(r - mean of its group) / (std + epsilon)``, in float64.

    ``std`` is the (population) std of each group when ``None``, as Flow-GRPO's per-prompt statistics; a given ``std``
    (the std of every reward of the update: Flow-GRPO's ``global_std``) is used for every group. Not clipped.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, group_size], got shape {tuple(rewards.shape)}")
    device, rewards = rewards.device, rewards.detach().cpu().double()  # float64 on the CPU, as Flow-GRPO's numpy
    mean = rewards.mean(dim=1, keepdim=True)
    if std is None:
        std = rewards.std(dim=1, unbiased=False, keepdim=True)
    std = torch.as_tensor(std).detach().cpu().double()
    return ((rewards - mean) / (std + epsilon)).to(device)


def grpo_policy_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float, adv_clip_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per sample, as Flow-GRPO writes it: ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` with
    ``A`` clipped to ``[-adv_clip_max, adv_clip_max]`` and ``rho = exp(log_ratio)``. Returns the losses and ``rho``."""
    advantages = advantages.to(log_ratio.dtype).clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


@dataclass
class SampledStep:
    """One trained step of a micro-batch's trajectories ``[N = prompts x group_size, ...]`` (float32 latents)."""

    index: int  # the step's index in the rollout schedule
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    state: torch.Tensor  # x_t
    next_state: torch.Tensor  # x_{t-1}, as sampled
    sampling_mean: torch.Tensor  # the sampling policy's mean (log pi_old is the density of next_state around it)
    std: torch.Tensor  # [N, 1, ...]: the step's std, the same for every policy
    reference_mean: torch.Tensor | None = None  # the reference policy's mean, when beta > 0


@dataclass
class GroupRollout:
    """A micro-batch's groups: trajectory ``b * group_size + g`` is member ``g`` of prompt ``b``'s group."""

    prompts: list[str]
    chunks: list[slice]  # the trajectories of each transformer forward
    texts: list  # the TextConditioning of each chunk
    steps: list[SampledStep]
    final_latents: torch.Tensor
    rewards: torch.Tensor  # [N] float32
    advantages: torch.Tensor | None = None  # [N] float32, not clipped
    stats: dict[str, list[float]] = field(default_factory=dict)


class GRPOTrainer(SDEPolicyTrainer):
    """Flow-GRPO on a flow pipeline; ``train()`` writes a LoRA for ``load_lora_weights`` (or the full transformer).

    ``reward`` is any reward ``reward(images, prompts) -> Tensor[B]`` (written with ``reward_template``); it is only
    evaluated, never differentiated. The sampler state is float32 whatever the weights' dtype; the transformer sees it
    in its own dtype.
    """

    config_class = GRPOConfig
    config_file_name = "grpo_config.json"
    needs_differentiable_reward = False

    def setup_method(self) -> None:
        self.reference_model = None
        self._pending: tuple[int, list[GroupRollout | None]] | None = None
        if not self.config.use_lora and self.config.beta > 0:  # without KL, no reference is needed
            self.reference_model = self.frozen_reference()

    def model_card_details(self) -> dict[str, str]:
        config = self.config
        details = {
            "reward": type(self.reward).__name__,
            "reward template": config.reward_template,
            "group size": str(config.group_size)
            + (" (one starting noise per group)" if config.shared_group_noise else ""),
            "SDE noise level": str(config.noise_level),
            "trained steps": f"{config.trained_step_count} of {config.rollout_steps} ({config.timestep_selection})",
            "advantages": f"normalised by the {config.advantage_std} std, clipped at {config.adv_clip_max}",
            "PPO clip range": str(config.clip_range),
        }
        details["KL"] = f"beta {config.beta} ({config.kl_form})" if config.beta > 0 else "none"
        return details

    # ----------------------------------------------------------------------------------- the policies
    # ----------------------------------------------------------------------------------- random draws
    def _trajectory_generators(self, step: int, stream: int, micro_step: int, share_prompts: bool, share_members: bool):
        """One CPU generator per trajectory of the micro-batch, keyed by its prompt's position in the update and its
        member index (or not, where shared), so that how samples split over processes and micro-batches changes
        nothing."""
        config = self.config
        return [
            self.stream_generator(step, stream, -1 if share_prompts else position, 0 if share_members else member)
            for position in self.sample_positions(micro_step)
            for member in range(config.group_size)
        ]

    def trajectory_noise(self, step: int, micro_step: int = 0) -> torch.Tensor:
        """The starting noise of the micro-batch's trajectories ``[N, ...]``, float32 (see ``shared_noise`` and
        ``shared_group_noise``)."""
        config, size = self.config, self.config.resolution
        generators = self._trajectory_generators(
            step,
            _START_NOISE_STREAM,
            micro_step,
            share_prompts=config.shared_noise,
            share_members=config.shared_group_noise,
        )
        return torch.cat(
            [self.adapter.make_noise(1, size, size, g, self.accelerator.device, torch.float32) for g in generators]
        )

    def trained_steps(self, step: int) -> list[int]:
        """The rollout steps whose loss enters update ``step`` (the same on every process and micro-batch)."""
        config = self.config
        count = config.trained_step_count
        if config.timestep_selection == "first":
            return list(range(count))
        order = torch.randperm(
            config.rollout_steps, generator=self.generator(step, _TRAINED_STEPS_STREAM, per_process=False)
        )
        return sorted(int(i) for i in order[:count])

    # ----------------------------------------------------------------------------------- sampling
    def _chunks(self, count: int) -> list[slice]:
        size = self.config.trajectories_per_forward or count
        return [slice(start, min(start + size, count)) for start in range(0, count, size)]

    @torch.no_grad()
    def sample_groups(self, step: int, micro_step: int = 0) -> GroupRollout:
        """Sample the micro-batch's groups with the flow SDE and score their final images (see the module docstring)."""
        config, sigmas = self.config, self.rollout_sigmas
        prompts, text = self.step_prompts(step, micro_step)
        group = config.group_size
        members = [b for b in range(len(prompts)) for _ in range(group)]  # trajectory -> its prompt
        chunks = self._chunks(len(members))
        texts = [type(text).cat([text.select(members[i]) for i in range(c.start, c.stop)]) for c in chunks]
        sde_generators = self._trajectory_generators(
            step, _SDE_STREAM, micro_step, share_prompts=False, share_members=False
        )
        trained = set(self.trained_steps(step))
        latents = self.trajectory_noise(step, micro_step)
        steps = []
        for index in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[index], sigmas[index + 1]
            velocity = torch.cat(
                [self.model_velocity(self.model, latents[c], sigma, t) for c, t in zip(chunks, texts, strict=True)]
            )
            transition = self.transition(latents, velocity, sigma, sigma_next)
            z = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in sde_generators]).to(
                latents.device
            )
            next_latents = transition.mean + transition.std * z
            if index in trained:
                reference_mean = None
                if config.beta > 0:
                    with self.reference_policy() as reference:
                        reference_velocity = torch.cat(
                            [self.model_velocity(reference, latents[c], sigma, t) for c, t in zip(chunks, texts, strict=True)]
                        )
                    reference_mean = self.transition(latents, reference_velocity, sigma, sigma_next).mean
                steps.append(
                    SampledStep(
                        index, sigma, sigma_next, latents, next_latents, transition.mean, transition.std, reference_mean
                    )
                )
            latents = next_latents
        member_prompts = [prompts[b] for b in members]
        rewards = []
        for chunk in chunks:
            scores = self.decode_and_score(latents[chunk], member_prompts[chunk])
            if not isinstance(scores, torch.Tensor) or scores.shape != (chunk.stop - chunk.start,):
                raise ValueError(
                    f"the reward must return a tensor of shape [batch], got {getattr(scores, 'shape', type(scores))}"
                )
            rewards.append(scores.detach().float())
        rewards = torch.cat(rewards)
        return GroupRollout(
            prompts=prompts, chunks=chunks, texts=texts, steps=steps, final_latents=latents, rewards=rewards
        )

    def _rollouts_with_advantages(self, step: int, micro_step: int) -> GroupRollout:
        """The micro-batch's rollout with its advantages. With the global std every micro-batch of the update is
        sampled at the first micro-step (its std is over all of them, on every process); the group std needs none."""
        config, group = self.config, self.config.group_size
        if config.advantage_std == "group":
            rollout = self.sample_groups(step, micro_step)
            rollout.advantages = group_advantages(rollout.rewards.view(-1, group)).flatten().float()
            return rollout
        if micro_step == 0:
            rollouts = [self.sample_groups(step, m) for m in range(config.gradient_accumulation_steps)]
            everything = self.accelerator.gather(torch.cat([r.rewards for r in rollouts]).contiguous())
            std = everything.detach().cpu().double().std(unbiased=False)
            for rollout in rollouts:
                rollout.advantages = group_advantages(rollout.rewards.view(-1, group), std).flatten().float()
            self._pending = (step, list(rollouts))
        pending_step, rollouts = self._pending if self._pending is not None else (None, [])
        if pending_step != step or rollouts[micro_step] is None:
            raise RuntimeError(
                f"micro-step {micro_step} of update {step} has no rollout: micro-steps must run in order from 0"
            )
        rollout, rollouts[micro_step] = rollouts[micro_step], None  # freed once trained
        if micro_step == len(rollouts) - 1:
            self._pending = None
        return rollout

    # ----------------------------------------------------------------------------------- one update
    def step_loss(self, rollout: GroupRollout, position: int, chunk: int) -> torch.Tensor:
        """The GRPO loss of trained step ``position`` for the trajectories of ``chunk``, with gradient through one
        transformer forward, scaled so that the losses of all chunks add up to the mean over the trajectories."""
        config = self.config
        sampled, trajectories = rollout.steps[position], rollout.chunks[chunk]
        state = sampled.state[trajectories]
        velocity = self.model_velocity(self.model, state, sampled.sigma, rollout.texts[chunk])
        policy_mean = self.transition(state, velocity, sampled.sigma, sampled.sigma_next).mean
        std = sampled.std[trajectories]
        # log pi_theta(x_{t-1}) - log pi_old(x_{t-1}), per latent element, without the terms that cancel.
        log_ratio = dpo_log_ratio(
            sampled.next_state[trajectories], policy_mean, sampled.sampling_mean[trajectories], std, "mean"
        )
        losses, ratio = grpo_policy_loss(
            log_ratio, rollout.advantages[trajectories], config.clip_range, config.adv_clip_max
        )
        stats = rollout.stats
        stats.setdefault("clip_fraction", []).extend(((ratio.detach() - 1).abs() > config.clip_range).float().tolist())
        stats.setdefault("ratio_max_deviation", []).append((ratio.detach() - 1).abs().max().item())
        stats.setdefault("policy_loss", []).extend(losses.detach().tolist())
        if config.beta > 0:
            kl = same_std_kl(policy_mean, sampled.reference_mean[trajectories], std, "mean")
            if config.kl_form == "flow-grpo":
                kl = kl * (sampled.sigma - sampled.sigma_next).to(kl.dtype)
            stats.setdefault("kl", []).extend(kl.detach().tolist())
            losses = losses + config.beta * kl
        return losses.sum() * len(rollout.chunks) / len(rollout.rewards)

    def training_step(self, step: int, micro_step: int = 0) -> StepOutput:
        config, group = self.config, self.config.group_size
        rollout = self._rollouts_with_advantages(step, micro_step)
        grouped = rollout.rewards.view(-1, group)
        logs: dict[str, float] = {
            "reward": rollout.rewards.mean().item(),
            "reward_group_std": grouped.std(dim=1, unbiased=False).mean().item(),
            "zero_std_groups": (grouped.std(dim=1, unbiased=False) == 0).float().mean().item(),
            "advantage_abs": rollout.advantages.clamp(-config.adv_clip_max, config.adv_clip_max).abs().mean().item(),
            "trained_steps": float(len(rollout.steps)),
        }
        last = (len(rollout.steps) - 1, len(rollout.chunks) - 1)

        def loss_of(position: int, chunk: int) -> Callable[[], torch.Tensor]:
            def compute() -> torch.Tensor:
                loss = self.step_loss(rollout, position, chunk)
                if (position, chunk) == last:
                    logs.update(
                        {
                            key: max(v) if key == "ratio_max_deviation" else sum(v) / len(v)
                            for key, v in rollout.stats.items()
                        }
                    )
                return loss

            return compute

        # Named by position: which rollout steps are trained may differ between updates, their number does not, and
        # every process has the same chunks.
        losses = {}
        for position in range(len(rollout.steps)):
            for chunk in range(len(rollout.chunks)):
                name = f"step {position + 1}" if len(rollout.chunks) == 1 else f"step {position + 1} part {chunk + 1}"
                losses[name] = loss_of(position, chunk)
        return StepOutput(losses=losses, logs=logs)
