"""What a trainer asks of a model family: :class:`ModelAdapter`, and the :class:`TextConditioning` it caches.

A trainer never touches a pipeline's internals. It encodes prompts once (the encoders then leave the GPU), draws
noise in the transformer's latent layout, asks for velocities, and turns latents into images with gradient; each
model family answers these in its own module of this package, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class TextConditioning:
    """The text conditioning of a batch of prompts, as the family's transformer takes it.

    Per-sample tensors have the batch first. A field whose metadata says ``shared=True`` is the same for every sample
    (FLUX's text position ids) and is taken from the first item when batches are joined. Floating tensors take the
    dtype given to :meth:`to` unless their metadata says ``cast=False``. ``None`` fields stay ``None``.
    """

    def to(self, device=None, dtype=None) -> TextConditioning:
        def move(field, value):
            if not isinstance(value, torch.Tensor):
                return value
            cast = dtype if value.is_floating_point() and field.metadata.get("cast", True) else None
            return value.to(device=device, dtype=cast)

        return dataclasses.replace(self, **{f.name: move(f, getattr(self, f.name)) for f in dataclasses.fields(self)})

    def select(self, index: int) -> TextConditioning:
        """Sample ``index`` alone (a batch of one)."""

        def pick(field, value):
            if not isinstance(value, torch.Tensor) or field.metadata.get("shared", False):
                return value
            return value[index : index + 1]

        return dataclasses.replace(self, **{f.name: pick(f, getattr(self, f.name)) for f in dataclasses.fields(self)})

    @classmethod
    def cat(cls, items: list[TextConditioning]) -> TextConditioning:
        """One batch of ``items``, in order."""

        def join(field):
            values = [getattr(item, field.name) for item in items]
            if not isinstance(values[0], torch.Tensor) or field.metadata.get("shared", False):
                return values[0]
            return torch.cat(values)

        return cls(**{f.name: join(f) for f in dataclasses.fields(cls)})


def shared(**metadata) -> dataclasses.Field:
    """A :class:`TextConditioning` field that is the same for every sample of a batch."""
    return dataclasses.field(metadata={"shared": True, **metadata})


class ModelAdapter:
    """Drives one family of diffusers pipelines for the trainers.

    Subclasses set the class attributes and implement the methods that raise ``NotImplementedError``. ``guidance``
    everywhere is what the family's sampler takes: the distilled guidance the transformer embeds (FLUX.1-dev), or
    the scale of classifier-free guidance (1 turns it off, and the second forward with the negative prompt with it).
    """

    #: Short name, as the CLI and the README name the family.
    name: ClassVar[str]
    #: The diffusers pipeline classes this adapter drives, by name (the first one is what a saved LoRA loads into).
    pipeline_class_names: ClassVar[tuple[str, ...]]
    #: The family's transformer classes, by name (what ``extract-lora`` recognises a base model by).
    transformer_class_names: ClassVar[tuple[str, ...]]
    #: The transformer's modules a LoRA targets by default: those of diffusers' own LoRA training example (a property
    #: where the list depends on the model's depth, as FLUX.2's does).
    lora_target_modules: ClassVar[tuple[str, ...]]
    #: ``"distilled"`` (guidance is an input of the transformer) or ``"cfg"`` (classifier-free guidance).
    guidance_kind: ClassVar[str]
    #: The trainers' defaults for this family, where its config leaves them unset: the rollout's guidance, the
    #: guidance of Direct-Align's training forward, and the negative prompt of classifier-free guidance.
    default_rollout_guidance: ClassVar[float]
    default_train_guidance: ClassVar[float]
    default_negative_prompt: ClassVar[str | None] = None
    #: Token length of the prompt encoding that the family's pipeline uses by default.
    default_max_sequence_length: ClassVar[int]
    #: Static shift of the trainers' rollout schedule and Direct-Align's training grid (the reference's FLUX recipe).
    default_direct_align_shift: ClassVar[float] = 3.0

    def __init__(self, pipe, negative_prompt: str | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        # Only classifier-free guidance has a negative prompt (the trainer refuses one for distilled guidance).
        self.negative_prompt = self.default_negative_prompt if negative_prompt is None else negative_prompt

    @classmethod
    def supports(cls, pipe) -> bool:
        """Whether ``pipe`` is one of :attr:`pipeline_class_names` (or a subclass of one)."""
        return any(base.__name__ in cls.pipeline_class_names for base in type(pipe).__mro__)

    @property
    def pipeline_class_name(self) -> str:
        """The stock class that loads this family's LoRA (``FluxPipeline``, ...)."""
        return self.pipeline_class_names[0]

    def check_guidance(self, guidance: float) -> None:
        """Refuse a guidance the model cannot sample with (one clear ``ValueError``); any is fine by default."""

    def pipeline_call_kwargs(self, guidance: float | None, max_sequence_length: int | None) -> dict:
        """The keyword arguments of the stock pipeline's ``__call__`` that sample as :meth:`predict_velocity` does
        with ``guidance`` (``None``: the pipeline's default) and this adapter's negative prompt."""
        if self.negative_prompt is not None:
            raise ValueError(
                f"a negative prompt is for classifier-free guidance; {self.pipeline_class_name} ({self.name}) uses "
                "distilled guidance"
            )
        settings = {"guidance_scale": guidance, "max_sequence_length": max_sequence_length}
        return {key: value for key, value in settings.items() if value is not None}

    # --------------------------------------------------------------------------------------------- sizes and noise
    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        raise NotImplementedError

    def make_noise(self, batch_size: int, height: int, width: int, generator: torch.Generator, device, dtype):
        """Gaussian noise in the transformer's latent layout, drawn in float32 on the CPU generator (so that every
        device and process sees the same numbers), then moved."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- text
    def text_encoders(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str], device, max_sequence_length: int) -> TextConditioning:
        """Everything the transformer needs of ``prompts`` (and, under CFG, of the negative prompt), no gradient."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- the model
    def predict_velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: TextConditioning,
        guidance: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """``v(x_sigma, sigma)`` in the latents' layout, with the family's timestep convention and its guidance."""
        raise NotImplementedError

    def stock_sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The sigmas (ending in 0) the stock pipeline's ``__call__`` samples with: the Euler steps of
        ``sample_latents`` along them reproduce it."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- the VAE
    def to_vae_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents in the transformer's layout -> what the VAE decodes (unpacked, unnormalised)."""
        raise NotImplementedError

    def decode_vae_input(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """VAE-input latents -> images ``[B, 3, H, W]`` in [0, 1], differentiable (the VAE is frozen, not detached)."""
        images = self.vae.decode(vae_latents.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` -> latents in the transformer's layout (the VAE posterior mean)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents in the transformer's layout -> images in [0, 1], differentiable."""
        return self.decode_vae_input(self.to_vae_input(latents, height, width))

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
        """Direct-Align's step-and-recover of x0 (``ops.step_and_recover``), in the VAE's input layout."""
        from .. import ops

        x0 = ops.step_and_recover(velocity, sample, sigma_from, sigma_to, noise)
        return self.to_vae_input(x0, height, width)

    # --------------------------------------------------------------------------------------------- training glue
    def enable_gradient_checkpointing(self, transformer: bool, vae: bool) -> None:
        if transformer:
            self.transformer.enable_gradient_checkpointing()
        if vae:
            self.vae.enable_gradient_checkpointing()

    def save_lora_weights(self, directory: str, lora_state_dict: dict, adapter_metadata: dict | None) -> None:
        """Write ``pytorch_lora_weights.safetensors`` as the pipeline's own ``save_lora_weights`` does, so that the
        stock ``load_lora_weights`` reads it."""
        type(self.pipe).save_lora_weights(
            directory, transformer_lora_layers=lora_state_dict, transformer_lora_adapter_metadata=adapter_metadata
        )

    def lora_state_dict_for_transformer(self, directory: str) -> dict:
        """Read a LoRA folder written by :meth:`save_lora_weights` back as a peft state dict of the transformer."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        state_dict = type(self.pipe).lora_state_dict(directory)
        if isinstance(state_dict, tuple):  # some loaders also return network alphas or metadata
            state_dict = state_dict[0]
        transformer_state = {
            k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")
        }
        return convert_unet_state_dict_to_peft(transformer_state)


class PackedLatents:
    """For families whose transformer sees the VAE's latents as a sequence of 2x2 patches (FLUX.1, Qwen-Image):
    ``vae_scale_factor`` image pixels per latent pixel, ``latent_channels`` channels (set by the adapter)."""

    vae_scale_factor: int
    latent_channels: int

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's factor times the 2x2 packing."""
        return 2 * self.vae_scale_factor

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def packed_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(tokens, channels)`` of the packed latent sequence the transformer sees."""
        latent_height, latent_width = self.latent_size(height, width)
        return (latent_height // 2) * (latent_width // 2), 4 * self.latent_channels


def dynamically_shifted_sigmas(
    scheduler, num_inference_steps: int, image_seq_len: int, calculate_shift
) -> torch.Tensor:
    """The sigmas of ``FluxPipeline`` / ``QwenImagePipeline.__call__``: ``linspace(1, 1/n, n)`` shifted by a copy of
    ``scheduler`` with mu from the image's token count (the pipeline module's own ``calculate_shift``, with its
    fallbacks where the scheduler config lacks a key), then 0."""
    import numpy as np

    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler = type(scheduler).from_config(config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), mu=mu)
    return scheduler.sigmas.float()


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``, the combination of every CFG pipeline of diffusers."""
    return unconditional + scale * (conditional - unconditional)
