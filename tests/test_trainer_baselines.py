"""The baselines in the same machinery (SPEC section 3): Direct-Align without SRP, SRPO without inversion, ReFL, DRaFT-K;
and what every method of the family shares (TailorPO's own tests are in test_trainer_tailorpo.py)."""

import pytest
import torch

from diffusers_srpo.rewards import CallableReward, PromptTemplateReward
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers import (
    METHODS,
    DRaFTConfig,
    DRaFTTrainer,
    ReFLConfig,
    ReFLTrainer,
    SRPOConfig,
    SRPOTrainer,
    trainer_class_for,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
SIZE = 32
ROLLOUT_STEPS = 4


def make_trainer(tmp_path, method, name="run", pipe=None, reward=None, **overrides):
    pipe = pipe if pipe is not None else tiny_flux_pipeline(seed=0)
    reward = reward if reward is not None else tiny_clip_reward(seed=0)
    config = tiny_trainer_config(method, tmp_path / name, **{"rollout_steps": ROLLOUT_STEPS, **overrides})
    return trainer_class_for(method)(pipe, reward=reward, prompts=PROMPTS, config=config)


class ForwardRecorder:
    """Counts the transformer's forwards, with and without grad, and the gradients that reach their outputs."""

    def __init__(self, transformer):
        self.records = []  # (grad_enabled, timestep, input, output) of each forward
        self.gradients_received = 0
        self.handle = transformer.register_forward_hook(self._hook)

    def _hook(self, module, args, kwargs_or_output, output=None):
        output = kwargs_or_output if output is None else output
        sample = output[0] if isinstance(output, tuple) else output.sample
        self.records.append((torch.is_grad_enabled(), None, None, sample.detach().clone()))
        if sample.requires_grad:
            sample.register_hook(self._count)

    def _count(self, grad):
        self.gradients_received += 1

    @property
    def with_grad(self) -> int:
        return sum(grad for grad, *_ in self.records)

    def remove(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------------- registry and config
def test_every_method_has_a_trainer_and_a_config():
    assert set(METHODS) == {"srpo", "direct-align", "refl", "draft", "tailorpo", "tailorpo-g", "trajectory-dpo", "grpo"}
    for method, trainer_class in METHODS.items():
        assert trainer_class.config_class(method=method).method == method
    with pytest.raises(ValueError, match="unknown method 'dpo'"):
        trainer_class_for("dpo")


@pytest.mark.parametrize(
    "config_class, values, message",
    [
        (SRPOConfig, dict(method="refl"), "method must be one of"),
        (SRPOConfig, dict(method="direct-align", use_inversion=True), "use_inversion"),
        (SRPOConfig, dict(method="direct-align", positive_words=["Real"]), "reward_template instead"),
        (SRPOConfig, dict(reward_template="bright. {prompt}"), "plain-reward methods"),
        (ReFLConfig, dict(reward_template="{caption}"), "reward_template"),
        (ReFLConfig, dict(refl_window_start=0.9, refl_window_end=0.5), "refl_window"),
        (ReFLConfig, dict(rollout_steps=4, refl_window_start=0.8, refl_window_end=0.9), "holds no step"),
        (DRaFTConfig, dict(rollout_steps=4, draft_k=5), "draft_k"),
        (DRaFTConfig, dict(draft_k=-1), "draft_k"),
    ],
)
def test_baseline_configs_are_validated(config_class, values, message):
    with pytest.raises(ValueError, match=message):
        config_class(**values)


def test_baseline_defaults():
    direct_align = SRPOConfig(method="direct-align")
    assert direct_align.use_inversion is False and SRPOConfig().use_inversion is True
    refl = ReFLConfig()
    assert refl.refl_steps() == [19, 20, 21, 22, 23, 24]  # the last quarter of 25 steps, as ImageReward's 30-39 of 40
    assert ReFLConfig(rollout_steps=40).refl_steps() == list(range(30, 40))
    assert DRaFTConfig().gradient_steps == 1 and DRaFTConfig(draft_k=0).gradient_steps == 25


# ------------------------------------------------------------------------------------------- every method trains
@pytest.mark.parametrize(
    "method, overrides",
    [
        ("direct-align", {}),
        ("srpo", {"use_inversion": False}),
        ("refl", {}),
        ("draft", {"draft_k": 1}),
        ("draft", {"draft_k": 0}),
        ("tailorpo", {}),
        ("tailorpo-g", {}),
        ("trajectory-dpo", {}),
    ],
    ids=["direct-align", "srpo-no-inversion", "refl", "draft-1", "draft-full", "tailorpo", "tailorpo-g", "trajectory-dpo"],
)
def test_each_method_trains_only_its_trainable_parameters(tmp_path, method, overrides):
    pipe = tiny_flux_pipeline(seed=0)
    base_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    trainer = make_trainer(tmp_path, method, pipe=pipe, **overrides)
    lora_before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    history = trainer.train()

    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all("reward" in h for h in history)
    for name, param in pipe.transformer.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name.replace(".base_layer", "")]), f"base weight {name} changed"
    moved = [n for n, p in pipe.transformer.named_parameters() if "lora_B" in n and not torch.equal(p, lora_before[n])]
    assert moved, "no LoRA weight moved"
    assert all(torch.equal(v, vae_before[k]) for k, v in pipe.vae.state_dict().items())
    card = (tmp_path / "run" / "README.md").read_text()
    assert method in card and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_direct_align_scores_the_plain_templated_reward_on_one_branch(tmp_path):
    base = tiny_clip_reward(seed=0)
    seen = []

    def recording(images, prompts):
        seen.append(list(prompts))
        return base(images, prompts)

    trainer = make_trainer(
        tmp_path, "direct-align", reward=CallableReward(recording), reward_template="bright. {prompt}", max_train_steps=1
    )
    assert isinstance(trainer.reward, PromptTemplateReward)
    seen.clear()
    recorder = ForwardRecorder(trainer.pipe.transformer)
    history = trainer.train()
    recorder.remove()
    # One branch: one training forward with grad and one reward call, on "bright. <prompt>".
    assert recorder.with_grad == 1
    assert len(seen) == 1 and all(p.startswith("bright. ") and p.removeprefix("bright. ") in PROMPTS for p in seen[0])
    assert "reward_invert" not in history[0]


# ------------------------------------------------------------------------------------------- ReFL
def test_refl_estimate_is_x_minus_sigma_v_at_the_sampled_late_step(tmp_path):
    trainer = make_trainer(tmp_path, "refl", rollout_steps=8)
    assert trainer.config.refl_steps() == [6, 7]
    transformer = trainer.pipe.transformer
    seen_indices = set()
    inputs, scored = [], []

    def capture(module, args, kwargs, output):
        if torch.is_grad_enabled():
            inputs.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone(), output[0].detach().clone()))

    handle = transformer.register_forward_hook(capture, with_kwargs=True)
    reward = trainer.reward
    trainer.reward = CallableReward(lambda images, prompts: (scored.append(images.detach().clone()), reward(images, prompts))[1])
    for step in range(6):
        inputs.clear()
        scored.clear()
        trainer.training_step(step).losses["refl"]()

        assert len(inputs) == 1, "ReFL takes exactly one transformer forward with gradient"
        latents, timestep, velocity = inputs[0]
        index = trainer.late_step_index(step)
        seen_indices.add(index)
        assert float(timestep[0]) == float(trainer.rollout_sigmas[index])
        # The independent reference: the rollout stepped by hand to that step, then x - sigma * v in float64.
        with torch.no_grad():
            text = trainer.text_for([trainer.prompts[i] for i in trainer.indices_for_step(step)])
            noise = trainer.adapter.make_noise(1, SIZE, SIZE, trainer.generator(step, 1, False), "cpu", torch.float32)
            expected_latents = noise
            for s, s_next in zip(trainer.rollout_sigmas[:index], trainer.rollout_sigmas[1 : index + 1], strict=True):
                v = trainer.adapter.predict_velocity(transformer, expected_latents, s, text, 1.0, SIZE, SIZE)
                expected_latents = expected_latents + (s_next - s) * v
            torch.testing.assert_close(latents, expected_latents, rtol=0, atol=0)
            x0 = latents.double() - float(timestep[0]) * velocity.double()
            expected_images = trainer.adapter.decode(x0.float(), SIZE, SIZE)
        torch.testing.assert_close(scored[0], expected_images, rtol=0, atol=1e-6)
    handle.remove()
    assert seen_indices == {6, 7}, "the late step is drawn from the whole window"


def test_a_reward_above_the_hinge_threshold_is_warned_about_and_logged(tmp_path, caplog):
    """A reward on another scale (aesthetic ~5) is above the default threshold 0.7: nothing would train."""
    from diffusers_srpo.trainers.base import HINGE_PATIENCE

    high = CallableReward(lambda images, prompts: 5.0 + images.mean(dim=(1, 2, 3)))
    with caplog.at_level("WARNING", logger="diffusers_srpo.trainers.base"):
        history = make_trainer(tmp_path, "refl", reward=high, max_train_steps=HINGE_PATIENCE + 2).train()
    assert all(h["hinge_active"] == 0.0 and h["loss"] == 0.0 for h in history)
    warnings = [r.message for r in caplog.records if "above hinge_threshold=0.7" in r.message]
    assert len(warnings) == 1, warnings  # once, after HINGE_PATIENCE updates in a row
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffusers_srpo.trainers.base"):
        history = make_trainer(tmp_path, "refl", name="raised", reward=high, hinge_threshold=10.0).train()
    assert history[0]["hinge_active"] == 1.0 and history[0]["loss"] > 0
    assert not any("hinge_threshold" in r.message for r in caplog.records)


@pytest.mark.parametrize("method", ["srpo", "draft", "tailorpo"])
def test_full_fine_tune_of_bf16_weights_without_autocast(tmp_path, method):
    """The master weights become fp32, and the transformer's inputs follow them (they stayed bf16 before)."""
    pipe = tiny_flux_pipeline(seed=0)
    pipe.transformer.to(torch.bfloat16)
    trainer = make_trainer(tmp_path, method, pipe=pipe, use_lora=False, max_train_steps=1, learning_rate=1e-4)
    assert trainer.weight_dtype == torch.float32
    history = trainer.train()
    assert torch.isfinite(torch.tensor(history[0]["loss"]))


def test_plain_reward_methods_refuse_an_srp_reward(tmp_path):
    from diffusers_srpo.rewards import SemanticRelativeReward

    srp = SemanticRelativeReward(tiny_clip_reward(seed=0))
    for method in ("direct-align", "refl", "draft", "tailorpo"):
        with pytest.raises(TypeError, match=f"method '{method}' uses a plain reward: pass its .base"):
            make_trainer(tmp_path, method, reward=srp)
    assert not (tmp_path / "run").exists()


def test_the_shared_base_config_names_no_method():
    from diffusers_srpo.trainers import TrainerConfig

    assert TrainerConfig().method == ""  # a building block for a custom trainer


# ------------------------------------------------------------------------------------------- DRaFT-K
@pytest.mark.parametrize("draft_k", [1, 2, 0])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_draft_gradient_flows_through_exactly_the_last_k_steps(tmp_path, draft_k, checkpointing):
    trainer = make_trainer(tmp_path, "draft", draft_k=draft_k, gradient_checkpointing=checkpointing)
    k = draft_k or ROLLOUT_STEPS
    recorder = ForwardRecorder(trainer.pipe.transformer)
    output = trainer.training_step(0)
    assert recorder.with_grad == 0 and len(recorder.records) == ROLLOUT_STEPS - k  # the rollout: no gradient
    loss = output.losses["draft"]()
    assert recorder.with_grad == k and len(recorder.records) == ROLLOUT_STEPS
    loss.backward()
    recorder.remove()
    # Every step with gradient receives one; a checkpointed step runs its forward again in the backward pass.
    assert recorder.gradients_received == k
    assert len(recorder.records) == ROLLOUT_STEPS + (k if checkpointing else 0)
    grads = [p.grad for p in trainer.trainable_parameters]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_draft_full_chain_gradient_is_the_same_with_and_without_checkpointing(tmp_path):
    gradients = []
    for checkpointing in (False, True):
        trainer = make_trainer(tmp_path, "draft", name=f"ckpt-{checkpointing}", draft_k=0, gradient_checkpointing=checkpointing)
        trainer.training_step(0).losses["draft"]().backward()
        gradients.append([p.grad.clone() for p in trainer.trainable_parameters])
    assert sum(g.abs().sum() for g in gradients[0]) > 0
    for plain, checkpointed in zip(*gradients, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-9)


def test_draft_one_step_is_refl_at_the_last_step(tmp_path):
    """At the last step the Euler step to sigma 0 IS the one-step estimate x - sigma v: same loss, same gradient."""
    draft = make_trainer(tmp_path, "draft", name="draft", draft_k=1)
    refl = make_trainer(tmp_path, "refl", name="refl", refl_window_start=0.75, refl_window_end=1.0)
    assert refl.late_step_index(0) == ROLLOUT_STEPS - 1
    losses = []
    for trainer in (draft, refl):
        (loss_fn,) = trainer.training_step(0).losses.values()
        loss = loss_fn()
        loss.backward()
        losses.append((loss.item(), [p.grad for p in trainer.trainable_parameters]))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    for a, b in zip(losses[0][1], losses[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    make_trainer(tmp_path, "refl", name="shared", max_train_steps=1, checkpointing_steps=1).train()
    with pytest.raises(ValueError, match="written by method 'refl'"):  # refused before any model work
        make_trainer(tmp_path, "draft", name="shared", max_train_steps=2, resume_from_checkpoint="latest")


def test_baseline_resume_is_bit_identical(tmp_path):
    straight = make_trainer(tmp_path, "draft", name="straight", draft_k=2, max_train_steps=4)
    straight.train()
    make_trainer(tmp_path, "draft", name="split", draft_k=2, max_train_steps=2, checkpointing_steps=2).train()
    resumed = make_trainer(tmp_path, "draft", name="split", draft_k=2, max_train_steps=4, resume_from_checkpoint="latest")
    resumed.train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for a, b in zip(straight.trainable_parameters, resumed.trainable_parameters, strict=True):
        assert torch.equal(a, b)


def test_trainers_are_exported():
    import diffusers_srpo

    for name in ("ReFLTrainer", "DRaFTTrainer", "TailorPOTrainer", "TailorPOConfig", "ReFLConfig", "DRaFTConfig"):
        assert hasattr(diffusers_srpo, name), name
    assert ReFLTrainer.config_class is ReFLConfig and DRaFTTrainer.config_class is DRaFTConfig
    assert SRPOTrainer.config_class is SRPOConfig
