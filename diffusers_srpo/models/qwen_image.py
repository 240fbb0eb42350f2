"""Qwen-Image: everything the trainers need to know about ``QwenImagePipeline``, in one place."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from .base import ModelAdapter, PackedLatents, TextConditioning, classifier_free_guidance, dynamically_shifted_sigmas

logger = logging.getLogger(__name__)

# The projections diffusers' Qwen-Image LoRA training example targets (examples/dreambooth/
# train_dreambooth_lora_qwen_image.py): the image stream's attention only (peft matches suffixes, so not add_q_proj).
QWEN_IMAGE_LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


def _pad_tokens(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` ``[B, L, ...]`` with zeros appended along the tokens up to ``length``."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], missing, *tensor.shape[2:])], dim=1)


def _trim_tokens(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing token positions that no sample attends to (every prompt has the template's closing ones)."""
    length = int(mask.any(dim=0).nonzero().max()) + 1
    return embeds[:, :length], mask[:, :length]


@dataclass
class QwenImageConditioning(TextConditioning):
    """Qwen-Image's text conditioning: the prompt's Qwen2.5-VL hidden states and the negative prompt's (for true CFG),
    each with its token mask (1: a token, 0: padding; always explicit, even where the pipeline would pass ``None``).

    The token count depends on the prompts: :meth:`cat` pads to the longest with masked zeros and :meth:`select`
    drops the padding a sample does not need, so a prompt's conditioning does not depend on the batch it was
    encoded in.
    """

    prompt_embeds: torch.Tensor  # [B, L, D]
    prompt_embeds_mask: torch.Tensor  # [B, L] long
    negative_prompt_embeds: torch.Tensor  # [B, L_neg, D]
    negative_prompt_embeds_mask: torch.Tensor  # [B, L_neg] long

    def select(self, index: int) -> QwenImageConditioning:
        item = super().select(index)
        prompt_embeds, prompt_embeds_mask = _trim_tokens(item.prompt_embeds, item.prompt_embeds_mask)
        negative, negative_mask = _trim_tokens(item.negative_prompt_embeds, item.negative_prompt_embeds_mask)
        return QwenImageConditioning(prompt_embeds, prompt_embeds_mask, negative, negative_mask)

    @classmethod
    def cat(cls, items: list[QwenImageConditioning]) -> QwenImageConditioning:
        def join(name):
            values = [getattr(item, name) for item in items]
            length = max(value.shape[1] for value in values)
            return torch.cat([_pad_tokens(value, length) for value in values])

        return cls(**{f.name: join(f.name) for f in dataclasses.fields(cls)})


class QwenImageAdapter(PackedLatents, ModelAdapter):
    """Drives a ``diffusers.QwenImagePipeline`` (Qwen-Image and fine-tunes of it)."""

    name = "qwen-image"
    pipeline_class_names = ("QwenImagePipeline",)
    transformer_class_names = ("QwenImageTransformer2DModel",)
    lora_target_modules = QWEN_IMAGE_LORA_TARGET_MODULES
    guidance_kind = "cfg"
    # The official SRPO recipe for Qwen-Image (Tencent-Hunyuan/SRPO, fastvideo/SRPO_Qwen.py with
    # scripts/finetune/SRPO_training_qwen.sh): true CFG 4.0 in the rollout (also the pipeline's default
    # true_cfg_scale), none (train_cfg 1) in Direct-Align's training forward, and "" as the negative prompt.
    default_rollout_guidance = 4.0
    default_train_guidance = 1.0
    default_negative_prompt = ""
    # encode_prompt's default, which the official recipe encodes with (the pipeline's __call__ defaults to 512).
    default_max_sequence_length = 1024
    # The official recipe's --shift 1: its rollout schedule and training grid are unshifted.
    default_direct_align_shift = 1.0

    def __init__(self, pipe, negative_prompt: str | None = None):
        super().__init__(pipe, negative_prompt)
        # Image pixels per latent pixel: 2 ** the VAE's downsampling stages, as the pipeline computes it.
        self.vae_scale_factor = pipe.vae_scale_factor
        self.latent_channels = self.transformer.config.in_channels // 4

    def pipeline_call_kwargs(self, guidance: float | None, max_sequence_length: int | None) -> dict:
        """``QwenImagePipeline.__call__``'s ``true_cfg_scale`` and, where it guides (its default 4.0 does), the
        negative prompt: without one the pipeline runs no CFG whatever the scale."""
        settings = {"true_cfg_scale": guidance, "max_sequence_length": max_sequence_length}
        if guidance is None or guidance > 1:
            settings["negative_prompt"] = self.negative_prompt
        return {key: value for key, value in settings.items() if value is not None}

    def make_noise(self, batch_size: int, height: int, width: int, generator: torch.Generator, device, dtype):
        """The pipeline's noise: ``(B, 1, C, H/f, W/f)`` (one video frame) drawn on the CPU generator, packed 2x2."""
        latent_height, latent_width = self.latent_size(height, width)
        shape = (batch_size, 1, self.latent_channels, latent_height, latent_width)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        noise = self.pipe._pack_latents(noise, batch_size, self.latent_channels, latent_height, latent_width)
        return noise.to(device=device, dtype=dtype)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device, max_sequence_length: int = 1024) -> QwenImageConditioning:
        prompt_embeds, mask = self._encode(prompts, device, max_sequence_length)
        negative, negative_mask = self._encode([self.negative_prompt], device, max_sequence_length)
        batch_size = len(prompts)
        return QwenImageConditioning(
            prompt_embeds, mask, negative.repeat(batch_size, 1, 1), negative_mask.repeat(batch_size, 1)
        )

    def _encode(self, prompts: list[str], device, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompts, device=device, max_sequence_length=max_sequence_length)
        if mask is None:  # encode_prompt drops an all-ones mask; batches joined later need it
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def predict_velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: QwenImageConditioning,
        guidance: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """``v_theta(x_sigma, sigma)``: Qwen-Image takes ``timestep = sigma`` (the pipeline passes ``t / 1000``; the
        model multiplies by 1000 inside). With ``guidance > 1``, the pipeline's true CFG: a forward with the prompt,
        one with the negative prompt, combined and rescaled per token to the conditional prediction's norm."""
        batch_size = latents.shape[0]
        latent_height, latent_width = self.latent_size(height, width)
        img_shapes = [[(1, latent_height // 2, latent_width // 2)]] * batch_size
        timestep = torch.as_tensor(sigma, device=latents.device, dtype=latents.dtype).expand(batch_size)

        def forward(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # As the pipeline: no mask where every token counts, which leaves attention its fastest (flash) kernels.
            mask = None if bool(mask.all()) else mask
            return transformer(
                hidden_states=latents,
                timestep=timestep,
                guidance=None,
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds.to(latents.dtype),
                img_shapes=img_shapes,
                return_dict=False,
            )[0]

        conditional = forward(text.prompt_embeds, text.prompt_embeds_mask)
        if guidance <= 1:
            return conditional
        unconditional = forward(text.negative_prompt_embeds, text.negative_prompt_embeds_mask)
        combined = classifier_free_guidance(conditional, unconditional, guidance)
        conditional_norm = torch.norm(conditional, dim=-1, keepdim=True)
        combined_norm = torch.norm(combined, dim=-1, keepdim=True)
        return combined * (conditional_norm / combined_norm)

    def stock_sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """``QwenImagePipeline.__call__``'s (dynamically shifted, and stretched to ``shift_terminal``, for Qwen-Image)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        tokens = self.packed_shape(height, width)[0]
        return dynamically_shifted_sigmas(self.pipe.scheduler, num_inference_steps, tokens, calculate_shift)

    def _latent_statistics(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel ``(mean, 1 / std)``, shaped ``(1, C, 1, 1, 1)``, as the pipeline computes them."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = (1.0 / torch.tensor(config.latents_std)).view(shape).to(latents.device, latents.dtype)
        return mean, inverse_std

    def to_vae_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> ``(B, C, 1, H/f, W/f)`` in the VAE's scale (the pipeline's ``z / (1 / std) + mean``)."""
        unpacked = self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
        mean, inverse_std = self._latent_statistics(unpacked)
        return unpacked / inverse_std + mean

    def decode_vae_input(self, vae_latents: torch.Tensor) -> torch.Tensor:
        # The VAE is a video VAE: decode one frame and drop the frame axis.
        images = self.vae.decode(vae_latents.to(self.vae.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = (images * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype).unsqueeze(2)
        latents = self.vae.encode(pixels).latent_dist.mode()
        mean, inverse_std = self._latent_statistics(latents)
        latents = (latents - mean) * inverse_std
        batch_size, channels, _, latent_height, latent_width = latents.shape
        return self.pipe._pack_latents(latents, batch_size, channels, latent_height, latent_width)

    def enable_gradient_checkpointing(self, transformer: bool, vae: bool) -> None:
        if transformer:
            self.transformer.enable_gradient_checkpointing()
        if vae and self.vae._supports_gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        elif vae:
            # diffusers' AutoencoderKLQwenImage has none (its causal decoder threads a feature cache through calls).
            logger.warning("%s has no gradient checkpointing; the VAE decoder runs without it", type(self.vae).__name__)
