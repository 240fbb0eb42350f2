"""Stable Diffusion 3 and 3.5: everything the trainers need to know about ``StableDiffusion3Pipeline``, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModelAdapter, TextConditioning, classifier_free_guidance

# The projections diffusers' SD3 LoRA training example targets (examples/dreambooth/train_dreambooth_lora_sd3.py):
# attention of both streams, not the feed-forwards nor SD3.5 Medium's second (attn2) attention. The last block is
# context_pre_only and has no attn.to_add_out; peft skips a name where a block lacks it.
SD3_LORA_TARGET_MODULES = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


@dataclass
class SD3Conditioning(TextConditioning):
    """SD3's text conditioning: the joint CLIP-L/CLIP-G/T5 sequence and the pooled CLIP vector, of the prompt and of
    the negative prompt (encoded for every sample, so that samples are selected and joined as one)."""

    prompt_embeds: torch.Tensor  # [B, 77 + L, D_t5]: CLIP-L | CLIP-G states zero-padded to D_t5, then T5's
    pooled_prompt_embeds: torch.Tensor  # [B, D_clip_l + D_clip_g]
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


class SD3Adapter(ModelAdapter):
    """Drives a ``diffusers.StableDiffusion3Pipeline`` (SD3 Medium, SD3.5 Large and Medium, and fine-tunes of them)."""

    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    transformer_class_names = ("SD3Transformer2DModel",)
    lora_target_modules = SD3_LORA_TARGET_MODULES
    guidance_kind = "cfg"
    # Flow-GRPO samples SD3.5 with CFG 4.5 (yifan123/flow_grpo config/base.py and its SD3.5 configs in config/grpo.py);
    # Direct-Align's training forward is one forward without CFG, as the official SRPO Qwen-Image recipe trains
    # (train_cfg 1).
    default_rollout_guidance = 4.5
    default_train_guidance = 1.0
    default_negative_prompt = ""
    # StableDiffusion3Pipeline.__call__'s default T5 length.
    default_max_sequence_length = 256

    def __init__(self, pipe, negative_prompt: str | None = None):
        super().__init__(pipe, negative_prompt)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.transformer.config.in_channels

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (the VAE's factor times the transformer's patch)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def make_noise(self, batch_size: int, height: int, width: int, generator: torch.Generator, device, dtype):
        """Unpacked latent noise ``[B, 16, H/8, W/8]``: SD3's transformer patchifies its input itself."""
        shape = (batch_size, self.latent_channels, *self.latent_size(height, width))
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def text_encoders(self) -> list[torch.nn.Module]:
        encoders = (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)
        return [m for m in encoders if m is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device, max_sequence_length: int = 256) -> SD3Conditioning:
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=True,
            negative_prompt=self.negative_prompt,
            max_sequence_length=max_sequence_length,
        )
        return SD3Conditioning(prompt_embeds, pooled, negative_embeds, negative_pooled)

    def predict_velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: SD3Conditioning,
        guidance: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """``v_theta(x_sigma, sigma)``: SD3 takes the raw timestep ``sigma * 1000`` (float32, as the scheduler's
        timesteps are); with ``guidance > 1``, classifier-free guidance over one batch ``[negative, prompt]``, as
        the pipeline runs it."""
        batch_size = latents.shape[0]
        num_train_timesteps = self.pipe.scheduler.config.num_train_timesteps
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32)
        timestep = (sigma * num_train_timesteps).expand(batch_size)  # sigma: a number, or one per sample
        prompt_embeds, pooled = text.prompt_embeds, text.pooled_prompt_embeds
        guided = guidance > 1
        if guided:
            if text.negative_prompt_embeds is None:
                raise ValueError("classifier-free guidance needs the negative prompt's embeddings (encode_prompts)")
            latents = torch.cat([latents, latents])
            timestep = torch.cat([timestep, timestep])
            prompt_embeds = torch.cat([text.negative_prompt_embeds, prompt_embeds])
            pooled = torch.cat([text.negative_pooled_prompt_embeds, pooled])
        velocity = transformer(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=prompt_embeds.to(latents.dtype),
            pooled_projections=pooled.to(latents.dtype),
            return_dict=False,
        )[0]
        if not guided:
            return velocity
        unconditional, conditional = velocity.split(batch_size)
        return classifier_free_guidance(conditional, unconditional, guidance)

    def stock_sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """``StableDiffusion3Pipeline.__call__``'s: the scheduler's own ``set_timesteps(n)`` (its static shift, or
        the dynamic one with mu from the image's token count when the config asks for it), then 0."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        config = self.pipe.scheduler.config
        scheduler = type(self.pipe.scheduler).from_config(config)
        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            patch_size = self.transformer.config.patch_size
            latent_height, latent_width = self.latent_size(height, width)
            kwargs["mu"] = calculate_shift(
                (latent_height // patch_size) * (latent_width // patch_size),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),  # the pipeline's fallback (FLUX's is 1.15)
            )
        scheduler.set_timesteps(num_inference_steps, **kwargs)
        return scheduler.sigmas.float()

    def pipeline_call_kwargs(self, guidance: float | None, max_sequence_length: int | None) -> dict:
        """``guidance_scale`` (CFG when > 1, as here), ``negative_prompt`` and ``max_sequence_length``."""
        settings = {
            "guidance_scale": guidance,
            "negative_prompt": self.negative_prompt,
            "max_sequence_length": max_sequence_length,
        }
        return {key: value for key, value in settings.items() if value is not None}

    def to_vae_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        config = self.vae.config
        return latents / config.scaling_factor + config.shift_factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        config = self.vae.config
        pixels = (images * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents - config.shift_factor) * config.scaling_factor
