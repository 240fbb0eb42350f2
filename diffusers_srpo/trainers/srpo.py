"""SRPO: Direct-Align with Semantic Relative Preference (Shen et al. 2025; ../SPEC.md sections 1-2)."""

from __future__ import annotations

import os

import torch

from .base import BaseTrainer, StepOutput
from .config import SRPOConfig

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Random stream of the training sigmas (see BaseTrainer.generator).
_SIGMA_STREAM = 2


class SRPOTrainer(BaseTrainer):
    """Fine-tune a flow pipeline (FLUX.1, FLUX.2, Qwen-Image, SD3) with SRPO; ``train()`` writes a LoRA that
    ``pipe.load_lora_weights`` reads.

    ``reward`` is a CLIP-like reward (``HPSv2Reward``, ``PickScoreReward``, ``CLIPReward``), wrapped in
    ``SemanticRelativeReward`` with the config's control words, or an already built
    ``SemanticRelativeReward``. ``prompts`` is a list, a .txt or a .jsonl path.

    With ``SRPOConfig(method="direct-align")`` the same Direct-Align step scores the plain reward (any
    differentiable reward, written with ``reward_template``) on the denoise branch: the ablation without SRP.
    """

    config_class = SRPOConfig
    config_file_name = "srpo_config.json"

    # ----------------------------------------------------------------------------------- method hooks
    @classmethod
    def check_files(cls, config: SRPOConfig) -> str | None:
        if config.x0_source == "dataset":
            _image_paths(config.image_folder)
        return super().check_files(config)

    def prepare_data(self) -> None:
        self.image_paths: list[str] | None = None
        if self.config.x0_source == "dataset":
            self.image_paths, self.prompts = _image_folder(self.config.image_folder, self.prompts)

    @property
    def uses_srp(self) -> bool:
        return self.config.method == "srpo"

    def prepare_reward(self, reward):
        from ..rewards import CLIPLikeReward, SemanticRelativeReward

        if not self.uses_srp:
            return super().prepare_reward(reward)
        if reward is None:
            raise ValueError("SRPOTrainer needs a reward: pass reward=HPSv2Reward.from_pretrained(path) or another CLIP-like reward")
        if isinstance(reward, SemanticRelativeReward):
            srp = reward
        elif isinstance(reward, CLIPLikeReward):
            srp = SemanticRelativeReward(
                reward, self.config.positive_words, self.config.negative_words, word_schedule=self.config.word_schedule
            )
        else:
            raise TypeError(
                "SRPO scores images against control words, so it needs a CLIP-like reward "
                f"(HPSv2Reward, PickScoreReward, CLIPReward or a CLIPLikeReward subclass), got {type(reward).__name__}"
            )
        self.check_reward_differentiable(srp)
        return srp

    def scheduler_overrides(self) -> dict:
        return {
            **super().scheduler_overrides(),
            "train_window_start": self.config.train_window_start,
            "train_window_end": self.config.train_window_end,
            **{
                name: getattr(self.config, name)
                for name in ("denoise_discount_start", "denoise_discount_end", "invert_discount_start", "invert_discount_end")
            },
        }

    def model_card_details(self) -> dict[str, str]:
        window = {"training window": f"[{self.config.train_window_start}, {self.config.train_window_end}] of 50"}
        if not self.uses_srp:
            return {"reward": type(self.reward).__name__, "reward template": self.config.reward_template, **window}
        srp = self.reward
        return {
            "reward": type(srp.base).__name__,
            "positive control words": ", ".join(srp.positive_words),
            "negative control words": ", ".join(srp.negative_words),
            **window,
            "inversion branch": "on" if self.config.use_inversion else "off",
        }

    # ----------------------------------------------------------------------------------- one update
    def clean_latents(self, noise, text, indices: list[int]) -> torch.Tensor:
        """x0 of the update: the current model's rollout from ``noise``, or the VAE encoding of dataset images."""
        if self.image_paths is None:
            return self.sample_latents(noise, text, self.rollout_sigmas, self.config.rollout_guidance)
        images = torch.stack([_load_image(self.image_paths[i], self.config.resolution) for i in indices])
        return self.adapter.encode_images(images).to(noise.dtype)

    def training_step(self, step: int, micro_step: int = 0) -> StepOutput:
        config, accelerator, scheduler = self.config, self.accelerator, self.scheduler
        device, size = accelerator.device, config.resolution
        indices = self.indices_for_step(step, micro_step)
        prompts = [self.prompts[i] for i in indices]
        text = self.text_for(prompts)
        # The noise prior is the same for every prompt of an update (shared_noise, the reference); each sample's
        # timestep is drawn from its own position's stream, so batch and accumulation split the same draws.
        noise = self.step_noise(step, len(prompts), micro_step=micro_step)
        x0 = self.clean_latents(noise, text, indices)
        sigmas = scheduler.sample_training_sigmas(
            len(prompts), generator=self.sample_generators(step, _SIGMA_STREAM, micro_step)
        ).to(device)

        branches = [("denoise", sigmas.sigma_hi, sigmas.sigma_mid, sigmas.denoise_discount, False)]
        if config.use_inversion:
            branches.append(("invert", sigmas.sigma_lo, sigmas.sigma_invert_to, sigmas.invert_discount, True))
        logs: dict[str, float] = {}

        def branch_loss(name, sigma_from, sigma_to, discount, swap):
            def compute() -> torch.Tensor:
                with accelerator.autocast():
                    noisy = scheduler.add_noise_prior(x0, noise, sigma_from)
                    timestep = scheduler.training_timestep(sigma_from)
                    velocity = self.velocity(noisy, timestep, text, config.train_guidance)
                    # Recovery divides by (1 - sigma_to): do it in fp32, not in the weight dtype. The recovered
                    # x0 is written in the VAE's input layout in the same pass (one fused kernel on CUDA).
                    vae_input = self.adapter.recover_vae_input(
                        velocity.float(), noisy.float(), sigma_from, sigma_to, noise.float(), size, size
                    )
                    images = self.adapter.decode_vae_input(vae_input)
                    if self.uses_srp:
                        scores = self.reward(images, prompts, k=discount, swap=swap, step=step)
                    else:
                        scores = self.reward(images, prompts)
                loss = self.hinge_loss(scores, logs, log_key="hinge_active" if name == "denoise" else f"hinge_active_{name}")
                logs[f"reward_{name}"] = scores.detach().mean().item()
                if name == "denoise":
                    logs["reward"] = logs["reward_denoise"]
                return loss

            return compute

        return StepOutput(losses={branch[0]: branch_loss(*branch) for branch in branches}, logs=logs)


def _image_paths(folder: str) -> list[str]:
    """The images of ``folder``, sorted; a clear error for a missing folder or one without images."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image_folder {folder!r} does not exist")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(_IMAGE_SUFFIXES))
    if not paths:
        raise ValueError(f"image_folder {folder!r} holds no image ({', '.join(_IMAGE_SUFFIXES)})")
    return paths


def _image_folder(folder: str, prompts: list[str]) -> tuple[list[str], list[str]]:
    """Images of ``folder`` and their captions (``IMAGE.txt`` beside each, else the prompts in turn)."""
    paths = _image_paths(folder)
    captions = []
    for i, path in enumerate(paths):
        sidecar = os.path.splitext(path)[0] + ".txt"
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                captions.append(f.read().strip() or prompts[i % len(prompts)])
        else:
            captions.append(prompts[i % len(prompts)])
    return paths, captions


def _load_image(path: str, size: int) -> torch.Tensor:
    """An RGB image as ``[3, size, size]`` in [0, 1]: shorter side resized to ``size``, centre crop."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as image:
        tensor = F.pil_to_tensor(image.convert("RGB"))
    tensor = F.resize(tensor, size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(tensor, [size, size]).float().div(255).clamp(0, 1)
