"""The ``diffusers-srpo`` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .testing import tiny_flux_pipeline

    os.makedirs(args.output_dir, exist_ok=True)
    pipe = tiny_flux_pipeline(seed=args.seed)
    image = pipe(
        args.prompt,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.steps,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    path = os.path.join(args.output_dir, "sample.png")
    image.save(path)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-srpo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="Run the embedded offline example on a tiny FLUX-shaped pipeline (no weights needed)."
    )
    demo.add_argument("--output-dir", default="srpo-demo", help="Folder for the outputs.")
    demo.add_argument("--prompt", default="a red circle", help="Prompt to generate.")
    demo.add_argument("--resolution", type=int, default=64, help="Image height and width; a multiple of 4.")
    demo.add_argument("--steps", type=int, default=4, help="Number of sampling steps.")
    demo.add_argument("--seed", type=int, default=0, help="Seed of the tiny model and of the noise.")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and (args.resolution <= 0 or args.resolution % 4):
        print(
            f"diffusers-srpo: error: --resolution must be a positive multiple of 4, got {args.resolution}",
            file=sys.stderr,
        )
        return 2
    return args.handler(args)
