"""What TailorPO's and GRPO's trainers share with every trainer: their sampled images (validation grids, the
comparison's evaluations) come from the base trainer's ODE sampler, not from their SDE policy's velocity."""

import pytest
import torch

from diffusers_srpo.rewards import CallableReward
from diffusers_srpo.testing import tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers import trainer_class_for

PROMPTS = ["a red circle", "a blue square"]


def brightness(images, prompts):
    return images.float().mean(dim=(1, 2, 3))


def make_trainer(tmp_path, method, pipe, **overrides):
    config = tiny_trainer_config(method, tmp_path / method, **overrides)
    return trainer_class_for(method)(pipe, reward=CallableReward(brightness), prompts=PROMPTS, config=config)


@pytest.mark.parametrize("method", ["tailorpo", "grpo"])
def test_sde_policy_trainers_sample_validation_images_as_every_trainer(tmp_path, method):
    trainer = make_trainer(tmp_path, method, tiny_flux_pipeline(seed=0), validation_prompts=PROMPTS)
    images = trainer.generate_images(PROMPTS, seed=3)
    # ReFL's trainer is a plain BaseTrainer sampler; both LoRAs start as the identity on the same weights.
    reference = make_trainer(tmp_path, "refl", tiny_flux_pipeline(seed=0)).generate_images(PROMPTS, seed=3)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-6)
    path = trainer.save_validation_grid()
    assert path is not None and path.endswith("step-000000.png")
