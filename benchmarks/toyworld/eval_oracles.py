"""Accuracy of the toy world's analytic oracles on real images, and on blurred or noisy copies of them.

    python benchmarks/toyworld/eval_oracles.py --size 20000

The oracles must be exact on the dataset's renders; generated images are blurrier and noisier, so the same
images are also degraded by a Gaussian blur and by pixel noise of a few levels, to show how far they hold.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.transforms.v2 import functional as TF

from diffusers_srpo.toyworld import ATTRIBUTES, ToyShapesDataset, oracle_accuracy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000, help="number of images")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    batch = ToyShapesDataset(length=args.size, seed=args.seed).batch(range(args.size))
    render_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(args.seed)

    def blur(images, sigma):
        return TF.gaussian_blur(images, [5, 5], [sigma, sigma])

    def noise(images, std):
        return (images + std * torch.randn(images.shape, generator=generator)).clamp(0, 1)

    variants = {
        "real": batch.images,
        "blur 0.6 px": blur(batch.images, 0.6),
        "blur 1.0 px": blur(batch.images, 1.0),
        "noise 0.01": noise(batch.images, 0.01),
        "noise 0.02": noise(batch.images, 0.02),
        "noise 0.03": noise(batch.images, 0.03),
        "blur 0.8 px + noise 0.02": noise(blur(batch.images, 0.8), 0.02),
    }
    print(f"{args.size} images (seed {args.seed}) rendered in {render_seconds:.2f} s")
    print("| images | " + " | ".join(ATTRIBUTES) + " | oracle time (s) |")
    print("|---|" + "---:|" * (len(ATTRIBUTES) + 1))
    for name, images in variants.items():
        start = time.perf_counter()
        accuracy = oracle_accuracy(images, batch.labels)
        seconds = time.perf_counter() - start
        print(f"| {name} | " + " | ".join(f"{accuracy[a]:.4f}" for a in ATTRIBUTES) + f" | {seconds:.1f} |")


if __name__ == "__main__":
    main()
