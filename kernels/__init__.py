"""Fused Triton kernels for diffusers-srpo, installed as ``diffusers_srpo.kernels``.

The PyTorch functions in ``diffusers_srpo.ops`` are the specification; ``ops`` decides when a
kernel runs. This module is cheap to import: Triton is only imported with the submodules
``flow`` (noise prior, step-and-recover, its VAE-layout variant) and ``srp`` (the SRP reward),
which ``ops`` loads the first time a kernel is about to run.

Kernels run on CUDA tensors. Under Triton's interpreter (``TRITON_INTERPRET=1``, set before
``triton`` is first imported) they can also run on CPU tensors, but only when a test or a
benchmark opts in with ``DIFFUSERS_SRPO_KERNELS_ON_CPU=1``: by default CPU work never launches one.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os

__all__ = ["accepts_cpu_tensors", "interpreting", "is_available", "launch_counts"]

# Kernel name -> number of launches in this process: how tests tell that a kernel, not the
# PyTorch reference, produced a result.
launch_counts: collections.Counter[str] = collections.Counter()


@functools.cache
def is_available() -> bool:
    """Whether Triton can be imported here (it is Linux-only and optional)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter in this process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def accepts_cpu_tensors() -> bool:
    """Whether kernels may take CPU tensors: only an explicit opt-in under the interpreter."""
    return interpreting() and os.environ.get("DIFFUSERS_SRPO_KERNELS_ON_CPU") == "1"
