"""FLUX.1's adapter against the stock ``FluxPipeline``: the Euler rollout along the stock sigmas reproduces
``__call__`` (the timestep and distilled-guidance conventions), and the decode path is the pipeline's.
(The trainers are tested on FLUX.1 in depth by the trainer tests.)"""

import pytest
import torch
from stock_parity import euler_rollout, stock_call

from diffusers_srpo.models import FluxAdapter, get_model_adapter
from diffusers_srpo.testing import tiny_flux_pipeline

SIZE = 32
STEPS = 4
MAX_LEN = 16
PROMPTS = ["a red circle", "a blue square"]

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter(pipe):
    return get_model_adapter(pipe)


def stock(pipe, adapter, noise, guidance, output_type="latent"):
    return stock_call(pipe, adapter, noise, guidance, PROMPTS, SIZE, STEPS, MAX_LEN, output_type)


def adapter_rollout(adapter, noise, text, guidance, sigma_scale=1.0):
    return euler_rollout(adapter, noise, text, guidance, SIZE, STEPS, sigma_scale)


def test_adapter_settings(adapter):
    assert type(adapter) is FluxAdapter and adapter.guidance_kind == "distilled" and adapter.negative_prompt is None
    # SPEC 1: distilled guidance 1.0 in the rollout, 3.5 in Direct-Align's training forward.
    assert (adapter.default_rollout_guidance, adapter.default_train_guidance) == (1.0, 3.5)
    assert adapter.default_max_sequence_length == 512 and adapter.default_direct_align_shift == 3.0


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_euler_rollout_reproduces_the_stock_pipeline(pipe, adapter, guidance):
    text = adapter.encode_prompts(PROMPTS, "cpu", MAX_LEN)
    noise = adapter.make_noise(len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(0), "cpu", torch.float32)
    expected = stock(pipe, adapter, noise, guidance)  # FluxPipeline's latent output: the packed final latents
    latents = adapter_rollout(adapter, noise, text, guidance)
    assert pipe.scheduler.sigmas.tolist() == adapter.stock_sigmas(STEPS, SIZE, SIZE).tolist()
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    # A timestep off by 1000, or the other guidance, is far outside the tolerance.
    assert (adapter_rollout(adapter, noise, text, guidance, sigma_scale=1e-3) - latents).abs().max() > 1e-2
    other = 1.0 if guidance != 1.0 else 3.5
    assert (adapter_rollout(adapter, noise, text, other) - latents).abs().max() > 1e-3
    # The decode path is the pipeline's: the same final latents give its images.
    images = stock(pipe, adapter, noise, guidance, output_type="pt")
    torch.testing.assert_close(adapter.decode(latents, SIZE, SIZE), images, rtol=0, atol=1e-5)
