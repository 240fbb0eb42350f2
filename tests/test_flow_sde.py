"""The flow SDE transition and its log-density (SPEC section 4), against independent float64 formulas."""

import math

import pytest
import torch

from diffusers_srpo.flow_sde import dpo_log_ratio, flow_sde_transition

SIGMAS = torch.tensor([1.0, 0.9643, 0.75, 0.5, 0.1], dtype=torch.float64)
SIGMAS_NEXT = torch.tensor([0.9643, 0.9, 0.6, 0.25, 0.0], dtype=torch.float64)
SIGMA_AT_ONE = 0.9643


def batch(seed=0, shape=(5, 16, 8)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64), torch.randn(shape, generator=generator, dtype=torch.float64)


def spec_mean_std(x, v, sigma, sigma_next, a):
    """The SPEC's formulas, written out per sample in plain float64 Python."""
    means, stds = [], []
    for i in range(x.shape[0]):
        s, s_next = float(sigma[i]), float(sigma_next[i])
        dt = s_next - s
        std_sigma = a * math.sqrt(s / (1 - (SIGMA_AT_ONE if s == 1 else s)))
        means.append(x[i] * (1 + std_sigma**2 / (2 * s) * dt) + v[i] * (1 + std_sigma**2 * (1 - s) / (2 * s)) * dt)
        stds.append(std_sigma * math.sqrt(-dt))
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


def test_noise_level_zero_is_the_euler_ode_step():
    x, v = batch()
    transition = flow_sde_transition(x, v, SIGMAS, SIGMAS_NEXT, noise_level=0.0, sigma_at_one=SIGMA_AT_ONE)
    euler = x + (SIGMAS_NEXT - SIGMAS).view(-1, 1, 1) * v
    assert torch.equal(transition.std, torch.zeros_like(transition.std))
    torch.testing.assert_close(transition.mean, euler, rtol=0, atol=1e-15)
    torch.testing.assert_close(transition.sample(torch.Generator().manual_seed(0)), euler, rtol=0, atol=1e-15)


@pytest.mark.parametrize("a", [0.3, 0.7, 1.2])
def test_mean_and_std_follow_the_spec_formula(a):
    x, v = batch(1)
    transition = flow_sde_transition(x, v, SIGMAS, SIGMAS_NEXT, noise_level=a, sigma_at_one=SIGMA_AT_ONE)
    mean, std = spec_mean_std(x, v, SIGMAS, SIGMAS_NEXT, a)
    torch.testing.assert_close(transition.mean, mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(transition.std.flatten(), std, rtol=1e-14, atol=0)
    # float32 inputs are computed in float32, scalar sigmas broadcast.
    single = flow_sde_transition(x.float(), v.float(), 0.5, 0.25, noise_level=a, sigma_at_one=SIGMA_AT_ONE)
    assert single.mean.dtype == torch.float32 and single.std.shape == (5, 1, 1)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_log_density_equals_torch_normal(reduction):
    x, v = batch(2)
    transition = flow_sde_transition(x, v, SIGMAS, SIGMAS_NEXT, noise_level=0.7, sigma_at_one=SIGMA_AT_ONE)
    x_next = transition.sample(torch.Generator().manual_seed(3))
    normal = torch.distributions.Normal(transition.mean, transition.std.expand_as(transition.mean))
    expected = normal.log_prob(x_next).flatten(1)
    expected = expected.sum(1) if reduction == "sum" else expected.mean(1)
    torch.testing.assert_close(transition.log_prob(x_next, reduction), expected, rtol=1e-12, atol=1e-10)
    # A point elsewhere too (not only samples of the Gaussian itself).
    torch.testing.assert_close(
        transition.log_prob(x, reduction),
        normal.log_prob(x).flatten(1).sum(1) if reduction == "sum" else normal.log_prob(x).flatten(1).mean(1),
        rtol=1e-12,
        atol=1e-10,
    )


def test_samples_have_the_stated_mean_and_std():
    x, v = batch(4, shape=(2, 200_000))
    transition = flow_sde_transition(x, v, torch.tensor([0.8, 0.3]), torch.tensor([0.7, 0.2]), 0.7, SIGMA_AT_ONE)
    z = (transition.sample(torch.Generator().manual_seed(5)) - transition.mean) / transition.std
    # 200,000 draws: the standard errors of the mean and of the std are 0.0022 and 0.0016.
    assert z.mean(1).abs().max() < 0.01 and (z.std(1) - 1).abs().max() < 0.01


def test_the_sde_keeps_the_flow_marginals_to_second_order():
    """Data N(0, s0^2): the exact velocity is linear, so one step maps the marginal variance at sigma exactly.

    The SDE's drift correction must make the variance after a step equal the marginal's at sigma_next up to
    O(dt^2), for any noise level; a wrong sign or factor leaves an O(dt) error.
    """
    s0 = 0.6

    def marginal_variance(sigma):
        return (1 - sigma) ** 2 * s0**2 + sigma**2

    def velocity_gain(sigma):  # E[eps - x0 | x] = gain * x
        return (sigma - (1 - sigma) * s0**2) / marginal_variance(sigma)

    for a in (0.0, 0.7):
        errors = []
        for dt in (0.02, 0.01, 0.005):
            sigma = torch.tensor([0.6], dtype=torch.float64)
            one = torch.ones(1, 1, dtype=torch.float64)
            transition = flow_sde_transition(one, velocity_gain(sigma) * one, sigma, sigma - dt, a, SIGMA_AT_ONE)
            variance_after = transition.mean.item() ** 2 * marginal_variance(0.6) + transition.std.item() ** 2
            errors.append(abs(variance_after - marginal_variance(0.6 - dt)))
        assert errors[0] / errors[1] == pytest.approx(4, rel=0.1) and errors[1] / errors[2] == pytest.approx(4, rel=0.1)
        assert errors[-1] < 1e-4


def test_dpo_log_ratio_is_the_difference_of_log_densities_and_exactly_zero_for_equal_means():
    x, v = batch(6)
    policy = flow_sde_transition(x, v, SIGMAS, SIGMAS_NEXT, 0.7, SIGMA_AT_ONE)
    reference = flow_sde_transition(x, v + 0.01 * batch(7)[0], SIGMAS, SIGMAS_NEXT, 0.7, SIGMA_AT_ONE)
    x_next = policy.sample(torch.Generator().manual_seed(8))
    for reduction in ("sum", "mean"):
        ratio = dpo_log_ratio(x_next, policy.mean, reference.mean, policy.std, reduction)
        expected = policy.log_prob(x_next, reduction) - reference.log_prob(x_next, reduction)
        torch.testing.assert_close(ratio, expected, rtol=1e-9, atol=1e-12)
    same = dpo_log_ratio(x_next.float(), policy.mean.float(), policy.mean.float().clone(), policy.std.float())
    assert torch.equal(same, torch.zeros(5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_level=-0.1), "noise_level"),
        (dict(sigma_at_one=1.0), "sigma_at_one"),
        (dict(sigma_next=0.9), "sigma > sigma_next"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    x, v = batch()
    arguments = dict(sigma=0.5, sigma_next=0.25, noise_level=0.7, sigma_at_one=SIGMA_AT_ONE)
    arguments.update(kwargs)
    if "sigma_next" in kwargs:
        arguments["sigma"] = 0.5
    with pytest.raises(ValueError, match=message):
        flow_sde_transition(x, v, **arguments)
    with pytest.raises(ValueError, match="std > 0"):
        flow_sde_transition(x, v, 0.5, 0.25, 0.0, SIGMA_AT_ONE).log_prob(x)
