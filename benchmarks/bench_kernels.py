"""Micro-benchmarks of the fused kernels: Triton vs eager PyTorch vs torch.compile.

    python benchmarks/bench_kernels.py [--dtype bfloat16] [--reps 50] [--json bench_kernels.json]

For each op and size (tiny up to FLUX at 1024x1024, latents ``[B, 4096, 64]``, and CLIP-H
embeddings ``[B, 1024]``) it reports the median time, the achieved bandwidth (the bytes the op
must read and write, over the time) and that bandwidth as a percentage of the device's copy
bandwidth, measured in the same run with ``dst.copy_(src)``. On CUDA the L2 cache is flushed
before every timed call. Without CUDA (or without Triton) only the PyTorch reference paths run,
and the output says so. Target on an H100: step_and_recover at >= 85 % of copy bandwidth, >= 2x
eager, never slower than torch.compile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from diffusers_srpo import kernels, ops

# [B, tokens, 4C]: 128 px, 512 px, 1024 px, and batches of 4 and 16 at 1024 px (large enough to show bandwidth).
LATENT_SIZES = [(1, 64, 64), (1, 1024, 64), (1, 4096, 64), (4, 4096, 64), (16, 4096, 64)]
EMBED_SIZES = [(1, 1024), (8, 1024), (64, 1024), (512, 1024)]
FLUX_SCALING, FLUX_SHIFT = 0.3611, 0.1159
CACHE_FLUSH_BYTES = 256 * 2**20  # larger than an H100's 50 MB L2


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(CACHE_FLUSH_BYTES, dtype=torch.int8, device=device)
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (one read and one write of every byte) on a large buffer."""
    nbytes = 1024 * 2**20 if device.type == "cuda" else 128 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device, reps)


def _step_and_recover_grad_v(grad, sigma_from, sigma_to):
    """The reference's gradient to the model output, written out (what autograd computes)."""
    coefficient = ((sigma_to - sigma_from) / (1 - sigma_to)).reshape(-1, 1, 1)
    return (grad.float() * coefficient).to(grad.dtype)


def _srp_grad_image(grad, image, positive, negative, k, scale):
    """The reference's gradient to the image embedding, written out."""
    image, positive, negative = image.float(), positive.float(), negative.float()
    direction = (1 + k[:, None]) * positive - negative
    norm = image.norm(dim=-1, keepdim=True)
    unit = image / norm
    projection = (unit * direction).sum(-1, keepdim=True)
    return (scale * grad.float()[:, None] * (direction - unit * projection) / norm).to(grad.dtype)


def cases(device: torch.device, dtype: torch.dtype, triton_on: bool):
    """Yield (op, shape, bytes moved, {variant: zero-argument callable}); variants share their inputs."""
    item = torch.empty((), dtype=dtype).element_size()
    compiled = {}

    def compile_once(fn):
        if fn not in compiled:
            compiled[fn] = torch.compile(fn, dynamic=False)
        return compiled[fn]

    for batch, tokens, channels in LATENT_SIZES:
        shape = (batch, tokens, channels)
        v, x, noise, grad = (torch.randn(shape, device=device, dtype=dtype) for _ in range(4))
        sigma_from = torch.linspace(0.95, 0.8, batch, device=device)
        sigma_to = sigma_from - 0.05
        side = int(tokens**0.5) * 2
        elements = v.numel()

        def recover_grad_v_triton(grad=grad, sigma_from=sigma_from, sigma_to=sigma_to):
            from diffusers_srpo.kernels import flow

            grad_v = torch.empty_like(grad)
            flow.launch_step_and_recover_backward(grad, sigma_from, sigma_to, grad_v, None, None)
            return grad_v

        yield (
            "add_noise_prior",
            shape,
            3 * elements * item,
            _variants(
                ops.add_noise_prior_reference, ops.add_noise_prior, (x, noise, sigma_from), triton_on, compile_once
            ),
        )
        yield (
            "step_and_recover",
            shape,
            4 * elements * item,
            _variants(
                ops.step_and_recover_reference,
                ops.step_and_recover,
                (v, x, sigma_from, sigma_to, noise),
                triton_on,
                compile_once,
            ),
        )
        yield (
            "step_and_recover backward (grad v)",
            shape,
            2 * elements * item,
            _variants(
                _step_and_recover_grad_v,
                recover_grad_v_triton,
                (grad, sigma_from, sigma_to),
                triton_on,
                compile_once,
                fused_takes_args=False,
            ),
        )
        yield (
            "step_and_recover_to_vae",
            shape,
            4 * elements * item,
            _variants(
                ops.step_and_recover_to_vae_reference,
                ops.step_and_recover_to_vae,
                (v, x, sigma_from, sigma_to, noise, side, side, FLUX_SCALING, FLUX_SHIFT),
                triton_on,
                compile_once,
            ),
        )

    for batch, dim in EMBED_SIZES:
        image, positive, negative = (torch.randn(batch, dim, device=device, dtype=dtype) for _ in range(3))
        grad = torch.randn(batch, device=device, dtype=dtype)
        k = torch.linspace(0.1, 0.25, batch, device=device)

        def srp_grad_image_triton(grad=grad, image=image, positive=positive, negative=negative, k=k):
            from diffusers_srpo.kernels import srp

            rows = image.shape[0]
            score = torch.empty(rows, device=device, dtype=dtype)
            norm, dot = torch.empty(2, rows, device=device)
            grad_image = torch.empty_like(image)
            srp.launch_srp_forward(image, positive, negative, k, 1.0, score, norm, dot)
            srp.launch_srp_backward(grad, image, positive, negative, k, 1.0, norm, dot, grad_image, None, None)
            return grad_image

        yield (
            "srp_score",
            (batch, dim),
            3 * batch * dim * item,
            _variants(ops.srp_score_reference, ops.srp_score, (image, positive, negative, k), triton_on, compile_once),
        )
        yield (
            "srp_score backward (grad image, with forward)",
            (batch, dim),
            7 * batch * dim * item,
            _variants(
                _srp_grad_image,
                srp_grad_image_triton,
                (grad, image, positive, negative, k, 1.0),
                triton_on,
                compile_once,
                fused_takes_args=False,
            ),
        )


def _variants(reference, fused, args, triton_on, compile_once, fused_takes_args=True):
    """The eager reference, its torch.compile, and (on CUDA with Triton) the fused path, on the same inputs."""
    out = {"eager": lambda: reference(*args), "compile": lambda: compile_once(reference)(*args)}
    if triton_on:
        out["triton"] = (lambda: fused(*args)) if fused_takes_args else fused
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile (its first compile is slow on CPU)"
    )
    parser.add_argument("--json", default="bench_kernels.json", help="where to write the results")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for PyTorch (a shared CPU gives steadier times with 1)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    triton_on = device.type == "cuda" and kernels.is_available()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    references = "eager PyTorch" if args.no_compile else "eager PyTorch vs torch.compile"
    note = (
        f"Triton kernels vs {references}"
        if triton_on
        else f"No CUDA device with Triton: only the PyTorch reference paths ran ({references}); no kernel timings"
    )
    print(note)
    bandwidth = copy_bandwidth(device, args.reps)
    print(f"device: {device_name}; dtype {args.dtype}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")

    rows = []
    header = f"{'op':<46} {'shape':<16} {'variant':<8} {'median us':>10} {'GB/s':>8} {'% copy':>7} {'x eager':>8}"
    print(header)
    print("-" * len(header))
    for op, shape, nbytes, variants in cases(device, dtype, triton_on):
        if args.no_compile:
            variants.pop("compile")
        timings = {}
        for variant, fn in variants.items():
            launches = sum(kernels.launch_counts.values())
            timings[variant] = median_seconds(fn, device, args.reps)
            if variant == "triton" and sum(kernels.launch_counts.values()) == launches:
                raise RuntimeError(f"{op}: the reference ran instead of the kernel (is {ops.DISABLE_KERNELS_ENV} set?)")
        for variant, seconds in timings.items():
            achieved = nbytes / seconds
            row = {
                "op": op,
                "shape": list(shape),
                "variant": variant,
                "bytes": nbytes,
                "median_s": seconds,
                "gb_per_s": achieved / 1e9,
                "percent_of_copy": 100 * achieved / bandwidth,
                "speedup_vs_eager": timings["eager"] / seconds,
            }
            rows.append(row)
            print(
                f"{op:<46} {'x'.join(map(str, shape)):<16} {variant:<8} {seconds * 1e6:>10.1f} "
                f"{row['gb_per_s']:>8.1f} {row['percent_of_copy']:>6.1f}% {row['speedup_vs_eager']:>7.2f}x"
            )

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton_kernels_timed": triton_on,
        "note": note,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "reps": args.reps,
        "rows": rows,
    }
    with open(args.json, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
