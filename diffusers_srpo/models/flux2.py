"""FLUX.2: everything the trainers need to know about ``Flux2Pipeline`` (FLUX.2-dev) and ``Flux2KleinPipeline``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ModelAdapter, TextConditioning, classifier_free_guidance

# The projections diffusers' FLUX.2 LoRA training examples target (examples/dreambooth/train_dreambooth_lora_flux2.py
# and train_dreambooth_lora_flux2_klein.py): the image stream's attention of the double blocks (peft matches by
# suffix, so not the text stream's add_*_proj) and the fused input projection of the single blocks. The examples add
# the single blocks' output projection by full name, block by block: see Flux2Adapter.lora_target_modules.
FLUX2_LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj")


@dataclass
class Flux2Conditioning(TextConditioning):
    """FLUX.2's text conditioning: three hidden layers of the text encoder stacked on channels, and the text position
    ids. Both pipelines pad every prompt to ``max_sequence_length`` and attend to the padding (there is no mask), so
    every prompt encodes to the same length."""

    prompt_embeds: torch.Tensor  # [B, L, 3 * D]
    text_ids: torch.Tensor  # [B, L, 4] int64: (0, 0, 0, l)


@dataclass
class Flux2KleinConditioning(Flux2Conditioning):
    """Klein's, with the negative prompt's features under classifier-free guidance (``None`` without). They share
    ``text_ids``: both are ``max_sequence_length`` long."""

    negative_prompt_embeds: torch.Tensor | None = None  # [B, L, 3 * D]


class Flux2Adapter(ModelAdapter):
    """Drives a ``diffusers.Flux2Pipeline`` (FLUX.2-dev and fine-tunes of it)."""

    name = "flux2"
    pipeline_class_names = ("Flux2Pipeline",)
    transformer_class_names = ("Flux2Transformer2DModel",)
    guidance_kind = "distilled"
    # No SRPO recipe for FLUX.2 exists. By analogy with FLUX.1 (SPEC: distilled guidance 1.0 in the rollout, 3.5 in
    # the training forward, which is FluxPipeline's default guidance_scale), the rollout samples with 1.0 and the
    # training forward uses Flux2Pipeline's default guidance_scale, 4.0.
    default_rollout_guidance = 1.0
    default_train_guidance = 4.0
    default_max_sequence_length = 512
    #: The diffusers module of the pipeline class, whose helpers (compute_empirical_mu, ...) sample as it does.
    pipeline_module: ClassVar[str] = "diffusers.pipelines.flux2.pipeline_flux2"

    def __init__(self, pipe, negative_prompt: str | None = None):
        super().__init__(pipe, negative_prompt)
        # Image pixels per latent pixel; the transformer's tokens are 2x2 latent patches.
        self.vae_scale_factor = pipe.vae_scale_factor

    @property
    def lora_target_modules(self) -> tuple[str, ...]:
        """:data:`FLUX2_LORA_TARGET_MODULES` and every single block's ``attn.to_out``, by full name as diffusers'
        examples list them (a bare ``to_out`` would also match the double blocks' ``to_out`` ModuleList, which peft
        refuses), for this transformer's depth."""
        single_blocks = range(self.transformer.config.num_single_layers)
        return FLUX2_LORA_TARGET_MODULES + tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in single_blocks)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return 2 * self.vae_scale_factor

    # --------------------------------------------------------------------------------------------- text
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device, max_sequence_length: int = 512) -> Flux2Conditioning:
        prompt_embeds, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), device=device, max_sequence_length=max_sequence_length
        )
        return Flux2Conditioning(prompt_embeds, text_ids)

    # --------------------------------------------------------------------------------------------- latents
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of the transformer's image tokens (one per 2x2 latent patch)."""
        return height // self.size_multiple, width // self.size_multiple

    def latent_ids(self, batch_size: int, height: int, width: int, device) -> torch.Tensor:
        """The pipeline's image position ids ``[B, N, 4]``: (0, row, column, 0)."""
        rows, columns = self.token_grid(height, width)
        return self.pipe._prepare_latent_ids(torch.empty(batch_size, 0, rows, columns)).to(device)

    def make_noise(self, batch_size: int, height: int, width: int, generator: torch.Generator, device, dtype):
        """Gaussian noise drawn as the pipeline draws it (patchified ``[B, 4 * C, rows, columns]``, what
        ``__call__``'s ``latents=`` takes), on the CPU generator so every device and process sees the same numbers;
        returned packed ``[B, N, 4 * C]``."""
        rows, columns = self.token_grid(height, width)
        channels = 4 * (self.transformer.config.in_channels // 4)
        noise = torch.randn(batch_size, channels, rows, columns, generator=generator, dtype=torch.float32)
        return self.pipe._pack_latents(noise).to(device=device, dtype=dtype)

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed ``[B, N, 4 * C]`` -> patchified ``[B, 4 * C, rows, columns]``: the inverse of the pipeline's
        ``_pack_latents``, which is what its ``_unpack_latents_with_ids`` computes for the ids of
        :meth:`latent_ids`. Written as a reshape: the pipeline scatters into a new zero tensor, sized by a read from
        the device, and on the scale simulator's fake tensors that tensor is a real one that stays zero."""
        rows, columns = self.token_grid(height, width)
        return latents.permute(0, 2, 1).reshape(latents.shape[0], latents.shape[2], rows, columns)

    # --------------------------------------------------------------------------------------------- the model
    def transformer_forward(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """One forward as the pipelines' denoising loop makes it: the timestep is ``sigma`` (the loop passes
        ``t / 1000``; the transformer multiplies timestep and guidance by 1000), and the output is cut to the image
        tokens."""
        batch_size = latents.shape[0]
        timestep = torch.as_tensor(sigma, device=latents.device, dtype=latents.dtype).expand(batch_size)
        velocity = transformer(
            hidden_states=latents,
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states=prompt_embeds.to(latents.dtype),
            txt_ids=text_ids,
            img_ids=self.latent_ids(batch_size, height, width, latents.device),
            return_dict=False,
        )[0]
        return velocity[:, : latents.shape[1]]

    def predict_velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: Flux2Conditioning,
        guidance: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """``v_theta(x_sigma, sigma)`` with the distilled guidance as an input (float32, as the pipeline makes it)."""
        guidance_tensor = torch.full((latents.shape[0],), guidance, device=latents.device, dtype=torch.float32)
        return self.transformer_forward(
            transformer, latents, sigma, text.prompt_embeds, text.text_ids, guidance_tensor, height, width
        )

    def stock_sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """``__call__``'s: ``linspace(1, 1/n, n)`` shifted by the scheduler with FLUX.2's empirical ``mu`` (from the
        image's token count and the number of steps; the scheduler's base/max shift play no part), then 0."""
        import numpy as np

        module = importlib.import_module(self.pipeline_module)
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        rows, columns = self.token_grid(height, width)
        mu = module.compute_empirical_mu(image_seq_len=rows * columns, num_steps=num_inference_steps)
        module.retrieve_timesteps(scheduler, num_inference_steps, "cpu", sigmas=sigmas, mu=mu)
        return scheduler.sigmas.float()

    # --------------------------------------------------------------------------------------------- the VAE
    def to_vae_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> the VAE's ``[B, C, H/8, W/8]``: unpacked, de-normalised with the VAE's BatchNorm running
        statistics, 2x2 patches unfolded (the pipeline's decode)."""
        patches = self.unpack(latents, height, width)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            patches.device, patches.dtype
        )
        return self.pipe._unpatchify_latents(patches * std + mean)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The pipeline's ``_encode_vae_image`` (posterior mode, 2x2 patches, BatchNorm-normalised), packed."""
        pixels = (images * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        return self.pipe._pack_latents(self.pipe._encode_vae_image(pixels, generator))


class Flux2KleinAdapter(Flux2Adapter):
    """Drives a ``diffusers.Flux2KleinPipeline`` (FLUX.2 [klein] 4B and 9B): a Qwen3 text encoder and, unlike
    FLUX.2-dev, true classifier-free guidance with the empty negative prompt (the transformer takes no guidance).

    A step-distilled Klein (the pipeline's ``is_distilled``) samples without guidance: one forward, no negative
    prompt; guidance above 1 is refused (the stock ``__call__`` ignores it with a warning).
    """

    name = "flux2-klein"
    pipeline_class_names = ("Flux2KleinPipeline",)
    guidance_kind = "cfg"
    # The rollout samples as Flux2KleinPipeline does by default (guidance_scale 4.0, also the true-CFG scale of SRPO's
    # Qwen-Image rollout); Direct-Align's training forward is one forward with gradient (1.0), as in that recipe
    # (train_cfg 1).
    default_rollout_guidance = 4.0
    default_train_guidance = 1.0
    # Flux2KleinPipeline's own negative prompt (hard-coded in __call__).
    default_negative_prompt = ""
    pipeline_module = "diffusers.pipelines.flux2.pipeline_flux2_klein"

    def __init__(self, pipe, negative_prompt: str | None = None):
        super().__init__(pipe, negative_prompt)
        self.is_distilled = bool(pipe.config.get("is_distilled", False))
        if self.is_distilled:
            # What the trainers read: no negative prompt (one given is refused as for distilled guidance), guidance 1.
            self.guidance_kind = "distilled"
            self.negative_prompt = negative_prompt
            self.default_rollout_guidance = 1.0

    def pipeline_call_kwargs(self, guidance: float | None, max_sequence_length: int | None) -> dict:
        """``guidance_scale`` (and the prompt length); the stock ``__call__`` always takes the empty negative prompt,
        so another one is refused."""
        if self.is_distilled:
            guidance = 1.0 if guidance is None else guidance  # the stock default (4.0) would only be warned about
            self.check_guidance(guidance)
            return super().pipeline_call_kwargs(guidance, max_sequence_length)
        if self.negative_prompt != "":
            raise ValueError(
                f"Flux2KleinPipeline's __call__ always uses the empty negative prompt; it cannot sample with "
                f"negative prompt {self.negative_prompt!r}"
            )
        settings = {"guidance_scale": guidance, "max_sequence_length": max_sequence_length}
        return {key: value for key, value in settings.items() if value is not None}

    def check_guidance(self, guidance: float) -> None:
        if self.is_distilled and guidance > 1:
            raise ValueError(
                f"this Flux2KleinPipeline is step-distilled (is_distilled): it samples without guidance, got guidance "
                f"{guidance}; use 1"
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device, max_sequence_length: int = 512) -> Flux2KleinConditioning:
        """The prompts' features and, under classifier-free guidance, the negative prompt's for every sample."""
        text = super().encode_prompts(prompts, device, max_sequence_length)
        negative_prompt_embeds = None
        if self.guidance_kind == "cfg":
            negative_prompt_embeds, _ = self.pipe.encode_prompt(
                prompt=[self.negative_prompt] * len(prompts), device=device, max_sequence_length=max_sequence_length
            )
        return Flux2KleinConditioning(text.prompt_embeds, text.text_ids, negative_prompt_embeds)

    def predict_velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: Flux2KleinConditioning,
        guidance: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """``v_theta(x_sigma, sigma)``; above guidance 1, ``neg + guidance * (cond - neg)`` as the pipeline combines
        them (no rescaling), both halves in one batched forward."""
        self.check_guidance(guidance)
        if guidance <= 1:
            return self.transformer_forward(
                transformer, latents, sigma, text.prompt_embeds, text.text_ids, None, height, width
            )
        embeds = torch.cat([text.prompt_embeds, text.negative_prompt_embeds])
        text_ids = torch.cat([text.text_ids, text.text_ids])
        both = self.transformer_forward(
            transformer, torch.cat([latents, latents]), sigma, embeds, text_ids, None, height, width
        )
        conditional, unconditional = both.chunk(2)
        return classifier_free_guidance(conditional, unconditional, guidance)
