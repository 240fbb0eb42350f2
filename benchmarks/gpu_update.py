"""Measured time, memory and MFU of one training update of a FLUX-shaped model with random weights, on one GPU.

The counterpart of ``bench_scale.py``, which simulates the same update on a CPU: the same model names
(``scale_models.py``), the same flags, the same trainer settings and prompts. This runs the project's own trainer
(``trainer.train(on_update=...)``) for ``--warmup`` + ``--steps`` updates and times each measured update with
``time.perf_counter()`` after ``torch.cuda.synchronize()``; the peak memory is ``torch.cuda.max_memory_allocated``
over the measured updates (the stats are reset after the warm-up). With ``--simulated`` (bench_scale's JSON of
the same point) it adds the achieved TFLOP/s and the MFU (simulated FLOPs of one update / seconds / peak rate,
against the H100/H200 dense bf16 spec and against the bf16 matrix rate measured on an H200 here) and the measured
peak against the simulated one.

    python benchmarks/gpu_update.py --model flux.1-dev --method srpo --resolution 720 --warmup 1 --steps 3 \\
        --simulated bench_scale.json --json gpu_update.json
    python benchmarks/gpu_update.py --model tiny --warmup 1 --steps 1 --json /tmp/u.json    # CPU, seconds

The models are built with random weights in bf16 inside ``with torch.device("cuda")`` (the 11.9B transformer is
initialised on the GPU, never on the CPU); without CUDA only the small models run, and the CUDA-only numbers
(``max_memory_allocated``) are ``null``. The JSON is rewritten after every update (``complete`` says whether all
updates ran), so that a run stopped by a time limit still leaves the updates it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_models  # noqa: E402
from scale_models import (  # noqa: E402
    DEFAULTS,
    DTYPES,
    METHOD_VARIANTS,
    MODEL_NAMES,
    PROMPTS,
    REAL_SIZE_BUILDERS,
    build_pipeline,
    build_reward,
)

GIB = 2**30
#: Dense bf16 tensor-core rate of an H100 / H200 SXM (the spec sheet, without sparsity).
SPEC_BF16_FLOPS = 989e12
#: bf16 matrix rate an 8192^3 product reached on an H200 here (the device notes).
MEASURED_BF16_FLOPS = 790e12
PEAKS = {"spec_989e12": SPEC_BF16_FLOPS, "measured_790e12": MEASURED_BF16_FLOPS}
#: Fields of bench_scale's JSON that name the point; a simulated file of another point is flagged.
POINT_FIELDS = (
    "model",
    "method",
    "resolution",
    "batch_size",
    "rollout_steps",
    "max_sequence_length",
    "lora_rank",
    "checkpointing",
    "quantize",
    "use_8bit_adam",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux.1-dev", choices=MODEL_NAMES)
    parser.add_argument("--method", default="srpo", choices=list(METHOD_VARIANTS))
    parser.add_argument(
        "--resolution", type=int, help="Image height and width (default: the model's, 720 for FLUX.1-dev)."
    )
    parser.add_argument("--batch-size", type=int, default=1, help="Prompts per update.")
    parser.add_argument("--rollout-steps", type=int, help="Rollout steps (default: the model's, 25 for FLUX.1-dev).")
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the model's, 512 for FLUX.1-dev).")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank; 0 trains the full transformer.")
    parser.add_argument(
        "--checkpointing",
        type=int,
        choices=(0, 1),
        default=1,
        help="Activation checkpointing of the transformer and the VAE.",
    )
    parser.add_argument(
        "--reward-dtype",
        choices=list(DTYPES),
        default="float32",
        help="Reward weights (diffusers-srpo train loads float32).",
    )
    scale_models.add_memory_arguments(parser)
    parser.add_argument("--warmup", type=int, default=1, help="Updates run before measuring.")
    parser.add_argument("--steps", type=int, default=3, help="Measured updates.")
    parser.add_argument("--simulated", help="bench_scale.py's JSON of the same point: MFU and the simulated peak.")
    parser.add_argument("--json", default="gpu_update.json", help="Where the JSON goes.")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.model]
    args.resolution = args.resolution or defaults.resolution
    args.rollout_steps = args.rollout_steps or defaults.rollout_steps
    args.max_sequence_length = args.max_sequence_length or defaults.max_sequence_length
    for name in ("batch_size", "rollout_steps", "resolution", "max_sequence_length", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be 0 (full fine-tune) or positive, got {args.lora_rank}")
    return args


def trainer_config(args, output_dir: str):
    """bench_scale.py's settings of the point, for ``--warmup + --steps`` updates on the real device."""
    return scale_models.trainer_config(args, output_dir, max_train_steps=args.warmup + args.steps)


def read_simulated(path: str | None, args) -> dict | None:
    """The simulated numbers of ``path`` and whether they are of this point; ``None`` without a path."""
    if not path:
        return None
    with open(path, encoding="utf-8") as file:
        simulated = json.load(file)
    wanted = {"model": args.model, "method": args.method, "resolution": args.resolution, "batch_size": args.batch_size,
              "rollout_steps": args.rollout_steps, "max_sequence_length": args.max_sequence_length,
              "lora_rank": args.lora_rank, "checkpointing": bool(args.checkpointing), "quantize": args.quantize,
              "use_8bit_adam": args.use_8bit_adam}  # fmt: skip
    mismatches = [
        f"{key}: simulated {simulated[key]!r}, measured {wanted[key]!r}"
        for key in POINT_FIELDS
        if key in simulated and simulated[key] != wanted[key]
    ]
    return {
        "path": os.path.abspath(path),
        "params": simulated["params"],
        "peak_gib": simulated["peak_gib"],
        "flops": simulated["flops"],
        "flops_rollout": simulated.get("flops_rollout"),
        "flops_gradient": simulated.get("flops_gradient"),
        "same_point": not mismatches,
        "mismatches": mismatches,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def derived_numbers(result: dict) -> dict:
    """Achieved TFLOP/s, MFU and the peak comparison from the measured seconds and the simulated numbers."""
    simulated, seconds = result["simulated"], result["update_s_median"]
    out = {
        "achieved_tflops": None,
        "mfu": None,
        "peak_measured_over_simulated": None,
        "peak_measured_minus_simulated_gib": None,
    }
    if simulated is None:
        out["note"] = "no --simulated JSON: no MFU and no simulated peak to compare with"
        return out
    if _finite_positive(seconds) and _finite_positive(simulated["flops"]):
        achieved = simulated["flops"] / seconds
        out["achieved_tflops"] = achieved / 1e12
        out["mfu"] = {name: achieved / peak for name, peak in PEAKS.items()}
    measured = result["max_memory_allocated_gib"]
    if measured is not None and _finite_positive(simulated["peak_gib"]):
        out["peak_measured_over_simulated"] = measured / simulated["peak_gib"]
        out["peak_measured_minus_simulated_gib"] = measured - simulated["peak_gib"]
    return out


def write_json(path: str, result: dict) -> None:
    """Write ``result`` whole or not at all (a kill mid-write leaves the previous version)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)
    os.replace(partial, path)


def run(args) -> dict:
    from diffusers_srpo.simulation import base_parameter_count
    from diffusers_srpo.trainers import trainer_class_for

    cuda = torch.cuda.is_available()
    if args.model in REAL_SIZE_BUILDERS and not cuda:
        raise SystemExit(f"gpu_update: {args.model} at its real size needs a CUDA device; use --model tiny or flux-37m on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    simulated = read_simulated(args.simulated, args)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "measured": True,
        "complete": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        **scale_models.point_fields(args),
        "mixed_precision": "bf16",
        "weight_dtype": "bfloat16" if args.quantize == "none" else f"{args.quantize} (compute in bfloat16)",
        "warmup": args.warmup,
        "steps": args.steps,
        "simulated": simulated,
    }

    output_dir = tempfile.mkdtemp(prefix="gpu-update-")
    try:
        config = trainer_config(args, os.path.join(output_dir, "run"))  # checked before anything is built
        started = time.perf_counter()
        with torch.device(device):  # random init on the GPU, in bf16: the 12B model never exists on the CPU
            # --quantize: built in bf16, then each linear layer quantized in place on the GPU, as from_pretrained
            # with the quantization config does while loading; the update's peak is measured after the warm-up.
            pipe = build_pipeline(args.model, dtype=torch.bfloat16, quantize=args.quantize)
            reward = build_reward(args.model, dtype=DTYPES[args.reward_dtype])
        trainer = trainer_class_for(config.method)(pipe, reward=reward, prompts=PROMPTS, config=config)
        _sync(device)
        result["build_s"] = time.perf_counter() - started
        # Without the LoRA, as bench_scale counts; NF4's packed weights counted unpacked.
        result["params"] = base_parameter_count(pipe.transformer)
        result["trainable_params"] = sum(p.numel() for p in trainer.trainable_parameters)
        if cuda:
            result["memory_after_build_gib"] = torch.cuda.memory_allocated(device) / GIB

        warmup_s: list[float] = []
        update_s: list[float] = []
        last_logs: dict[str, float] = {}
        # An update's time runs from the end of the previous callback (this bookkeeping is not counted) to its own.
        since = [0.0]

        def on_update(trainer, logs):
            _sync(device)
            seconds = time.perf_counter() - since[0]
            done = len(warmup_s) + len(update_s) + 1
            (warmup_s if done <= args.warmup else update_s).append(seconds)
            last_logs.update({k: float(v) for k, v in logs.items()})
            summarise(result, warmup_s, update_s, last_logs, device)
            write_json(args.json, result)
            kind = "warm-up" if done <= args.warmup else "measured"
            print(f"update {done} of {args.warmup + args.steps}: {seconds:.3f} s ({kind})", flush=True)
            if cuda and done == args.warmup:
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            since[0] = time.perf_counter()

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)  # with --warmup 0 the measured peak starts here
        since[0] = time.perf_counter()
        trainer.train(on_update=on_update)
        result["complete"] = len(update_s) == args.steps
        summarise(result, warmup_s, update_s, last_logs, device, read_memory=False)
        return result
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def summarise(
    result: dict,
    warmup_s: list[float],
    update_s: list[float],
    logs: dict,
    device: torch.device,
    read_memory: bool = True,
) -> None:
    """Fill in the measured and derived numbers of the updates so far; the memory numbers are read only when
    ``read_memory`` (right after an update: the final outputs written after the last one do not count)."""
    result["warmup_s"] = list(warmup_s)  # the first includes encoding the prompts and first-call setup
    result["update_s"] = list(update_s)
    result["measured_updates"] = len(update_s)
    result["update_s_median"] = statistics.median(update_s) if update_s else None
    if not read_memory:
        pass
    elif device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB if update_s else None
        result["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB if update_s else None
        result["memory_note"] = "max_memory_allocated over the measured updates (peak stats reset after the warm-up)"
    else:
        result["max_memory_allocated_gib"] = None
        result["max_memory_reserved_gib"] = None
        result["memory_note"] = "no CUDA device: max_memory_allocated absent (peak_rss_gib is the process's peak RSS)"
    if read_memory:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux
    result["last_logs"] = {k: v for k, v in logs.items() if k in ("loss", "reward", "grad_norm", "skipped_updates")}
    result.update(derived_numbers(result))


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    write_json(args.json, result)
    mfu = result["mfu"]
    line = (
        f"{result['model']} {result['method']} {result['resolution']}px on {result['device']}: "
        f"{result['params']:,} transformer parameters, median {result['update_s_median']:.3f} s per update "
        f"(each {', '.join(f'{s:.3f}' for s in result['update_s'])})"
    )
    if result["max_memory_allocated_gib"] is not None:
        line += f", peak {result['max_memory_allocated_gib']:.2f} GiB"
    if result["simulated"] is not None:
        line += f" (simulated {result['simulated']['peak_gib']:.2f} GiB)"
    if mfu is not None:
        line += f", {result['achieved_tflops']:.1f} TFLOP/s, MFU {100 * mfu['spec_989e12']:.1f} % of 989 and {100 * mfu['measured_790e12']:.1f} % of 790 TFLOP/s"
    print(line)
    print(f"wrote {args.json}")
    if not result["complete"]:
        print(f"gpu_update: only {result['measured_updates']} of {args.steps} measured updates ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
