"""Checks of the Triton kernels against float64 PyTorch, shared by the interpreter run and the GPU tests.

On CPU they need Triton's interpreter and the kernels' CPU opt-in set before anything imports
Triton, so ``tests/test_kernels.py`` runs this file in a fresh process::

    TRITON_INTERPRET=1 DIFFUSERS_SRPO_KERNELS_ON_CPU=1 python tests/kernel_checks.py

On a GPU the same ``CASES`` run compiled, in-process, as ``@pytest.mark.gpu`` tests.
Every kernel output is poisoned with NaN before the launch and every element is compared.
Inputs are fresh random numbers; ``KERNEL_CHECKS_SEED`` replays a run (the seed is printed).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
import traceback
import zlib

import torch

from diffusers_srpo import kernels, ops

SEED = int(os.environ.get("KERNEL_CHECKS_SEED", random.randrange(2**31)))
LOW_PRECISION = (torch.bfloat16, torch.float16)
# One unit in the last place of the output (Triton's interpreter truncates to bf16/fp16 rather than rounding).
OUTPUT_ULP = {torch.float64: 2**-52, torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}
# Arithmetic error allowed relative to the sum of the magnitudes of the terms (a few roundings).
COMPUTE_EPS = {torch.float64: 2**-48, torch.float32: 2**-20, torch.float16: 2**-20, torch.bfloat16: 2**-20}
# (batch, per-sample elements): awkward sizes, never a multiple of a block.
ELEMENTWISE_SIZES = [(1, 1), (5, 7), (1, 1000003), (5, 1000003)]
# (batch, channels, latent height, latent width) of FLUX-packed latents.
VAE_SIZES = [(1, 1, 2, 2), (5, 3, 6, 10), (2, 16, 250, 126)]
SRP_SIZES = [(1, 1), (5, 7), (1, 1000003), (5, 1000003)]
FLUX_SCALING, FLUX_SHIFT = 0.3611, 0.1159


def _generator(*salt) -> torch.Generator:
    """A generator per case, so one case replays alone with the same seed."""
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED, *salt)).encode()))


def _randn(shape, dtype, device, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _sigmas(batch, device, generator, low, high) -> torch.Tensor:
    return (low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)).float().to(device)


def _poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _per_sample_column(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.double().reshape(-1, *([1] * (ndim - 1)))


def assert_every_element(name: str, out: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor) -> None:
    """Every element of ``out`` equals the float64 ``expected`` up to output rounding and a few compute roundings."""
    assert out.shape == expected.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    # The last term is one step of the output's subnormal range (fp16 goes subnormal below 6e-5).
    tiny = torch.finfo(out.dtype).tiny * OUTPUT_ULP[out.dtype]
    tolerance = OUTPUT_ULP[out.dtype] * expected.abs() + COMPUTE_EPS[out.dtype] * magnitude + tiny
    error = (out.cpu().double() - expected.cpu()).abs()
    wrong = ~(error <= tolerance)  # NaN (a poisoned element never written) counts as wrong
    if wrong.any():
        first = tuple(int(i) for i in wrong.nonzero()[0])
        raise AssertionError(
            f"{name} (seed {SEED}): {int(wrong.sum())} of {out.numel()} elements wrong; at {first} got "
            f"{out[first].item()}, expected {expected[first].item()}"
        )


@contextlib.contextmanager
def expect_launch(kernel_name: str):
    """Fail unless the block launches ``kernel_name``: the kernel, not the reference, produced the result."""
    before = kernels.launch_counts[kernel_name]
    yield
    assert kernels.launch_counts[kernel_name] > before, f"{kernel_name} did not run"


@contextlib.contextmanager
def expect_no_launch():
    before = sum(kernels.launch_counts.values())
    yield
    assert sum(kernels.launch_counts.values()) == before, "a kernel ran where the reference was expected"


def check_noise_prior(device: str, dtype: torch.dtype, batch: int, per_sample: int) -> None:
    from diffusers_srpo.kernels import flow

    generator = _generator("noise_prior", dtype, batch, per_sample)
    x0, noise, grad = (_randn((batch, per_sample), dtype, device, generator) for _ in range(3))
    sigma = _sigmas(batch, device, generator, 0.05, 0.95)
    s = _per_sample_column(sigma.cpu(), 2)
    x0_64, noise_64, grad_64 = (t.cpu().double() for t in (x0, noise, grad))

    out = _poisoned(x0.shape, dtype, device)
    with expect_launch("_noise_prior_kernel"):
        flow.launch_noise_prior(x0, noise, sigma, out)
    magnitude = (s * noise_64).abs() + ((1 - s) * x0_64).abs()
    assert_every_element("noise prior", out, s * noise_64 + (1 - s) * x0_64, magnitude)

    grad_x0, grad_noise = _poisoned(x0.shape, dtype, device), _poisoned(x0.shape, dtype, device)
    with expect_launch("_noise_prior_backward_kernel"):
        flow.launch_noise_prior_backward(grad, sigma, grad_x0, grad_noise)
    assert_every_element("noise prior grad x0", grad_x0, (1 - s) * grad_64, grad_64.abs())
    assert_every_element("noise prior grad noise", grad_noise, s * grad_64, grad_64.abs())


def check_step_and_recover(device: str, dtype: torch.dtype, batch: int, per_sample: int) -> None:
    from diffusers_srpo.kernels import flow

    generator = _generator("step_and_recover", dtype, batch, per_sample)
    v, x, noise, grad = (_randn((batch, per_sample), dtype, device, generator) for _ in range(4))
    sigma_from = _sigmas(batch, device, generator, 0.1, 0.95)
    sigma_to = _sigmas(batch, device, generator, 0.05, 0.9)
    s_from, s_to = _per_sample_column(sigma_from.cpu(), 2), _per_sample_column(sigma_to.cpu(), 2)
    v64, x64, noise64, grad64 = (t.cpu().double() for t in (v, x, noise, grad))

    out = _poisoned(x.shape, dtype, device)
    with expect_launch("_step_and_recover_kernel"):
        flow.launch_step_and_recover(v, x, noise, sigma_from, sigma_to, out)
    expected = (x64 + (s_to - s_from) * v64 - s_to * noise64) / (1 - s_to)
    magnitude = (x64.abs() + ((s_to - s_from) * v64).abs() + (s_to * noise64).abs()) / (1 - s_to)
    assert_every_element("step_and_recover", out, expected, magnitude)

    grads = [_poisoned(x.shape, dtype, device) for _ in range(3)]
    with expect_launch("_step_and_recover_backward_kernel"):
        flow.launch_step_and_recover_backward(grad, sigma_from, sigma_to, *grads)
    scale = grad64 / (1 - s_to)
    for name, got, expected in zip(
        ("v", "sample", "noise"), grads, ((s_to - s_from) * scale, scale, -s_to * scale), strict=True
    ):
        assert_every_element(f"step_and_recover grad {name}", got, expected, expected.abs())


def _unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FluxPipeline._unpack_latents for a latent (not pixel) size."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=1)


def check_step_and_recover_to_vae(device: str, dtype: torch.dtype, batch: int, channels: int, height: int, width: int):
    from diffusers import FluxPipeline
    from diffusers_srpo.kernels import flow

    generator = _generator("to_vae", dtype, batch, channels, height, width)
    packed_shape = (batch, (height // 2) * (width // 2), 4 * channels)
    v, x, noise = (_randn(packed_shape, dtype, device, generator) for _ in range(3))
    grad = _randn((batch, channels, height, width), dtype, device, generator)
    sigma_from = _sigmas(batch, device, generator, 0.1, 0.95)
    sigma_to = _sigmas(batch, device, generator, 0.05, 0.9)
    s_from, s_to = _per_sample_column(sigma_from.cpu(), 3), _per_sample_column(sigma_to.cpu(), 3)
    v64, x64, noise64 = (t.cpu().double() for t in (v, x, noise))

    out = _poisoned(grad.shape, dtype, device)
    with expect_launch("_step_and_recover_to_vae_kernel"):
        flow.launch_step_and_recover_to_vae(v, x, noise, sigma_from, sigma_to, FLUX_SCALING, FLUX_SHIFT, out)
    x0_hat = (x64 + (s_to - s_from) * v64 - s_to * noise64) / (1 - s_to)
    magnitude = (x64.abs() + ((s_to - s_from) * v64).abs() + (s_to * noise64).abs()) / (1 - s_to) / FLUX_SCALING
    expected = _unpack(x0_hat, height, width) / FLUX_SCALING + FLUX_SHIFT
    assert_every_element("step_and_recover_to_vae", out, expected, _unpack(magnitude, height, width) + FLUX_SHIFT)

    grads = [_poisoned(packed_shape, dtype, device) for _ in range(3)]
    with expect_launch("_step_and_recover_to_vae_backward_kernel"):
        flow.launch_step_and_recover_to_vae_backward(grad, sigma_from, sigma_to, FLUX_SCALING, *grads)
    # The adjoint of unpacking is packing: compare in the packed layout.
    packed_grad = FluxPipeline._pack_latents(grad.cpu().double(), batch, channels, height, width)
    scale = packed_grad / ((1 - s_to) * FLUX_SCALING)
    for name, got, expected in zip(
        ("v", "sample", "noise"), grads, ((s_to - s_from) * scale, scale, -s_to * scale), strict=True
    ):
        assert_every_element(f"step_and_recover_to_vae grad {name}", got, expected, expected.abs())


def check_srp(device: str, dtype: torch.dtype, batch: int, dim: int) -> None:
    from diffusers_srpo.kernels import srp

    generator = _generator("srp", dtype, batch, dim)
    image, positive, negative = (_randn((batch, dim), dtype, device, generator) for _ in range(3))
    k = _sigmas(batch, device, generator, 0.01, 0.3)
    grad = _randn((batch,), dtype, device, generator)
    scale = 2.5
    e, t_pos, t_neg, g = (t.cpu().double() for t in (image, positive, negative, grad))
    one_plus_k = 1 + k.cpu().double()[:, None]
    direction = one_plus_k * t_pos - t_neg
    # What rounding in the kernel's d = (1 + k) t_pos - t_neg is relative to: the terms, not d (they may cancel).
    direction_terms = one_plus_k * t_pos.abs() + t_neg.abs()
    norm = e.norm(dim=-1, keepdim=True)

    score = _poisoned((batch,), dtype, device)
    norm_out, dot_out = _poisoned((batch,), torch.float32, device), _poisoned((batch,), torch.float32, device)
    with expect_launch("_srp_forward_kernel"):
        srp.launch_srp_forward(image, positive, negative, k, scale, score, norm_out, dot_out)
    expected = scale * (e * direction).sum(-1) / norm[:, 0]
    # A dot product's rounding error is a few roundings of the sum of its terms' magnitudes.
    magnitude = scale * (e.abs() * direction_terms).sum(-1) / norm[:, 0]
    assert_every_element("srp score", score, expected, magnitude)

    grads = [_poisoned((batch, dim), dtype, device) for _ in range(3)]
    with expect_launch("_srp_backward_kernel"):
        srp.launch_srp_backward(grad, image, positive, negative, k, scale, norm_out, dot_out, *grads)
    unit = e / norm
    g_scaled = scale * g[:, None] / norm
    expected_image = g_scaled * (direction - unit * (unit * direction).sum(-1, keepdim=True))
    magnitude_image = g_scaled.abs() * (
        direction_terms + unit.abs() * (unit.abs() * direction_terms).sum(-1, keepdim=True)
    )
    assert_every_element("srp grad image", grads[0], expected_image, magnitude_image)
    expected_positive = scale * g[:, None] * one_plus_k * unit
    assert_every_element("srp grad positive", grads[1], expected_positive, expected_positive.abs())
    expected_negative = -scale * g[:, None] * unit
    assert_every_element("srp grad negative", grads[2], expected_negative, expected_negative.abs())


def check_gradcheck(device: str) -> None:
    """torch.autograd.gradcheck on the kernels' autograd Functions, computing in float64."""
    from diffusers_srpo.kernels import flow, srp

    generator = _generator("gradcheck")

    def leaf(*shape):
        return _randn(shape, torch.float64, device, generator).requires_grad_()

    sigma_from = torch.tensor([0.9, 0.6], dtype=torch.float64, device=device)
    sigma_to = torch.tensor([0.7, 0.8], dtype=torch.float64, device=device)
    with expect_launch("_noise_prior_backward_kernel"):
        assert torch.autograd.gradcheck(flow.NoisePrior.apply, (leaf(2, 3), leaf(2, 3), sigma_from))
    with expect_launch("_step_and_recover_backward_kernel"):
        assert torch.autograd.gradcheck(
            flow.StepAndRecover.apply, (leaf(2, 3), leaf(2, 3), leaf(2, 3), sigma_from, sigma_to)
        )
    with expect_launch("_step_and_recover_to_vae_backward_kernel"):
        # Binary-exact VAE factors: the kernels take Python floats as fp32 scalars.
        inputs = (leaf(2, 2, 8), leaf(2, 2, 8), leaf(2, 2, 8), sigma_from, sigma_to, 2, 4, 0.5, 0.125)
        assert torch.autograd.gradcheck(flow.StepAndRecoverToVae.apply, inputs)
    with expect_launch("_srp_backward_kernel"):
        k = torch.tensor([0.25, 0.125], dtype=torch.float64, device=device)
        assert torch.autograd.gradcheck(srp.SrpScore.apply, (leaf(2, 5), leaf(2, 5), leaf(2, 5), k, 2.5))


def check_ops_dispatch(device: str) -> None:
    """``diffusers_srpo.ops`` sends these tensors to the kernels, with the gradients the reference gives."""
    generator = _generator("dispatch")
    x0, noise, v = (_randn((3, 5, 8), torch.float32, device, generator) for _ in range(3))
    v.requires_grad_()
    sigma = torch.tensor([0.9, 0.7, 0.5], device=device)
    v_packed, x_packed, noise_packed = (_randn((2, 6, 12), torch.float32, device, generator) for _ in range(3))
    v_packed.requires_grad_()
    embeds = [_randn((3, 16), torch.float32, device, generator).requires_grad_() for _ in range(3)]
    # kernel -> (the op call, the leaves whose gradients must match the reference's)
    calls = {
        "_noise_prior_kernel": (lambda: ops.add_noise_prior(v, noise, sigma), [v]),
        "_step_and_recover_kernel": (lambda: ops.step_and_recover(v, x0, sigma, 0.6, noise), [v]),
        "_step_and_recover_to_vae_kernel": (
            lambda: ops.step_and_recover_to_vae(
                v_packed, x_packed, 0.9, sigma[:2], noise_packed, 4, 6, FLUX_SCALING, FLUX_SHIFT
            ),
            [v_packed],
        ),
        "_srp_forward_kernel": (lambda: ops.srp_score(*embeds, sigma, scale=1.5), embeds),
    }
    for kernel_name, (call, leaves) in calls.items():
        with expect_launch(kernel_name):
            fused = call()
        with expect_no_launch(), ops.reference_only():
            reference = call()
        _assert_matches_reference(kernel_name, fused, reference)
        weights = torch.randn_like(fused)
        for got, expected in zip(
            torch.autograd.grad(fused, leaves, weights), torch.autograd.grad(reference, leaves, weights), strict=True
        ):
            _assert_matches_reference(f"{kernel_name} gradient", got, expected)

    # Every switch forces the reference.
    with expect_no_launch():
        ops.use_reference(True)
        try:
            ops.add_noise_prior(x0, noise, sigma)
        finally:
            ops.use_reference(False)
        os.environ[ops.DISABLE_KERNELS_ENV] = "1"
        try:
            ops.add_noise_prior(x0, noise, sigma)
        finally:
            del os.environ[ops.DISABLE_KERNELS_ENV]
        # A sigma that needs a gradient: the kernels have none to give, so the reference runs and gives it.
        sigma_leaf = sigma.clone().requires_grad_()
        ops.add_noise_prior(x0, noise, sigma_leaf).sum().backward()
        assert sigma_leaf.grad is not None


def check_noncontiguous_and_broadcast(device: str, dtype: torch.dtype) -> None:
    """Transposed, sliced and broadcast inputs, and every per-sample form of sigma and k, give the reference's
    values and gradients through each kernel."""
    generator = _generator("layout", dtype)

    def randn(*shape):
        return _randn(shape, dtype, device, generator)

    def leaf(tensor):
        return tensor.requires_grad_()

    batch = 5
    sigma = torch.linspace(0.9, 0.5, batch, device=device)
    transposed = leaf(randn(7, batch, 3).transpose(0, 1))  # [5, 7, 3], not contiguous
    every_other = leaf(randn(batch, 7, 6)[..., ::2])  # [5, 7, 3], every other column
    row = leaf(randn(1, 7, 3))  # broadcast over the batch
    packed_transposed = leaf(randn(2, 12, 6).transpose(1, 2))  # packed [2, 6, 12] latents, not contiguous
    packed, packed_row = randn(2, 6, 12), leaf(randn(1, 6, 12))
    image = leaf(randn(16, batch).t())  # [5, 16], not contiguous
    positive, negative = leaf(randn(1, 16)), leaf(randn(batch, 32)[:, ::2])
    scale = torch.tensor(1.7, device=device)  # a 0-d tensor scale that needs no gradient is a constant too
    # kernel -> (the op call, the leaves whose gradients must match the reference's)
    calls = {
        "_noise_prior_kernel": (
            lambda: ops.add_noise_prior(transposed, row, sigma.reshape(batch, 1, 1)),
            [transposed, row],
        ),
        "_step_and_recover_kernel": (
            lambda: ops.step_and_recover(transposed, every_other, sigma, torch.tensor([0.3], device=device), row),
            [transposed, every_other, row],
        ),
        "_step_and_recover_to_vae_kernel": (
            lambda: ops.step_and_recover_to_vae(
                packed_transposed,
                packed,
                torch.tensor(0.8, device=device),
                sigma[:2].reshape(2, 1, 1),
                packed_row,
                4,
                6,
                FLUX_SCALING,
                FLUX_SHIFT,
            ),
            [packed_transposed, packed_row],
        ),
        "_srp_forward_kernel": (
            lambda: ops.srp_score(image, positive, negative, 0.15, scale),
            [image, positive, negative],
        ),
    }
    for kernel_name, (call, leaves) in calls.items():
        with expect_launch(kernel_name):
            fused = call()
        with expect_no_launch(), ops.reference_only():
            reference = call()
        assert fused.dtype == reference.dtype == dtype, f"{kernel_name}: {fused.dtype}, reference {reference.dtype}"
        _assert_matches_reference(kernel_name, fused, reference)
        weights = torch.randn_like(fused)
        for got, expected in zip(
            torch.autograd.grad(fused, leaves, weights), torch.autograd.grad(reference, leaves, weights), strict=True
        ):
            assert got.dtype == expected.dtype, f"{kernel_name} gradient: {got.dtype}, reference {expected.dtype}"
            _assert_matches_reference(f"{kernel_name} gradient", got, expected)


def _assert_matches_reference(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to a few low-precision roundings, relative to the largest value: a broadcast input's gradient is
    a sum in its own dtype, where the kernel's and the reference's roundings may meet cancellation."""
    if got.dtype in LOW_PRECISION:
        ulps = 4 * OUTPUT_ULP[got.dtype]
        tolerance = {"rtol": ulps, "atol": ulps * expected.abs().max().item()}
    else:
        tolerance = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, expected, **tolerance, msg=lambda message: f"{name}: {message}")


def _cases():
    cases = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        small = dtype is not torch.float32  # low precision on the small sizes and one large one
        for batch, per_sample in ELEMENTWISE_SIZES[:3] if small else ELEMENTWISE_SIZES:
            suffix = f"{str(dtype)[6:]}-{batch}x{per_sample}"
            cases[f"noise_prior-{suffix}"] = lambda d, a=(dtype, batch, per_sample): check_noise_prior(d, *a)
            cases[f"step_and_recover-{suffix}"] = lambda d, a=(dtype, batch, per_sample): check_step_and_recover(d, *a)
        for batch, channels, height, width in VAE_SIZES[:2] if small else VAE_SIZES:
            suffix = f"{str(dtype)[6:]}-{batch}x{channels}x{height}x{width}"
            cases[f"to_vae-{suffix}"] = lambda d, a=(dtype, batch, channels, height, width): (
                check_step_and_recover_to_vae(d, *a)
            )
        for batch, dim in SRP_SIZES[:3] if small else SRP_SIZES:
            cases[f"srp-{str(dtype)[6:]}-{batch}x{dim}"] = lambda d, a=(dtype, batch, dim): check_srp(d, *a)
        cases[f"layout-{str(dtype)[6:]}"] = lambda d, a=dtype: check_noncontiguous_and_broadcast(d, a)
    cases["gradcheck"] = check_gradcheck
    cases["ops_dispatch"] = check_ops_dispatch
    return cases


CASES = _cases()


def main() -> int:
    if not kernels.accepts_cpu_tensors():
        print("set TRITON_INTERPRET=1 and DIFFUSERS_SRPO_KERNELS_ON_CPU=1 before running this on CPU", file=sys.stderr)
        return 2
    print(f"seed {SEED}")
    failures = 0
    for name, case in CASES.items():
        start = time.perf_counter()
        try:
            case("cpu")
        except Exception:  # report every failing case, not only the first
            failures += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"ok   {name} ({time.perf_counter() - start:.2f} s)", flush=True)
    print(f"{len(CASES) - failures} passed, {failures} failed")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
