"""The shipped toy-world generator: loads offline, draws what it is asked, and SRPO steers its style."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from diffusers_srpo.testing import tiny_flux_components
from diffusers_srpo.toyworld import ATTRIBUTE_VALUES, ToyAttributes, make_caption, oracle_labels
from diffusers_srpo.toyworld.generator import GENERATOR_CONFIG, IMAGE_SIZE, MAX_SEQUENCE_LENGTH, load_pipeline

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


def prompted_accuracy(pipe) -> dict[str, float]:
    prompts = [make_caption(a) for a in PROMPTED] * 2
    predicted = oracle_labels(generate(pipe, prompts))
    accuracy = {}
    for name in ("colour", "lighting"):
        expected = torch.tensor([ATTRIBUTE_VALUES[name].index(getattr(a, name)) for a in PROMPTED] * 2)
        accuracy[name] = (predicted[name] == expected).float().mean().item()
    return accuracy


def test_shipped_generator_loads_offline_and_draws_the_prompted_colour_and_lighting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline()
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.guidance_embeds
    assert pipe.transformer.dtype == torch.float32
    accuracy = prompted_accuracy(pipe)
    assert accuracy["colour"] >= 0.9 and accuracy["lighting"] >= 0.9, accuracy

    # The same architecture with untrained weights draws neither: the bar measures the training.
    untrained = prompted_accuracy(FluxPipeline(**tiny_flux_components(seed=0, config=GENERATOR_CONFIG)))
    assert untrained["colour"] < 0.6 or untrained["lighting"] < 0.6, untrained


@pytest.mark.slow
def test_srpo_with_bright_over_dark_raises_the_oracle_bright_fraction(tmp_path):
    from diffusers_srpo.toyworld.demo import run_demo

    gains = []
    for seed in (0, 1, 2):
        metrics = run_demo(str(tmp_path / f"seed{seed}"), seed=seed, evaluate_every=100)
        before, after = metrics["before"], metrics["after"]
        gains.append(after["oracle_bright_fraction"] - before["oracle_bright_fraction"])
        # Colour survives the default run (reward hacking sets in later: see run_demo's docstring).
        assert after["oracle_colour_accuracy"] >= before["oracle_colour_accuracy"] - 0.15, (before, after)
    print("oracle bright-fraction gains per training seed:", gains)
    assert min(gains) > 0 and np.mean(gains) > np.max(gains) - np.min(gains)
