"""GRPO on flow models (SPEC section 5): Flow-GRPO's advantages, clipped ratio loss and KL on the tiny world."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffusers_srpo import GRPOConfig, GRPOTrainer
from diffusers_srpo.flow_sde import dpo_log_ratio, same_std_kl
from diffusers_srpo.rewards import CallableReward
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers import trainer_class_for
from diffusers_srpo.trainers.grpo import group_advantages, grpo_policy_loss

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
SIZE = 32
ROLLOUT_STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    yield


def make_trainer(tmp_path, name="run", pipe=None, reward=None, **overrides):
    pipe = pipe if pipe is not None else tiny_flux_pipeline(seed=0)
    reward = reward if reward is not None else tiny_clip_reward(seed=0)
    settings = {"rollout_steps": ROLLOUT_STEPS, "group_size": 3, **overrides}
    return GRPOTrainer(
        pipe, reward=reward, prompts=PROMPTS, config=tiny_trainer_config("grpo", tmp_path / name, **settings)
    )


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------- config
def test_defaults_are_flow_grpos():
    config = GRPOConfig()
    assert (config.group_size, config.clip_range, config.adv_clip_max, config.noise_level) == (24, 1e-4, 5.0, 0.7)
    assert (config.timestep_fraction, config.rollout_steps, config.trained_step_count) == (0.99, 10, 9)
    assert (config.learning_rate, config.max_grad_norm, config.beta) == (3e-4, 1.0, 0.04)
    assert GRPOConfig(use_lora=False).learning_rate == 1e-5 and GRPOConfig(learning_rate=1e-3).learning_rate == 1e-3
    assert config.advantage_std == "group" and config.kl_form == "exact" and config.timestep_selection == "first"
    assert not config.shared_noise and not config.shared_group_noise
    assert (
        GRPOConfig(rollout_steps=4).trained_step_count == 3
        and GRPOConfig(rollout_steps=4, timestep_fraction=0.1).trained_step_count == 1
    )
    assert trainer_class_for("grpo") is GRPOTrainer and GRPOTrainer.config_class is GRPOConfig


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(method="tailorpo"), "method must be one of"),
        (dict(group_size=1), "group_size"),
        (dict(noise_level=0.0), "noise_level"),
        (dict(advantage_std="batch"), "advantage_std"),
        (dict(adv_clip_max=0.0), "adv_clip_max"),
        (dict(clip_range=1.0), "clip_range"),
        (dict(timestep_fraction=0.0), "timestep_fraction"),
        (dict(timestep_selection="last"), "timestep_selection"),
        (dict(beta=-0.1), "beta"),
        (dict(kl_form="approx"), "kl_form"),
        (dict(trajectories_per_forward=0), "trajectories_per_forward"),
    ],
)
def test_config_is_validated(values, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**values)


def test_the_reward_need_not_be_differentiable_but_must_score_each_image(tmp_path):
    # Scored in numpy, rounded: no gradient anywhere (and ties, whose groups train nothing, are possible).
    detached = CallableReward(
        lambda images, prompts: torch.from_numpy(images.detach().numpy().mean(axis=(1, 2, 3)).round(3))
    )
    history = make_trainer(tmp_path, reward=detached, max_train_steps=1).train()
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    one_number = CallableReward(lambda images, prompts: images.detach().mean().reshape(1))
    with pytest.raises(ValueError, match=r"must return a tensor of shape"):
        make_trainer(tmp_path, "wrong", reward=one_number).training_step(0)


# ------------------------------------------------------------------------------------------- advantages
def test_advantages_match_a_hand_computation():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 4.0, 4.0, 4.0]])
    # Group 1: mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5); group 2 ties: advantages 0.
    std = 3.5**0.5
    expected = [[(r - 3) / (std + 1e-4) for r in (1, 2, 3, 6)], [0.0] * 4]
    torch.testing.assert_close(
        group_advantages(rewards), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0
    )
    # Flow-GRPO's global_std: each group's own mean, the std of all eight rewards (mean 3.5, squares 55/8 + ...).
    global_std = float(np.std([1, 2, 3, 6, 4, 4, 4, 4]))
    expected_global = [[(r - 3) / (global_std + 1e-4) for r in (1, 2, 3, 6)], [0.0] * 4]
    torch.testing.assert_close(
        group_advantages(rewards, global_std), torch.tensor(expected_global, dtype=torch.float64)
    )


@pytest.mark.parametrize("advantage_std, accumulation", [("group", 1), ("global", 2)])
def test_the_trainer_normalises_its_rewards_as_by_hand(tmp_path, advantage_std, accumulation):
    scores = []

    def recording(images, prompts):
        values = brightness(images, prompts)
        scores.append(values.detach().clone())
        return values

    trainer = make_trainer(
        tmp_path, reward=CallableReward(recording), advantage_std=advantage_std, train_batch_size=2,
        gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    rollouts = [trainer._rollouts_with_advantages(0, m) for m in range(accumulation)]
    rewards = torch.cat(scores).double()
    assert (
        torch.equal(torch.cat([r.rewards for r in rollouts]).double(), rewards) and len(rewards) == 2 * 3 * accumulation
    )
    groups = rewards.view(-1, 3).tolist()
    every = [r for group in groups for r in group]
    expected = []
    for group in groups:
        mean = sum(group) / 3
        std = (sum((r - mean) ** 2 for r in group) / 3) ** 0.5 if advantage_std == "group" else float(np.std(every))
        expected += [(r - mean) / (std + 1e-4) for r in group]
    torch.testing.assert_close(torch.cat([r.advantages for r in rollouts]), torch.tensor(expected, dtype=torch.float32))


def test_the_clipped_objective_is_ppos():
    advantages = torch.tensor([2.0, -2.0, 2.0, -2.0, 9.0, 0.5])
    log_ratio = torch.log(torch.tensor([1.0, 1.0, 1.5, 1.5, 1.0, 0.5]))
    losses, ratio = grpo_policy_loss(log_ratio, advantages, clip_range=0.2, adv_clip_max=5.0)
    # rho = 1: -A. A > 0, rho above 1 + eps: the clipped -A (1 + eps) is the larger. A < 0, rho above: -A rho.
    # The advantage 9 is clipped to 5. A > 0, rho under 1 - eps: -A rho (the larger), no clip on that side.
    expected = torch.tensor([-2.0, 2.0, -2.0 * 1.2, 2.0 * 1.5, -5.0, -0.5 * 0.5])
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(ratio, torch.tensor([1.0, 1.0, 1.5, 1.5, 1.0, 0.5]))


# ------------------------------------------------------------------------------------------- the loss at the first inner step
@pytest.mark.parametrize(
    "use_lora, overrides",
    [(True, {}), (True, {"trajectories_per_forward": 4, "adv_clip_max": 0.5}), (False, {"beta": 0.1})],
    ids=["lora", "lora-chunked-advclip", "full-kl"],
)
def test_at_the_first_inner_step_the_ratio_is_one_and_the_loss_is_minus_the_advantage(tmp_path, use_lora, overrides):
    trainer = make_trainer(tmp_path, use_lora=use_lora, train_batch_size=2, **overrides)
    output = trainer.training_step(0)
    parts = 2 if overrides.get("trajectories_per_forward") else 1  # 6 trajectories in chunks of 4: two parts
    assert len(output.losses) == trainer.config.trained_step_count * parts == 2 * parts
    losses = [loss_fn().item() for loss_fn in output.losses.values()]
    # The ratio is exactly 1 at every trajectory and step, so nothing is clipped.
    assert output.logs["ratio_max_deviation"] == 0.0 and output.logs["clip_fraction"] == 0.0
    if trainer.config.beta > 0:
        assert output.logs["kl"] == 0.0  # the reference is the base model, which the policy still is
    # Each step's loss (the mean of its parts, as the base averages the losses) is the mean of -clip(A) over the
    # trajectories (the rollout is keyed by the update: drawn again).
    rollout = trainer.sample_groups(0)
    advantages = group_advantages(rollout.rewards.view(-1, 3)).flatten().float()
    minus_advantage = (-advantages.clamp(-trainer.config.adv_clip_max, trainer.config.adv_clip_max)).tolist()
    for step in range(2):
        assert sum(losses[step * parts : (step + 1) * parts]) / parts == pytest.approx(
            sum(minus_advantage) / 6, abs=1e-7
        )
    assert output.logs["policy_loss"] == pytest.approx(sum(minus_advantage) / 6, abs=1e-7)


def test_the_losses_are_minus_the_clipped_advantages_per_trajectory(tmp_path):
    trainer = make_trainer(tmp_path, train_batch_size=2, adv_clip_max=0.8, beta=0.1)
    rollout = trainer._rollouts_with_advantages(0, 0)
    for position in range(len(rollout.steps)):
        rollout.stats.clear()
        loss = trainer.step_loss(rollout, position, 0)
        minus_advantage = -rollout.advantages.clamp(-0.8, 0.8)
        assert rollout.stats["policy_loss"] == minus_advantage.tolist()  # exactly, trajectory by trajectory
        assert rollout.stats["ratio_max_deviation"] == [0.0] and rollout.stats["kl"] == [0.0] * 6
        assert loss.item() == pytest.approx(minus_advantage.mean().item(), abs=1e-7)
        assert loss.requires_grad


@pytest.mark.parametrize("kl_form", ["exact", "flow-grpo"])
def test_the_kl_is_the_closed_form_of_the_steps_two_gaussians(tmp_path, kl_form):
    generator = torch.Generator().manual_seed(0)
    mean, other = torch.randn(2, 5, 4, generator=generator), torch.randn(2, 5, 4, generator=generator)
    std = torch.rand(2, 1, 1, generator=generator) + 0.1
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(other, std.expand_as(other))
    ).flatten(1)
    torch.testing.assert_close(same_std_kl(mean, other, std, "sum"), reference.sum(1))
    torch.testing.assert_close(same_std_kl(mean, other, std, "mean"), reference.mean(1))

    # Through the trainer, once the LoRA has moved the policy off the base model (the reference).
    trainer = make_trainer(tmp_path, beta=0.1, kl_form=kl_form)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in trainer.pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    rollout = trainer._rollouts_with_advantages(0, 0)
    sampled, text = rollout.steps[1], rollout.texts[0]
    trainer.step_loss(rollout, 1, 0)
    base = tiny_flux_pipeline(seed=0).transformer.eval()
    with torch.no_grad():
        policy = trainer.transition(
            sampled.state,
            trainer.model_velocity(trainer.model, sampled.state, sampled.sigma, text),
            sampled.sigma,
            sampled.sigma_next,
        ).mean
        base_velocity = trainer.adapter.predict_velocity(
            base, sampled.state, sampled.sigma, text, 1.0, SIZE, SIZE
        ).float()
        base_mean = trainer.transition(sampled.state, base_velocity, sampled.sigma, sampled.sigma_next).mean
    sigma, sigma_next = float(sampled.sigma), float(sampled.sigma_next)
    # Flow-GRPO's kl_loss (scripts/train_sd3.py:895): the diffusion coefficient std_dev_t, without sqrt(|dt|).
    std_dev_t = 0.7 * (sigma / (1 - sigma)) ** 0.5
    flow_grpo = ((policy - base_mean) ** 2).mean(dim=(1, 2)) / (2 * std_dev_t**2)
    expected = flow_grpo if kl_form == "flow-grpo" else flow_grpo / (sigma - sigma_next)
    assert expected.min() > 0
    torch.testing.assert_close(torch.tensor(rollout.stats["kl"]), expected, rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------- the gradient
def test_one_sgd_step_raises_log_pi_of_the_better_trajectory_and_lowers_the_worse(tmp_path):
    """A group of two: advantages +a and -a. One small SGD step along the update's gradient (all trained steps) raises
    the log-probability of the better trajectory's sampled steps and lowers the worse one's, measured."""
    trainer = make_trainer(tmp_path, reward=CallableReward(brightness), group_size=2, rollout_steps=4, beta=0.0)
    rollout = trainer._rollouts_with_advantages(0, 0)
    # +a and -a (a < 1 where the reward gap is near the 1e-4 under the std: here a ~ 0.8).
    assert rollout.advantages.sign().tolist() in ([1.0, -1.0], [-1.0, 1.0])
    assert rollout.advantages[0] == -rollout.advantages[1]

    def log_pi_change(means_before):
        """Per trajectory, log pi_after(x_{t-1}) - log pi_before(x_{t-1}) of every trained step (float64 inside)."""
        changes = []
        with torch.no_grad():
            for sampled, before in zip(rollout.steps, means_before, strict=True):
                velocity = trainer.model_velocity(trainer.model, sampled.state, sampled.sigma, rollout.texts[0])
                mean = trainer.transition(sampled.state, velocity, sampled.sigma, sampled.sigma_next).mean
                changes.append(dpo_log_ratio(sampled.next_state, mean, before, sampled.std, "sum"))
        return torch.stack(changes)  # [steps, 2]

    means_before = [sampled.sampling_mean for sampled in rollout.steps]
    total = sum(trainer.step_loss(rollout, position, 0) for position in range(len(rollout.steps))) / len(rollout.steps)
    total.backward()
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in trainer.trainable_parameters))
    assert grad_norm > 0
    with torch.no_grad():
        for parameter in trainer.trainable_parameters:
            parameter -= (1e-2 / grad_norm) * parameter.grad
    change = log_pi_change(means_before)
    better = int(rollout.advantages.argmax())
    print(f"one SGD step: log pi per step, better {change[:, better].tolist()}, worse {change[:, 1 - better].tolist()}")
    assert (change[:, better] > 0).all() and (change[:, 1 - better] < 0).all()


# ------------------------------------------------------------------------------------------- sampling
def test_group_noise_is_shared_only_when_asked(tmp_path):
    trainer = make_trainer(tmp_path, train_batch_size=2)
    noise = trainer.trajectory_noise(0).view(2, 3, -1)  # [prompt, member, ...]
    assert not torch.equal(noise[0, 0], noise[0, 1]) and not torch.equal(noise[0, 0], noise[1, 0])
    shared = make_trainer(tmp_path, "shared", train_batch_size=2, shared_group_noise=True)
    group_noise = shared.trajectory_noise(0).view(2, 3, -1)
    assert all(torch.equal(group_noise[b, 0], group_noise[b, g]) for b in range(2) for g in range(3))
    assert not torch.equal(group_noise[0, 0], group_noise[1, 0])
    # The trajectories of a shared-noise group part with the SDE's first step.
    rollout = shared.sample_groups(0)
    first = rollout.steps[0]
    assert torch.equal(first.state[0], first.state[1]) and not torch.equal(first.next_state[0], first.next_state[1])
    across = make_trainer(tmp_path, "across", train_batch_size=2, shared_noise=True).trajectory_noise(0).view(2, 3, -1)
    assert torch.equal(across[0], across[1]) and not torch.equal(across[0, 0], across[0, 1])


def test_the_sampler_is_the_flow_sde_and_keeps_the_trained_steps(tmp_path):
    trainer = make_trainer(tmp_path, rollout_steps=4, timestep_fraction=0.5)
    rollout = trainer.sample_groups(0)
    assert [s.index for s in rollout.steps] == [0, 1] and torch.equal(
        rollout.steps[1].state, rollout.steps[0].next_state
    )
    sampled = rollout.steps[1]
    velocity = trainer.model_velocity(trainer.model, sampled.state, sampled.sigma, rollout.texts[0])
    transition = trainer.transition(sampled.state, velocity, sampled.sigma, sampled.sigma_next)
    assert torch.equal(transition.mean, sampled.sampling_mean) and torch.equal(transition.std, sampled.std)
    z = (sampled.next_state - sampled.sampling_mean) / sampled.std
    assert z.abs().max() < 6 and 0.8 < z.std() < 1.2
    random = make_trainer(tmp_path, "random", rollout_steps=8, timestep_fraction=0.5, timestep_selection="random")
    draws = [random.trained_steps(step) for step in range(4)]
    assert all(len(d) == 4 and d == sorted(set(d)) for d in draws) and len({tuple(d) for d in draws}) > 1
    assert [s.index for s in random.sample_groups(2).steps] == draws[2]


# ------------------------------------------------------------------------------------------- training runs
def _lora(trainer):
    return get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))


@pytest.mark.parametrize("advantage_std", ["group", "global"])
def test_batch_and_accumulation_train_the_same_lora(tmp_path, advantage_std):
    """Every draw is keyed by the trajectory's position in the update: 2 prompts in one micro-batch and 1 prompt in
    each of 2 accumulated micro-batches are the same update (with the global std over both micro-batches)."""
    common = dict(max_train_steps=2, learning_rate=1e-2, advantage_std=advantage_std)
    batched = make_trainer(tmp_path, "batched", train_batch_size=2, **common)
    batched.train()
    accumulated = make_trainer(tmp_path, "accumulated", train_batch_size=1, gradient_accumulation_steps=2, **common)
    accumulated.train()
    for key in ("reward", "advantage_abs"):
        assert [h[key] for h in accumulated.history] == pytest.approx([h[key] for h in batched.history], rel=1e-5)
    a, b = _lora(batched), _lora(accumulated)
    # AdamW moves every element by ~lr per update; the two agree to ~1e-6 (rounding of the batched matmuls, which
    # Adam's normalisation enlarges where an element's gradient is near 0).
    assert max(v.abs().max() for k, v in a.items() if "lora_B" in k) > 1e-2
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_only_the_trainable_parameters_change(tmp_path, use_lora):
    pipe = tiny_flux_pipeline(seed=0)
    base_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    frozen_before = {
        f"{name}.{k}": v.clone()
        for name in ("vae", "text_encoder", "text_encoder_2")
        for k, v in getattr(pipe, name).state_dict().items()
    }
    trainer = make_trainer(tmp_path, pipe=pipe, use_lora=use_lora, learning_rate=1e-2, beta=0.04, train_batch_size=2)
    history = trainer.train()
    assert len(history) == 2 and all(np.isfinite(h["loss"]) and "reward" in h for h in history)
    moved = []
    for name, param in pipe.transformer.named_parameters():
        if "lora_" in name or not use_lora:
            moved.append(
                not torch.equal(param.to(base_before[name].dtype), base_before[name]) if not use_lora else True
            )
        else:
            assert torch.equal(param, base_before[name.replace(".base_layer", "")]), f"base weight {name} changed"
    if use_lora:
        lora_b = [p for n, p in pipe.transformer.named_parameters() if "lora_B" in n]
        assert any(p.abs().max() > 0 for p in lora_b), "no LoRA weight moved"
    else:
        assert sum(moved) > len(moved) // 2, "the full fine-tune moved too few tensors"
    for name in ("vae", "text_encoder", "text_encoder_2"):
        for k, v in getattr(pipe, name).state_dict().items():
            assert torch.equal(v, frozen_before[f"{name}.{k}"]), f"{name}.{k} changed"
    out = tmp_path / "run"
    assert (out / "grpo_config.json").is_file() and "grpo" in (out / "README.md").read_text()


def test_resume_is_bit_identical(tmp_path):
    common = dict(learning_rate=1e-2, advantage_std="global", gradient_accumulation_steps=2, beta=0.04)
    straight = make_trainer(tmp_path, "straight", max_train_steps=3, **common)
    straight.train()
    make_trainer(tmp_path, "split", max_train_steps=2, checkpointing_steps=2, **common).train()
    resumed = make_trainer(tmp_path, "split", max_train_steps=3, resume_from_checkpoint="latest", **common)
    resumed.train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [h["reward"] for h in resumed.history] == [h["reward"] for h in straight.history]
    for a, b in zip(straight.trainable_parameters, resumed.trainable_parameters, strict=True):
        assert torch.equal(a, b)


def test_the_written_lora_loads_with_stock_load_lora_weights(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    make_trainer(tmp_path, pipe=pipe, max_train_steps=3, learning_rate=3e-2, reward=CallableReward(brightness)).train()
    out = tmp_path / "run"
    kwargs = dict(
        height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16, output_type="np"
    )
    trained = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(5), **kwargs).images
    fresh = tiny_flux_pipeline(seed=0)
    untrained = fresh(PROMPTS[:2], generator=torch.Generator().manual_seed(5), **kwargs).images
    fresh.load_lora_weights(str(out))
    loaded = fresh(PROMPTS[:2], generator=torch.Generator().manual_seed(5), **kwargs).images
    assert np.abs(trained - untrained).max() > 1e-4, "training did not change the images"
    np.testing.assert_allclose(loaded, trained, rtol=0, atol=1e-5)


def test_train_from_the_command_line_and_a_config_file(world, tmp_path):
    """``--method grpo`` picks GRPO's options: the file's GRPO settings are accepted, the command line's win."""
    config = tmp_path / "grpo.yaml"
    config.write_text(
        f"model: {world / 'flux'}\nreward: clip:{world / 'clip'}\ntorch_dtype: float32\n"
        f"prompt_file: {world / 'prompts.txt'}\noutput_dir: {tmp_path / 'out'}\n"
        "resolution: 32\nrollout_steps: 2\nmax_sequence_length: 16\nmax_train_steps: 1\nlearning_rate: 1e-2\n"
        "lora_rank: 4\nmixed_precision: 'no'\ncpu: true\ncheckpointing_steps: 0\nvalidation_steps: 0\n"
        "group_size: 4\nadvantage_std: global\nbeta: 0.0\n"
    )
    executable = shutil.which("diffusers-srpo")
    assert executable, "the console script is not installed"
    result = subprocess.run(
        [executable, "train", "--method", "grpo", "--config", str(config), "--group_size", "2", "--max_train_steps", "2"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("grpo: wrote the LoRA")
    settings = json.loads((tmp_path / "out" / "grpo_config.json").read_text())
    assert settings["method"] == "grpo" and settings["group_size"] == 2 and settings["max_train_steps"] == 2
    assert settings["advantage_std"] == "global" and settings["beta"] == 0.0
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())


# ------------------------------------------------------------------------------------------- two processes
TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from peft.utils import get_peft_model_state_dict
    from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
    from diffusers_srpo.trainers import trainer_class_for

    out, overrides = sys.argv[1], json.loads(sys.argv[2])
    config = tiny_trainer_config("grpo", out, rollout_steps=3, group_size=3, learning_rate=1e-2, checkpointing_steps=2,
                                 cpu=True, **overrides)
    trainer = trainer_class_for("grpo")(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0),
                                        prompts=["a red circle", "a blue square", "a green triangle", "a yellow circle"],
                                        config=config)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model)), os.path.join(out, f"lora-rank{rank}.pt"))
    prompts = [trainer.prompts[i] for step in range(2) for m in range(config.gradient_accumulation_steps)
               for i in trainer.indices_for_step(step, m)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"num_processes": trainer.accelerator.num_processes, "prompts": prompts, "history": trainer.history}, f)
    """
)


@pytest.mark.slow
def test_two_processes_train_the_lora_of_one_process_accumulating_two(tmp_path):
    """2 processes (gloo, CPU), the global std gathered from both: the same LoRA on both ranks, different prompts, and
    the LoRA of one process with gradient_accumulation_steps=2 (the same samples, split differently)."""
    script = tmp_path / "train_two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               str(script), str(out), json.dumps({"advantage_std": "global"})]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 for r in ranks) and ranks[0]["prompts"] != ranks[1]["prompts"]
    weights = [torch.load(out / f"lora-rank{r}.pt") for r in (0, 1)]
    assert any(v.abs().max() > 0 for k, v in weights[0].items() if "lora_B" in k), "nothing trained"
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert (out / "checkpoint-2").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()

    single = tmp_path / "single"
    result = subprocess.run(
        [sys.executable, str(script), str(single), json.dumps({"advantage_std": "global", "gradient_accumulation_steps": 2})],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads((single / "rank0.json").read_text())
    assert sorted(one["prompts"]) == sorted(ranks[0]["prompts"] + ranks[1]["prompts"])
    assert [h["reward"] for h in one["history"]] == pytest.approx([h["reward"] for h in ranks[0]["history"]], rel=1e-5)
    single_weights = torch.load(single / "lora-rank0.pt")
    for key in weights[0]:
        torch.testing.assert_close(single_weights[key], weights[0][key], rtol=0, atol=1e-5)
