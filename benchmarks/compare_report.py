"""compare_methods.py's report: the verdicts, the per-method summary, the tables, the plots and results.json.

Beside the main table (per-update cost, rewards, oracles, a hacking verdict per run):

- **time to target** (toy world, with ``eval_every``): per run, the first evaluation at which the oracle target
  holds (the positive word's fraction at least ``target_fraction`` and colour accuracy at least
  ``target_colour_accuracy``), with the training time (evaluations excluded) and the transformer forwards spent until
  then; per method the mean over the training seeds at the main learning rate (a run that never reaches the target
  counts with its whole budget: the mean is then a lower bound), and the ratios of every method's to SRPO's;
- **the Pareto view of hacking** (toy world): for each method, every evaluation of its first-seed runs at every
  learning rate as a point (targeted gain, colour accuracy loss, shape accuracy loss) against the base model, and
  per level of targeted gain the least loss any of its points reaches at that gain or more.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from compare_settings import SRP_METHODS, TOY_HINGE_THRESHOLD, UsageError, target_text, target_value

# The verdict of a run on the toy world (``hacking_flag``).
FRACTION_MARGIN = 0.05  # the targeted oracle fraction "did not rise" unless it rose by more than this
ACCURACY_MARGIN = 0.10  # colour or shape accuracy falling by more than this is "degraded"
REWARD_MARGIN_STD = 0.25  # the own evaluation reward "rose" when it rose by more than this x its per-image std before
#: Levels of targeted gain at which the Pareto view compares the methods' content losses.
PARETO_GAIN_STEP = 0.05
#: Losses within this of the least one tie (the oracles count images: 0.02 is two of the toy world's 96 default
#: evaluation images, about the noise of one accuracy between nearby evaluations).
PARETO_TOLERANCE = 0.02
#: The methods whose time to target is divided by SRPO's for the headline ratios (when they ran).
HEADLINE_RATIOS = ("grpo", "draft-full")
REFERENCE_METHOD = "srpo"


def train_reward_window(steps: int) -> int:
    """How many updates the "train reward first->last" columns average at each end."""
    return max(1, min(5, steps // 2))


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


def forwards_per_update(runs: list[dict]) -> dict:
    """Mean over runs of the transformer forward calls and samples per update, by kind (``{}``: not counted)."""
    counted = [r["forwards_per_update"] for r in runs if "forwards_per_update" in r]
    if not counted:
        return {}
    return {
        part: {kind: statistics.fmean(c[part][kind] for c in counted) for kind in counted[0][part]}
        for part in counted[0]
    }


def summarise(settings: dict, before: dict, results: dict) -> dict:
    """Per row (method, learning rate): numbers averaged over the training seeds (mean, std, values) and each run's
    verdict."""
    summary = {}
    window = train_reward_window(settings["steps"])
    names = {run["label"]: run["name"] for run in settings["runs"]}
    rates = {run["label"]: run["learning_rate"] for run in settings["runs"]}
    for label in settings["rows"]:
        runs = [r for r in results[label] if "error" not in r]
        if not runs:
            summary[label] = {"error": results[label][0]["error"], "name": names[label]}
            continue
        method = runs[0]["method"]
        rewards = [[h["reward"] for h in r["history"]] for r in runs]
        flags = [hacking_flag(own_reward_key(method), before, r["after"], settings["positive_word"]) for r in runs]
        summary[label] = {
            "name": names[label],
            "method": method,
            "learning_rate": rates[label],
            "update_s": _stats([r["update_s"] for r in runs]),
            "first_update_s": _stats([r["first_update_s"] for r in runs]),
            "peak_memory_mib": _stats([r["peak_memory_mib"] for r in runs]),
            "train_memory_mib": _stats([r["train_memory_mib"] for r in runs]),
            "forwards_per_update": forwards_per_update(runs),
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


def forwards_cell(entry: dict) -> str:
    """Transformer calls per update without gradient / with gradient / re-run in backward, and the samples in them
    when a call holds more than one (GRPO's groups): ``"8 / 2 / 0"``, ``"32 / 16 / 0 (x4)"``."""
    counts = entry.get("forwards_per_update")
    if not counts:
        return "-"
    calls, rows = counts["calls"], counts["rows"]
    text = " / ".join(f"{calls[k]:.0f}" for k in ("no_grad", "grad", "recomputed"))
    total_calls, total_rows = sum(calls.values()), sum(rows.values())
    if total_calls and total_rows != total_calls:
        text += f" ({total_rows:.0f} samples)"
    return text


def markdown_table(settings: dict, before: dict, summary: dict) -> str:
    toy = settings["toy"]
    pos = settings["positive_word"]
    rows = settings["rows"]
    with_hinge = any(summary[n].get("hinge_active") for n in rows)
    with_forwards = any(summary[n].get("forwards_per_update") for n in rows)
    header = ["method", "s/update"]
    if with_forwards:
        header.append("transformer calls/update (no grad / grad / recomputed)")
    header += ["peak MiB", "train reward first->last", "held-out reward before->after"]
    if "evaluation_srp" in before:
        header.append("eval SRP before->after")
    if with_hinge:
        header.append("hinge active")
    if toy:
        header += [f"{pos} frac before->after", "colour acc before->after", "shape acc before->after", "hacking"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    for label in rows:
        entry = summary[label]
        if "error" in entry:
            lines.append(f"| {label} | failed: {entry['error'][:80]} |")
            continue
        spread = entry["runs"] > 1
        after = entry["after"]
        row = [label, _fmt(entry["update_s"], 3, spread)]
        if with_forwards:
            row.append(forwards_cell(entry))
        row += [
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
    sweep = settings.get("sweep_learning_rates") or []
    notes = [
        f"Model: {settings['model'] or 'the toy world (diffusers_srpo.toyworld)'}; target: '{pos}' over "
        f"'{settings['negative_word']}'; {steps} updates; learning rate {settings['learning_rate']:g}; training seeds "
        f"{settings['seeds']}"
        + (
            f" (and learning rates {', '.join(f'{lr:g}' for lr in sweep)} with seed {settings['seeds'][0]}: the rows "
            "'@ lr')"
            if sweep
            else ""
        )
        + f"; device {', '.join(devices)} ({platform.machine()}, torch {torch.__version__}, {settings['threads']} "
        f"thread(s)); total wall time {total:.0f} s.",
        f"Train prompts: {len(settings['train_prompts'])}; held-out prompts: {settings['held_out_prompts']}; evaluation "
        f"noises: seeds {settings['evaluation_seeds']} per prompt (fixed, independent of the training seed, one noise "
        "per prompt and seed). The base model ('before') is measured in a run of its own.",
        "s/update: median over the updates after the first (training only: evaluations during training are not in "
        "it); every run encodes its prompts before the timings. "
        "Peak MiB: "
        + (
            "CUDA max_memory_allocated during training (+ the part above what was allocated before training)."
            if "cuda" in " ".join(devices)
            else "peak RSS of the run's own process, model, rewards, python and torch included (+ the rise during "
            "training above the peak before it)."
        )
        + (" It includes the evaluations during training." if settings.get("eval_every") else ""),
        "Transformer calls/update: forward calls of the transformer per update (a hook on it), without gradient "
        "(rollouts, sampling, reference policies) / with gradient / re-run in backward by a per-step activation "
        "checkpoint (DRaFT); the samples in them when a call holds several (GRPO's group).",
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
    """curves.png: the training rewards and the oracle fraction after training, of the main learning rate's rows."""
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


# ----------------------------------------------------------------------------------------------- time to target
def _total(counts: dict) -> float:
    return float(sum(counts.values()))


def target_thresholds(settings: dict, before: dict) -> dict:
    """The oracle values the target asks for, given the base model's."""
    return {
        "oracle_target_fraction": target_value(settings["target_fraction"], before["oracle_target_fraction"]),
        "oracle_colour_accuracy": target_value(settings["target_colour_accuracy"], before["oracle_colour_accuracy"]),
    }


def meets_target(numbers: dict, thresholds: dict) -> bool:
    # The oracles count images: a fraction is k / n, compared with a small tolerance for the float sum "base + x".
    return all(numbers[key] >= value - 1e-9 for key, value in thresholds.items())


def evaluation_points(run: dict, before: dict) -> list[dict]:
    """The run's evaluations, the base model first as update 0 (no training time, no forwards)."""
    zeros = {"calls": {}, "rows": {}}
    return [{"update": 0, "train_s": 0.0, "forwards": zeros, "numbers": before}] + list(run.get("evaluations", []))


def run_time_to_target(run: dict, before: dict, thresholds: dict) -> dict:
    """The first evaluation at which the target holds: its update, training seconds and forward counts so far
    (``reached``); else the run's last evaluation (``reached: False``: the numbers are lower bounds)."""
    points = evaluation_points(run, before)
    point = next((p for p in points if meets_target(p["numbers"], thresholds)), None)
    reached = point is not None
    if point is None:
        point = points[-1]
    return {
        "reached": reached,
        "update": point["update"],
        "train_s": point["train_s"],
        "forward_calls": dict(point["forwards"]["calls"]),
        "forward_rows": dict(point["forwards"]["rows"]),
        "forward_calls_total": _total(point["forwards"]["calls"]),
        "forward_rows_total": _total(point["forwards"]["rows"]),
        "seed": run.get("seed"),
    }


TIME_KEYS = ("update", "train_s", "forward_calls_total", "forward_rows_total")


def median_or_never(values: list[float | None]) -> float | None:
    """The median of values where None is "never" (above every number); None when the median is never."""
    ordered = sorted(values, key=lambda v: (v is None, v or 0.0))
    middle = len(ordered) // 2
    pair = ordered[middle : middle + 1] if len(ordered) % 2 else ordered[middle - 1 : middle + 1]
    return None if any(v is None for v in pair) else statistics.fmean(pair)


def time_to_target(settings: dict, before: dict, results: dict) -> dict | None:
    """Per method at the main learning rate (every seed): each run's time to target, the means over the seeds (a
    run that did not reach the target counts with its whole budget, and the mean is then a lower bound:
    ``bound: ">="``) and the medians (a run that did not reach it counts as never: ``None`` when the median is
    never), and the ratios of every method's means to SRPO's (``">="`` when only the other method's mean is a lower
    bound, ``"<="`` when only SRPO's is, ``None``: both, no ratio) and of the medians (``median``: ``None`` where
    either median is never). None without evaluations during training or oracles."""
    if not settings["toy"] or not settings.get("eval_every"):
        return None
    thresholds = target_thresholds(settings, before)
    methods = {}
    for name in settings["methods"]:
        runs = [r for r in results.get(name, []) if "error" not in r]
        if not runs:
            continue
        per_run = [run_time_to_target(r, before, thresholds) for r in runs]
        reached = sum(r["reached"] for r in per_run)
        methods[name] = {
            "runs": per_run,
            "reached": reached,
            "of": len(per_run),
            "bound": "=" if reached == len(per_run) else ">=",
            **{key: _stats([r[key] for r in per_run]) for key in TIME_KEYS},
            "median": {key: median_or_never([r[key] if r["reached"] else None for r in per_run]) for key in TIME_KEYS},
        }
    ratios = {}
    reference = methods.get(REFERENCE_METHOD)
    if reference is not None:
        for name, entry in methods.items():
            if name == REFERENCE_METHOD:
                continue
            lower, upper = entry["bound"] == ">=", reference["bound"] == ">="
            bound = None if lower and upper else ">=" if lower else "<=" if upper else "="
            medians = {}
            for key in TIME_KEYS:
                mine, theirs = entry["median"][key], reference["median"][key]
                medians[key] = mine / theirs if mine is not None and theirs else None
            ratios[name] = {
                "bound": bound,
                **{
                    key: (entry[key]["mean"] / reference[key]["mean"] if reference[key]["mean"] > 0 else None)
                    for key in TIME_KEYS
                },
                "median": medians,
            }
    return {
        "target": {
            "fraction": target_text(settings["target_fraction"]),
            "colour_accuracy": target_text(settings["target_colour_accuracy"]),
            "thresholds": thresholds,
        },
        "eval_every": settings["eval_every"],
        "budget_updates": settings["steps"],
        "methods": methods,
        "ratios_over_srpo": ratios,
    }


def _bounded(value: float, bound: str | None, digits: int, suffix: str = "") -> str:
    prefix = {">=": "≥ ", "<=": "≤ "}.get(bound or "", "")
    return f"{prefix}{value:.{digits}f}{suffix}"


def ratio_text(ratio: dict, key: str = "train_s") -> str:
    if ratio["bound"] is None or ratio.get(key) is None:
        return "n/a"
    return _bounded(ratio[key], ratio["bound"], 2, "x")


def median_ratio_text(ratio: dict, key: str = "train_s") -> str:
    value = ratio["median"].get(key)
    return "n/a" if value is None else f"{value:.2f}x"


def headline_ratios(ttt: dict) -> list[str]:
    """One line per headline ratio (SRPO's speed-up over GRPO and over DRaFT full-chain), by the mean and by the
    median over the seeds."""
    lines = []
    runs = {name: entry["of"] for name, entry in ttt["methods"].items()}
    for name in HEADLINE_RATIOS:
        ratio = ttt["ratios_over_srpo"].get(name)
        if ratio is None:
            continue
        bound = {">=": "a lower bound: not every run of " + name + " reached the target",
                 "<=": "an upper bound: not every srpo run reached the target",
                 None: "none: neither reached the target in every run"}.get(ratio["bound"])  # fmt: skip
        means = (
            f"by the mean ({bound}): {ratio_text(ratio)} in training time, "
            if bound
            else f"by the mean: {ratio_text(ratio)} in training time, "
        )
        lines.append(
            f"SRPO's speed-up to the target over {name} ({runs[REFERENCE_METHOD]} and {runs[name]} seeds) {means}"
            f"{ratio_text(ratio, 'forward_rows_total')} in transformer samples, {ratio_text(ratio, 'update')} in "
            f"updates; by the median (a run that never reaches it counts as never): {median_ratio_text(ratio)} in "
            f"training time, {median_ratio_text(ratio, 'forward_rows_total')} in transformer samples, "
            f"{median_ratio_text(ratio, 'update')} in updates."
        )
    return lines


def time_to_target_tables(settings: dict, before: dict, ttt: dict) -> str:
    thresholds = ttt["target"]["thresholds"]
    pos = settings["positive_word"]
    lines = [
        f"Target: '{pos}' fraction >= {ttt['target']['fraction']} ({thresholds['oracle_target_fraction']:.3f}) and "
        f"colour accuracy >= {ttt['target']['colour_accuracy']} ({thresholds['oracle_colour_accuracy']:.3f}); base "
        f"model: {before['oracle_target_fraction']:.3f} and {before['oracle_colour_accuracy']:.3f}. Evaluated every "
        f"{ttt['eval_every']} updates (and after the last) on the fixed evaluation noises; budget "
        f"{ttt['budget_updates']} updates.",
        "",
        "| method | seed | reached at update | training s | transformer calls (no grad / grad / recomputed) "
        "| transformer samples |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in ttt["methods"].items():
        for run in entry["runs"]:
            calls = run["forward_calls"]
            call_text = " / ".join(f"{calls.get(k, 0):.0f}" for k in ("no_grad", "grad", "recomputed"))
            if run["reached"]:
                update = f"{run['update']}"
            else:
                update = f"not reached (> {run['update']})"
            bound = "=" if run["reached"] else ">="
            lines.append(
                f"| {name} | {run['seed']} | {update} | {_bounded(run['train_s'], bound, 1)} | {call_text} | "
                f"{_bounded(run['forward_rows_total'], bound, 0)} |"
            )
    lines += [
        "",
        "| method | reached | updates to target | training s to target | transformer samples to target "
        "| time / SRPO's | samples / SRPO's | median updates | median training s | median samples "
        "| median time / SRPO's | median samples / SRPO's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in ttt["methods"].items():
        ratio = ttt["ratios_over_srpo"].get(name)
        spread = entry["of"] > 1
        cells = [
            name,
            f"{entry['reached']}/{entry['of']}",
            ("≥ " if entry["bound"] == ">=" else "") + _fmt(entry["update"], 1, spread),
            ("≥ " if entry["bound"] == ">=" else "") + _fmt(entry["train_s"], 1, spread),
            ("≥ " if entry["bound"] == ">=" else "") + _fmt(entry["forward_rows_total"], 0, spread),
            ratio_text(ratio) if ratio else "1",
            ratio_text(ratio, "forward_rows_total") if ratio else "1",
            *(
                "never" if entry["median"][key] is None else f"{entry['median'][key]:.{digits}f}"
                for key, digits in (("update", 0), ("train_s", 1), ("forward_rows_total", 0))
            ),
            median_ratio_text(ratio) if ratio else "1",
            median_ratio_text(ratio, "forward_rows_total") if ratio else "1",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training s: wall time of train() up to the end of that update, evaluations excluded (a shared CPU's clock: "
        "the samples count is the load-free cost). Transformer samples: the samples of every forward call (a GRPO "
        "call holds the group's 4), all kinds. A run that never reached the target counts with its whole budget "
        "in the means ('≥': the mean is a lower bound, and a ratio over it a lower bound, or an upper bound when it "
        "is SRPO's; 'n/a': both) and as never in the medians ('never'; 'n/a': a ratio with a median that is "
        "never). The time is that of the first evaluation at which the target holds: up to "
        f"{ttt['eval_every']} updates late.",
    ]
    lines += [f"- {line}" for line in headline_ratios(ttt)]
    return "\n".join(lines)


LINESTYLES = ("-", "--", ":", "-.")


def plot_time_to_target(settings: dict, before: dict, results: dict, ttt: dict, path: str) -> None:
    """time_to_target.png: the oracle fraction, the plain reward and colour accuracy against training wall time,
    and the fraction against transformer samples; one line per run, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    pos = settings["positive_word"]
    thresholds = ttt["target"]["thresholds"]
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (
        (axes[0][0], "train_s", "oracle_target_fraction", f"oracle '{pos}' fraction (target dashed)"),
        (axes[0][1], "train_s", "reward_all", f"plain reward of '{pos}. {{prompt}}' (all prompts, fixed noises)"),
        (axes[1][0], "train_s", "oracle_colour_accuracy", "oracle colour accuracy (target dashed)"),
        (axes[1][1], "rows", "oracle_target_fraction", f"oracle '{pos}' fraction against transformer samples"),
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(ttt["methods"]):
        colour = colours[index % len(colours)]
        runs = [r for r in results[name] if "error" not in r]
        for run_index, run in enumerate(runs):
            points = evaluation_points(run, before)
            for axis, x_key, y_key, _ in panels:
                xs = [p["train_s"] if x_key == "train_s" else _total(p["forwards"]["rows"]) for p in points]
                ys = [p["numbers"][y_key] for p in points]
                axis.plot(xs, ys, color=colour, marker=".", alpha=0.8, linestyle=LINESTYLES[run_index % len(LINESTYLES)],
                          label=f"{name} seed {run['seed']}")  # fmt: skip
            hit = ttt["methods"][name]["runs"][run_index]
            if hit["reached"]:
                axes[0][0].plot([hit["train_s"]], [thresholds["oracle_target_fraction"]], "*", color=colour, ms=12)
    for axis, x_key, y_key, title in panels:
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("training wall time, s (evaluations excluded)" if x_key == "train_s" else "transformer samples")
        if y_key in thresholds:
            axis.axhline(thresholds[y_key], color="k", linestyle="--", linewidth=1)
    axes[0][1].legend(fontsize=6, ncol=2)
    figure.suptitle(
        "time to target: one line per run (colour: method, line style: seed), star: target first reached", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- Pareto view
LOSS_KEYS = {"colour": "oracle_colour_accuracy", "shape": "oracle_shape_accuracy"}


def pareto_points(settings: dict, before: dict, results: dict) -> dict[str, list[dict]]:
    """Per method: every evaluation (after training started) of its first-seed run at every learning rate, as
    targeted gain and accuracy losses against the base model."""
    seed = settings["seeds"][0]
    labels = {run["label"]: (run["name"], run["learning_rate"]) for run in settings["runs"]}
    points: dict[str, list[dict]] = {}
    for label in settings["rows"]:
        name, learning_rate = labels[label]
        for run in results.get(label, []):
            if "error" in run or run["seed"] != seed:
                continue
            evaluations = run.get("evaluations") or [
                {"update": settings["steps"], "train_s": None, "numbers": run["after"]}
            ]
            for index, evaluation in enumerate(evaluations):
                numbers = evaluation["numbers"]
                points.setdefault(name, []).append(
                    {
                        "learning_rate": learning_rate,
                        "update": evaluation["update"],
                        "final": index == len(evaluations) - 1,
                        "gain": numbers["oracle_target_fraction"] - before["oracle_target_fraction"],
                        **{f"{k}_loss": before[key] - numbers[key] for k, key in LOSS_KEYS.items()},
                    }
                )
    return points


def pareto_levels(points: dict[str, list[dict]]) -> list[float]:
    """Gain levels, every PARETO_GAIN_STEP up to the highest gain any method reaches (none: no gain reached)."""
    reach = max((p["gain"] for ps in points.values() for p in ps), default=0.0)
    return [round(PARETO_GAIN_STEP * (i + 1), 10) for i in range(int(reach / PARETO_GAIN_STEP + 1e-9))]


def pareto_front(points: list[dict], level: float, loss: str) -> dict | None:
    """The point with the least ``{loss}_loss`` among those whose gain is at least ``level`` (None: none is)."""
    above = [p for p in points if p["gain"] >= level - 1e-9]
    return min(above, key=lambda p: (p[f"{loss}_loss"], -p["gain"])) if above else None


def pareto(settings: dict, before: dict, results: dict) -> dict | None:
    """The Pareto view: points per method, and per gain level each method's least colour and shape loss at that
    gain or more, with the methods that lose least (every one within PARETO_TOLERANCE of the least loss)."""
    if not settings["toy"]:
        return None
    points = pareto_points(settings, before, results)
    if not points:
        return None
    levels = pareto_levels(points)
    table = []
    for level in levels:
        row = {"gain": level, "methods": {}, "best": {}}
        for loss in LOSS_KEYS:
            fronts = {name: pareto_front(ps, level, loss) for name, ps in points.items()}
            for name, point in fronts.items():
                row["methods"].setdefault(name, {})[loss] = point
            reached = {n: p[f"{loss}_loss"] for n, p in fronts.items() if p is not None}
            if reached:
                least = min(reached.values())
                row["best"][loss] = [n for n, v in reached.items() if v <= least + PARETO_TOLERANCE + 1e-9]
        table.append(row)
    wins = {
        loss: {name: sum(name in row["best"].get(loss, []) for row in table) for name in points} for loss in LOSS_KEYS
    }
    return {
        "seed": settings["seeds"][0],
        "learning_rates": sorted({settings["learning_rate"], *settings.get("sweep_learning_rates", [])}),
        "points": points,
        "levels": table,
        "wins": wins,
    }


def pareto_table(settings: dict, view: dict) -> str:
    names = list(view["points"])
    pos = settings["positive_word"]
    if not view["levels"]:
        return "\n".join(f"- {line}" for line in pareto_conclusion(view))
    lines = [
        f"Least accuracy loss (colour / shape, base minus now; negative: it rose) at a '{pos}' fraction gain of at "
        f"least the row's, over every evaluation of the seed-{view['seed']} runs at learning rates "
        f"{', '.join(f'{lr:g}' for lr in view['learning_rates'])}; '-': never that gain. Bold: the least loss and "
        f"every one within {PARETO_TOLERANCE:g} of it.",
        "",
        "| gain >= | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for row in view["levels"]:
        cells = []
        for name in names:
            parts = []
            for loss in LOSS_KEYS:
                point = row["methods"][name][loss]
                if point is None:
                    parts.append("-")
                    continue
                text = f"{point[f'{loss}_loss']:+.2f}"
                parts.append(f"**{text}**" if name in row["best"].get(loss, []) else text)
            cells.append(" / ".join(parts))
        lines.append(f"| {row['gain']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {line}" for line in pareto_conclusion(view))]
    return "\n".join(lines)


def pareto_conclusion(view: dict) -> list[str]:
    """Which method keeps content best at equal targeted gain: per loss, the methods within PARETO_TOLERANCE of the
    least loss at each gain level (consecutive levels with the same answer joined), and how many levels each won."""
    levels = view["levels"]
    if not levels:
        return [f"no method raised the targeted fraction by {PARETO_GAIN_STEP:g} or more: no gain to compare at."]
    reach = {name: max(p["gain"] for p in ps) for name, ps in view["points"].items()}
    lines = [
        f"highest targeted gain reached: {', '.join(f'{n} {g:+.2f}' for n, g in reach.items())}; compared at "
        f"{len(levels)} gain levels ({levels[0]['gain']:.2f} to {levels[-1]['gain']:.2f}); losses within "
        f"{PARETO_TOLERANCE:g} of the least tie."
    ]
    for loss, wins in view["wins"].items():
        segments: list[list] = []  # [first level, last level, winners, whether only one method got there]
        for row in levels:
            best = tuple(row["best"].get(loss, ()))
            alone = sum(row["methods"][name][loss] is not None for name in row["methods"]) == 1
            if segments and segments[-1][2] == best and segments[-1][3] == alone:
                segments[-1][1] = row["gain"]
            else:
                segments.append([row["gain"], row["gain"], best, alone])
        parts = []
        for first, last, best, alone in segments:
            span = f"{first:.2f}" if first == last else f"{first:.2f}-{last:.2f}"
            who = ", ".join(best) if best else "none"
            if alone:
                who += " (the only one to get there)"
            elif len(best) > 1:
                who += " (tie)"
            parts.append(f"{span}: {who}")
        counts = ", ".join(f"{n} {w}" for n, w in sorted(wins.items(), key=lambda item: -item[1]))
        lines.append(
            f"{loss} accuracy kept best at equal targeted gain, by gain level: {'; '.join(parts)} (levels won, ties "
            f"counted for each: {counts})."
        )
    return lines


def plot_pareto(settings: dict, view: dict, path: str) -> None:
    """pareto.png: colour and shape accuracy loss against the targeted gain; one colour per method, one marker per
    learning rate, each run's evaluations joined in order (the last one large)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>"
    rates = view["learning_rates"]
    for index, (name, points) in enumerate(view["points"].items()):
        colour = colours[index % len(colours)]
        for axis, loss in zip(axes, LOSS_KEYS, strict=True):
            for rate_index, rate in enumerate(rates):
                run = [p for p in points if p["learning_rate"] == rate]
                if not run:
                    continue
                marker = markers[rate_index % len(markers)]
                axis.plot([p["gain"] for p in run], [p[f"{loss}_loss"] for p in run], color=colour, alpha=0.35,
                          marker=marker, ms=3, linewidth=1)  # fmt: skip
                final = run[-1]
                axis.plot([final["gain"]], [final[f"{loss}_loss"]], color=colour, marker=marker, ms=9,
                          linestyle="none", label=f"{name} lr {rate:g}")  # fmt: skip
    pos = settings["positive_word"]
    for axis, loss in zip(axes, LOSS_KEYS, strict=True):
        axis.axhline(0, color="k", linewidth=0.8)
        axis.axvline(0, color="k", linewidth=0.8)
        axis.set_xlabel(f"targeted gain: '{pos}' fraction minus the base model's")
        axis.set_ylabel(f"{loss} accuracy loss (base minus now)")
        axis.set_title(f"{loss} kept (lower is better) against the targeted gain", fontsize=9)
    axes[1].legend(fontsize=6, ncol=2)
    figure.suptitle(
        f"Pareto view of hacking: seed {view['seed']}, every evaluation (small, joined in order) and the last (large)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- outputs
def write_outputs(settings: dict, before_run: dict, results: dict, started: float, total: float | None = None) -> str:
    """results.md, curves.png, results.json, and with evaluations during training on the toy world
    time_to_target.png; on the toy world pareto.png. Returns the markdown."""
    before = before_run["before"]
    output_dir = settings["output_dir"]
    summary = summarise(settings, before, results)
    ratios = time_ratios(summary)
    ttt = time_to_target(settings, before, results)
    view = pareto(settings, before, results)
    total = time.perf_counter() - started if total is None else total
    devices = sorted({r["device"] for rs in results.values() for r in rs if "device" in r} | {before_run["device"]})
    notes = table_notes(settings, before, devices, total)
    ratio_lines = [f"per-update time ratio {k}: {v:.2f}x" for k, v in ratios.items()]
    markdown = markdown_table(settings, before, summary) + "\n\n" + "\n".join(f"- {n}" for n in notes + ratio_lines)
    markdown += "\n"
    written = ["results.json", "results.md", "curves.png"]
    if ttt is not None and ttt["methods"]:
        markdown += "\n## Time to target\n\n" + time_to_target_tables(settings, before, ttt) + "\n"
        plot_time_to_target(settings, before, results, ttt, os.path.join(output_dir, "time_to_target.png"))
        written.append("time_to_target.png")
    if view is not None:
        markdown += "\n## Pareto view of hacking\n\n" + pareto_table(settings, view) + "\n"
        plot_pareto(settings, view, os.path.join(output_dir, "pareto.png"))
        written.append("pareto.png")
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
                "time_to_target": ttt,
                "pareto": view,
                "results": results,
                "total_wall_s": total,
            },
            f,
            indent=2,
        )
    print()
    print(markdown)
    print(f"wrote {', '.join(written)} to {output_dir} ({total:.0f} s in all)")
    return markdown


# ----------------------------------------------------------------------------------------------- saved results
#: Settings that saved results must share to be reported together.
SAME_SETTINGS = (
    "model", "toy", "torch_dtype", "reward", "positive_word", "negative_word", "train_prompts", "held_out_prompts",
    "evaluation_seeds", "eval_batch_size", "eval_every", "steps", "learning_rate", "threads",
)  # fmt: skip
#: Base-model numbers that must agree between saved results (the base model is measured the same way each time).
BEFORE_TOLERANCE = 1e-6


def load_saved(paths: list[str]) -> tuple[dict, dict, dict, float]:
    """``(settings, before_run, results, total wall seconds)`` of saved ``results.json`` files, merged: the runs of
    every file (a method, learning rate and seed at most once), their seeds and sweep learning rates united, the rows
    in the order of the methods, each method's learning rates rising. The files must share SAME_SETTINGS and the
    base model's numbers (UsageError otherwise)."""
    saved = []
    for path in paths:
        try:
            with open(path) as f:
                saved.append(json.load(f))
        except (OSError, ValueError) as error:
            raise UsageError(f"--report-from {path!r}: {error}") from None
        if not all(key in saved[-1] for key in ("settings", "runs", "before", "before_run", "results")):
            raise UsageError(f"--report-from {path!r}: not a results.json of compare_methods.py")
        if "rows" not in saved[-1]["settings"]:
            raise UsageError(f"--report-from {path!r}: written by an older compare_methods.py (no learning-rate rows)")
    first = saved[0]
    settings = dict(first["settings"])
    runs, results, total = [], {}, 0.0
    for path, data in zip(paths, saved, strict=True):
        for key in SAME_SETTINGS:
            if data["settings"].get(key) != settings.get(key):
                raise UsageError(
                    f"--report-from {path!r}: its {key!r} ({data['settings'].get(key)!r}) differs from "
                    f"{paths[0]!r}'s ({settings.get(key)!r})"
                )
        for key, value in first["before"].items():
            if abs(data["before"].get(key, float("nan")) - value) > BEFORE_TOLERANCE:
                raise UsageError(f"--report-from {path!r}: its base model's {key!r} differs from {paths[0]!r}'s")
        for run in data["runs"]:
            if any((r["label"], r["seed"]) == (run["label"], run["seed"]) for r in runs):
                raise UsageError(f"--report-from {path!r}: {run['label']!r} seed {run['seed']} is in two files")
            runs.append(run)
        for label, label_runs in data["results"].items():
            results.setdefault(label, []).extend(label_runs)
        total += data.get("total_wall_s", 0.0)
    methods = list(dict.fromkeys(name for data in saved for name in data["settings"]["methods"]))
    runs.sort(key=lambda r: (methods.index(r["name"]), r["learning_rate"], r["seed"]))
    for label_runs in results.values():
        label_runs.sort(key=lambda r: r["seed"])
    settings.update(
        methods=methods,
        seeds=list(dict.fromkeys(seed for data in saved for seed in data["settings"]["seeds"])),
        sweep_learning_rates=sorted({lr for data in saved for lr in data["settings"].get("sweep_learning_rates", [])}),
        runs=runs,
        rows=list(dict.fromkeys(r["label"] for r in runs)),
    )
    before_run = {**first["before_run"], "before": first["before"]}
    return settings, before_run, results, total


def report_from(paths: list[str], output_dir: str, targets: dict) -> int:
    """Write the report of saved results (merged: :func:`load_saved`) to ``output_dir``, with ``targets`` (the
    command line's target settings) over the saved ones. Nothing is trained."""
    settings, before_run, results, total = load_saved(paths)
    settings.update(targets, output_dir=os.path.abspath(output_dir), report_from=[os.path.abspath(p) for p in paths])
    os.makedirs(settings["output_dir"], exist_ok=True)
    write_outputs(settings, before_run, results, time.perf_counter(), total=total)
    return 1 if any("error" in r for rs in results.values() for r in rs) else 0
