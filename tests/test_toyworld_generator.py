"""The shipped toy-world generator: loads offline, draws what it is asked (stock call included), and the demo's
SRPO steers its style."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from diffusers_srpo.toyworld import ATTRIBUTE_VALUES, ToyAttributes, make_caption, oracle_labels
from diffusers_srpo.toyworld.generator import (
    GENERATOR_CONFIG,
    IMAGE_SIZE,
    MAX_SEQUENCE_LENGTH,
    generator_components,
    load_pipeline,
)

# Colour x lighting, fully prompted, with the other attributes fixed: 8 prompts.
PROMPTED = [ToyAttributes(colour, "square", lighting, "smooth") for colour in ATTRIBUTE_VALUES["colour"] for lighting in ("bright", "dark")]


def generate(pipe, prompts, seed=0):
    return pipe(
        prompts,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_inference_steps=12,
        guidance_scale=3.5,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def accuracy_of(images, attributes, names=("colour", "lighting")) -> dict[str, float]:
    predicted = oracle_labels(images)
    return {
        name: (predicted[name] == torch.tensor([ATTRIBUTE_VALUES[name].index(getattr(a, name)) for a in attributes])).float().mean().item()
        for name in names
    }


def test_shipped_generator_loads_offline_and_draws_the_prompted_colour_and_lighting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline()
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.guidance_embeds
    assert pipe.transformer.dtype == torch.float32
    prompts = [make_caption(a) for a in PROMPTED] * 2
    accuracy = accuracy_of(generate(pipe, prompts), PROMPTED * 2)
    assert accuracy["colour"] >= 0.9 and accuracy["lighting"] >= 0.9, accuracy

    # The same architecture with untrained weights draws neither: the bar measures the training.
    untrained = accuracy_of(generate(FluxPipeline(**generator_components(seed=0, config=GENERATOR_CONFIG)), prompts), PROMPTED * 2)
    assert untrained["colour"] < 0.6 or untrained["lighting"] < 0.6, untrained


def test_stock_call_with_flux_pipeline_defaults_draws_the_prompted_scene():
    """``load_pipeline()(prompt)`` with every other argument FluxPipeline's default (28 steps, guidance 3.5,
    ``max_sequence_length=512``, the default size) draws 64 px images of what was asked: the generator was trained
    at every T5 padding length up to 512, and load_pipeline sets the default size."""
    pipe = load_pipeline()
    attributes = [ToyAttributes(colour, shape, lighting, "smooth") for colour, shape, lighting in (
        ("red", "circle", "bright"), ("blue", "square", "dark"), ("green", "triangle", "bright"),
        ("yellow", "circle", "dark"), ("red", "triangle", "dark"), ("blue", "circle", "bright"),
    )]  # fmt: skip
    images = pipe([make_caption(a) for a in attributes], generator=torch.Generator().manual_seed(7)).images
    assert [image.size for image in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * len(attributes)
    tensors = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 for image in images])
    accuracy = accuracy_of(tensors, attributes, ("colour", "lighting", "texture", "shape"))
    assert accuracy == {"colour": 1.0, "lighting": 1.0, "texture": 1.0, "shape": 1.0}, accuracy


@pytest.mark.slow
def test_shipped_generator_meets_the_oracle_targets_on_fresh_noises():
    """Issue 22's figures, on noises no evaluation during training used (seed 5): prompted colour, lighting and
    texture >= 0.97 and shape >= 0.90 over 192 images (the 48 captions x 4), and content-only prompts drawing each
    style 25-75 % of the time (48 images)."""
    from diffusers_srpo.toyworld.staged_training import evaluate_generator

    result = evaluate_generator(load_pipeline(), IMAGE_SIZE, samples_per_prompt=4, steps=20, seed=5)
    print(json.dumps(result))
    accuracy = result["prompted_accuracy"]
    assert min(accuracy["colour"], accuracy["lighting"], accuracy["texture"]) >= 0.97 and accuracy["shape"] >= 0.90, accuracy
    assert all(0.25 <= fraction <= 0.75 for fraction in result["unprompted_fraction"].values()), result


@pytest.mark.slow
def test_demo_defaults_move_the_bright_fraction_by_a_quarter_without_damage(tmp_path):
    """The demo's defaults, 3 training seeds, 96 evaluation images: the unprompted bright fraction rises by >= 0.25
    while colour and shape accuracy fall by no more than 0.03 (issue 22; a rise is no damage: seed 2's shape
    accuracy rises by 0.031, three images of the 96)."""
    from diffusers_srpo.toyworld.demo import run_demo

    for seed in (0, 1, 2):
        metrics = run_demo(str(tmp_path / f"seed{seed}"), seed=seed)
        before, after = metrics["before"], metrics["after"]
        print(f"seed {seed}: before {before}, after {after}")
        assert len(metrics["evaluation_seeds"]) * len(metrics["prompts"]) >= 96
        assert after["oracle_bright_fraction"] - before["oracle_bright_fraction"] >= 0.25, (before, after)
        for name in ("oracle_colour_accuracy", "oracle_shape_accuracy"):
            assert after[name] >= before[name] - 0.03, (name, before, after)


# ---------------------------------------------------------------------------------------------------------------
# The second generation's staged trainer (diffusers_srpo/toyworld/staged_training.py), on a tiny config.


def _tiny_run(run_dir, **overrides):
    import dataclasses

    from diffusers_srpo.testing import TinyFluxConfig
    from diffusers_srpo.toyworld.staged_training import RunSettings, start_run

    settings = RunSettings(
        seed=3,
        image_size=16,
        model=dataclasses.asdict(TinyFluxConfig()),
        vae_batch_size=4,
        flow_batch_size=4,
        vae_warmup_steps=2,
        flow_warmup_steps=2,
        latent_statistics_images=64,
        **overrides,
    )
    start_run(str(run_dir), settings)
    return settings


def _weight_bytes(path) -> bytes:
    from safetensors.torch import save

    return save(torch.load(path, weights_only=True)["model"])


def test_staged_trainer_resumes_to_the_same_bytes(tmp_path):
    from diffusers_srpo.toyworld.staged_training import freeze_vae_for_flow, train_stage

    torch.set_num_threads(1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    for run in (straight, split):
        _tiny_run(run)
    # The VAE stage: 4 steps straight against 2 + 2 with a resume (the schedule's warm-up spans the boundary).
    train_stage(str(straight), "vae", steps=4, verbose=False)
    train_stage(str(split), "vae", steps=2, verbose=False)
    train_stage(str(split), "vae", steps=2, verbose=False)
    assert _weight_bytes(straight / "vae" / "checkpoint.pt") == _weight_bytes(split / "vae" / "checkpoint.pt")
    for run in (straight, split):
        freeze_vae_for_flow(str(run), _tiny_run(run))
    # The flow stage: the same, with random padding lengths and noises drawn across the boundary.
    train_stage(str(straight), "flow", steps=4, eval_every=-1, verbose=False)
    train_stage(str(split), "flow", steps=2, eval_every=-1, verbose=False)
    row = train_stage(str(split), "flow", steps=2, eval_every=-1, verbose=False)
    assert row["resumed_from"] == "full" and (row["start_step"], row["end_step"]) == (2, 4)
    assert _weight_bytes(straight / "flow" / "checkpoint.pt") == _weight_bytes(split / "flow" / "checkpoint.pt")
    # The moving average of the weights, which evaluation and export use, resumes exactly too.
    ema_straight, ema_split = (torch.load(r / "flow" / "checkpoint.pt", weights_only=True)["ema"] for r in (straight, split))
    assert ema_straight["optimization_step"] == ema_split["optimization_step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(ema_straight["shadow_params"], ema_split["shadow_params"], strict=True))
    assert _weight_bytes(straight / "flow" / "checkpoint.pt") != _weight_bytes(tmp_path / "split" / "flow" / "vae.pt")
    log = json.loads((split / "log.json").read_text())
    assert [r["end_step"] for r in log if r["kind"] == "sitting"] == [2, 4, 2, 4]


def test_portable_checkpoint_resumes_deterministically(tmp_path):
    from safetensors.torch import save

    from diffusers_srpo.toyworld.staged_training import (
        freeze_vae_for_flow,
        load_run_pipeline,
        train_stage,
        write_portable,
    )

    torch.set_num_threads(1)
    results = []
    for name in ("a", "b"):
        run = tmp_path / name
        settings = _tiny_run(run, rewarm_steps=2)
        train_stage(str(run), "vae", steps=1, verbose=False)
        freeze_vae_for_flow(str(run), settings)
        train_stage(str(run), "flow", steps=2, eval_every=-1, verbose=False)
        write_portable(str(run), dtype=torch.bfloat16)  # the committed form
        (run / "flow" / "checkpoint.pt").unlink()  # a fresh machine: only the portable file came along
        row = train_stage(str(run), "flow", steps=2, eval_every=-1, verbose=False)
        assert row["resumed_from"] == "portable"
        results.append(_weight_bytes(run / "flow" / "checkpoint.pt"))
    assert results[0] == results[1]
    # The portable file carries the moving average on (2 + 2 updates), and the run's pipeline draws with it.
    saved = torch.load(run / "flow" / "checkpoint.pt", weights_only=True)
    assert saved["ema"]["optimization_step"] == 4
    averaged, trained = (load_run_pipeline(str(run), weights=w).transformer for w in ("ema", "raw"))
    assert all(torch.equal(p, a) for p, a in zip(averaged.parameters(), saved["ema"]["shadow_params"], strict=True))
    assert _weight_bytes(run / "flow" / "checkpoint.pt") == save(trained.state_dict())
    assert any(not torch.equal(p, q) for p, q in zip(averaged.parameters(), trained.parameters(), strict=True))


def test_collapsed_padding_is_what_the_stock_512_token_call_computes():
    """A position-free T5 encodes every pad alike, so the transformer on the caption plus one pad token weighted
    by log(count) computes what it computes on FluxPipeline's default 512-token context."""
    from diffusers_srpo.testing import TinyFluxConfig
    from diffusers_srpo.toyworld.generator import generator_components, joint_attention_bias
    from diffusers_srpo.toyworld.staged_training import PADDING_LENGTHS, TEXT_CONTEXT, text_cache

    pipe = FluxPipeline(**generator_components(seed=0, config=TinyFluxConfig()))
    captions = ["dark, grainy. a red circle", "a blue square"]
    with torch.no_grad():
        full, pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, max_sequence_length=512)
    cache = text_cache(pipe, captions)
    index = PADDING_LENGTHS.index(512)
    short = torch.stack([cache["embeds"][c][index] for c in captions])
    bias = torch.stack([cache["bias"][c][index] for c in captions])
    assert torch.equal(torch.stack([cache["pooled"][c] for c in captions]), pooled)
    img_ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    inputs = {
        "hidden_states": torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([0.3, 0.8]),
        "guidance": torch.tensor([3.5, 3.5]),
        "pooled_projections": pooled,
        "img_ids": img_ids,
        "return_dict": False,
    }
    with torch.no_grad():
        stock = pipe.transformer(encoder_hidden_states=full, txt_ids=text_ids, **inputs)[0]
        collapsed = pipe.transformer(
            encoder_hidden_states=short,
            txt_ids=torch.zeros(TEXT_CONTEXT, 3),
            joint_attention_kwargs={"attention_mask": joint_attention_bias(bias, 16)},
            **inputs,
        )[0]
        unweighted = pipe.transformer(encoder_hidden_states=full[:, :TEXT_CONTEXT], txt_ids=text_ids[:16], **inputs)[0]
    assert (stock - collapsed).abs().max() < 1e-5
    assert (stock - unweighted).abs().max() > 1e-3  # the pads' weight is what a shorter context gets wrong


def test_flow_times_shift_from_their_start_step_as_sd3_does():
    from diffusers_srpo.toyworld.staged_training import RunSettings, flow_times

    normal = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0])
    settings = RunSettings(flow_time_shifts=[[10, 3.0], [20, 6.0]])
    logistic = 1 / (1 + np.exp(-normal.double().numpy()))
    assert np.allclose(flow_times(settings, 9, normal).numpy(), logistic, atol=1e-7)
    for step, shift in ((10, 3), (19, 3), (20, 6), (10**6, 6)):
        assert np.allclose(flow_times(settings, step, normal).numpy(), shift * logistic / (1 + (shift - 1) * logistic))
    assert float(flow_times(settings, 10, torch.zeros(1))) == pytest.approx(0.75)  # the median moves 0.5 -> 0.75
    # A run.json written before the setting existed loads with no shift.
    assert torch.equal(flow_times(RunSettings(), 10**6, normal), torch.sigmoid(normal))
