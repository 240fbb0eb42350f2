"""Training configurations, trl style: each field's help text doubles as the command-line help."""

from __future__ import annotations

import importlib.util
import json
import math
import string
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

_MIXED_PRECISION = ("no", "fp16", "bf16")
_X0_SOURCES = ("rollout", "dataset")
_WORD_SCHEDULES = ("cycle", "fixed")
_GUIDANCE_GRADIENTS = ("model", "fixed")
_LOG_PROB_REDUCTIONS = ("mean", "sum")
# The stored TailorPO text gives no beta; D3PO's (the trajectory-level DPO it builds on), with its mean log-probability.
BETA_DEFAULT = 0.1
# The guidance step is raw (x + eta * grad), so eta depends on the reward's scale. On the toy world's CLIP reward,
# eta = 1 raises a preferred sample's step-wise reward by about as much as the pair's own gap (0.01-0.07).
GUIDANCE_ETA_DEFAULT = 1.0


def _help(text: str, **extra) -> dict[str, Any]:
    return {"help": text, **extra}


def _type_name(expected) -> str:
    """``float | None`` -> ``"a number or None"``, for the message of a value of the wrong type."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "None"}
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(arg) for arg in typing.get_args(expected))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(expected)[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def _has_type(value, expected) -> bool:
    """Whether ``value`` fits the field type ``expected`` (an int is a float; a bool is neither)."""
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return any(_has_type(value, arg) for arg in typing.get_args(expected))
    if origin is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if expected is type(None):
        return value is None
    if expected in (int, float) and isinstance(value, bool):
        return False
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def check_field_values(settings) -> None:
    """Every field of the dataclass ``settings`` has its declared type, and every number is finite: one error
    naming the field, the value and what was expected. Called first by every config, so that the checks after it
    never meet a NaN (which fails no comparison) or a string."""
    hints = typing.get_type_hints(type(settings))
    for item in fields(settings):
        value, expected = getattr(settings, item.name), hints[item.name]
        if not _has_type(value, expected):
            raise TypeError(f"{item.name} must be {_type_name(expected)}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{item.name} must be a finite number, got {value!r}")


@dataclass
class TrainerConfig:
    """Settings shared by every trainer of the family: run layout, optimisation, LoRA, checkpoints, logging.

    Each subclass is the configuration of one trainer and names the ``methods`` it accepts in ``method``.
    """

    methods: ClassVar[tuple[str, ...]] = ()

    method: str = field(
        default="",
        metadata=_help(
            "Training method: srpo, direct-align (SRPOTrainer); refl (ReFLTrainer); draft (DRaFTTrainer); "
            "tailorpo, tailorpo-g, trajectory-dpo (TailorPOTrainer)."
        ),
    )
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
    max_sequence_length: int | None = field(
        default=None,
        metadata=_help("Token length of the prompt encoding; default the model's (FLUX 512, SD3 256, Qwen-Image 1024)."),
    )

    # Optimisation
    max_train_steps: int = field(
        default=200, metadata=_help("Number of updates (each one optimizer step, unless skipped as non-finite).")
    )
    train_batch_size: int = field(default=1, metadata=_help("Prompts per process per micro-batch."))
    gradient_accumulation_steps: int = field(
        default=1,
        metadata=_help(
            "Micro-batches per update: an update sees processes x train_batch_size x this many prompts and makes one "
            "optimizer step (the reference's 32 prompts per update on one GPU: 32)."
        ),
    )
    shared_noise: bool = field(
        default=True,
        metadata=_help(
            "Every prompt of an update starts from the same noise, on every process (the reference broadcasts one "
            "noise per update); false: a noise of its own for each prompt."
        ),
    )
    learning_rate: float | None = field(
        default=None,
        metadata=_help("AdamW learning rate; default 1e-4 with LoRA, 5e-6 (the reference) for a full fine-tune."),
    )
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    adam_weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay."))
    use_8bit_adam: bool = field(
        default=False,
        metadata=_help(
            "bitsandbytes' 8-bit AdamW: the two moments in 8 bits (block-wise quantized), a quarter of AdamW's state. "
            "Needs bitsandbytes; not with fsdp."
        ),
    )
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
    fsdp: bool = field(
        default=False,
        metadata=_help(
            "Shard the transformer over the processes per block with PyTorch's FSDP2 (fully_shard): parameters, "
            "gradients and optimizer state split N ways, compute in the mixed precision, gradients reduced in fp32. "
            "Launch several processes (accelerate launch or torchrun); an accelerate FSDP config (fsdp_version 2) "
            "turns it on."
        ),
    )

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
    direct_align_shift: float | None = field(
        default=None,
        metadata=_help(
            "Static shift s(t) = shift t / (1 + (shift - 1) t) of the rollout schedule and of Direct-Align's training "
            "grid. Default the model's: 3 (the reference's FLUX recipe; SD3, FLUX.2), 1, no shift, for Qwen-Image (the "
            "reference's Qwen recipe)."
        ),
    )
    rollout_guidance: float | None = field(
        default=None,
        metadata=_help(
            "Guidance of the rollout (and of every sampler step a method trains): the distilled guidance of FLUX.1 "
            "and FLUX.2 dev, the classifier-free guidance scale of SD3, Qwen-Image and FLUX.2 klein (1: none). "
            "Default the model's: FLUX.1 1.0 (the reference), FLUX.2 1.0, SD3 4.5, Qwen-Image 4.0 (the reference)."
        ),
    )
    negative_prompt: str | None = field(
        default=None,
        metadata=_help("Negative prompt of classifier-free guidance (models without distilled guidance); default ''."),
    )
    reward_template: str = field(
        default="{prompt}",
        metadata=_help(
            "How a prompt is written for the reward only, e.g. 'bright. {prompt}' (the generator keeps the plain "
            "prompt). Methods with a plain reward use it; SRPO adds its control words instead."
        ),
    )

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
    eval_prompts: list[str] | None = field(
        default=None,
        metadata=_help(
            "Held-out prompts scored every eval_steps updates (and before the first) with the training reward's plain "
            "base (no SRP words, no reward_template), from fixed noise: logged as eval_reward."
        ),
    )
    eval_steps: int = field(default=0, metadata=_help("Score eval_prompts every N updates; 0: never."))
    max_consecutive_skips: int = field(
        default=5,
        metadata=_help(
            "An update whose loss, logged reward or gradient is NaN or infinite is skipped: the weights and optimizer "
            "state stay as they were, but the update counts (the step, the learning-rate schedule and the random "
            "streams advance). After this many skipped updates in a row the run writes a checkpoint and stops."
        ),
    )

    def __post_init__(self):
        check_field_values(self)
        # The shared base (for a custom trainer) names no method; each method's config accepts only its own.
        if self.methods and self.method not in self.methods:
            raise ValueError(f"method must be one of {self.methods} for {type(self).__name__}, got {self.method!r}")
        positive = {
            "max_train_steps": self.max_train_steps,
            "train_batch_size": self.train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "lora_rank": self.lora_rank,
            "resolution": self.resolution,
            "rollout_steps": self.rollout_steps,
            "max_consecutive_skips": self.max_consecutive_skips,
        }
        if self.max_sequence_length is not None:
            positive["max_sequence_length"] = self.max_sequence_length
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        non_negative = {
            "lr_warmup_steps": self.lr_warmup_steps,
            "checkpointing_steps": self.checkpointing_steps,
            "validation_steps": self.validation_steps,
            "eval_steps": self.eval_steps,
        }
        for name, value in non_negative.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.use_lora else 5e-6
        if self.direct_align_shift is not None and not self.direct_align_shift > 0:
            raise ValueError(f"direct_align_shift must be > 0, got {self.direct_align_shift!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("adam_epsilon", "adam_weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.eval_steps and not self.eval_prompts:
            raise ValueError(f"eval_steps={self.eval_steps} needs eval_prompts (held-out prompts), got {self.eval_prompts!r}")
        if self.fsdp and self.use_8bit_adam:
            raise ValueError("use_8bit_adam=True with fsdp=True is not supported (bitsandbytes steps whole tensors, not shards)")
        if self.use_8bit_adam:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError("use_8bit_adam=True needs bitsandbytes, which is not installed: pip install 'diffusers-srpo[quantization]'")
        if self.fsdp and self.mixed_precision == "fp16":
            raise ValueError("fsdp=True with mixed_precision='fp16' is not supported (no sharded loss scaling): use 'bf16'")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 or None, got {self.checkpoints_total_limit!r}")
        from diffusers.optimization import SchedulerType

        schedules = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedules:
            raise ValueError(f"lr_scheduler must be one of {schedules}, got {self.lr_scheduler!r}")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module, got an empty list")
        try:
            fields_named = [name for _, name, _, _ in string.Formatter().parse(self.reward_template) if name is not None]
        except ValueError:  # unbalanced braces
            fields_named = None
        if fields_named != ["prompt"]:
            raise ValueError(f"reward_template must contain '{{prompt}}' once and no other field, got {self.reward_template!r}")

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
class RewardLossConfig(TrainerConfig):
    """Methods that back-propagate a differentiable reward and minimise a ReFL-style hinge on it."""

    hinge_threshold: float = field(
        default=0.7,
        metadata=_help(
            "Loss: mean(relu(threshold - reward)); under the threshold it is -reward + const. Rewards on another "
            "scale (aesthetic ~5) need a higher threshold, or nothing trains (logged as hinge_active, warned)."
        ),
    )


@dataclass
class SRPOConfig(RewardLossConfig):
    """Direct-Align + Semantic Relative Preference (../SPEC.md sections 1-2); defaults from the reference.

    ``method="direct-align"`` is the same Direct-Align machinery with the plain reward (written with
    ``reward_template``) instead of SRP, and the denoise branch alone.
    """

    methods: ClassVar[tuple[str, ...]] = ("srpo", "direct-align")

    method: str = field(
        default="srpo", metadata=_help("'srpo' (SRP reward) or 'direct-align' (the plain reward, no SRP).")
    )
    train_guidance: float | None = field(
        default=None,
        metadata=_help(
            "Guidance of Direct-Align's training forward (as rollout_guidance). Default the model's: FLUX.1 3.5 (the "
            "reference), FLUX.2 4.0; 1.0, no classifier-free guidance, for SD3 and Qwen-Image (the Qwen reference)."
        ),
    )
    train_window_start: int = field(
        default=5, metadata=_help("First index of the training window on the 50-step training grid (0 is pure noise).")
    )
    train_window_end: int = field(default=25, metadata=_help("Last index of the training window on the 50-step grid."))
    denoise_discount_start: float = field(
        default=0.1,
        metadata=_help(
            "SRP's k of the denoise branch is linspace(start, end, 1000)[m], m the drawn window position (the reference: "
            "0.1 -> 0.25 for HPS, 0.1 -> 0.5 for PickScore)."
        ),
    )
    denoise_discount_end: float = field(default=0.25, metadata=_help("End of the denoise branch's SRP discount ramp."))
    invert_discount_start: float = field(
        default=0.3,
        metadata=_help(
            "SRP's k of the inversion branch is linspace(start, end, 1000)[j] (the reference: 0.3 -> 0.01 for HPS, "
            "0.6 -> 0.01 for PickScore)."
        ),
    )
    invert_discount_end: float = field(default=0.01, metadata=_help("End of the inversion branch's SRP discount ramp."))
    use_inversion: bool | None = field(
        default=None,
        metadata=_help(
            "Train the inversion branch too (SRP with swapped words, the bias regulariser); default on for srpo. "
            "direct-align has no words to swap, so it trains the denoise branch alone."
        ),
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
        if self.use_inversion is None:
            self.use_inversion = self.method == "srpo"
        if self.method == "direct-align":
            if self.use_inversion:
                raise ValueError(
                    "use_inversion=True needs SRP's control words to swap; method 'direct-align' uses the plain reward: "
                    "use method='srpo' or use_inversion=False"
                )
            if self.positive_words is not None or self.negative_words is not None:
                raise ValueError("positive_words/negative_words are SRP's; method 'direct-align' uses reward_template instead")
        elif self.reward_template != "{prompt}":
            raise ValueError(
                f"reward_template={self.reward_template!r} is for plain-reward methods; SRPO writes its control words "
                "with positive_words/negative_words"
            )
        if not 0 <= self.train_window_start < self.train_window_end <= 50:
            raise ValueError(
                "train_window_start/train_window_end must satisfy 0 <= start < end <= 50, "
                f"got ({self.train_window_start}, {self.train_window_end})"
            )
        for name in ("denoise_discount_start", "denoise_discount_end", "invert_discount_start", "invert_discount_end"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (SRP scores (1 + k) * positive - negative), got {getattr(self, name)!r}")
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


def _steps_in_window(rollout_steps: int, start: float, end: float) -> list[int]:
    """The rollout step indices ``i`` with ``start <= i / rollout_steps < end``."""
    return [i for i in range(rollout_steps) if start <= i / rollout_steps < end]


def _check_step_window(name: str, what: str, start: float, end: float, rollout_steps: int) -> None:
    if not 0 <= start < end <= 1:
        raise ValueError(f"{name}_start/{name}_end must satisfy 0 <= start < end <= 1, got ({start!r}, {end!r})")
    if not _steps_in_window(rollout_steps, start, end):
        raise ValueError(
            f"the {what} window [{start}, {end}) holds no step of a {rollout_steps}-step rollout: widen it or raise "
            "rollout_steps"
        )


@dataclass
class ReFLConfig(RewardLossConfig):
    """ReFL (Xu et al. 2023, ImageReward): one gradient step at a late timestep of the sampler (SPEC section 3).

    The rollout runs without gradient to a step drawn from the window; one transformer forward with gradient
    gives the model-only clean estimate ``x - sigma * v``, which is decoded and scored.
    """

    methods: ClassVar[tuple[str, ...]] = ("refl",)

    method: str = field(default="refl", metadata=_help("'refl'."))
    refl_window_start: float = field(
        default=0.75,
        metadata=_help(
            "The gradient step is drawn uniformly from the rollout steps i with start <= i / rollout_steps < end "
            "(ImageReward: steps 30-39 of 40, i.e. [0.75, 1.0))."
        ),
    )
    refl_window_end: float = field(default=1.0, metadata=_help("End (excluded) of the ReFL window, a fraction of the rollout."))

    def __post_init__(self):
        super().__post_init__()
        _check_step_window("refl_window", "ReFL", self.refl_window_start, self.refl_window_end, self.rollout_steps)

    def refl_steps(self) -> list[int]:
        """The rollout step indices the gradient step is drawn from."""
        return _steps_in_window(self.rollout_steps, self.refl_window_start, self.refl_window_end)


@dataclass
class DRaFTConfig(RewardLossConfig):
    """DRaFT-K (Clark et al. 2024): back-propagate the reward through the last K sampler steps (SPEC section 3).

    ``draft_k=1`` is DRaFT-1; ``draft_k=0`` (or ``rollout_steps``) the full chain, as AlignProp. With
    ``gradient_checkpointing`` each step with gradient is checkpointed as a whole, so only the latents between
    steps are kept and the chain's memory does not grow with the transformer's activations.
    """

    methods: ClassVar[tuple[str, ...]] = ("draft",)

    method: str = field(default="draft", metadata=_help("'draft'."))
    draft_k: int = field(
        default=1, metadata=_help("Sampler steps the gradient goes through (the last K); 0: all of them (full chain).")
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.draft_k, bool) or not isinstance(self.draft_k, int) or not 0 <= self.draft_k <= self.rollout_steps:
            raise ValueError(f"draft_k must be an integer in [0, rollout_steps={self.rollout_steps}], got {self.draft_k!r}")

    @property
    def gradient_steps(self) -> int:
        """K, with 0 resolved to every rollout step."""
        return self.draft_k or self.rollout_steps


@dataclass
class TailorPOConfig(TrainerConfig):
    """TailorPO (Ren et al. 2025): DPO on intermediate steps ranked by their step-wise reward (SPEC section 4).

    ``tailorpo-g`` adds gradient guidance to the preferred sample; ``trajectory-dpo`` is the baseline TailorPO
    argues against: two trajectories ranked by their FINAL images, every step labelled by that ranking.
    The sampler is the flow SDE of ``diffusers_srpo.flow_sde`` along the rollout schedule (``rollout_steps``).
    """

    methods: ClassVar[tuple[str, ...]] = ("tailorpo", "tailorpo-g", "trajectory-dpo")

    method: str = field(
        default="tailorpo",
        metadata=_help("'tailorpo', 'tailorpo-g' (with gradient guidance) or 'trajectory-dpo' (pairs ranked by final images)."),
    )
    beta: float = field(default=BETA_DEFAULT, metadata=_help("DPO beta: the scale of the log-ratio difference in the loss."))
    noise_level: float = field(
        default=0.7,
        metadata=_help(
            "a of the flow SDE: diffusion coefficient a * sqrt(sigma / (1 - sigma)); a step's std is that times "
            "sqrt(sigma - sigma_next) (Flow-GRPO's 0.7)."
        ),
    )
    log_prob_reduction: str = field(
        default="mean",
        metadata=_help(
            "'mean': log pi per latent element (DDPO, D3PO, Flow-GRPO), so beta does not depend on the resolution; "
            "'sum': the full log-density."
        ),
    )
    preference_window_start: float = field(
        default=0.0,
        metadata=_help(
            "Steps i with start <= i / rollout_steps < end draw a pair and are ranked; the others take the ODE step."
        ),
    )
    preference_window_end: float = field(default=1.0, metadata=_help("End (excluded) of the ranked steps."))
    trained_step_fraction: float = field(
        default=1.0,
        metadata=_help("Fraction of the ranked steps (drawn per update, at least one) whose DPO loss enters the update."),
    )
    tie_threshold: float = field(
        default=1e-4,
        metadata=_help(
            "Pairs whose reward gap is at most this carry no preference: their loss has weight 0 (the batch mean still "
            "counts them, as D3PO's zero label does); logged as tie_fraction."
        ),
    )
    guidance_eta: float = field(
        default=GUIDANCE_ETA_DEFAULT,
        metadata=_help("tailorpo-g: step size eta of x_w + eta * grad_x r(x0_hat(x_w))."),
    )
    guidance_gradient: str = field(
        default="model",
        metadata=_help(
            "tailorpo-g: 'model' differentiates the step-wise reward through the model's x0 estimate (exact, one "
            "transformer backward more); 'fixed' holds the velocity fixed (x0_hat = x - sigma * v, gradient identity)."
        ),
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")
        if not self.noise_level > 0:
            raise ValueError(f"noise_level must be > 0 (0 makes the sampler deterministic: no density), got {self.noise_level!r}")
        if self.log_prob_reduction not in _LOG_PROB_REDUCTIONS:
            raise ValueError(f"log_prob_reduction must be one of {_LOG_PROB_REDUCTIONS}, got {self.log_prob_reduction!r}")
        _check_step_window(
            "preference_window", "preference", self.preference_window_start, self.preference_window_end, self.rollout_steps
        )
        if not 0 < self.trained_step_fraction <= 1:
            raise ValueError(f"trained_step_fraction must be in (0, 1], got {self.trained_step_fraction!r}")
        if self.tie_threshold < 0:
            raise ValueError(f"tie_threshold must be >= 0, got {self.tie_threshold!r}")
        if self.guidance_eta < 0:
            raise ValueError(f"guidance_eta must be >= 0, got {self.guidance_eta!r}")
        if self.guidance_gradient not in _GUIDANCE_GRADIENTS:
            raise ValueError(f"guidance_gradient must be one of {_GUIDANCE_GRADIENTS}, got {self.guidance_gradient!r}")

    def ranked_steps(self) -> list[int]:
        """The rollout step indices that draw a pair."""
        return _steps_in_window(self.rollout_steps, self.preference_window_start, self.preference_window_end)


# GRPO (SPEC section 5). Flow-GRPO is github.com/yifan123/flow_grpo; "base.py:N" / "grpo.py:N" / "train_sd3.py:N" name
# lines of its config/base.py, config/grpo.py and scripts/train_sd3.py at commit ac4c86e (2025-07-18); its FLUX recipe
# (config/grpo.py, function pickscore_flux) is at commit 54809b5. DanceGRPO is github.com/XueZeyue/DanceGRPO,
# scripts/finetune/finetune_flux_grpo.sh at commit 22b85ef.
_ADVANTAGE_STDS = ("group", "global")
_TIMESTEP_SELECTIONS = ("first", "random")
_KL_FORMS = ("exact", "flow-grpo")
# The epsilon under the advantage's std: flow_grpo/stat_tracking.py:27-29 (and train_sd3.py:782).
GRPO_ADVANTAGE_EPSILON = 1e-4
# Learning rates when none is given: Flow-GRPO's (base.py:63, a LoRA: train_sd3.py:417-434), and DanceGRPO's FLUX script
# (finetune_flux_grpo.sh:36, a full fine-tune) for use_lora=False; Flow-GRPO gives none for a full fine-tune.
GRPO_LORA_LEARNING_RATE = 3e-4
GRPO_FULL_LEARNING_RATE = 1e-5


@dataclass
class GRPOConfig(TrainerConfig):
    """Flow-GRPO (Liu et al. 2025) on the flow SDE (SPEC section 5): a group of SDE trajectories per prompt, the reward of
    each final image made an advantage within its group, and the PPO-clipped importance-ratio loss on the trained steps.

    One update is one optimizer step on the groups of its micro-batches: every prompt of a micro-batch is sampled
    ``group_size`` times without gradient (states and sampling means kept), scored, and then each trained step is one
    transformer forward with gradient over the micro-batch's trajectories (``trajectories_per_forward`` at a time).
    The policy that sampled is the one being trained (one inner epoch), so the ratio is 1 up to rounding and the clip
    acts only on rounding; Flow-GRPO's two optimizer steps per sampling round are not expressed (see
    ``diffusers_srpo/trainers/grpo.py``). The reward need not be differentiable.
    """

    methods: ClassVar[tuple[str, ...]] = ("grpo",)

    method: str = field(default="grpo", metadata=_help("'grpo'."))
    shared_noise: bool = field(
        default=False,
        metadata=_help(
            "Every group of an update starts from the same noises (member g of each group from noise g, on every "
            "process); false (the default, as Flow-GRPO): every trajectory of the update has a noise of its own. "
            "Within a group see shared_group_noise."
        ),
    )
    learning_rate: float | None = field(
        default=None,
        metadata=_help(
            f"AdamW learning rate; default {GRPO_LORA_LEARNING_RATE} with LoRA (Flow-GRPO, config/base.py:63), "
            f"{GRPO_FULL_LEARNING_RATE} for a full fine-tune (DanceGRPO's FLUX script)."
        ),
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_help("Gradient-norm clip; 0 disables clipping (Flow-GRPO's 1.0, config/base.py:76).")
    )
    rollout_steps: int = field(
        default=10,
        metadata=_help(
            "Steps of the training sampler, the flow SDE along the rollout schedule (Flow-GRPO's GRPO configs: 10, "
            "config/grpo.py:36, 40 for evaluation; its FLUX recipe: 6)."
        ),
    )
    group_size: int = field(
        default=24,
        metadata=_help(
            "G: trajectories sampled per prompt, all on the prompt's process and micro-batch (Flow-GRPO's "
            "num_image_per_prompt 24, config/grpo.py:42; 16 and 8 in its 4- and 1-GPU configs)."
        ),
    )
    shared_group_noise: bool = field(
        default=False,
        metadata=_help(
            "The G trajectories of a group start from one noise and part only by the SDE's noise (DanceGRPO's "
            "--init_same_noise); false: a noise each (Flow-GRPO's same_latent=False)."
        ),
    )
    noise_level: float = field(
        default=0.7,
        metadata=_help(
            "a of the flow SDE: a step's std is a * sqrt(sigma / (1 - sigma)) * sqrt(sigma - sigma_next) (Flow-GRPO's "
            "0.7, config/base.py:54; its FLUX recipe uses 0.9)."
        ),
    )
    advantage_std: str = field(
        default="group",
        metadata=_help(
            "A = (r - mean of the group) / (std + 1e-4), the std (population) of the group ('group'), or of every reward "
            "of the update, all processes and micro-batches ('global': Flow-GRPO's global_std, on in its configs, "
            "config/base.py:52)."
        ),
    )
    adv_clip_max: float = field(
        default=5.0,
        metadata=_help("Advantages are clipped to [-adv_clip_max, adv_clip_max] (Flow-GRPO's 5, config/base.py:84)."),
    )
    clip_range: float = field(
        default=1e-4,
        metadata=_help(
            "PPO clip eps: the loss is max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) (Flow-GRPO's 1e-4, config/base.py:86)."
        ),
    )
    timestep_fraction: float = field(
        default=0.99,
        metadata=_help(
            "The loss takes max(1, int(rollout_steps * fraction)) of the sampler's steps (Flow-GRPO's GRPO configs: "
            "0.99, config/grpo.py:50, i.e. all but the last step)."
        ),
    )
    timestep_selection: str = field(
        default="first",
        metadata=_help(
            "Which steps: 'first' (the first ones, as Flow-GRPO, scripts/train_sd3.py:864) or 'random' (drawn anew each "
            "update, the same for every trajectory of the update, as DanceGRPO draws)."
        ),
    )
    beta: float = field(
        default=0.04,
        metadata=_help(
            "Weight of the KL to the reference policy (the base model: the LoRA disabled, or a frozen copy); 0: no KL "
            "and no reference forward (Flow-GRPO: 0.04, config/grpo.py:52; 0.01 for PickScore; 0 in config/base.py:92 "
            "and in its FLUX recipe)."
        ),
    )
    kl_form: str = field(
        default="exact",
        metadata=_help(
            "'exact': the KL of the step's two Gaussians per latent element, (mu - mu_ref)^2 / (2 std^2 |dt|) (SPEC "
            "section 5); 'flow-grpo': Flow-GRPO's code, which divides by 2 std^2 without |dt| (scripts/train_sd3.py:895), "
            "i.e. |dt| times the exact KL."
        ),
    )
    trajectories_per_forward: int | None = field(
        default=None,
        metadata=_help(
            "Trajectories per transformer forward (sampling, training and decoding alike, so that the sampled and the "
            "trained log-probabilities agree exactly); default all train_batch_size x group_size at once."
        ),
    )

    def __post_init__(self):
        if self.learning_rate is None:
            self.learning_rate = GRPO_LORA_LEARNING_RATE if self.use_lora else GRPO_FULL_LEARNING_RATE
        super().__post_init__()
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2 (advantages compare the members of a group), got {self.group_size!r}")
        if not self.noise_level > 0:
            raise ValueError(f"noise_level must be > 0 (0 makes the sampler deterministic: no density), got {self.noise_level!r}")
        if self.advantage_std not in _ADVANTAGE_STDS:
            raise ValueError(f"advantage_std must be one of {_ADVANTAGE_STDS}, got {self.advantage_std!r}")
        if not self.adv_clip_max > 0:
            raise ValueError(f"adv_clip_max must be > 0, got {self.adv_clip_max!r}")
        if not 0 <= self.clip_range < 1:
            raise ValueError(f"clip_range must be in [0, 1), got {self.clip_range!r}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction!r}")
        if self.timestep_selection not in _TIMESTEP_SELECTIONS:
            raise ValueError(f"timestep_selection must be one of {_TIMESTEP_SELECTIONS}, got {self.timestep_selection!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.kl_form not in _KL_FORMS:
            raise ValueError(f"kl_form must be one of {_KL_FORMS}, got {self.kl_form!r}")
        if self.trajectories_per_forward is not None and self.trajectories_per_forward < 1:
            raise ValueError(f"trajectories_per_forward must be a positive integer or None, got {self.trajectories_per_forward!r}")

    @property
    def trained_step_count(self) -> int:
        """How many sampler steps enter the loss: ``max(1, int(rollout_steps * timestep_fraction))`` (Flow-GRPO's
        ``int(num_steps * timestep_fraction)``, scripts/train_sd3.py:345, kept at least one)."""
        return max(1, int(self.rollout_steps * self.timestep_fraction))
