"""The fused kernels and their dispatch in diffusers_srpo.ops.

The kernel checks themselves live in ``kernel_checks.py``: on CPU they run under Triton's
interpreter in a fresh process (``TRITON_INTERPRET`` must be set before ``triton`` is first
imported, and this process may have imported it already); on a GPU they run compiled, here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kernel_checks
import pytest
import torch

from diffusers_srpo import kernels, ops

CHECKS_SCRIPT = Path(kernel_checks.__file__)


@pytest.mark.slow
def test_kernels_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", DIFFUSERS_SRPO_KERNELS_ON_CPU="1", CUDA_VISIBLE_DEVICES="")
    env.pop(ops.DISABLE_KERNELS_ENV, None)
    result = subprocess.run([sys.executable, str(CHECKS_SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert f"{len(kernel_checks.CASES)} passed, 0 failed" in result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(kernel_checks.CASES))
def test_kernels_compiled_on_cuda(name):
    kernel_checks.CASES[name]("cuda")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Let CPU tensors through the dispatch, with the kernels' entry points replaced by recorders."""
    from diffusers_srpo.kernels import flow, srp

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DIFFUSERS_SRPO_KERNELS_ON_CPU", "1")
    monkeypatch.delenv(ops.DISABLE_KERNELS_ENV, raising=False)
    calls = []
    for module, name in [(flow, "add_noise_prior"), (flow, "step_and_recover"), (srp, "srp_score")]:
        monkeypatch.setattr(module, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    return calls


def _latents(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def test_dispatch_sends_opted_in_tensors_to_the_kernels(kernel_calls):
    x0, noise = _latents(2, 3, 4), _latents(2, 3, 4)
    ops.add_noise_prior(x0, noise, torch.tensor([0.9, 0.8]))
    ops.step_and_recover(x0, x0, 0.9, torch.tensor([0.8, 0.7]).reshape(2, 1, 1), noise)
    ops.srp_score(x0[:, 0], x0[:1, 0], noise[:, 0], 0.1)  # one text row for the whole batch
    assert kernel_calls == ["add_noise_prior", "step_and_recover", "srp_score"]


def test_every_switch_forces_the_reference(kernel_calls, monkeypatch):
    x0, noise = _latents(2, 3), _latents(2, 3)
    with ops.reference_only():
        with ops.reference_only():
            ops.add_noise_prior(x0, noise, 0.5)
        ops.add_noise_prior(x0, noise, 0.5)  # the inner block must not have switched the kernels back on
    ops.use_reference(True)
    try:
        ops.add_noise_prior(x0, noise, 0.5)
    finally:
        ops.use_reference(False)
    monkeypatch.setenv(ops.DISABLE_KERNELS_ENV, "1")
    ops.add_noise_prior(x0, noise, 0.5)
    assert kernel_calls == []
    monkeypatch.setenv(ops.DISABLE_KERNELS_ENV, "0")
    ops.add_noise_prior(x0, noise, 0.5)
    assert kernel_calls == ["add_noise_prior"]


@pytest.mark.parametrize(
    "why, call",
    [
        ("a sigma that needs a gradient", lambda x: ops.add_noise_prior(x, x, torch.tensor(0.5, requires_grad=True))),
        ("a per-element sigma", lambda x: ops.add_noise_prior(x, x, torch.full((2, 3), 0.5))),
        ("integer tensors", lambda x: ops.add_noise_prior(x.long(), x.long(), 0.5)),
        ("inputs of different ranks", lambda x: ops.step_and_recover(x, x, 0.9, 0.8, x[0])),
        ("a k that needs a gradient", lambda x: ops.srp_score(x, x, x, torch.tensor(0.1, requires_grad=True))),
        ("a per-row scale", lambda x: ops.srp_score(x, x, x, 0.1, scale=torch.ones(2))),
        ("a scale that needs a gradient", lambda x: ops.srp_score(x, x, x, 0.1, torch.tensor(2.0, requires_grad=True))),
    ],
)
def test_inputs_the_kernels_do_not_take_run_the_reference(kernel_calls, why, call):
    call(_latents(2, 3))
    assert kernel_calls == [], why


def test_cpu_tensors_never_reach_a_kernel_by_default(monkeypatch):
    monkeypatch.delenv("DIFFUSERS_SRPO_KERNELS_ON_CPU", raising=False)
    before = sum(kernels.launch_counts.values())
    x0, noise, v = _latents(2, 4, 8), _latents(2, 4, 8), _latents(2, 4, 8)
    ops.add_noise_prior(x0, noise, 0.7)
    ops.step_and_recover(v, x0, 0.9, 0.7, noise)
    ops.step_and_recover_to_vae(v, x0, 0.9, 0.7, noise, 2, 8, 0.36, 0.12)
    ops.srp_score(x0[:, 0], noise[:, 0], v[:, 0], 0.2)
    assert sum(kernels.launch_counts.values()) == before


def test_importing_and_cpu_work_do_not_load_the_kernels():
    # diffusers (which the package imports) may import triton itself; what must not happen on CPU is that
    # ops loads a kernel module or that the work imports anything of Triton's.
    probe = (
        "import sys, torch\n"
        "from diffusers_srpo import ops\n"
        "imported = set(sys.modules)\n"
        "x = torch.zeros(2, 4, 8)\n"
        "ops.add_noise_prior(x, x, 0.7)\n"
        "ops.step_and_recover(x, x, 0.9, 0.8, x)\n"
        "ops.step_and_recover_to_vae(x, x, 0.9, 0.8, x, 2, 8, 0.36, 0.12)\n"
        "ops.srp_score(x[:, 0], x[:, 1], x[:, 2], 0.2)\n"
        "print(sorted(m for m in sys.modules if m.startswith('diffusers_srpo.kernels.')\n"
        "             or (m not in imported and m.split('.')[0] == 'triton')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"


def _float64_leaves(*shapes):
    return [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in shapes]


def test_reference_gradients_float64():
    sigma_from, sigma_to = torch.tensor([0.9, 0.6], dtype=torch.float64), torch.tensor([0.7, 0.8], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x0, noise: ops.add_noise_prior_reference(x0, noise, sigma_from), _float64_leaves((2, 3), (2, 3))
    )
    assert torch.autograd.gradcheck(
        lambda v, x, noise: ops.step_and_recover_reference(v, x, sigma_from, sigma_to, noise),
        _float64_leaves((2, 3), (2, 3), (2, 3)),
    )
    assert torch.autograd.gradcheck(
        lambda v, x, noise: ops.step_and_recover_to_vae_reference(v, x, sigma_from, sigma_to, noise, 2, 4, 0.36, 0.12),
        _float64_leaves((2, 2, 8), (2, 2, 8), (2, 2, 8)),
    )
    assert torch.autograd.gradcheck(lambda v, x: ops.one_step_x0(v, x, sigma_to), _float64_leaves((2, 3), (2, 3)))
    k = torch.tensor([0.2, 0.05], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda e, pos, neg: ops.srp_score_reference(e, pos, neg, k, scale=2.5), _float64_leaves((2, 5), (2, 5), (2, 5))
    )


@pytest.mark.parametrize("batch, channels, height, width", [(1, 1, 2, 2), (3, 16, 6, 10)])
def test_step_and_recover_to_vae_is_unpack_then_unscale(batch, channels, height, width):
    from diffusers import FluxPipeline

    v, x, noise = (_latents(batch, (height // 2) * (width // 2), 4 * channels) for _ in range(3))
    sigma_from, sigma_to = torch.rand(batch) * 0.5 + 0.45, torch.rand(batch) * 0.5 + 0.2
    scaling, shift = 0.3611, 0.1159
    got = ops.step_and_recover_to_vae(v, x, sigma_from, sigma_to, noise, height, width, scaling, shift)
    x0_hat = ops.step_and_recover(v, x, sigma_from, sigma_to, noise)
    vae_scale_factor = 8  # _unpack_latents takes the pixel size
    unpacked = FluxPipeline._unpack_latents(
        x0_hat, height * vae_scale_factor, width * vae_scale_factor, vae_scale_factor
    )
    torch.testing.assert_close(got, unpacked / scaling + shift)


@pytest.mark.parametrize(
    "shape, height, width, message",
    [
        ((1, 4, 16), 4, 6, "packed latents have 4 tokens; a 4x6 latent packs into 6"),
        ((1, 4, 16), 4, 5, "latent size must be positive and even"),
        ((1, 4, 6), 4, 4, "packed latents have 6 channels; expected a multiple of 4"),
        ((4, 16), 4, 4, "packed latents must be [B, tokens, channels]; got shape (4, 16)"),
    ],
)
def test_step_and_recover_to_vae_names_bad_shapes(shape, height, width, message):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ops.step_and_recover_to_vae(x, x, 0.9, 0.8, x, height, width, 0.36, 0.12)


def test_reference_rounds_low_precision_once():
    # Computing in bf16 would round sigma = 0.964 to 0.9648 and miss 1 - sigma by 2 %.
    v, x, noise = (_latents(4, 64, dtype=torch.bfloat16) for _ in range(3))
    got = ops.step_and_recover(v, x, 0.99, 0.964, noise)
    v64, x64, noise64 = v.double(), x.double(), noise.double()
    expected = (x64 + (0.964 - 0.99) * v64 - 0.964 * noise64) / (1 - 0.964)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected.to(torch.bfloat16).double(), rtol=2**-7, atol=1e-2)
