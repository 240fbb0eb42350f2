"""Per-update time and peak memory of the reward-gradient trainers, with the breakdown rollout / forwards with
gradient / decode / reward.

Runs a FLUX-shaped model sized for the machine (tens of millions of parameters on a CPU), gradient
checkpointing on and off, each method and configuration in a fresh process so that peak memory is its own.
Prints a table and writes JSON. Methods: srpo (default), direct-align, refl, draft-1, draft-full (the TailorPO
family samples outside ``sample_latents``, so this breakdown does not apply to it: see compare_methods.py).

    python benchmarks/bench_train_step.py                       # CPU defaults, SRPO
    python benchmarks/bench_train_step.py --methods direct-align draft-full --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_models  # noqa: E402

PARTS = ("rollout", "forward_with_grad", "decode", "reward", "backward_and_update")
#: Benchmark name -> (library method, config overrides): the reward-gradient methods of scale_models.
METHOD_VARIANTS = {name: scale_models.METHOD_VARIANTS[name] for name in ("srpo", "direct-align", "refl", "draft-1", "draft-full")}


def build_model_config(args):
    from diffusers_srpo.testing import TinyFluxConfig

    head_dim = args.head_dim
    rope = (head_dim // 8, 7 * head_dim // 16, head_dim - head_dim // 8 - 7 * head_dim // 16)
    return TinyFluxConfig(
        num_layers=args.double_blocks,
        num_single_layers=args.single_blocks,
        num_attention_heads=args.heads,
        attention_head_dim=head_dim,
        axes_dims_rope=rope,
        t5_dim=256,
        clip_dim=128,
        vae_block_out_channels=(32, 64, 64, 64),  # FLUX's 8x spatial compression
        vae_norm_num_groups=16,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(args) -> dict:
    from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline
    from diffusers_srpo.trainers import trainer_class_for

    torch.manual_seed(0)
    pipe = tiny_flux_pipeline(seed=0, config=build_model_config(args))
    out = tempfile.mkdtemp(prefix="bench-train-step-")
    method, overrides = METHOD_VARIANTS[args.method]
    trainer_class = trainer_class_for(method)
    config = trainer_class.config_class(
        method=method,
        **overrides,
        output_dir=out,
        max_train_steps=args.warmup + args.steps,
        resolution=args.resolution,
        rollout_steps=args.rollout_steps,
        max_sequence_length=32,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=bool(args.checkpointing),
        vae_gradient_checkpointing=bool(args.checkpointing),
        checkpointing_steps=0,
        validation_steps=0,
        lora_rank=16,
        lora_alpha=16.0,
    )
    trainer = trainer_class(pipe, reward=tiny_clip_reward(seed=0), prompts=["a red circle", "a blue square"], config=config)
    device = trainer.accelerator.device
    timings: dict[str, float] = defaultdict(float)
    step_times: list[float] = []

    @contextmanager
    def timed(part):
        _sync(device)
        start = time.perf_counter()
        yield
        _sync(device)
        timings[part] += time.perf_counter() - start

    def wrap(owner, name, part, only_with_grad=False):
        original = getattr(owner, name)

        def timed_call(*a, **k):
            if only_with_grad and not torch.is_grad_enabled():
                return original(*a, **k)
            with timed(part):
                return original(*a, **k)

        setattr(owner, name, timed_call)

    wrap(trainer, "sample_latents", "rollout")
    wrap(trainer.adapter, "predict_velocity", "forward_with_grad", only_with_grad=True)
    wrap(trainer.adapter, "decode_vae_input", "decode")
    wrap(trainer.reward, "forward", "reward")

    per_step: list[dict[str, float]] = []
    step_start = [0.0]

    def on_log(values, step=None, **kwargs):
        _sync(device)
        now = time.perf_counter()
        step_times.append(now - step_start[0])
        per_step.append(dict(timings))
        timings.clear()
        step_start[0] = time.perf_counter()

    trainer.accelerator.log = on_log
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_start[0] = time.perf_counter()
    trainer.train()

    measured = slice(args.warmup, None)
    steps = per_step[measured]
    totals = step_times[measured]
    result = {
        "method": args.method,
        "checkpointing": args.checkpointing,
        "step_s_median": sorted(totals)[len(totals) // 2],
        "parts_s_mean": {},
        "transformer_params_m": sum(p.numel() for p in pipe.transformer.parameters()) / 1e6,
        "trainable_params_m": sum(p.numel() for p in trainer.trainable_parameters) / 1e6,
        "device": str(device),
    }
    for part in PARTS[:-1]:
        result["parts_s_mean"][part] = sum(s.get(part, 0.0) for s in steps) / len(steps)
    result["parts_s_mean"]["backward_and_update"] = sum(totals) / len(totals) - sum(result["parts_s_mean"].values())
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rollout-steps", type=int, default=25)
    parser.add_argument("--steps", type=int, default=3, help="Measured updates per configuration.")
    parser.add_argument("--warmup", type=int, default=1, help="Updates run before measuring.")
    parser.add_argument("--double-blocks", type=int, default=2)
    parser.add_argument("--single-blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--methods", nargs="+", default=["srpo"], choices=list(METHOD_VARIANTS))
    parser.add_argument("--method", choices=list(METHOD_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_train_step.json"))
    parser.add_argument("--checkpointing", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)))
        return 0

    results = []
    for method in args.methods:
        for checkpointing in (0, 1):
            cmd = [sys.executable, __file__, "--worker", "--method", method, "--checkpointing", str(checkpointing)]
            cmd += [a for a in (argv if argv is not None else sys.argv[1:])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
            results.append(json.loads(line[len("RESULT ") :]))

    first = results[0]
    print(
        f"One update on a FLUX-shaped transformer of {first['transformer_params_m']:.1f}M parameters "
        f"(LoRA {first['trainable_params_m']:.2f}M trainable), {args.resolution}x{args.resolution}, "
        f"{args.rollout_steps} rollout steps, device {first['device']} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)"
    )
    header = f"{'method':>12} | {'checkpointing':>13} | {'update s':>8} | " + " | ".join(f"{p:>19}" for p in PARTS) + " | peak MiB"
    print(header)
    print("-" * len(header))
    for r in results:
        parts = " | ".join(f"{r['parts_s_mean'][p]:>19.3f}" for p in PARTS)
        on = "on" if r["checkpointing"] else "off"
        print(f"{r['method']:>12} | {on:>13} | {r['step_s_median']:>8.3f} | {parts} | {r['peak_memory_mib']:>8.0f}")
    by_method = {(r["method"], r["checkpointing"]): r["step_s_median"] for r in results}
    for checkpointing in (0, 1):
        if ("draft-full", checkpointing) in by_method and ("direct-align", checkpointing) in by_method:
            ratio = by_method["draft-full", checkpointing] / by_method["direct-align", checkpointing]
            print(f"draft-full / direct-align per-update time, checkpointing {'on' if checkpointing else 'off'}: {ratio:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "checkpointing", "method")}, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
