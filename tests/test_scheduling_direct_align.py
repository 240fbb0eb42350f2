"""DirectAlignScheduler: sampling parity, config round trip, SPEC geometry, noise-prior arithmetic, validation."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_srpo import ops
from diffusers_srpo.scheduling_direct_align import DirectAlignScheduler, DirectAlignSigmas
from diffusers_srpo.testing import FLUX_DEV_SCHEDULER_CONFIG

SPEC_DEFAULTS = {
    "train_window_start": 5,
    "train_window_end": 25,
    "train_grid_steps": 50,
    "train_grid_resolution": 1000,
    "branch_offset_fraction": 0.1,
    "min_grid_index": 5,
    "direct_align_shift": 3.0,
    "rollout_steps": 25,
    "denoise_discount_start": 0.1,
    "denoise_discount_end": 0.25,
    "invert_discount_start": 0.3,
    "invert_discount_end": 0.01,
}

# Every Direct-Align setting changed from its default, plus two sampler settings.
NON_DEFAULT_SETTINGS = {
    "train_window_start": 30,
    "train_window_end": 49,
    "train_grid_steps": 60,
    "train_grid_resolution": 200,
    "branch_offset_fraction": 0.25,
    "min_grid_index": 1,
    "direct_align_shift": 2.0,
    "rollout_steps": 10,
    "denoise_discount_start": 0.2,
    "denoise_discount_end": 0.5,
    "invert_discount_start": 0.6,
    "invert_discount_end": 0.05,
    "shift": 1.5,
    "use_dynamic_shifting": True,
}


def reference_geometry(m, *, start=5, end=25, grid_steps=50, resolution=1000, shift=3.0, offset=100, ramps=None):
    """SPEC section 1 step 3, written out in float64 with numpy, for one grid index m."""
    denoise_ramp, invert_ramp = ramps or ((0.1, 0.25), (0.3, 0.01))
    t = np.linspace(1.0, 0.0, grid_steps + 1)
    grid = shift * t / (1 + (shift - 1) * t)
    window = np.linspace(grid[start], grid[end], resolution)
    clamped = min(resolution - m, offset, m)
    j = max(m - clamped, 1)
    return {
        "sigma_hi": window[resolution - m - clamped],
        "sigma_mid": window[resolution - m],
        "sigma_lo": window[resolution - j],
        "sigma_invert_to": window[resolution - min(j + clamped, resolution)],
        "offset": clamped,
        "invert_index": j,
        "denoise_discount": np.linspace(*denoise_ramp, resolution)[m],
        "invert_discount": np.linspace(*invert_ramp, resolution)[j],
    }


def assert_geometry(scheduler, grid_indices, **reference_kwargs):
    sigmas = scheduler.training_sigmas_at(torch.tensor(grid_indices))
    assert sigmas.grid_index.tolist() == list(grid_indices)
    for i, m in enumerate(grid_indices):
        expected = reference_geometry(m, **reference_kwargs)
        for name, value in expected.items():
            actual = getattr(sigmas, name)[i].item()
            assert actual == pytest.approx(value, rel=1e-6, abs=1e-7), f"{name} at m={m}"
    return sigmas


# --- sampling parity ---------------------------------------------------------------------------------


def _generate(pipe):
    return pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=3.5,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_pipeline_sampling_is_bit_identical(tiny_pipe):
    stock_scheduler = tiny_pipe.scheduler
    try:
        stock_images = _generate(tiny_pipe)
        tiny_pipe.scheduler = DirectAlignScheduler.from_config(stock_scheduler.config)
        direct_align_images = _generate(tiny_pipe)
        # Control: the pipeline does sample with the swapped-in scheduler, so a changed sampler setting shows.
        tiny_pipe.scheduler = DirectAlignScheduler.from_config(stock_scheduler.config, max_shift=2.0)
        control_images = _generate(tiny_pipe)
    finally:
        tiny_pipe.scheduler = stock_scheduler
    np.testing.assert_array_equal(direct_align_images, stock_images)
    assert not np.array_equal(control_images, stock_images)


@pytest.mark.parametrize(
    "config, mu",
    [(FLUX_DEV_SCHEDULER_CONFIG, 0.8), ({"shift": 3.0}, None), ({"shift": 3.0, "stochastic_sampling": True}, None)],
)
def test_step_is_bit_identical(config, mu):
    stock = FlowMatchEulerDiscreteScheduler(**config)
    direct_align = DirectAlignScheduler(**config)
    trajectories = []
    for scheduler in (stock, direct_align):
        scheduler.set_timesteps(5, mu=mu)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(2, 16, 8, generator=generator)
        for t in scheduler.timesteps:
            velocity = torch.sin(sample * 3 + t / 1000)  # any deterministic stand-in for the model
            sample = scheduler.step(velocity, t, sample, generator=generator).prev_sample
        trajectories.append((scheduler.timesteps, scheduler.sigmas, sample))
    for stock_tensor, direct_align_tensor in zip(*trajectories, strict=True):
        torch.testing.assert_close(direct_align_tensor, stock_tensor, rtol=0, atol=0)


# --- config --------------------------------------------------------------------------------------------


def test_stock_flux_dev_scheduler_config_loads_with_spec_defaults(tmp_path):
    # scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev, as published.
    stock_config = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0",
        **FLUX_DEV_SCHEDULER_CONFIG,
    }
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(stock_config))
    scheduler = DirectAlignScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert isinstance(scheduler, DirectAlignScheduler)
    for name, value in {**FLUX_DEV_SCHEDULER_CONFIG, **SPEC_DEFAULTS}.items():
        assert scheduler.config[name] == value, name
    assert scheduler.branch_offset == 100


def test_config_round_trips_non_default_settings(tmp_path):
    scheduler = DirectAlignScheduler(**NON_DEFAULT_SETTINGS)
    scheduler.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DirectAlignScheduler"
    for loaded in (DirectAlignScheduler.from_pretrained(tmp_path), DirectAlignScheduler.from_config(scheduler.config)):
        for name, value in NON_DEFAULT_SETTINGS.items():
            assert loaded.config[name] == value, name
        assert len(loaded.rollout_sigmas()) == NON_DEFAULT_SETTINGS["rollout_steps"] + 1
        assert len(loaded.training_window_sigmas()) == NON_DEFAULT_SETTINGS["train_grid_resolution"]


# --- geometry ------------------------------------------------------------------------------------------


def test_training_window_ends_and_branch_offset():
    scheduler = DirectAlignScheduler()
    window = scheduler.training_window_sigmas()
    assert window.shape == (1000,)
    # shift 3 at t = 0.9 and t = 0.5: 2.7 / 2.8 and 1.5 / 2.
    assert window[0].item() == pytest.approx(2.7 / 2.8, abs=1e-12)
    assert window[-1].item() == pytest.approx(0.75, abs=1e-12)
    assert torch.all(window[1:] < window[:-1])
    assert scheduler.branch_offset == int((1 - 0.9) * 1000) + 1 == 100


def test_geometry_matches_spec_with_default_settings():
    scheduler = DirectAlignScheduler()
    # The ends of m's sampled range, both sides of each clamp (m = k and m = T - k), the middle, and the extreme
    # indices 1 and T - 1 that training_sigmas_at accepts.
    grid_indices = [1, 5, 6, 50, 99, 100, 101, 500, 899, 900, 901, 994, 995, 999]
    sigmas = assert_geometry(scheduler, grid_indices)
    at = {m: i for i, m in enumerate(grid_indices)}
    # Discounts at the ends of the ramps, by hand: ramp[i] = start + (end - start) * i / 999.
    assert sigmas.denoise_discount[at[999]].item() == pytest.approx(0.25, rel=1e-7)
    assert sigmas.denoise_discount[at[1]].item() == pytest.approx(0.1 + 0.15 / 999, rel=1e-7)
    assert sigmas.denoise_discount[at[5]].item() == pytest.approx(0.1 + 0.15 * 5 / 999, rel=1e-7)
    assert sigmas.denoise_discount[at[995]].item() == pytest.approx(0.1 + 0.15 * 995 / 999, rel=1e-7)
    assert sigmas.invert_discount[at[5]].item() == pytest.approx(0.3 - 0.29 / 999, rel=1e-7)  # j = 1
    assert sigmas.invert_discount[at[995]].item() == pytest.approx(0.3 - 0.29 * 990 / 999, rel=1e-7)  # j = 990
    # k' clamps to m at the clean end and to T - m at the noisy end; j clamps to 1.
    assert sigmas.offset[at[5]] == 5 and sigmas.invert_index[at[5]] == 1
    assert sigmas.offset[at[995]] == 5 and sigmas.sigma_hi[at[995]] == sigmas.sigma_hi.max()
    assert sigmas.offset[at[500]] == 100 and sigmas.sigma_invert_to[at[500]] == sigmas.sigma_mid[at[500]]
    assert torch.all(sigmas.sigma_hi > sigmas.sigma_mid) and torch.all(sigmas.sigma_lo < sigmas.sigma_invert_to)


def test_geometry_matches_spec_with_non_default_settings():
    scheduler = DirectAlignScheduler(**NON_DEFAULT_SETTINGS)
    sigmas = assert_geometry(
        scheduler,
        [1, 2, 49, 50, 51, 100, 149, 150, 151, 198, 199],
        start=30,
        end=49,
        grid_steps=60,
        resolution=200,
        shift=2.0,
        offset=50,
        ramps=((0.2, 0.5), (0.6, 0.05)),
    )
    # m = T - 1 sits on the end of the denoise ramp.
    assert sigmas.denoise_discount[-1].item() == pytest.approx(0.5)


def test_sample_training_sigmas_is_reproducible_and_covers_the_range():
    scheduler = DirectAlignScheduler()
    first = scheduler.sample_training_sigmas(20000, generator=torch.Generator().manual_seed(3))
    again = scheduler.sample_training_sigmas(20000, generator=torch.Generator().manual_seed(3), device="cpu")
    other = scheduler.sample_training_sigmas(20000, generator=torch.Generator().manual_seed(4))
    for field in dataclasses.fields(DirectAlignSigmas):
        value = getattr(first, field.name)
        assert value.shape == (20000,), field.name
        assert value.dtype == (torch.int64 if field.name in ("grid_index", "offset", "invert_index") else torch.float32)
        torch.testing.assert_close(getattr(again, field.name), value, rtol=0, atol=0)
    assert not torch.equal(other.grid_index, first.grid_index)
    # Uniform on {5, ..., 995}, both ends included (missing an end in 20000 draws has probability ~1e-9).
    assert first.grid_index.min() == 5 and first.grid_index.max() == 995
    # The drawn indices carry the geometry of training_sigmas_at, which the tests above pin to the SPEC.
    recomputed = scheduler.training_sigmas_at(first.grid_index)
    torch.testing.assert_close(recomputed.sigma_hi, first.sigma_hi, rtol=0, atol=0)
    torch.testing.assert_close(recomputed.invert_discount, first.invert_discount, rtol=0, atol=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.sigma_hi = first.sigma_mid


def test_training_sigmas_at_rejects_indices_off_the_grid():
    scheduler = DirectAlignScheduler()
    with pytest.raises(ValueError, match="grid_index"):
        scheduler.training_sigmas_at(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="grid_index"):
        scheduler.training_sigmas_at(torch.tensor([1000]))


def test_rollout_sigmas_match_spec():
    rollout = DirectAlignScheduler().rollout_sigmas(device="cpu")
    t = np.linspace(1.0, 0.0, 26)
    assert rollout.dtype == torch.float32 and rollout.shape == (26,)
    np.testing.assert_allclose(rollout.numpy(), 3 * t / (1 + 2 * t), rtol=1e-6, atol=0)
    assert rollout[0] == 1 and rollout[-1] == 0


def test_training_timestep_floors_to_the_timestep_grid():
    scheduler = DirectAlignScheduler()
    sigma = torch.tensor([2.7 / 2.8, 0.75, 0.7, 0.2519, 0.251, 0.0, 1.0])
    expected = torch.tensor([0.964, 0.75, 0.7, 0.251, 0.251, 0.0, 1.0])
    floored = scheduler.training_timestep(sigma)
    assert floored.shape == sigma.shape and floored.dtype == torch.float32
    torch.testing.assert_close(floored, expected, rtol=0, atol=1e-7)
    assert scheduler.training_timestep(torch.tensor(0.9649)).shape == ()


# --- noise-prior arithmetic -----------------------------------------------------------------------------


def _branch_sigmas(scheduler, batch_size, seed):
    """(sigma_from, sigma_to) per sample: both branches as sampled, and independent pairs anywhere in the window."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = scheduler.sample_training_sigmas(batch_size, generator=generator)
    window = scheduler.training_window_sigmas().float()
    any_pair = window[torch.randint(0, len(window), (2, batch_size), generator=generator)]
    return {
        "denoise": (sigmas.sigma_hi, sigmas.sigma_mid),
        "inversion": (sigmas.sigma_lo, sigmas.sigma_invert_to),
        "any pair in the window": (any_pair[0], any_pair[1]),
    }


@pytest.mark.parametrize("branch", ["denoise", "inversion", "any pair in the window"])
def test_step_and_recover_is_exact_in_float32(branch):
    scheduler = DirectAlignScheduler()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 4, 16, generator=generator)
    noise = torch.randn(64, 4, 16, generator=generator)
    sigma_from, sigma_to = _branch_sigmas(scheduler, 64, seed=1)[branch]
    sample = scheduler.add_noise_prior(x0, noise, sigma_from)
    recovered = scheduler.step_and_recover(noise - x0, sample, sigma_from, sigma_to, noise)
    assert recovered.dtype == torch.float32
    assert (recovered - x0).abs().max() / x0.abs().max() < 1e-5


@pytest.mark.parametrize("branch", ["denoise", "inversion", "any pair in the window"])
def test_step_and_recover_is_exact_in_bfloat16_up_to_rounding(branch):
    scheduler = DirectAlignScheduler()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 4, 16, generator=generator).bfloat16()
    noise = torch.randn(64, 4, 16, generator=generator).bfloat16()
    sigma_from, sigma_to = _branch_sigmas(scheduler, 64, seed=1)[branch]
    sample = scheduler.add_noise_prior(x0, noise, sigma_from)  # rounded to bf16 once
    velocity = noise - x0  # rounded to bf16 once
    recovered = scheduler.step_and_recover(velocity, sample, sigma_from, sigma_to, noise)
    assert sample.dtype == velocity.dtype == recovered.dtype == torch.bfloat16

    # One bf16 rounding moves a value by at most half its ulp, i.e. by at most eps / 2 of its magnitude.
    half_ulp = torch.finfo(torch.bfloat16).eps / 2
    x0, noise, sample, velocity, recovered = (t.double() for t in (x0, noise, sample, velocity, recovered))
    sigma_from, sigma_to = (sigma.double().reshape(-1, 1, 1) for sigma in (sigma_from, sigma_to))
    step = sigma_to - sigma_from
    # Room for the fp32 arithmetic in between, amplified like everything else by the division by 1 - sigma_to.
    fp32_slack = 8 * torch.finfo(torch.float32).eps * (sample.abs() + step.abs() * velocity.abs() + noise.abs())
    fp32_slack = fp32_slack / (1 - sigma_to)

    # Computed in fp32 and rounded once: within one bf16 rounding of the exact recovery of these bf16 inputs.
    exact_for_inputs = (sample + step * velocity - sigma_to * noise) / (1 - sigma_to)
    assert torch.all((recovered - exact_for_inputs).abs() <= half_ulp * exact_for_inputs.abs() + fp32_slack)

    # Against x0, only the roundings of sample and velocity to bf16 add, amplified by the division by 1 - sigma_to.
    exact_sample = sigma_from * noise + (1 - sigma_from) * x0
    input_rounding = half_ulp * (exact_sample.abs() + step.abs() * (noise - x0).abs()) / (1 - sigma_to)
    bound = input_rounding + half_ulp * (x0.abs() + input_rounding) + fp32_slack
    assert torch.all((recovered - x0).abs() <= bound)


@pytest.mark.parametrize("branch, sign", [("denoise", -1), ("inversion", 1)])
def test_step_and_recover_gradient_wrt_model_output(branch, sign):
    scheduler = DirectAlignScheduler()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(16, 4, 8, generator=generator)
    noise = torch.randn(16, 4, 8, generator=generator)
    model_output = torch.randn(16, 4, 8, generator=generator, requires_grad=True)
    sigma_from, sigma_to = _branch_sigmas(scheduler, 16, seed=2)[branch]
    scheduler.step_and_recover(model_output, sample, sigma_from, sigma_to, noise).sum().backward()
    expected = (sigma_to.double() - sigma_from.double()) / (1 - sigma_to.double())
    assert torch.all(torch.sign(expected) == sign)
    torch.testing.assert_close(
        model_output.grad.double(), expected.reshape(-1, 1, 1).expand(16, 4, 8), rtol=1e-5, atol=0
    )


def test_add_noise_prior_and_one_step_x0_match_the_formulas():
    scheduler = DirectAlignScheduler()
    generator = torch.Generator().manual_seed(0)
    x0, noise, velocity = torch.randn(3, 5, 2, 4, 4, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.5, 0.1, 0.0, 1.0], dtype=torch.float64)
    per_sample = sigma.reshape(-1, 1, 1, 1)
    noisy = scheduler.add_noise_prior(x0, noise, sigma)
    torch.testing.assert_close(noisy, per_sample * noise + (1 - per_sample) * x0)
    torch.testing.assert_close(scheduler.one_step_x0(velocity, noisy, sigma), noisy - per_sample * velocity)
    # With the exact velocity the model-only estimate is exact too.
    torch.testing.assert_close(scheduler.one_step_x0(noise - x0, noisy, sigma), x0)


@pytest.mark.parametrize(
    "method, args",
    [("add_noise_prior", (1, 2, 3)), ("step_and_recover", (1, 2, 3, 4, 5)), ("one_step_x0", (1, 2, 3))],
)
def test_arithmetic_is_delegated_to_ops(monkeypatch, method, args):
    # The fused kernels replace diffusers_srpo.ops on CUDA; the scheduler must reach them through it.
    calls = []
    monkeypatch.setattr(ops, method, lambda *received: calls.append(received) or "from ops")
    assert getattr(DirectAlignScheduler(), method)(*args) == "from ops"
    assert calls == [args]


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"train_window_start": -1}, "train_window_start"),
        ({"train_window_end": 51}, "train_window_end"),
        ({"train_grid_steps": 20}, "train_window_end"),  # the default window [5, 25] no longer fits
        ({"train_window_start": 25, "train_window_end": 5}, "train_window_start"),
        ({"train_window_start": 25, "train_window_end": 25}, "train_window_end"),
        ({"branch_offset_fraction": 0.0}, "branch_offset_fraction"),
        ({"branch_offset_fraction": -0.1}, "branch_offset_fraction"),
        ({"branch_offset_fraction": 1.0}, "branch_offset_fraction"),
        ({"branch_offset_fraction": 0.9996}, "branch_offset_fraction"),  # rounds to the whole window, 1000
        ({"branch_offset_fraction": 0.0004}, "branch_offset_fraction"),  # rounds to 0
        ({"branch_offset_fraction": 2.0, "train_grid_resolution": 100}, "branch_offset_fraction"),
        ({"branch_offset_fraction": float("nan")}, "branch_offset_fraction"),
        ({"branch_offset_fraction": float("inf")}, "branch_offset_fraction"),
        ({"direct_align_shift": 0.0}, "direct_align_shift"),
        ({"direct_align_shift": -3.0}, "direct_align_shift"),
        ({"direct_align_shift": float("nan")}, "direct_align_shift"),
        ({"min_grid_index": 0}, "min_grid_index"),
        ({"min_grid_index": 501}, "min_grid_index"),
        ({"rollout_steps": 0}, "rollout_steps"),
        ({"train_grid_steps": 0}, "train_grid_steps"),
        ({"train_grid_resolution": 1}, "train_grid_resolution"),
    ],
)
def test_bad_settings_raise_at_construction(settings, name):
    with pytest.raises(ValueError, match=name):
        DirectAlignScheduler(**settings)


def test_a_pipeline_holding_the_scheduler_round_trips_save_and_load_offline(tmp_path):
    """diffusers finds how to load a component of another library by its base classes' names in the component's own
    module; a fresh process (offline, which imports diffusers_srpo as a user's script does) gets it back."""
    import os
    import subprocess
    import sys
    import textwrap

    from diffusers_srpo.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)
    pipe.scheduler = DirectAlignScheduler.from_config(pipe.scheduler.config, train_window_start=3, rollout_steps=10)
    pipe.save_pretrained(tmp_path / "pipe")
    expected = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    script = textwrap.dedent(
        f"""
        import json
        import diffusers_srpo
        from diffusers import DiffusionPipeline, FluxPipeline
        loaded = {{}}
        for cls in (FluxPipeline, DiffusionPipeline):
            pipe = cls.from_pretrained({str(tmp_path / "pipe")!r})
            config = {{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}}
            loaded[cls.__name__] = [type(pipe.scheduler).__module__ + "." + type(pipe.scheduler).__name__, config]
        print(json.dumps(loaded))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("FluxPipeline", "DiffusionPipeline"):
        kind, config = loaded[name]
        assert kind == "diffusers_srpo.scheduling_direct_align.DirectAlignScheduler", name
        assert config == json.loads(json.dumps(expected)), name
