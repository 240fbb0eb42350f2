"""The models the scale benchmarks run: each supported family's real shapes, and smaller FLUX-shaped models that a CPU
measures.

``bench_scale.py`` builds them in fake tensor mode (no memory at all), ``gpu_update.py`` on a device with random
weights; both take the same names, so that a simulated and a measured number are of the same model. Every real-size
model is scored by HPS v2.1's architecture (open_clip ViT-H-14, 986M).

- ``flux.1-dev``: the 11.9B transformer (19 double + 38 single blocks, 3072 wide) and the FLUX VAE.
- ``flux.2-dev``: the 32.2B transformer (8 double + 48 single blocks, 6144 wide) and the FLUX.2 VAE.
- ``qwen-image``: the 20.4B transformer (60 blocks, 3072 wide) and the Qwen-Image VAE.
- ``sd3.5-large``: the 8.1B transformer (38 blocks, 2432 wide) and the SD3 VAE.
- ``flux-37m``: the 37M FLUX-shaped transformer of ``bench_train_step.py`` with an 8x VAE and a small CLIP reward:
  what this CPU measures to validate the simulator.
- ``tiny``: the unit tests' pipeline and reward (seconds on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODEL_NAMES = ("flux.1-dev", "flux.2-dev", "qwen-image", "sd3.5-large", "flux-37m", "tiny")
#: The models at their real size, built by the family's shaped builder of ``diffusers_srpo.testing``.
REAL_SIZE_BUILDERS = {
    "flux.1-dev": "flux_dev_shaped_pipeline",
    "flux.2-dev": "flux2_dev_shaped_pipeline",
    "qwen-image": "qwen_image_shaped_pipeline",
    "sd3.5-large": "sd35_shaped_pipeline",
}
#: Benchmark name -> (library method, config overrides).
METHOD_VARIANTS = {
    "srpo": ("srpo", {}),
    "direct-align": ("direct-align", {}),
    "refl": ("refl", {}),
    "draft-1": ("draft", {"draft_k": 1}),
    "draft-full": ("draft", {"draft_k": 0}),
    "tailorpo": ("tailorpo", {}),
    "tailorpo-g": ("tailorpo-g", {}),
    "trajectory-dpo": ("trajectory-dpo", {}),
}
#: Two prompts, so that the prompt order is that of a real run.
PROMPTS = ["a photo of a cat on a windowsill", "a watercolor lighthouse at dusk"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: ``--quantize`` choices: the frozen transformer's storage (``diffusers_srpo.quantization``); "none" keeps bf16.
QUANTIZE_NAMES = ("none", "nf4", "int8", "float8")


@dataclass(frozen=True)
class ModelDefaults:
    """Settings a run of the model takes unless told otherwise."""

    resolution: int
    rollout_steps: int
    max_sequence_length: int


DEFAULTS = {
    "flux.1-dev": ModelDefaults(resolution=720, rollout_steps=25, max_sequence_length=512),
    # The reference's Qwen recipe: 720 px, 26 rollout steps, the prompt length of its encoding.
    "qwen-image": ModelDefaults(resolution=720, rollout_steps=26, max_sequence_length=1024),
    # The models' own sizes and their pipelines' prompt lengths.
    "flux.2-dev": ModelDefaults(resolution=1024, rollout_steps=25, max_sequence_length=512),
    "sd3.5-large": ModelDefaults(resolution=1024, rollout_steps=25, max_sequence_length=256),
    "flux-37m": ModelDefaults(resolution=256, rollout_steps=25, max_sequence_length=32),
    "tiny": ModelDefaults(resolution=32, rollout_steps=4, max_sequence_length=16),
}


def _flux_37m_config():
    from diffusers_srpo.testing import TinyFluxConfig

    # bench_train_step.py's defaults: 2 double + 4 single blocks of 8 heads x 64, FLUX's 8x VAE.
    return TinyFluxConfig(
        num_layers=2,
        num_single_layers=4,
        num_attention_heads=8,
        attention_head_dim=64,
        axes_dims_rope=(8, 28, 28),
        t5_dim=256,
        clip_dim=128,
        vae_block_out_channels=(32, 64, 64, 64),
        vae_norm_num_groups=16,
    )


def check_model_name(name: str) -> str:
    if name not in MODEL_NAMES:
        raise ValueError(f"model {name!r} is not one of {', '.join(MODEL_NAMES)}")
    return name


def build_pipeline(name: str, dtype: torch.dtype = torch.bfloat16, quantize: str = "none"):
    """The pipeline of ``name`` with random weights in ``dtype``, built in the current device context; with
    ``quantize`` (not "none") its transformer's linear layers are then quantized in place, on their device."""
    from diffusers_srpo import testing
    from diffusers_srpo.quantization import quantize_in_memory

    check_model_name(name)
    if name in REAL_SIZE_BUILDERS:
        pipe = getattr(testing, REAL_SIZE_BUILDERS[name])(dtype=dtype)
    else:
        config = _flux_37m_config() if name == "flux-37m" else None
        pipe = testing.tiny_flux_pipeline(seed=0, config=config).to(dtype)
    if quantize != "none":
        quantize_in_memory(pipe.transformer, quantize, compute_dtype=dtype)
    return pipe


def add_memory_arguments(parser) -> None:
    """The flags of the small-card recipe, the same in both scripts."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_NAMES,
        default="none",
        help="Frozen transformer weights: nf4 (bitsandbytes), int8 or float8 (torchao weight-only), none (bf16).",
    )
    parser.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")


def build_reward(name: str, dtype: torch.dtype | None = None):
    """The reward of ``name``: HPS v2.1's architecture at real size, the tests' small CLIP reward otherwise.
    ``dtype=None`` keeps float32, as ``diffusers-srpo train`` loads a reward."""
    from diffusers_srpo import testing

    check_model_name(name)
    reward = testing.hps_shaped_reward() if name in REAL_SIZE_BUILDERS else testing.tiny_clip_reward(seed=0)
    return reward if dtype is None else reward.to(dtype=dtype)


def trainer_config(args, output_dir: str, max_train_steps: int = 1, cpu: bool = False, fsdp: bool = False):
    """The trainer settings of one benchmark point (the flags both scripts take): the method's defaults plus the
    point's size, precision and memory options, for ``max_train_steps`` updates; ``fsdp`` shards the transformer over
    the run's processes."""
    from diffusers_srpo.trainers import trainer_class_for

    method, overrides = METHOD_VARIANTS[args.method]
    config_class = trainer_class_for(method).config_class
    lora = {"lora_rank": args.lora_rank, "lora_alpha": float(args.lora_rank)} if args.lora_rank else {"use_lora": False}
    return config_class(
        method=method,
        **overrides,
        **lora,
        output_dir=output_dir,
        max_train_steps=max_train_steps,
        train_batch_size=args.batch_size,
        resolution=args.resolution,
        rollout_steps=args.rollout_steps,
        max_sequence_length=args.max_sequence_length,
        mixed_precision="bf16",
        gradient_checkpointing=bool(args.checkpointing),
        vae_gradient_checkpointing=bool(args.checkpointing),
        checkpointing_steps=0,
        validation_steps=0,
        cpu=cpu,
        fsdp=fsdp,
        use_8bit_adam=getattr(args, "use_8bit_adam", False),
    )


def point_fields(args) -> dict:
    """What names a benchmark point in both scripts' JSON, so that a simulated and a measured one can be matched."""
    return {
        "model": args.model,
        "method": args.method,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "rollout_steps": args.rollout_steps,
        "max_sequence_length": args.max_sequence_length,
        "lora_rank": args.lora_rank,
        "checkpointing": bool(args.checkpointing),
        "reward_dtype": args.reward_dtype,
        "quantize": getattr(args, "quantize", "none"),
        "use_8bit_adam": getattr(args, "use_8bit_adam", False),
    }
