"""compare_methods.py's settings: the method variants, the command line and the config file, resolved into one
``settings`` dict (every check that can fail runs here, before anything is loaded or written).

Time to target and the Pareto view add: ``eval_every`` (the oracles every K updates on the fixed evaluation noises,
outside the timed training), ``target_fraction`` / ``target_colour_accuracy`` (the oracle target, absolute or
relative to the base model: ``base+0.10``), and ``sweep_learning_rates`` (extra learning rates, each run with the
first training seed only).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

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
    # Flow-GRPO with a small group (4 trajectories of the update's one prompt), the loss on the first half of the
    # sampler's steps and no KL (Flow-GRPO's FLUX recipe and base config: beta 0). No hinge: the plain reward.
    "grpo": ("grpo", {"group_size": 4, "timestep_fraction": 0.5, "beta": 0.0}),
    # The paper's hacking ablation: no inversion branch and a late (almost clean) window, against srpo's 5..25.
    "srpo-late-no-inversion": ("srpo", {"use_inversion": False, "train_window_start": 30, "train_window_end": 49}),
}
SRP_METHODS = ("srpo",)

DEFAULT_LEARNING_RATE = 1e-3
#: The toy world's hinge threshold for every method that has one: above every toy reward's range (compare_methods.py).
TOY_HINGE_THRESHOLD = 10.0
#: The default oracle target of time to target: the positive word's fraction 0.10 above the base model's, with colour
#: accuracy at most 0.03 below it (the toy world moves the fraction by tenths in tens of updates: issue 22).
DEFAULT_TARGET_FRACTION = "base+0.10"
DEFAULT_TARGET_COLOUR_ACCURACY = "base-0.03"
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


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, before any training."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------- command line
def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    parser.add_argument(
        "--sweep-learning-rates",
        type=float,
        nargs="+",
        help="More learning rates for the Pareto view of hacking: each method also runs at each of them, with the "
        "first training seed only (default none).",
    )
    parser.add_argument("--eval-seeds", type=int, help="Evaluation noises per prompt (default 8).")
    parser.add_argument(
        "--eval-every",
        type=int,
        help="Evaluate (oracles and rewards, fixed evaluation noises) every K updates and after the last, outside the "
        "timed training and the forward counts: time to target, reward-vs-wall-time and the Pareto view "
        "(default 0: before and after training only).",
    )
    parser.add_argument(
        "--target-fraction",
        help="Time to target, toy world: the positive word's oracle fraction to reach, a number or 'base+X' (X above "
        f"the base model's; default {DEFAULT_TARGET_FRACTION}).",
    )
    parser.add_argument(
        "--target-colour-accuracy",
        help="Time to target, toy world: the colour accuracy to keep at the same time, a number or 'base-X' "
        f"(default {DEFAULT_TARGET_COLOUR_ACCURACY}).",
    )
    parser.add_argument("--output-dir", help="Where results go (default benchmarks/results/compare_methods).")
    parser.add_argument(
        "--runs-dir", help="Where every run writes its LoRA (default OUTPUT_DIR/runs): RUNS_DIR/NAME-seedS."
    )
    parser.add_argument("--threads", type=int, help="torch threads per run (default 1: fastest on a shared CPU).")
    parser.add_argument(
        "--config", help="YAML (or JSON) file: model, reward, prompts, trainer settings, per-method overrides."
    )
    parser.add_argument(
        "--report-from",
        nargs="+",
        metavar="RESULTS_JSON",
        help="Train nothing: write the report of saved results.json files (merged: the same model, prompts, "
        "evaluation, steps and learning rate, different runs) to --output-dir, with this command's target.",
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: the child's job file
    return parser


CONFIG_KEYS = (
    "model", "torch_dtype", "reward", "prompts", "held_out_prompts", "positive_word", "negative_word", "trainer",
    "methods", "run", "steps", "seeds", "learning_rate", "sweep_learning_rates", "eval_seeds", "eval_batch_size",
    "eval_every", "target_fraction", "target_colour_accuracy", "threads", "output_dir", "runs_dir",
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


# ----------------------------------------------------------------------------------------------- model, numbers
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


def _non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"--{name} must be a non-negative integer, got {value!r}")
    return value


def _learning_rate(value, name: str) -> float:
    if isinstance(value, str):  # YAML reads 1e-4 (no ".0") as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise UsageError(f"--{name} must be > 0, got {value!r}")
    return float(value)


_TARGET = re.compile(r"^\s*base\s*([+-])\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*$")


def parse_target(value, name: str) -> dict:
    """A target oracle value: a number in [0, 1] (absolute) or ``"base+X"`` / ``"base-X"`` (relative to the base
    model's value) -> ``{"absolute": v}`` or ``{"relative": +-X}``; see :func:`target_value`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= 1:
            raise UsageError(f"--{name} must be in [0, 1] or 'base+X' / 'base-X', got {value!r}")
        return {"absolute": float(value)}
    if isinstance(value, str):
        match = _TARGET.match(value)
        if match:
            sign = 1.0 if match.group(1) == "+" else -1.0
            return {"relative": sign * float(match.group(2))}
        try:
            return parse_target(float(value), name)
        except ValueError:
            pass
    raise UsageError(f"--{name} must be a number in [0, 1] or 'base+X' / 'base-X', got {value!r}")


def target_value(target: dict, base: float) -> float:
    """The oracle value a target asks for, given the base model's."""
    return target["absolute"] if "absolute" in target else base + target["relative"]


def target_text(target: dict) -> str:
    if "absolute" in target:
        return f"{target['absolute']:g}"
    return f"base{target['relative']:+g}"


def _number_settings(args: argparse.Namespace, file_config: dict) -> dict:
    """steps, seeds, eval_seeds, eval_batch_size, eval_every, threads, learning rates, targets: the command line
    over the file."""

    def pick(name, default):
        value = getattr(args, name, None)
        return value if value is not None else file_config.get(name, default)

    numbers = {
        "steps": _positive_int(pick("steps", 25), "steps"),
        "eval_seeds": _positive_int(pick("eval_seeds", 8), "eval-seeds"),
        "eval_every": _non_negative_int(pick("eval_every", 0), "eval-every"),
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
    learning_rate = _learning_rate(pick("learning_rate", DEFAULT_LEARNING_RATE), "learning-rate")
    sweep = pick("sweep_learning_rates", [])
    if not isinstance(sweep, list):
        raise UsageError(f"--sweep-learning-rates must be a list of learning rates, got {sweep!r}")
    sweep = [_learning_rate(lr, "sweep-learning-rates") for lr in sweep]
    if learning_rate in sweep or len(set(sweep)) != len(sweep):
        raise UsageError(
            f"--sweep-learning-rates must differ from each other and from --learning-rate {learning_rate:g}, got "
            f"{[f'{lr:g}' for lr in sweep]}"
        )
    targets = {
        "target_fraction": parse_target(pick("target_fraction", DEFAULT_TARGET_FRACTION), "target-fraction"),
        "target_colour_accuracy": parse_target(
            pick("target_colour_accuracy", DEFAULT_TARGET_COLOUR_ACCURACY), "target-colour-accuracy"
        ),
    }
    return {**numbers, **targets, "seeds": seeds, "learning_rate": learning_rate, "sweep_learning_rates": sorted(sweep)}


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


def run_label(name: str, learning_rate: float, main_learning_rate: float) -> str:
    """The table's name of a run: the variant's name at the main learning rate, ``"srpo @ lr 0.003"`` at a sweep's."""
    return name if learning_rate == main_learning_rate else f"{name} @ lr {learning_rate:g}"


def _runs(settings: dict, file_config: dict, variants: dict) -> list[dict]:
    """One job per method, learning rate and training seed, with its full trainer settings: every seed at the main
    learning rate, the first seed only at each of ``sweep_learning_rates``.

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
    main_lr = settings["learning_rate"]
    runs = []
    for name in settings["methods"]:
        base_method, overrides = variants[name]
        if "learning_rate" in overrides and settings["sweep_learning_rates"]:
            raise UsageError(f"config method {name!r} sets its own 'learning_rate': it cannot take part in a sweep")
        for learning_rate in sorted({main_lr, *settings["sweep_learning_rates"]}):
            fields = dict(TOY_TRAINER_SETTINGS) if settings["toy"] else {}
            if settings["toy"] and "hinge_threshold" in fields_of[name]:
                fields["hinge_threshold"] = TOY_HINGE_THRESHOLD
            fields.update({k: v for k, v in shared.items() if k in fields_of[name]})
            fields.update(learning_rate=learning_rate, max_train_steps=settings["steps"])
            fields.update(overrides)
            if base_method in SRP_METHODS:
                fields.setdefault("positive_words", [positive])
                fields.setdefault("negative_words", [negative])
                fields.setdefault("word_schedule", "fixed")
            else:
                fields.setdefault("reward_template", f"{positive}. {{prompt}}")
            fields.update(checkpointing_steps=0, validation_steps=0, overwrite_output_dir=True)
            label = run_label(name, learning_rate, main_lr)
            seeds = settings["seeds"] if learning_rate == main_lr else settings["seeds"][:1]
            for seed in seeds:
                run_id = f"{name}-seed{seed}" if learning_rate == main_lr else f"{name}-lr{learning_rate:g}-seed{seed}"
                output_dir = os.path.join(settings["runs_dir"], run_id)
                fields_seed = {**fields, "seed": seed, "output_dir": output_dir}
                check_trainer_config(name, base_method, fields_seed)
                runs.append(
                    {
                        "name": name,
                        "label": label,
                        "run_id": run_id,
                        "method": base_method,
                        "learning_rate": fields_seed["learning_rate"],
                        "seed": seed,
                        "fields": fields_seed,
                    }
                )
    return runs


def row_labels(runs: list[dict]) -> list[str]:
    """The table's rows, in the order of the runs: each method's learning rates in rising order."""
    return list(dict.fromkeys(run["label"] for run in runs))


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
    runs_dir = getattr(args, "runs_dir", None) or file_config.get("runs_dir") or os.path.join(output_dir, "runs")
    from diffusers_srpo.toyworld.demo import EVALUATION_SEED_BASE

    settings = {
        **model,
        "eval_batch_size": numbers["eval_batch_size"],
        "positive_word": positive,
        "negative_word": negative,
        "train_prompts": train_prompts,
        "held_out_prompts": held_out,
        "evaluation_seeds": [EVALUATION_SEED_BASE + i for i in range(numbers["eval_seeds"])],
        "eval_every": numbers["eval_every"],
        "target_fraction": numbers["target_fraction"],
        "target_colour_accuracy": numbers["target_colour_accuracy"],
        "steps": numbers["steps"],
        "seeds": numbers["seeds"],
        "learning_rate": numbers["learning_rate"],
        "sweep_learning_rates": numbers["sweep_learning_rates"],
        "threads": numbers["threads"],
        "methods": methods,
        "output_dir": os.path.abspath(output_dir),
        "runs_dir": os.path.abspath(runs_dir),
    }
    settings["runs"] = _runs(settings, file_config, variants)
    settings["rows"] = row_labels(settings["runs"])
    return settings


#: The options --report-from takes (everything else is a setting of the runs it reads).
REPORT_OPTIONS = ("report_from", "output_dir", "target_fraction", "target_colour_accuracy", "run_one")


def report_settings(args: argparse.Namespace) -> tuple[list[str], str, dict]:
    """--report-from's (paths, output dir, the targets given on the command line)."""
    extra = [k for k, v in vars(args).items() if v is not None and k not in REPORT_OPTIONS]
    if extra:
        raise UsageError(
            f"--report-from takes only --output-dir and the target options, got --{extra[0].replace('_', '-')}"
        )
    if args.output_dir is None:
        raise UsageError("--report-from needs --output-dir (where the report goes)")
    targets = {}
    if args.target_fraction is not None:
        targets["target_fraction"] = parse_target(args.target_fraction, "target-fraction")
    if args.target_colour_accuracy is not None:
        targets["target_colour_accuracy"] = parse_target(args.target_colour_accuracy, "target-colour-accuracy")
    return list(args.report_from), args.output_dir, targets
