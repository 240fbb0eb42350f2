"""Non-finite updates: skipped without touching the weights, counted, warned, and a stop after too many in a row."""

import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusers_srpo import NonFiniteUpdatesError, SRPOConfig
from diffusers_srpo.rewards import CallableReward
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers import METHODS

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
POISONED_UPDATE = 2  # the third update (0-based step)
STEPS = 4


class Poison:
    """Adds ``value`` to the first sample's score during the updates it is armed for (``steps``; None: all)."""

    def __init__(self, value: float, steps: set[int] | None):
        self.value, self.steps, self.trainer = value, steps, None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        trainer = self.trainer  # unset while the trainer checks the reward at construction
        if trainer is None or (self.steps is not None and trainer.global_step not in self.steps):
            return scores
        return scores + torch.tensor([self.value] + [0.0] * (len(scores) - 1))


def poisoned_reward(method: str, poison: Poison | None):
    if method == "srpo":
        # SRP needs a CLIP-like reward: poison the image features of the first sample.
        reward = tiny_clip_reward(seed=0)
        if poison is not None:
            base_class = type(reward)

            class PoisonedCLIP(base_class):
                def encode_image(self, images):
                    features = super().encode_image(images)
                    return features + poison(torch.zeros(len(features)))[:, None]

            reward.__class__ = PoisonedCLIP
        return reward
    # The brightness of the image: differentiable, and it needs no model.
    return CallableReward(lambda images, prompts: (poison or (lambda s: s))(images.mean(dim=(1, 2, 3))))


def make_trainer(tmp_path, method, name, poison=None, trainer_class=None, **overrides):
    trainer_class = trainer_class or METHODS[method]
    config = tiny_trainer_config(method, tmp_path / name, **{"max_train_steps": STEPS, **overrides})
    trainer = trainer_class(tiny_flux_pipeline(seed=0), reward=poisoned_reward(method, poison), prompts=PROMPTS, config=config)
    if poison is not None:
        poison.trainer = trainer
    return trainer


def skipping(trainer_class, skipped_step):
    """The reference: a trainer whose loop never runs ``skipped_step`` (its number is used up all the same)."""

    class Skipping(trainer_class):
        def _iterate_steps(self):
            yield from (step for step in super()._iterate_steps() if step != skipped_step)

    return Skipping


def lora(directory):
    return load_file(os.path.join(directory, "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("method", list(METHODS))
def test_a_non_finite_reward_for_one_sample_skips_exactly_that_update(tmp_path, method, caplog):
    reference = make_trainer(tmp_path, method, "reference", trainer_class=skipping(METHODS[method], POISONED_UPDATE))
    reference.train()
    expected = lora(tmp_path / "reference")
    untrained = make_trainer(tmp_path, method, "untrained", max_train_steps=1)
    before = {n: p.detach().clone() for n, p in untrained.pipe.transformer.named_parameters() if "lora_B" in n}

    for value in (math.nan, math.inf):
        name = f"poisoned-{value}"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffusers_srpo.trainers.base"):
            history = make_trainer(tmp_path, method, name, poison=Poison(value, {POISONED_UPDATE})).train()
        written = lora(tmp_path / name)
        assert written.keys() == expected.keys()
        for key in expected:
            assert torch.isfinite(written[key]).all(), key
            assert torch.equal(written[key], expected[key]), f"{method}, {value}: {key}"
        assert [h["skipped_updates"] for h in history] == [0, 0, 1, 1]
        skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert len(skips) == 1 and skips[0].startswith(f"update {POISONED_UPDATE + 1} of {STEPS} skipped"), skips
        # SRP normalises the image features, so an infinite feature scores NaN.
        assert ("inf" if math.isinf(value) and method != "srpo" else "nan") in skips[0]
    # The training moved the LoRA: the comparison above is not between two untrained LoRAs.
    moved = [k for k in expected if "lora_B" in k and expected[k].abs().max() > 0]
    assert moved and all(before_value.abs().max() == 0 for before_value in before.values())


def test_the_reason_names_the_non_finite_micro_step_loss(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusers_srpo.trainers.base"):
        make_trainer(tmp_path, "srpo", "run", poison=Poison(math.nan, {1}), max_train_steps=2).train()
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "loss of 'denoise' (nan)" in message and "loss of 'invert' (nan)" in message
    assert "reward_denoise (nan)" in message


class NaNGradient(torch.autograd.Function):
    """The identity forward, a NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, scores):
        return scores.clone()

    @staticmethod
    def backward(ctx, gradient):
        return gradient * math.nan


def test_non_finite_gradients_alone_are_caught_with_clipping_off(tmp_path, caplog):
    armed = {"trainer": None}

    def reward(images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        trainer = armed["trainer"]
        return NaNGradient.apply(scores) if trainer is not None and trainer.global_step == 1 else scores

    config = tiny_trainer_config("direct-align", tmp_path / "run", max_train_steps=3, max_grad_norm=0.0)
    trainer = METHODS["direct-align"](tiny_flux_pipeline(seed=0), reward=CallableReward(reward), prompts=PROMPTS, config=config)
    armed["trainer"] = trainer
    with caplog.at_level(logging.WARNING, logger="diffusers_srpo.trainers.base"):
        history = trainer.train()
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert message.endswith("not finite: grad_norm (nan)")
    assert math.isfinite(history[1]["loss"]) and [h["skipped_updates"] for h in history] == [0, 1, 1]
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in (history[0], history[2]))


def test_a_reward_that_is_always_nan_stops_with_a_checkpoint_of_the_last_good_state(tmp_path):
    trainer = make_trainer(
        tmp_path, "direct-align", "run", poison=Poison(math.nan, None), max_train_steps=20, max_consecutive_skips=3
    )
    initial = {n: p.detach().clone() for n, p in trainer.pipe.transformer.named_parameters() if "lora_" in n}
    with pytest.raises(NonFiniteUpdatesError, match=r"3 updates in a row .*max_consecutive_skips=3") as caught:
        trainer.train()
    out = tmp_path / "run"
    assert caught.value.checkpoint == str(out / "checkpoint-3") and caught.value.step == 3
    assert len(str(caught.value).splitlines()) == 1
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "a stopped run must not look finished"
    saved = lora(out / "checkpoint-3")
    assert len(saved) == len(initial)
    for name, value in initial.items():
        key = "transformer." + name.replace(".default", "")
        assert torch.equal(saved[key], value), key  # no update reached the weights
    assert [h["skipped_updates"] for h in trainer.history] == [1, 2, 3]

    # The checkpoint resumes; with a sane reward the run finishes.
    resumed = make_trainer(tmp_path, "direct-align", "run", max_train_steps=5, resume_from_checkpoint="latest")
    history = resumed.train()
    assert resumed.global_step == 5 and history[-1]["skipped_updates"] == 3
    assert all(math.isfinite(h["loss"]) for h in history[3:])


def test_a_skip_counts_as_an_update_for_the_learning_rate_schedule(tmp_path):
    trainer = make_trainer(
        tmp_path, "direct-align", "run", poison=Poison(math.nan, {1}), lr_scheduler="linear", learning_rate=1e-2
    )
    history = trainer.train()
    assert [h["lr"] for h in history] == pytest.approx([1e-2 * (1 - k / STEPS) for k in range(1, STEPS + 1)])


def test_non_finite_weights_are_never_written(tmp_path):
    trainer = make_trainer(tmp_path, "direct-align", "run", max_train_steps=1)
    trainer.train()
    out = tmp_path / "run"
    files = sorted(os.listdir(out))
    good = (out / "pytorch_lora_weights.safetensors").read_bytes()
    parameter = next(p for n, p in trainer.pipe.transformer.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        parameter[0, 0] = math.inf
    for write in (trainer.save_outputs, trainer.save_checkpoint):
        with pytest.raises(ValueError, match=r"refusing to write the trained weights: 1 of \d+ trained tensors"):
            write()
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == good
    assert sorted(os.listdir(out)) == files


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_setting_rejects_non_finite_values(value):
    import typing
    from dataclasses import fields

    from diffusers_srpo.trainers.config import TrainerConfig

    checked = 0
    for config_class in {trainer.config_class for trainer in METHODS.values()} | {TrainerConfig}:
        hints = typing.get_type_hints(config_class)
        for item in fields(config_class):
            if hints[item.name] in (float, float | None):
                with pytest.raises(ValueError, match=rf"^{item.name} must be a finite number, got {value}$"):
                    config_class(**{item.name: value})
                checked += 1
    assert checked >= 50  # every float field of the five config classes
    assert SRPOConfig(hinge_threshold=2).hinge_threshold == 2  # an int is a number
