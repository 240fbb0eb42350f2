"""Direct-Align's noise prior, training sigmas and x0 recovery as a drop-in diffusers scheduler.

``DirectAlignScheduler`` samples exactly like ``FlowMatchEulerDiscreteScheduler`` (it overrides neither
``set_timesteps`` nor ``step``) and adds what a Direct-Align / SRPO trainer needs on top: the static-shift
rollout schedule, the per-sample training sigmas of both branches with their SRP discounts, and the
noise-prior arithmetic. That arithmetic is delegated to ``diffusers_srpo.ops``, the single reference
implementation that fused kernels replace on CUDA.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config

# Not used here, but looked up here: `DiffusionPipeline.from_pretrained` finds how to load a component of a library
# other than diffusers by the names of diffusers' base classes in the component's own module (model_index.json
# names this module). Without it a saved pipeline holding this scheduler cannot be loaded again.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from . import ops

__all__ = ["DirectAlignScheduler", "DirectAlignSigmas"]


@dataclass(frozen=True)
class DirectAlignSigmas:
    """Per-sample training sigmas of one Direct-Align step: every field is a tensor of shape ``[B]``.

    The sigmas and discounts are float32, the indices int64. Indices are positions on the training grid
    ``sigmas_w`` of the scheduler (``T = train_grid_resolution`` points, index 0 the noisiest), counted the
    way the reference counts them: ``m`` from the clean end, so ``sigmas_w[T - m]`` is the sigma at ``m``.

    Attributes:
        sigma_hi: Start of the denoise branch, ``sigmas_w[T - m - k']``.
        sigma_mid: End of the denoise branch, ``sigmas_w[T - m]``.
        sigma_lo: Start of the inversion branch, ``sigmas_w[T - j]``.
        sigma_invert_to: End of the inversion branch, ``sigmas_w[T - min(j + k', T)]``; equals ``sigma_mid``
            unless ``m <= k`` (where ``j`` is clamped to 1).
        grid_index: ``m``, drawn uniformly from ``{min_grid_index, ..., T - min_grid_index}``.
        offset: ``k' = min(T - m, k, m)``, the branch offset clamped to the grid.
        invert_index: ``j = max(m - k', 1)``.
        denoise_discount: SRP ``k`` of the denoise branch, ``linspace(denoise_discount_start, end, T)[m]``.
        invert_discount: SRP ``k`` of the inversion branch, ``linspace(invert_discount_start, end, T)[j]``.
    """

    sigma_hi: torch.Tensor
    sigma_mid: torch.Tensor
    sigma_lo: torch.Tensor
    sigma_invert_to: torch.Tensor
    grid_index: torch.Tensor
    offset: torch.Tensor
    invert_index: torch.Tensor
    denoise_discount: torch.Tensor
    invert_discount: torch.Tensor

    def to(self, device: str | torch.device) -> DirectAlignSigmas:
        """A copy with every tensor moved to ``device``."""
        return DirectAlignSigmas(
            **{field.name: getattr(self, field.name).to(device) for field in dataclasses.fields(self)}
        )


class DirectAlignScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` plus the sigma geometry and noise-prior recovery of Direct-Align.

    Sampling (``set_timesteps``, ``step``, ``scale_noise``) is inherited unchanged, so swapping this scheduler into
    a ``FluxPipeline`` with ``DirectAlignScheduler.from_config(pipe.scheduler.config)`` generates bit-identical
    images. A stock FLUX.1-dev ``scheduler_config.json`` loads and takes the Direct-Align defaults below, which are
    those of SRPO (Shen et al. 2025, arXiv 2509.06942).

    Direct-Align uses a static shift ``s(t) = shift * t / (1 + (shift - 1) * t)`` for both its rollout schedule and
    its training grid, independent of the sampler's (possibly dynamic) shift. The training grid is
    ``S = s(linspace(1, 0, train_grid_steps + 1))``; the training window is
    ``sigmas_w = linspace(S[train_window_start], S[train_window_end], train_grid_resolution)`` (about 0.964 down to
    0.75 by default).

    Args:
        num_train_timesteps ... stochastic_sampling:
            As in [`FlowMatchEulerDiscreteScheduler`], same names and defaults.
        train_window_start (`int`, defaults to 5):
            Index on the ``train_grid_steps``-step grid of the noisiest sigma of the training window.
        train_window_end (`int`, defaults to 25):
            Index of the cleanest sigma of the training window; must exceed ``train_window_start``.
        train_grid_steps (`int`, defaults to 50):
            Number of steps of the grid the window indices refer to.
        train_grid_resolution (`int`, defaults to 1000):
            ``T``, the number of points of the training window ``sigmas_w``.
        branch_offset_fraction (`float`, defaults to 0.1):
            Length of one branch as a fraction of the window: ``k = round(branch_offset_fraction * T)`` grid
            positions, 100 for the defaults. The reference writes ``int((1 - 0.9) * T) + 1``, which is 100 only
            through float rounding; rounding the product gives the same 100 without depending on it.
        min_grid_index (`int`, defaults to 5):
            ``m`` is drawn uniformly from ``{min_grid_index, ..., T - min_grid_index}``, both ends included.
        direct_align_shift (`float`, defaults to 3.0):
            The static shift of the rollout schedule and of the training grid.
        rollout_steps (`int`, defaults to 25):
            Number of Euler steps of the no-gradient rollout that produces the clean latent.
        denoise_discount_start, denoise_discount_end (`float`, default to 0.1 and 0.25):
            Ends of the SRP discount ramp ``linspace(start, end, T)`` of the denoise branch, indexed by ``m``.
        invert_discount_start, invert_discount_end (`float`, default to 0.3 and 0.01):
            Ends of the SRP discount ramp of the inversion branch, indexed by ``j``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        train_window_start: int = 5,
        train_window_end: int = 25,
        train_grid_steps: int = 50,
        train_grid_resolution: int = 1000,
        branch_offset_fraction: float = 0.1,
        min_grid_index: int = 5,
        direct_align_shift: float = 3.0,
        rollout_steps: int = 25,
        denoise_discount_start: float = 0.1,
        denoise_discount_end: float = 0.25,
        invert_discount_start: float = 0.3,
        invert_discount_end: float = 0.01,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        if train_grid_steps < 1:
            raise ValueError(f"train_grid_steps={train_grid_steps} is invalid: expected at least 1.")
        if train_grid_resolution < 2:
            raise ValueError(f"train_grid_resolution={train_grid_resolution} is invalid: expected at least 2.")
        if not 0 <= train_window_start <= train_grid_steps:
            raise ValueError(
                f"train_window_start={train_window_start} is outside the grid: expected "
                f"0 <= train_window_start <= train_grid_steps={train_grid_steps}."
            )
        if not 0 <= train_window_end <= train_grid_steps:
            raise ValueError(
                f"train_window_end={train_window_end} is outside the grid: expected "
                f"0 <= train_window_end <= train_grid_steps={train_grid_steps}."
            )
        if train_window_start >= train_window_end:
            raise ValueError(
                f"train_window_start={train_window_start}, train_window_end={train_window_end} is an empty or "
                "reversed window: expected train_window_start < train_window_end (the start is the noisier end)."
            )
        # Checked before rounding: round() of NaN or infinity raises an error that would not name the setting.
        if not math.isfinite(branch_offset_fraction):
            raise ValueError(f"branch_offset_fraction={branch_offset_fraction} is invalid: expected a finite value.")
        branch_offset = round(branch_offset_fraction * train_grid_resolution)
        if not 1 <= branch_offset <= train_grid_resolution - 1:
            raise ValueError(
                f"branch_offset_fraction={branch_offset_fraction} gives a branch offset of round("
                f"{branch_offset_fraction} * train_grid_resolution) = {branch_offset} positions of the training window: "
                f"expected at least 1 and less than the window's {train_grid_resolution} positions."
            )
        # m = 0 would index past the clean end of the window; m >= 1 keeps every index of the geometry in range.
        if not 1 <= min_grid_index <= train_grid_resolution // 2:
            raise ValueError(
                f"min_grid_index={min_grid_index} is invalid: expected 1 <= min_grid_index <= "
                f"train_grid_resolution // 2 = {train_grid_resolution // 2}."
            )
        if not (math.isfinite(direct_align_shift) and direct_align_shift > 0):
            raise ValueError(f"direct_align_shift={direct_align_shift} is invalid: expected a finite value > 0.")
        if rollout_steps < 1:
            raise ValueError(f"rollout_steps={rollout_steps} is invalid: expected at least 1.")
        discounts = {
            "denoise_discount_start": denoise_discount_start,
            "denoise_discount_end": denoise_discount_end,
            "invert_discount_start": invert_discount_start,
            "invert_discount_end": invert_discount_end,
        }
        for name, value in discounts.items():
            if not math.isfinite(value):
                raise ValueError(f"{name}={value} is invalid: expected a finite value.")

    @property
    def branch_offset(self) -> int:
        """``k``, the length of one branch in positions of the training window (100 for the defaults)."""
        return round(self.config.branch_offset_fraction * self.config.train_grid_resolution)

    def _static_shift(self, t: torch.Tensor) -> torch.Tensor:
        shift = self.config.direct_align_shift
        return shift * t / (1 + (shift - 1) * t)

    def training_window_sigmas(self) -> torch.Tensor:
        """The training window ``sigmas_w``: float64, shape ``[train_grid_resolution]``, index 0 the noisiest."""
        grid = self._static_shift(torch.linspace(1, 0, self.config.train_grid_steps + 1, dtype=torch.float64))
        return torch.linspace(
            grid[self.config.train_window_start].item(),
            grid[self.config.train_window_end].item(),
            self.config.train_grid_resolution,
            dtype=torch.float64,
        )

    def rollout_sigmas(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The rollout schedule ``s(linspace(1, 0, rollout_steps + 1))``: float32, from 1 down to exactly 0.

        These sigmas are already shifted: take Euler steps ``x + (sigma_next - sigma) * v`` with them directly
        rather than passing them to ``set_timesteps``, which would shift them again.
        """
        times = torch.linspace(1, 0, self.config.rollout_steps + 1, dtype=torch.float64)
        return self._static_shift(times).to(device=device, dtype=torch.float32)

    def training_sigmas_at(self, grid_index: torch.Tensor) -> DirectAlignSigmas:
        """The training sigmas and discounts for given grid indices ``m`` (int tensor ``[B]``), on their device.

        ``sample_training_sigmas`` draws ``m`` and calls this; call it directly for a chosen ``m``. Any ``m`` in
        ``[1, T - 1]`` is accepted, beyond the sampled range, so that the clamps at both ends can be reached.
        """
        resolution = self.config.train_grid_resolution
        m = torch.as_tensor(grid_index).to(torch.int64)
        if m.ndim != 1:
            raise ValueError(f"grid_index has shape {tuple(m.shape)}: expected a 1-D tensor [B].")
        if m.numel() and not (1 <= m.min().item() and m.max().item() <= resolution - 1):
            raise ValueError(
                f"grid_index spans [{m.min().item()}, {m.max().item()}]: expected values in "
                f"[1, train_grid_resolution - 1 = {resolution - 1}]."
            )
        # The reference's clamps, verbatim: k' = min(T - m, k, m) and j = max(m - k', 1).
        offset = (resolution - m).clamp(max=self.branch_offset).minimum(m)
        invert_index = (m - offset).clamp(min=1)

        window = self.training_window_sigmas().to(m.device)
        denoise_ramp = torch.linspace(
            self.config.denoise_discount_start,
            self.config.denoise_discount_end,
            resolution,
            dtype=torch.float64,
            device=m.device,
        )
        invert_ramp = torch.linspace(
            self.config.invert_discount_start,
            self.config.invert_discount_end,
            resolution,
            dtype=torch.float64,
            device=m.device,
        )
        return DirectAlignSigmas(
            sigma_hi=window[resolution - m - offset].float(),
            sigma_mid=window[resolution - m].float(),
            sigma_lo=window[resolution - invert_index].float(),
            sigma_invert_to=window[resolution - (invert_index + offset).clamp(max=resolution)].float(),
            grid_index=m,
            offset=offset,
            invert_index=invert_index,
            denoise_discount=denoise_ramp[m].float(),
            invert_discount=invert_ramp[invert_index].float(),
        )

    def sample_training_sigmas(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: str | torch.device | None = None,
    ) -> DirectAlignSigmas:
        """Draw ``m`` uniformly from ``{min_grid_index, ..., T - min_grid_index}`` per sample, and its geometry.

        ``m`` is drawn with ``torch.randint`` on ``generator`` (on the generator's device, the CPU by default),
        so the draw is reproducible from a seeded generator; the result is then moved to ``device``. As in
        diffusers pipelines, ``generator`` may be a list with one generator per sample, each drawing its sample's
        ``m`` alone (so a sample's draw does not depend on the batch it is in).
        """
        low = self.config.min_grid_index
        high = self.config.train_grid_resolution - low
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}: expected one per sample.")
            grid_index = torch.cat([torch.randint(low, high + 1, (1,), generator=g, device=g.device) for g in generator])
        else:
            draw_device = generator.device if generator is not None else torch.device("cpu")
            grid_index = torch.randint(low, high + 1, (batch_size,), generator=generator, device=draw_device)
        sigmas = self.training_sigmas_at(grid_index)
        return sigmas if device is None else sigmas.to(device)

    def training_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma`` floored to a multiple of ``1 / num_train_timesteps``: what the reference passes the model.

        Same shape as ``sigma``, float32 (float64 for a float64 input). A sigma within 1e-6 of a grid point (the
        float32 rounding of ``i / num_train_timesteps``) counts as on it, so such grid sigmas come back unchanged
        instead of dropping to the point below (where the reference's ``int(sigma * 1000)`` on a float32 sigma can
        drop them: it gives 250 for ``float32(0.251)``).
        """
        sigma = torch.as_tensor(sigma)
        num_steps = self.config.num_train_timesteps
        floored = torch.floor(sigma.double() * num_steps + 1e-6 * num_steps) / num_steps
        return floored.to(torch.promote_types(sigma.dtype, torch.float32))

    def add_noise_prior(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """``sigma * noise + (1 - sigma) * x0`` with a per-sample ``sigma`` (float, 0-d or ``[B]``)."""
        return ops.add_noise_prior(x0, noise, sigma)

    def step_and_recover(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        sigma_from,
        sigma_to,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """One Euler step from ``sigma_from`` to ``sigma_to``, then recovery of x0 with the known ``noise``.

        ``x0_hat = (sample + (sigma_to - sigma_from) * v - sigma_to * noise) / (1 - sigma_to)``; exact when
        ``v = noise - x0``, differentiable in ``model_output`` with gradient ``(sigma_to - sigma_from) / (1 - sigma_to)``
        (negative for the denoise branch, positive for the inversion branch).
        """
        return ops.step_and_recover(model_output, sample, sigma_from, sigma_to, noise)

    def one_step_x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
        """The model-only clean estimate ``sample - sigma * v`` of the ReFL baseline (no noise prior)."""
        return ops.one_step_x0(model_output, sample, sigma)
