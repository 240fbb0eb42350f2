"""Trackers that really write, and evaluation on held-out prompts during training.

A run with ``log_with="tensorboard"`` writes an event file that tensorboard's own reader gives back: the loss, the
reward and the learning rate at every update, ``eval_reward`` before the first update and every ``eval_steps``.
``eval_reward`` before training equals the plain reward of the stock pipeline's images of the same prompts from the
same noise (computed here without the trainer).
"""

import glob

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_srpo import SRPOTrainer
from diffusers_srpo.models import get_model_adapter
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
HELD_OUT = ["a purple star", "an orange moon", "a white cross"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def read_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # One run folder: its event file holds the scalars (a subfolder holds the hyper-parameters).
    (event_file,) = glob.glob(f"{log_dir}/*/events.out.tfevents.*")
    events = EventAccumulator(event_file)
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def stock_eval_reward(config) -> float:
    """The mean plain reward of the held-out prompts, each sampled by the stock FluxPipeline from the trainer's
    evaluation noise (validation_seed + index) along the rollout schedule (passed as explicit sigmas to an
    unshifted scheduler, so that the pipeline shifts nothing again)."""
    pipe = tiny_flux_pipeline(seed=0)
    adapter = get_model_adapter(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    times = torch.linspace(1, 0, config.rollout_steps + 1, dtype=torch.float64)
    sigmas = (3 * times / (1 + 2 * times))[:-1].tolist()
    reward = tiny_clip_reward(seed=0)
    scores = []
    for index, prompt in enumerate(HELD_OUT):
        generator = torch.Generator().manual_seed(config.validation_seed + index)
        noise = adapter.make_noise(1, config.resolution, config.resolution, generator, "cpu", torch.float32)
        image = pipe(
            prompt, height=config.resolution, width=config.resolution, sigmas=sigmas, num_inference_steps=len(sigmas),
            latents=noise, output_type="pt", **adapter.pipeline_call_kwargs(config.rollout_guidance, config.max_sequence_length),
        ).images  # fmt: skip
        with torch.no_grad():
            scores.append(reward(image, [prompt]).item())
    return sum(scores) / len(scores)


def test_tensorboard_holds_the_logged_scalars_and_the_held_out_reward_at_their_steps(tmp_path):
    config = tiny_trainer_config(
        "srpo", tmp_path / "run", max_train_steps=4, log_with="tensorboard", eval_prompts=HELD_OUT, eval_steps=2
    )
    trainer = SRPOTrainer(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)
    history = trainer.train()
    scalars = read_scalars(tmp_path / "run" / "logs")

    for key in ("loss", "reward", "lr", "grad_norm"):
        assert sorted(scalars[key]) == [1, 2, 3, 4], key
        for step, logs in enumerate(history, start=1):
            assert scalars[key][step] == pytest.approx(logs[key], rel=1e-6), (key, step)
    assert sorted(scalars["eval_reward"]) == [0, 2, 4]
    assert [("eval_reward" in logs) for logs in history] == [False, True, False, True]
    assert scalars["eval_reward"][4] == pytest.approx(history[3]["eval_reward"], rel=1e-6)
    # Before training the model is the base: its held-out reward is the stock pipeline's.
    assert scalars["eval_reward"][0] == pytest.approx(stock_eval_reward(trainer.config), abs=1e-5)
    assert scalars["eval_reward"][4] != scalars["eval_reward"][0]


def test_the_held_out_reward_is_the_plain_base_not_srp(tmp_path):
    config = tiny_trainer_config("srpo", tmp_path / "run", max_train_steps=1, eval_prompts=HELD_OUT[:1], eval_steps=1)
    trainer = SRPOTrainer(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)
    assert type(trainer.reward).__name__ == "SemanticRelativeReward"
    assert trainer.plain_reward is trainer.reward.base


def test_eval_steps_without_eval_prompts_is_refused():
    with pytest.raises(ValueError, match="eval_steps=5 needs eval_prompts"):
        tiny_trainer_config("srpo", "out", eval_steps=5)
