"""FLUX glue: everything the trainers need to know about ``FluxPipeline``, in one place.

A trainer only talks to a ``ModelAdapter``: encode prompts, make noise in the model's latent
layout, predict a velocity, decode latents to images. Supporting SD3 or Qwen-Image means
writing another adapter with the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The projections diffusers' FLUX LoRA training example targets (examples/dreambooth/train_dreambooth_lora_flux.py).
FLUX_LORA_TARGET_MODULES = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch, already on the training device."""

    prompt_embeds: torch.Tensor  # [B, L, D] T5 sequence
    pooled_prompt_embeds: torch.Tensor  # [B, D_pooled] CLIP pooled output
    text_ids: torch.Tensor  # [L, 3]

    def to(self, device=None, dtype=None) -> PromptEmbeds:
        return PromptEmbeds(
            self.prompt_embeds.to(device=device, dtype=dtype),
            self.pooled_prompt_embeds.to(device=device, dtype=dtype),
            self.text_ids.to(device=device),
        )

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(
            torch.cat([item.prompt_embeds for item in items]),
            torch.cat([item.pooled_prompt_embeds for item in items]),
            items[0].text_ids,
        )


class FluxAdapter:
    """Drives a ``diffusers.FluxPipeline`` (FLUX.1-dev, FLUX.1-schnell and fine-tunes of them)."""

    name = "flux"
    lora_target_modules = FLUX_LORA_TARGET_MODULES

    def __init__(self, pipe):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        # Latent pixels per image pixel, and the 2x2 patch packing on top of it.
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels

    @staticmethod
    def supports(pipe) -> bool:
        from diffusers import FluxPipeline

        return isinstance(pipe, FluxPipeline)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return 2 * self.vae_scale_factor

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device, max_sequence_length: int = 512) -> PromptEmbeds:
        prompt_embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return PromptEmbeds(prompt_embeds, pooled, text_ids)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def packed_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(tokens, channels)`` of the packed latent sequence the transformer sees."""
        latent_height, latent_width = self.latent_size(height, width)
        return (latent_height // 2) * (latent_width // 2), 4 * self.latent_channels

    def make_noise(self, batch_size: int, height: int, width: int, generator: torch.Generator, device, dtype):
        """Packed Gaussian noise drawn on the CPU generator, so every device and process sees the same numbers."""
        tokens, channels = self.packed_shape(height, width)
        noise = torch.randn(batch_size, tokens, channels, generator=generator, dtype=torch.float32)
        return noise.to(device=device, dtype=dtype)

    def predict_velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: PromptEmbeds,
        guidance: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """``v_theta(x_sigma, sigma)``: FLUX takes ``timestep = sigma`` (it multiplies by 1000 inside)."""
        batch_size = latents.shape[0]
        latent_height, latent_width = self.latent_size(height, width)
        img_ids = self.pipe._prepare_latent_image_ids(
            batch_size, latent_height // 2, latent_width // 2, latents.device, latents.dtype
        )
        timestep = torch.as_tensor(sigma, device=latents.device, dtype=latents.dtype).expand(batch_size)
        config = getattr(transformer, "config", None) or self.transformer.config
        guidance_tensor = None
        if config.guidance_embeds:
            guidance_tensor = torch.full((batch_size,), guidance, device=latents.device, dtype=latents.dtype)
        return transformer(
            hidden_states=latents,
            timestep=timestep,
            guidance=guidance_tensor,
            pooled_projections=text.pooled_prompt_embeds.to(latents.dtype),
            encoder_hidden_states=text.prompt_embeds.to(latents.dtype),
            txt_ids=text.text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        batch_size, channels, latent_height, latent_width = latents.shape
        return self.pipe._pack_latents(latents, batch_size, channels, latent_height, latent_width)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> images in [0, 1], differentiable (the VAE is frozen, not detached)."""
        config = self.vae.config
        return self.decode_vae_input(self.unpack(latents, height, width) / config.scaling_factor + config.shift_factor)

    def recover_vae_input(
        self,
        velocity: torch.Tensor,
        sample: torch.Tensor,
        sigma_from: torch.Tensor,
        sigma_to: torch.Tensor,
        noise: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """Direct-Align's step-and-recover of x0, written straight in the VAE's input layout (unpacked, unscaled).

        One fused kernel on CUDA (``ops.step_and_recover_to_vae``); what :meth:`decode_vae_input` takes.
        """
        from .. import ops

        config = self.vae.config
        latent_height, latent_width = self.latent_size(height, width)
        return ops.step_and_recover_to_vae(
            velocity, sample, sigma_from, sigma_to, noise, latent_height, latent_width, config.scaling_factor, config.shift_factor
        )

    def decode_vae_input(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """VAE-input latents ``[B, C, h, w]`` -> images in [0, 1], differentiable."""
        images = self.vae.decode(vae_latents.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` -> packed, scaled latents (the VAE posterior mean)."""
        config = self.vae.config
        pixels = (images * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return self.pack((latents - config.shift_factor) * config.scaling_factor)

    def enable_gradient_checkpointing(self, transformer: bool, vae: bool) -> None:
        if transformer:
            self.transformer.enable_gradient_checkpointing()
        if vae:
            self.vae.enable_gradient_checkpointing()

    def save_lora_weights(self, directory: str, lora_state_dict: dict, adapter_metadata: dict | None) -> None:
        """Write ``pytorch_lora_weights.safetensors`` in the format ``FluxPipeline.load_lora_weights`` reads."""
        self.pipe.save_lora_weights(
            directory, transformer_lora_layers=lora_state_dict, transformer_lora_adapter_metadata=adapter_metadata
        )

    def lora_state_dict_for_transformer(self, directory: str) -> dict:
        """Read a LoRA folder written by ``save_lora_weights`` back as a peft state dict of the transformer."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        state_dict = self.pipe.lora_state_dict(directory)
        transformer_state = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
        return convert_unet_state_dict_to_peft(transformer_state)


_ADAPTERS = [FluxAdapter]


def get_model_adapter(pipe):
    """The adapter that drives ``pipe``; a clear error naming what is supported otherwise."""
    for adapter_cls in _ADAPTERS:
        if adapter_cls.supports(pipe):
            return adapter_cls(pipe)
    supported = ", ".join(f"{cls.name} (FluxPipeline)" for cls in _ADAPTERS)
    raise TypeError(f"diffusers-srpo cannot drive a {type(pipe).__name__}; supported pipelines: {supported}")
