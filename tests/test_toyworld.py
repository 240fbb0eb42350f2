"""The toy world: its seeded dataset, the analytic oracles, and the shipped CLIP-like reward."""

import json
import os
from collections import Counter

import open_clip
import pytest
import torch
from safetensors import safe_open
from torchvision.transforms.v2 import functional as TF

from diffusers_srpo.rewards import CLIPReward
from diffusers_srpo.testing import tiny_open_clip_model
from diffusers_srpo.toyworld import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    COLOURS,
    LIGHTINGS,
    REWARD_CLIP_CONFIG,
    REWARD_WEIGHTS_DIR,
    SHAPES,
    STYLE_ATTRIBUTES,
    TEXTURES,
    ToyAttributes,
    ToyShapesDataset,
    all_attribute_combinations,
    collate_samples,
    content_prompt,
    labels_from_attributes,
    load_reward,
    make_caption,
    oracle_accuracy,
    oracle_labels,
    render_images,
    srp_difference,
    style_fraction,
    zero_shot_accuracy,
    zero_shot_prompts,
)

# Dataset seed of the reward's checks: images it never saw (training used seed 0, its evaluations 1000 and 2000).
FRESH_SEED = 123_456


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy models are tiny: on a busy machine a second thread waits more than it works (about 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch_2000():
    return ToyShapesDataset(length=2000, seed=7).batch(range(2000))


@pytest.fixture(scope="module")
def reward():
    return load_reward()


def _parse_caption(caption: str) -> tuple[list[str], str, str]:
    """(style words, colour, shape) of a caption ``"[w1, w2. ]a {colour} {shape}"``."""
    style, _, content = caption.rpartition(". ")
    article, colour, shape = content.split(" ")
    assert article == "a"
    return (style.split(", ") if style else []), colour, shape


def test_dataset_is_deterministic_from_seed():
    first, second, other = (ToyShapesDataset(length=64, seed=s) for s in (3, 3, 4))
    a, b, c = first.batch(range(64)), second.batch(range(64)), other.batch(range(64))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert all(torch.equal(a.labels[n], b.labels[n]) for n in ATTRIBUTES)
    assert not torch.equal(a.images, c.images)
    # An item does not depend on what it is rendered with, nor on the order.
    for index in (0, 17, 63):
        item = first[index]
        assert torch.equal(item.image, a.images[index])
        assert item.caption == a.captions[index] and item.attributes == a.attributes[index]
    reordered = first.batch([40, 3, 40])
    assert torch.equal(reordered.images[0], a.images[40]) and torch.equal(reordered.images[1], a.images[3])
    assert torch.equal(reordered.images[2], a.images[40])
    # Items are distinct: different indices give different images.
    assert len({image.numpy().tobytes() for image in a.images}) == 64
    with pytest.raises(IndexError):
        first[64]


def test_images_are_rgb_in_unit_range_at_any_size():
    for size in (32, 48, 64):
        sample = ToyShapesDataset(length=8, image_size=size, seed=0)[5]
        assert sample.image.shape == (3, size, size) and sample.image.dtype == torch.float32
        assert 0.0 <= sample.image.min() and sample.image.max() <= 1.0
    with pytest.raises(ValueError, match="seed"):
        ToyShapesDataset(seed=-1)


def test_dataset_covers_all_combinations_and_mixes_style_words(batch_2000):
    combinations = Counter(batch_2000.attributes)
    assert set(combinations) == set(all_attribute_combinations()) and len(combinations) == 48
    assert min(combinations.values()) >= 20  # about 42 each: uniform draws
    for name in ("lighting", "texture"):
        shown = (batch_2000.caption_labels[name] >= 0).float().mean().item()
        assert 0.45 < shown < 0.55, f"{name} word shown in {shown:.2f} of captions; expected about half"
    words = [len(_parse_caption(c)[0]) for c in batch_2000.captions]
    assert {0, 1, 2} <= set(words)  # content only, partial and full style descriptions all occur


def test_captions_match_attributes(batch_2000):
    for caption, attributes, lighting, texture in zip(
        batch_2000.captions,
        batch_2000.attributes,
        batch_2000.caption_labels["lighting"].tolist(),
        batch_2000.caption_labels["texture"].tolist(),
        strict=True,
    ):
        style, colour, shape = _parse_caption(caption)
        assert (colour, shape) == (attributes.colour, attributes.shape)
        expected = ([attributes.lighting] if lighting >= 0 else []) + ([attributes.texture] if texture >= 0 else [])
        assert style == expected, caption
        assert caption == make_caption(attributes, show_lighting=lighting >= 0, show_texture=texture >= 0)
    vocabulary = {w.strip(",.") for c in batch_2000.captions for w in c.split()}
    assert vocabulary == {"a", *COLOURS, *SHAPES, *LIGHTINGS, *TEXTURES}
    assert make_caption(ToyAttributes("red", "circle", "dark", "grainy")) == "dark, grainy. a red circle"
    with pytest.raises(ValueError, match="colour"):
        ToyAttributes("purple", "circle", "dark", "grainy")


def test_collate_samples_gives_the_batch():
    dataset = ToyShapesDataset(length=32, seed=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=collate_samples)
    collated, direct = next(iter(loader)), dataset.batch(range(32))
    assert torch.equal(collated.images, direct.images) and collated.captions == direct.captions
    for name in ATTRIBUTES:
        assert torch.equal(collated.labels[name], direct.labels[name])
        assert torch.equal(collated.caption_labels[name], direct.caption_labels[name])


def test_oracles_are_exact_on_real_images(batch_2000):
    assert oracle_accuracy(batch_2000.images, batch_2000.labels) == {name: 1.0 for name in ATTRIBUTES}
    # Every combination, at other sizes too (the grain cell follows the size).
    combinations = all_attribute_combinations() * 4
    for size in (32, 64):
        images = render_images(combinations, image_size=size, generator=torch.Generator().manual_seed(size))
        predicted = oracle_labels(images)
        expected = labels_from_attributes(combinations)
        assert all(torch.equal(predicted[n], expected[n]) for n in ATTRIBUTES), size


def test_oracles_hold_on_blurred_noisy_images(batch_2000):
    """Generated images are blurry and noisy; the oracles must still read them (numbers: RESULTS.md)."""
    blurred = TF.gaussian_blur(batch_2000.images, [5, 5], [0.8, 0.8])
    noise = 0.02 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(0))
    accuracy = oracle_accuracy((blurred + noise).clamp(0, 1), batch_2000.labels)
    assert min(accuracy.values()) >= 0.97, accuracy


def test_style_fraction():
    bright = [ToyAttributes(c, s, "bright", "grainy") for c in COLOURS for s in SHAPES]
    dark = [ToyAttributes(c, s, "dark", "smooth") for c in COLOURS for s in SHAPES]
    images = render_images(bright * 3 + dark, generator=torch.Generator().manual_seed(0))
    assert style_fraction(images, "lighting", "bright") == 0.75
    assert style_fraction(images, "texture", "smooth") == 0.25
    with pytest.raises(ValueError, match="lighting"):
        style_fraction(images, "lighting", "grainy")
    with pytest.raises(ValueError, match="attribute"):
        style_fraction(images, "size", "big")


def test_shipped_reward_loads_offline_through_the_public_loader(monkeypatch, reward):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = sorted(os.listdir(REWARD_WEIGHTS_DIR))
    assert names == ["open_clip_config.json", "open_clip_model.safetensors"]
    weights = os.path.join(REWARD_WEIGHTS_DIR, "open_clip_model.safetensors")
    assert os.path.getsize(weights) < 5 * 2**20
    with safe_open(weights, "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.float16}
    with open(os.path.join(REWARD_WEIGHTS_DIR, "open_clip_config.json")) as f:
        assert json.load(f)["model_cfg"] == REWARD_CLIP_CONFIG.open_clip_model_cfg()

    loaded = CLIPReward.from_pretrained(REWARD_WEIGHTS_DIR)
    assert isinstance(loaded, CLIPReward) and loaded.image_size == 32
    assert isinstance(reward, CLIPReward) and reward.dtype == torch.float32 and not reward.training
    assert not any(p.requires_grad for p in reward.parameters())
    images = ToyShapesDataset(length=4, seed=FRESH_SEED).batch(range(4))
    assert torch.allclose(loaded(images.images, images.captions), reward(images.images, images.captions))
    # The ViT-H-14 tokenizer (the real CLIP BPE vocabulary, 77 tokens) gives the same scores.
    same = CLIPReward(reward.model, open_clip.get_tokenizer("ViT-H-14"))
    assert torch.allclose(same(images.images, images.captions), reward(images.images, images.captions))


def test_reward_knows_every_attribute_and_random_weights_do_not(reward):
    fresh = ToyShapesDataset(length=240, seed=FRESH_SEED).batch(range(240))
    accuracy = zero_shot_accuracy(reward, fresh.images, fresh.labels)
    assert min(accuracy.values()) >= 0.9, accuracy
    # The bar is not met by chance: randomly initialised models of the same architecture fail it.
    for seed in (0, 1):
        random = CLIPReward(tiny_open_clip_model(seed, REWARD_CLIP_CONFIG), open_clip.get_tokenizer("ViT-H-14"))
        chance = zero_shot_accuracy(random, fresh.images, fresh.labels)
        assert min(chance.values()) < 0.9, chance
        assert chance["colour"] < 0.6 and chance["shape"] < 0.7, chance


def test_zero_shot_prompts_differ_in_one_attribute():
    assert zero_shot_prompts("colour", "red", "circle") == [f"a {c} circle" for c in COLOURS]
    assert zero_shot_prompts("shape", "red", "circle") == [f"a red {s}" for s in SHAPES]
    assert zero_shot_prompts("lighting", "red", "circle") == ["bright. a red circle", "dark. a red circle"]
    assert zero_shot_prompts("texture", "red", "circle") == ["smooth. a red circle", "grainy. a red circle"]


@pytest.mark.parametrize(
    ("attribute", "positive", "negative"), [("lighting", "bright", "dark"), ("texture", "grainy", "smooth")]
)
def test_srp_difference_has_the_sign_of_the_style(reward, attribute, positive, negative):
    """<f_img, f_txt("bright. p") - f_txt("dark. p")> > 0 for bright images, < 0 for dark ones of the same content."""
    contents = [(colour, shape) for colour in COLOURS for shape in SHAPES] * 4
    prompts = [content_prompt(colour, shape) for colour, shape in contents]
    other = next(name for name in STYLE_ATTRIBUTES if name != attribute)
    differences = {}
    for value in (positive, negative):
        attributes = [
            ToyAttributes(colour, shape, **{attribute: value, other: ATTRIBUTE_VALUES[other][i % 2]})
            for i, (colour, shape) in enumerate(contents)
        ]
        # The same seed draws the same position, size and grain: the two sets differ in `attribute` only.
        images = render_images(attributes, generator=torch.Generator().manual_seed(FRESH_SEED))
        differences[value] = srp_difference(reward, images, prompts, positive, negative)
        by_hand = reward.encode_image(images) @ reward.encode_text([f"{positive}. {prompts[0]}"]).T
        by_hand -= reward.encode_image(images) @ reward.encode_text([f"{negative}. {prompts[0]}"]).T
        assert torch.allclose(differences[value][0], by_hand[0, 0], atol=1e-5)
    assert (differences[positive] > 0).float().mean() >= 0.9, differences[positive]
    assert (differences[negative] < 0).float().mean() >= 0.9, differences[negative]
    assert (differences[positive] > differences[negative]).all()


def test_srp_difference_is_differentiable_in_the_pixels(reward):
    attributes = [ToyAttributes(colour, "circle", "dark", "smooth") for colour in COLOURS]
    images = render_images(attributes, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    prompts = [a.content for a in attributes]
    difference = srp_difference(reward, images, prompts, "bright", "dark")
    difference.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # A small step up the gradient raises the score: the gradient is usable for alignment.
    step = 0.002 * images.grad / images.grad.abs().amax(dim=(1, 2, 3), keepdim=True)
    stepped = (images + step).clamp(0, 1).detach()
    assert (srp_difference(reward, stepped, prompts, "bright", "dark") > difference.detach()).all()


def test_vocabulary_constants():
    assert ATTRIBUTE_VALUES == {"colour": COLOURS, "shape": SHAPES, "lighting": LIGHTINGS, "texture": TEXTURES}
    assert ATTRIBUTES == ("colour", "shape", "lighting", "texture")
    assert len(all_attribute_combinations()) == len(COLOURS) * len(SHAPES) * len(LIGHTINGS) * len(TEXTURES)


def test_demo_on_an_int8_base_writes_a_lora_that_a_stock_pipeline_loads(tmp_path, monkeypatch):
    """run_demo(quantize="int8") trains on a quantized transformer; its LoRA loads on the unquantized pipeline with
    diffusers' own load_lora_weights, and moves what it draws."""
    from diffusers_srpo import trainers
    from diffusers_srpo.quantization import quantization_of
    from diffusers_srpo.toyworld.demo import run_demo
    from diffusers_srpo.toyworld.generator import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, load_pipeline

    seen = []

    class RecordingTrainer(trainers.SRPOTrainer):
        def __init__(self, pipe, **kwargs):
            seen.append(quantization_of(pipe.transformer))
            super().__init__(pipe, **kwargs)

    monkeypatch.setattr(trainers, "SRPOTrainer", RecordingTrainer)
    output_dir = tmp_path / "demo"
    metrics = run_demo(str(output_dir), max_train_steps=2, evaluation_seeds=1, evaluate_every=2, quantize="int8")
    assert seen and seen[0] is not None and seen[0].startswith("torchao"), seen
    assert metrics["quantize"] == "int8" and metrics["use_8bit_adam"] is False and len(metrics["history"]) == 2
    with open(output_dir / "metrics.json") as f:
        assert json.load(f)["quantize"] == "int8"
    assert "frozen base while training**: torchao" in (output_dir / "README.md").read_text()

    pipe = load_pipeline()
    assert quantization_of(pipe.transformer) is None

    def draw():
        return pipe(
            ["a red circle", "a blue square"],
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=4,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    base = draw()
    pipe.load_lora_weights(str(output_dir))
    with safe_open(str(output_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        written = {key.removeprefix("transformer.") for key in f.keys()}
    layers = {name for name, module in pipe.transformer.named_modules() if hasattr(module, "lora_A")}
    assert written == {f"{layer}.lora_{part}.weight" for layer in layers for part in "AB"}  # every key applied
    assert pipe.get_active_adapters()
    tuned = draw()
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-2, (tuned - base).abs().max()


def test_demo_refuses_an_unknown_quantization_in_one_line_before_loading(tmp_path, monkeypatch):
    from diffusers_srpo.toyworld import demo

    def no_loading():
        raise AssertionError("run_demo loaded the pipeline before checking quantize")

    monkeypatch.setattr(demo, "load_pipeline", no_loading)
    monkeypatch.setattr(demo, "load_reward", no_loading)
    with pytest.raises(ValueError, match="'int4'") as error:
        demo.run_demo(str(tmp_path / "demo"), quantize="int4")
    assert "\n" not in str(error.value) and "nf4" in str(error.value)
    assert not (tmp_path / "demo").exists()
