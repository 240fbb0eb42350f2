"""What every kernel launch shares: dtypes, block sizes, per-sample scalars, the launch itself."""

from __future__ import annotations

import contextlib
import numbers

import torch
import triton
import triton.language as tl

from . import interpreting, launch_counts

# Interpreter cost grows with the number of programs, not their size: one big block per program.
INTERPRETER_BLOCK = 65536


def compute_dtype(*dtypes: torch.dtype) -> tl.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 when any input is fp64, so gradcheck can run on the kernels."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def torch_compute_dtype(compute: tl.dtype) -> torch.dtype:
    return torch.float64 if compute == tl.float64 else torch.float32


def block_size(n: int, gpu_block: int) -> int:
    """A power of two covering ``n`` elements, capped at ``gpu_block`` on a GPU."""
    cap = INTERPRETER_BLOCK if interpreting() else gpu_block
    return min(triton.next_power_of_2(max(n, 1)), cap)


def per_sample(value, name: str, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A float or a per-sample tensor as a contiguous ``[1]`` (one for all) or ``[batch]`` tensor."""
    if isinstance(value, numbers.Real):
        value = torch.tensor([float(value)], dtype=dtype, device=device)
    if value.requires_grad:
        raise ValueError(f"{name} requires a gradient, which the kernels do not compute; call diffusers_srpo.ops")
    value = value.to(device=device, dtype=dtype).reshape(-1).contiguous()
    if value.numel() not in (1, batch):
        raise ValueError(f"{name} has {value.numel()} values; expected 1 or one per sample ({batch})")
    return value


def launch(kernel, grid: tuple[int, ...], device: torch.device, *args, **meta) -> None:
    """Launch ``kernel`` on ``device`` (made current, as Triton launches on the current CUDA device) and count it."""
    launch_counts[kernel.__name__] += 1
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **meta)
