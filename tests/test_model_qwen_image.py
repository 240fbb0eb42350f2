"""The Qwen-Image adapter against the stock ``QwenImagePipeline`` on the tiny, offline Qwen-Image-shaped pipeline:
sampler parity (timestep convention, true CFG with its norm rescale), the schedule, the VAE path, LoRA files, the
padded text conditioning, save/reload, and one SRPO run."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_srpo.models import QwenImageAdapter, get_model_adapter
from diffusers_srpo.models.qwen_image import QwenImageConditioning
from diffusers_srpo.testing import tiny_clip_reward, tiny_trainer_config
from diffusers_srpo.testing.qwen_image import (
    QWEN_IMAGE_LATENTS_MEAN,
    QWEN_IMAGE_LATENTS_STD,
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QWEN_IMAGE_TRANSFORMER_CONFIG,
    qwen_image_shaped_pipeline,
    tiny_qwen_image_pipeline,
)

SIZE = 32
MAX_LEN = 16
# Latents of the parity test: their entries are of size 5.
ATOL = 1e-5
SHORT, LONG = "a red circle", "a photo of a dog in the city at night"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_qwen_image_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter(pipe):
    return get_model_adapter(pipe)


def _noise(adapter, batch_size, seed=0):
    return adapter.make_noise(batch_size, SIZE, SIZE, torch.Generator().manual_seed(seed), "cpu", torch.float32)


def _velocity(adapter, x, sigma, text, guidance):
    return adapter.predict_velocity(adapter.transformer, x, sigma, text, guidance, SIZE, SIZE)


def _euler(adapter, noise, text, guidance, sigmas, velocity=None):
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = velocity(x, sigma) if velocity else _velocity(adapter, x, sigma, text, guidance)
        x = x + (sigma_next - sigma) * v
    return x


def test_adapter_is_picked_with_the_family_defaults(pipe, adapter):
    assert type(adapter) is QwenImageAdapter and adapter.name == "qwen-image"
    assert adapter.guidance_kind == "cfg" and adapter.negative_prompt == ""
    assert (adapter.default_rollout_guidance, adapter.default_train_guidance) == (4.0, 1.0)
    assert adapter.default_max_sequence_length == 1024
    assert adapter.size_multiple == 2 * pipe.vae_scale_factor == 8
    kwargs = {"true_cfg_scale": 4.0, "negative_prompt": "", "max_sequence_length": 16}
    assert adapter.pipeline_call_kwargs(4.0, 16) == kwargs
    assert adapter.pipeline_call_kwargs(1.0, None) == {"true_cfg_scale": 1.0}
    blurry = get_model_adapter(pipe, negative_prompt="blurry")
    assert blurry.pipeline_call_kwargs(None, None) == {"negative_prompt": "blurry"}


def test_tiny_tokenizer_makes_the_system_prompt_the_34_dropped_tokens(pipe):
    """encode_prompt drops the template's first 34 tokens (the real tokenizer's system prompt): the tiny tokenizer
    makes exactly those, so the embeddings are the prompt's 3 tokens and the template's 5 closing ones."""
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    embeds, mask = pipe.encode_prompt([SHORT], device="cpu")
    assert embeds.shape == (1, 3 + 5, 32) and mask is None


@pytest.mark.parametrize("prompts", [[SHORT], [SHORT, LONG]], ids=["one", "two-lengths"])
@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["cfg-off", "cfg-on"])
def test_euler_rollout_reproduces_the_stock_pipeline(pipe, adapter, guidance, prompts):
    """The adapter's Euler rollout along stock_sigmas equals ``QwenImagePipeline.__call__`` from the same latents
    (max abs difference 0 with CFG off, about 1e-6 with it on, on latents of size 5); a timestep given in [0, 1000]
    or CFG without the per-token norm rescale would be off by more than 100 times the tolerance."""
    steps = 4
    text = adapter.encode_prompts(prompts, "cpu", MAX_LEN)
    noise = _noise(adapter, len(prompts))
    sigmas = adapter.stock_sigmas(steps, SIZE, SIZE)
    ours = _euler(adapter, noise, text, guidance, sigmas)
    stock = pipe(
        prompt=prompts,
        latents=noise,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        output_type="latent",
        **adapter.pipeline_call_kwargs(guidance, MAX_LEN),
    ).images
    assert ours.abs().max() > 1
    torch.testing.assert_close(ours, stock, rtol=0, atol=ATOL)

    timestep_times_1000 = _euler(
        adapter, noise, text, guidance, sigmas, lambda x, s: _velocity(adapter, x, s * 1000, text, guidance)
    )
    assert (timestep_times_1000 - stock).abs().max() > 100 * ATOL
    if guidance > 1:
        negative = dataclasses.replace(
            text, prompt_embeds=text.negative_prompt_embeds, prompt_embeds_mask=text.negative_prompt_embeds_mask
        )

        def unrescaled(x, s):
            conditional = _velocity(adapter, x, s, text, 1.0)
            unconditional = _velocity(adapter, x, s, negative, 1.0)
            return unconditional + guidance * (conditional - unconditional)

        assert (_euler(adapter, noise, text, guidance, sigmas, unrescaled) - stock).abs().max() > 100 * ATOL


def test_noise_is_the_pipelines_own_draw(pipe, adapter):
    """make_noise draws what prepare_latents draws from the same CPU generator: (B, 1, 16, h, w), packed 2x2."""
    expected = pipe.prepare_latents(2, 16, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(7))
    assert torch.equal(_noise(adapter, 2, seed=7), expected)
    assert expected.shape == (2, (SIZE // 8) ** 2, 64)


@pytest.mark.parametrize("steps,size", [(4, SIZE), (26, 720), (50, 1328)])
def test_stock_sigmas_follow_the_pipelines_shift(adapter, steps, size):
    """linspace(1, 1/n, n), shifted exponentially with mu from the token count (calculate_shift with the scheduler
    config's 256/8192/0.5/0.9), stretched to end at shift_terminal 0.02, then 0: a float64 reference."""
    assert adapter.pipe.scheduler.config.shift_terminal == QWEN_IMAGE_SCHEDULER_CONFIG["shift_terminal"] == 0.02
    tokens = (size // adapter.vae_scale_factor // 2) ** 2
    slope = (0.9 - 0.5) / (8192 - 256)
    mu = tokens * slope + 0.5 - slope * 256
    t = np.linspace(1.0, 1 / steps, steps)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))
    expected = np.append(stretched, 0.0)
    sigmas = adapter.stock_sigmas(steps, size, size)
    assert sigmas.dtype == torch.float32 and sigmas[-2].item() == pytest.approx(0.02)
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=0, atol=1e-6)


def test_decode_matches_the_pipelines_output_and_encode_inverts_the_scaling(pipe, adapter):
    """decode(latents) is the stock output_type="pt" image of those latents (a step callback makes them the
    pipeline's final latents); encode_images is the VAE posterior mode, normalised by the latent statistics and
    packed, so to_vae_input(encode_images(x)) is that mode again."""
    latents = _noise(adapter, 2, seed=3)

    def replace_latents(_pipe, _step, _t, kwargs):
        return {"latents": latents}

    stock = pipe(
        prompt=[SHORT, LONG],
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        true_cfg_scale=1.0,
        max_sequence_length=MAX_LEN,
        output_type="pt",
        callback_on_step_end=replace_latents,
    ).images
    images = adapter.decode(latents, SIZE, SIZE)
    assert images.shape == (2, 3, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, stock, rtol=0, atol=1e-6)

    encoded = adapter.encode_images(images)
    assert encoded.shape == latents.shape
    mode = pipe.vae.encode(images[:, :, None] * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(adapter.to_vae_input(encoded, SIZE, SIZE), mode, rtol=1e-5, atol=1e-5)
    mean = torch.tensor(QWEN_IMAGE_LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(QWEN_IMAGE_LATENTS_STD).view(1, 16, 1, 1, 1)
    normalised = ((mode - mean) / std)[:, :, 0]
    packed = normalised.view(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)
    torch.testing.assert_close(encoded, packed, rtol=1e-5, atol=1e-6)


def test_decode_is_differentiable(adapter):
    latents = _noise(adapter, 1).requires_grad_(True)
    adapter.decode(latents, SIZE, SIZE).mean().backward()
    assert latents.grad is not None and latents.grad.abs().max() > 0


def test_recover_vae_input_matches_a_float64_reference(adapter):
    """x0 = (x + (s_to - s_from) v - s_to eps) / (1 - s_to), unpacked to (B, 16, 1, h, w), times std plus mean."""
    generator = torch.Generator().manual_seed(11)
    velocity, sample, noise = (torch.randn(2, 16, 64, generator=generator) for _ in range(3))
    sigma_from, sigma_to = torch.tensor([0.9, 0.6]), torch.tensor([0.7, 0.3])
    recovered = adapter.recover_vae_input(velocity, sample, sigma_from, sigma_to, noise, SIZE, SIZE)

    v, x, eps = velocity.double(), sample.double(), noise.double()
    s_from, s_to = sigma_from.double().view(2, 1, 1), sigma_to.double().view(2, 1, 1)
    x0 = (x + (s_to - s_from) * v - s_to * eps) / (1 - s_to)
    # Token (i, j) holds channels c of the 2x2 patch (di, dj) at index 4c + 2di + dj.
    unpacked = x0.view(2, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 1, 8, 8)
    mean = torch.tensor(QWEN_IMAGE_LATENTS_MEAN, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(QWEN_IMAGE_LATENTS_STD, dtype=torch.float64).view(1, 16, 1, 1, 1)
    expected = unpacked * std + mean
    assert recovered.shape == (2, 16, 1, 8, 8)
    torch.testing.assert_close(recovered.double(), expected, rtol=1e-6, atol=1e-5)


def test_lora_targets_exist_and_saved_loras_load_with_the_stock_pipeline(adapter, tmp_path):
    """Every default target wraps modules of the tiny transformer (the image stream's attention, never add_*); the
    LoRA written by save_lora_weights loads with QwenImagePipeline.load_lora_weights into a fresh pipeline and gives
    the trained transformer's outputs; lora_state_dict_for_transformer reads back the peft state."""
    tuned = tiny_qwen_image_pipeline(seed=0)
    transformer = tuned.transformer
    targets = list(adapter.lora_target_modules)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        transformer.add_adapter(config)
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.5)
    wrapped = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    for target in adapter.lora_target_modules:
        assert sum(name.endswith(f".{target}") for name in wrapped) == transformer.config.num_layers, target
    assert not any("add_" in name or "to_add_out" in name for name in wrapped)

    state = get_peft_model_state_dict(transformer)
    get_model_adapter(tuned).save_lora_weights(str(tmp_path), state, transformer.peft_config["default"].to_dict())
    read = adapter.lora_state_dict_for_transformer(str(tmp_path))
    assert read.keys() == state.keys() and all(torch.equal(read[key], state[key]) for key in state)

    fresh = tiny_qwen_image_pipeline(seed=0)
    text = adapter.encode_prompts([SHORT], "cpu", MAX_LEN)
    latents = _noise(adapter, 1)
    base = adapter.predict_velocity(fresh.transformer, latents, torch.tensor(0.6), text, 4.0, SIZE, SIZE)
    fresh.load_lora_weights(str(tmp_path))
    loaded = adapter.predict_velocity(fresh.transformer, latents, torch.tensor(0.6), text, 4.0, SIZE, SIZE)
    trained = adapter.predict_velocity(transformer, latents, torch.tensor(0.6), text, 4.0, SIZE, SIZE)
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)


def test_conditioning_select_trims_and_cat_pads_without_changing_the_model_output(adapter):
    """A batch's padding (masked zeros) is cut by select and put back by cat: cat(select(i) for i) is the batch,
    a prompt's conditioning does not depend on the batch it was encoded in, and the transformer's output for the
    short prompt is the same alone and padded in a batch with a longer one (CFG on, so both text streams count)."""
    prompts = [SHORT, LONG, "a cat"]
    text = adapter.encode_prompts(prompts, "cpu", MAX_LEN)
    assert text.prompt_embeds_mask.dtype == torch.long
    assert text.prompt_embeds_mask[0].sum() < text.prompt_embeds.shape[1]
    items = [text.select(i) for i in range(3)]
    for item, mask in zip(items, text.prompt_embeds_mask, strict=True):
        assert item.prompt_embeds.shape[1] == item.prompt_embeds_mask.sum() == mask.sum()
    joined = QwenImageConditioning.cat(items)
    for name in ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"):
        assert torch.equal(getattr(joined, name), getattr(text, name)), name

    alone = adapter.encode_prompts([SHORT], "cpu", MAX_LEN).select(0)
    assert alone.prompt_embeds.shape == items[0].prompt_embeds.shape
    torch.testing.assert_close(alone.prompt_embeds, items[0].prompt_embeds, rtol=0, atol=1e-5)

    short_first = QwenImageConditioning.cat([alone, items[1]])
    assert short_first.prompt_embeds.shape[1] == items[1].prompt_embeds.shape[1] > alone.prompt_embeds.shape[1]
    assert short_first.prompt_embeds[0, alone.prompt_embeds.shape[1] :].abs().max() == 0
    latents = _noise(adapter, 2)
    sigma = torch.tensor(0.7)
    batched = _velocity(adapter, latents, sigma, short_first.to(dtype=torch.float32), 4.0)
    single = _velocity(adapter, latents[:1], sigma, alone, 4.0)
    torch.testing.assert_close(batched[:1], single, rtol=0, atol=1e-5)


def test_saves_and_reloads_offline(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "qwen")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "qwen", local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded).__name__ == "QwenImagePipeline"
    text = pipe.prompt_template_encode.format(LONG)
    assert reloaded.tokenizer(text).input_ids == pipe.tokenizer(text).input_ids

    def generate(p):
        return p(
            prompt=SHORT,
            negative_prompt="",
            true_cfg_scale=4.0,
            height=SIZE,
            width=SIZE,
            num_inference_steps=2,
            max_sequence_length=MAX_LEN,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    assert torch.equal(generate(reloaded), generate(pipe))


def test_shaped_pipeline_has_the_real_widths_in_fake_tensors():
    """Built in fake tensor mode: Qwen-Image's published transformer (20.43B parameters at 60 blocks, as the
    published bf16 shards hold) and VAE, and a text encoder 3584 wide with real weights (encode_prompt's masked token
    selection needs real hidden states)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from diffusers_srpo.simulation import simulated_tensors

    with simulated_tensors():
        one, two = (qwen_image_shaped_pipeline(num_layers=n) for n in (1, 2))
    counts = [sum(p.numel() for p in pipe.transformer.parameters()) for pipe in (one, two)]
    per_block = counts[1] - counts[0]
    assert counts[0] + (QWEN_IMAGE_TRANSFORMER_CONFIG["num_layers"] - 1) * per_block == 20_430_401_088
    assert one.transformer.dtype == torch.bfloat16 and one.text_encoder.config.text_config.hidden_size == 3584
    assert one.vae.config.z_dim == 16 and one.vae_scale_factor == 8
    assert isinstance(one.transformer.proj_out.weight, FakeTensor)
    assert not any(isinstance(p, FakeTensor) for p in one.text_encoder.parameters())


def test_srpo_trains_the_lora(tmp_path):
    from safetensors.torch import load_file

    from diffusers_srpo import SRPOTrainer

    config = tiny_trainer_config("srpo", tmp_path, resolution=SIZE, max_sequence_length=MAX_LEN, rollout_guidance=2.0)
    trainer = SRPOTrainer(tiny_qwen_image_pipeline(), reward=tiny_clip_reward(), prompts=[SHORT, LONG], config=config)
    history = trainer.train()
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    lora = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in lora.items())
