"""The reference's recipes as configs (issue 18): an independent float64 reading of the recipe files.

The reference numbers are written here from the issue (Tencent-Hunyuan/SRPO, scripts/finetune/SRPO_training_hpsv2.sh
and SRPO_training_ps.sh with fastvideo/SRPO.py), not read from this package, and the sigma geometry is computed here
in plain Python floats (float64) from SPEC sections 1-2:

    grid      S[i] = s(1 - i / 50), s(t) = 3 t / (1 + 2 t)
    window    sigmas_w[i] = S[a] + (S[b] - S[a]) * i / (T - 1),  T = 1000
    ramps     k_denoise[m] = start + (end - start) * m / (T - 1), k_invert likewise at j
    indices   k' = min(T - m, 100, m), j = max(m - k', 1)
    branches  denoise sigmas_w[T - m - k'] -> sigmas_w[T - m]; inversion sigmas_w[T - j] -> sigmas_w[T - min(j + k', T)]

It is compared with what the trainer builds from each file: ``SRPOConfig`` from the file's settings and a
``DirectAlignScheduler`` made from FLUX.1-dev's scheduler config with ``SRPOTrainer.scheduler_overrides``.

Tolerance of the float32 sigmas and discounts against float64: 1e-7 absolute. Every value is in (0, 1), where a
float32 is within half a unit in the last place, at most 2**-25 ~ 3e-8, of the float64 it rounds; 1e-7 bounds that
with room, and is ~2000 times smaller than one step of the window (0.214 / 999 ~ 2.1e-4 for HPS, 0.298 / 999 for
PickScore) or of a ramp (0.15 / 999 ~ 1.5e-4 at the least), so an index off by one cannot pass.
The float64 window itself is compared to 1e-12 (two float64 linspaces of the same ends).
"""

import dataclasses
import os
import re

import pytest
import torch
import yaml

from diffusers_srpo import DirectAlignScheduler, SRPOConfig
from diffusers_srpo.testing import FLUX_DEV_SCHEDULER_CONFIG
from diffusers_srpo.trainers.srpo import SRPOTrainer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")
CLI_ONLY = ("model", "reward", "torch_dtype")  # the CLI's TrainArguments, not SRPOConfig fields

T = 1000  # --timestep_length 1000
K = 100  # int((1 - 0.9) * 1000) + 1 with --groundtruth_ratio 0.9
SHIFT = 3.0  # --shift 3
GRID_STEPS = 50  # vis_sampling_step 50: the 51-point training grid
ROLLOUT_STEPS = 25  # --sampling_steps 25
TRAIN_GUIDANCE = 3.5  # the training forward's guidance, fixed in the reference
PROMPTS_PER_UPDATE = 32  # 32 GPUs x --train_batch_size 1

# The numbers for each recipe.
RECIPES = {
    "hps": {
        "reward": "hpsv2",
        "window": (5, 25),
        "denoise": (0.1, 0.25),
        "invert": (0.3, 0.01),
        "rollout_guidance": 1.0,
        # S[5] = s(0.9) = 2.7 / 2.8, S[25] = s(0.5) = 1.5 / 2
        "window_sigmas": (27 / 28, 3 / 4),
    },
    "pickscore": {
        "reward": "pickscore",
        "window": (5, 30),
        "denoise": (0.1, 0.5),
        "invert": (0.6, 0.01),
        "rollout_guidance": 2.0,
        # S[30] = s(0.4) = 1.2 / 1.8
        "window_sigmas": (27 / 28, 2 / 3),
    },
}
COMMON = {  # both recipes, both variants
    "method": "srpo",
    "learning_rate_full": 5e-6,
    "adam_weight_decay": 1e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 0.1,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "max_train_steps": 20,
    "resolution": 720,
    "mixed_precision": "bf16",
    "seed": 42,
    "max_sequence_length": 512,
    "shared_noise": True,
    "use_inversion": True,
    "hinge_threshold": 0.7,
    "x0_source": "rollout",
    "word_schedule": "cycle",
    "positive_words": ["Natural-lighting", "Detail", "Detailed", "Real"],
    "negative_words": ["Concept art", "Painting", "Anime", "Flat", "Oil"],
    "gradient_checkpointing": True,
}
GRID_INDICES = (5, 50, 100, 101, 500, 899, 900, 995)
# What the full fine-tune and its LoRA variant must share: the Direct-Align and SRP settings and the run's length.
SHARED_SETTINGS = (
    "method", "train_window_start", "train_window_end", "denoise_discount_start", "denoise_discount_end",
    "invert_discount_start", "invert_discount_end", "rollout_guidance", "train_guidance", "direct_align_shift",
    "rollout_steps", "max_train_steps", "resolution", "positive_words", "negative_words", "word_schedule",
    "use_inversion", "hinge_threshold", "shared_noise", "x0_source", "max_sequence_length", "seed",
    "max_grad_norm", "adam_weight_decay", "lr_scheduler", "mixed_precision",
)  # fmt: skip

FILES = {
    (recipe, variant): f"srpo_flux_{recipe}_{'full' if variant == 'full' else 'reference_lora'}.yaml"
    for recipe in RECIPES
    for variant in ("full", "lora")
}


def _read(recipe: str, variant: str) -> tuple[dict, SRPOConfig, str]:
    """The file's settings, the ``SRPOConfig`` they make (the CLI-only keys dropped) and the file's text."""
    path = os.path.join(CONFIGS, FILES[recipe, variant])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    values = yaml.safe_load(text)
    config = SRPOConfig.from_dict({k: v for k, v in values.items() if k not in CLI_ONLY})
    return values, config, text


def _scheduler(config: SRPOConfig) -> DirectAlignScheduler:
    """The scheduler ``SRPOTrainer`` builds for ``config`` on FLUX.1-dev, without a model."""
    trainer = object.__new__(SRPOTrainer)  # scheduler_overrides reads the config alone
    trainer.config = config
    return DirectAlignScheduler.from_config(dict(FLUX_DEV_SCHEDULER_CONFIG), **trainer.scheduler_overrides())


def _shift(t: float) -> float:
    return SHIFT * t / (1 + (SHIFT - 1) * t)


def _reference_window(a: int, b: int) -> list[float]:
    grid = [_shift(1 - i / GRID_STEPS) for i in range(GRID_STEPS + 1)]
    return [grid[a] + (grid[b] - grid[a]) * i / (T - 1) for i in range(T)]


def _ramp(start: float, end: float, index: int) -> float:
    return start + (end - start) * index / (T - 1)


def _reference_geometry(recipe: dict, m: int) -> dict:
    window = _reference_window(*recipe["window"])
    offset = min(T - m, K, m)
    j = max(m - offset, 1)
    return {
        "offset": offset,
        "invert_index": j,
        "sigma_hi": window[T - m - offset],
        "sigma_mid": window[T - m],
        "sigma_lo": window[T - j],
        "sigma_invert_to": window[T - min(j + offset, T)],
        "denoise_discount": _ramp(*recipe["denoise"], m),
        "invert_discount": _ramp(*recipe["invert"], j),
    }


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_file_is_the_reference(recipe, variant):
    values, config, _ = _read(recipe, variant)
    ref = RECIPES[recipe]
    assert values["model"] == "black-forest-labs/FLUX.1-dev" and values["torch_dtype"] == "bfloat16"
    assert values["reward"].split(":")[0] == ref["reward"]
    # Every setting of the recipe is written in the file, none left to a default of this package.
    for name in (*SHARED_SETTINGS, "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_warmup_steps",
                 "train_batch_size", "gradient_accumulation_steps", "fsdp", "use_lora", "checkpointing_steps"):  # fmt: skip
        assert name in values, f"{FILES[recipe, variant]} leaves {name} to its default"

    assert (config.train_window_start, config.train_window_end) == ref["window"]
    assert (config.denoise_discount_start, config.denoise_discount_end) == ref["denoise"]
    assert (config.invert_discount_start, config.invert_discount_end) == ref["invert"]
    assert config.rollout_guidance == ref["rollout_guidance"] and config.train_guidance == TRAIN_GUIDANCE
    assert config.direct_align_shift == SHIFT and config.rollout_steps == ROLLOUT_STEPS
    for name, expected in COMMON.items():
        if name != "learning_rate_full":
            assert getattr(config, name) == expected, name
    if variant == "full":
        assert not config.use_lora and config.learning_rate == COMMON["learning_rate_full"]
        assert config.checkpointing_steps == 20  # --checkpointing_steps 20


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_prompts_per_update(recipe, variant):
    _, config, text = _read(recipe, variant)
    per_process = config.train_batch_size * config.gradient_accumulation_steps
    launches = [int(n) for n in re.findall(r"--num_processes (\d+)", text)]
    if variant == "full":
        # 32 processes (the launch command of the header), one prompt each, sharded with FSDP.
        assert launches == [PROMPTS_PER_UPDATE] and per_process == 1
        assert config.fsdp and not config.use_lora
        assert "--config_file examples/accelerate/fsdp.yaml" in text
    else:
        # One process, 32 prompts through accumulation.
        assert launches == [] and per_process == PROMPTS_PER_UPDATE and config.train_batch_size == 1
        assert not config.fsdp and config.use_lora
        assert (config.lora_rank, config.lora_alpha, config.learning_rate) == (32, 32, 1e-4)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_lora_variant_keeps_every_direct_align_setting(recipe):
    full_values, full, _ = _read(recipe, "full")
    lora_values, lora, _ = _read(recipe, "lora")
    for name in SHARED_SETTINGS:
        assert getattr(full, name) == getattr(lora, name), name
    for name in CLI_ONLY:
        assert full_values[name] == lora_values[name], name


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_sigma_geometry_and_ramps_in_float64(recipe, variant):
    _, config, _ = _read(recipe, variant)
    ref = RECIPES[recipe]
    scheduler = _scheduler(config)
    assert scheduler.config.train_grid_resolution == T and scheduler.config.train_grid_steps == GRID_STEPS
    assert scheduler.branch_offset == K and scheduler.config.min_grid_index == 5  # m ~ randint(5, T - 5)

    # The window: its ends (exact fractions) and all of its 1000 sigmas.
    reference = _reference_window(*ref["window"])
    assert reference[0] == pytest.approx(ref["window_sigmas"][0], abs=1e-15)
    assert reference[-1] == pytest.approx(ref["window_sigmas"][1], abs=1e-15)
    window = scheduler.training_window_sigmas()
    assert window.dtype == torch.float64 and window.shape == (T,)
    torch.testing.assert_close(window, torch.tensor(reference, dtype=torch.float64), rtol=0, atol=1e-12)

    # Both branches and both discounts at chosen m, the edges of both clamps among them.
    m = torch.tensor(GRID_INDICES)
    sigmas = scheduler.training_sigmas_at(m)
    expected = [_reference_geometry(ref, int(i)) for i in GRID_INDICES]
    for name in ("offset", "invert_index"):
        assert getattr(sigmas, name).tolist() == [e[name] for e in expected], name
    for name in ("sigma_hi", "sigma_mid", "sigma_lo", "sigma_invert_to", "denoise_discount", "invert_discount"):
        got = getattr(sigmas, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), torch.tensor([e[name] for e in expected], dtype=torch.float64),
                                   rtol=0, atol=1e-7, msg=name)  # fmt: skip
    # The ramps' ends, as the scheduler holds them, and the discounts next to them: k_denoise at m = 1 and T - 1
    # (its end), k_invert at j = 1 (where m <= 100 puts it) and j = T - 2 (at m = T - 1); m = 1 and T - 1 lie
    # outside the draw, which the scheduler allows here to reach the clamps.
    scheduler_ends = {
        name: scheduler.config[name]
        for name in ("denoise_discount_start", "denoise_discount_end", "invert_discount_start", "invert_discount_end")
    }
    assert scheduler_ends == {
        "denoise_discount_start": ref["denoise"][0],
        "denoise_discount_end": ref["denoise"][1],
        "invert_discount_start": ref["invert"][0],
        "invert_discount_end": ref["invert"][1],
    }
    ends = scheduler.training_sigmas_at(torch.tensor([1, T - 1]))
    assert ends.invert_index.tolist() == [1, T - 2]
    expected_ends = {
        "denoise_discount": [_ramp(*ref["denoise"], 1), ref["denoise"][1]],
        "invert_discount": [_ramp(*ref["invert"], 1), _ramp(*ref["invert"], T - 2)],
    }
    for name, values in expected_ends.items():
        torch.testing.assert_close(getattr(ends, name).double(), torch.tensor(values, dtype=torch.float64),
                                   rtol=0, atol=1e-7, msg=name)  # fmt: skip

    # The rollout: 25 Euler steps on s(linspace(1, 0, 26)), from exactly 1 to exactly 0.
    rollout = scheduler.rollout_sigmas()
    assert rollout.dtype == torch.float32 and rollout.shape == (ROLLOUT_STEPS + 1,)
    reference_rollout = [_shift(1 - i / ROLLOUT_STEPS) for i in range(ROLLOUT_STEPS + 1)]
    torch.testing.assert_close(
        rollout.double(), torch.tensor(reference_rollout, dtype=torch.float64), rtol=0, atol=1e-7
    )
    assert rollout[0].item() == 1.0 and rollout[-1].item() == 0.0


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_file_reads_the_same_through_the_command_line(recipe, variant):
    """``diffusers-srpo train --config FILE`` makes the same ``SRPOConfig`` as the plain YAML reading above."""
    from diffusers_srpo.cli import _config_file_values, build_parser

    _, config, _ = _read(recipe, variant)
    parser, subparsers = build_parser("srpo")
    subparsers["train"].set_defaults(
        **_config_file_values(os.path.join(CONFIGS, FILES[recipe, variant]), subparsers["train"])
    )
    args = parser.parse_args(["train"])
    from_cli = SRPOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SRPOConfig)})
    assert from_cli == config
