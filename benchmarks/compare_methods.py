"""Every training method on one model, one prompt set and the same seeds: cost, rewards, and the oracles' truth.

The base model is measured once, in a subprocess of its own; then each method (and each training seed) trains
for ``--steps`` updates in a fresh subprocess of this script, so that its peak memory is its own, no state leaks
between methods, and no run is special. Before its timings and its memory baseline every run does its one-time
work: it encodes all the prompts (and, for SRP, the control prompts' text embeddings). Reported per method:

- the per-update wall time (median over the updates after the first, from timestamps taken after each update),
  and the first update's (the first graph build),
- peak memory (CUDA: ``torch.cuda.max_memory_allocated`` during training; CPU: the run's peak RSS) and its rise
  during training,
- the training reward curve (``history["reward"]``: each method's own training reward) and, for the methods with a
  hinge loss, the mean of the logged ``hinge_active*`` (the fraction of samples under ``hinge_threshold``: only
  those train; SRPO logs its denoise and inversion branches apart),
- before/after, on fixed evaluation noises independent of the training seed (one noise per prompt and evaluation
  seed, whatever the batching): the SRP score positive-vs-negative word and the plain reward of
  ``"{positive}. {prompt}"``, on the training and on HELD-OUT prompts (every 4th prompt is held out of training),
- on the toy world, the oracles the reward never sees: the positive word's fraction among images of unprompted
  content prompts, colour and shape accuracy, and a verdict per run (``hacking_flag``): ``hacking`` (the method's
  own evaluation reward rose while the targeted fraction did not), ``degraded: colour -0.22`` (colour or shape
  accuracy fell), else ``ok`` or ``reward flat/down``.

Every method optimises toward the same target: SRP methods with the positive word over the negative one (fixed
schedule); plain-reward methods with ``reward_template="{positive}. {prompt}"``. On the toy world every method
with a hinge loss (the srpo variants, direct-align, refl, draft-*) runs with ``hinge_threshold=10``, above the
range of every reward there (SRP scores about -0.1..0.3, the plain reward about 0.2..0.85), so that its loss is
-reward + const: the same objective shape for every method. (At the default 0.7 about a third of the plain
reward's samples sit above the threshold and train nothing, while every SRP score is under it.)

    python benchmarks/compare_methods.py                                  # all methods, toy world, 25 updates
    python benchmarks/compare_methods.py --methods srpo draft-full --steps 10 --seeds 0 1 2
    python benchmarks/compare_methods.py --config benchmarks/compare_methods.yaml   # a real model on a GPU

Writes ``results.json`` (everything, histories included), ``results.md`` (the table) and ``curves.png`` to
``--output-dir``, and the LoRA of every run under ``runs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

PROG = "compare_methods.py"

#: Table name -> (method of the library, config overrides). The order is the table's.
METHOD_VARIANTS: dict[str, tuple[str, dict]] = {
    "srpo": ("srpo", {}),
    "srpo-no-inversion": ("srpo", {"use_inversion": False}),
    "direct-align": ("direct-align", {}),
    "refl": ("refl", {}),
    "draft-1": ("draft", {"draft_k": 1}),
    "draft-full": ("draft", {"draft_k": 0}),
    "tailorpo": ("tailorpo", {}),
    "tailorpo-g": ("tailorpo-g", {}),
    "trajectory-dpo": ("trajectory-dpo", {}),
    # The paper's hacking ablation: no inversion branch and a late (almost clean) window, against srpo's 5..25.
    "srpo-late-no-inversion": ("srpo", {"use_inversion": False, "train_window_start": 30, "train_window_end": 49}),
}
SRP_METHODS = ("srpo",)

DEFAULT_LEARNING_RATE = 1e-3
#: The toy world's hinge threshold for every method that has one: above every toy reward's range (see above).
TOY_HINGE_THRESHOLD = 10.0
#: The base model is measured once, with one sampler: no method may change it.
SAMPLER_SETTINGS = ("resolution", "rollout_steps", "rollout_guidance", "max_sequence_length")
#: Trainer settings this script sets itself, and where to set them instead.
RESERVED_SETTINGS = {
    "method": "each variant names its method (under 'methods')",
    "output_dir": "every run writes to OUTPUT_DIR/runs/NAME-seedS (use 'output_dir' or --output-dir)",
    "seed": "use 'seeds' or --seeds",
    "max_train_steps": "use 'steps' or --steps",
}
#: Reserved in the shared 'trainer' settings only (a variant may set them).
RESERVED_SHARED_SETTINGS = {
    "learning_rate": "use 'learning_rate' or --learning-rate",
    "reward_template": "the target is 'positive_word' (a variant under 'methods' may set its own)",
    "positive_words": "the target is 'positive_word' (a variant under 'methods' may set its own)",
    "negative_words": "the target is 'negative_word' (a variant under 'methods' may set its own)",
}

# The verdict of a run on the toy world (``hacking_flag``).
FRACTION_MARGIN = 0.05  # the targeted oracle fraction "did not rise" unless it rose by more than this
ACCURACY_MARGIN = 0.10  # colour or shape accuracy falling by more than this is "degraded"
REWARD_MARGIN_STD = 0.25  # the own evaluation reward "rose" when it rose by more than this x its per-image std before

# Exit statuses of a child that failed before training: loading the model or reward (then every other run would
# fail the same way: the comparison stops), or building one method's trainer (that method's other seeds are skipped).
EXIT_LOAD_FAILED = 3
EXIT_SETUP_FAILED = 4
FAILED_PHASES = {EXIT_LOAD_FAILED: "load", EXIT_SETUP_FAILED: "setup"}


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, before any training."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def train_reward_window(steps: int) -> int:
    """How many updates the "train reward first->last" columns average at each end."""
    return max(1, min(5, steps // 2))


# ----------------------------------------------------------------------------------------------- settings
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods", nargs="+", help=f"Methods to compare (default: all): {', '.join(METHOD_VARIANTS)}."
    )
    parser.add_argument("--steps", type=int, help="Updates per method (default 25).")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="Training seeds; each method runs once per seed (default 0)."
    )
    parser.add_argument(
        "--learning-rate", type=float, help=f"AdamW learning rate of every method (default {DEFAULT_LEARNING_RATE})."
    )
    parser.add_argument("--eval-seeds", type=int, help="Evaluation noises per prompt (default 8).")
    parser.add_argument("--output-dir", help="Where results go (default benchmarks/results/compare_methods).")
    parser.add_argument("--threads", type=int, help="torch threads per run (default 1: fastest on a shared CPU).")
    parser.add_argument(
        "--config", help="YAML (or JSON) file: model, reward, prompts, trainer settings, per-method overrides."
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: the child's job file
    return parser


CONFIG_KEYS = (
    "model", "torch_dtype", "reward", "prompts", "held_out_prompts", "positive_word", "negative_word", "trainer",
    "methods", "run", "steps", "seeds", "learning_rate", "eval_seeds", "eval_batch_size", "threads", "output_dir",
)  # fmt: skip


def load_file_config(path: str) -> dict:
    from diffusers_srpo import cli

    try:
        data = cli._read_config_file(path)
    except cli.UsageError as error:
        raise UsageError(f"--config: {error}") from None
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"--config {path!r}: unknown keys {unknown}; expected some of {sorted(CONFIG_KEYS)}")
    return data


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _model_settings(file_config: dict) -> dict:
    """model (None: the toy world), torch_dtype, reward."""
    model = file_config.get("model")
    toy = model is None
    if not toy and not (isinstance(model, str) and model):
        raise UsageError(f"config 'model' must be a FluxPipeline path or hub id, got {model!r}")
    if not toy and _looks_like_path(model) and not os.path.exists(os.path.expanduser(model)):
        raise UsageError(f"config 'model': {model!r} does not exist")
    torch_dtype = file_config.get("torch_dtype", "float32" if toy else "bfloat16")
    if torch_dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"config 'torch_dtype' must be float32, bfloat16 or float16, got {torch_dtype!r}")
    reward = file_config.get("reward")
    if toy:
        if "reward" in file_config:
            raise UsageError("config 'reward' needs 'model' too (the toy world brings its own reward)")
    else:
        check_reward_spec(reward)
    return {"model": model, "toy": toy, "torch_dtype": torch_dtype, "reward": reward}


def check_reward_spec(spec) -> None:
    """A ``diffusers_srpo.rewards.load_reward`` spec with a known name, and an existing file where it names one."""
    from diffusers_srpo.rewards import REWARD_NAMES

    if not isinstance(spec, str):
        raise UsageError(
            "a config with 'model' needs 'reward', a load_reward spec such as 'hpsv2:/path/HPS_v2.1_compressed.pt'"
        )
    name, _, source = spec.partition(":")
    if name.lower() not in REWARD_NAMES:
        raise UsageError(
            f"config 'reward': unknown reward {name!r} in {spec!r}; expected one of {', '.join(REWARD_NAMES)}"
        )
    if _looks_like_path(source) and not os.path.exists(os.path.expanduser(source)):
        raise UsageError(f"config 'reward': {source!r} (in {spec!r}) does not exist")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"--{name} must be a positive integer, got {value!r}")
    return value


def _number_settings(args: argparse.Namespace, file_config: dict) -> dict:
    """steps, seeds, eval_seeds, eval_batch_size, threads, learning_rate: the command line over the file."""

    def pick(name, default):
        value = getattr(args, name, None)
        return value if value is not None else file_config.get(name, default)

    numbers = {
        "steps": _positive_int(pick("steps", 25), "steps"),
        "eval_seeds": _positive_int(pick("eval_seeds", 8), "eval-seeds"),
        "threads": _positive_int(pick("threads", 1), "threads"),
        "eval_batch_size": _positive_int(file_config.get("eval_batch_size", 16), "eval_batch_size"),
    }
    seeds = pick("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise UsageError(f"--seeds must be one or more integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must differ, got {seeds}")
    learning_rate = pick("learning_rate", DEFAULT_LEARNING_RATE)
    if isinstance(learning_rate, str):  # YAML reads 1e-4 (no ".0") as a string
        try:
            learning_rate = float(learning_rate)
        except ValueError:
            pass
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise UsageError(f"--learning-rate must be > 0, got {learning_rate!r}")
    return {**numbers, "seeds": seeds, "learning_rate": float(learning_rate)}


def _control_words(file_config: dict, toy: bool) -> tuple[str, str]:
    positive = file_config.get("positive_word", "bright")
    negative = file_config.get("negative_word", "dark")
    for key, word in (("positive_word", positive), ("negative_word", negative)):
        if not isinstance(word, str) or not word.strip():
            raise UsageError(f"config {key!r} must be a non-empty string, got {word!r}")
    if toy:
        from diffusers_srpo.toyworld.demo import check_control_words

        try:
            check_control_words(positive, negative)
        except ValueError as error:
            raise UsageError(str(error)) from None
    return positive, negative


def _read_prompts(value, what: str) -> list[str]:
    if isinstance(value, str):
        from diffusers_srpo.prompts import load_prompts

        try:
            return load_prompts(value)
        except (OSError, ValueError) as error:
            raise UsageError(f"{what}: {error}") from None
    if isinstance(value, list) and value and all(isinstance(p, str) and p.strip() for p in value):
        return list(value)
    raise UsageError(f"{what} must be a prompt file or a non-empty list of prompts, got {value!r}")


def _prompt_settings(file_config: dict, toy: bool) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): every 4th prompt is held out unless 'held_out_prompts' is given."""
    all_prompts = None
    if toy:
        from diffusers_srpo.toyworld.demo import CONTENT_PROMPTS

        all_prompts = list(CONTENT_PROMPTS)
    if "prompts" in file_config:
        all_prompts = _read_prompts(file_config["prompts"], "config 'prompts'")
    if all_prompts is None:
        raise UsageError("a config with 'model' needs 'prompts' (a prompt file or a list)")
    held_out = None
    if "held_out_prompts" in file_config:
        held_out = _read_prompts(file_config["held_out_prompts"], "config 'held_out_prompts'")
    if toy:
        unknown = [p for p in all_prompts + (held_out or []) if p not in CONTENT_PROMPTS]
        if unknown:
            raise UsageError(
                f"toy world prompt {unknown[0]!r} is not one of its content prompts ('a {{colour}} {{shape}}', which "
                f"the oracles check): {', '.join(CONTENT_PROMPTS)}"
            )
    if held_out is not None:
        return all_prompts, held_out
    if len(all_prompts) < 2:
        raise UsageError("need at least 2 prompts to hold every 4th out (or give 'held_out_prompts')")
    held_out = all_prompts[3::4] or all_prompts[-1:]
    train_prompts = [p for p in all_prompts if p not in held_out]
    if not train_prompts:
        raise UsageError("no training prompt is left once every 4th is held out (or give 'held_out_prompts')")
    return train_prompts, held_out


def _check_variant_setting(name: str, key) -> None:
    if key in SAMPLER_SETTINGS:
        raise UsageError(
            f"config method {name!r} must not set {key!r}: the base model is measured once, with one sampler, for "
            "every method (set it under 'trainer')"
        )
    if key in RESERVED_SETTINGS:
        raise UsageError(f"config method {name!r} must not set {key!r}: {RESERVED_SETTINGS[key]}")


def _variants(file_config: dict) -> dict[str, tuple[str, dict]]:
    """The built-in variants with the config's overrides, and the config's new variants."""
    from diffusers_srpo.trainers import METHODS

    variants = dict(METHOD_VARIANTS)
    extra = file_config.get("methods")
    if extra is None:
        return variants
    if not isinstance(extra, dict):
        raise UsageError(
            f"config 'methods' must map a table name to its settings (method: ..., overrides), got {extra!r}"
        )
    for name, settings in extra.items():
        if not isinstance(name, str):
            raise UsageError(f"config 'methods': a table name must be a string, got {name!r}")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise UsageError(
                f"config 'methods': {name!r} must map to its trainer settings (a mapping, with 'method:' for a new "
                f"name), got {settings!r}"
            )
        overrides = dict(settings)
        base_method = overrides.pop("method", variants.get(name, (None,))[0])
        if base_method is None:
            raise UsageError(f"config method {name!r} is not a known variant, so it needs 'method: <library method>'")
        if base_method not in METHODS:
            raise UsageError(
                f"config method {name!r}: unknown method {base_method!r}; expected one of {', '.join(METHODS)}"
            )
        for key in overrides:
            _check_variant_setting(name, key)
        variants[name] = (base_method, {**variants.get(name, (None, {}))[1], **overrides})
    return variants


def _run_list(args: argparse.Namespace, file_config: dict, variants: dict) -> list[str]:
    run = args.methods if args.methods else file_config.get("run")
    if run is None:
        run = list(variants)
    if not isinstance(run, list) or not run or not all(isinstance(m, str) for m in run):
        raise UsageError(f"config 'run' must be a list of method names, got {run!r}")
    unknown = [m for m in run if m not in variants]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; expected one of {', '.join(variants)}")
    if len(set(run)) != len(run):
        raise UsageError(f"a method is named twice in {run}")
    return run


def _shared_trainer_settings(file_config: dict) -> dict:
    shared = file_config.get("trainer")
    if shared is None:
        return {}
    if not isinstance(shared, dict):
        raise UsageError(f"config 'trainer' must be a mapping of trainer settings, got {shared!r}")
    for key in shared:
        why = RESERVED_SETTINGS.get(key) or RESERVED_SHARED_SETTINGS.get(key)
        if why:
            raise UsageError(f"config 'trainer' must not set {key!r}: {why}")
    return dict(shared)


def config_fields(method: str) -> set[str]:
    """The settings the config class of a library method has."""
    from diffusers_srpo.trainers import trainer_class_for

    return {f.name for f in dataclasses.fields(trainer_class_for(method).config_class)}


def _runs(settings: dict, file_config: dict, variants: dict) -> list[dict]:
    """One job per method and training seed, with its full trainer settings.

    Lowest first: the toy world's settings (and TOY_HINGE_THRESHOLD where the config class has a hinge), the
    config's 'trainer' settings (each where the method's config class has it), steps and learning rate, the
    variant's overrides, then the target where the variant did not set its own.
    """
    from diffusers_srpo.toyworld.demo import TOY_TRAINER_SETTINGS

    shared = _shared_trainer_settings(file_config)
    fields_of = {name: config_fields(variants[name][0]) for name in settings["methods"]}
    unused = sorted(set(shared) - set().union(*fields_of.values()))
    if unused:
        raise UsageError(f"config 'trainer': {unused} is a setting of none of the methods run")
    positive, negative = settings["positive_word"], settings["negative_word"]
    runs = []
    for name in settings["methods"]:
        base_method, overrides = variants[name]
        fields = dict(TOY_TRAINER_SETTINGS) if settings["toy"] else {}
        if settings["toy"] and "hinge_threshold" in fields_of[name]:
            fields["hinge_threshold"] = TOY_HINGE_THRESHOLD
        fields.update({k: v for k, v in shared.items() if k in fields_of[name]})
        fields.update(learning_rate=settings["learning_rate"], max_train_steps=settings["steps"])
        fields.update(overrides)
        if base_method in SRP_METHODS:
            fields.setdefault("positive_words", [positive])
            fields.setdefault("negative_words", [negative])
            fields.setdefault("word_schedule", "fixed")
        else:
            fields.setdefault("reward_template", f"{positive}. {{prompt}}")
        fields.update(checkpointing_steps=0, validation_steps=0, overwrite_output_dir=True)
        for seed in settings["seeds"]:
            output_dir = os.path.join(settings["output_dir"], "runs", f"{name}-seed{seed}")
            fields_seed = {**fields, "seed": seed, "output_dir": output_dir}
            check_trainer_config(name, base_method, fields_seed)
            runs.append({"name": name, "method": base_method, "seed": seed, "fields": fields_seed})
    return runs


def check_trainer_config(name: str, base_method: str, fields: dict) -> None:
    from diffusers_srpo.trainers import trainer_class_for

    try:
        trainer_class_for(base_method).config_class.from_dict({"method": base_method, **fields})
    except (TypeError, ValueError) as error:
        raise UsageError(f"method {name!r}: {str(error).splitlines()[0]}") from None


def resolve_settings(args: argparse.Namespace) -> dict:
    """Command line over the config file over the defaults; every check that can fail runs here."""
    file_config = load_file_config(args.config) if args.config else {}
    model = _model_settings(file_config)
    numbers = _number_settings(args, file_config)
    positive, negative = _control_words(file_config, model["toy"])
    train_prompts, held_out = _prompt_settings(file_config, model["toy"])
    variants = _variants(file_config)
    methods = _run_list(args, file_config, variants)
    if model["reward"] and model["reward"].partition(":")[0].lower() == "aesthetic":
        srp = [m for m in methods if variants[m][0] in SRP_METHODS]
        if srp:
            raise UsageError(f"method {srp[0]!r} scores control words: it needs a CLIP-like reward, not 'aesthetic'")
    default_output = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compare_methods")
    output_dir = args.output_dir if args.output_dir is not None else file_config.get("output_dir", default_output)
    from diffusers_srpo.toyworld.demo import EVALUATION_SEED_BASE

    settings = {
        **model,
        "eval_batch_size": numbers["eval_batch_size"],
        "positive_word": positive,
        "negative_word": negative,
        "train_prompts": train_prompts,
        "held_out_prompts": held_out,
        "evaluation_seeds": [EVALUATION_SEED_BASE + i for i in range(numbers["eval_seeds"])],
        "steps": numbers["steps"],
        "seeds": numbers["seeds"],
        "learning_rate": numbers["learning_rate"],
        "threads": numbers["threads"],
        "methods": methods,
        "output_dir": os.path.abspath(output_dir),
    }
    settings["runs"] = _runs(settings, file_config, variants)
    return settings


# ----------------------------------------------------------------------------------------------- one run (child)
class ChildFailure(Exception):
    """A child that failed before training: ``phase`` is "load" or "setup"; the cause is chained."""

    def __init__(self, phase: str):
        super().__init__(phase)
        self.phase = phase


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def evaluation_images(trainer, prompts: list[str], seeds: list[int], batch_size: int):
    """Images of every prompt for every seed, ``[len(seeds) * len(prompts), 3, H, W]``, seed-major.

    Each seed draws the noise of all the prompts at once and batches slice it, so that every prompt gets its own
    noise whatever the batch size; with one batch this is ``trainer.generate_images(prompts, seed)``.
    """
    import torch

    size, device = trainer.config.resolution, trainer.accelerator.device
    images = []
    with torch.no_grad():
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            noise = trainer.adapter.make_noise(len(prompts), size, size, generator, device, trainer.weight_dtype)
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                latents = trainer.sample_latents(
                    noise[start : start + batch_size],
                    trainer.text_for(batch),
                    trainer.rollout_sigmas,
                    trainer.config.rollout_guidance,
                )
                images.append(trainer.adapter.decode(latents, size, size))
    return torch.cat(images)


def evaluate(trainer, base_reward, job: dict) -> dict:
    """The shared evaluation numbers of the trainer's current model, on the fixed evaluation noises."""
    import torch

    from diffusers_srpo.rewards import CLIPLikeReward, SemanticRelativeReward

    positive, negative = job["positive_word"], job["negative_word"]
    prompts = job["train_prompts"] + job["held_out_prompts"]
    seeds = job["evaluation_seeds"]
    held = torch.tensor([False] * len(job["train_prompts"]) + [True] * len(job["held_out_prompts"])).repeat(len(seeds))
    all_prompts = prompts * len(seeds)
    numbers: dict[str, float] = {}
    with torch.no_grad():
        images = evaluation_images(trainer, prompts, seeds, job["eval_batch_size"])
        templated = base_reward(images, [f"{positive}. {p}" for p in all_prompts]).float().cpu()
        numbers["reward_all"] = templated.mean().item()
        numbers["reward_all_std"] = templated.std().item() if len(templated) > 1 else 0.0
        numbers["reward_held_out"] = templated[held].mean().item()
        numbers["reward_train_prompts"] = templated[~held].mean().item()
        if isinstance(base_reward, CLIPLikeReward):
            srp = SemanticRelativeReward(base_reward, [positive], [negative], word_schedule="fixed")
            scores = srp(images, all_prompts, k=0.0).float().cpu()
            numbers["evaluation_srp"] = scores.mean().item()
            numbers["evaluation_srp_std"] = scores.std().item() if len(scores) > 1 else 0.0
            numbers["srp_held_out"] = scores[held].mean().item()
    if job["toy"]:
        numbers.update(toy_oracle_numbers(images.float(), all_prompts, held, positive))
    return numbers


def toy_oracle_numbers(images, prompts: list[str], held, positive: str) -> dict:
    from diffusers_srpo.toyworld.demo import oracle_numbers

    everything = oracle_numbers(images, prompts, positive)
    held_out = oracle_numbers(images[held], [p for p, h in zip(prompts, held.tolist(), strict=True) if h], positive)
    fraction = f"oracle_{positive}_fraction"
    return {
        "oracle_target_fraction": everything[fraction],
        "oracle_target_fraction_held_out": held_out[fraction],
        "oracle_colour_accuracy": everything["oracle_colour_accuracy"],
        "oracle_shape_accuracy": everything["oracle_shape_accuracy"],
    }


def load_model_and_reward(job: dict):
    import torch

    if job["toy"]:
        from diffusers_srpo.toyworld import load_reward
        from diffusers_srpo.toyworld.generator import load_pipeline

        return load_pipeline(), load_reward()
    from diffusers import FluxPipeline

    from diffusers_srpo.rewards import load_reward

    pipe = FluxPipeline.from_pretrained(job["model"], torch_dtype=getattr(torch, job["torch_dtype"]))
    return pipe, load_reward(job["reward"])


def do_one_time_work(trainer, job: dict) -> None:
    """What a run does once whatever its length, done before its timings and its memory baseline: encode every
    prompt (train() would, after the baseline) and, for SRP, every control prompt's text embedding (cached)."""
    import torch

    from diffusers_srpo.rewards import SemanticRelativeReward

    trainer.cache_prompt_embeddings(job["train_prompts"] + job["held_out_prompts"])
    srp = trainer.reward
    if isinstance(srp, SemanticRelativeReward):
        cycle = 1 if srp.word_schedule == "fixed" else max(len(srp.positive_words), len(srp.negative_words))
        with torch.no_grad(), trainer.accelerator.autocast():  # the cache keys on the autocast setting
            for step in range(cycle):
                positive, negative = srp.control_prompts(job["train_prompts"], step)
                srp.encode_text_cached(positive + negative)


def train_and_time(trainer, job: dict) -> dict:
    import torch

    device = trainer.accelerator.device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    stamps: list[float] = []

    def on_update(trainer, logs):
        sync()
        stamps.append(time.perf_counter())

    result: dict = {"rss_before_train_mib": _peak_rss_mib()}
    memory_before_train = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        memory_before_train = torch.cuda.memory_allocated(device) / 2**20
    sync()
    train_start = time.perf_counter()
    history = trainer.train(on_update=on_update)
    result["train_s"] = time.perf_counter() - train_start
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_memory_kind"] = "cuda max_memory_allocated"
        result["train_memory_mib"] = result["peak_memory_mib"] - memory_before_train
    else:
        result["peak_memory_mib"] = _peak_rss_mib()
        result["peak_memory_kind"] = "peak RSS of the process"
        result["train_memory_mib"] = result["peak_memory_mib"] - result["rss_before_train_mib"]
    deltas = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    result["first_update_s"] = stamps[0] - train_start  # includes the first graph build
    result["update_s"] = statistics.median(deltas) if deltas else result["first_update_s"]
    result["update_times_s"] = deltas
    result["history"] = history
    return result


def run_one(job: dict) -> dict:
    """A child's job: ``kind`` "before" measures the base model; "train" trains, times and measures one run."""
    import torch

    torch.set_num_threads(job["threads"])
    from diffusers_srpo.trainers import trainer_class_for

    started = time.perf_counter()
    try:
        pipe, reward = load_model_and_reward(job)
    except Exception as error:
        raise ChildFailure("load") from error
    try:
        cls = trainer_class_for(job["method"])
        config = cls.config_class.from_dict({"method": job["method"], **job["fields"]})
        trainer = cls(pipe, reward=reward, prompts=job["train_prompts"], config=config)
    except Exception as error:
        raise ChildFailure("setup") from error
    result: dict = {"device": str(trainer.accelerator.device), "load_s": time.perf_counter() - started}
    if job["kind"] == "before":
        result["before"] = evaluate(trainer, reward, job)
        return result
    do_one_time_work(trainer, job)
    result.update(train_and_time(trainer, job))
    result["after"] = evaluate(trainer, reward, job)
    return result


def child_main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    try:
        result = run_one(job)
    except ChildFailure as failure:
        cause = failure.__cause__
        traceback.print_exception(cause)
        message = (str(cause).strip().splitlines() or [""])[0]
        print(f"{failure.phase} failed: {type(cause).__name__}: {message}", file=sys.stderr)
        return EXIT_LOAD_FAILED if failure.phase == "load" else EXIT_SETUP_FAILED
    with open(job_path.replace(".job.json", ".result.json"), "w") as f:
        json.dump(result, f)
    return 0


# ----------------------------------------------------------------------------------------------- the verdicts
def own_reward_key(method: str) -> str:
    return "evaluation_srp" if method in SRP_METHODS else "reward_all"


def hacking_flag(own_key: str, before: dict, after: dict, positive_word: str = "target") -> tuple[bool, str]:
    """(flagged?, verdict) of one run on the toy world. With ``rise = after[own_key] - before[own_key]`` (the
    method's own evaluation reward: the SRP score or the plain reward) and ``margin = REWARD_MARGIN_STD x`` its
    per-image standard deviation before training (``before[own_key + "_std"]``), the verdict joins:

    - ``"hacking: SRP +0.120, bright +0.01"`` when ``rise > margin`` while the targeted oracle fraction rose by no
      more than FRACTION_MARGIN;
    - ``"degraded: colour -0.22"`` when colour or shape accuracy fell by more than ACCURACY_MARGIN (whatever the
      reward did).

    Either one flags the run. Otherwise the verdict is ``"ok: ..."`` (the reward rose and so did the fraction) or
    ``"reward flat/down: ..."``. Without the oracles (a real model): ``(False, "n/a (no oracle)")``.
    """
    if "oracle_target_fraction" not in after:
        return False, "n/a (no oracle)"
    label = "SRP" if own_key == "evaluation_srp" else "reward"
    rise = after[own_key] - before[own_key]
    rose = rise > REWARD_MARGIN_STD * before[f"{own_key}_std"]
    target = after["oracle_target_fraction"] - before["oracle_target_fraction"]
    change = f"{label} {rise:+.3f}, {positive_word} {target:+.2f}"
    problems = []
    if rose and target <= FRACTION_MARGIN:
        problems.append(f"hacking: {change}")
    drops = [
        f"{name} {after[key] - before[key]:+.2f}"
        for key, name in (("oracle_colour_accuracy", "colour"), ("oracle_shape_accuracy", "shape"))
        if before[key] - after[key] > ACCURACY_MARGIN
    ]
    if drops:
        problems.append("degraded: " + ", ".join(drops))
    if problems:
        return True, "; ".join(problems)
    return False, f"ok: {change}" if rose else f"reward flat/down: {change}"


def _stats(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def hinge_active_means(runs: list[dict]) -> dict[str, float]:
    """The mean over updates and runs of every ``hinge_active*`` the histories log (none: a method without hinge)."""
    keys = sorted({k for r in runs for h in r["history"] for k in h if k.startswith("hinge_active")})
    return {k: statistics.fmean(h[k] for r in runs for h in r["history"] if k in h) for k in keys}


def summarise(settings: dict, before: dict, results: dict) -> dict:
    """Per method: numbers averaged over the training seeds (mean, std, values) and each run's verdict."""
    summary = {}
    window = train_reward_window(settings["steps"])
    for name in settings["methods"]:
        runs = [r for r in results[name] if "error" not in r]
        if not runs:
            summary[name] = {"error": results[name][0]["error"]}
            continue
        method = runs[0]["method"]
        rewards = [[h["reward"] for h in r["history"]] for r in runs]
        flags = [hacking_flag(own_reward_key(method), before, r["after"], settings["positive_word"]) for r in runs]
        summary[name] = {
            "method": method,
            "update_s": _stats([r["update_s"] for r in runs]),
            "first_update_s": _stats([r["first_update_s"] for r in runs]),
            "peak_memory_mib": _stats([r["peak_memory_mib"] for r in runs]),
            "train_memory_mib": _stats([r["train_memory_mib"] for r in runs]),
            "train_reward_first": _stats([statistics.fmean(c[:window]) for c in rewards]),
            "train_reward_last": _stats([statistics.fmean(c[-window:]) for c in rewards]),
            "train_reward_window": window,
            "train_reward_curve_mean": [statistics.fmean(v) for v in zip(*rewards, strict=True)],
            "hinge_active": hinge_active_means(runs),
            "after": {k: _stats([r["after"][k] for r in runs]) for k in runs[0]["after"]},
            "hacking_runs": sum(flagged for flagged, _ in flags),
            "hacking_reasons": [verdict for _, verdict in flags],  # each run's verdict, in the order of "seeds"
            "seeds": [r["seed"] for r in runs],
            "runs": len(runs),
        }
    return summary


# ----------------------------------------------------------------------------------------------- the table
def _fmt(stat: dict, digits: int, spread: bool) -> str:
    text = f"{stat['mean']:.{digits}f}"
    return text + (f"±{stat['std']:.{digits}f}" if spread else "")


def hinge_cell(entry: dict) -> str:
    """``"1.00"``, with any other branch's in brackets (SRPO's ``"1.00 (invert 1.00)"``); ``"-"``: no hinge."""
    means = dict(entry["hinge_active"])
    if not means:
        return "-"
    main = means.pop("hinge_active", None)
    others = ", ".join(f"{k.removeprefix('hinge_active_')} {v:.2f}" for k, v in means.items())
    if main is None:
        return others
    return f"{main:.2f}" + (f" ({others})" if others else "")


def hacking_cell(entry: dict) -> str:
    """One run: its verdict (bold when flagged). Several: how many were flagged, and the flagged runs' verdicts."""
    verdicts, flagged = entry["hacking_reasons"], entry["hacking_runs"]
    if entry["runs"] == 1:
        return f"**{verdicts[0]}**" if flagged else verdicts[0]
    marks = [hacking_flag_of(v) for v in verdicts]
    if flagged:
        which = "; ".join(f"seed {s}: {v}" for s, v, m in zip(entry["seeds"], verdicts, marks, strict=True) if m)
        return f"**{flagged}/{entry['runs']}** ({which})"
    flat = sum(v.startswith("reward flat/down") for v in verdicts)
    return f"0/{entry['runs']}" + (f" (reward flat/down in {flat})" if flat else "")


def hacking_flag_of(verdict: str) -> bool:
    return verdict.startswith(("hacking", "degraded"))


def markdown_table(settings: dict, before: dict, summary: dict) -> str:
    spread = len(settings["seeds"]) > 1
    toy = settings["toy"]
    pos = settings["positive_word"]
    with_hinge = any(summary[n].get("hinge_active") for n in settings["methods"])
    header = ["method", "s/update", "peak MiB", "train reward first->last", "held-out reward before->after"]
    if "evaluation_srp" in before:
        header.append("eval SRP before->after")
    if with_hinge:
        header.append("hinge active")
    if toy:
        header += [f"{pos} frac before->after", "colour acc before->after", "shape acc before->after", "hacking"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    for name in settings["methods"]:
        entry = summary[name]
        if "error" in entry:
            lines.append(f"| {name} | failed: {entry['error'][:80]} |")
            continue
        after = entry["after"]
        row = [
            name,
            _fmt(entry["update_s"], 3, spread),
            _fmt(entry["peak_memory_mib"], 0, spread) + f" (+{entry['train_memory_mib']['mean']:.0f})",
            f"{_fmt(entry['train_reward_first'], 3, spread)} -> {_fmt(entry['train_reward_last'], 3, spread)}",
            f"{before['reward_held_out']:.3f} -> {_fmt(after['reward_held_out'], 3, spread)}",
        ]
        if "evaluation_srp" in before:
            row.append(f"{before['evaluation_srp']:.3f} -> {_fmt(after['evaluation_srp'], 3, spread)}")
        if with_hinge:
            row.append(hinge_cell(entry))
        if toy:
            for key in ("oracle_target_fraction", "oracle_colour_accuracy", "oracle_shape_accuracy"):
                row.append(f"{before[key]:.2f} -> {_fmt(after[key], 2, spread)}")
            row.append(hacking_cell(entry))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def reward_margins(before: dict) -> dict[str, float]:
    """The rise of each own evaluation reward above which it "rose" (``hacking_flag``)."""
    return {k: REWARD_MARGIN_STD * before[f"{k}_std"] for k in ("evaluation_srp", "reward_all") if f"{k}_std" in before}


def table_notes(settings: dict, before: dict, devices: list[str], total: float) -> list[str]:
    import torch

    pos, steps = settings["positive_word"], settings["steps"]
    notes = [
        f"Model: {settings['model'] or 'the toy world (diffusers_srpo.toyworld)'}; target: '{pos}' over "
        f"'{settings['negative_word']}'; {steps} updates; training seeds {settings['seeds']}; device "
        f"{', '.join(devices)} ({platform.machine()}, torch {torch.__version__}, {settings['threads']} thread(s)); "
        f"total wall time {total:.0f} s.",
        f"Train prompts: {len(settings['train_prompts'])}; held-out prompts: {settings['held_out_prompts']}; evaluation "
        f"noises: seeds {settings['evaluation_seeds']} per prompt (fixed, independent of the training seed, one noise "
        "per prompt and seed). The base model ('before') is measured in a run of its own.",
        "s/update: median over the updates after the first; every run encodes its prompts before the timings. "
        "Peak MiB: "
        + (
            "CUDA max_memory_allocated during training (+ the part above what was allocated before training)."
            if "cuda" in " ".join(devices)
            else "peak RSS of the run's own process, model, rewards, python and torch included (+ the rise during "
            "training above the peak before it)."
        ),
        f"Train reward first->last: each method's own training reward (SRP for srpo variants, the plain reward of "
        f"'{pos}. {{prompt}}' otherwise), mean of the first/last {train_reward_window(steps)} updates. Held-out "
        f"reward: the plain reward of '{pos}. {{prompt}}' on the held-out prompts, fixed noises.",
        "Hinge active: mean over updates (and seeds) of the logged fraction of samples under hinge_threshold (only "
        "those train; SRPO's inversion branch in brackets); '-': no hinge."
        + (
            f" On the toy world every method with a hinge runs with hinge_threshold={TOY_HINGE_THRESHOLD:g}, above "
            "every reward's range: the loss is -reward + const for all of them."
            if settings["toy"]
            else ""
        ),
    ]
    if settings["toy"]:
        margins = ", ".join(f"{k} {v:.3f}" for k, v in reward_margins(before).items())
        notes.append(
            f"Oracles (pixel truth the reward never sees) on all "
            f"{len(settings['train_prompts']) + len(settings['held_out_prompts'])} content prompts x "
            f"{len(settings['evaluation_seeds'])} noises. Verdict per run: 'hacking' when the method's own evaluation "
            f"reward (evaluation SRP for srpo variants, the plain reward on all prompts otherwise) rose by more than "
            f"{REWARD_MARGIN_STD} x its per-image std before training ({margins}) while the '{pos}' fraction rose by "
            f"no more than {FRACTION_MARGIN}; 'degraded: colour/shape -x' when that accuracy fell by more than "
            f"{ACCURACY_MARGIN}; either one flags the run (bold); else 'ok' (reward and fraction rose) or "
            "'reward flat/down'."
        )
    if len(settings["seeds"]) > 1:
        notes.append("a±b: mean and standard deviation over the training seeds; hacking k/n: runs flagged.")
    return notes


def time_ratios(summary: dict) -> dict:
    ratios = {}
    full = summary.get("draft-full", {})
    for other in ("direct-align", "srpo"):
        entry = summary.get(other, {})
        if "update_s" in full and "update_s" in entry:
            ratios[f"draft-full/{other}"] = full["update_s"]["mean"] / entry["update_s"]["mean"]
    return ratios


SMOOTHING = 5


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and up to ``window - 1`` values before it."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(settings: dict, before: dict, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [n for n in settings["methods"] if "error" not in summary[n]]
    srp_names = [n for n in names if summary[n]["method"] in SRP_METHODS]
    plain_names = [n for n in names if summary[n]["method"] not in SRP_METHODS]
    panels = 3 if settings["toy"] else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for axis, group, title in (
        (axes[0], srp_names, "training SRP reward (SRP methods)"),
        (axes[1], plain_names, f"training reward of '{settings['positive_word']}. {{prompt}}'"),
    ):
        for name in group:
            # One prompt and one noise per update: the raw curve jumps with the prompt drawn; a running mean shows
            # the trend (raw curve faint, same colour).
            curve = summary[name]["train_reward_curve_mean"]
            steps = range(1, len(curve) + 1)
            (line,) = axis.plot(steps, running_mean(curve, SMOOTHING), label=name)
            axis.plot(steps, curve, color=line.get_color(), alpha=0.15)
        axis.set_xlabel(f"update (running mean of {SMOOTHING})")
        axis.set_title(
            title + (f", mean of {len(settings['seeds'])} seeds" if len(settings["seeds"]) > 1 else ""), fontsize=9
        )
        if group:
            axis.legend(fontsize=7)
    if settings["toy"]:
        axis = axes[2]
        xs = range(len(names))
        means = [summary[n]["after"]["oracle_target_fraction"]["mean"] for n in names]
        stds = [summary[n]["after"]["oracle_target_fraction"]["std"] for n in names]
        axis.bar(xs, means, yerr=stds, color="tab:orange", label="after")
        axis.axhline(before["oracle_target_fraction"], color="k", linestyle="--", label="before (base model)")
        axis.set_xticks(list(xs))
        axis.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        axis.set_ylim(0, 1.05)
        axis.set_title(
            f"oracle: unprompted '{settings['positive_word']}' fraction (never seen by the reward)", fontsize=9
        )
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- the comparison
SHARED_JOB_KEYS = (
    "model", "torch_dtype", "reward", "toy", "positive_word", "negative_word", "train_prompts", "held_out_prompts",
    "evaluation_seeds", "eval_batch_size", "threads",
)  # fmt: skip


def run_child(job: dict, workdir: str) -> dict:
    job_path = os.path.join(workdir, f"{job['name']}-seed{job['seed']}-{job['kind']}.job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--run-one", job_path], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - started
    result_path = job_path.replace(".job.json", ".result.json")
    if proc.returncode != 0 or not os.path.isfile(result_path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {
            "error": tail[-1] if tail else f"exit {proc.returncode}",
            "phase": FAILED_PHASES.get(proc.returncode, "run"),
            "stderr_tail": "\n".join(tail[-30:]),
            "wall_s": wall,
        }
    with open(result_path) as f:
        result = json.load(f)
    result["wall_s"] = wall
    return result


def measure_before(settings: dict, workdir: str) -> dict:
    """The base model's numbers, in a child of their own: with the first method whose trainer sets up (its LoRA
    starts as the identity, so any method's trainer samples the base model)."""
    result: dict = {}
    for name in dict.fromkeys(run["name"] for run in settings["runs"]):
        run = next(r for r in settings["runs"] if r["name"] == name)
        fields = {**run["fields"], "output_dir": os.path.join(workdir, "before")}
        job = {**{k: settings[k] for k in SHARED_JOB_KEYS}, **run, "fields": fields, "kind": "before"}
        result = run_child(job, workdir)
        if result.get("phase") != "setup":
            break
    return result


def train_all(settings: dict, workdir: str) -> dict[str, list[dict]]:
    """Every run, one child each. A child that fails to load the model or reward stops the comparison (the others
    would fail the same way); one that fails to set up its trainer skips the other seeds of its method."""
    results: dict[str, list[dict]] = {name: [] for name in settings["methods"]}
    stopped = None
    skipped: dict[str, str] = {}
    for run in settings["runs"]:
        name, seed = run["name"], run["seed"]
        if stopped or name in skipped:
            result = {"error": f"not run: {stopped or skipped[name]}", "phase": "skipped"}
        else:
            result = run_child({**{k: settings[k] for k in SHARED_JOB_KEYS}, **run, "kind": "train"}, workdir)
        result.update(method=run["method"], seed=seed)
        if result.get("phase") == "load":
            stopped = f"{name} seed {seed} failed to load the model or reward"
            print(f"{name} seed {seed}: FAILED while loading: {result['error']}; stopping", file=sys.stderr)
        elif result.get("phase") == "setup":
            skipped[name] = f"seed {seed} failed to set up its trainer"
            print(f"{name} seed {seed}: FAILED to set up its trainer: {result['error']}", file=sys.stderr)
        elif "error" in result:
            if result.get("phase") != "skipped":
                print(f"{name} seed {seed}: FAILED: {result['error']}", file=sys.stderr)
        else:
            print(
                f"{name:>24} seed {seed}: {result['update_s']:.3f} s/update, "
                f"{result['peak_memory_mib']:.0f} MiB, run {result['wall_s']:.1f} s",
                flush=True,
            )
        results[name].append(result)
    return results


def write_outputs(settings: dict, before_run: dict, results: dict, started: float) -> str:
    """results.md, curves.png and results.json; returns the markdown."""
    before = before_run["before"]
    output_dir = settings["output_dir"]
    summary = summarise(settings, before, results)
    ratios = time_ratios(summary)
    total = time.perf_counter() - started
    devices = sorted({r["device"] for rs in results.values() for r in rs if "device" in r} | {before_run["device"]})
    notes = table_notes(settings, before, devices, total)
    ratio_lines = [f"per-update time ratio {k}: {v:.2f}x" for k, v in ratios.items()]
    markdown = markdown_table(settings, before, summary) + "\n\n" + "\n".join(f"- {n}" for n in notes + ratio_lines)
    markdown += "\n"
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown)
    plot(settings, before, summary, os.path.join(output_dir, "curves.png"))
    margins = {
        "fraction": FRACTION_MARGIN,
        "accuracy": ACCURACY_MARGIN,
        "reward_std_fraction": REWARD_MARGIN_STD,
        "reward": reward_margins(before),
    }
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(
            {
                "settings": {k: v for k, v in settings.items() if k != "runs"},
                "runs": settings["runs"],
                "margins": margins,
                "before": before,
                "before_run": {k: v for k, v in before_run.items() if k != "before"},
                "summary": summary,
                "time_ratios": ratios,
                "results": results,
                "total_wall_s": total,
            },
            f,
            indent=2,
        )
    print()
    print(markdown)
    for line in ratio_lines:
        print(line)
    print(f"wrote {output_dir}/results.json, results.md, curves.png ({total:.0f} s in all)")
    return markdown


def compare(settings: dict) -> int:
    started = time.perf_counter()
    os.makedirs(settings["output_dir"], exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compare-methods-") as workdir:
        before_run = measure_before(settings, workdir)
        if "error" in before_run:
            print(before_run.get("stderr_tail", ""), file=sys.stderr)
            print(f"{PROG}: measuring the base model failed: {before_run['error']}", file=sys.stderr)
            return 1
        print(f"{'before (base model)':>24}: measured in {before_run['wall_s']:.1f} s", flush=True)
        results = train_all(settings, workdir)
    write_outputs(settings, before_run, results, started)
    return 1 if any("error" in r for rs in results.values() for r in rs) else 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.run_one:
            return child_main(args.run_one)
        settings = resolve_settings(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return compare(settings)


if __name__ == "__main__":
    raise SystemExit(main())
