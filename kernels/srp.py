"""The Semantic Relative Preference score, fused, with its autograd Function.

``r_b = scale * <e_b / |e_b|, d_b>`` with ``d_b = (1 + k_b) * t_pos_b - t_neg_b``: one program per row.
The forward also writes ``|e_b|`` and ``<e_b, d_b>`` (fp32, or fp64 for fp64 inputs), so the
backward, ``grad_e = scale * g * (d - e_hat <e_hat, d>) / |e|``, needs one pass over the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .common import block_size, compute_dtype, launch, per_sample, torch_compute_dtype

SRP_GPU_BLOCK = 4096  # covers CLIP-H's 1024-wide embeddings in one step of the row loop


@triton.jit
def _srp_forward_kernel(
    image_ptr,
    positive_ptr,
    negative_ptr,
    k_ptr,
    k_stride,
    score_ptr,
    norm_ptr,
    dot_ptr,
    dim,
    scale,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * dim
    one_plus_k = 1 + tl.load(k_ptr + row * k_stride).to(COMPUTE)
    squares = tl.zeros([BLOCK], dtype=COMPUTE)
    products = tl.zeros([BLOCK], dtype=COMPUTE)
    for start in range(0, dim, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < dim
        image = tl.load(image_ptr + base + cols, mask=mask, other=0).to(COMPUTE)
        positive = tl.load(positive_ptr + base + cols, mask=mask, other=0).to(COMPUTE)
        negative = tl.load(negative_ptr + base + cols, mask=mask, other=0).to(COMPUTE)
        squares += image * image
        products += image * (one_plus_k * positive - negative)
    norm = tl.sqrt(tl.sum(squares, axis=0))
    dot = tl.sum(products, axis=0)
    tl.store(norm_ptr + row, norm)
    tl.store(dot_ptr + row, dot)
    tl.store(score_ptr + row, (scale * dot / norm).to(score_ptr.dtype.element_ty))


@triton.jit
def _srp_backward_kernel(
    grad_score_ptr,
    image_ptr,
    positive_ptr,
    negative_ptr,
    k_ptr,
    k_stride,
    norm_ptr,
    dot_ptr,
    grad_image_ptr,
    grad_positive_ptr,
    grad_negative_ptr,
    dim,
    scale,
    WRITE_IMAGE: tl.constexpr,
    WRITE_POSITIVE: tl.constexpr,
    WRITE_NEGATIVE: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * dim
    one_plus_k = 1 + tl.load(k_ptr + row * k_stride).to(COMPUTE)
    norm = tl.load(norm_ptr + row).to(COMPUTE)
    dot = tl.load(dot_ptr + row).to(COMPUTE)
    # d(score)/d(image) = scale * (d - e_hat <e_hat, d>) / |e| = g_scaled * (d - e * <e, d> / |e|^2).
    grad_scaled = scale * tl.load(grad_score_ptr + row).to(COMPUTE) / norm
    projection = dot / (norm * norm)
    for start in range(0, dim, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < dim
        image = tl.load(image_ptr + base + cols, mask=mask).to(COMPUTE)
        if WRITE_IMAGE:
            positive = tl.load(positive_ptr + base + cols, mask=mask).to(COMPUTE)
            negative = tl.load(negative_ptr + base + cols, mask=mask).to(COMPUTE)
            grad_image = grad_scaled * (one_plus_k * positive - negative - image * projection)
            tl.store(grad_image_ptr + base + cols, grad_image.to(grad_image_ptr.dtype.element_ty), mask=mask)
        if WRITE_POSITIVE:
            grad_positive = grad_scaled * one_plus_k * image
            tl.store(grad_positive_ptr + base + cols, grad_positive.to(grad_positive_ptr.dtype.element_ty), mask=mask)
        if WRITE_NEGATIVE:
            grad_negative = -grad_scaled * image
            tl.store(grad_negative_ptr + base + cols, grad_negative.to(grad_negative_ptr.dtype.element_ty), mask=mask)


def _check_rows(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and (tensor.ndim != 2 or not tensor.is_contiguous()):
            raise ValueError(
                f"{name} must be a contiguous [B, D] tensor for the kernel; got shape {tuple(tensor.shape)}"
            )


def launch_srp_forward(
    image_embeds: torch.Tensor,
    positive_text_embeds: torch.Tensor,
    negative_text_embeds: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    score: torch.Tensor,
    norm: torch.Tensor,
    dot: torch.Tensor,
) -> None:
    """``score = scale * dot / norm`` per row, with ``norm = |e|`` and ``dot = <e, (1 + k) t_pos - t_neg>``."""
    _check_rows(
        image_embeds=image_embeds, positive_text_embeds=positive_text_embeds, negative_text_embeds=negative_text_embeds
    )
    rows, dim = image_embeds.shape
    if rows == 0:
        return
    block = block_size(dim, SRP_GPU_BLOCK)
    launch(
        _srp_forward_kernel,
        (rows,),
        image_embeds.device,
        image_embeds,
        positive_text_embeds,
        negative_text_embeds,
        k,
        int(k.numel() > 1),
        score,
        norm,
        dot,
        dim,
        scale,
        BLOCK=block,
        COMPUTE=compute_dtype(image_embeds.dtype, positive_text_embeds.dtype, negative_text_embeds.dtype),
        num_warps=4,
    )


def launch_srp_backward(
    grad_score: torch.Tensor,
    image_embeds: torch.Tensor,
    positive_text_embeds: torch.Tensor,
    negative_text_embeds: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    norm: torch.Tensor,
    dot: torch.Tensor,
    grad_image: torch.Tensor | None,
    grad_positive: torch.Tensor | None,
    grad_negative: torch.Tensor | None,
) -> None:
    """Gradients of the SRP score to each embedding that is given a buffer (``None``: not needed)."""
    _check_rows(grad_image=grad_image, grad_positive=grad_positive, grad_negative=grad_negative)
    wanted = (grad_image, grad_positive, grad_negative)
    rows, dim = image_embeds.shape
    if rows == 0 or all(grad is None for grad in wanted):
        return
    block = block_size(dim, SRP_GPU_BLOCK)
    launch(
        _srp_backward_kernel,
        (rows,),
        image_embeds.device,
        grad_score.contiguous(),
        image_embeds,
        positive_text_embeds,
        negative_text_embeds,
        k,
        int(k.numel() > 1),
        norm,
        dot,
        *(image_embeds if grad is None else grad for grad in wanted),
        dim,
        scale,
        WRITE_IMAGE=grad_image is not None,
        WRITE_POSITIVE=grad_positive is not None,
        WRITE_NEGATIVE=grad_negative is not None,
        BLOCK=block,
        COMPUTE=compute_dtype(norm.dtype),
        num_warps=4,
    )


class SrpScore(torch.autograd.Function):
    """The SRP score per row, with gradients to the image and both text embeddings (k and scale are constants)."""

    @staticmethod
    def forward(ctx, image_embeds, positive_text_embeds, negative_text_embeds, k, scale: float) -> torch.Tensor:
        dtype = torch.promote_types(
            torch.promote_types(image_embeds.dtype, positive_text_embeds.dtype), negative_text_embeds.dtype
        )
        rows = image_embeds.shape[0]
        score = torch.empty(rows, dtype=dtype, device=image_embeds.device)
        norm, dot = torch.empty(2, rows, dtype=k.dtype, device=image_embeds.device)
        launch_srp_forward(image_embeds, positive_text_embeds, negative_text_embeds, k, scale, score, norm, dot)
        ctx.save_for_backward(image_embeds, positive_text_embeds, negative_text_embeds, k, norm, dot)
        ctx.scale = scale
        return score

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_score: torch.Tensor):
        image_embeds, positive_text_embeds, negative_text_embeds, k, norm, dot = ctx.saved_tensors
        # needs_input_grad also lists k and scale, which get no gradient.
        embeds = (image_embeds, positive_text_embeds, negative_text_embeds)
        grads = [
            torch.empty_like(t) if needed else None for needed, t in zip(ctx.needs_input_grad, embeds, strict=False)
        ]
        launch_srp_backward(
            grad_score, image_embeds, positive_text_embeds, negative_text_embeds, k, ctx.scale, norm, dot, *grads
        )
        return *grads, None, None


def srp_score(
    image_embeds: torch.Tensor,
    positive_text_embeds: torch.Tensor,
    negative_text_embeds: torch.Tensor,
    k,
    scale: float = 1.0,
) -> torch.Tensor:
    """Kernel-backed ``diffusers_srpo.ops.srp_score`` for ``[B, D]`` embeddings (text rows may broadcast)."""
    tensors = torch.broadcast_tensors(image_embeds, positive_text_embeds, negative_text_embeds)
    image_embeds, positive_text_embeds, negative_text_embeds = (tensor.contiguous() for tensor in tensors)
    dtype = torch_compute_dtype(compute_dtype(*(tensor.dtype for tensor in tensors)))
    k = per_sample(k, "k", image_embeds.shape[0], image_embeds.device, dtype)
    return SrpScore.apply(image_embeds, positive_text_embeds, negative_text_embeds, k, float(scale))
