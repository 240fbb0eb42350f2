"""FLUX.1: everything the trainers need to know about ``FluxPipeline``, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModelAdapter, PackedLatents, TextConditioning, dynamically_shifted_sigmas, shared

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
class FluxConditioning(TextConditioning):
    """FLUX's text conditioning: T5's sequence, CLIP's pooled output and the text position ids."""

    prompt_embeds: torch.Tensor  # [B, L, D] T5 sequence
    pooled_prompt_embeds: torch.Tensor  # [B, D_pooled] CLIP pooled output
    text_ids: torch.Tensor = shared(cast=False)  # [L, 3]


class FluxAdapter(PackedLatents, ModelAdapter):
    """Drives a ``diffusers.FluxPipeline`` (FLUX.1-dev, FLUX.1-schnell and fine-tunes of them)."""

    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    transformer_class_names = ("FluxTransformer2DModel",)
    lora_target_modules = FLUX_LORA_TARGET_MODULES
    guidance_kind = "distilled"
    # SPEC: distilled guidance 1.0 in the rollout, 3.5 in Direct-Align's training forward.
    default_rollout_guidance = 1.0
    default_train_guidance = 3.5
    default_max_sequence_length = 512

    def __init__(self, pipe, negative_prompt: str | None = None):
        super().__init__(pipe, negative_prompt)
        # Latent pixels per image pixel, and the 2x2 patch packing on top of it.
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device, max_sequence_length: int = 512) -> FluxConditioning:
        prompt_embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return FluxConditioning(prompt_embeds, pooled, text_ids)

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
        text: FluxConditioning,
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

    def to_vae_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        config = self.vae.config
        return self.unpack(latents, height, width) / config.scaling_factor + config.shift_factor

    def stock_sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """``FluxPipeline.__call__``'s (dynamically shifted for FLUX.1-dev)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = self.packed_shape(height, width)[0]
        return dynamically_shifted_sigmas(self.pipe.scheduler, num_inference_steps, tokens, calculate_shift)

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
            velocity,
            sample,
            sigma_from,
            sigma_to,
            noise,
            latent_height,
            latent_width,
            config.scaling_factor,
            config.shift_factor,
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        config = self.vae.config
        pixels = (images * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return self.pack((latents - config.shift_factor) * config.scaling_factor)
