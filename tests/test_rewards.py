"""Reward models and Semantic Relative Preference, loaded the way a user loads them.

Tiny open_clip / transformers CLIP models are built from configs, saved in the formats of the real
checkpoints (HPSv2's ``{"state_dict": ...}`` torch file, ``save_pretrained`` folders, LAION's aesthetic
state dict, safetensors), and loaded back with the public ``from_pretrained`` calls.
"""

import copy
import json
import math
import os
import re
import shutil

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_srpo.rewards import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_NEGATIVE_WORDS,
    DEFAULT_POSITIVE_WORDS,
    AestheticReward,
    CallableReward,
    CLIPReward,
    HPSv2Reward,
    PickScoreReward,
    Reward,
    SemanticRelativeReward,
    clip_preprocess,
    load_reward,
)
from diffusers_srpo.testing import (
    TinyCLIPConfig,
    save_aesthetic_mlp,
    save_hps_checkpoint,
    save_open_clip_local_dir,
    save_transformers_clip_dir,
    tiny_aesthetic_mlp,
    tiny_clip_tokenizer,
    tiny_open_clip_model,
    tiny_transformers_clip_model,
)

PROMPTS = ["a red circle", "a photo of a cat"]
# A registered open_clip config name, unique enough not to clash with open_clip's own.
REGISTERED_ARCHITECTURE = "tiny-srpo-test-clip"


def _images(batch=2, height=40, width=48, seed=0, detail=(5, 6)):
    """Smooth images in [0, 1] (``detail``-sized noise upsampled), like decoded generations rather than white noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, *detail, generator=generator)
    return F.interpolate(coarse, (height, width), mode="bilinear", align_corners=False)


def _fake_hub_cache(cache_dir, repo_id, files):
    """Lay out ``files`` (name -> local path) as huggingface_hub's cache holds a downloaded snapshot of ``repo_id``."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        shutil.copy(path, snapshot / name)
    return str(cache_dir)


def _assert_same_weights(module, state_dict):
    own = module.state_dict()
    assert own.keys() == state_dict.keys()
    assert all(torch.equal(own[key], value) for key, value in state_dict.items())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every checkpoint in its real on-disk format, plus the in-memory models they were saved from."""
    root = tmp_path_factory.mktemp("rewards")
    open_clip_model = tiny_open_clip_model(seed=0)
    transformers_model = tiny_transformers_clip_model(seed=1)
    tokenizer = tiny_clip_tokenizer()
    aesthetic_mlp = tiny_aesthetic_mlp(seed=2, input_dim=TinyCLIPConfig().embed_dim)

    architecture_dir = save_open_clip_local_dir(open_clip_model, str(root / "open_clip_arch"))
    config_dir = root / "open_clip_configs"
    config_dir.mkdir()
    (config_dir / f"{REGISTERED_ARCHITECTURE}.json").write_text(json.dumps(TinyCLIPConfig().open_clip_model_cfg()))
    open_clip.add_model_config(str(config_dir))
    open_clip_weights = str(root / "tiny_clip.safetensors")
    save_file({k: v.contiguous() for k, v in open_clip_model.state_dict().items()}, open_clip_weights)
    return {
        "root": root,
        "open_clip_model": open_clip_model,
        "transformers_model": transformers_model,
        "tokenizer": tokenizer,
        "aesthetic_mlp": aesthetic_mlp,
        "architecture": "local-dir:" + architecture_dir,
        "hps": save_hps_checkpoint(open_clip_model, str(root / "HPS_v2.1_compressed.pt")),
        "hps_ddp": save_hps_checkpoint(open_clip_model, str(root / "hps_ddp.pt"), key_prefix="module."),
        "open_clip_weights": open_clip_weights,
        # PickScore's hub repo has no tokenizer files; a plain CLIP folder has them.
        "pickscore": save_transformers_clip_dir(transformers_model, str(root / "pickscore")),
        "hf_clip": save_transformers_clip_dir(transformers_model, str(root / "hf_clip"), tokenizer=tokenizer),
        "aesthetic": save_aesthetic_mlp(aesthetic_mlp, str(root / "sac+logos+ava1-l14-linearMSE.pth")),
    }


@pytest.fixture(scope="module")
def hps(files):
    return HPSv2Reward.from_pretrained(files["hps"], architecture=files["architecture"])


@pytest.fixture(scope="module")
def pickscore(files):
    return PickScoreReward.from_pretrained(files["pickscore"], tokenizer=files["tokenizer"])


@pytest.fixture(scope="module")
def open_clip_reward(files):
    return CLIPReward.from_pretrained(REGISTERED_ARCHITECTURE, pretrained=files["open_clip_weights"])


@pytest.fixture(scope="module")
def hf_clip(files):
    return CLIPReward.from_pretrained(files["hf_clip"])


@pytest.fixture(scope="module")
def aesthetic(files, open_clip_reward):
    return AestheticReward.from_pretrained(files["aesthetic"], clip=open_clip_reward)


class _Brightness(torch.nn.Module):
    """A user's differentiable reward with weights of its own: a 1x1 convolution, averaged."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, images, prompts):
        return self.conv(images).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def user_reward():
    return CallableReward(_Brightness())


@pytest.fixture(scope="module")
def srp(hps):
    return SemanticRelativeReward(hps)


ALL_REWARDS = ["hps", "pickscore", "open_clip_reward", "hf_clip", "aesthetic", "user_reward", "srp"]


# --- loading through the public path reproduces the saved models -------------------------------------------------


def test_hps_checkpoint_loads_the_saved_weights_and_scores_the_cosine(files, hps):
    saved = files["open_clip_model"].state_dict()
    _assert_same_weights(hps.model, saved)
    ddp = HPSv2Reward.from_pretrained(files["hps_ddp"], architecture=files["architecture"])
    _assert_same_weights(ddp.model, saved)

    images = _images()
    with torch.no_grad():
        pixels = clip_preprocess(images, 32)
        image_embeds = F.normalize(files["open_clip_model"].encode_image(pixels), dim=-1)
        text_embeds = F.normalize(
            files["open_clip_model"].encode_text(open_clip.get_tokenizer("ViT-H-14")(PROMPTS)), dim=-1
        )
        expected = (image_embeds * text_embeds).sum(-1)
        torch.testing.assert_close(hps(images, PROMPTS), expected, rtol=0, atol=1e-6)
    assert hps.score_scale == 1.0 and hps.image_size == 32


def test_pickscore_is_scaled_cosine_of_the_saved_model(files, pickscore, hf_clip):
    model = files["transformers_model"]
    _assert_same_weights(pickscore.model, model.state_dict())
    logit_scale = math.exp(model.logit_scale.item())
    assert pickscore.score_scale == pytest.approx(logit_scale / 20)

    images = _images()
    tokens = files["tokenizer"](PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=clip_preprocess(images, 32)).pooler_output
        text_embeds = model.get_text_features(**tokens).pooler_output
        cosine = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
        torch.testing.assert_close(pickscore(images, PROMPTS), logit_scale * cosine / 20, rtol=0, atol=1e-6)
        # The same folder with its tokenizer, loaded as a plain CLIP, scores the same.
        torch.testing.assert_close(hf_clip(images, PROMPTS), pickscore(images, PROMPTS), rtol=0, atol=0)


def test_open_clip_architecture_with_a_weight_file_equals_hps_loading(files, hps, open_clip_reward):
    # The local-dir folder also holds the weights, so it loads as a complete open_clip CLIP too.
    from_folder = CLIPReward.from_pretrained(files["architecture"].removeprefix("local-dir:"))
    images = _images(seed=4)
    with torch.no_grad():
        expected = hps(images, PROMPTS)
        torch.testing.assert_close(open_clip_reward(images, PROMPTS), expected, rtol=0, atol=0)
        torch.testing.assert_close(from_folder(images, PROMPTS), expected, rtol=0, atol=0)


def test_aesthetic_is_the_mlp_on_normalised_embeddings_and_ignores_text(files, aesthetic, open_clip_reward):
    images = _images(seed=5)
    with torch.no_grad():
        expected = files["aesthetic_mlp"](open_clip_reward.encode_image(images)).squeeze(-1)
        torch.testing.assert_close(aesthetic(images, None), expected, rtol=0, atol=0)
        torch.testing.assert_close(aesthetic(images, ["x", "y"]), expected, rtol=0, atol=0)
    assert aesthetic.mlp.input_dim == TinyCLIPConfig().embed_dim


def test_load_reward_parses_name_and_source(files):
    reward = load_reward("hpsv2:" + files["hps"], architecture=files["architecture"])
    assert type(reward) is HPSv2Reward
    assert type(load_reward("clip:" + files["hf_clip"])) is CLIPReward
    with pytest.raises(ValueError, match="unknown reward 'hps3'"):
        load_reward("hps3")
    with pytest.raises(ValueError, match="needs a source"):
        load_reward("aesthetic")


@pytest.mark.parametrize("version,filename", [("v2.1", "HPS_v2.1_compressed.pt"), ("v2.0", "HPS_v2_compressed.pt")])
def test_hps_version_resolves_to_its_hub_file(files, monkeypatch, tmp_path, version, filename):
    saved = files["open_clip_model"].state_dict()
    # Offline: the file already in the hub cache (where a first online run put it) is used.
    cache_dir = _fake_hub_cache(tmp_path, "xswu/HPSv2", {filename: files["hps"]})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = HPSv2Reward.from_pretrained(version, architecture=files["architecture"], cache_dir=cache_dir)
    _assert_same_weights(offline.model, saved)
    # Online: exactly that file of that repo is downloaded (the download itself is stubbed: no network here).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    requested = []

    def download(repo_id, name, cache_dir=None):
        requested.append((repo_id, name))
        return files["hps"]

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    online = HPSv2Reward.from_pretrained(version, architecture=files["architecture"])
    assert requested == [("xswu/HPSv2", filename)]
    _assert_same_weights(online.model, saved)


def test_pickscore_default_is_its_hub_repo(files, monkeypatch, tmp_path):
    folder = files["pickscore"]
    weights = {name: os.path.join(folder, name) for name in os.listdir(folder)}
    cache_dir = _fake_hub_cache(tmp_path, "yuvalkirstain/PickScore_v1", weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = PickScoreReward.from_pretrained(tokenizer=files["tokenizer"], cache_dir=cache_dir)
    _assert_same_weights(reward.model, files["transformers_model"].state_dict())


# --- the protocol: gradients to pixels only, frozen, eval, float32, .to() ---------------------------------------


@pytest.mark.parametrize("name", ALL_REWARDS)
def test_gradients_reach_pixels_and_not_the_reward(name, request):
    reward = request.getfixturevalue(name)
    images = _images(seed=6).requires_grad_(True)
    kwargs = {"k": torch.tensor([0.1, 0.25])} if name == "srp" else {}
    scores = reward(images, PROMPTS, **kwargs)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())
    assert len(list(reward.parameters())) > 0


@pytest.mark.parametrize("name", ALL_REWARDS)
def test_reward_stays_in_eval_mode(name, request):
    reward = request.getfixturevalue(name)
    torch.nn.Sequential(reward).train()  # what a trainer's .train() on a parent module does
    assert not any(module.training for module in reward.modules())


@pytest.mark.parametrize("name", ALL_REWARDS)
def test_to_dtype_moves_every_weight_and_keeps_float32_scores(name, request):
    reward = request.getfixturevalue(name)
    images = _images(seed=7)
    with torch.no_grad():
        reference = reward(images, PROMPTS)
        in_float64 = copy.deepcopy(reward).to(torch.float64)
        scores = in_float64(images, PROMPTS)
    assert in_float64.dtype == torch.float64 and all(p.dtype == torch.float64 for p in in_float64.parameters())
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference, rtol=0, atol=1e-5)


def test_to_bfloat16_scores_close_to_float32(hps):
    images = _images(seed=7)
    with torch.no_grad():
        reference = hps(images, PROMPTS)
        in_bf16 = copy.deepcopy(hps).to(torch.bfloat16)
        scores = in_bf16(images, PROMPTS)
    assert in_bf16.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference, rtol=0, atol=0.05)


# --- preprocessing ------------------------------------------------------------------------------------------------

# PIL rounds to uint8 after each of its two resize passes, so it differs from the float pipeline by up to
# 2 levels of 255; after normalisation that is 2 / 255 / min(std) = 0.030. Measured on these cases: 0.016.
PREPROCESS_ATOL = 2 / 255 / min(CLIP_STD)


@pytest.mark.parametrize(
    "height,width,detail",
    [
        (40, 48, (5, 6)),
        (20, 24, (5, 6)),  # upscaled
        (100, 37, (5, 6)),
        (32, 32, (5, 6)),  # already the model's size: only crop and normalisation
        (128, 96, (48, 40)),  # fine detail, downscaled as the trainer's 720 px images are
    ],
)
def test_preprocess_matches_open_clip_on_pil(files, hps, height, width, detail):
    _, _, open_clip_preprocess = open_clip.create_model_and_transforms(files["architecture"])
    images = _images(batch=1, height=height, width=width, seed=8, detail=detail)
    images = (images * 255).round() / 255  # exactly uint8 values
    pil = Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy())
    expected = open_clip_preprocess(pil)
    ours = hps.preprocess(images)[0]
    assert ours.shape == expected.shape == (3, 32, 32)
    assert (ours - expected).abs().max().item() <= PREPROCESS_ATOL


def test_preprocess_normalises_with_clip_statistics(hps):
    grey = torch.full((1, 3, 32, 32), 0.5)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(hps.preprocess(grey)[0, :, 0, 0], expected)


# --- Semantic Relative Preference ---------------------------------------------------------------------------------


def test_srp_equals_the_formula_from_encoders(hps, srp):
    images = _images(seed=9)
    k = torch.tensor([0.1, 0.3])
    step = 6  # positive word 6 % 4 = 2, negative word 6 % 5 = 1
    positive = [f"{DEFAULT_POSITIVE_WORDS[2]}. {p}" for p in PROMPTS]
    negative = [f"{DEFAULT_NEGATIVE_WORDS[1]}. {p}" for p in PROMPTS]
    with torch.no_grad():
        image_embeds = hps.encode_image(images)
        pos, neg = hps.encode_text(positive), hps.encode_text(negative)
        expected = (image_embeds * ((1 + k[:, None]) * pos - neg)).sum(-1)
        expected_swapped = (image_embeds * ((1 + k[:, None]) * neg - pos)).sum(-1)
        scores = srp(images, PROMPTS, k=k, step=step)
        swapped = srp(images, PROMPTS, k=k, step=step, swap=True)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(swapped, expected_swapped, rtol=0, atol=1e-6)
    assert (scores - swapped).abs().min() > 1e-4  # the swap changes the score


def test_srp_uses_pickscore_scale(pickscore):
    srp = SemanticRelativeReward(pickscore, positive_words=["Real"], negative_words=["Anime"])
    images = _images(seed=10)
    with torch.no_grad():
        image_embeds = pickscore.encode_image(images)
        pos = pickscore.encode_text([f"Real. {p}" for p in PROMPTS])
        neg = pickscore.encode_text([f"Anime. {p}" for p in PROMPTS])
        expected = pickscore.score_scale * (image_embeds * (1.2 * pos - neg)).sum(-1)
        torch.testing.assert_close(srp(images, PROMPTS, k=0.2), expected, rtol=0, atol=1e-6)


def test_srp_defaults_and_word_schedule(hps):
    assert DEFAULT_POSITIVE_WORDS == ("Natural-lighting", "Detail", "Detailed", "Real")
    assert DEFAULT_NEGATIVE_WORDS == ("Concept art", "Painting", "Anime", "Flat", "Oil")
    cycling = SemanticRelativeReward(hps)
    for step in range(12):
        assert cycling.words_at(step) == (DEFAULT_POSITIVE_WORDS[step % 4], DEFAULT_NEGATIVE_WORDS[step % 5])
    assert cycling.control_prompts(["a cat"], step=3) == (["Real. a cat"], ["Flat. a cat"])
    assert cycling.control_prompts(["a cat"], step=3, swap=True) == (["Flat. a cat"], ["Real. a cat"])
    fixed = SemanticRelativeReward(
        hps, positive_words=["Sharp", "Real"], negative_words=["Blurry"], word_schedule="fixed"
    )
    assert {fixed.words_at(step) for step in range(5)} == {("Sharp", "Blurry")}


def test_srp_cancels_a_shared_text_bias_and_plain_reward_does_not(hps):
    images = _images(seed=11)
    bias = 0.3 * torch.ones(TinyCLIPConfig().embed_dim)
    # A copy of the reward whose every text embedding carries the same added vector.
    biased_hps = copy.deepcopy(hps)
    biased_hps.encode_text = lambda prompts: hps.encode_text(prompts) + bias
    with torch.no_grad():
        clean = SemanticRelativeReward(hps)
        srp_clean, plain_clean = clean(images, PROMPTS, k=0.0, step=1), clean.plain(images, PROMPTS)
        srp_clean_k = clean(images, PROMPTS, k=0.5, step=1)
        biased = SemanticRelativeReward(biased_hps)
        srp_biased, plain_biased = biased(images, PROMPTS, k=0.0, step=1), biased.plain(images, PROMPTS)
        srp_biased_k = biased(images, PROMPTS, k=0.5, step=1)
    torch.testing.assert_close(srp_biased, srp_clean, rtol=0, atol=1e-6)
    assert (plain_biased - plain_clean).abs().min() > 1e-3
    assert (srp_biased_k - srp_clean_k).abs().min() > 1e-3  # only k = 0 cancels it fully


@pytest.fixture
def texts_encoded(hps):
    """How many texts HPS's text tower encodes: one entry per forward, its batch size."""
    runs = []
    handle = hps.model.token_embedding.register_forward_hook(lambda module, args, output: runs.append(args[0].shape[0]))
    yield runs
    handle.remove()


def test_text_cache_runs_the_text_encoder_once_per_text(hps, texts_encoded):
    srp = SemanticRelativeReward(hps)
    images = _images(seed=12)
    with torch.no_grad():
        first = srp(images, PROMPTS, k=0.1, step=0)
        second = srp(images, PROMPTS, k=0.1, step=0)
        assert sum(texts_encoded) == 4  # the positive and negative texts of both prompts, once
        srp(images, PROMPTS, k=0.1, step=0, swap=True)  # the same texts in other roles
        assert sum(texts_encoded) == 4
        srp(images, PROMPTS, k=0.1, step=1)  # new control words: new texts
        assert sum(texts_encoded) == 8
        srp(images[:1].expand(3, -1, -1, -1), ["a dog", "a dog", PROMPTS[0]], k=0.1, step=1)
        assert sum(texts_encoded) == 10  # only "Detail. a dog" and "Painting. a dog" are new, encoded once
        srp.plain(images, PROMPTS)
        srp.plain(images, PROMPTS)
        assert sum(texts_encoded) == 12
        # Seen, new and repeated texts in one call: each row is still the embedding of its own text.
        texts = ["Detail. a dog", "a new prompt", PROMPTS[1], "a new prompt", "Natural-lighting. a red circle"]
        torch.testing.assert_close(srp.encode_text_cached(texts), hps.encode_text(texts), rtol=0, atol=1e-6)
        assert sum(texts_encoded) == 12 + 1 + 5  # "a new prompt" once, then the uncached reference call
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    srp.clear_text_cache()
    with torch.no_grad():
        srp(images, PROMPTS, k=0.1, step=0)
    assert sum(texts_encoded) == 18 + 4


def test_cached_embeddings_do_not_depend_on_the_texts_encoded_with_them(hps):
    # Batched matmuls round differently with the batch: a cache filled in batches would make a score depend on
    # which texts happened to be new together, and a resumed training run would drift from an uninterrupted one.
    texts = [f"{word}. {prompt}" for word in DEFAULT_POSITIVE_WORDS for prompt in PROMPTS]
    with torch.no_grad():
        together = SemanticRelativeReward(hps).encode_text_cached(texts)
        alone = torch.cat([SemanticRelativeReward(hps).encode_text_cached([text]) for text in texts])
    assert torch.equal(together, alone)


def test_text_cache_is_per_dtype_of_the_base(hps):
    encoded = []
    srp = SemanticRelativeReward(copy.deepcopy(hps))
    srp.base.model.token_embedding.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    images = _images(seed=13)
    with torch.no_grad():
        srp(images, PROMPTS, k=0.1)
        srp.to(torch.float64)
        in_float64 = srp(images, PROMPTS, k=0.1)
        assert sum(encoded) == 8  # embeddings of the float32 model are not reused for the float64 one
        fresh = SemanticRelativeReward(srp.base)(images, PROMPTS, k=0.1)
    torch.testing.assert_close(in_float64, fresh, rtol=0, atol=0)


def test_text_cache_is_per_autocast_setting(hps, texts_encoded):
    srp = SemanticRelativeReward(hps)
    with torch.no_grad():
        in_float32 = srp.encode_text_cached(PROMPTS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_bfloat16 = srp.encode_text_cached(PROMPTS)
            assert sum(texts_encoded) == 4  # not the float32 embeddings again
            expected = torch.cat([hps.encode_text([prompt]) for prompt in PROMPTS])
    assert torch.equal(in_bfloat16, expected)
    assert (in_bfloat16 - in_float32).abs().max() > 1e-4


def test_text_cache_keeps_the_most_recently_used_texts(hps, texts_encoded):
    srp = SemanticRelativeReward(hps, cache_size=3)
    with torch.no_grad():
        srp.encode_text_cached(["a", "b", "c", "d", "e"])  # keeps c, d, e
        srp.encode_text_cached(["e", "c"])
        assert sum(texts_encoded) == 5
        srp.encode_text_cached(["a"])  # evicted: encoded again, and d (least recently used) goes
        srp.encode_text_cached(["e", "c", "a"])
        assert sum(texts_encoded) == 6
        srp.encode_text_cached(["d"])
        assert sum(texts_encoded) == 7


# --- bad input: clear errors before any model work ----------------------------------------------------------------


@pytest.fixture
def model_calls(hps):
    """Counts calls of HPS's image and text towers, to prove errors come before any model work."""
    calls = []
    handles = [
        hps.model.visual.register_forward_pre_hook(lambda *_: calls.append("image")),
        hps.model.token_embedding.register_forward_pre_hook(lambda *_: calls.append("text")),
    ]
    yield calls
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("name", ["hps", "srp"])
@pytest.mark.parametrize(
    "images,prompts,error,message",
    [
        (torch.rand(3, 32, 32), ["a"], ValueError, r"\[B, 3, H, W\].*\(3, 32, 32\)"),
        (torch.rand(1, 4, 32, 32), ["a"], ValueError, r"\[B, 3, H, W\].*\(1, 4, 32, 32\)"),
        (torch.rand(1, 32, 32, 3), ["a"], ValueError, r"\(1, 32, 32, 3\)"),
        (torch.rand(2, 3, 32, 32), ["a"], ValueError, "1 prompts for a batch of 2 images"),
        (torch.rand(1, 3, 32, 32), "a", TypeError, "list of strings; got str"),
        (torch.rand(1, 3, 32, 32), None, TypeError, "list of strings; got NoneType"),
        (torch.randint(0, 255, (1, 3, 32, 32)), ["a"], ValueError, "floating point"),
    ],
)
def test_bad_batches_fail_before_model_work(name, images, prompts, error, message, request, model_calls):
    reward = request.getfixturevalue(name)
    with pytest.raises(error, match=message):
        reward(images, prompts)
    assert model_calls == []


def test_bad_k_fails_before_model_work(srp, model_calls):
    with pytest.raises(ValueError, match=r"shape \[2\]; got shape \(3,\)"):
        srp(torch.rand(2, 3, 32, 32), PROMPTS, k=torch.zeros(3))
    assert model_calls == []


@pytest.fixture
def no_model_building(monkeypatch):
    """Make building any open_clip model fail, to prove a checkpoint error comes before that work."""

    def create_model(*args, **kwargs):
        raise AssertionError("an open_clip model was built before the checkpoint was checked")

    monkeypatch.setattr(open_clip, "create_model", create_model)


def test_missing_hps_checkpoint_names_path_and_source(files, tmp_path, no_model_building):
    missing = str(tmp_path / "nowhere" / "HPS_v2.1_compressed.pt")
    with pytest.raises(FileNotFoundError) as info:
        HPSv2Reward.from_pretrained(missing, architecture=files["architecture"])
    message = str(info.value)
    assert missing in message and "xswu/HPSv2" in message and "HPS_v2_compressed.pt" in message


def test_missing_open_clip_weights_name_the_path(files, tmp_path, no_model_building):
    missing = str(tmp_path / "tiny_clip.safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found at '{missing}'")):
        CLIPReward.from_pretrained(REGISTERED_ARCHITECTURE, pretrained=missing)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_missing_pickscore_folder_names_path_and_source(files, tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    # A relative path has the shape of a hub id and is looked up there: offline, so nothing waits on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = "models/PickScore_v1" if relative else str(tmp_path / "models" / "PickScore_v1")
    with pytest.raises(FileNotFoundError) as info:
        PickScoreReward.from_pretrained(missing, tokenizer=files["tokenizer"], cache_dir=str(tmp_path / "hub"))
    message = str(info.value)
    assert f"'{missing}'" in message and "https://huggingface.co/yuvalkirstain/PickScore_v1" in message


def test_missing_aesthetic_weights_name_path_and_source(tmp_path, open_clip_reward):
    missing = str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor") as info:
        AestheticReward.from_pretrained(missing, clip=open_clip_reward)
    assert missing in str(info.value)


def test_mismatched_hps_keys_are_listed(files, tmp_path):
    state_dict = torch.load(files["hps"], weights_only=True)["state_dict"]
    state_dict["ln_final.gamma"] = state_dict.pop("ln_final.weight")
    del state_dict["logit_scale"]
    path = str(tmp_path / "renamed.pt")
    torch.save({"state_dict": state_dict}, path)
    with pytest.raises(ValueError) as info:
        HPSv2Reward.from_pretrained(path, architecture=files["architecture"])
    message = str(info.value)
    assert path in message
    assert "missing 2 [ln_final.weight, logit_scale]" in message and "unexpected 1 [ln_final.gamma]" in message

    # A checkpoint of another model family: every key differs, and only the first few are listed.
    foreign = {"model." + key: value for key, value in state_dict.items()}
    torch.save({"state_dict": foreign}, path)
    with pytest.raises(ValueError) as info:
        HPSv2Reward.from_pretrained(path, architecture=files["architecture"])
    expected = sorted(files["open_clip_model"].state_dict())
    first_missing = ", ".join(expected[:5]) + f" and {len(expected) - 5} more"
    first_unexpected = ", ".join(sorted(foreign)[:5]) + f" and {len(foreign) - 5} more"
    listed = f"missing {len(expected)} [{first_missing}], unexpected {len(foreign)} [{first_unexpected}]"
    assert listed in str(info.value)


def test_wrong_architecture_lists_shape_mismatches(files, tmp_path):
    wider = TinyCLIPConfig(embed_dim=16)
    architecture = save_open_clip_local_dir(tiny_open_clip_model(config=wider), str(tmp_path / "wider"), wider)
    with pytest.raises(ValueError, match=r"other shapes.*text_projection \(32, 32\) vs \(32, 16\)"):
        HPSv2Reward.from_pretrained(files["hps"], architecture="local-dir:" + architecture)


def test_mismatched_transformers_keys_are_listed(files, tmp_path):
    folder = save_transformers_clip_dir(files["transformers_model"], str(tmp_path / "broken"))
    weights = os.path.join(folder, "model.safetensors")
    state_dict = load_file(weights)
    del state_dict["logit_scale"]
    save_file(state_dict, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 \[logit_scale\], unexpected 0"):
        PickScoreReward.from_pretrained(folder, tokenizer=files["tokenizer"])


def test_unsafe_torch_checkpoint_is_refused(files, tmp_path, no_model_building):
    path = str(tmp_path / "pickled.pt")
    torch.save({"state_dict": {}, "args": np.dtype("float32")}, path)  # a non-tensor global, as in old checkpoints
    with pytest.raises(ValueError, match=r"weights_only=True.*safetensors"):
        HPSv2Reward.from_pretrained(path, architecture=files["architecture"])


def test_offline_hub_requests_are_clear_errors(files, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"laion/CLIP-ViT-H-14-laion2B-s32B-b79K.*HF_HUB_OFFLINE"):
        PickScoreReward.from_pretrained(files["pickscore"], cache_dir=str(tmp_path))  # a copy without its tokenizer
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE.*HPS_v2\.1_compressed\.pt.*xswu/HPSv2 "):
        HPSv2Reward.from_pretrained("v2.1", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"yuvalkirstain/PickScore_v1.*HF_HUB_OFFLINE"):
        PickScoreReward.from_pretrained(cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        CLIPReward.from_pretrained("ViT-B-32", pretrained="openai")


@pytest.mark.parametrize("words", [{"positive_words": []}, {"negative_words": ()}])
def test_empty_word_list_is_an_error(hps, words):
    with pytest.raises(ValueError, match="at least one word"):
        SemanticRelativeReward(hps, **words)


def test_srp_needs_a_clip_like_base(aesthetic):
    with pytest.raises(TypeError, match="CLIPLikeReward.*AestheticReward"):
        SemanticRelativeReward(aesthetic)


def test_callable_reward_checks_what_the_function_returns():
    reward = CallableReward(lambda images, prompts: images.mean())
    with pytest.raises(ValueError, match=r"shape \[2\]; got \(\)"):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert isinstance(reward, Reward)
