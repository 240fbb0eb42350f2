"""Generate with FLUX.1-dev, without and with an SRPO LoRA, from the same noise; saves a side-by-side PNG.

    python examples/inference_with_lora.py --lora srpo-flux-hps-lora --prompt "a portrait of an old fisherman"

The LoRA is an ordinary diffusers LoRA: nothing from diffusers-srpo is needed to use it.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import FluxPipeline
from diffusers.utils import make_image_grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev", help="Base FluxPipeline (hub id or folder).")
    parser.add_argument("--lora", required=True, help="Folder written by the SRPO trainer (or any FLUX LoRA).")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="Strength of the LoRA.")
    parser.add_argument("--prompt", required=True, help="Prompt to generate.")
    parser.add_argument("--output", default="with_and_without_lora.png", help="Where the side-by-side image goes.")
    parser.add_argument("--height", type=int, default=1024, help="Image height.")
    parser.add_argument("--width", type=int, default=1024, help="Image width.")
    parser.add_argument("--num_inference_steps", type=int, default=28, help="Sampling steps.")
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="FLUX distilled guidance.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise, shared by both images.")
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 token length.")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)

    def generate():
        return pipe(
            args.prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            max_sequence_length=args.max_sequence_length,
            generator=torch.Generator().manual_seed(args.seed),
        ).images[0]

    without = generate()
    pipe.load_lora_weights(args.lora, adapter_name="srpo")
    pipe.set_adapters(["srpo"], adapter_weights=[args.lora_scale])
    with_lora = generate()
    make_image_grid([without, with_lora], rows=1, cols=2).save(args.output)
    print(f"wrote {args.output} (left: base model, right: with the LoRA at scale {args.lora_scale})")


if __name__ == "__main__":
    main()
