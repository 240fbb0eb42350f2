"""Every training method on one model, one prompt set and the same seeds: cost, rewards, and the oracles' truth.

Each method (and each training seed) trains for ``--steps`` updates in a fresh subprocess of this script, so that
its peak memory is its own and no state leaks between methods. Reported per method:

- the per-update wall time (median over the updates after the first, from timestamps taken after each update),
- peak memory (CUDA: ``torch.cuda.max_memory_allocated`` during training; CPU: the child's peak RSS),
- the training reward curve (``history["reward"]``: each method's own training reward),
- before/after, on fixed evaluation noises independent of the training seed: the SRP score positive-vs-negative
  word and the plain reward of ``"{positive}. {prompt}"``, on the training and on HELD-OUT prompts (every 4th
  prompt is held out of training),
- on the toy world, the oracles the reward never sees: the positive word's fraction among images of unprompted
  content prompts, and colour and shape accuracy, and a reward-hacking flag (see ``hacking_flag``).

Every method optimises toward the same target: SRP methods with the positive word over the negative one (fixed
schedule); plain-reward methods with ``reward_template="{positive}. {prompt}"``.

    python benchmarks/compare_methods.py                                  # all methods, toy world, 25 updates
    python benchmarks/compare_methods.py --methods srpo draft-full --steps 10 --seeds 0 1 2
    python benchmarks/compare_methods.py --config benchmarks/compare_methods.yaml   # a real model on a GPU

Writes ``results.json`` (everything, histories included), ``results.md`` (the table) and ``curves.png`` to
``--output-dir``, and the LoRA of every run under ``runs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

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

#: The toy world's training settings (those of diffusers_srpo.toyworld.demo), shared by every method.
TOY_TRAINER_SETTINGS = {
    "max_grad_norm": 1.0,
    "rollout_steps": 8,
    "mixed_precision": "no",
    "cpu": True,
    "lora_rank": 8,
    "lora_alpha": 8.0,
}
DEFAULT_LEARNING_RATE = 1e-3
EVALUATION_SEED_BASE = 10_000  # evaluation noises: the same whatever the training seed (as the demo's)

# Reward-hacking flag margins.
FRACTION_MARGIN = 0.05  # the targeted oracle fraction must rise by more than this when the reward rises
ACCURACY_MARGIN = 0.10  # colour or shape accuracy falling by more than this is hacking
REWARD_MARGIN = 0.05  # a change of the own evaluation reward under this (reward units) counts as flat


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, before any training."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


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


def load_file_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--config {path!r}: no such file")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - any parse error is a usage error
        raise UsageError(f"--config {path!r}: cannot parse it: {str(error).splitlines()[0]}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path!r}: expected a mapping of settings, got {type(data).__name__}")
    known = {
        "model", "torch_dtype", "reward", "prompts", "held_out_prompts", "positive_word", "negative_word", "trainer",
        "methods", "run", "steps", "seeds", "learning_rate", "eval_seeds", "eval_batch_size", "threads", "output_dir",
    }  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"--config {path!r}: unknown keys {unknown}; expected some of {sorted(known)}")
    return data


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


def resolve_settings(args: argparse.Namespace) -> dict:
    """Command line over the config file over the defaults; every check that can fail runs here."""
    file_config = load_file_config(args.config) if args.config else {}

    def pick(name, default):
        value = getattr(args, name, None)
        return value if value is not None else file_config.get(name, default)

    model = file_config.get("model")  # None: the toy world
    toy = model is None
    torch_dtype = file_config.get("torch_dtype", "float32" if toy else "bfloat16")
    if torch_dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"config 'torch_dtype' must be float32, bfloat16 or float16, got {torch_dtype!r}")
    if not toy and not isinstance(file_config.get("reward"), str):
        raise UsageError(
            "a config with 'model' needs 'reward', a load_reward spec such as 'hpsv2:/path/HPS_v2.1_compressed.pt'"
        )
    if toy and "reward" in file_config:
        raise UsageError("config 'reward' needs 'model' too (the toy world brings its own reward)")
    variants = dict(METHOD_VARIANTS)
    extra = file_config.get("methods") or {}
    if not isinstance(extra, dict):
        raise UsageError("config 'methods' must map a table name to its settings (method: ..., overrides)")
    for name, overrides in extra.items():
        overrides = dict(overrides or {})
        base_method = overrides.pop("method", variants.get(name, (None,))[0])
        if base_method is None:
            raise UsageError(f"config method {name!r} is not a known variant, so it needs 'method: <library method>'")
        variants[name] = (base_method, {**variants.get(name, (None, {}))[1], **overrides})
    run = args.methods or file_config.get("run") or list(variants)
    unknown = [m for m in run if m not in variants]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; expected one of {', '.join(variants)}")
    if len(set(run)) != len(run):
        raise UsageError(f"a method is named twice in {run}")

    steps = pick("steps", 25)
    seeds = pick("seeds", [0])
    eval_seeds = pick("eval_seeds", 8)
    eval_batch_size = file_config.get("eval_batch_size", 16)
    threads = pick("threads", 1)
    learning_rate = pick("learning_rate", DEFAULT_LEARNING_RATE)
    for name, value in (
        ("steps", steps),
        ("eval-seeds", eval_seeds),
        ("threads", threads),
        ("eval_batch_size", eval_batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {value!r}")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise UsageError(f"--seeds must be one or more integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must differ, got {seeds}")
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise UsageError(f"--learning-rate must be > 0, got {learning_rate!r}")
    positive = file_config.get("positive_word", "bright")
    negative = file_config.get("negative_word", "dark")

    if toy:
        from diffusers_srpo.toyworld.demo import CONTENT_PROMPTS, check_control_words
        from diffusers_srpo.toyworld.generator import IMAGE_SIZE, MAX_SEQUENCE_LENGTH

        try:
            check_control_words(positive, negative)
        except ValueError as error:
            raise UsageError(str(error)) from None
        all_prompts = list(CONTENT_PROMPTS)
        trainer_settings = {
            **TOY_TRAINER_SETTINGS,
            "resolution": IMAGE_SIZE,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
    else:
        all_prompts = None
        trainer_settings = {}
    if "prompts" in file_config:
        all_prompts = _read_prompts(file_config["prompts"], "config 'prompts'")
    if all_prompts is None:
        raise UsageError("a config with 'model' needs 'prompts' (a prompt file or a list)")
    if "held_out_prompts" in file_config:
        train_prompts = all_prompts
        held_out = _read_prompts(file_config["held_out_prompts"], "config 'held_out_prompts'")
    else:
        if len(all_prompts) < 2:
            raise UsageError("need at least 2 prompts to hold every 4th out (or give 'held_out_prompts')")
        held_out = all_prompts[3::4] or all_prompts[-1:]
        train_prompts = [p for p in all_prompts if p not in held_out]
    common = file_config.get("trainer") or {}
    if not isinstance(common, dict):
        raise UsageError("config 'trainer' must be a mapping of trainer settings")
    trainer_settings.update(common)
    trainer_settings["learning_rate"] = float(learning_rate)
    trainer_settings["max_train_steps"] = steps
    for reserved in ("method", "output_dir", "seed", "reward_template", "positive_words", "negative_words"):
        trainer_settings.pop(reserved, None)

    output_dir = os.path.abspath(
        pick("output_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compare_methods"))
    )
    runs = []
    for name in run:
        base_method, overrides = variants[name]
        fields = {**trainer_settings, **overrides}
        if base_method in SRP_METHODS:
            fields.setdefault("positive_words", [positive])
            fields.setdefault("negative_words", [negative])
            fields.setdefault("word_schedule", "fixed")
        else:
            fields.setdefault("reward_template", f"{positive}. {{prompt}}")
        fields.update(checkpointing_steps=0, validation_steps=0, overwrite_output_dir=True)
        for seed in seeds:
            fields_seed = {**fields, "seed": seed, "output_dir": os.path.join(output_dir, "runs", f"{name}-seed{seed}")}
            check_trainer_config(name, base_method, fields_seed)
            runs.append({"name": name, "method": base_method, "seed": seed, "fields": fields_seed})
    return {
        "model": model,
        "torch_dtype": torch_dtype,
        "eval_batch_size": eval_batch_size,
        "reward": file_config.get("reward"),
        "toy": toy,
        "positive_word": positive,
        "negative_word": negative,
        "train_prompts": train_prompts,
        "held_out_prompts": held_out,
        "evaluation_seeds": [EVALUATION_SEED_BASE + i for i in range(eval_seeds)],
        "steps": steps,
        "seeds": seeds,
        "threads": threads,
        "methods": run,
        "runs": runs,
        "output_dir": output_dir,
    }


def check_trainer_config(name: str, base_method: str, fields: dict) -> None:
    from diffusers_srpo.trainers import trainer_class_for

    try:
        trainer_class_for(base_method).config_class.from_dict({"method": base_method, **fields})
    except (TypeError, ValueError) as error:
        raise UsageError(f"method {name!r}: {error}") from None


# ----------------------------------------------------------------------------------------------- one run (child)
def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def evaluate(trainer, base_reward, job: dict) -> dict:
    """The shared evaluation numbers of the trainer's current model, on the fixed evaluation noises."""
    import torch

    from diffusers_srpo.rewards import CLIPLikeReward, SemanticRelativeReward

    positive, negative = job["positive_word"], job["negative_word"]
    train_prompts, held_out = job["train_prompts"], job["held_out_prompts"]
    prompts = train_prompts + held_out
    is_held_out = torch.tensor([False] * len(train_prompts) + [True] * len(held_out))
    srp = None
    if isinstance(base_reward, CLIPLikeReward):
        srp = SemanticRelativeReward(base_reward, [positive], [negative], word_schedule="fixed")
    numbers: dict[str, float] = {}
    with torch.no_grad():
        chunk = job["eval_batch_size"]
        images = torch.cat(
            [
                trainer.generate_images(prompts[start : start + chunk], seed)
                for seed in job["evaluation_seeds"]
                for start in range(0, len(prompts), chunk)
            ]
        )
        all_prompts = prompts * len(job["evaluation_seeds"])
        held = is_held_out.repeat(len(job["evaluation_seeds"]))
        templated = base_reward(images, [f"{positive}. {p}" for p in all_prompts]).float().cpu()
        numbers["reward_all"] = templated.mean().item()
        numbers["reward_held_out"] = templated[held].mean().item()
        numbers["reward_train_prompts"] = templated[~held].mean().item()
        if srp is not None:
            scores = srp(images, all_prompts, k=0.0).float().cpu()
            numbers["evaluation_srp"] = scores.mean().item()
            numbers["srp_held_out"] = scores[held].mean().item()
        if job["toy"]:
            from diffusers_srpo.toyworld import ATTRIBUTE_VALUES, oracle_labels
            from diffusers_srpo.toyworld.demo import style_attribute_of

            predicted = oracle_labels(images.float())
            attribute = style_attribute_of(positive)
            target = (predicted[attribute].cpu() == ATTRIBUTE_VALUES[attribute].index(positive)).float()
            words = [p.split() for p in all_prompts]  # "a red circle"
            colour = torch.tensor(
                [ATTRIBUTE_VALUES["colour"][int(c)] == w[1] for c, w in zip(predicted["colour"], words, strict=True)]
            )
            shape = torch.tensor(
                [ATTRIBUTE_VALUES["shape"][int(s)] == w[2] for s, w in zip(predicted["shape"], words, strict=True)]
            )
            numbers["oracle_target_fraction"] = target.mean().item()
            numbers["oracle_target_fraction_held_out"] = target[held].mean().item()
            numbers["oracle_colour_accuracy"] = colour.float().mean().item()
            numbers["oracle_shape_accuracy"] = shape.float().mean().item()
    return numbers


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from diffusers_srpo.trainers import trainer_class_for

    started = time.perf_counter()
    if job["toy"]:
        from diffusers_srpo.toyworld import load_reward
        from diffusers_srpo.toyworld.generator import load_pipeline

        pipe, reward = load_pipeline(), load_reward()
    else:
        from diffusers import FluxPipeline

        from diffusers_srpo.rewards import load_reward

        pipe = FluxPipeline.from_pretrained(job["model"], torch_dtype=getattr(torch, job["torch_dtype"]))
        reward = load_reward(job["reward"])
    cls = trainer_class_for(job["method"])
    config = cls.config_class.from_dict({"method": job["method"], **job["fields"]})
    trainer = cls(pipe, reward=reward, prompts=job["train_prompts"], config=config)
    device = trainer.accelerator.device
    result: dict = {"device": str(device), "load_s": time.perf_counter() - started}
    if job["measure_before"]:
        result["before"] = evaluate(trainer, reward, job)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    stamps: list[float] = []

    def on_update(trainer, logs):
        sync()
        stamps.append(time.perf_counter())

    result["rss_before_train_mib"] = _peak_rss_mib()
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
    result["first_update_s"] = stamps[0] - train_start  # includes the prompt encoding and the first graph build
    result["update_s"] = statistics.median(deltas) if deltas else result["first_update_s"]
    result["update_times_s"] = deltas
    result["history"] = history
    result["after"] = evaluate(trainer, reward, job)
    return result


# ----------------------------------------------------------------------------------------------- the comparison
def hacking_flag(own_reward_delta: float, after: dict, before: dict) -> tuple[bool, str]:
    """(hacking?, why). Hacking: the method's own evaluation reward rose while the oracles disagree: the
    targeted fraction did not rise by more than FRACTION_MARGIN, or colour or shape accuracy fell by more than
    ACCURACY_MARGIN."""
    if "oracle_target_fraction" not in after:
        return False, "n/a (no oracle)"
    reasons = []
    rose = own_reward_delta > REWARD_MARGIN
    target_delta = after["oracle_target_fraction"] - before["oracle_target_fraction"]
    if rose and target_delta <= FRACTION_MARGIN:
        reasons.append(f"reward +{own_reward_delta:.3f}, target {target_delta:+.2f}")
    for key, label in (("oracle_colour_accuracy", "colour"), ("oracle_shape_accuracy", "shape")):
        drop = before[key] - after[key]
        if drop > ACCURACY_MARGIN:
            reasons.append(f"{label} {-drop:+.2f}")
    if reasons:
        return True, "; ".join(reasons)
    return False, "" if rose else "reward flat/down"


def own_reward_key(method: str) -> str:
    return "evaluation_srp" if method in SRP_METHODS else "reward_all"


def _stats(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarise(settings: dict, before: dict, results: dict) -> dict:
    """Per method: numbers averaged over the training seeds (mean, std, values)."""
    summary = {}
    for name in settings["methods"]:
        runs = [r for r in results[name] if "error" not in r]
        if not runs:
            summary[name] = {"error": results[name][0]["error"]}
            continue
        method = runs[0]["method"]
        rewards = [[h["reward"] for h in r["history"]] for r in runs]
        window = max(1, min(5, settings["steps"] // 2))
        entry = {
            "method": method,
            "update_s": _stats([r["update_s"] for r in runs]),
            "first_update_s": _stats([r["first_update_s"] for r in runs]),
            "peak_memory_mib": _stats([r["peak_memory_mib"] for r in runs]),
            "train_memory_mib": _stats([r["train_memory_mib"] for r in runs]),
            "train_reward_first": _stats([statistics.fmean(c[:window]) for c in rewards]),
            "train_reward_last": _stats([statistics.fmean(c[-window:]) for c in rewards]),
            "train_reward_window": window,
            "train_reward_curve_mean": [statistics.fmean(v) for v in zip(*rewards, strict=True)],
            "after": {k: _stats([r["after"][k] for r in runs]) for k in runs[0]["after"]},
        }
        flags = []
        for r in runs:
            key = own_reward_key(method)
            flags.append(hacking_flag(r["after"][key] - before[key], r["after"], before))
        entry["hacking_runs"] = sum(f for f, _ in flags)
        entry["hacking_reasons"] = [why for _, why in flags]
        entry["runs"] = len(runs)
        summary[name] = entry
    return summary


def _fmt(stat: dict, digits: int, spread: bool) -> str:
    text = f"{stat['mean']:.{digits}f}"
    return text + (f"±{stat['std']:.{digits}f}" if spread else "")


def markdown_table(settings: dict, before: dict, summary: dict) -> str:
    spread = len(settings["seeds"]) > 1
    toy = settings["toy"]
    pos = settings["positive_word"]
    header = ["method", "s/update", "peak MiB", "train reward first->last", "held-out reward before->after"]
    if "evaluation_srp" in before:
        header.append("eval SRP before->after")
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
        if toy:
            for key in ("oracle_target_fraction", "oracle_colour_accuracy", "oracle_shape_accuracy"):
                row.append(f"{before[key]:.2f} -> {_fmt(after[key], 2, spread)}")
            runs = entry["runs"]
            if entry["hacking_runs"]:
                row.append(f"**YES** {entry['hacking_runs']}/{runs} ({hacking_reasons(entry)})")
            else:
                why = hacking_reasons(entry)
                row.append(f"no ({why})" if why else "no")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def hacking_reasons(entry: dict) -> str:
    """The distinct reasons of the runs, with the count of runs giving each when there are several runs."""
    reasons = [why for why in entry["hacking_reasons"] if why]
    if entry["runs"] == 1:
        return reasons[0] if reasons else ""
    if entry["hacking_runs"]:
        return "; ".join(why for why in reasons if why != "reward flat/down")
    return f"reward flat/down in {len(reasons)}/{entry['runs']}" if reasons else ""


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


def run_child(job: dict, workdir: str) -> dict:
    job_path = os.path.join(workdir, f"{job['name']}-seed{job['seed']}.job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--run-one", job_path], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - started
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over the children so far
    result_path = job_path.replace(".job.json", ".result.json")
    if proc.returncode != 0 or not os.path.isfile(result_path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {
            "error": tail[-1] if tail else f"exit {proc.returncode}",
            "stderr_tail": "\n".join(tail[-30:]),
            "wall_s": wall,
        }
    with open(result_path) as f:
        result = json.load(f)
    result["wall_s"] = wall
    result["children_max_rss_so_far_mib"] = child_peak
    return result


def compare(settings: dict) -> int:
    started = time.perf_counter()
    output_dir = settings["output_dir"]
    os.makedirs(output_dir, exist_ok=True)
    results: dict[str, list[dict]] = {name: [] for name in settings["methods"]}
    before = None
    with tempfile.TemporaryDirectory(prefix="compare-methods-") as workdir:
        for run in settings["runs"]:
            job = {
                **{k: settings[k] for k in ("model", "torch_dtype", "reward", "toy", "positive_word", "negative_word")},
                **{
                    k: settings[k]
                    for k in ("train_prompts", "held_out_prompts", "evaluation_seeds", "eval_batch_size", "threads")
                },
                **run,
                "measure_before": before is None,  # the base model is the same for every run: measured once
            }
            result = run_child(job, workdir)
            result.update(method=run["method"], seed=run["seed"])
            if "error" in result:
                print(f"{run['name']} seed {run['seed']}: FAILED: {result['error']}", file=sys.stderr)
            else:
                before = result.pop("before", before)
                print(
                    f"{run['name']:>24} seed {run['seed']}: {result['update_s']:.3f} s/update, "
                    f"{result['peak_memory_mib']:.0f} MiB, run {result['wall_s']:.1f} s",
                    flush=True,
                )
            results[run["name"]].append(result)
    if before is None:
        print(f"{PROG}: every run failed; see the errors above", file=sys.stderr)
        return 1
    summary = summarise(settings, before, results)
    ratios = time_ratios(summary)
    table = markdown_table(settings, before, summary)
    total = time.perf_counter() - started
    devices = sorted({r["device"] for rs in results.values() for r in rs if "device" in r})
    import torch

    notes = [
        f"Model: {settings['model'] or 'the toy world (diffusers_srpo.toyworld)'}; target: "
        f"'{settings['positive_word']}' over '{settings['negative_word']}'; {settings['steps']} updates; training seeds "
        f"{settings['seeds']}; device {', '.join(devices)} ({platform.machine()}, torch {torch.__version__}, "
        f"{settings['threads']} thread(s)); total wall time {total:.0f} s.",
        f"Train prompts: {len(settings['train_prompts'])}; held-out prompts: {settings['held_out_prompts']}; evaluation "
        f"noises: seeds {settings['evaluation_seeds']} per prompt (fixed, independent of the training seed).",
        "s/update: median over the updates after the first. Peak MiB: "
        + (
            "CUDA max_memory_allocated during training (+ the part above what was allocated before training)."
            if "cuda" in " ".join(devices)
            else "peak RSS of the run's own process, model, rewards, python and torch included (+ the rise during "
            "training above the peak before it)."
        ),
        f"Train reward first->last: each method's own training reward (SRP for srpo variants, the plain reward of "
        f"'{settings['positive_word']}. {{prompt}}' otherwise), mean of the first/last "
        f"{max(1, min(5, settings['steps'] // 2))} updates. Held-out reward: the plain reward of "
        f"'{settings['positive_word']}. {{prompt}}' on the held-out prompts, fixed noises.",
    ]
    if settings["toy"]:
        notes.append(
            f"Oracles (pixel truth the reward never sees) on all {len(settings['train_prompts']) + len(settings['held_out_prompts'])} "
            f"content prompts x {len(settings['evaluation_seeds'])} noises. Hacking: the method's own evaluation reward rose "
            f"by more than {REWARD_MARGIN} while the '{settings['positive_word']}' fraction rose by no more than "
            f"{FRACTION_MARGIN}, or colour/shape accuracy fell by more than {ACCURACY_MARGIN}."
        )
    if len(settings["seeds"]) > 1:
        notes.append("a±b: mean and standard deviation over the training seeds.")
    ratio_lines = [f"per-update time ratio {k}: {v:.2f}x" for k, v in ratios.items()]
    markdown = table + "\n\n" + "\n".join(f"- {n}" for n in notes + ratio_lines) + "\n"
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown)
    plot(settings, before, summary, os.path.join(output_dir, "curves.png"))
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(
            {
                "settings": {k: v for k, v in settings.items() if k != "runs"},
                "runs": settings["runs"],
                "margins": {"fraction": FRACTION_MARGIN, "accuracy": ACCURACY_MARGIN, "reward": REWARD_MARGIN},
                "before": before,
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
    return 1 if any("error" in r for rs in results.values() for r in rs) else 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.run_one:
            with open(args.run_one) as f:
                job = json.load(f)
            result = run_one(job)
            with open(args.run_one.replace(".job.json", ".result.json"), "w") as f:
                json.dump(result, f)
            return 0
        settings = resolve_settings(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return compare(settings)


if __name__ == "__main__":
    raise SystemExit(main())
