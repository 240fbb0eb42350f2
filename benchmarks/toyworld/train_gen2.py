"""Train the toy world's second-generation generator in stages, over as many sittings as needed.

Each command is one sitting; ``--resume`` continues a stage exactly where its checkpoint left it (the same bytes
as a run that was never interrupted, on the same machine and thread count). One thread (``--threads 1``) is
faster than two on a busy 2-core machine.

    RUN=benchmarks/results/toyworld-gen2
    python benchmarks/toyworld/train_gen2.py --run-dir $RUN vae --stage-minutes 15          # first sitting
    python benchmarks/toyworld/train_gen2.py --run-dir $RUN vae --stage-minutes 15 --resume # more VAE
    python benchmarks/toyworld/train_gen2.py --run-dir $RUN freeze-vae                      # VAE -> flow/vae.pt
    python benchmarks/toyworld/train_gen2.py --run-dir $RUN flow --stage-minutes 100 --eval-every 1000 [--resume]
    python benchmarks/toyworld/train_gen2.py --run-dir $RUN decay --start 30000 --steps 10000  # before the last sittings
    python benchmarks/toyworld/train_gen2.py --run-dir $RUN portable                        # flow/portable.pt (fp16)
    python benchmarks/toyworld/train_gen2.py --run-dir $RUN evaluate --samples 8 [--stock]
    python benchmarks/toyworld/train_gen2.py --run-dir $RUN export OUTPUT_DIR                # fp16 FluxPipeline

Every sitting and evaluation appends a row to ``$RUN/log.json``; see diffusers_srpo/toyworld/staged_training.py
for the run folder's layout and benchmarks/toyworld/RESULTS.md for the runs so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from diffusers_srpo.toyworld.generator import MAX_SEQUENCE_LENGTH, STOCK_MAX_SEQUENCE_LENGTH
from diffusers_srpo.toyworld.staged_training import (
    RunSettings,
    append_log,
    evaluate_generator,
    export_pipeline,
    flow_checkpoint_path,
    freeze_vae_for_flow,
    load_run_pipeline,
    start_run,
    train_stage,
    write_portable,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="benchmarks/results/toyworld-gen2", help="The run's folder.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a busy 2-core machine).")
    parser.add_argument("--seed", type=int, default=0, help="The run's seed (a new run only).")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in ("vae", "flow"):
        sub = commands.add_parser(stage, help=f"One sitting of the {stage} stage.")
        sub.add_argument("--steps", type=int, help="Updates in this sitting.")
        sub.add_argument("--stage-minutes", type=float, help="Stop after this many minutes (at a step boundary).")
        sub.add_argument("--resume", action="store_true", help="Continue from the stage's checkpoint.")
        sub.add_argument("--checkpoint-minutes", type=float, default=5.0, help="Checkpoint interval.")
        sub.add_argument("--log-every", type=int, default=100)
        if stage == "flow":
            sub.add_argument("--eval-every", type=int, default=1000, help="Evaluate every N steps (0: at the end).")
            sub.add_argument("--eval-samples", type=int, default=4, help="Images per prompt in the evaluation.")
    commands.add_parser("freeze-vae", help="Freeze the VAE stage's checkpoint for the flow stage.")
    decay = commands.add_parser("decay", help="Schedule the flow stage's cosine decay (run.json).")
    decay.add_argument("--start", type=int, required=True)
    decay.add_argument("--steps", type=int, required=True)
    retime = commands.add_parser(
        "retime", help="Shift the flow stage's training times towards the noise end from a step on (run.json)."
    )
    retime.add_argument("--start", type=int, required=True, help="First step with the shifted times.")
    retime.add_argument("--shift", type=float, required=True, help="t -> shift t / (1 + (shift - 1) t); 1: none.")
    portable = commands.add_parser(
        "portable", help="Write flow/portable.pt (no optimizer state) from the flow checkpoint."
    )
    portable.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float16",
        help="Weights' dtype (float16: what the exported pipeline stores, so an export from it is the same bytes).",
    )
    evaluate = commands.add_parser("evaluate", help="Evaluate the current flow checkpoint.")
    evaluate.add_argument("--samples", type=int, default=8)
    evaluate.add_argument("--sampling-steps", type=int, default=20)
    evaluate.add_argument(
        "--noise-seed", type=int, default=1, help="The evaluation noises (1: the fixed set of the in-training ones)."
    )
    evaluate.add_argument("--stock", action="store_true", help="Also at FluxPipeline's max_sequence_length=512.")
    evaluate.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="The moving average, or the training weights."
    )
    export = commands.add_parser("export", help="Save the current pipeline as an fp16 FluxPipeline folder.")
    export.add_argument("output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir = args.run_dir

    if args.command in ("vae", "flow"):
        checkpoint = os.path.join(run_dir, args.command, "checkpoint.pt")
        has_checkpoint = os.path.exists(checkpoint) or os.path.exists(
            os.path.join(run_dir, args.command, "portable.pt")
        )
        if has_checkpoint and not args.resume:
            parser.error(f"{run_dir}/{args.command} has a checkpoint: pass --resume to continue it")
        if args.resume and not has_checkpoint:
            parser.error(f"--resume: no checkpoint in {run_dir}/{args.command}")
        if args.steps is None and args.stage_minutes is None:
            parser.error("give --steps or --stage-minutes")
        if not os.path.exists(os.path.join(run_dir, "run.json")):
            start_run(run_dir, RunSettings(seed=args.seed))
        train_stage(
            run_dir,
            args.command,
            steps=args.steps,
            minutes=args.stage_minutes,
            checkpoint_minutes=args.checkpoint_minutes,
            eval_every=getattr(args, "eval_every", 0),
            eval_samples=getattr(args, "eval_samples", 4),
            log_every=args.log_every,
        )
    elif args.command == "freeze-vae":
        stats = freeze_vae_for_flow(run_dir, RunSettings.load(run_dir))
        print(json.dumps(stats))
    elif args.command == "decay":
        settings = RunSettings.load(run_dir)
        settings = dataclasses.replace(settings, flow_decay_start=args.start, flow_decay_steps=args.steps)
        settings.save(run_dir)
        print(f"flow learning rate: cosine decay over steps [{args.start}, {args.start + args.steps}]")
    elif args.command == "retime":
        settings = RunSettings.load(run_dir)
        last = settings.flow_time_shifts[-1][0] if settings.flow_time_shifts else 0
        if args.shift <= 0 or args.start < last:
            parser.error(
                f"retime needs --shift > 0 and --start >= {last} (the last change); got {args.shift}, {args.start}"
            )
        shifts = [pair for pair in settings.flow_time_shifts if pair[0] != args.start] + [[args.start, args.shift]]
        RunSettings.save(dataclasses.replace(settings, flow_time_shifts=shifts), run_dir)
        print(f"flow time shifts ([first step, shift]): {shifts}")
    elif args.command == "portable":
        path = write_portable(run_dir, dtype=getattr(torch, args.dtype))
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    elif args.command == "evaluate":
        settings = RunSettings.load(run_dir)
        pipe = load_run_pipeline(run_dir, weights=args.weights)
        step = torch.load(flow_checkpoint_path(run_dir), weights_only=True)["step"]
        lengths = [MAX_SEQUENCE_LENGTH] + ([STOCK_MAX_SEQUENCE_LENGTH] if args.stock else [])
        for length in lengths:
            started = time.perf_counter()
            result = evaluate_generator(
                pipe,
                settings.image_size,
                samples_per_prompt=args.samples,
                steps=args.sampling_steps,
                max_sequence_length=length,
                seed=args.noise_seed,
            )
            row = {"kind": "evaluation", "stage": "flow", "step": step, "weights": args.weights, **result}
            row["noise_seed"] = args.noise_seed
            row["seconds"] = round(time.perf_counter() - started, 1)
            append_log(run_dir, row)
            print(json.dumps(row, indent=2), flush=True)
    elif args.command == "export":
        size = export_pipeline(run_dir, args.output)
        print(f"wrote {args.output} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
