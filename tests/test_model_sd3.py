"""SD3Adapter against the stock StableDiffusion3Pipeline, on the tiny offline SD3.5-shaped pipeline (CPU)."""

from collections import Counter

import pytest
import torch
from stock_parity import euler_rollout, stock_call

from diffusers_srpo.models import SD3Adapter, get_model_adapter
from diffusers_srpo.models.sd3 import SD3Conditioning
from diffusers_srpo.testing.sd3 import (
    SD35_LARGE_TRANSFORMER_CONFIG,
    TinySD3Config,
    sd35_shaped_pipeline,
    tiny_sd3_pipeline,
)

SIZE = 32
STEPS = 4
MAX_LEN = 16
PROMPTS = ["a red circle", "a photo of a blue dog"]

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter(pipe):
    return get_model_adapter(pipe)


@pytest.fixture(scope="module")
def text(adapter):
    return adapter.encode_prompts(PROMPTS, "cpu", MAX_LEN)


def noise_for(adapter, batch_size=2, seed=0, size=SIZE):
    return adapter.make_noise(batch_size, size, size, torch.Generator().manual_seed(seed), "cpu", torch.float32)


def stock(pipe, adapter, noise, guidance, output_type="latent", steps=STEPS, size=SIZE):
    return stock_call(pipe, adapter, noise, guidance, PROMPTS, size, steps, MAX_LEN, output_type)


def adapter_rollout(adapter, noise, text, guidance, sigma_scale=1.0):
    return euler_rollout(adapter, noise, text, guidance, SIZE, STEPS, sigma_scale)


@torch.no_grad()
def reference_rollout(pipe, noise, text, guidance, timestep_scale=1000.0, combine=None):
    """Euler along the sigmas with plain transformer calls: cond and uncond as two separate forwards at timestep
    ``sigma * timestep_scale``, combined by ``combine(cond, uncond, guidance)`` (default: uncond + s (cond - uncond))."""
    combine = combine or (lambda cond, uncond, s: uncond + s * (cond - uncond))
    sigmas = pipe.scheduler.sigmas
    x = noise

    def forward(embeds, pooled, sigma):
        t = torch.full((x.shape[0],), float(sigma) * timestep_scale)
        return pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False
        )[0]

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = forward(text.prompt_embeds, text.pooled_prompt_embeds, sigma)
        if guidance > 1:
            uncond = forward(text.negative_prompt_embeds, text.negative_pooled_prompt_embeds, sigma)
            v = combine(v, uncond, guidance)
        x = x + (sigma_next - sigma) * v
    return x


def max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------- 1. sampler parity
def test_adapter_settings():
    assert SD3Adapter.name == "sd3" and SD3Adapter.guidance_kind == "cfg"
    assert (SD3Adapter.default_rollout_guidance, SD3Adapter.default_train_guidance) == (4.5, 1.0)
    assert SD3Adapter.default_negative_prompt == "" and SD3Adapter.default_max_sequence_length == 256


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_euler_rollout_reproduces_the_stock_pipeline(pipe, adapter, text, guidance):
    """The adapter's Euler rollout along stock_sigmas is the pipeline's __call__ (same noise, its CFG kwargs), and a
    plain-call reference agrees; a timestep off by 1000, or another CFG combination, does not."""
    noise = noise_for(adapter)
    expected = stock(pipe, adapter, noise, guidance)
    # The pipeline's scheduler keeps the sigmas its __call__ sampled with.
    assert torch.equal(adapter.stock_sigmas(STEPS, SIZE, SIZE), pipe.scheduler.sigmas)
    got = adapter_rollout(adapter, noise, text, guidance)
    assert got.shape == (2, 16, SIZE // 2, SIZE // 2)
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(reference_rollout(pipe, noise, text, guidance), expected) <= 1e-5
    # The conventions the test tells apart, by far more than its tolerance.
    assert max_diff(adapter_rollout(adapter, noise, text, guidance, sigma_scale=1e-3), expected) > 1e-2
    assert max_diff(reference_rollout(pipe, noise, text, guidance, timestep_scale=1.0), expected) > 1e-2
    if guidance > 1:
        swapped = reference_rollout(pipe, noise, text, guidance, combine=lambda c, u, s: c + s * (c - u))
        assert max_diff(swapped, expected) > 1e-2
        assert max_diff(adapter_rollout(adapter, noise, text, 1.0), expected) > 1e-2


def test_stock_sigmas_follow_the_scheduler_static_or_dynamic_shift(pipe, adapter):
    """Static shift (SD3's config): the same sigmas at every size. A config with use_dynamic_shifting: mu from the
    image's token count, as __call__ computes it, so the sigmas depend on the size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    assert torch.equal(adapter.stock_sigmas(STEPS, 32, 32), adapter.stock_sigmas(STEPS, 64, 64))
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    dynamic_pipe = StableDiffusion3Pipeline(**{**pipe.components, "scheduler": dynamic})
    dynamic_pipe.set_progress_bar_config(disable=True)
    dynamic_adapter = get_model_adapter(dynamic_pipe)
    by_size = {}
    for size in (32, 64):
        stock(dynamic_pipe, dynamic_adapter, noise_for(dynamic_adapter, size=size), 1.0, steps=3, size=size)
        by_size[size] = dynamic_adapter.stock_sigmas(3, size, size)
        assert torch.equal(by_size[size], dynamic_pipe.scheduler.sigmas)
    assert max_diff(by_size[32], by_size[64]) > 1e-2


def test_noise_is_the_pipeline_noise_of_the_same_generator(pipe, adapter):
    noise = noise_for(adapter, seed=7)
    drawn = pipe.prepare_latents(2, 16, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(7))
    assert torch.equal(noise, drawn)


# ------------------------------------------------------------------------------------------- 2. VAE
def test_decode_is_the_pipeline_decode_and_encode_inverts_the_normalisation(pipe, adapter):
    noise = noise_for(adapter)
    latents = stock(pipe, adapter, noise, 4.5)
    images = stock(pipe, adapter, noise, 4.5, output_type="pt")
    decoded = adapter.decode(latents, SIZE, SIZE)
    assert decoded.shape == (2, 3, SIZE, SIZE) and decoded.dtype == torch.float32
    assert max_diff(decoded, images) <= 1e-6

    encoded = adapter.encode_images(images)
    assert encoded.shape == latents.shape
    with torch.no_grad():
        posterior_mean = pipe.vae.encode(images * 2 - 1).latent_dist.mean
    config = pipe.vae.config
    expected = (posterior_mean.double() - config.shift_factor) * config.scaling_factor
    assert max_diff(encoded.double(), expected) <= 1e-5
    assert max_diff(adapter.to_vae_input(encoded, SIZE, SIZE), posterior_mean) <= 1e-5


def test_decode_is_differentiable(adapter):
    latents = noise_for(adapter).requires_grad_()
    adapter.decode(latents, SIZE, SIZE).sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_recover_vae_input_matches_a_float64_reference(adapter):
    generator = torch.Generator().manual_seed(3)
    velocity, sample, noise = torch.randn(3, 2, 16, SIZE // 2, SIZE // 2, generator=generator).unbind(0)
    sigma_from, sigma_to = torch.tensor([0.9, 0.6]), torch.tensor([0.7, 0.3])
    got = adapter.recover_vae_input(velocity, sample, sigma_from, sigma_to, noise, SIZE, SIZE)
    s_from, s_to = sigma_from.double().view(-1, 1, 1, 1), sigma_to.double().view(-1, 1, 1, 1)
    x0 = (sample.double() + (s_to - s_from) * velocity.double() - s_to * noise.double()) / (1 - s_to)
    config = adapter.vae.config
    expected = x0 / config.scaling_factor + config.shift_factor
    assert got.shape == sample.shape
    assert max_diff(got.double(), expected) <= 1e-5


# ------------------------------------------------------------------------------------------- 3. LoRA
def lora_counts(transformer, targets) -> Counter:
    counts = Counter()
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A"):
            counts.update(target for target in targets if name == target or name.endswith("." + target))
    return counts


def _sd35_large_on_meta():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER_CONFIG)


@pytest.mark.parametrize(
    "build",
    [lambda: tiny_sd3_pipeline(seed=0, config=TinySD3Config(num_layers=3)).transformer, _sd35_large_on_meta],
    ids=["tiny", "sd35-large"],
)
def test_lora_targets_exist_in_every_block(build):
    """Every default target is wrapped in every block (attn.to_add_out in all but the last, context_pre_only one), in
    the tiny transformer and in SD3.5 Large's 38 blocks (built on the meta device)."""
    from peft import LoraConfig

    targets = SD3Adapter.lora_target_modules
    transformer = build()
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    blocks = transformer.config.num_layers
    expected = {target: blocks - 1 if target == "attn.to_add_out" else blocks for target in targets}
    assert dict(lora_counts(transformer, targets)) == expected


def test_saved_lora_loads_with_the_stock_pipeline(adapter, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = tiny_sd3_pipeline(seed=0).transformer
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(adapter.lora_target_modules)
    )
    trained.add_adapter(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    state = get_peft_model_state_dict(trained)
    adapter.save_lora_weights(str(tmp_path), state, trained.peft_config["default"].to_dict())

    loaded = tiny_sd3_pipeline(seed=0)
    assert isinstance(loaded, StableDiffusion3Pipeline)
    loaded.load_lora_weights(str(tmp_path))
    inputs = dict(
        hidden_states=noise_for(adapter),
        timestep=torch.tensor([700.0, 700.0]),
        encoder_hidden_states=torch.randn(2, 77 + MAX_LEN, 48, generator=generator),
        pooled_projections=torch.randn(2, 40, generator=generator),
        return_dict=False,
    )
    with torch.no_grad():
        expected = trained(**inputs)[0]
        got = loaded.transformer(**inputs)[0]
        base = tiny_sd3_pipeline(seed=0).transformer(**inputs)[0]
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(base, expected) > 1e-2

    round_trip = adapter.lora_state_dict_for_transformer(str(tmp_path))
    assert round_trip.keys() == state.keys()
    assert all(torch.equal(round_trip[key], state[key]) for key in state)


# ------------------------------------------------------------------------------------------- 4. text
def test_conditioning_select_and_cat_round_trip(adapter, text):
    assert isinstance(text, SD3Conditioning)
    assert text.prompt_embeds.shape == (2, 77 + MAX_LEN, 48) and text.pooled_prompt_embeds.shape == (2, 40)
    assert text.negative_prompt_embeds.shape == text.prompt_embeds.shape
    assert torch.equal(text.negative_prompt_embeds[0], text.negative_prompt_embeds[1])
    joined = SD3Conditioning.cat([text.select(1), text.select(0), text.select(1)])
    alone = adapter.encode_prompts([PROMPTS[1]], "cpu", MAX_LEN)
    for field in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        batch, single = getattr(text, field), getattr(alone, field)
        assert torch.equal(getattr(joined, field), batch[[1, 0, 1]]), field
        assert max_diff(single, batch[1:]) <= 1e-6, field


def test_negative_prompt_is_the_pipelines(pipe):
    """A custom negative prompt conditions the guided velocity as the pipeline's negative_prompt does."""
    adapter = get_model_adapter(pipe, negative_prompt="a dark painting")
    text = adapter.encode_prompts(PROMPTS, "cpu", MAX_LEN)
    noise = noise_for(adapter)
    kwargs = adapter.pipeline_call_kwargs(4.5, MAX_LEN)
    assert kwargs == {"guidance_scale": 4.5, "negative_prompt": "a dark painting", "max_sequence_length": MAX_LEN}
    expected = stock(pipe, adapter, noise, 4.5)
    assert max_diff(adapter_rollout(adapter, noise, text, 4.5), expected) <= 1e-5


# ------------------------------------------------------------------------------------------- 5. save and reload
def test_tiny_pipeline_saves_and_reloads_offline(pipe, adapter, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.save_pretrained(tmp_path / "sd3")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "sd3")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipe) and reloaded.tokenizer_2.pad_token == "!"
    noise = noise_for(adapter)
    assert torch.equal(stock(reloaded, adapter, noise, 4.5, "pt"), stock(pipe, adapter, noise, 4.5, "pt"))


def test_tiny_pipeline_is_deterministic_from_its_seed():
    first, second, other = tiny_sd3_pipeline(seed=0), tiny_sd3_pipeline(seed=0), tiny_sd3_pipeline(seed=1)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b, c = (getattr(p, name).state_dict() for p in (first, second, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(a[k], c[k]) for k in a), name


def test_sd35_shaped_pipeline_builds_on_fake_tensors():
    from diffusers_srpo.simulation import simulated_tensors

    with simulated_tensors():
        shaped = sd35_shaped_pipeline(2, seed=0)
        adapter = get_model_adapter(shaped)
        transformer = shaped.transformer
        assert transformer.dtype == torch.bfloat16 and transformer.config.num_layers == 2
        assert {k: v for k, v in transformer.config.items() if k in SD35_LARGE_TRANSFORMER_CONFIG} == {
            **SD35_LARGE_TRANSFORMER_CONFIG,
            "num_layers": 2,
        }
        assert adapter.size_multiple == 16
        text = adapter.encode_prompts(["a red circle"], "cpu", MAX_LEN)
        assert text.prompt_embeds.shape == (1, 77 + MAX_LEN, 4096) and text.pooled_prompt_embeds.shape == (1, 2048)
        noise = adapter.make_noise(1, 256, 256, torch.Generator().manual_seed(0), "cpu", torch.bfloat16)
        with torch.no_grad():
            velocity = adapter.predict_velocity(transformer, noise, torch.tensor(0.5), text, 4.5, 256, 256)
        assert velocity.shape == (1, 16, 32, 32)


# ------------------------------------------------------------------------------------------- 6. training smoke
def test_srpo_trains_a_lora_on_sd3(tmp_path):
    from diffusers_srpo import SRPOTrainer
    from diffusers_srpo.testing import tiny_clip_reward, tiny_trainer_config

    pipe = tiny_sd3_pipeline(seed=0)
    config = tiny_trainer_config("srpo", tmp_path / "run", resolution=SIZE, max_sequence_length=MAX_LEN)
    trainer = SRPOTrainer(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)
    defaults = (trainer.config.rollout_guidance, trainer.config.train_guidance, trainer.config.negative_prompt)
    assert defaults == (4.5, 1.0, "")
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    history = trainer.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    unchanged = {n for n, p in pipe.transformer.named_parameters() if "lora_B" in n and torch.equal(p, before[n])}
    # All but one: the last (context_pre_only) block drops its text stream's output, so the text queries there
    # (attn.add_q_proj) get no gradient; diffusers' target list adapts them all the same.
    assert unchanged == {"transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"}
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
