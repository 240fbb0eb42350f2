"""Noise-prior interpolation and step-and-recover, fused, with their autograd Functions.

Every kernel loads its inputs in their own dtype, computes in fp32 (fp64 for fp64 inputs) and
stores in the output's dtype. Sigmas are one value per sample (stride 1) or one for all (stride 0).
Elementwise kernels see the tensors as ``[samples, per_sample]`` on a 1-D grid of
``samples * tiles_per_sample`` programs (a 1-D grid has no 65535 limit on either factor). Their
offsets are int64: with one sigma for all, the one row is the whole tensor, which may pass 2**31 elements.

Launchers (``launch_*``) take contiguous tensors and preallocated outputs, so tests can poison
the outputs first; the autograd Functions allocate them; the wrappers at the bottom (what
``diffusers_srpo.ops`` calls) broadcast and make inputs contiguous first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .common import block_size, compute_dtype, launch, per_sample, torch_compute_dtype

ELEMENTWISE_GPU_BLOCK = 4096
VAE_GPU_TILE = 4096  # elements per program in the VAE-layout kernels: one packed row at FLUX 1024x1024


@triton.jit
def _noise_prior_kernel(
    x0_ptr,
    noise_ptr,
    sigma_ptr,
    sigma_stride,
    out_ptr,
    per_sample,
    tiles_per_sample,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // tiles_per_sample
    cols = (pid % tiles_per_sample).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < per_sample
    offsets = sample.to(tl.int64) * per_sample + cols
    sigma = tl.load(sigma_ptr + sample * sigma_stride).to(COMPUTE)
    x0 = tl.load(x0_ptr + offsets, mask=mask).to(COMPUTE)
    noise = tl.load(noise_ptr + offsets, mask=mask).to(COMPUTE)
    out = sigma * noise + (1 - sigma) * x0
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_prior_backward_kernel(
    grad_ptr,
    sigma_ptr,
    sigma_stride,
    grad_x0_ptr,
    grad_noise_ptr,
    per_sample,
    tiles_per_sample,
    WRITE_X0: tl.constexpr,
    WRITE_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // tiles_per_sample
    cols = (pid % tiles_per_sample).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < per_sample
    offsets = sample.to(tl.int64) * per_sample + cols
    sigma = tl.load(sigma_ptr + sample * sigma_stride).to(COMPUTE)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(COMPUTE)
    if WRITE_X0:
        tl.store(grad_x0_ptr + offsets, ((1 - sigma) * grad).to(grad_x0_ptr.dtype.element_ty), mask=mask)
    if WRITE_NOISE:
        tl.store(grad_noise_ptr + offsets, (sigma * grad).to(grad_noise_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_and_recover_kernel(
    v_ptr,
    x_ptr,
    noise_ptr,
    sigma_from_ptr,
    sigma_from_stride,
    sigma_to_ptr,
    sigma_to_stride,
    out_ptr,
    per_sample,
    tiles_per_sample,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // tiles_per_sample
    cols = (pid % tiles_per_sample).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < per_sample
    offsets = sample.to(tl.int64) * per_sample + cols
    sigma_from = tl.load(sigma_from_ptr + sample * sigma_from_stride).to(COMPUTE)
    sigma_to = tl.load(sigma_to_ptr + sample * sigma_to_stride).to(COMPUTE)
    inv_clean = 1 / (1 - sigma_to)
    v = tl.load(v_ptr + offsets, mask=mask).to(COMPUTE)
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    noise = tl.load(noise_ptr + offsets, mask=mask).to(COMPUTE)
    out = (x + (sigma_to - sigma_from) * v - sigma_to * noise) * inv_clean
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_and_recover_backward_kernel(
    grad_ptr,
    sigma_from_ptr,
    sigma_from_stride,
    sigma_to_ptr,
    sigma_to_stride,
    grad_v_ptr,
    grad_x_ptr,
    grad_noise_ptr,
    per_sample,
    tiles_per_sample,
    WRITE_V: tl.constexpr,
    WRITE_X: tl.constexpr,
    WRITE_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // tiles_per_sample
    cols = (pid % tiles_per_sample).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < per_sample
    offsets = sample.to(tl.int64) * per_sample + cols
    sigma_from = tl.load(sigma_from_ptr + sample * sigma_from_stride).to(COMPUTE)
    sigma_to = tl.load(sigma_to_ptr + sample * sigma_to_stride).to(COMPUTE)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(COMPUTE) / (1 - sigma_to)
    if WRITE_V:
        tl.store(grad_v_ptr + offsets, ((sigma_to - sigma_from) * grad).to(grad_v_ptr.dtype.element_ty), mask=mask)
    if WRITE_X:
        tl.store(grad_x_ptr + offsets, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if WRITE_NOISE:
        tl.store(grad_noise_ptr + offsets, (-sigma_to * grad).to(grad_noise_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vae_layout_offsets(
    pid,
    height,
    width,
    channels,
    row_tiles,
    col_tiles,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Offsets of one tile in the packed ``[B, (H/2)*(W/2), 4C]`` and unpacked ``[B, C, H, W]`` layouts.

    A program covers one row ``i`` of the 2x2-patch grid: packed tokens ``i*W/2 .. (i+1)*W/2``, a
    contiguous stretch of the packed tensor, which unpacks to image rows ``2i`` and ``2i+1`` of every
    channel. Tile rows enumerate ``(c, di)`` and tile columns the image column ``w``, so the unpacked
    side is read or written in contiguous runs and the packed side stays inside one cached stretch.
    Unpacking (FluxPipeline._unpack_latents): out[c, 2i+di, 2j+dj] = packed[i*W/2 + j, 4c + 2di + dj].
    """
    col_tile = pid % col_tiles
    pid = pid // col_tiles
    row_tile = pid % row_tiles
    pid = pid // row_tiles
    grid_rows = height // 2
    grid_row = pid % grid_rows
    sample = pid // grid_rows
    rows = row_tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = col_tile * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < 2 * channels)[:, None] & (cols < width)[None, :]
    channel = rows // 2
    patch_row = rows % 2
    sample_base = sample.to(tl.int64) * channels * height * width
    unpacked = sample_base + ((channel * height + 2 * grid_row + patch_row) * width)[:, None] + cols[None, :]
    packed = (
        sample_base
        + grid_row * (width // 2) * (4 * channels)
        + ((cols // 2) * (4 * channels))[None, :]
        + (channel * 4 + patch_row * 2)[:, None]
        + (cols % 2)[None, :]
    )
    return sample, packed, unpacked, mask


@triton.jit
def _step_and_recover_to_vae_kernel(
    v_ptr,
    x_ptr,
    noise_ptr,
    sigma_from_ptr,
    sigma_from_stride,
    sigma_to_ptr,
    sigma_to_stride,
    out_ptr,
    height,
    width,
    channels,
    inv_scaling,
    shift,
    row_tiles,
    col_tiles,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    sample, packed, unpacked, mask = _vae_layout_offsets(
        tl.program_id(0), height, width, channels, row_tiles, col_tiles, BLOCK_ROWS, BLOCK_COLS
    )
    sigma_from = tl.load(sigma_from_ptr + sample * sigma_from_stride).to(COMPUTE)
    sigma_to = tl.load(sigma_to_ptr + sample * sigma_to_stride).to(COMPUTE)
    # x / scaling_factor + shift_factor folded into the recovery's 1 / (1 - sigma_to).
    out_scale = inv_scaling / (1 - sigma_to)
    v = tl.load(v_ptr + packed, mask=mask).to(COMPUTE)
    x = tl.load(x_ptr + packed, mask=mask).to(COMPUTE)
    noise = tl.load(noise_ptr + packed, mask=mask).to(COMPUTE)
    out = (x + (sigma_to - sigma_from) * v - sigma_to * noise) * out_scale + shift
    tl.store(out_ptr + unpacked, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_and_recover_to_vae_backward_kernel(
    grad_ptr,
    sigma_from_ptr,
    sigma_from_stride,
    sigma_to_ptr,
    sigma_to_stride,
    grad_v_ptr,
    grad_x_ptr,
    grad_noise_ptr,
    height,
    width,
    channels,
    inv_scaling,
    row_tiles,
    col_tiles,
    WRITE_V: tl.constexpr,
    WRITE_X: tl.constexpr,
    WRITE_NOISE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    sample, packed, unpacked, mask = _vae_layout_offsets(
        tl.program_id(0), height, width, channels, row_tiles, col_tiles, BLOCK_ROWS, BLOCK_COLS
    )
    sigma_from = tl.load(sigma_from_ptr + sample * sigma_from_stride).to(COMPUTE)
    sigma_to = tl.load(sigma_to_ptr + sample * sigma_to_stride).to(COMPUTE)
    grad = tl.load(grad_ptr + unpacked, mask=mask).to(COMPUTE) * (inv_scaling / (1 - sigma_to))
    if WRITE_V:
        tl.store(grad_v_ptr + packed, ((sigma_to - sigma_from) * grad).to(grad_v_ptr.dtype.element_ty), mask=mask)
    if WRITE_X:
        tl.store(grad_x_ptr + packed, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if WRITE_NOISE:
        tl.store(grad_noise_ptr + packed, (-sigma_to * grad).to(grad_noise_ptr.dtype.element_ty), mask=mask)


def _elementwise_grid(like: torch.Tensor, *sigmas: torch.Tensor) -> tuple[int, int, int, int]:
    """(programs, per_sample, tiles_per_sample, BLOCK): per-sample rows when any sigma varies, else one row."""
    samples = like.shape[0] if any(sigma.numel() > 1 for sigma in sigmas) else 1
    per_sample = like.numel() // samples
    block = block_size(per_sample, ELEMENTWISE_GPU_BLOCK)
    tiles = triton.cdiv(per_sample, block)
    return samples * tiles, per_sample, tiles, block


def _vae_tiles(channels: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, row_tiles, col_tiles) for one packed grid row: 2C tile rows of W columns."""
    block_cols = block_size(width, VAE_GPU_TILE)
    block_rows = block_size(2 * channels, max(1, VAE_GPU_TILE // block_cols))
    return block_rows, block_cols, triton.cdiv(2 * channels, block_rows), triton.cdiv(width, block_cols)


def _check_contiguous(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the kernel; got strides {tensor.stride()}")


def _num_warps(elements_per_program: int) -> int:
    return 8 if elements_per_program >= 4096 else 4


def launch_noise_prior(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> None:
    """``out = sigma * noise + (1 - sigma) * x0``; ``sigma`` is ``[1]`` or ``[B]``."""
    _check_contiguous(x0=x0, noise=noise, out=out)
    if out.numel() == 0:
        return
    programs, per_sample, tiles, block = _elementwise_grid(out, sigma)
    launch(
        _noise_prior_kernel,
        (programs,),
        out.device,
        x0,
        noise,
        sigma,
        int(sigma.numel() > 1),
        out,
        per_sample,
        tiles,
        BLOCK=block,
        COMPUTE=compute_dtype(x0.dtype, noise.dtype),
        num_warps=_num_warps(block),
    )


def launch_noise_prior_backward(
    grad_out: torch.Tensor, sigma: torch.Tensor, grad_x0: torch.Tensor | None, grad_noise: torch.Tensor | None
) -> None:
    """``grad_x0 = (1 - sigma) * grad_out`` and ``grad_noise = sigma * grad_out``, each only if given."""
    _check_contiguous(grad_out=grad_out, grad_x0=grad_x0, grad_noise=grad_noise)
    if grad_out.numel() == 0 or (grad_x0 is None and grad_noise is None):
        return
    programs, per_sample, tiles, block = _elementwise_grid(grad_out, sigma)
    launch(
        _noise_prior_backward_kernel,
        (programs,),
        grad_out.device,
        grad_out,
        sigma,
        int(sigma.numel() > 1),
        grad_out if grad_x0 is None else grad_x0,
        grad_out if grad_noise is None else grad_noise,
        per_sample,
        tiles,
        WRITE_X0=grad_x0 is not None,
        WRITE_NOISE=grad_noise is not None,
        BLOCK=block,
        COMPUTE=compute_dtype(grad_out.dtype, sigma.dtype),
        num_warps=_num_warps(block),
    )


def launch_step_and_recover(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    noise: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """``out = (sample + (sigma_to - sigma_from) * model_output - sigma_to * noise) / (1 - sigma_to)``."""
    _check_contiguous(model_output=model_output, sample=sample, noise=noise, out=out)
    if out.numel() == 0:
        return
    programs, per_sample, tiles, block = _elementwise_grid(out, sigma_from, sigma_to)
    launch(
        _step_and_recover_kernel,
        (programs,),
        out.device,
        model_output,
        sample,
        noise,
        sigma_from,
        int(sigma_from.numel() > 1),
        sigma_to,
        int(sigma_to.numel() > 1),
        out,
        per_sample,
        tiles,
        BLOCK=block,
        COMPUTE=compute_dtype(model_output.dtype, sample.dtype, noise.dtype),
        num_warps=_num_warps(block),
    )


def launch_step_and_recover_backward(
    grad_out: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    grad_model_output: torch.Tensor | None,
    grad_sample: torch.Tensor | None,
    grad_noise: torch.Tensor | None,
) -> None:
    """Gradients of step-and-recover to each input that is given a buffer (``None``: not needed)."""
    _check_contiguous(
        grad_out=grad_out, grad_model_output=grad_model_output, grad_sample=grad_sample, grad_noise=grad_noise
    )
    wanted = (grad_model_output, grad_sample, grad_noise)
    if grad_out.numel() == 0 or all(grad is None for grad in wanted):
        return
    programs, per_sample, tiles, block = _elementwise_grid(grad_out, sigma_from, sigma_to)
    launch(
        _step_and_recover_backward_kernel,
        (programs,),
        grad_out.device,
        grad_out,
        sigma_from,
        int(sigma_from.numel() > 1),
        sigma_to,
        int(sigma_to.numel() > 1),
        *(grad_out if grad is None else grad for grad in wanted),
        per_sample,
        tiles,
        WRITE_V=grad_model_output is not None,
        WRITE_X=grad_sample is not None,
        WRITE_NOISE=grad_noise is not None,
        BLOCK=block,
        COMPUTE=compute_dtype(grad_out.dtype, sigma_to.dtype),
        num_warps=_num_warps(block),
    )


def launch_step_and_recover_to_vae(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    noise: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    scaling_factor: float,
    shift_factor: float,
    out: torch.Tensor,
) -> None:
    """Step-and-recover on packed ``[B, L, 4C]`` latents, written unpacked and un-scaled into ``out`` ``[B, C, H, W]``."""
    _check_contiguous(model_output=model_output, sample=sample, noise=noise, out=out)
    if out.numel() == 0:
        return
    batch, channels, height, width = out.shape
    block_rows, block_cols, row_tiles, col_tiles = _vae_tiles(channels, height, width)
    launch(
        _step_and_recover_to_vae_kernel,
        (batch * (height // 2) * row_tiles * col_tiles,),
        out.device,
        model_output,
        sample,
        noise,
        sigma_from,
        int(sigma_from.numel() > 1),
        sigma_to,
        int(sigma_to.numel() > 1),
        out,
        height,
        width,
        channels,
        1 / scaling_factor,
        shift_factor,
        row_tiles,
        col_tiles,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        COMPUTE=compute_dtype(model_output.dtype, sample.dtype, noise.dtype),
        num_warps=_num_warps(block_rows * block_cols),
    )


def launch_step_and_recover_to_vae_backward(
    grad_out: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    scaling_factor: float,
    grad_model_output: torch.Tensor | None,
    grad_sample: torch.Tensor | None,
    grad_noise: torch.Tensor | None,
) -> None:
    """Gradients of the VAE-layout variant, from unpacked ``grad_out`` back to the packed inputs that are given a buffer."""
    _check_contiguous(
        grad_out=grad_out, grad_model_output=grad_model_output, grad_sample=grad_sample, grad_noise=grad_noise
    )
    wanted = (grad_model_output, grad_sample, grad_noise)
    if grad_out.numel() == 0 or all(grad is None for grad in wanted):
        return
    batch, channels, height, width = grad_out.shape
    block_rows, block_cols, row_tiles, col_tiles = _vae_tiles(channels, height, width)
    launch(
        _step_and_recover_to_vae_backward_kernel,
        (batch * (height // 2) * row_tiles * col_tiles,),
        grad_out.device,
        grad_out,
        sigma_from,
        int(sigma_from.numel() > 1),
        sigma_to,
        int(sigma_to.numel() > 1),
        *(grad_out if grad is None else grad for grad in wanted),
        height,
        width,
        channels,
        1 / scaling_factor,
        row_tiles,
        col_tiles,
        WRITE_V=grad_model_output is not None,
        WRITE_X=grad_sample is not None,
        WRITE_NOISE=grad_noise is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        COMPUTE=compute_dtype(grad_out.dtype, sigma_to.dtype),
        num_warps=_num_warps(block_rows * block_cols),
    )


def _gradient_buffers(ctx, like: torch.Tensor, shape: torch.Size) -> list[torch.Tensor | None]:
    """Buffers for the gradients autograd asks for, in each input's dtype; ``None`` where none is needed."""
    # needs_input_grad also lists the trailing constant arguments (sigmas, sizes), which get no gradient.
    return [
        torch.empty(shape, dtype=dtype, device=like.device) if needed else None
        for needed, dtype in zip(ctx.needs_input_grad, ctx.input_dtypes, strict=False)
    ]


class NoisePrior(torch.autograd.Function):
    """``sigma * noise + (1 - sigma) * x0`` with gradients to ``x0`` and ``noise`` (sigma is a constant)."""

    @staticmethod
    def forward(ctx, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x0.shape, dtype=torch.promote_types(x0.dtype, noise.dtype), device=x0.device)
        launch_noise_prior(x0, noise, sigma, out)
        ctx.save_for_backward(sigma)
        ctx.input_dtypes = (x0.dtype, noise.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (sigma,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x0, grad_noise = _gradient_buffers(ctx, grad_out, grad_out.shape)
        launch_noise_prior_backward(grad_out, sigma, grad_x0, grad_noise)
        return grad_x0, grad_noise, None


class StepAndRecover(torch.autograd.Function):
    """Euler step then recovery with the known noise; gradients to model output, sample and noise."""

    @staticmethod
    def forward(ctx, model_output, sample, noise, sigma_from, sigma_to) -> torch.Tensor:
        out = torch.empty(sample.shape, dtype=_result_dtype(model_output, sample, noise), device=sample.device)
        launch_step_and_recover(model_output, sample, noise, sigma_from, sigma_to, out)
        ctx.save_for_backward(sigma_from, sigma_to)
        ctx.input_dtypes = (model_output.dtype, sample.dtype, noise.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        sigma_from, sigma_to = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grads = _gradient_buffers(ctx, grad_out, grad_out.shape)
        launch_step_and_recover_backward(grad_out, sigma_from, sigma_to, *grads)
        return *grads, None, None


class StepAndRecoverToVae(torch.autograd.Function):
    """Step-and-recover on packed FLUX latents, output unpacked and un-scaled for the VAE decoder."""

    @staticmethod
    def forward(
        ctx, model_output, sample, noise, sigma_from, sigma_to, height, width, scaling_factor, shift_factor
    ) -> torch.Tensor:
        batch, _, packed_channels = sample.shape
        out = torch.empty(
            (batch, packed_channels // 4, height, width),
            dtype=_result_dtype(model_output, sample, noise),
            device=sample.device,
        )
        launch_step_and_recover_to_vae(
            model_output, sample, noise, sigma_from, sigma_to, scaling_factor, shift_factor, out
        )
        ctx.save_for_backward(sigma_from, sigma_to)
        ctx.input_dtypes = (model_output.dtype, sample.dtype, noise.dtype)
        ctx.packed_shape = sample.shape
        ctx.scaling_factor = scaling_factor
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        sigma_from, sigma_to = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grads = _gradient_buffers(ctx, grad_out, ctx.packed_shape)
        launch_step_and_recover_to_vae_backward(grad_out, sigma_from, sigma_to, ctx.scaling_factor, *grads)
        return *grads, None, None, None, None, None, None


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _broadcast_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Same-shape contiguous views or copies; autograd sums gradients back over broadcast dimensions."""
    return [tensor.contiguous() for tensor in torch.broadcast_tensors(*tensors)]


def _sigma_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch_compute_dtype(compute_dtype(*(tensor.dtype for tensor in tensors)))


def add_noise_prior(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Kernel-backed ``diffusers_srpo.ops.add_noise_prior``; ``sigma`` is a float or one value per sample."""
    x0, noise = _broadcast_contiguous(x0, noise)
    sigma = per_sample(sigma, "sigma", x0.shape[0], x0.device, _sigma_dtype(x0, noise))
    return NoisePrior.apply(x0, noise, sigma)


def step_and_recover(model_output: torch.Tensor, sample: torch.Tensor, sigma_from, sigma_to, noise: torch.Tensor):
    """Kernel-backed ``diffusers_srpo.ops.step_and_recover``."""
    model_output, sample, noise = _broadcast_contiguous(model_output, sample, noise)
    dtype = _sigma_dtype(model_output, sample, noise)
    sigma_from = per_sample(sigma_from, "sigma_from", sample.shape[0], sample.device, dtype)
    sigma_to = per_sample(sigma_to, "sigma_to", sample.shape[0], sample.device, dtype)
    return StepAndRecover.apply(model_output, sample, noise, sigma_from, sigma_to)


def step_and_recover_to_vae(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma_from,
    sigma_to,
    noise: torch.Tensor,
    latent_height: int,
    latent_width: int,
    scaling_factor: float,
    shift_factor: float,
) -> torch.Tensor:
    """Kernel-backed ``diffusers_srpo.ops.step_and_recover_to_vae`` (shapes are checked by ``ops``)."""
    model_output, sample, noise = _broadcast_contiguous(model_output, sample, noise)
    dtype = _sigma_dtype(model_output, sample, noise)
    sigma_from = per_sample(sigma_from, "sigma_from", sample.shape[0], sample.device, dtype)
    sigma_to = per_sample(sigma_to, "sigma_to", sample.shape[0], sample.device, dtype)
    return StepAndRecoverToVae.apply(
        model_output,
        sample,
        noise,
        sigma_from,
        sigma_to,
        latent_height,
        latent_width,
        float(scaling_factor),
        float(shift_factor),
    )
