"""FLUX.2 adapters (``Flux2Pipeline``, ``Flux2KleinPipeline``) against the stock pipelines, on the tiny builders."""

import copy

import pytest
import torch

from diffusers_srpo.models.flux2 import (
    FLUX2_LORA_TARGET_MODULES,
    Flux2Adapter,
    Flux2Conditioning,
    Flux2KleinAdapter,
    Flux2KleinConditioning,
)
from diffusers_srpo.testing.flux2 import (
    FLUX2_DEV_TRANSFORMER_CONFIG,
    FLUX2_VAE_CONFIG,
    TinyFlux2Config,
    flux2_dev_shaped_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
)

SIZE = 32
STEPS = 4
# The tiny tokenizers take 6 (FLUX.2's chat template and system message) and 7 (Klein's) tokens around a prompt.
MAX_LEN = 16
PROMPTS = ["a red circle", "a blue square photo"]
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def flux2():
    return tiny_flux2_pipeline(seed=0)


@pytest.fixture(scope="module")
def klein():
    return tiny_flux2_klein_pipeline(seed=0)


@pytest.fixture(scope="module")
def klein_distilled(klein):
    """The same modules in a step-distilled Klein pipeline."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline(**klein.components, is_distilled=True)


@pytest.fixture(scope="module")
def pipes(flux2, klein, klein_distilled):
    return {"flux2": flux2, "klein": klein, "klein-distilled": klein_distilled}


def adapter_for(pipe, **kwargs):
    adapter_class = Flux2KleinAdapter if type(pipe).__name__ == "Flux2KleinPipeline" else Flux2Adapter
    return adapter_class(pipe, **kwargs)


def with_transformer(pipe, transformer):
    """A pipeline of ``pipe``'s class sharing its other modules, with ``transformer``."""
    return type(pipe)(**{**pipe.components, "transformer": transformer}, **_pipe_config(pipe))


def _pipe_config(pipe) -> dict:
    return {"is_distilled": pipe.config.is_distilled} if "is_distilled" in pipe.config else {}


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def rollout(adapter, noise, text, guidance, timestep_scale=1.0):
    """The trainers' Euler rollout along the stock sigmas (``timestep_scale`` only to show a wrong convention)."""
    sigmas = adapter.stock_sigmas(STEPS, SIZE, SIZE)
    latents = noise
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            velocity = adapter.predict_velocity(
                adapter.transformer, latents, sigma * timestep_scale, text, guidance, SIZE, SIZE
            )
            latents = latents + (sigma_next - sigma) * velocity
    return latents


def stock_call(pipe, adapter, guidance, **kwargs):
    """The stock ``__call__`` (images in [0, 1]) and its final packed latents, caught at the last step."""
    caught = {}

    def catch(pipeline, step, timestep, callback_kwargs):
        caught["latents"] = callback_kwargs["latents"]
        return {}

    images = pipe(
        prompt=PROMPTS,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        output_type="pt",
        callback_on_step_end=catch,
        **{**adapter.pipeline_call_kwargs(guidance, MAX_LEN), **kwargs},
    ).images
    return images, caught["latents"]


# ------------------------------------------------------------------------------------------- sampler parity
@pytest.mark.parametrize(
    "family, guidance, other_guidance",
    [
        ("flux2", 4.0, 1.0),
        ("flux2", 1.0, 4.0),
        ("klein", 4.0, 1.0),
        ("klein", 1.0, 4.0),
        ("klein-distilled", 1.0, None),
    ],
)
def test_rollout_reproduces_the_stock_pipeline(pipes, family, guidance, other_guidance):
    pipe = pipes[family]
    adapter = adapter_for(pipe)
    text = adapter.encode_prompts(PROMPTS, "cpu", MAX_LEN)
    noise = adapter.make_noise(len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(0), "cpu", torch.float32)
    latents = rollout(adapter, noise, text, guidance)
    # __call__ takes the noise patchified [B, 4C, rows, columns], as it draws it.
    images, stock_latents = stock_call(pipe, adapter, guidance, latents=adapter.unpack(noise, SIZE, SIZE))

    assert pipe.scheduler.sigmas.tolist() == adapter.stock_sigmas(STEPS, SIZE, SIZE).tolist()
    latent_error = (latents - stock_latents).abs().max().item()
    image_error = (adapter.decode(latents, SIZE, SIZE) - images).abs().max().item()
    print(f"\n{family} guidance {guidance}: latents {latent_error:.2e}, images {image_error:.2e}")
    assert latent_error <= ATOL and image_error <= ATOL
    # The tolerance is far below what a wrong convention changes: the timestep off by 1000 either way, the guidance
    # (distilled input or CFG) another one.
    for scale in (1000.0, 1e-3):
        assert (rollout(adapter, noise, text, guidance, timestep_scale=scale) - latents).abs().max() > 1e-2
    if other_guidance is not None:
        assert (rollout(adapter, noise, text, other_guidance) - latents).abs().max() > 1e-2
    else:  # a step-distilled Klein: the stock __call__ ignores a guidance_scale (with a warning), as one forward
        _, ignored = stock_call(pipe, adapter, None, latents=adapter.unpack(noise, SIZE, SIZE), guidance_scale=4.0)
        assert (latents - ignored).abs().max() <= ATOL
        # Unset, the guidance the adapter gives the stock call is 1, not the pipeline's ignored default.
        assert adapter.pipeline_call_kwargs(None, MAX_LEN)["guidance_scale"] == 1.0


def test_noise_is_drawn_as_the_pipeline_draws_it(flux2):
    adapter = Flux2Adapter(flux2)
    generator = torch.Generator().manual_seed(7)
    noise = adapter.make_noise(len(PROMPTS), SIZE, SIZE, generator, "cpu", torch.float32)
    text = adapter.encode_prompts(PROMPTS, "cpu", MAX_LEN)
    _, stock_latents = stock_call(flux2, adapter, 4.0, generator=torch.Generator().manual_seed(7))
    assert noise.shape == (2, (SIZE // 4) ** 2, 32)
    assert (rollout(adapter, noise, text, 4.0) - stock_latents).abs().max() <= ATOL


def test_klein_cfg_is_the_pipeline_combination_without_rescale(klein):
    adapter = Flux2KleinAdapter(klein)
    text = adapter.encode_prompts(PROMPTS, "cpu", MAX_LEN)
    latents = adapter.make_noise(2, SIZE, SIZE, torch.Generator().manual_seed(1), "cpu", torch.float32)
    sigma = torch.tensor(0.7)
    with torch.no_grad():
        guided = adapter.predict_velocity(klein.transformer, latents, sigma, text, 3.0, SIZE, SIZE)
        conditional = adapter.predict_velocity(klein.transformer, latents, sigma, text, 1.0, SIZE, SIZE)
        unconditional = adapter.transformer_forward(
            klein.transformer, latents, sigma, text.negative_prompt_embeds, text.text_ids, None, SIZE, SIZE
        )
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=0, atol=1e-5)
    assert (conditional - unconditional).abs().max() > 1e-3  # the negative prompt does change the velocity


# ------------------------------------------------------------------------------------------- the VAE
@pytest.mark.parametrize("family", ["flux2", "klein"])
def test_latent_layout_and_vae_round_trip(pipes, family):
    pipe = pipes[family]
    adapter = adapter_for(pipe)
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, (SIZE // 4) ** 2, 32, generator=generator)
    ids = adapter.latent_ids(2, SIZE, SIZE, "cpu")
    assert torch.equal(adapter.unpack(latents, SIZE, SIZE), type(pipe)._unpack_latents_with_ids(latents, ids))

    # Encoding (the pipeline's _encode_vae_image, packed) then mapping back to the VAE's input gives the posterior
    # mode: the BatchNorm (de)normalisation and the (un)patchifying invert each other.
    assert pipe.vae.bn.running_mean.abs().max() > 0.1  # the tiny VAE's statistics are not the identity
    images = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    encoded = adapter.encode_images(images)
    assert encoded.shape == latents.shape
    with torch.no_grad():
        mode = pipe.vae.encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(adapter.to_vae_input(encoded, SIZE, SIZE), mode, rtol=0, atol=1e-5)

    decoded = adapter.decode(latents.requires_grad_(True), SIZE, SIZE)
    assert decoded.shape == (2, 3, SIZE, SIZE) and 0 <= decoded.min() and decoded.max() <= 1
    decoded.sum().backward()
    assert latents.grad.abs().sum() > 0


def test_recover_vae_input_matches_a_float64_reference(flux2):
    adapter = Flux2Adapter(flux2)
    generator = torch.Generator().manual_seed(3)
    velocity, sample, noise = torch.randn(3, 2, (SIZE // 4) ** 2, 32, generator=generator).unbind(0)
    sigma_from, sigma_to = torch.tensor(0.8), torch.tensor(0.55)
    recovered = adapter.recover_vae_input(velocity, sample, sigma_from, sigma_to, noise, SIZE, SIZE)

    v, x, eps = (t.double() for t in (velocity, sample, noise))
    s_from, s_to = sigma_from.double(), sigma_to.double()
    x0 = (x + (s_to - s_from) * v - s_to * eps) / (1 - s_to)
    bn = flux2.vae.bn
    patches = type(flux2)._unpack_latents_with_ids(x0, adapter.latent_ids(2, SIZE, SIZE, "cpu"))
    std = torch.sqrt(bn.running_var.double() + flux2.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    expected = type(flux2)._unpatchify_latents(patches * std + bn.running_mean.double().view(1, -1, 1, 1))
    assert recovered.dtype == torch.float32 and recovered.shape == (2, 8, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(recovered.double(), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- LoRA
def test_lora_targets_are_diffusers_example_list_for_any_depth(flux2):
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    config = {**flux2.transformer.config, "num_layers": 2, "num_single_layers": 3}
    transformer = Flux2Transformer2DModel.from_config(config)
    adapter = Flux2Adapter(with_transformer(flux2, transformer))
    singles = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(3)]
    assert adapter.lora_target_modules == (*FLUX2_LORA_TARGET_MODULES, *singles)

    def wrapped(targets):
        model = copy.deepcopy(transformer)
        model.add_adapter(LoraConfig(r=2, target_modules=targets))
        return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]

    hits = {target: wrapped([target]) for target in adapter.lora_target_modules}
    assert all(hits.values()), hits
    # Only the image stream of the double blocks (not add_q_proj, ...), and both projections of the single blocks.
    assert (
        sorted(sum(hits.values(), []))
        == sorted(wrapped(list(adapter.lora_target_modules)))
        == sorted(
            [f"transformer_blocks.{b}.attn.{m}" for b in range(2) for m in ("to_q", "to_k", "to_v", "to_out.0")]
            + [f"single_transformer_blocks.{b}.attn.{m}" for b in range(3) for m in ("to_qkv_mlp_proj", "to_out")]
        )
    )
    # Why the single blocks' to_out is named block by block: a bare suffix also hits the double blocks' ModuleList.
    with pytest.raises(ValueError, match="not supported"):
        wrapped(["attn.to_out"])


@pytest.mark.parametrize("family", ["flux2", "klein"])
def test_saved_lora_loads_in_the_stock_pipeline(pipes, family, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = pipes[family]
    trained = with_transformer(base, copy.deepcopy(base.transformer))
    adapter = adapter_for(trained)
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(adapter.lora_target_modules))
    trained.transformer.add_adapter(lora)
    with torch.no_grad():
        for name, parameter in trained.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    state = get_peft_model_state_dict(trained.transformer)
    adapter.save_lora_weights(str(tmp_path), state, trained.transformer.peft_config["default"].to_dict())

    loaded = with_transformer(base, copy.deepcopy(base.transformer))
    loaded.load_lora_weights(str(tmp_path))
    text = adapter.encode_prompts(PROMPTS, "cpu", MAX_LEN)
    latents = adapter.make_noise(2, SIZE, SIZE, torch.Generator().manual_seed(4), "cpu", torch.float32)
    with torch.no_grad():
        outputs = [
            adapter.predict_velocity(pipe.transformer, latents, torch.tensor(0.6), text, 1.0, SIZE, SIZE)
            for pipe in (trained, loaded, base)
        ]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-3  # the LoRA does change the output

    read_back = adapter.lora_state_dict_for_transformer(str(tmp_path))
    assert read_back.keys() == state.keys()
    assert all(torch.equal(read_back[key], value) for key, value in state.items())


# ------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("family", ["flux2", "klein", "klein-distilled"])
def test_text_conditioning_select_and_cat(pipes, family):
    pipe = pipes[family]
    adapter = adapter_for(pipe)
    text = adapter.encode_prompts(PROMPTS, "cpu", MAX_LEN)
    width = 3 * pipe.text_encoder.config.get_text_config().hidden_size
    assert width == pipe.transformer.config.joint_attention_dim and text.prompt_embeds.shape == (2, MAX_LEN, width)
    assert text.text_ids.shape == (2, MAX_LEN, 4) and text.text_ids[..., 3].tolist() == [list(range(MAX_LEN))] * 2
    if family == "flux2":
        assert type(text) is Flux2Conditioning
    else:
        assert type(text) is Flux2KleinConditioning
        assert (text.negative_prompt_embeds is None) == (family == "klein-distilled")
    # The prompt reaches the encoder (after FLUX.2's system message or Qwen's template).
    assert (text.prompt_embeds[0] - text.prompt_embeds[1]).abs().max() > 1e-3

    joined = type(text).cat([text.select(1), text.select(0)])
    alone = adapter.encode_prompts(PROMPTS[1:], "cpu", MAX_LEN)
    for field in ("prompt_embeds", "text_ids", "negative_prompt_embeds"):
        value = getattr(text, field, None)
        if value is None:
            continue
        assert torch.equal(getattr(joined, field), value.flip(0)), field
        torch.testing.assert_close(getattr(alone, field), value[1:], rtol=0, atol=1e-6)
    if family == "klein":
        empty, _ = pipe.encode_prompt(prompt=[""], device="cpu", max_sequence_length=MAX_LEN)
        torch.testing.assert_close(text.negative_prompt_embeds, empty.expand(2, -1, -1), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- defaults
def test_defaults_and_call_settings(flux2, klein, klein_distilled):
    from diffusers_srpo.testing import tiny_trainer_config
    from diffusers_srpo.trainers.base import with_model_defaults

    expected = {
        flux2: ("distilled", 1.0, 4.0, None),
        klein: ("cfg", 4.0, 1.0, ""),
        klein_distilled: ("distilled", 1.0, 1.0, None),
    }
    for pipe, (kind, rollout_guidance, train_guidance, negative) in expected.items():
        adapter = adapter_for(pipe)
        other = Flux2Adapter if isinstance(adapter, Flux2KleinAdapter) else Flux2KleinAdapter
        assert adapter.supports(pipe) and not other.supports(pipe)
        assert (adapter.guidance_kind, adapter.negative_prompt) == (kind, negative)
        assert adapter.default_max_sequence_length == 512 and adapter.size_multiple == 4
        assert adapter.text_encoders() == [pipe.text_encoder]
        config = with_model_defaults(tiny_trainer_config("srpo", "/nonexistent", max_sequence_length=None), adapter)
        assert (config.rollout_guidance, config.train_guidance, config.max_sequence_length) == (
            rollout_guidance,
            train_guidance,
            512,
        )
        assert config.negative_prompt == negative
        assert adapter.pipeline_call_kwargs(1.0, 64) == {"guidance_scale": 1.0, "max_sequence_length": 64}

    assert Flux2KleinAdapter(klein).pipeline_call_kwargs(None, None) == {}
    with pytest.raises(ValueError, match="always uses the empty negative prompt"):
        Flux2KleinAdapter(klein, negative_prompt="blurry").pipeline_call_kwargs(4.0, 64)
    for pipe in (flux2, klein_distilled):
        with pytest.raises(ValueError, match="negative prompt is for classifier-free guidance"):
            adapter_for(pipe, negative_prompt="blurry").pipeline_call_kwargs(1.0, 64)
    distilled = Flux2KleinAdapter(klein_distilled)
    with pytest.raises(ValueError, match="step-distilled"):
        distilled.pipeline_call_kwargs(4.0, 64)
    with pytest.raises(ValueError, match="step-distilled"):
        distilled.predict_velocity(klein_distilled.transformer, torch.zeros(1, 64, 32), 0.5, None, 4.0, SIZE, SIZE)


# ------------------------------------------------------------------------------------------- builders
@pytest.mark.parametrize("family", ["flux2", "klein-distilled"])
def test_tiny_pipeline_saves_and_reloads_offline(pipes, family, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = pipes[family]
    pipe.save_pretrained(tmp_path)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(reloaded) is type(pipe) and _pipe_config(reloaded) == _pipe_config(pipe)

    def generate(p):
        generator = torch.Generator().manual_seed(5)
        return p(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=MAX_LEN,
                 generator=generator, output_type="pt").images  # fmt: skip

    assert torch.equal(generate(reloaded), generate(pipe))


def test_tiny_builders_are_deterministic_and_sized_by_config():
    config = TinyFlux2Config(num_layers=2, text_dim=8, text_layers=31, latent_channels=4)
    pipe = tiny_flux2_klein_pipeline(seed=3, config=config)
    again = tiny_flux2_klein_pipeline(seed=3, config=config)
    assert pipe.transformer.config.joint_attention_dim == 24 and pipe.transformer.config.in_channels == 16
    assert pipe.text_encoder.config.num_hidden_layers == 31 and len(pipe.transformer.transformer_blocks) == 2
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            state, same = module.state_dict(), getattr(again, name).state_dict()
            assert state.keys() == same.keys() and all(torch.equal(state[k], same[k]) for k in state), name
    assert not pipe.transformer.training and not pipe.text_encoder.training and not pipe.vae.training
    with pytest.raises(ValueError, match="must sum to attention_head_dim"):
        TinyFlux2Config(axes_dims_rope=(4, 4, 4, 8))


def test_flux2_dev_shaped_pipeline_builds_on_fake_tensors():
    from diffusers_srpo.simulation import simulated_tensors

    with simulated_tensors():
        pipe = flux2_dev_shaped_pipeline()
        parameters = sum(p.numel() for p in pipe.transformer.parameters())
    config = pipe.transformer.config
    for built, published in ((config, FLUX2_DEV_TRANSFORMER_CONFIG), (pipe.vae.config, FLUX2_VAE_CONFIG)):
        assert {key: _plain(built[key]) for key in published} == {key: _plain(v) for key, v in published.items()}
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert 3 * pipe.text_encoder.config.text_config.hidden_size == config.joint_attention_dim
    assert pipe.text_encoder.config.text_config.num_hidden_layers == 30
    # FLUX.2-dev is "a 32 billion parameter" transformer (Black Forest Labs' model card): 32,223,281,152 here.
    assert 32.0e9 < parameters < 32.5e9, parameters
    # The published VAE weights: 251 tensors, 84,046,115 parameters (as a third-party loader counts its file).
    assert len(pipe.vae.state_dict()) == 251 and sum(p.numel() for p in pipe.vae.parameters()) == 84_046_115
    assert Flux2Adapter(pipe).size_multiple == 16


@pytest.mark.slow
def test_simulated_srpo_update_at_flux2_dev_width(tmp_path, fresh_accelerate_state):
    """The scale simulator runs the adapter on fake tensors (one double and one single block at FLUX.2-dev's width,
    256x256): the reward's gradient reaches every LoRA weight. About 10 s."""
    from diffusers_srpo import SRPOTrainer
    from diffusers_srpo.simulation import simulate_update, simulated_tensors, simulated_trainer
    from diffusers_srpo.testing import tiny_clip_reward, tiny_trainer_config

    with simulated_tensors():
        pipe = flux2_dev_shaped_pipeline(1, 1)
        config = tiny_trainer_config(
            "srpo", tmp_path / "run", resolution=256, max_sequence_length=MAX_LEN, mixed_precision="bf16", lora_rank=8
        )
        trainer = simulated_trainer(SRPOTrainer, pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)
        cost = simulate_update(trainer)
    # Rank 8 on to_q, to_k, to_v, to_out.0 (6144 -> 6144), to_qkv_mlp_proj (6144 -> 3 x 6144 + 2 x 18432) and the
    # single block's to_out (6144 + 18432 -> 6144).
    width, mlp = 6144, 3 * 6144
    lora = 8 * (4 * 2 * width + (width + 3 * width + 2 * mlp) + (width + mlp + width))
    assert cost.trainable_params == lora
    assert cost.peak_by_category["gradients"] == 4 * lora and cost.gradient_flops > 0


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", ["flux2", "klein"])
def test_srpo_trains_the_lora(pipes, family, tmp_path):
    from diffusers_srpo import SRPOTrainer
    from diffusers_srpo.testing import tiny_clip_reward, tiny_trainer_config

    base = pipes[family]
    pipe = with_transformer(base, copy.deepcopy(base.transformer))
    config = tiny_trainer_config("srpo", tmp_path / "run", max_sequence_length=MAX_LEN)
    trainer = SRPOTrainer(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)
    assert type(trainer.adapter) is type(adapter_for(base))
    history = trainer.train()
    # peft's gaussian initialisation starts every lora_B at zero.
    lora_b = [p for name, p in pipe.transformer.named_parameters() if "lora_B" in name]
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
