"""TailorPO, TailorPO-G and trajectory-level DPO (SPEC section 4) on the tiny world and the toy world."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffusers_srpo.flow_sde import dpo_log_ratio, flow_sde_transition
from diffusers_srpo.rewards import CallableReward
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers import TailorPOConfig, TailorPOTrainer

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
SIZE = 32
ROLLOUT_STEPS = 4


def make_trainer(tmp_path, method="tailorpo", name="run", pipe=None, reward=None, **overrides):
    pipe = pipe if pipe is not None else tiny_flux_pipeline(seed=0)
    reward = reward if reward is not None else tiny_clip_reward(seed=0)
    config = tiny_trainer_config(method, tmp_path / name, **{"rollout_steps": ROLLOUT_STEPS, "tie_threshold": 0.0, **overrides})
    return TailorPOTrainer(pipe, reward=reward, prompts=PROMPTS, config=config)


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "values, message",
    [
        (dict(method="srpo"), "method must be one of"),
        (dict(beta=0.0), "beta"),
        (dict(noise_level=0.0), "noise_level"),
        (dict(log_prob_reduction="max"), "log_prob_reduction"),
        (dict(preference_window_start=0.5, preference_window_end=0.5), "preference_window"),
        (dict(rollout_steps=4, preference_window_start=0.8, preference_window_end=0.9), "holds no step"),
        (dict(trained_step_fraction=0.0), "trained_step_fraction"),
        (dict(tie_threshold=-1.0), "tie_threshold"),
        (dict(guidance_eta=-1.0), "guidance_eta"),
        (dict(guidance_gradient="both"), "guidance_gradient"),
    ],
)
def test_config_is_validated(values, message):
    with pytest.raises(ValueError, match=message):
        TailorPOConfig(**values)


def test_tailorpo_needs_no_differentiable_reward_but_tailorpo_g_does(tmp_path):
    detached = CallableReward(lambda images, prompts: images.detach().mean(dim=(1, 2, 3)))
    make_trainer(tmp_path, "tailorpo", reward=detached)  # ranking only: fine
    make_trainer(tmp_path, "trajectory-dpo", reward=detached)
    with pytest.raises(ValueError, match="not differentiable.*tailorpo-g"):
        make_trainer(tmp_path, "tailorpo-g", reward=detached)


# ------------------------------------------------------------------------------------------- the DPO loss
@pytest.mark.parametrize(
    "method, use_lora",
    [("tailorpo", True), ("tailorpo-g", True), ("trajectory-dpo", True), ("tailorpo", False), ("trajectory-dpo", False)],
)
def test_at_initialisation_the_log_ratio_is_zero_and_the_loss_is_log_2(tmp_path, method, use_lora):
    trainer = make_trainer(tmp_path, method, use_lora=use_lora)
    output = trainer.training_step(0)
    assert len(output.losses) == ROLLOUT_STEPS  # every step ranked and trained by default
    losses = [loss_fn() for loss_fn in output.losses.values()]
    assert output.logs["tie_fraction"] == 0
    for loss in losses:
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert output.logs["log_ratio_preferred"] == 0.0 and output.logs["log_ratio_other"] == 0.0
    assert output.logs["implicit_accuracy"] == 0.5  # a margin of exactly 0 is no preference


def test_one_sgd_step_raises_log_pi_of_the_preferred_state_and_lowers_the_other(tmp_path):
    trainer = make_trainer(tmp_path, reward=CallableReward(brightness))
    pairs, _ = trainer._sample_stepwise_pairs(
        trainer.adapter.make_noise(len(PROMPTS[:1]), SIZE, SIZE, torch.Generator().manual_seed(0), "cpu", torch.float32),
        trainer.text_for(PROMPTS[:1]),
        PROMPTS[:1],
        torch.Generator().manual_seed(1),
        set(range(ROLLOUT_STEPS)),
        {},
    )
    pair = pairs[1]
    text = trainer.text_for(PROMPTS[:1])

    def policy_mean():
        with torch.no_grad():
            velocity = trainer.model_velocity(trainer.model, pair.state, pair.sigma, text)
            return trainer.transition(pair.state, velocity, pair.sigma, pair.sigma_next).mean

    mean_before = policy_mean()
    loss = trainer.dpo_loss(pair, text, {"implicit_accuracy": [], "log_ratio_preferred": [], "log_ratio_other": []})
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in trainer.trainable_parameters))
    assert grad_norm > 0
    with torch.no_grad():
        for parameter in trainer.trainable_parameters:
            parameter -= (1e-2 / grad_norm) * parameter.grad  # plain SGD along the DPO gradient, step length 0.01
    # The change of log pi at each state, computed without the large terms that cancel (float64 inside).
    preferred, other = pair.next_state.chunk(2)
    change = [dpo_log_ratio(x, policy_mean(), mean_before, pair.std, "sum").item() for x in (preferred, other)]
    print(f"one SGD step: log pi(preferred) {change[0]:+.3e}, log pi(other) {change[1]:+.3e}")
    assert change[0] > 0 and change[1] < 0


def test_the_reference_is_the_base_model_while_the_lora_trains(tmp_path):
    trainer = make_trainer(tmp_path, max_train_steps=3, learning_rate=1e-2)
    trainer.train()
    text = trainer.text_for(PROMPTS[:2])
    latents = trainer.adapter.make_noise(2, SIZE, SIZE, torch.Generator().manual_seed(3), "cpu", torch.float32)
    fresh = tiny_flux_pipeline(seed=0).transformer.eval()
    with torch.no_grad():
        with trainer.reference_policy() as reference:
            reference_velocity = trainer.model_velocity(reference, latents, 0.7, text)
        policy_velocity = trainer.model_velocity(trainer.model, latents, 0.7, text)
        base_velocity = trainer.adapter.predict_velocity(fresh, latents, 0.7, text, 1.0, SIZE, SIZE)
    torch.testing.assert_close(reference_velocity, base_velocity, rtol=0, atol=1e-6)
    assert (policy_velocity - base_velocity).abs().max() > 1e-4, "the LoRA did not train"
    # And the adapters are back on: the policy is not the base.
    assert not torch.allclose(trainer.model_velocity(trainer.model, latents, 0.7, text).detach(), base_velocity)


# ------------------------------------------------------------------------------------------- ranking and ties
@pytest.mark.parametrize("method", ["tailorpo", "tailorpo-g"])
def test_the_preferred_state_has_the_higher_stepwise_reward_and_continues_the_trajectory(tmp_path, method):
    trainer = make_trainer(tmp_path, method, reward=CallableReward(brightness), guidance_eta=10.0)
    text, prompts = trainer.text_for(PROMPTS[:2]), PROMPTS[:2]
    noise = trainer.adapter.make_noise(2, SIZE, SIZE, torch.Generator().manual_seed(0), "cpu", torch.float32)
    pairs, final = trainer._sample_stepwise_pairs(noise, text, prompts, torch.Generator().manual_seed(1), set(range(ROLLOUT_STEPS)), {})
    assert len(pairs) == ROLLOUT_STEPS and torch.equal(pairs[0].state, noise)
    for index, pair in enumerate(pairs):
        preferred, other = pair.next_state.chunk(2)
        following = pairs[index + 1].state if index + 1 < len(pairs) else final
        assert torch.equal(following, preferred), "the preferred (for tailorpo-g: guided) state continues"
        r_preferred, _ = trainer.stepwise_reward(preferred, pair.sigma_next, text, prompts)
        r_other, _ = trainer.stepwise_reward(other, pair.sigma_next, text, prompts)
        assert (r_preferred >= r_other).all()
        velocity = trainer.model_velocity(trainer.model, pair.state, pair.sigma, text)
        transition = flow_sde_transition(pair.state, velocity, pair.sigma, pair.sigma_next, 0.7, float(trainer.rollout_sigmas[1]))
        if method == "tailorpo":
            # Both states are draws from the same Gaussian around the policy's mean at the shared state.
            z = (pair.next_state - torch.cat([transition.mean] * 2)) / torch.cat([transition.std] * 2)
            assert z.abs().max() < 6 and 0.8 < z.std() < 1.2
        else:
            # The stored preferred state is the guided one: it moved off the draw, the other state did not.
            z_other = (other - transition.mean) / transition.std
            assert z_other.abs().max() < 6
            guided_again = trainer.guide(preferred, pair.sigma_next, text, prompts)
            assert (guided_again - preferred).abs().max() > 0


def test_ties_and_tiny_gaps_are_skipped_and_counted(tmp_path):
    nearly_constant = CallableReward(lambda images, prompts: 1e-7 * images.mean(dim=(1, 2, 3)))
    trainer = make_trainer(tmp_path, reward=nearly_constant, tie_threshold=1e-6, max_train_steps=1, train_batch_size=2)
    lora_b = {n: p.detach().clone() for n, p in trainer.pipe.transformer.named_parameters() if "lora_B" in n}
    history = trainer.train()
    assert history[0]["tie_fraction"] == 1.0  # every pair of every ranked step
    assert history[0]["implicit_accuracy"] == 0.5  # ties count as chance
    assert history[0]["loss"] == 0.0
    # No preference was learned: the LoRA's B matrices (zero at the start) are still zero.
    assert all(torch.equal(p, lora_b[n]) for n, p in trainer.pipe.transformer.named_parameters() if "lora_B" in n)


def test_trajectory_dpo_labels_every_step_by_the_final_images(tmp_path):
    trainer = make_trainer(tmp_path, "trajectory-dpo", reward=CallableReward(brightness))
    text, prompts = trainer.text_for(PROMPTS[:2]), PROMPTS[:2]
    noise = trainer.adapter.make_noise(2, SIZE, SIZE, torch.Generator().manual_seed(0), "cpu", torch.float32)
    logs = {}
    pairs, final_rewards = trainer._sample_trajectory_pairs(
        noise, text, prompts, torch.Generator().manual_seed(1), set(range(ROLLOUT_STEPS)), logs
    )
    final_latents = pairs[-1].next_state  # the last step is trained: its next states are the final latents
    torch.testing.assert_close(final_rewards, brightness(trainer.adapter.decode(final_latents, SIZE, SIZE), None))
    first_won = final_rewards[:2] >= final_rewards[2:]
    assert torch.equal(pairs[0].state, torch.cat([noise, noise]))
    for index, pair in enumerate(pairs):
        assert torch.equal(pair.first_preferred, first_won)
        if index + 1 < len(pairs):
            assert torch.equal(pairs[index + 1].state, pair.next_state)  # each trajectory continues with its own sample
    assert logs["final_reward_gap"] == pytest.approx((final_rewards[:2] - final_rewards[2:]).abs().mean().item())


def test_trained_step_fraction_and_window_pick_the_trained_steps(tmp_path):
    trainer = make_trainer(tmp_path, rollout_steps=8, preference_window_start=0.25, preference_window_end=0.75, trained_step_fraction=0.5)
    assert trainer.config.ranked_steps() == [2, 3, 4, 5]
    references = []
    original = trainer._reference_mean
    trainer._reference_mean = lambda *args: (references.append(1), original(*args))[1]
    output = trainer.training_step(0)
    assert len(output.losses) == 2 and output.logs["trained_steps"] == 2
    assert len(references) == 2, "only the trained steps pay for a reference forward"


def test_bf16_weights_keep_a_float32_sampler_state_so_guidance_survives(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    pipe.transformer.to(torch.bfloat16)
    trainer = make_trainer(tmp_path, "tailorpo-g", pipe=pipe, reward=CallableReward(brightness), guidance_eta=1.0)
    assert trainer.weight_dtype == torch.bfloat16
    text, prompts = trainer.text_for(PROMPTS[:2]), PROMPTS[:2]
    noise = trainer.adapter.make_noise(2, SIZE, SIZE, torch.Generator().manual_seed(0), "cpu", torch.float32)
    pairs, final = trainer._sample_stepwise_pairs(noise, text, prompts, torch.Generator().manual_seed(1), {1}, {})
    assert final.dtype == torch.float32 and pairs[0].next_state.dtype == torch.float32
    state = pairs[0].next_state[:2]
    guided = trainer.guide(state, pairs[0].sigma_next, text, prompts)
    # Measured: in float32 the step moves every element; rounded to bf16 (8 bits of mantissa) it would move ~7 %.
    assert (guided != state).float().mean() > 0.99
    assert (guided.bfloat16() != state.bfloat16()).float().mean() < 0.5


# ------------------------------------------------------------------------------------------- TailorPO-G
@pytest.mark.parametrize("gradient", ["model", "fixed"])
def test_guidance_raises_the_stepwise_reward_on_most_draws(tmp_path, gradient, one_thread):
    """On the toy world's CLIP reward (aimed with "bright. {prompt}"), eta = 0.1: the guided state scores higher.

    Measured: 93 of 96 draws (0.97) with 12 prompts, either gradient; the misses are at the last steps, where the
    gain is ~1e-5 and the decode's clamp to [0, 1] cuts the gradient.
    """
    from diffusers_srpo.toyworld.demo import CONTENT_PROMPTS
    from diffusers_srpo.toyworld.generator import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, load_pipeline
    from diffusers_srpo.toyworld.reward import load_reward

    prompts = list(CONTENT_PROMPTS)[::2]
    config = TailorPOConfig(
        method="tailorpo-g", output_dir=str(tmp_path / "g"), resolution=IMAGE_SIZE, rollout_steps=8,
        max_sequence_length=MAX_SEQUENCE_LENGTH, mixed_precision="no", cpu=True, lora_rank=8,
        reward_template="bright. {prompt}", guidance_gradient=gradient, guidance_eta=0.1,
    )  # fmt: skip
    trainer = TailorPOTrainer(load_pipeline(), reward=load_reward(), prompts=prompts, config=config)
    text = trainer.text_for(prompts)
    sigmas = trainer.rollout_sigmas
    latents = trainer.adapter.make_noise(len(prompts), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(0), "cpu", torch.float32)
    improved, total = 0, 0
    with torch.no_grad():
        for index in range(8):
            velocity = trainer.model_velocity(trainer.model, latents, sigmas[index], text)
            latents = trainer.transition(latents, velocity, sigmas[index], sigmas[index + 1]).sample(torch.Generator().manual_seed(index))
            unguided, state_velocity = trainer.stepwise_reward(latents, sigmas[index + 1], text, prompts)
            guided_state = trainer.guide(latents, sigmas[index + 1], text, prompts, state_velocity)
            guided, _ = trainer.stepwise_reward(guided_state, sigmas[index + 1], text, prompts)
            improved += int((guided > unguided).sum())
            total += len(prompts)
    fraction = improved / total
    print(f"guidance ({gradient}) raised the step-wise reward on {improved}/{total} draws ({fraction:.2f})")
    assert fraction >= 0.85  # 8 steps x 6 prompts


# ------------------------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_a_short_run_raises_the_final_image_reward_beyond_the_seed_spread(tmp_path, one_thread):
    """Toy world, reward = image brightness: 20 TailorPO updates, 3 seeds, the same 24 evaluation noises."""
    from diffusers_srpo.toyworld.demo import CONTENT_PROMPTS
    from diffusers_srpo.toyworld.generator import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, load_pipeline

    prompts = list(CONTENT_PROMPTS)[::3]
    reward = CallableReward(brightness)

    def evaluate(trainer):
        images = torch.cat([trainer.generate_images(prompts, 1000 + seed) for seed in range(2)])
        return brightness(images, None).mean().item()

    gains = []
    for seed in range(3):
        config = TailorPOConfig(
            output_dir=str(tmp_path / f"seed{seed}"), seed=seed, max_train_steps=20, learning_rate=3e-4,
            max_grad_norm=1.0, resolution=IMAGE_SIZE, rollout_steps=8, max_sequence_length=MAX_SEQUENCE_LENGTH,
            mixed_precision="no", cpu=True, lora_rank=8, lora_alpha=8.0, checkpointing_steps=0, validation_steps=0,
        )  # fmt: skip
        trainer = TailorPOTrainer(load_pipeline(), reward=reward, prompts=prompts, config=config)
        before = evaluate(trainer)
        trainer.train()
        gains.append(evaluate(trainer) - before)
    spread = max(gains) - min(gains)
    print(f"TailorPO brightness gains {[round(g, 4) for g in gains]}, mean {np.mean(gains):.4f}, spread {spread:.4f}")
    assert min(gains) > 0 and np.mean(gains) > spread


def test_written_lora_loads_with_stock_load_lora_weights_in_a_fresh_process(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    trainer = make_trainer(tmp_path, "tailorpo-g", pipe=pipe, max_train_steps=3, learning_rate=1e-2, reward=CallableReward(brightness))
    trainer.train()
    out = tmp_path / "run"
    assert (out / "tailorpo_config.json").is_file() and "tailorpo-g" in (out / "README.md").read_text()
    expected = pipe(PROMPTS[:2], height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(5), output_type="np").images  # fmt: skip
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from diffusers_srpo.testing import tiny_flux_pipeline
        pipe = tiny_flux_pipeline(seed=0)
        pipe.load_lora_weights({str(out)!r})
        images = pipe({PROMPTS[:2]!r}, height={SIZE}, width={SIZE}, num_inference_steps=4, guidance_scale=3.5,
                      max_sequence_length=16, generator=torch.Generator().manual_seed(5), output_type="np").images
        np.save({str(tmp_path / "fresh.npy")!r}, images)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    untrained = tiny_flux_pipeline(seed=0)(PROMPTS[:2], height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=3.5,
                                           max_sequence_length=16, generator=torch.Generator().manual_seed(5), output_type="np").images  # fmt: skip
    assert np.abs(expected - untrained).max() > 1e-4, "training did not change the images"
    np.testing.assert_allclose(np.load(tmp_path / "fresh.npy"), expected, rtol=0, atol=1e-5)


def test_tailorpo_resume_is_bit_identical(tmp_path):
    straight = make_trainer(tmp_path, name="straight", max_train_steps=4)
    straight.train()
    make_trainer(tmp_path, name="split", max_train_steps=2, checkpointing_steps=2).train()
    resumed = make_trainer(tmp_path, name="split", max_train_steps=4, resume_from_checkpoint="latest")
    resumed.train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for a, b in zip(straight.trainable_parameters, resumed.trainable_parameters, strict=True):
        assert torch.equal(a, b)
