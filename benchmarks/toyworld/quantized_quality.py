"""The quality cost of a quantized frozen base, on the toy world: the demo trained on int8 / float8 / nf4 bases.

    python benchmarks/toyworld/quantized_quality.py

Runs the demo (``diffusers_srpo.toyworld.demo.run_demo`` with its default settings: ``demo_config``'s updates,
learning rate and prompts per update, "bright" over "dark", ``EVALUATION_SEEDS`` fixed noises per content prompt)
for training seeds 0, 1, 2 on each variant of the frozen base, every
run in its own process on one torch thread (deterministic on one machine). Variants:

- ``none``: the full-precision (fp32) base, the reference;
- ``int8`` / ``float8``: torchao int8 / float8 weight-only; ``nf4``: bitsandbytes NF4 with double quantization;
- ``nf4+adam8bit``: nf4 and bitsandbytes' ``AdamW8bit`` as the trainer builds it. bitsandbytes keeps fp32 state
  for tensors under ``min_8bit_size`` = 4,096 elements, and the toy LoRA's 66 tensors have at most 3,072: this row
  runs 8-bit AdamW's code with fp32 moments (the per-run JSON records the state dtypes);
- ``nf4+adam8bit-all``: the same with ``min_8bit_size=0`` (monkeypatched here: ``bitsandbytes.optim.AdamW8bit``
  replaced by ``functools.partial(AdamW8bit, min_8bit_size=0)``), so that every moment is stored in 8 bits, as
  FLUX.1-dev's LoRA tensors (3072 x rank and more) are by default.

Also the sanity rows: the untrained oracle numbers of each quantized generator (does quantization alone change
what the generator draws?), on the demo's images and on 192 (16 noises), with the pixel difference from the
full-precision generator's images of the same noises and the share of oracle labels they keep.

Writes ``benchmarks/results/quantized_quality.json`` (every run's before / after oracle numbers, its history of
training rewards and evaluations, its seconds) and ``quantized_quality.md`` (the tables); the runs' LoRAs and
grids under ``benchmarks/results/quantized_quality_runs/``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SEEDS = (0, 1, 2)
#: variant -> (quantize, use_8bit_adam, min_8bit_size or None for bitsandbytes' default, bitsandbytes' CPU
#: dequantize_4bit kernel as shipped (True) or repaired by quantize_in_memory (False): see keep_shipped_cpu_kernel)
VARIANTS = {
    "none": (None, False, None, False),
    "int8": ("int8", False, None, False),
    "float8": ("float8", False, None, False),
    "nf4": ("nf4", False, None, False),
    "nf4+adam8bit": ("nf4", True, None, False),
    "nf4+adam8bit-all": ("nf4", True, 0, False),
    "nf4-bnb-cpu-kernel": ("nf4", False, None, True),
}
_REPAIR: dict = {}  # quantization._repair_cpu_dequantize_4bit as the library defines it
SANITY_NOISES = 16  # evaluation noises of the untrained generators' sanity rows (x 12 content prompts)
METRICS = (
    ("oracle_bright_fraction", "bright fraction"),
    ("oracle_colour_accuracy", "colour accuracy"),
    ("oracle_shape_accuracy", "shape accuracy"),
    ("evaluation_srp", "evaluation SRP"),
)


# ----------------------------------------------------------------------------------------------- one run (child)
def keep_shipped_cpu_kernel(shipped: bool) -> None:
    """Whether quantize_in_memory may repair bitsandbytes' CPU dequantize_4bit (see
    diffusers_srpo.quantization._repair_cpu_dequantize_4bit): the `nf4-bnb-cpu-kernel` rows keep the kernel as
    shipped, to show what it does to the toy generator."""
    from diffusers_srpo import quantization

    repair = _REPAIR.setdefault("repair", quantization._repair_cpu_dequantize_4bit)
    quantization._repair_cpu_dequantize_4bit = (lambda: None) if shipped else repair


def nf4_round_trip_error(shape=(96, 96)) -> float:
    """Relative error of bitsandbytes' NF4 quantize / dequantize round trip of a random weight (blocks of 64)."""
    import bitsandbytes.functional as F
    import torch

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    return ((F.dequantize_4bit(packed, state) - weight).norm() / weight.norm()).item()


def _patch_adamw8bit(min_8bit_size: int | None) -> list:
    """Replace bitsandbytes' AdamW8bit by one that remembers its instances (and takes ``min_8bit_size``)."""
    import bitsandbytes

    instances = []

    class RecordingAdamW8bit(bitsandbytes.optim.AdamW8bit):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            instances.append(self)

    kwargs = {} if min_8bit_size is None else {"min_8bit_size": min_8bit_size}
    bitsandbytes.optim.AdamW8bit = functools.partial(RecordingAdamW8bit, **kwargs)
    return instances


def _state_dtypes(optimizer) -> dict[str, int]:
    """How many tensors' first moment is stored in each dtype."""
    counts: dict[str, int] = {}
    for state in optimizer.state.values():
        if "state1" in state:
            name = str(state["state1"].dtype).replace("torch.", "")
            counts[name] = counts.get(name, 0) + 1
    return counts


def run_one(variant: str, seed: int, output: str) -> None:
    import torch

    from diffusers_srpo.toyworld.demo import run_demo

    torch.set_num_threads(1)
    quantize, use_8bit_adam, min_8bit_size, shipped_kernel = VARIANTS[variant]
    instances = _patch_adamw8bit(min_8bit_size) if use_8bit_adam else []
    keep_shipped_cpu_kernel(shipped_kernel)
    started = time.perf_counter()
    metrics = run_demo(
        os.path.join(RESULTS, "quantized_quality_runs", variant, f"seed{seed}"),
        seed=seed,
        overwrite_output_dir=True,
        quantize=quantize,
        use_8bit_adam=use_8bit_adam,
    )
    round_trip = nf4_round_trip_error() if quantize == "nf4" else None  # after quantize_in_memory's repair, if any
    record = {
        "variant": variant,
        "seed": seed,
        "quantize": metrics["quantize"],
        "use_8bit_adam": metrics["use_8bit_adam"],
        "min_8bit_size": min_8bit_size,
        "bnb_cpu_dequantize_4bit": None if quantize != "nf4" else "shipped" if shipped_kernel else "generic",
        "nf4_round_trip_error_96x96": round_trip,
        "optimizer_state_dtypes": _state_dtypes(instances[0]) if instances else None,
        "before": metrics["before"],
        "after": metrics["after"],
        "history": metrics["history"],
        "seconds": metrics["seconds"],
        "process_seconds": time.perf_counter() - started,
    }
    with open(output, "w") as f:
        json.dump(record, f, indent=2)


# ----------------------------------------------------------------------------------------------- sanity (child)
def run_sanity(output: str) -> None:
    """The untrained generator of each quantization on the demo's noises and on SANITY_NOISES noises."""
    import torch

    from diffusers_srpo.quantization import quantize_in_memory
    from diffusers_srpo.rewards import SemanticRelativeReward
    from diffusers_srpo.toyworld import load_reward, oracle_labels
    from diffusers_srpo.toyworld.demo import (
        CONTENT_PROMPTS,
        EVALUATION_SEED_BASE,
        EVALUATION_SEEDS,
        demo_config,
        oracle_numbers,
    )
    from diffusers_srpo.toyworld.generator import load_pipeline
    from diffusers_srpo.trainers import SRPOTrainer

    torch.set_num_threads(1)
    reward = load_reward()
    srp = SemanticRelativeReward(reward, ["bright"], ["dark"], word_schedule="fixed")
    prompts = list(CONTENT_PROMPTS)
    seeds = [EVALUATION_SEED_BASE + i for i in range(SANITY_NOISES)]
    rows, reference, round_trip = {}, None, {"shipped": nf4_round_trip_error()}
    # The shipped 4-bit CPU kernel's row before quantize_in_memory repairs it for this process.
    for name in ("none", "int8", "float8", "nf4-bnb-cpu-kernel", "nf4"):
        quantize = {"none": None, "nf4-bnb-cpu-kernel": "nf4"}.get(name, name)
        keep_shipped_cpu_kernel(name == "nf4-bnb-cpu-kernel")
        pipe = load_pipeline()
        linear = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]  # before the LoRA's
        layer_counts = {"linear_layers": len(linear)}
        layer_counts["linear_layers_in_features_not_multiple_of_64"] = sum(m.in_features % 64 != 0 for m in linear)
        if quantize is not None:
            quantize_in_memory(pipe.transformer, quantize, compute_dtype=pipe.transformer.dtype)
        if name == "nf4":
            round_trip["generic"] = nf4_round_trip_error()
        with tempfile.TemporaryDirectory() as folder:  # the trainer's sampler, untrained (the LoRA starts at 0)
            trainer = SRPOTrainer(pipe, reward=reward, prompts=prompts, config=demo_config(folder))
            with torch.no_grad():  # as measure(): seed-major, the first EVALUATION_SEEDS noises are the demo's
                images = torch.cat([trainer.generate_images(prompts, seed) for seed in seeds])
                row = {
                    subset: {
                        **oracle_numbers(images[:count], prompts * (count // len(prompts)), "bright"),
                        "evaluation_srp": srp(images[:count], prompts * (count // len(prompts))).mean().item(),
                    }
                    for subset, count in (
                        ("demo_images", EVALUATION_SEEDS * len(prompts)),
                        ("sanity_images", len(images)),
                    )
                }
        labels = oracle_labels(images)
        if reference is None:
            reference = (images, labels)
        else:
            row["mean_abs_pixel_difference"] = (images - reference[0]).abs().mean().item()
            row["max_abs_pixel_difference"] = (images - reference[0]).abs().max().item()
            row["oracle_label_agreement"] = {
                attribute: (labels[attribute] == reference[1][attribute]).float().mean().item() for attribute in labels
            }
        rows[name] = {**row, **layer_counts}
        del trainer, pipe
    with open(output, "w") as f:
        json.dump(
            {"noises": seeds, "prompts": prompts, "nf4_round_trip_error_96x96": round_trip, "variants": rows},
            f,
            indent=2,
        )


# ----------------------------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def _signed_mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.3f} ± {std:.3f}"


def report(runs: list[dict], sanity: dict | None) -> str:
    from diffusers_srpo.toyworld.demo import CONTENT_PROMPTS, EVALUATION_SEEDS, demo_config

    demo = demo_config("unused")
    images = len(CONTENT_PROMPTS) * EVALUATION_SEEDS
    layers = sanity["variants"]["none"] if sanity else None
    kernel_layers = (
        f"{layers['linear_layers_in_features_not_multiple_of_64']} of this toy transformer's {layers['linear_layers']} "
        "Linear layers"
        if layers and "linear_layers" in layers
        else "not counted"
    )
    lines = [
        "# Toy world: SRPO on a quantized frozen base",
        "",
        f"The demo's default run ({demo.max_train_steps} SRPO updates of {demo.train_batch_size} prompts, lr "
        f"{demo.learning_rate:g}, rank-{demo.lora_rank} LoRA, 'bright' over 'dark'), training seeds "
        f"{', '.join(map(str, sorted({r['seed'] for r in runs})))}; oracle numbers of {images} images "
        f"({len(CONTENT_PROMPTS)} content-only prompts x {EVALUATION_SEEDS} fixed noises) after training, mean ± "
        "sample std over the seeds, and the change from the variant's own start (its untrained generator, the same "
        "for every seed). Seconds: run_demo's wall time (load, updates, evaluations) on one torch thread.",
        "",
        "Variants: `none` fp32 base; `int8` / `float8` torchao weight-only; `nf4` bitsandbytes NF4 + double quant "
        "(4-bit CPU dequantization by bitsandbytes' generic implementation: see below); `nf4+adam8bit` the same with "
        "bitsandbytes AdamW8bit at its defaults (every toy LoRA tensor is under min_8bit_size = 4096 elements, so "
        "its moments stay fp32); `nf4+adam8bit-all` AdamW8bit with min_8bit_size=0 (8-bit moments); "
        "`nf4-bnb-cpu-kernel` nf4 with bitsandbytes 0.50.2's native CPU dequantize_4bit kernel, which is wrong for "
        f"in_features not a multiple of 64 ({kernel_layers}).",
        "",
        "| variant | " + " | ".join(f"{label} after | Δ" for _, label in METRICS) + " | seconds / run |",
        "|---|" + "---:|---:|" * len(METRICS) + "---:|",
    ]
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        cells = []
        for key, _ in METRICS:
            cells.append(_mean_std([r["after"][key] for r in mine]))
            cells.append(_signed_mean_std([r["after"][key] - r["before"][key] for r in mine]))
        seconds = [r["seconds"] for r in mine]
        spread = statistics.stdev(seconds) if len(seconds) > 1 else 0.0
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {statistics.mean(seconds):.0f} ± {spread:.0f} |")
    lines += ["", f"Start (untrained generator, the demo's {images} images; every seed's 'before'):", ""]
    lines += ["| variant | " + " | ".join(label for _, label in METRICS) + " | same for all seeds |"]
    lines += ["|---|" + "---:|" * len(METRICS) + "---|"]
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if mine:
            same = all(r["before"] == mine[0]["before"] for r in mine)
            numbers = " | ".join(f"{mine[0]['before'][key]:.3f}" for key, _ in METRICS)
            lines.append(f"| {variant} | {numbers} | {'yes' if same else 'NO'} |")
    adam = [r for r in runs if r["optimizer_state_dtypes"]]
    if adam:
        lines += ["", "8-bit AdamW's first-moment storage (tensors per dtype, from the optimizer after training):", ""]
        for variant in VARIANTS:
            states = {json.dumps(r["optimizer_state_dtypes"]) for r in adam if r["variant"] == variant}
            if states:
                lines.append(f"- {variant}: {', '.join(sorted(states))}")
    if sanity:
        variants, round_trip = sanity["variants"], sanity["nf4_round_trip_error_96x96"]
        lines += [
            "",
            f"NF4 round trip of a random 96 x 96 weight (blocks of 64), relative error: {round_trip['shipped']:.3f} "
            f"with bitsandbytes' native CPU kernel, {round_trip['generic']:.3f} with its generic implementation "
            "(NF4's own error is about 0.09).",
            "",
            f"Sanity: the untrained generators on {len(sanity['noises'])} noises x 12 prompts "
            f"({12 * len(sanity['noises'])} images); pixel difference and oracle-label agreement with the "
            "full-precision generator's images of the same noises.",
            "",
            "| base | " + " | ".join(label for _, label in METRICS) + " | mean abs pixel diff | max abs pixel diff "
            "| label agreement colour / shape / lighting / texture |",
            "|---|" + "---:|" * (len(METRICS) + 2) + "---|",
        ]
        for name, row in variants.items():
            numbers = " | ".join(f"{row['sanity_images'][key]:.3f}" for key, _ in METRICS)
            if "oracle_label_agreement" in row:
                agreement = row["oracle_label_agreement"]
                extra = (
                    f"{row['mean_abs_pixel_difference']:.4f} | {row['max_abs_pixel_difference']:.3f} | "
                    + " / ".join(f"{agreement[a]:.3f}" for a in ("colour", "shape", "lighting", "texture"))
                )
            else:
                extra = "— | — | —"
            lines.append(f"| {name} | {numbers} | {extra} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--no-sanity", action="store_true", help="skip the untrained generators' sanity rows")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the runs already in benchmarks/results/quantized_quality_runs/"
    )
    parser.add_argument("--copy-table", default=None, help="also write the markdown table here")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--sanity-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return run_one(args.one[0], int(args.one[1]), args.output)
    if args.sanity_only:
        return run_sanity(args.output)

    runs_dir = os.path.join(RESULTS, "quantized_quality_runs")
    os.makedirs(runs_dir, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def child(output: str, *arguments: str) -> dict:
        if not (args.reuse and os.path.isfile(output)):
            command = [sys.executable, os.path.abspath(__file__), *arguments, "--output", output]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        with open(output) as f:
            return json.load(f)

    runs = []
    for variant in args.variants:
        for seed in args.seeds:
            runs.append(child(os.path.join(runs_dir, f"{variant}-seed{seed}.json"), "--one", variant, str(seed)))
            before, after = runs[-1]["before"], runs[-1]["after"]
            print(
                f"{variant} seed {seed}: bright {before['oracle_bright_fraction']:.3f} -> "
                f"{after['oracle_bright_fraction']:.3f}, colour {after['oracle_colour_accuracy']:.3f}, shape "
                f"{after['oracle_shape_accuracy']:.3f} ({runs[-1]['seconds']:.0f} s)",
                flush=True,
            )
    sanity = None if args.no_sanity else child(os.path.join(runs_dir, "sanity.json"), "--sanity-only")
    table = report(runs, sanity)
    with open(os.path.join(RESULTS, "quantized_quality.json"), "w") as f:
        json.dump({"variants": VARIANTS, "seeds": args.seeds, "runs": runs, "sanity": sanity}, f, indent=2)
    for path in (os.path.join(RESULTS, "quantized_quality.md"), args.copy_table):
        if path:
            with open(path, "w") as f:
                f.write(table)
    print(table)


if __name__ == "__main__":
    main()
