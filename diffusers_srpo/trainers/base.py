"""The machinery every trainer of the family shares.

A method (SRPO, its baselines, TailorPO) only writes ``training_step``: the loss of one update,
returned as named micro-step losses (each divided by their number, then back-propagated one
after another, so that their graphs never live together) that make one optimizer step. Everything
else lives here: accelerate, LoRA or full fine-tune, prompts and their cached embeddings,
checkpoints and exact resume, outputs, logging and validation, and how a run ends: an update with a
non-finite number is skipped, SIGINT / SIGTERM stop cleanly after the update in progress, final outputs
are renamed into place, and the user's pipeline is handed back as it was found, with the trained weights.

What a skipped update does: the weights and the optimizer state stay exactly as they were, but the
update still counts: the step counter (one of ``max_train_steps``) and the learning-rate schedule
advance, and the random streams are keyed by the update's number, so the next update draws what it
would have drawn anyway and a resumed run stays exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..atomic import move_into_place, staged_outputs
from ..models import TextConditioning, get_model_adapter
from ..prompts import load_prompts
from ..quantization import quantization_of
from . import sharding
from .checkpoints import (
    CHECKPOINT_PREFIX,
    LORA_WEIGHT_NAME,
    OPTIMIZER_FOLDER,
    TRAINER_STATE_NAME,
    TRANSFORMER_FOLDER,
    checkpoint_dirs,
    read_trainer_state,
    resolve_resume_checkpoint,
)
from .config import TrainerConfig
from .pipeline_state import PipelineState
from .stopping import NonFiniteUpdatesError, NonFiniteWeightsError, StopRequest, TrainingInterrupted, stop_on_signals

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_PREFIX", "LORA_WEIGHT_NAME", "TRAINER_STATE_NAME", "BaseTrainer", "StepOutput", "check_output_dir"]
# Updates in a row without any sample under the hinge threshold before the trainer warns.
HINGE_PATIENCE = 5
# Random stream of an update's starting noise (see BaseTrainer.generator); methods number theirs from 2.
NOISE_STREAM = 1


@dataclass
class StepOutput:
    """What ``training_step`` hands back: the loss of each micro-step by name (``{"denoise": fn, ...}``; the
    same names in the same order on every process) and the numbers to log."""

    losses: dict[str, Callable[[], torch.Tensor]]
    logs: dict[str, float]


def check_output_dir(output_dir: str, *, allow_existing: bool, remedy: str) -> None:
    """Refuse an output folder that is a file, or that already holds files (another run's) unless ``allow_existing``."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"output_dir {output_dir!r} is an existing file; expected a folder (new or empty)")
    if not allow_existing and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"output_dir {output_dir!r} already holds files of another run; {remedy}")


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, step, rank, stream), stable across runs and processes."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def with_model_defaults(config: TrainerConfig, adapter) -> TrainerConfig:
    """``config`` with the settings it leaves to the model (``None``) taken from the model family's adapter: the
    prompt length, the schedule's shift, the guidance of the rollout and of Direct-Align's training forward, the
    negative prompt. A negative prompt given to a model without classifier-free guidance is refused (it would do
    nothing), and so is a guidance the model cannot sample with (a step-distilled FLUX.2 klein takes none)."""
    if config.negative_prompt is not None and adapter.guidance_kind != "cfg":
        raise ValueError(
            f"negative_prompt is for classifier-free guidance; {adapter.pipeline_class_name} ({adapter.name}) uses "
            "distilled guidance: leave it unset"
        )
    defaults = {
        "max_sequence_length": adapter.default_max_sequence_length,
        "direct_align_shift": adapter.default_direct_align_shift,
        "rollout_guidance": adapter.default_rollout_guidance,
        "train_guidance": adapter.default_train_guidance,
        "negative_prompt": adapter.negative_prompt,
    }
    unset = {
        name: value
        for name, value in defaults.items()
        if value is not None and hasattr(config, name) and getattr(config, name) is None
    }
    config = dataclasses.replace(config, **unset) if unset else config
    for name in ("rollout_guidance", "train_guidance"):
        if hasattr(config, name):
            adapter.check_guidance(getattr(config, name))
    return config


class BaseTrainer:
    """Owns the accelerate setup and the loop; subclasses define ``training_step``."""

    config_class = TrainerConfig
    #: Name of the settings file written beside the model.
    config_file_name = "trainer_config.json"
    #: Whether the method back-propagates through the reward (checked once, before any expensive work).
    needs_differentiable_reward = True

    def __init__(self, pipe, reward=None, prompts=None, config: TrainerConfig | None = None):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(self.config).__name__}")
        # Cheap checks first: nothing expensive runs and nothing is written before they pass.
        self.config = sharding.with_accelerate_fsdp(self.config)
        self.adapter = get_model_adapter(pipe, negative_prompt=self.config.negative_prompt)
        self.config = with_model_defaults(self.config, self.adapter)
        self.pipe = pipe
        size = self.config.resolution
        if size % self.adapter.size_multiple:
            raise ValueError(f"resolution must be a multiple of {self.adapter.size_multiple} for this model, got {size}")
        source = prompts if prompts is not None else self.config.prompt_file
        if source is None:
            raise ValueError("no training prompts: pass prompts=[...] or a path, or set config.prompt_file")
        self.prompts = load_prompts(source)
        self.prepare_data()
        check_output_dir(
            self.config.output_dir,
            allow_existing=bool(self.config.resume_from_checkpoint or self.config.overwrite_output_dir),
            remedy="set resume_from_checkpoint='latest' to continue it, overwrite_output_dir=True to write over it, "
            "or choose another folder",
        )
        self.resume_checkpoint = self.check_files(self.config)
        # A quantized transformer cannot change dtype (fp32 master weights) or be sharded: it carries a LoRA.
        self.quantization = quantization_of(pipe.transformer)
        if self.quantization and not self.config.use_lora:
            raise ValueError(
                f"the transformer is quantized ({self.quantization}): a full fine-tune needs its weights in a float "
                "dtype; train a LoRA (use_lora=True) or load the transformer unquantized"
            )
        if self.quantization and self.config.fsdp:
            raise ValueError(f"fsdp=True cannot shard a quantized transformer ({self.quantization}): leave fsdp off")
        self.reward = self.prepare_reward(reward)

        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        with sharding.accelerate_without_fsdp():
            self.accelerator = Accelerator(
                mixed_precision=self.config.mixed_precision,
                log_with=self.config.log_with,
                project_config=ProjectConfiguration(
                    project_dir=self.config.output_dir, logging_dir=os.path.join(self.config.output_dir, "logs")
                ),
                cpu=self.config.cpu,
            )
        self.check_fsdp()
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        # Counters that a checkpoint carries, so that a resumed run logs and stops as the uninterrupted one.
        self.skipped_updates = 0
        self.consecutive_skips = 0
        self._inactive_hinge_updates = 0
        self.prompt_cache: dict[str, TextConditioning] = {}
        self._trained = False
        self._lora_added = False
        self._adapters_found = bool(getattr(pipe.transformer, "peft_config", None))
        # Recorded before anything is changed, given back by train() (or at once if the setup fails).
        self.pipeline_state = PipelineState(
            [pipe.transformer, pipe.vae, *self.adapter.text_encoders()], keep_on_device=[pipe.transformer, pipe.vae]
        )
        try:
            self._setup_models()
        except BaseException:
            self._hand_back_pipeline()
            raise

    @property
    def method_name(self) -> str:
        return self.config.method

    # ----------------------------------------------------------------------------------- hooks for methods
    @classmethod
    def check_files(cls, config: TrainerConfig) -> str | None:
        """Check what ``config`` names on disk, beyond the prompts and the output folder, without any model (the
        command line calls this before loading one): the checkpoint to resume from, returned resolved (``None``
        for a fresh start). Methods with files of their own add their checks."""
        return resolve_resume_checkpoint(config)

    def prepare_data(self) -> None:
        """Read the method's own training data, once the prompts are loaded (cheap work only: no model is ready)."""

    def prepare_reward(self, reward):
        """Check and wrap the user's reward; called before any expensive work.

        The default is a plain reward: a :class:`~diffusers_srpo.rewards.Reward` or a callable
        ``fn(images, prompts) -> Tensor[B]``, scored against ``config.reward_template``.
        """
        from ..rewards import CallableReward, PromptTemplateReward, Reward, SemanticRelativeReward

        if reward is None:
            raise ValueError(f"{type(self).__name__} needs a reward, e.g. HPSv2Reward.from_pretrained(path)")
        if isinstance(reward, SemanticRelativeReward):
            raise TypeError(
                f"got a SemanticRelativeReward; method {self.method_name!r} uses a plain reward: pass its .base "
                "(aimed with reward_template), or use method='srpo'"
            )
        if not isinstance(reward, Reward):
            if not callable(reward):
                raise TypeError(f"reward must be a Reward or a callable fn(images, prompts) -> Tensor[B], got {type(reward).__name__}")
            reward = CallableReward(reward)
        if self.config.reward_template != "{prompt}":
            reward = PromptTemplateReward(reward, self.config.reward_template)
        if self.needs_differentiable_reward:
            self.check_reward_differentiable(reward)
        return reward

    def setup_method(self) -> None:
        """Build method-specific state: called once the models are on the device and the trainable parameters are
        set, just before ``accelerator.prepare`` wraps the transformer (``self.pipe.transformer`` is still plain)."""

    def scheduler_overrides(self) -> dict:
        """Settings of the ``DirectAlignScheduler`` built from the pipeline's scheduler config."""
        return {"rollout_steps": self.config.rollout_steps, "direct_align_shift": self.config.direct_align_shift}

    def training_step(self, step: int, micro_step: int = 0) -> StepOutput:
        """The losses of micro-batch ``micro_step`` (of ``gradient_accumulation_steps``) of update ``step``."""
        raise NotImplementedError

    def model_card_details(self) -> dict[str, str]:
        return {}

    def check_reward_differentiable(self, reward: torch.nn.Module) -> None:
        """Score one small random image and check that a gradient reaches its pixels."""
        name = type(reward).__name__
        size = getattr(reward, "image_size", 64)
        images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        images = images.to(_module_device(reward)).requires_grad_(True)
        scores = reward(images, self.prompts[:1])
        if not isinstance(scores, torch.Tensor) or scores.shape != (1,):
            raise ValueError(f"the reward must return a tensor of shape [batch], got {getattr(scores, 'shape', type(scores))}")
        if not scores.requires_grad:
            raise ValueError(f"the reward {name} is not differentiable: its score carries no gradient ({self.method_name} needs one)")
        scores.sum().backward()
        if images.grad is None or not torch.isfinite(images.grad).all() or not images.grad.abs().sum() > 0:
            raise ValueError(f"the reward {name} is not differentiable: no gradient reaches the images ({self.method_name} needs one)")

    def check_fsdp(self) -> None:
        """Refuse, in one line and before any model moves, what cannot run sharded."""
        if not self.config.fsdp:
            return
        if self.accelerator.num_processes < 2:
            raise ValueError(
                "fsdp=True shards the transformer over several processes, but this run has one: launch it with "
                "accelerate launch or torchrun --nproc_per_node N, or leave fsdp off"
            )

    # ----------------------------------------------------------------------------------- setup
    def _setup_models(self) -> None:
        config, accelerator = self.config, self.accelerator
        device = accelerator.device
        pipe = self.pipe
        transformer = pipe.transformer

        for module in [transformer, pipe.vae, *self.adapter.text_encoders()]:
            module.requires_grad_(False)
            module.eval()
        if config.use_lora:
            from peft import LoraConfig

            lora_config = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(config.lora_target_modules or self.adapter.lora_target_modules),
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix_seed(config.seed, 0x10CA))
                transformer.add_adapter(lora_config)
            self._lora_added = True
        else:
            # Full fine-tune: master weights in fp32; autocast gives the compute precision.
            transformer.to(torch.float32)
            transformer.requires_grad_(True)
        # The dtype of the frozen transformer weights, in which its inputs are given (fp32 for a full fine-tune).
        self.weight_dtype = transformer.dtype
        # Every prompt is encoded once, before the transformer, the VAE and the reward come to the device: the text
        # encoders then leave it (FLUX.2-dev's 24B encoder and its 32B transformer do not fit an 80 GB card together).
        self.cache_prompt_embeddings(self.prompts + list(config.validation_prompts or []) + list(config.eval_prompts or []))
        if not config.fsdp:  # under FSDP each process's shards go to the device, the user's transformer stays put
            transformer.to(device)
        pipe.vae.to(device)
        self.adapter.enable_gradient_checkpointing(config.gradient_checkpointing, config.vae_gradient_checkpointing)
        self.reward.to(device)

        if config.use_lora:
            from diffusers.training_utils import cast_training_params

            cast_training_params(transformer, dtype=torch.float32)
        if config.fsdp:
            self.model = sharding.shard_copy(transformer, device, self.fsdp_param_dtype)
        trained = [(n, p) for n, p in (self.model if config.fsdp else transformer).named_parameters() if p.requires_grad]
        self.trainable_parameters = [p for _, p in trained]
        self._trained_names = {n for n, _ in trained}
        if not self.trainable_parameters:
            raise ValueError("nothing to train: no transformer parameter requires grad (check lora_target_modules)")

        if config.use_8bit_adam:
            import bitsandbytes

            adamw = bitsandbytes.optim.AdamW8bit
        else:
            adamw = torch.optim.AdamW
        optimizer = adamw(
            self.trainable_parameters,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.adam_weight_decay,
        )
        self.setup_method()
        from diffusers.optimization import get_scheduler

        if config.fsdp:
            # Nothing sharded goes through accelerate (it would save rank 0's shards alone): the optimizer state is
            # checkpointed by torch distributed checkpoint, the schedule as a plain object stepped once per update.
            self.optimizer = optimizer
            self.lr_scheduler = get_scheduler(
                config.lr_scheduler,
                optimizer=optimizer,
                num_warmup_steps=config.lr_warmup_steps,
                num_training_steps=config.max_train_steps,
            )
            accelerator.register_for_checkpointing(self.lr_scheduler)
        else:
            # accelerate steps a prepared scheduler once per process per update, hence the factor.
            lr_scheduler = get_scheduler(
                config.lr_scheduler,
                optimizer=optimizer,
                num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                num_training_steps=config.max_train_steps * accelerator.num_processes,
            )
            self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        from ..scheduling_direct_align import DirectAlignScheduler

        self.scheduler = DirectAlignScheduler.from_config(pipe.scheduler.config, **self.scheduler_overrides())
        self.rollout_sigmas = self.scheduler.rollout_sigmas(device)
        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)

    @property
    def fsdp_param_dtype(self) -> torch.dtype | None:
        """The compute dtype of the sharded transformer: the run's mixed precision (``None``: the weights' own)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.mixed_precision)

    @property
    def whole_transformer(self) -> torch.nn.Module:
        """The user's transformer with the trained weights, whole: what the outputs are written from. Under FSDP it
        holds them after :meth:`gather_trained_weights`."""
        return self.pipe.transformer if self.config.fsdp else self.accelerator.unwrap_model(self.model)

    def gather_trained_weights(self) -> None:
        """Under FSDP, copy the trained weights from the shards into the user's transformer (a collective: every
        process calls it); nothing to do otherwise, where the model is the user's transformer itself."""
        if self.config.fsdp:
            sharding.gather_into(self.model, self.pipe.transformer)

    def cache_prompt_embeddings(self, prompts: list[str]) -> None:
        """Encode the prompts not yet cached, once each; keep the embeddings on the CPU, then send the encoders away."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.prompt_cache]
        if not missing:
            return
        device = self.accelerator.device
        encoders = self.adapter.text_encoders()
        for encoder in encoders:
            encoder.to(device)
        chunk = 16
        for start in range(0, len(missing), chunk):
            batch = missing[start : start + chunk]
            embeds = self.adapter.encode_prompts(batch, device, self.config.max_sequence_length)
            for i, prompt in enumerate(batch):
                self.prompt_cache[prompt] = embeds.select(i).to("cpu")
        if device.type != "cpu":
            for encoder in encoders:
                encoder.to("cpu")

    def text_for(self, prompts: list[str]) -> TextConditioning:
        """The cached text conditioning of ``prompts`` on the training device (encoding any new prompt first)."""
        self.cache_prompt_embeddings(prompts)
        cached = [self.prompt_cache[p] for p in prompts]
        return type(cached[0]).cat(cached).to(self.accelerator.device, self.weight_dtype)

    # ----------------------------------------------------------------------------------- data order and seeds
    # An update sees ``processes x train_batch_size x gradient_accumulation_steps`` samples. Each has a position in
    # the update, and its prompt, noise and per-sample draws are keyed by that position alone, so that how the samples
    # are split between processes and micro-batches changes nothing but float rounding.
    @property
    def samples_per_update(self) -> int:
        return self.accelerator.num_processes * self.config.train_batch_size * self.config.gradient_accumulation_steps

    def sample_positions(self, micro_step: int = 0) -> list[int]:
        """Positions in the update of this process's samples of micro-batch ``micro_step``."""
        world, rank, batch = self.accelerator.num_processes, self.accelerator.process_index, self.config.train_batch_size
        first = (micro_step * world + rank) * batch
        return list(range(first, first + batch))

    def indices_for_step(self, step: int, micro_step: int = 0) -> list[int]:
        """This process's prompt indices for a micro-batch: a seeded shuffle per epoch, walked in sample positions."""
        chosen = []
        for position in self.sample_positions(micro_step):
            epoch, index = divmod(step * self.samples_per_update + position, len(self.prompts))
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(_mix_seed(self.config.seed, epoch)))
            chosen.append(int(order[index]))
        return chosen

    def stream_generator(self, step: int, stream: int, *key: int) -> torch.Generator:
        """A CPU generator for one purpose (``stream``) of update ``step``, further keyed by ``key`` (a sample
        position, a group member, ...): the same in every run, whichever process draws it."""
        return torch.Generator().manual_seed(_mix_seed(self.config.seed, step, stream, *key))

    def generator(self, step: int, stream: int, per_process: bool, micro_step: int = 0) -> torch.Generator:
        """A CPU generator for one purpose (``stream``) of one update: shared by all processes, or (``per_process``)
        one per micro-batch of each process, keyed by the micro-batch's first sample position."""
        return self.stream_generator(step, stream, self.sample_positions(micro_step)[0] if per_process else -1)

    def sample_generators(self, step: int, stream: int, micro_step: int = 0) -> list[torch.Generator]:
        """One CPU generator per sample of the micro-batch for ``stream``, keyed by the sample's position."""
        return [self.stream_generator(step, stream, position) for position in self.sample_positions(micro_step)]

    def step_prompts(self, step: int, micro_step: int = 0) -> tuple[list[str], TextConditioning]:
        """This process's prompts of a micro-batch and their text conditioning."""
        prompts = [self.prompts[i] for i in self.indices_for_step(step, micro_step)]
        return prompts, self.text_for(prompts)

    def step_noise(self, step: int, batch_size: int, dtype: torch.dtype | None = None, micro_step: int = 0) -> torch.Tensor:
        """The starting noise of a micro-batch's samples (packed latents): with ``shared_noise`` one noise for the
        whole update, on every process (their prompts differ), else one per sample position."""
        size, device, dtype = self.config.resolution, self.accelerator.device, dtype or self.weight_dtype
        if self.config.shared_noise:
            noise = self.adapter.make_noise(1, size, size, self.generator(step, NOISE_STREAM, per_process=False), device, dtype)
            return noise.expand(batch_size, *noise.shape[1:]).clone()
        generators = self.sample_generators(step, NOISE_STREAM, micro_step)
        if len(generators) != batch_size:
            raise ValueError(f"batch_size {batch_size} is not this micro-batch's {len(generators)} samples")
        return torch.cat([self.adapter.make_noise(1, size, size, g, device, dtype) for g in generators])

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(self, noise: torch.Tensor, text: TextConditioning, sigmas: torch.Tensor, guidance: float) -> torch.Tensor:
        """Euler integration of the flow ODE along ``sigmas`` with the current model, no gradient."""
        latents = noise
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            latents = self.euler_step(latents, sigma, sigma_next, text, guidance)
        return latents

    def euler_step(self, latents: torch.Tensor, sigma, sigma_next, text: TextConditioning, guidance: float) -> torch.Tensor:
        """One Euler step ``x + (sigma_next - sigma) * v`` of the current model (with gradient where enabled)."""
        velocity = self.velocity(latents, sigma, text, guidance)
        return latents + (sigma_next - sigma) * velocity

    def velocity(self, latents: torch.Tensor, sigma, text: TextConditioning, guidance: float) -> torch.Tensor:
        """The prepared model's velocity at ``latents`` (through the wrapper: under FSDP only it holds whole
        parameters). A quantized transformer gets its inputs in the compute dtype, as a pipeline gives them:
        bitsandbytes' and torchao's int8 layers compute in their input's dtype, out of autocast's reach, so fp32
        latents would make its whole residual stream fp32 (more memory, fp32 matmuls)."""
        if self.quantization:
            latents = latents.to(self.weight_dtype)
        size = self.config.resolution
        return self.adapter.predict_velocity(self.model, latents, sigma, text, guidance, size, size)

    def decode_and_score(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Packed latents -> images -> the reward ``[B]``, differentiable in the latents."""
        size = self.config.resolution
        return self.reward(self.adapter.decode(latents, size, size), prompts)

    def hinge_loss(self, scores: torch.Tensor, logs: dict[str, float], log_key: str = "hinge_active") -> torch.Tensor:
        """``mean(relu(threshold - reward))``; logs the fraction of samples under the threshold, the only ones that
        train (``train`` warns when it stays 0)."""
        threshold = self.config.hinge_threshold
        logs[log_key] = (scores.detach() < threshold).float().mean().item()
        return torch.relu(threshold - scores).mean()

    # ----------------------------------------------------------------------------------- checkpoints
    def _save_model_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            self._write_model(output_dir)
        for _ in range(len(weights)):
            weights.pop()  # only what _write_model wrote is kept: not the frozen base weights

    def _load_model_hook(self, models, input_dir):
        models.clear()
        self._read_model(input_dir)

    def _write_model(self, directory: str) -> None:
        transformer = self.whole_transformer
        if self.config.use_lora:
            from peft.utils import get_peft_model_state_dict

            self.adapter.save_lora_weights(
                directory, get_peft_model_state_dict(transformer), transformer.peft_config["default"].to_dict()
            )
        else:
            transformer.save_pretrained(os.path.join(directory, TRANSFORMER_FOLDER), safe_serialization=True)

    def check_weights_finite(self) -> None:
        """Refuse to write trained weights that hold a NaN or an infinity (checked before anything is written; under
        FSDP on the gathered weights)."""
        trained = [(n, p) for n, p in self.whole_transformer.named_parameters() if n in self._trained_names]
        bad = [n for n, p in trained if not torch.isfinite(p.detach()).all()]
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to write the trained weights: {len(bad)} of {len(trained)} trained tensors are not finite "
                f"(first: {bad[0]}); nothing was written, and the checkpoints in {self.config.output_dir!r} are as "
                "they were"
            )

    def _read_model(self, directory: str) -> None:
        transformer = self.whole_transformer
        if self.config.use_lora:
            from peft import set_peft_model_state_dict

            state = self.adapter.lora_state_dict_for_transformer(directory)
            result = set_peft_model_state_dict(transformer, state, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"checkpoint {directory!r} has LoRA keys this model lacks: {unexpected[:5]}")
            from diffusers.training_utils import cast_training_params

            cast_training_params(transformer, dtype=torch.float32)
        else:
            from safetensors.torch import load_file

            folder = os.path.join(directory, TRANSFORMER_FOLDER)
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            state = {}
            for name in files:
                state.update(load_file(os.path.join(folder, name)))
            transformer.load_state_dict(state)
        if self.config.fsdp:
            sharding.scatter_from(transformer, self.model)

    def checkpoint_dirs(self) -> list[str]:
        """Complete checkpoints (those holding the trainer state, written last), oldest first."""
        return checkpoint_dirs(self.config.output_dir)

    def save_checkpoint(self) -> str:
        """Write ``checkpoint-N`` atomically: into a temporary folder, renamed only once complete."""
        accelerator = self.accelerator
        self.gather_trained_weights()
        self.check_weights_finite()
        final = os.path.join(self.config.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step}")
        partial = os.path.join(self.config.output_dir, f".partial-{CHECKPOINT_PREFIX}{self.global_step}")
        if accelerator.is_main_process and os.path.isdir(partial):
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(partial)
        if self.config.fsdp:
            sharding.save_optimizer(self.model, self.optimizer, os.path.join(partial, OPTIMIZER_FOLDER))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(partial, TRAINER_STATE_NAME), "w") as f:
                json.dump(
                    {
                        "global_step": self.global_step,
                        "method": self.method_name,
                        "fsdp": self.config.fsdp,
                        "skipped_updates": self.skipped_updates,
                        "consecutive_skips": self.consecutive_skips,
                        "inactive_hinge_updates": self._inactive_hinge_updates,
                        "history": self.history,
                    },
                    f,
                )
            move_into_place(partial, final)
            limit = self.config.checkpoints_total_limit
            if limit is not None:
                for old in self.checkpoint_dirs()[:-limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def _load_checkpoint(self, path: str) -> None:
        # Checked again (it was when the trainer was built): the folder may have changed since.
        state = read_trainer_state(path, method=self.method_name, use_lora=self.config.use_lora, fsdp=self.config.fsdp)
        self.accelerator.load_state(path)
        if self.config.fsdp:
            sharding.load_optimizer(self.model, self.optimizer, os.path.join(path, OPTIMIZER_FOLDER))
        self.global_step = state["global_step"]
        self.history = state.get("history", [])
        self.skipped_updates = state.get("skipped_updates", 0)
        # The checkpoint of a run stopped for non-finite updates is resumed on purpose (the cause fixed): a fresh
        # budget of skips. Otherwise the count goes on, as it would have without the interruption.
        consecutive = state.get("consecutive_skips", 0)
        self.consecutive_skips = 0 if consecutive >= self.config.max_consecutive_skips else consecutive
        self._inactive_hinge_updates = state.get("inactive_hinge_updates", 0)

    # ----------------------------------------------------------------------------------- outputs
    def save_outputs(self) -> None:
        """The final LoRA (or transformer), the config and a model card; main process only. Each is written under
        a temporary name and renamed into place, so a kill leaves the old file (or none), never a truncated one."""
        self.gather_trained_weights()
        if not self.accelerator.is_main_process:
            return
        self.check_weights_finite()
        with staged_outputs(self.config.output_dir) as staging:
            self._write_model(staging)
            self.config.to_json_file(os.path.join(staging, self.config_file_name))
            with open(os.path.join(staging, "README.md"), "w") as f:
                f.write(self.model_card())

    def model_card(self) -> str:
        base_model = getattr(self.pipe, "name_or_path", None) or self.pipe.config.get("_name_or_path") or "unknown"
        kind = "LoRA" if self.config.use_lora else "full fine-tune"
        pipeline = self.adapter.pipeline_class_name
        details = {"base model": base_model, "method": self.method_name, "trained": kind, **self.model_card_details()}
        details["updates"] = str(self.global_step)
        details["prompts per update"] = (
            f"{self.samples_per_update} ({self.accelerator.num_processes} processes x {self.config.train_batch_size} "
            f"x {self.config.gradient_accumulation_steps} accumulated{', sharded with FSDP' if self.config.fsdp else ''})"
        )
        if self.quantization:
            details["frozen base while training"] = f"{self.quantization} (the LoRA loads on the unquantized model)"
        if self.config.use_8bit_adam:
            details["optimizer"] = "bitsandbytes 8-bit AdamW"
        if self.skipped_updates:
            details["updates skipped (non-finite loss, reward or gradient)"] = str(self.skipped_updates)
        lines = [
            "---",
            f"base_model: {base_model}",
            "library_name: diffusers",
            "tags: [diffusers, diffusers-srpo, lora, text-to-image, " + self.method_name + "]",
            "---",
            "",
            f"# {self.method_name.upper()} {kind} trained with diffusers-srpo",
            "",
            *[f"- **{key}**: {value}" for key, value in details.items()],
            "",
            "## Use",
            "",
            "```python",
            f"from diffusers import {pipeline}",
            f'pipe = {pipeline}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16)',
            'pipe.load_lora_weights("path/to/this/folder")'
            if self.config.use_lora
            else f"# load transformer/ with {type(self.adapter.transformer).__name__}.from_pretrained",
            "```",
            "",
            "## Settings",
            "",
            "```json",
            json.dumps(self.config.to_dict(), indent=2),
            "```",
            "",
        ]
        return "\n".join(lines)

    @torch.no_grad()
    def generate_images(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] of the current model: the rollout sampler (the training
        distribution: rollout schedule and guidance) from noise drawn with ``seed``."""
        size = self.config.resolution
        text = self.text_for(prompts)
        noise = self.adapter.make_noise(
            len(prompts), size, size, torch.Generator().manual_seed(seed), self.accelerator.device, self.weight_dtype
        )
        latents = self.sample_latents(noise, text, self.rollout_sigmas, self.config.rollout_guidance)
        return self.adapter.decode(latents, size, size)

    def save_validation_grid(self) -> str | None:
        prompts = self.config.validation_prompts
        if not prompts:
            return None
        from torchvision.utils import save_image

        # Every process samples (through the prepared model, as FSDP and DDP need); the main one saves.
        images = self.generate_images(prompts, self.config.validation_seed)
        if not self.accelerator.is_main_process:
            return None
        folder = os.path.join(self.config.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{self.global_step:06d}.png")
        save_image(images.float().cpu(), path, nrow=min(len(prompts), 4))
        return path

    @property
    def plain_reward(self):
        """The training reward without what steers it: SRP's control words and ``reward_template``."""
        from ..rewards import PromptTemplateReward, SemanticRelativeReward

        reward = self.reward
        while isinstance(reward, (SemanticRelativeReward, PromptTemplateReward)):
            reward = reward.base
        return reward

    @torch.no_grad()
    def evaluate_held_out(self) -> dict[str, float]:
        """``eval_reward``: the mean plain reward of ``eval_prompts`` under the current model, each prompt sampled
        from its own fixed noise (``validation_seed`` + its index), so that every evaluation of a run sees the same
        noise. The prompts are split over the processes; the mean is of all of them."""
        prompts = self.config.eval_prompts
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        # Every process makes the same number of model calls (FSDP all-gathers in each): the last round may repeat
        # a prompt, whose score then counts with weight 0.
        rounds = math.ceil(len(prompts) / world)
        total = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        for position in range(rank, rounds * world, world):
            index = position % len(prompts)
            image = self.generate_images([prompts[index]], self.config.validation_seed + index)
            score = self.plain_reward(image, [prompts[index]]).double().sum()
            counted = float(position < len(prompts))
            total += torch.stack([score * counted, score.new_tensor(counted)])
        total = self.accelerator.reduce(total, "sum")
        return {"eval_reward": (total[0] / total[1]).item()}

    # ----------------------------------------------------------------------------------- the loop
    def _check_hinge(self, logs: dict[str, float]) -> None:
        """Warn once when no sample of any process was under the hinge threshold for HINGE_PATIENCE updates in a
        row: a reward on another scale than the threshold (aesthetic ~5 against 0.7) trains nothing."""
        active = [value for key, value in logs.items() if key.startswith("hinge_active")]
        if not active:
            return
        self._inactive_hinge_updates = self._inactive_hinge_updates + 1 if max(active) == 0 else 0
        if self._inactive_hinge_updates == HINGE_PATIENCE and self.accelerator.is_main_process:
            logger.warning(
                "for %d updates every reward was above hinge_threshold=%s (last mean %.3f), so the loss and its "
                "gradient were 0: raise hinge_threshold above the reward's range",
                HINGE_PATIENCE, self.config.hinge_threshold, logs.get("reward", float("nan")),
            )  # fmt: skip

    def _iterate_steps(self) -> Iterator[int]:
        from tqdm.auto import tqdm

        bar = tqdm(
            range(self.global_step, self.config.max_train_steps),
            initial=self.global_step,
            total=self.config.max_train_steps,
            desc=self.method_name,
            disable=not self.accelerator.is_local_main_process,
        )
        for step in bar:
            yield step
            if self.history:
                bar.set_postfix({k: f"{v:.4f}" for k, v in self.history[-1].items() if k in ("loss", "reward")})

    def train(self, on_update: Callable[[BaseTrainer, dict[str, float]], None] | None = None):
        """Run the updates; write the outputs. Returns the per-update logs.

        ``on_update(trainer, logs)`` runs after every update, before the logs are recorded: an evaluation can
        add its own numbers to ``logs`` (the demo measures the toy world's oracles this way).

        A run ends early only with a :class:`~diffusers_srpo.trainers.TrainingStopped` that names the checkpoint to
        resume from: :class:`TrainingInterrupted` after SIGINT / SIGTERM (the update in progress is finished first),
        :class:`NonFiniteUpdatesError` after ``max_consecutive_skips`` skipped updates in a row. Whatever the end,
        the pipeline is handed back as it was found with the trained weights in it: ``pipe.transformer.forward``
        is the class's own, modes, flags and dtypes are as they were, the transformer and the VAE stay on the
        training device and the text encoders go back where they were. A trainer trains once.
        """
        if self._trained:
            raise RuntimeError(
                "train() runs once per trainer (the pipeline was handed back when it ended); build a new trainer, "
                "with resume_from_checkpoint='latest' to continue from a checkpoint"
            )
        self._trained = True
        config, accelerator = self.config, self.accelerator
        try:
            with stop_on_signals() as stop, warnings.catch_warnings():
                if config.fsdp:
                    # FLUX's blocks return views (slices of one sequence); torch warns, on every call, that an in-place
                    # op on them would skip FSDP's all-gather. No block writes into its input in place: the sharded
                    # runs equal the unsharded ones (tests/test_fsdp.py).
                    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
                if self.resume_checkpoint is not None:
                    self._load_checkpoint(self.resume_checkpoint)
                elif config.resume_from_checkpoint == "latest":
                    logger.warning("resume_from_checkpoint='latest' but %s holds no checkpoint: starting fresh", config.output_dir)
                if accelerator.is_main_process:
                    os.makedirs(config.output_dir, exist_ok=True)
                if config.log_with:
                    accelerator.init_trackers(f"diffusers-srpo-{self.method_name}", config=_flat_config(config))
                if config.eval_steps and self.global_step == 0:
                    accelerator.log(self.evaluate_held_out(), step=0)  # the base model's score, to compare against
                self.model.train()
                for step in self._iterate_steps():
                    logs, stop_requested = self._run_update(step, stop)
                    self.global_step = step + 1
                    logs["lr"] = self.lr_scheduler.get_last_lr()[0]
                    if config.eval_steps and self.global_step % config.eval_steps == 0:
                        logs.update(self.evaluate_held_out())
                    if not self.consecutive_skips:  # a skipped update's hinge says nothing about the threshold
                        self._check_hinge(logs)
                    if on_update is not None:
                        on_update(self, logs)
                    self.history.append(logs)
                    accelerator.log(logs, step=self.global_step)
                    self._after_update(stop_requested, stop)
                accelerator.wait_for_everyone()
                self.save_outputs()
        finally:
            accelerator.end_training()
            self._hand_back_pipeline()
        return self.history

    def _run_update(self, step: int, stop: StopRequest) -> tuple[dict[str, float], bool]:
        """One update: ``gradient_accumulation_steps`` micro-batches, each the method's micro-step losses
        back-propagated one after another, then one optimizer step, or none when a loss, a logged number (the
        rewards among them) or the gradient norm of any process is not finite. Returns the logs (the same on every
        process) and whether any process was asked to stop."""
        config, accelerator = self.config, self.accelerator
        accumulation = config.gradient_accumulation_steps
        losses: dict[str, float] = {}
        micro_logs: list[dict[str, float]] = []
        for micro_step in range(accumulation):
            output = self.training_step(step, micro_step)
            if not output.losses:
                raise RuntimeError(f"{type(self).__name__}.training_step returned no loss for step {step}")
            # The micro-step losses (SRPO's two branches, TailorPO's steps) of every micro-batch accumulate into one
            # update; their graphs are built and freed one after another. Each is scaled so that the update's loss is
            # the mean over its samples. Only the last backward synchronises the gradients across processes.
            # (accelerate's own `accumulate` keeps its step count in a process-wide singleton, which a second
            # trainer built in the same process would overwrite.)
            for index, (name, loss_fn) in enumerate(output.losses.items()):
                is_last = micro_step == accumulation - 1 and index == len(output.losses) - 1
                with self._gradient_sync(is_last):
                    loss = loss_fn() / (len(output.losses) * accumulation)
                    accelerator.backward(loss)
                key = f"loss of {name!r}"
                losses[key] = losses.get(key, 0.0) + loss.detach().item()
            micro_logs.append(output.logs)
        logs_of_update = {key: sum(logs[key] for logs in micro_logs) / accumulation for key in micro_logs[0]}
        # Clipping at infinity scales by exactly 1: the norm is measured (and checked) whether or not it clips.
        clip = sharding.sharded_clip_grad_norm_ if config.fsdp else accelerator.clip_grad_norm_
        grad_norm = clip(self.trainable_parameters, config.max_grad_norm or math.inf)
        numbers = {**logs_of_update, "loss": sum(losses.values()), "grad_norm": float(grad_norm)}
        # One collective for all the numbers (every process has the same keys in the same order): a NaN of any
        # process makes the mean NaN on every process, so that all of them skip the same updates.
        local = {**numbers, **losses, "stop": float(stop.requested)}
        means = accelerator.reduce(torch.tensor(list(local.values()), device=accelerator.device), "mean").tolist()
        reduced = dict(zip(local, means, strict=True))
        logs = {key: reduced[key] for key in numbers}
        # The sum "loss" is left out of the reasons: the micro-step losses name which one it was.
        checked = [key for key in local if key not in ("loss", "stop")]
        non_finite = [key for key in checked if not math.isfinite(reduced[key])]
        # Under fp16 loss scaling an overflow of the gradients alone is GradScaler's business: its step skips the
        # update and lowers the scale (accelerate then holds the schedule), as in any fp16 training.
        scaler_overflow = accelerator.scaler is not None and non_finite == ["grad_norm"]
        if non_finite and not scaler_overflow:
            self._skip_update(step, [f"{key} ({reduced[key]})" for key in non_finite])
        else:
            self.optimizer.step()
            if not scaler_overflow:
                self.consecutive_skips = 0
        # The schedule follows the update's number whether or not it stepped (see the module docstring); torch warns
        # when it steps before the optimizer ever has, as it does when the first update is skipped.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        logs["skipped_updates"] = float(self.skipped_updates)
        return logs, reduced["stop"] > 0

    def _gradient_sync(self, synchronise: bool):
        """Where a backward synchronises the gradients: DDP only at the update's last one (``no_sync`` before); FSDP
        at every one, reduce-scattering into the sharded gradients (skipping it would keep whole gradients)."""
        if synchronise or self.config.fsdp:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def _skip_update(self, step: int, non_finite: list[str]) -> None:
        """Leave the weights and the optimizer state as they are; count the skip and say why."""
        self.skipped_updates += 1
        self.consecutive_skips += 1
        if self.accelerator.scaler is not None:
            # fp16 loss scaling: the gradients were unscaled (and checked for infinities) by the clipping; update
            # the scale from that as GradScaler's own step would, which also readies it for the next update.
            self.accelerator.scaler.update()
        if self.accelerator.is_main_process:
            logger.warning(
                "update %d of %d skipped (weights and optimizer state unchanged; %d in a row of at most %d): "
                "not finite: %s",
                step + 1, self.config.max_train_steps, self.consecutive_skips, self.config.max_consecutive_skips,
                ", ".join(non_finite),
            )  # fmt: skip

    def _after_update(self, stop_requested: bool, stop: StopRequest) -> None:
        """Checkpoints and validation after an update; the two early ends, each after writing a checkpoint."""
        config = self.config
        checkpoint = None
        if self.consecutive_skips >= config.max_consecutive_skips:
            checkpoint = self.save_checkpoint()
            raise NonFiniteUpdatesError(
                f"{self.consecutive_skips} updates in a row (up to update {self.global_step}) had a non-finite loss, "
                f"reward or gradient, so none of them changed the weights (max_consecutive_skips="
                f"{config.max_consecutive_skips}); the last good state is in {checkpoint}",
                checkpoint=checkpoint,
                step=self.global_step,
                resume_hint="check the reward, the learning rate and the mixed precision, then resume from it",
            )
        if config.checkpointing_steps and self.global_step % config.checkpointing_steps == 0:
            checkpoint = self.save_checkpoint()
        if config.validation_steps and self.global_step % config.validation_steps == 0:
            self.save_validation_grid()
        # Every process stops after the same update, so they go by the flag of the update's collective; a single
        # process needs no agreement and also honours a signal that came after it (during the hooks, say).
        if self.accelerator.num_processes == 1:
            stop_requested = stop.requested
        if stop_requested and self.global_step < config.max_train_steps:
            checkpoint = checkpoint or self.save_checkpoint()
            raise TrainingInterrupted(
                f"stopped by {stop.signal_name or 'a signal to another process'} after update {self.global_step} of "
                f"{config.max_train_steps}; the checkpoint is {checkpoint}",
                checkpoint=checkpoint,
                step=self.global_step,
                resume_hint="resume with resume_from_checkpoint='latest'",
                signal_number=stop.signal_number,
            )

    def _hand_back_pipeline(self) -> None:
        """The user's pipeline as found, with the trained weights: see :meth:`train`."""
        transformer = self.pipe.transformer
        if self._lora_added and not self._trained:
            # The setup failed after adding the LoRA: take it out again, or the user's next trainer could not add its
            # own. Without other adapters the peft layers go too, as unload_lora_weights does.
            if self._adapters_found:
                transformer.delete_adapters("default")
            else:
                transformer.unload_lora()
                transformer.__dict__.pop("_hf_peft_config_loaded", None)
        self.pipeline_state.restore()
        self.weight_dtype = transformer.dtype


def _flat_config(config: TrainerConfig) -> dict:
    """Tracker-friendly config: lists and None become strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}



def _module_device(module) -> torch.device:
    parameter = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")
