"""HPSv3 as a reward: a tiny Qwen2-VL reward model saved as the release saves it (``HPSv3.safetensors`` with
transformers 4.45's keys, a Qwen2-VL-7B-Instruct-shaped base folder), loaded with ``load_reward("hpsv3:...")`` and
checked against the release's own steps, reimplemented here: the messages of ``hpsv3/inference.py``, the PIL resize of
``hpsv3/dataset/utils.py``, Qwen2-VL's processor, transformers' own multimodal forward with the release's sequential
positions, the head at every position and the ``<|Reward|>`` row picked, its first output the score.
"""

import hashlib
import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_srpo.rewards import HPSv3Reward, load_reward
from diffusers_srpo.rewards.hpsv3 import (
    HPSV3_CHECKPOINT_FILE,
    INSTRUCTION,
    MAX_PIXELS,
    MIN_PIXELS,
    PROMPT_WITH_SPECIAL_TOKEN,
    REWARD_TOKEN,
    smart_resize,
)
from diffusers_srpo.testing.hpsv3 import released_state_dict, save_qwen2_vl_base, save_tiny_hpsv3

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

PROMPTS = ["a red circle", "a photo of a cat on the grass, with a blue square"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float32 tiny HPSv3: the checkpoint in its own folder, the Qwen2-VL base folder beside it."""
    root = tmp_path_factory.mktemp("hpsv3")
    path, base, model, processor = save_tiny_hpsv3(str(root / "hpsv3"), str(root / "Qwen2-VL"), dtype=torch.float32)
    reward = load_reward(f"hpsv3:{path}", base_model=base, dtype=torch.float32)
    return SimpleNamespace(root=root, path=path, base=base, model=model, processor=processor, reward=reward)


@pytest.fixture(scope="module")
def released_folder(tiny):
    """A tiny HPSv3 as released (bfloat16 backbone), in one folder with the Qwen2-VL files: what `hpsv3:FOLDER` reads."""
    folder = tiny.root / "one-folder"
    save_tiny_hpsv3(str(folder))
    return folder


def _photo() -> Image.Image:
    """A real photograph (matplotlib's sample Grace Hopper, 512 x 600), RGB."""
    from matplotlib import cbook

    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def _crops(size=448):
    """Two different ``size``-square crops of the photo: inputs that the release's resize leaves as they are."""
    photo = _photo()
    return [photo.crop((0, 0, size, size)), photo.crop((512 - size, 600 - size, 512, 600))]


def _to_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])


def _release_smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    # hpsv3/dataset/utils.py, written out again.
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _release_batch(processor, images, prompts):
    """``prepare_batch`` of hpsv3/inference.py: the messages, ``fetch_image``'s PIL resize, then the processor."""
    messages = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image, "min_pixels": MAX_PIXELS, "max_pixels": MAX_PIXELS},
                    {"type": "text", "text": INSTRUCTION.format(text_prompt=text) + PROMPT_WITH_SPECIAL_TOKEN},
                ],
            }
        ]
        for text, image in zip(prompts, images, strict=True)
    ]
    resized = []
    for image in images:
        width, height = image.size
        resized_height, resized_width = _release_smart_resize(height, width)
        resized.append(image.resize((resized_width, resized_height), Image.BICUBIC))
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=text, images=resized, padding=True, return_tensors="pt")


def _release_outputs(model, processor, images, prompts, sequential_positions=True):
    """``Qwen2VLRewardModelBT.forward``: the head's ``[B, 2]`` at ``<|Reward|>``. The release calls the language
    model without position ids, which means positions ``0..L-1`` on the three RoPE axes; ``sequential_positions=False``
    uses Qwen2-VL's own 3D image positions instead (what the release does not do)."""
    batch = _release_batch(processor, images, prompts)
    input_ids = batch["input_ids"]
    batch_size, length = input_ids.shape
    positions = torch.arange(length).view(1, 1, -1).expand(3, batch_size, -1) if sequential_positions else None
    with torch.no_grad():
        hidden = model.model(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch.get("mm_token_type_ids"),
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state
        logits = model.rm_head(hidden.float())
    special = input_ids == processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    return logits[special].view(batch_size, -1)


def test_the_instruction_is_the_released_text():
    # sha256 of INSTRUCTION + prompt_with_special_token of hpsv3/dataset/data_collator_qwen.py (hpsv3 1.0.0).
    digest = hashlib.sha256((INSTRUCTION + PROMPT_WITH_SPECIAL_TOKEN).encode()).hexdigest()
    assert digest == "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"


def test_smart_resize_is_the_release_s():
    for height, width in [
        (1024, 1024),
        (512, 512),
        (448, 448),
        (320, 480),
        (1024, 768),
        (600, 512),
        (64, 900),
        (20, 20),
    ]:
        assert smart_resize(height, width) == _release_smart_resize(height, width)
    assert smart_resize(1024, 1024) == (448, 448)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_the_checkpoint_and_base_folder_are_in_the_released_format(tiny, released_folder):
    state_dict = load_file(tiny.path)
    assert os.path.basename(tiny.path) == "HPSv3.safetensors"
    for key in ["visual.patch_embed.proj.weight", "visual.merger.mlp.2.weight", "model.embed_tokens.weight",
                "model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight",
                "rm_head.0.weight", "rm_head.3.bias", "rm_head.5.weight"]:  # fmt: skip
        assert key in state_dict, key
    assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in state_dict)
    assert state_dict["rm_head.5.weight"].shape == (2, 16) and state_dict["rm_head.0.weight"].shape[0] == 1024
    # The embeddings were resized to the tokenizer plus <|Reward|>; config.json keeps the padded hub size.
    assert state_dict["model.embed_tokens.weight"].shape[0] == len(tiny.processor.tokenizer)
    config = json.loads(open(os.path.join(tiny.base, "config.json")).read())
    assert config["model_type"] == "qwen2_vl" and "text_config" not in config
    assert config["vocab_size"] > len(tiny.processor.tokenizer)
    files = set(os.listdir(tiny.base))
    assert {"config.json", "preprocessor_config.json", "chat_template.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".safetensors") for name in files)

    # As released: the backbone in bfloat16, the head in float32.
    dtypes = {key: value.dtype for key, value in load_file(str(released_folder / HPSV3_CHECKPOINT_FILE)).items()}
    assert {d for k, d in dtypes.items() if not k.startswith("rm_head.")} == {torch.bfloat16}
    assert {d for k, d in dtypes.items() if k.startswith("rm_head.")} == {torch.float32}


def test_scores_equal_the_released_steps(tiny):
    images = _crops()
    expected = _release_outputs(tiny.model, tiny.processor, images, PROMPTS)
    scores = tiny.reward(_to_tensor(images), PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    torch.testing.assert_close(scores, expected[:, 0], rtol=0, atol=1e-5)
    mean, sigma = tiny.reward.predict(_to_tensor(images), PROMPTS)
    torch.testing.assert_close(mean, scores, rtol=0, atol=0)
    torch.testing.assert_close(sigma, expected[:, 1].exp(), rtol=1e-4, atol=0)
    # The test sees the positions: Qwen2-VL's 3D image positions, which the release does not use, score otherwise.
    rope_3d = _release_outputs(tiny.model, tiny.processor, images, PROMPTS, sequential_positions=False)
    assert (rope_3d[:, 0] - expected[:, 0]).abs().max() > 1e-3
    # The images and the prompts both move the score.
    assert (expected[0, 0] - expected[1, 0]).abs() > 1e-3
    swapped = tiny.reward(_to_tensor(images), PROMPTS[::-1])
    assert (swapped - scores).abs().max() > 1e-4


def test_preprocessing_equals_the_processor_on_a_real_photo(tiny):
    reward, processor = tiny.reward, tiny.processor
    # An image the release does not resize: the same patches as the processor's, to float precision.
    images = _crops()
    batch = _release_batch(processor, images, PROMPTS)
    pixel_values, grid_thw = reward.preprocess(_to_tensor(images))
    torch.testing.assert_close(grid_thw, batch["image_grid_thw"])
    torch.testing.assert_close(pixel_values, batch["pixel_values"], rtol=0, atol=1e-5)
    input_ids, attention_mask = reward.tokenize(PROMPTS, grid_thw)
    assert torch.equal(input_ids, batch["input_ids"]) and torch.equal(attention_mask, batch["attention_mask"])
    assert attention_mask[0].sum() < attention_mask[1].sum()  # the prompts differ in length: right padding used

    # The whole 512 x 600 photo, downscaled to 476 x 392: torch's antialiased bicubic (PIL's kernel) on the float image
    # against PIL's on uint8, which rounds and clips to uint8 after each of its two passes. In uint8 levels (one level is
    # 1 / 255 / std, about 0.015 here): under half a level on average, a few at high-contrast edges, and most where PIL
    # clips the kernel's overshoot, which the differentiable path keeps.
    photo = _photo()
    batch = _release_batch(processor, [photo], PROMPTS[:1])
    pixel_values, grid_thw = reward.preprocess(_to_tensor([photo]))
    torch.testing.assert_close(grid_thw, batch["image_grid_thw"])
    assert tuple(grid_thw[0].tolist()) == (1, 476 // 14, 392 // 14)
    level = 1 / 255 / torch.tensor(processor.image_processor.image_std).min()
    difference = (pixel_values - batch["pixel_values"]).abs() / level
    assert difference.mean() < 0.5 and torch.quantile(difference.flatten()[::7], 0.999) < 4
    assert difference.max() < 20


def test_scores_of_resized_images_are_close_to_the_release_s(tiny):
    # Only the resize differs (float torch against uint8 PIL): far less than what tells two images apart.
    photo = _photo()
    images = [photo, photo.transpose(Image.FLIP_LEFT_RIGHT)]
    expected = _release_outputs(tiny.model, tiny.processor, images, PROMPTS[:1] * 2)[:, 0]
    scores = tiny.reward(_to_tensor(images), PROMPTS[:1] * 2)
    assert (scores - expected).abs().max() < 1e-3
    assert (expected[0] - expected[1]).abs() > 3e-3 and torch.equal(scores.argsort(), expected.argsort())


def test_the_gradient_reaches_the_pixels(tiny):
    images = _to_tensor(_crops(224)).requires_grad_(True)  # upscaled to 448 x 448 inside: the resize is differentiated
    tiny.reward(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert (images.grad[0].abs().sum() > 0) and (images.grad[1].abs().sum() > 0)
    assert all(not p.requires_grad for p in tiny.reward.parameters()) and not tiny.reward.training


def test_batching_and_padding_leave_each_score_unchanged(tiny):
    images = _to_tensor(_crops())
    together = tiny.reward(images, PROMPTS)
    alone = torch.cat([tiny.reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_the_released_dtypes_and_the_folder_spec(released_folder):
    # One folder holding HPSv3.safetensors and the Qwen2-VL files: `hpsv3:FOLDER` alone loads it, in bfloat16.
    folder = released_folder
    reward = load_reward(f"hpsv3:{folder}")
    assert isinstance(reward, HPSv3Reward)
    assert reward.dtype == torch.bfloat16 and reward.rm_head[0].weight.dtype == torch.float32
    reward.to(torch.float16)
    assert reward.dtype == torch.float16 and reward.rm_head[0].weight.dtype == torch.float32
    reward.to(torch.bfloat16)
    images = _to_tensor(_crops())
    scores = reward(images, PROMPTS)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    exact = HPSv3Reward.from_pretrained(str(folder / HPSV3_CHECKPOINT_FILE), dtype=torch.float32)(images, PROMPTS)
    assert (scores - exact).abs().max() < 0.05 * exact.abs().max() + 1e-3


def test_a_checkpoint_saved_by_a_newer_transformers_loads_too(tiny):
    # transformers >= 4.52 names the same weights model.visual.* and model.language_model.*.
    folder = tiny.root / "new-layout"
    folder.mkdir()
    state_dict = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    assert "model.language_model.embed_tokens.weight" in state_dict
    save_file(state_dict, str(folder / HPSV3_CHECKPOINT_FILE))
    reward = HPSv3Reward.from_pretrained(str(folder), base_model=tiny.base, dtype=torch.float32)
    images = _to_tensor(_crops())
    torch.testing.assert_close(reward(images, PROMPTS), tiny.reward(images, PROMPTS), rtol=0, atol=1e-6)


def _one_line_error(error_type, match, load):
    with pytest.raises(error_type, match=match) as caught:
        load()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_wrong_files_fail_with_one_clear_error(tiny, tmp_path):
    base = tiny.base
    _one_line_error(ValueError, "needs a source", lambda: load_reward("hpsv3"))
    _one_line_error(
        FileNotFoundError, "not found.*MizzenAI/HPSv3", lambda: load_reward(f"hpsv3:{tmp_path / 'HPSv3.safetensors'}")
    )
    _one_line_error(FileNotFoundError, "has no HPSv3.safetensors", lambda: load_reward(f"hpsv3:{tmp_path}"))
    # The checkpoint alone, without the Qwen2-VL folder.
    _one_line_error(FileNotFoundError, "Qwen2-VL-7B-Instruct.*base_model", lambda: load_reward(f"hpsv3:{tiny.path}"))
    _one_line_error(
        FileNotFoundError,
        "not a local model folder",
        lambda: load_reward(f"hpsv3:{tiny.path}", base_model=str(tmp_path)),
    )

    # A file that is not safetensors, and a reward checkpoint of another model.
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a checkpoint")
    _one_line_error(ValueError, "cannot be read", lambda: load_reward(f"hpsv3:{garbage}", base_model=base))
    other = tmp_path / "aesthetic.safetensors"
    save_file({"layers.0.weight": torch.zeros(4, 4), "layers.0.bias": torch.zeros(4)}, str(other))
    message = _one_line_error(
        ValueError, "does not match the model", lambda: load_reward(f"hpsv3:{other}", base_model=base)
    )
    assert "unexpected 2 [layers.0.bias, layers.0.weight]" in message

    # The release's weights without the head (a Qwen2-VL checkpoint, not HPSv3's).
    headless = tmp_path / "headless.safetensors"
    state_dict = released_state_dict(tiny.model, torch.float32)
    save_file({k: v for k, v in state_dict.items() if not k.startswith("rm_head.")}, str(headless))
    message = _one_line_error(ValueError, "missing 6", lambda: load_reward(f"hpsv3:{headless}", base_model=base))
    assert "rm_head.0.weight" in message

    # A base folder whose tokenizer is not the one the checkpoint was trained with.
    other_base = tmp_path / "other-base"
    shutil.copytree(base, other_base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(str(other_base))
    _one_line_error(
        ValueError, "embeddings for .* tokens", lambda: load_reward(f"hpsv3:{tiny.path}", base_model=str(other_base))
    )

    # A base folder of another architecture.
    clip_base = tmp_path / "clip-base"
    save_qwen2_vl_base(str(clip_base))
    (clip_base / "config.json").write_text(json.dumps({"model_type": "clip"}))
    _one_line_error(ValueError, "qwen2_vl", lambda: load_reward(f"hpsv3:{tiny.path}", base_model=str(clip_base)))
