"""Training configurations, trl style: each field's help text doubles as the command-line help."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

_MIXED_PRECISION = ("no", "fp16", "bf16")
_X0_SOURCES = ("rollout", "dataset")
_WORD_SCHEDULES = ("cycle", "fixed")


def _help(text: str, **extra) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainerConfig:
    """Settings shared by every trainer of the family: run layout, optimisation, LoRA, checkpoints, logging."""

    # Run layout
    output_dir: str = field(default="srpo-output", metadata=_help("Where the LoRA (or full model), checkpoints and logs go."))
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("Allow writing into an output_dir that already holds files from another run.")
    )
    seed: int = field(default=42, metadata=_help("Seed of the prompt order, the noise and the sampled timesteps."))
    prompt_file: str | None = field(
        default=None,
        metadata=_help("Training prompts: a .txt file (one a line) or a .jsonl file (a 'prompt' or 'text' field a line)."),
    )
    max_sequence_length: int = field(default=512, metadata=_help("Token length of the T5 prompt encoding."))

    # Optimisation
    max_train_steps: int = field(default=200, metadata=_help("Number of optimizer updates."))
    train_batch_size: int = field(default=1, metadata=_help("Prompts per process per update."))
    learning_rate: float | None = field(
        default=None,
        metadata=_help("AdamW learning rate; default 1e-4 with LoRA, 5e-6 (the reference) for a full fine-tune."),
    )
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    adam_weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay."))
    lr_scheduler: str = field(
        default="constant",
        metadata=_help("Learning-rate schedule of diffusers.optimization.get_scheduler (constant, linear, cosine, ...)."),
    )
    lr_warmup_steps: int = field(default=0, metadata=_help("Warm-up updates of the learning-rate schedule."))
    max_grad_norm: float = field(default=0.1, metadata=_help("Gradient-norm clip; 0 disables clipping."))
    mixed_precision: str = field(
        default="bf16", metadata=_help("Autocast precision: 'no', 'fp16' or 'bf16' (the reference uses bf16).")
    )
    cpu: bool = field(default=False, metadata=_help("Train on the CPU even where CUDA is available."))

    # What is trained
    use_lora: bool = field(default=True, metadata=_help("Train a LoRA (the default) instead of the full transformer."))
    lora_rank: int = field(default=32, metadata=_help("LoRA rank."))
    lora_alpha: float = field(default=32.0, metadata=_help("LoRA alpha (the update is scaled by alpha / rank)."))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout."))
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata=_help(
            "Module names the LoRA wraps; default: the attention and feed-forward projections that "
            "diffusers' FLUX LoRA training targets."
        ),
    )
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("Activation checkpointing on every transformer block.")
    )
    vae_gradient_checkpointing: bool = field(
        default=True, metadata=_help("Activation checkpointing in the VAE decoder (the reward's gradient goes through it).")
    )

    # Sampling
    resolution: int = field(default=720, metadata=_help("Training image height and width in pixels."))
    rollout_steps: int = field(default=25, metadata=_help("Euler steps of the online rollout that makes x0."))
    rollout_guidance: float = field(default=1.0, metadata=_help("FLUX distilled guidance during the rollout."))
    train_guidance: float = field(default=3.5, metadata=_help("FLUX distilled guidance in the training forward."))

    # Checkpoints, logging, validation
    checkpointing_steps: int = field(default=100, metadata=_help("Save a resumable checkpoint every N updates; 0: never."))
    checkpoints_total_limit: int | None = field(
        default=None, metadata=_help("Keep at most this many checkpoints (the oldest are removed).")
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("'latest' or the path of a checkpoint folder to resume from.")
    )
    log_with: str | None = field(
        default=None, metadata=_help("accelerate tracker: 'tensorboard', 'wandb', 'all', ... (none by default).")
    )
    validation_prompts: list[str] | None = field(
        default=None, metadata=_help("Prompts of the validation image grid.")
    )
    validation_steps: int = field(default=50, metadata=_help("Save a validation grid every N updates; 0: never."))
    validation_seed: int = field(default=0, metadata=_help("Seed of the validation noise (fixed across the run)."))

    def __post_init__(self):
        positive = {
            "max_train_steps": self.max_train_steps,
            "train_batch_size": self.train_batch_size,
            "lora_rank": self.lora_rank,
            "resolution": self.resolution,
            "rollout_steps": self.rollout_steps,
            "max_sequence_length": self.max_sequence_length,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        non_negative = {
            "lr_warmup_steps": self.lr_warmup_steps,
            "checkpointing_steps": self.checkpointing_steps,
            "validation_steps": self.validation_steps,
        }
        for name, value in non_negative.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.use_lora else 5e-6
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("adam_epsilon", "adam_weight_decay", "max_grad_norm", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 or None, got {self.checkpoints_total_limit!r}")
        from diffusers.optimization import SchedulerType

        schedules = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedules:
            raise ValueError(f"lr_scheduler must be one of {schedules}, got {self.lr_scheduler!r}")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module, got an empty list")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_file(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**values)


@dataclass
class SRPOConfig(TrainerConfig):
    """Direct-Align + Semantic Relative Preference (../SPEC.md sections 1-2); defaults from the reference."""

    train_window_start: int = field(
        default=5, metadata=_help("First index of the training window on the 50-step training grid (0 is pure noise).")
    )
    train_window_end: int = field(default=25, metadata=_help("Last index of the training window on the 50-step grid."))
    use_inversion: bool = field(
        default=True, metadata=_help("Train the inversion branch too (SRP with swapped words, the bias regulariser).")
    )
    positive_words: list[str] | None = field(
        default=None, metadata=_help("Positive control words of SRP; default: the reference's list.")
    )
    negative_words: list[str] | None = field(
        default=None, metadata=_help("Negative control words of SRP; default: the reference's list.")
    )
    word_schedule: str = field(
        default="cycle", metadata=_help("'cycle': the control words change with the step, as in the reference; 'fixed'.")
    )
    hinge_threshold: float = field(default=0.7, metadata=_help("Loss per branch: mean(relu(threshold - reward)).")
    )
    x0_source: str = field(
        default="rollout",
        metadata=_help("'rollout': x0 from an online rollout of the current model; 'dataset': images of image_folder."),
    )
    image_folder: str | None = field(
        default=None,
        metadata=_help("With x0_source='dataset': a folder of images; a caption in IMAGE.txt beside each, else the prompts."),
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.train_window_start < self.train_window_end <= 50:
            raise ValueError(
                "train_window_start/train_window_end must satisfy 0 <= start < end <= 50, "
                f"got ({self.train_window_start}, {self.train_window_end})"
            )
        if self.word_schedule not in _WORD_SCHEDULES:
            raise ValueError(f"word_schedule must be one of {_WORD_SCHEDULES}, got {self.word_schedule!r}")
        for name in ("positive_words", "negative_words"):
            words = getattr(self, name)
            if words is not None and (not words or not all(isinstance(w, str) and w.strip() for w in words)):
                raise ValueError(f"{name} must be a non-empty list of non-empty words, got {words!r}")
        if self.x0_source not in _X0_SOURCES:
            raise ValueError(f"x0_source must be one of {_X0_SOURCES}, got {self.x0_source!r}")
        if self.x0_source == "dataset" and not self.image_folder:
            raise ValueError("x0_source='dataset' needs image_folder, got None")
