"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): a Qwen2-VL reward model.

What the release is (the ``hpsv3`` 1.0.0 package of https://github.com/MizzenAI/HPSv3, transformers 4.45.2):

- the model is ``Qwen2VLRewardModelBT`` (``hpsv3/model/qwen2vl_trainer.py``): all of Qwen2-VL-7B-Instruct (vision
  tower, language model and its unused ``lm_head``), fine-tuned, plus ``rm_head``, the "ranknet" head without
  ``rm_head_kwargs``: ``Linear(3584, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)``, kept in
  float32 while the backbone is bfloat16 (``hpsv3/train.py``);
- a special token ``<|Reward|>`` is added to the tokenizer and the embeddings are resized to the new length; the head
  reads the last hidden state at that token;
- its two outputs are the mean and the log standard deviation of a Gaussian score, trained with the
  uncertainty-aware ranking loss (``sigma = exp(out[:, 1])``); the score is the mean (``hpsv3/inference.py``);
- the forward pass calls the language model without position ids, so the text positions are plain ``0..L-1`` on
  all three multimodal-RoPE axes (Qwen2-VL's own 3D image positions are not used);
- one image and one text per conversation, the instruction ``INSTRUCTION`` + ``PROMPT_WITH_SPECIAL_TOKEN`` through
  Qwen2-VL's chat template with the generation prompt, right padding; the image is resized (PIL bicubic) to
  ``smart_resize(h, w, 28, 256 * 28 * 28, 256 * 28 * 28)`` (448 x 448 for a square image), then Qwen2-VL's
  processor normalises it with CLIP's mean and std and cuts it into 14 x 14 x 2 patches;
- the checkpoint, ``HPSv3.safetensors`` in the hub repo MizzenAI/HPSv3, is the model's ``state_dict()`` under
  transformers 4.45: ``visual.*``, ``model.*`` (the language model), ``lm_head.weight``, ``rm_head.{0,3,5}.*``.

:class:`HPSv3Reward` rebuilds that model with transformers' ``Qwen2VLModel`` (without the ``lm_head``, which the
score never uses), loads the released file strictly, and scores ``[B, 3, H, W]`` images in [0, 1] differentiably:
the resize is torch's antialiased bicubic (PIL's kernel), the patches are cut with tensor ops.

What a user needs locally: the checkpoint, and a folder of Qwen/Qwen2-VL-7B-Instruct (the model HPSv3 was
fine-tuned from) with its ``config.json``, ``preprocessor_config.json``, tokenizer files and chat template; the
folder's weights are never read, the checkpoint holds all of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from .base import Reward
from .checkpoints import check_keys

HPSV3_HUB_REPO = "MizzenAI/HPSv3"
#: The released checkpoint's file name (``hpsv3/inference.py`` downloads it from the hub repo ``MizzenAI/HPSv3``).
HPSV3_CHECKPOINT_FILE = "HPSv3.safetensors"
#: The model HPSv3 was fine-tuned from (``model_name_or_path`` of ``hpsv3/config/HPSv3_7B.yaml``).
HPSV3_BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
HPSV3_SOURCE = (
    f"the HPSv3 checkpoint is {HPSV3_CHECKPOINT_FILE} in the Hugging Face repo {HPSV3_HUB_REPO} "
    f"(https://huggingface.co/{HPSV3_HUB_REPO}, see https://github.com/MizzenAI/HPSv3); download it and pass its path"
)
BASE_MODEL_HELP = (
    f"HPSv3 needs a local folder of {HPSV3_BASE_MODEL} (https://huggingface.co/{HPSV3_BASE_MODEL}), the model it was "
    "fine-tuned from, for its config.json, preprocessor_config.json, tokenizer files and chat template (its weights "
    f"are not read): pass base_model=FOLDER, or put {HPSV3_CHECKPOINT_FILE} into that folder"
)

#: The token added to Qwen2-VL's tokenizer whose last hidden state the head reads.
REWARD_TOKEN = "<|Reward|>"

# The instruction, byte for byte (trailing spaces included) as hpsv3/dataset/data_collator_qwen.py has it.
INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 "
    "being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, appearance, "
    "and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
PROMPT_WITH_SPECIAL_TOKEN = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"

#: The released inference's image size bounds (``prepare_batch`` of hpsv3/inference.py; the training config's too).
MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 256 * 28 * 28
_MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """The size HPSv3 resizes an image to (``smart_resize`` of hpsv3/dataset/utils.py, from qwen-vl-utils).

    Both sides become multiples of ``factor`` near the aspect ratio; the area is brought into
    ``[min_pixels, max_pixels]`` (with HPSv3's equal bounds, about ``256 * 28 * 28`` pixels).
    """
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise ValueError(f"HPSv3 takes images with an aspect ratio under {_MAX_ASPECT_RATIO}; got {height} x {width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def hpsv3_head(hidden_size: int, output_dim: int = 2) -> torch.nn.Sequential:
    """HPSv3's ``rm_head`` (the "ranknet" head without ``rm_head_kwargs``); its indices are the checkpoint's keys."""
    return torch.nn.Sequential(
        torch.nn.Linear(hidden_size, 1024),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.05),
        torch.nn.Linear(1024, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, output_dim),
    )


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The released loader's reading: safetensors, or a torch file holding the state dict (under ``"model"`` or not)."""
    what = "HPSv3"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} checkpoint not found at '{path}'; {HPSV3_SOURCE}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state_dict = load_file(path)
        except Exception as error:  # a truncated or foreign file: one line naming it
            raise ValueError(
                f"{what} checkpoint '{path}' cannot be read as safetensors ({type(error).__name__}: {error})"
            ) from error
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{what} checkpoint '{path}' cannot be read with torch.load(weights_only=True) "
                f"({type(error).__name__}: {str(error).splitlines()[0]}); re-save its state dict as safetensors"
            ) from error
        for wrapper in ("model", "state_dict"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
                state_dict = state_dict[wrapper]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{what} checkpoint '{path}' holds no state dict of tensors (got {type(state_dict).__name__})")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def _is_new_layout(state_dict: dict) -> bool:
    """Whether a reward-model state dict has transformers >= 4.52's Qwen2-VL keys (``model.language_model.*``,
    ``model.visual.*``) rather than the release's (``model.*``, ``visual.*``)."""
    return any(k.startswith(("model.language_model.", "model.visual.")) for k in state_dict)


def _own_keys(state_dict: dict, new_layout: bool) -> dict:
    """Rename a reward-model state dict to ``Qwen2VLModel``'s keys plus ``rm_head.*``, without ``lm_head.weight``
    (the language-model head, which the score never uses)."""
    renamed = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            continue
        if new_layout:
            own = key[len("model.") :] if key.startswith("model.") else key
        elif key.startswith("model."):
            own = "language_model." + key[len("model.") :]
        else:
            own = key
        renamed[own] = value
    return renamed


def _checkpoint_name(own_key: str, new_layout: bool) -> str:
    if new_layout:
        return own_key if own_key.startswith("rm_head.") else "model." + own_key
    if own_key.startswith("language_model."):
        return "model." + own_key[len("language_model.") :]
    return own_key


def _resolve_paths(checkpoint: str, base_model: str | None) -> tuple[str, str]:
    checkpoint = os.fspath(checkpoint)
    if os.path.isdir(checkpoint):
        folder = checkpoint
        checkpoint = os.path.join(folder, HPSV3_CHECKPOINT_FILE)
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"the folder '{folder}' has no {HPSV3_CHECKPOINT_FILE}; {HPSV3_SOURCE}")
    elif not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"HPSv3 checkpoint not found at '{checkpoint}'; {HPSV3_SOURCE}")
    if base_model is None:
        base_model = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isfile(os.path.join(base_model, "config.json")):
            raise FileNotFoundError(
                f"no Qwen2-VL config.json next to the HPSv3 checkpoint '{checkpoint}'; {BASE_MODEL_HELP}"
            )
    base_model = os.fspath(base_model)
    if not os.path.isdir(base_model) or not os.path.isfile(os.path.join(base_model, "config.json")):
        raise FileNotFoundError(f"'{base_model}' is not a local model folder with a config.json; {BASE_MODEL_HELP}")
    return checkpoint, base_model


class HPSv3Reward(Reward):
    """HPSv3's score (the mean of its predicted Gaussian) of ``[B, 3, H, W]`` images in [0, 1] for ``B`` prompts.

    Args:
        model: a transformers ``Qwen2VLModel`` (vision tower and language model) with HPSv3's weights.
        rm_head: the head, hidden state -> (mean, log sigma); kept in float32 whatever the model's dtype.
        processor: Qwen2-VL's processor (tokenizer, chat template, image mean / std and patch sizes) whose tokenizer
            holds ``<|Reward|>`` with the id the embeddings were trained with.
        min_pixels, max_pixels: the resize bounds; HPSv3's inference uses ``256 * 28 * 28`` for both.

    The images are resized with torch's antialiased bicubic, normalised and cut into patches with tensor ops, so the
    score is differentiable in the pixels. The resize has PIL's kernel, but works on floats: on a photograph it is a
    third of a uint8 level from the release's PIL resize on average, a few levels at hard edges (PIL rounds and clips
    to uint8 after each of its two passes), more where PIL clips the kernel's overshoot, which is kept here so that
    every pixel has a gradient. An image whose size needs no resize (448 x 448 at the default bounds) gets the
    processor's patches exactly. Use :meth:`from_pretrained`.
    """

    def __init__(
        self, model, rm_head: torch.nn.Module, processor, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
    ):
        super().__init__()
        self.model = model
        self.rm_head = rm_head.float()
        self.processor = processor
        tokenizer = processor.tokenizer
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        if self.reward_token_id is None or self.reward_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the processor's tokenizer has no {REWARD_TOKEN} token; add it as HPSv3 does")
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        config_image_token = getattr(model.config, "image_token_id", self.image_token_id)
        if config_image_token != self.image_token_id:
            raise ValueError(
                f"the model's image_token_id {config_image_token} is not the processor's {self.image_token} "
                f"({self.image_token_id}); are the config and the tokenizer from the same folder?"
            )
        image_processor = processor.image_processor
        self.patch_size = int(image_processor.patch_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.merge_size = int(image_processor.merge_size)
        vision = model.config.vision_config
        declared = (int(vision.patch_size), int(vision.temporal_patch_size), int(vision.spatial_merge_size))
        if declared != (self.patch_size, self.temporal_patch_size, self.merge_size):
            raise ValueError(
                f"the processor's patch, temporal patch and merge sizes "
                f"{(self.patch_size, self.temporal_patch_size, self.merge_size)} are not the vision tower's {declared}"
            )
        self.image_mean = tuple(float(m) for m in image_processor.image_mean)
        self.image_std = tuple(float(s) for s in image_processor.image_std)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self._freeze()

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str,
        base_model: str | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
    ) -> HPSv3Reward:
        """Load the released checkpoint as ``HPSv3RewardInferencer`` does (hpsv3/inference.py, hpsv3/train.py).

        Args:
            checkpoint: ``HPSv3.safetensors`` (or a torch file of the same state dict), or a folder holding it.
            base_model: a local folder of Qwen2-VL-7B-Instruct (config, processor; weights not read). By default the
                checkpoint's own folder, which then must hold those files too.
            dtype: the backbone's dtype (bfloat16, as released); the head stays float32.
            device: where to put the model (default: the CPU).
        """
        from transformers import AutoConfig, AutoProcessor, Qwen2VLModel

        checkpoint, base_model = _resolve_paths(checkpoint, base_model)
        config = AutoConfig.from_pretrained(base_model)
        if getattr(config, "model_type", None) != "qwen2_vl":
            raise ValueError(
                f"'{base_model}' holds a {getattr(config, 'model_type', None)!r} model; HPSv3 is built on "
                f"Qwen2-VL ('qwen2_vl'). {BASE_MODEL_HELP}"
            )
        try:
            processor = AutoProcessor.from_pretrained(base_model, padding_side="right")
        except Exception as error:
            raise FileNotFoundError(
                f"cannot load Qwen2-VL's processor from '{base_model}' ({type(error).__name__}: {error}); {BASE_MODEL_HELP}"
            ) from error
        if not hasattr(processor, "image_processor") or not hasattr(processor, "image_token_id"):
            raise ValueError(
                f"'{base_model}' has no Qwen2-VL processor (got {type(processor).__name__}); {BASE_MODEL_HELP}"
            )
        processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})

        state_dict = _read_checkpoint(checkpoint)
        new_layout = _is_new_layout(state_dict)
        state_dict = _own_keys(state_dict, new_layout)
        # The release resizes the embeddings to the tokenizer plus <|Reward|> (hpsv3/train.py).
        config.text_config.vocab_size = len(processor.tokenizer)
        config.text_config.pad_token_id = processor.tokenizer.pad_token_id
        config.text_config.use_cache = False

        from accelerate import init_empty_weights

        # Parameters on the meta device (the checkpoint brings them), buffers (the RoPE tables) computed for real.
        with init_empty_weights(include_buffers=False):
            model = Qwen2VLModel(config)
        rm_head = hpsv3_head(config.text_config.hidden_size)
        module = torch.nn.Module()
        module.add_module("model", model)
        module.add_module("rm_head", rm_head)
        expected = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in module.state_dict().items()}

        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        check_keys(
            [_checkpoint_name(k, new_layout) for k in sorted(expected)],
            [_checkpoint_name(k, new_layout) for k in missing],
            [_checkpoint_name(k, new_layout) for k in unexpected],
            what="HPSv3",
            path=checkpoint,
        )
        embed_key = "language_model.embed_tokens.weight"
        rows = state_dict[embed_key].shape[0]
        if rows != len(processor.tokenizer):
            raise ValueError(
                f"HPSv3 checkpoint '{checkpoint}' has embeddings for {rows} tokens, but the tokenizer of '{base_model}' "
                f"with {REWARD_TOKEN} has {len(processor.tokenizer)}; is that folder {HPSV3_BASE_MODEL}?"
            )
        mismatched = [
            f"{_checkpoint_name(k, new_layout)} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
            for k, v in state_dict.items()
            if v.shape != expected[k].shape
        ]
        if mismatched:
            shown = ", ".join(mismatched[:5]) + (f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
            raise ValueError(
                f"HPSv3 checkpoint '{checkpoint}' does not match the Qwen2-VL config of '{base_model}': "
                f"{len(mismatched)} tensors have other shapes (checkpoint vs model) [{shown}]; is that folder "
                f"{HPSV3_BASE_MODEL}?"
            )
        model.load_state_dict(
            {k: v for k, v in state_dict.items() if not k.startswith("rm_head.")}, strict=True, assign=True
        )
        rm_head.load_state_dict(
            {k[len("rm_head.") :]: v for k, v in state_dict.items() if k.startswith("rm_head.")}, strict=True
        )
        model.to(dtype)
        reward = cls(model, rm_head, processor, min_pixels=min_pixels, max_pixels=max_pixels)
        return reward if device is None else reward.to(device)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() move the backbone; the head stays float32 as in the release.
        super()._apply(fn, recurse)
        if self.rm_head is not None:
            for tensor in self.rm_head.parameters():
                tensor.data = tensor.data.float()
        return self

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` images in [0, 1] -> Qwen2-VL's ``pixel_values`` ``[B * h * w, 3 * 2 * 14 * 14]`` (float32)
        and ``image_grid_thw`` ``[B, 3]``, differentiably (what ``fetch_image`` and Qwen2-VL's processor do)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        batch, channels, height, width = images.shape
        patch, temporal, merge = self.patch_size, self.temporal_patch_size, self.merge_size
        resized_height, resized_width = smart_resize(height, width, patch * merge, self.min_pixels, self.max_pixels)
        pixels = images.float()
        if (resized_height, resized_width) != (height, width):
            pixels = TF.resize(
                pixels, [resized_height, resized_width], interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        pixels = TF.normalize(pixels, list(self.image_mean), list(self.image_std))
        grid_h, grid_w = resized_height // patch, resized_width // patch
        # One image is a clip of `temporal` identical frames; patches in the processor's order (merge groups together).
        patches = pixels.unsqueeze(1).expand(batch, temporal, channels, resized_height, resized_width)
        patches = patches.reshape(
            batch, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
        )
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        pixel_values = patches.reshape(batch * grid_h * grid_w, channels * temporal * patch * patch)
        grid_thw = torch.tensor([[1, grid_h, grid_w]] * batch, dtype=torch.long, device=images.device)
        return pixel_values, grid_thw

    def conversations(self, prompts: Sequence[str]) -> list[list[dict]]:
        """The released messages: one user turn of an image and the instruction with the prompt and ``<|Reward|>``."""
        text = INSTRUCTION + PROMPT_WITH_SPECIAL_TOKEN
        return [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text.format(text_prompt=p)}]}]
            for p in prompts
        ]

    def tokenize(self, prompts: Sequence[str], grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` as Qwen2-VL's processor makes them: the chat template with the
        generation prompt, each image placeholder expanded to its merged-patch count, right padding."""
        texts = self.processor.apply_chat_template(
            self.conversations(prompts), tokenize=False, add_generation_prompt=True
        )
        counts = (grid_thw.prod(-1) // self.merge_size**2).tolist()
        expanded = []
        for text, count in zip(texts, counts, strict=True):
            if text.count(self.image_token) != 1:
                raise ValueError(f"the prompt must not contain Qwen2-VL's image token {self.image_token}")
            expanded.append(text.replace(self.image_token, self.image_token * count))
        encoded = self.processor.tokenizer(expanded, padding=True, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    def predict(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """HPSv3's Gaussian of each image: ``(mean, sigma)``, float32 ``[B]`` each; the score is the mean."""
        self.check_inputs(images, prompts)
        outputs = self._head_outputs(images, list(prompts))
        return outputs[:, 0], torch.exp(outputs[:, 1])

    def _head_outputs(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = self.device
        pixel_values, grid_thw = self.preprocess(images.to(device))
        input_ids, attention_mask = self.tokenize(prompts, grid_thw)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        reward_mask = input_ids == self.reward_token_id
        if not bool((reward_mask.sum(-1) == 1).all()):
            raise ValueError(f"each prompt must leave exactly one {REWARD_TOKEN} token; a prompt contains it")

        embeddings = self.model.get_input_embeddings()(input_ids)
        vision = self.model.visual(pixel_values.to(self.dtype), grid_thw=grid_thw)
        image_embeds = getattr(vision, "pooler_output", vision)
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
        embeddings = embeddings.masked_scatter(image_mask, image_embeds.to(embeddings.dtype))
        # No position ids, as the release: positions 0..L-1 on all three RoPE axes.
        hidden = self.model.language_model(
            inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return self.rm_head(hidden[reward_mask].float())

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._head_outputs(images, list(prompts))[:, 0]
