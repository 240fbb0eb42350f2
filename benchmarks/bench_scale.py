"""Simulated memory and FLOPs of one training update of FLUX.1-dev (or FLUX.2-dev, Qwen-Image, SD3.5 Large) at its
real size, on a CPU, in seconds.

The real FLUX.1-dev transformer (11.9B; ``--model`` picks another family's), its VAE and the HPS v2.1 reward
(open_clip ViT-H-14) are built on fake tensors, and the project's own trainer runs one update under a memory tracker and torch's FLOP formulas
(``diffusers_srpo.simulation``; the rollout's repeated steps are simulated once and replayed). Every number is **simulated**; ``gpu_update.py`` measures the same update on a GPU.

    python benchmarks/bench_scale.py --model flux.1-dev --method srpo --resolution 720 --json OUT.json   # one point
    python benchmarks/bench_scale.py                                      # the grid: a markdown table + JSON

One point prints a line and writes one JSON object: ``params`` (transformer parameters), ``peak_gib`` (peak device
memory of the update), its split, ``flops`` (the whole update), ``flops_rollout`` (``training_step``: the rollout,
TailorPO's ranked pairs) and ``flops_gradient`` (forwards with gradient, backward, step), and the derived
``fits_gb`` (which cards hold it) and ``flop_floor_s`` (the FLOPs at the bf16 matrix rate an H200 reached here).
The grid runs each point in a fresh process: every method with LoRA and full fine-tune, checkpointing on and off,
at 720 px batch 1; and SRPO's LoRA at 512 / 720 / 1024 px, batch 1 and 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_models  # noqa: E402
from scale_models import DEFAULTS, DTYPES, METHOD_VARIANTS, MODEL_NAMES, PROMPTS, build_pipeline, build_reward  # noqa: E402

GIB = 2**30
#: bf16 dense matrix rate measured on an H200 here (the device notes); the FLOP floor divides by it.
H200_MEASURED_FLOPS = 790e12
#: Cards by their marketed size (GB) and the GiB a training process can use on them: the size less about 1 GiB of
#: CUDA context and allocator slack (an H200's 141 GB show as about 139 GiB).
CARD_USABLE_GIB = {24: 23.0, 48: 46.0, 80: 78.0, 141: 138.0}
GRID_METHODS = ("srpo", "direct-align", "refl", "draft-1", "draft-full", "tailorpo")


def trainer_config(args, output_dir: str):
    """The trainer settings of one point, on the CPU: the same simulated device wherever this runs."""
    return scale_models.trainer_config(args, output_dir, max_train_steps=1, cpu=True)


def simulate_point(args) -> dict:
    """One update of one configuration, simulated; the JSON object described in the module docstring."""
    from diffusers_srpo.simulation import simulate_update, simulated_tensors, simulated_trainer
    from diffusers_srpo.trainers import trainer_class_for

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as output_dir, simulated_tensors():
        config = trainer_config(args, output_dir)  # checked before anything is built
        pipe = build_pipeline(args.model, dtype=torch.bfloat16)
        reward = build_reward(args.model, dtype=DTYPES[args.reward_dtype])
        trainer = simulated_trainer(trainer_class_for(config.method), pipe, reward=reward, prompts=PROMPTS, config=config)
        cost = simulate_update(trainer)
    peak_gib = cost.peak_bytes / GIB
    return {
        "simulated": True,
        **scale_models.point_fields(args),
        "params": cost.transformer_params,
        "trainable_params": cost.trainable_params,
        "peak_gib": peak_gib,
        "peak_split_gib": {
            "frozen_weights": cost.frozen_weight_bytes / GIB,
            "training_state": cost.training_state_bytes / GIB,
            "vae_and_reward": cost.vae_and_reward_bytes / GIB,
            "activations": cost.activation_bytes / GIB,
        },
        "peak_by_category_gib": {key: value / GIB for key, value in cost.peak_by_category.items()},
        "flops": cost.flops,
        "flops_rollout": cost.sampling_flops,
        "flops_gradient": cost.gradient_flops,
        "flop_floor_s": cost.flops / H200_MEASURED_FLOPS,
        "fits_gb": {str(size): peak_gib <= usable for size, usable in CARD_USABLE_GIB.items()},
        "wall_s": time.perf_counter() - started,
        "torch": torch.__version__,
    }


def grid_points(model: str) -> list[dict]:
    """The grid's points as flag values (see the module docstring), the most asked-for first: every method's LoRA
    with checkpointing, SRPO's sizes, then checkpointing off, then the full fine-tunes."""
    resolution = DEFAULTS[model].resolution

    def point(method, rank=32, checkpointing=1, size=resolution, batch=1):
        return {"method": method, "lora_rank": rank, "checkpointing": checkpointing, "resolution": size, "batch_size": batch}

    points = [point(method) for method in GRID_METHODS]
    points += [point("srpo", size=size, batch=batch) for size in (512, 720, 1024) for batch in (1, 2) if (size, batch) != (resolution, 1)]
    points += [point(method, checkpointing=0) for method in GRID_METHODS]
    points += [point(method, rank=0, checkpointing=checkpointing) for checkpointing in (1, 0) for method in GRID_METHODS]
    return points


def markdown_table(results: list[dict]) -> str:
    cards = " | ".join(f"{size} GB" for size in CARD_USABLE_GIB)
    lines = [
        "| method | train | ckpt | px | batch | peak GiB | frozen | training state | VAE + reward | activations | "
        f"TFLOP rollout | TFLOP gradient | floor s | {cards} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---|" * len(CARD_USABLE_GIB),
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {_train(r)} | {_on(r)} | {r['resolution']} | {r['batch_size']} | failed: {r['error']} |")
            continue
        split = r["peak_split_gib"]
        fits = " | ".join("yes" if r["fits_gb"][str(size)] else "no" for size in CARD_USABLE_GIB)
        lines.append(
            f"| {r['method']} | {_train(r)} | {_on(r)} | {r['resolution']} | {r['batch_size']} | {r['peak_gib']:.1f} | "
            f"{split['frozen_weights']:.1f} | {split['training_state']:.1f} | {split['vae_and_reward']:.1f} | "
            f"{split['activations']:.1f} | {r['flops_rollout'] / 1e12:.0f} | {r['flops_gradient'] / 1e12:.0f} | "
            f"{r['flop_floor_s']:.1f} | {fits} |"
        )
    return "\n".join(lines)


def _train(result: dict) -> str:
    return f"LoRA {result['lora_rank']}" if result["lora_rank"] else "full"


def _on(result: dict) -> str:
    return "on" if result["checkpointing"] else "off"


def run_grid(args) -> int:
    """Each point in a fresh process; the JSON and the table are rewritten after every point, so that a grid stopped
    early keeps the points it finished."""
    results = []
    table_path = os.path.splitext(args.json)[0] + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    header = (
        f"One simulated update of {args.model} (bf16 weights, bf16 autocast, reward in {args.reward_dtype}); fits: peak "
        f"under the card's usable GiB ({CARD_USABLE_GIB}); floor: the FLOPs at {H200_MEASURED_FLOPS / 1e12:.0f} TFLOP/s."
    )
    for point in grid_points(args.model):
        command = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--reward-dtype", args.reward_dtype]
        for key, value in point.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            proc = subprocess.run([*command, "--json", out.name], capture_output=True, text=True)
            if proc.returncode == 0:
                with open(out.name) as f:
                    results.append(json.load(f))
            else:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({**point, "error": last[-200:]})
        done = results[-1]
        summary = done.get("error") or f"peak {done['peak_gib']:.1f} GiB, {done['flops'] / 1e12:.0f} TFLOP, {done['wall_s']:.0f} s"
        print(f"{point}: {summary}", file=sys.stderr, flush=True)
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "reward_dtype": args.reward_dtype, "results": results}, f, indent=2)
        with open(table_path, "w") as f:
            f.write(header + "\n\n" + markdown_table(results) + "\n")
    print(header)
    print(markdown_table(results))
    print(f"wrote {args.json} and {table_path}")
    return 1 if any("error" in r for r in results) else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux.1-dev", choices=MODEL_NAMES)
    parser.add_argument("--method", choices=list(METHOD_VARIANTS), help="One point of this method; without it, the grid.")
    parser.add_argument("--resolution", type=int, help="Image height and width (default: the model's, 720 for FLUX.1-dev).")
    parser.add_argument("--batch-size", type=int, default=1, help="Prompts per update.")
    parser.add_argument("--rollout-steps", type=int, help="Rollout steps (default: the model's, 25 for FLUX.1-dev).")
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the model's, 512 for FLUX.1-dev).")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank; 0 trains the full transformer (AdamW, fp32 master weights).")
    parser.add_argument("--checkpointing", type=int, choices=(0, 1), default=1, help="Activation checkpointing of the transformer and the VAE.")
    parser.add_argument("--reward-dtype", choices=list(DTYPES), default="float32", help="Reward weights (diffusers-srpo train loads float32).")
    parser.add_argument("--json", default=None, help="Where the JSON goes (grid default: benchmarks/results/bench_scale.json).")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.model]
    args.resolution = args.resolution or defaults.resolution
    args.rollout_steps = args.rollout_steps or defaults.rollout_steps
    args.max_sequence_length = args.max_sequence_length or defaults.max_sequence_length
    for name in ("batch_size", "rollout_steps", "resolution", "max_sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be 0 (full fine-tune) or positive, got {args.lora_rank}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.method is None:
        args.json = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_scale.json")
        return run_grid(args)
    try:
        result = simulate_point(args)
    except ValueError as error:  # a setting the trainer refuses, e.g. a resolution that is not a multiple of 16
        print(f"bench_scale: {error}", file=sys.stderr)
        return 2
    print(
        f"{args.model} {args.method} {_train(result)} checkpointing {_on(result)} {args.resolution}px batch "
        f"{args.batch_size}: {result['params'] / 1e9:.2f}B params, peak {result['peak_gib']:.2f} GiB (simulated), "
        f"{result['flops'] / 1e12:.1f} TFLOP ({result['flops_rollout'] / 1e12:.1f} rollout), {result['wall_s']:.0f} s"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
