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

Sharded over several GPUs (FSDP2, the trainer's ``fsdp=True``): ``--fsdp-processes N`` simulates the update of one
of N processes (rank 0 of a fake process group: ``diffusers_srpo.simulation.simulated_process_group``), and the
peak is **per GPU**: the local shards of the transformer's weights, gradients and AdamW state, plus FSDP's buffers
(``fsdp_buffers`` in the split: a block's unsharded parameters while it runs, all-gather and reduce-scatter
buffers); the VAE and the reward are whole on every GPU. ``host_transformer_gib`` is the user's whole transformer,
which each process keeps in host memory under FSDP (fp32 in a full fine-tune).

    python benchmarks/bench_scale.py --model flux.1-dev --method srpo --lora-rank 0 --fsdp-processes 8 --json OUT.json
    python benchmarks/bench_scale.py --method srpo --lora-rank 0 --fsdp-processes 8 32 --json OUT.json  # a table
    python benchmarks/bench_scale.py --fsdp-processes 8 32     # SRPO full and LoRA on each: bench_scale_fsdp.json

On a small card (``--quantize nf4|int8|float8``, ``--use-8bit-adam``; LoRA only, not sharded): the frozen transformer's
linear layers are simulated in the backend's storage, byte for byte (``diffusers_srpo.simulation.simulated_quantization``:
bitsandbytes NF4 with double quantization, torchao int8 or float8 weight-only), and their forward and backward make the
backend's dequantized weights (``dequantized_weights`` in the split: a transient per layer for NF4, what autograd keeps
for the backward for torchao); the 8-bit AdamW is bitsandbytes' own, run on the fake gradients. ``peak_site`` says
where the update is at its peak and ``peak_activations_by_part_gib`` whose activations are alive there (the
transformer's, the VAE's, the reward's, the backward passes' gradients, the trainer's own).

    python benchmarks/bench_scale.py --method srpo --resolution 720 --quantize nf4 --use-8bit-adam --json OUT.json
    python benchmarks/bench_scale.py --quantized-grid          # 720 and 512 px, each format with and without 8-bit AdamW
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

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
#: How each ``--quantize`` format's frozen weights are simulated (the JSON's ``frozen_transformer``).
QUANTIZED_STORAGE = {
    "nf4": "bitsandbytes NF4 + double quantization, simulated storage (0.5 B/weight, uint8 absmax per 64, fp32 per "
    "16384, codes); dequantized to bf16 per layer in forward and backward",
    "int8": "torchao int8 weight-only, simulated storage (1 B/weight, fp32 scale and int8 zero point per row); the "
    "weight cast to bf16 per call, kept by autograd for the backward",
    "float8": "torchao float8 e4m3 weight-only, simulated storage (1 B/weight, fp32 scale per row); dequantized via "
    "fp32 to bf16 per call, kept by autograd for the backward",
}


#: The tracker's categories of FSDP's own buffers (``diffusers_srpo.simulation.LiveBytes``).
FSDP_BUFFER_CATEGORIES = ("unsharded weights", "fsdp comm buffers")


def fsdp_processes(args) -> int | None:
    """The number of processes the point's transformer is sharded over (``None``: not sharded)."""
    processes = getattr(args, "fsdp_processes", None)
    return processes[0] if processes else None


def trainer_config(args, output_dir: str):
    """The trainer settings of one point, on the CPU: the same simulated device wherever this runs."""
    return scale_models.trainer_config(args, output_dir, max_train_steps=1, cpu=True, fsdp=fsdp_processes(args) is not None)


def check_quantized(args) -> None:
    """Refuse, in one line, what the trainer refuses of a quantized transformer (it cannot tell a simulated one)."""
    if args.quantize == "none":
        return
    if not args.lora_rank:
        raise ValueError(f"--quantize {args.quantize}: a full fine-tune needs float weights; train a LoRA")
    if fsdp_processes(args):
        raise ValueError(f"--quantize {args.quantize}: a quantized transformer cannot be sharded (FSDP)")


def simulate_point(args) -> dict:
    """One update of one configuration, simulated; the JSON object described in the module docstring. Sharded
    (``--fsdp-processes N``): the update of rank 0 of N, in a fake process group."""
    from diffusers_srpo.simulation import (
        simulate_update,
        simulated_process_group,
        simulated_quantization,
        simulated_tensors,
        simulated_trainer,
    )
    from diffusers_srpo.trainers import trainer_class_for

    started = time.perf_counter()
    check_quantized(args)
    processes = fsdp_processes(args)
    group = simulated_process_group(processes) if processes else contextlib.nullcontext()
    with group, tempfile.TemporaryDirectory(prefix="bench-scale-") as output_dir, simulated_tensors(), warnings.catch_warnings():
        # What the trainer's train() silences under FSDP (FLUX's blocks return views); the update runs without it.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        config = trainer_config(args, output_dir)  # checked before anything is built
        pipe = build_pipeline(args.model, dtype=torch.bfloat16)
        if args.quantize != "none":  # where build_pipeline(quantize=...) quantizes a real model in place
            simulated_quantization(pipe.transformer, args.quantize, compute_dtype=torch.bfloat16)
        reward = build_reward(args.model, dtype=DTYPES[args.reward_dtype])
        trainer = simulated_trainer(trainer_class_for(config.method), pipe, reward=reward, prompts=PROMPTS, config=config)
        cost = simulate_update(trainer)
        # Under FSDP the user's transformer stays whole where it was, in host memory, in every process.
        host_bytes = sum(t.numel() * t.element_size() for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()])
    peak_gib = cost.peak_bytes / GIB
    split = {
        "frozen_weights": cost.frozen_weight_bytes / GIB,
        "training_state": cost.training_state_bytes / GIB,
        "vae_and_reward": cost.vae_and_reward_bytes / GIB,
        "activations": cost.activation_bytes / GIB,
    }
    if args.quantize != "none":
        split["dequantized_weights"] = cost.dequantized_weight_bytes / GIB
    sharded = {}
    if processes:
        split["fsdp_buffers"] = sum(cost.peak_by_category.get(key, 0) for key in FSDP_BUFFER_CATEGORIES) / GIB
        sharded = {"fsdp_processes": processes, "per_gpu": True, "host_transformer_gib": host_bytes / GIB}
    return {
        "simulated": True,
        **scale_models.point_fields(args),
        **sharded,
        "params": cost.transformer_params,
        "trainable_params": cost.trainable_params,
        "peak_gib": peak_gib,
        "peak_split_gib": split,
        "peak_by_category_gib": {key: value / GIB for key, value in cost.peak_by_category.items()},
        "peak_site": cost.peak_site,
        "peak_activations_by_part_gib": {key: value / GIB for key, value in cost.peak_activations_by_part.items()},
        "frozen_transformer": QUANTIZED_STORAGE.get(args.quantize, "bfloat16"),
        "optimizer": "bitsandbytes AdamW8bit (its own code, fake tensors)" if args.use_8bit_adam else "torch AdamW",
        "flops": cost.flops,
        "flops_rollout": cost.sampling_flops,
        "flops_gradient": cost.gradient_flops,
        "flop_floor_s": cost.flops / H200_MEASURED_FLOPS,
        "fits_gb": {str(size): peak_gib <= usable for size, usable in CARD_USABLE_GIB.items()},
        "wall_s": time.perf_counter() - started,
        "torch": torch.__version__,
    }


def quantized_points(model: str) -> list[dict]:
    """The small-card grid: SRPO's LoRA (rank 32, batch 1, checkpointing on) at the model's resolution and 512 px,
    with each frozen-weight format, each with and without 8-bit AdamW; and the reward in bf16 for NF4 with 8-bit
    AdamW."""
    sizes = dict.fromkeys((DEFAULTS[model].resolution, 512))

    def point(size, quantize, adam8, reward_dtype="float32"):
        return {
            "method": "srpo", "lora_rank": 32, "checkpointing": 1, "resolution": size, "batch_size": 1,
            "quantize": quantize, "use_8bit_adam": adam8, "reward_dtype": reward_dtype,
        }  # fmt: skip

    points = []
    for size in sizes:  # the smallest formats first: a grid stopped early has the 24 GB candidates
        points += [point(size, q, adam8) for q in ("nf4", "int8", "float8", "none") for adam8 in (True, False)]
        points.insert(len(points) - 7, point(size, "nf4", True, "bfloat16"))  # after NF4 with 8-bit AdamW
    return points


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


def fsdp_points(args) -> list[dict]:
    """Sharded points: with ``--method``, that point on each ``--fsdp-processes``; without, SRPO's full fine-tune and
    LoRA (rank 32) at the model's resolution, batch 1, checkpointing on, on each."""
    if args.method is not None:
        flags = {key: getattr(args, key) for key in ("method", "lora_rank", "checkpointing", "resolution", "batch_size", "rollout_steps", "max_sequence_length")}
        return [{**flags, "fsdp_processes": processes} for processes in args.fsdp_processes]
    resolution = DEFAULTS[args.model].resolution
    return [
        {"method": "srpo", "lora_rank": rank, "checkpointing": 1, "resolution": resolution, "batch_size": 1, "fsdp_processes": processes}
        for rank in (0, 32) for processes in args.fsdp_processes
    ]  # fmt: skip


def is_quantized(result: dict) -> bool:
    return result.get("quantize", "none") != "none" or bool(result.get("use_8bit_adam"))


def quantized_table(results: list[dict]) -> str:
    """The small-card results as a markdown table: a row per frozen-weight format, optimizer, reward dtype and size;
    the peak, its split (LoRA + gradients + optimizer state is ``training state``; dequantized weights are
    activations too, shown apart) and where the update is at the peak."""
    lines = [
        "| method | quantize | 8-bit AdamW | reward | px | peak GiB | frozen weights | LoRA + grads + optimizer | "
        "VAE + reward | activations | of which dequantized weights | 24 GB | at the peak |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        head = (
            f"| {r['method']} | {r.get('quantize', 'none')} | {'yes' if r.get('use_8bit_adam') else 'no'} | "
            f"{DTYPE_NAMES.get(r.get('reward_dtype'), r.get('reward_dtype'))} | {r['resolution']} |"
        )
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} |")
            continue
        split = r["peak_split_gib"]
        dequantized = split.get("dequantized_weights", 0.0)
        lines.append(
            f"{head} {r['peak_gib']:.2f} | {split['frozen_weights']:.2f} | {split['training_state']:.2f} | "
            f"{split['vae_and_reward']:.2f} | {split['activations'] + dequantized:.2f} | {dequantized:.2f} | "
            f"{'yes' if r['fits_gb']['24'] else 'no'} | {short_site(r.get('peak_site', ''))}{parts_of(r)} |"
        )
    return "\n".join(lines)


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def parts_of(result: dict) -> str:
    """The activations at the peak by the part that made them, largest first (those of at least 0.05 GiB)."""
    parts = sorted(result.get("peak_activations_by_part_gib", {}).items(), key=lambda item: -item[1])
    listed = ", ".join(f"{part} {size:.2f}" for part, size in parts if size >= 0.05)
    return f"; activations: {listed}" if listed else ""


def short_site(site: str) -> str:
    """``peak_site`` for a table: classes and functions without their modules' paths."""
    return re.sub(r"\b[a-z_]\w*(?:\.[a-z_]\w*)*\.(?=[A-Z])", "", site)


def markdown_table(results: list[dict]) -> str:
    """The results as a markdown table; with sharded points, two more columns: the GPUs (processes) and FSDP's
    buffers, and the peak and its split are per GPU. With a quantized base or 8-bit AdamW: :func:`quantized_table`."""
    if any(is_quantized(r) for r in results):
        return quantized_table(results)
    sharded = any(r.get("fsdp_processes") for r in results)
    cards = " | ".join(f"{size} GB" for size in CARD_USABLE_GIB)
    lines = [
        f"| method | train | {'GPUs | ' if sharded else ''}ckpt | px | batch | peak GiB | frozen | training state | "
        f"VAE + reward | activations | {'FSDP buffers | ' if sharded else ''}TFLOP rollout | TFLOP gradient | floor s | {cards} |",
        f"|---|---|{'---:|' if sharded else ''}---|---:|---:|---:|---:|---:|---:|---:|{'---:|' if sharded else ''}---:|---:|---:|"
        + "---|" * len(CARD_USABLE_GIB),
    ]
    for r in results:
        gpus = f"{r.get('fsdp_processes') or 1} | " if sharded else ""
        if "error" in r:
            lines.append(f"| {r['method']} | {_train(r)} | {gpus}{_on(r)} | {r['resolution']} | {r['batch_size']} | failed: {r['error']} |")
            continue
        split = r["peak_split_gib"]
        buffers = f"{split.get('fsdp_buffers', 0.0):.1f} | " if sharded else ""
        fits = " | ".join("yes" if r["fits_gb"][str(size)] else "no" for size in CARD_USABLE_GIB)
        lines.append(
            f"| {r['method']} | {_train(r)} | {gpus}{_on(r)} | {r['resolution']} | {r['batch_size']} | {r['peak_gib']:.1f} | "
            f"{split['frozen_weights']:.1f} | {split['training_state']:.1f} | {split['vae_and_reward']:.1f} | "
            f"{split['activations']:.1f} | {buffers}{r['flops_rollout'] / 1e12:.0f} | {r['flops_gradient'] / 1e12:.0f} | "
            f"{r['flop_floor_s']:.1f} | {fits} |"
        )
    return "\n".join(lines)


def _train(result: dict) -> str:
    return f"LoRA {result['lora_rank']}" if result["lora_rank"] else "full"


def _on(result: dict) -> str:
    return "on" if result["checkpointing"] else "off"


def run_grid(args, points: list[dict]) -> int:
    """Each point in a fresh process; the JSON and the table are rewritten after every point, so that a grid stopped
    early keeps the points it finished."""
    results = []
    table_path = os.path.splitext(args.json)[0] + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    header = (
        f"One simulated update of {args.model} (bf16 weights, bf16 autocast, reward in {args.reward_dtype}); fits: peak "
        f"under the card's usable GiB ({CARD_USABLE_GIB}); floor: the FLOPs at {H200_MEASURED_FLOPS / 1e12:.0f} TFLOP/s."
    )
    if any(is_quantized(point) for point in points):
        header = (
            f"One simulated update of {args.model} (bf16 autocast), with the frozen transformer quantized (simulated "
            "storage of the backend's format, its dequantization in forward and backward) or bf16, and torch's or "
            "bitsandbytes' 8-bit AdamW; reward in the row's dtype; 24 GB: peak under "
            f"{CARD_USABLE_GIB[24]} GiB. Activations include the dequantized weights, also shown apart."
        )
    if any(point.get("fsdp_processes") for point in points):
        header += (
            " GPUs: the transformer sharded over that many (FSDP2, rank 0 of a fake process group); peak and split per "
            "GPU; FSDP buffers: unsharded parameters of the running blocks, all-gather and reduce-scatter buffers."
        )
    for point in points:
        command = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--reward-dtype", args.reward_dtype]
        for key, value in point.items():
            if value is True or value is False:  # a switch
                command += [f"--{key.replace('_', '-')}"] if value else []
            else:
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
    scale_models.add_memory_arguments(parser)
    parser.add_argument(
        "--quantized-grid", action="store_true",
        help="The small-card grid: SRPO LoRA at the model's resolution and 512 px, each --quantize with and without "
        "--use-8bit-adam, and NF4 + 8-bit AdamW with the reward in bf16 (default JSON: results/quantized/).",
    )  # fmt: skip
    parser.add_argument(
        "--fsdp-processes", type=int, nargs="+", metavar="N",
        help="Shard the transformer over N processes (FSDP2) and report one GPU's memory (rank 0 of a fake process "
        "group); several N: one point each, a table. Without --method: SRPO full and LoRA on each N.",
    )  # fmt: skip
    parser.add_argument(
        "--json", default=None,
        help="Where the JSON goes (grid default: benchmarks/results/bench_scale.json; sharded: bench_scale_fsdp.json).",
    )  # fmt: skip
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
    for processes in args.fsdp_processes or ():
        if processes < 2:
            parser.error(f"--fsdp-processes shards over at least 2 processes, got {processes}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.quantized_grid:
        args.json = args.json or os.path.join(results, "quantized", "bench_scale_quantized.json")
        return run_grid(args, quantized_points(args.model))
    if args.fsdp_processes and (args.method is None or len(args.fsdp_processes) > 1):
        args.json = args.json or os.path.join(results, "bench_scale_fsdp.json")
        return run_grid(args, fsdp_points(args))
    if args.method is None:
        args.json = args.json or os.path.join(results, "bench_scale.json")
        return run_grid(args, grid_points(args.model))
    try:
        result = simulate_point(args)
    except ValueError as error:  # a setting the trainer refuses, e.g. a resolution that is not a multiple of 16
        print(f"bench_scale: {error}", file=sys.stderr)
        return 2
    sharded = f" FSDP over {result['fsdp_processes']} GPUs" if result.get("fsdp_processes") else ""
    small_card = f" {args.quantize} base" if args.quantize != "none" else ""
    small_card += " 8-bit AdamW" if args.use_8bit_adam else ""
    print(
        f"{args.model} {args.method} {_train(result)}{sharded}{small_card} checkpointing {_on(result)} {args.resolution}px "
        f"batch {args.batch_size}: {result['params'] / 1e9:.2f}B params, peak {result['peak_gib']:.2f} GiB"
        f"{' per GPU' if sharded else ''} (simulated), "
        f"{result['flops'] / 1e12:.1f} TFLOP ({result['flops_rollout'] / 1e12:.1f} rollout), {result['wall_s']:.0f} s"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
