"""The scale simulator (diffusers_srpo.simulation, benchmarks/bench_scale.py) against what it simulates: the peak
memory of a real update measured by the allocator on this CPU, and an analytic FLOP count of the FLUX transformer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from diffusers_srpo.simulation import LiveBytes, simulate_update, simulated_tensors
from diffusers_srpo.testing import FLUX_DEV_TRANSFORMER_CONFIG

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_scale  # noqa: E402
import scale_models  # noqa: E402


def analytic_flux_forward_flops(config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """Matrix-product FLOPs of one FluxTransformer2DModel forward, from its config alone: 2 x weights x tokens for
    every linear layer (the modulation MLPs see one vector per sample) and 4 x L^2 x width for attention."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    joint, pooled, channels = config["joint_attention_dim"], config["pooled_projection_dim"], config["in_channels"]
    tokens = image_tokens + text_tokens
    # Time and guidance embedders (256 -> width -> width), the pooled-text projection (pooled -> width -> width).
    per_sample = 2 * (256 * width + width * width) * (2 if config["guidance_embeds"] else 1)
    per_sample += 2 * (pooled * width + width * width)
    per_sample += config["num_layers"] * 2 * 2 * 6 * width * width  # norm1 and norm1_context: width -> 6 width
    per_sample += config["num_single_layers"] * 2 * 3 * width * width  # norm: width -> 3 width
    per_sample += 2 * 2 * width * width  # norm_out: width -> 2 width
    per_token = 2 * image_tokens * channels * width + 2 * text_tokens * joint * width  # x_ and context_embedder
    per_token += 2 * image_tokens * width * channels  # proj_out
    double = 2 * (4 * width * width + 8 * width * width) * tokens + 4 * tokens * tokens * width  # attn + ff, both streams
    single = 2 * (3 * width * width + 4 * width * width + 5 * width * width) * tokens + 4 * tokens * tokens * width
    per_token += config["num_layers"] * double + config["num_single_layers"] * single
    return batch * (per_sample + per_token)


def simulated_forward_flops(config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_srpo.simulation import CPU_ATTENTION_FLOP_FORMULAS

    with simulated_tensors(), torch.no_grad():
        torch.set_default_dtype(torch.bfloat16)
        try:
            transformer = FluxTransformer2DModel(**config).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        inputs = dict(
            hidden_states=torch.randn(batch, image_tokens, config["in_channels"], dtype=torch.bfloat16),
            encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], dtype=torch.bfloat16),
            pooled_projections=torch.randn(batch, config["pooled_projection_dim"], dtype=torch.bfloat16),
            timestep=torch.ones(batch, dtype=torch.bfloat16),
            guidance=torch.ones(batch, dtype=torch.bfloat16),
            img_ids=torch.zeros(image_tokens, 3),
            txt_ids=torch.zeros(text_tokens, 3),
            return_dict=False,
        )
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOP_FORMULAS) as counter:
            transformer(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "name, image_tokens, text_tokens",
    [("flux-37m", 256, 32), ("flux.1-dev", 45 * 45, 512)],  # FLUX.1-dev at 720 px: 2,025 image + 512 text tokens
)
def test_transformer_flops_match_the_analytic_count(name, image_tokens, text_tokens):
    if name == "flux.1-dev":
        config = dict(FLUX_DEV_TRANSFORMER_CONFIG)
    else:
        cfg = scale_models._flux_37m_config()
        config = dict(
            patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.t5_dim,
            pooled_projection_dim=cfg.clip_dim, guidance_embeds=True, axes_dims_rope=cfg.axes_dims_rope,
        )  # fmt: skip
    simulated = simulated_forward_flops(config, image_tokens, text_tokens)
    analytic = analytic_flux_forward_flops(config, image_tokens, text_tokens)
    assert simulated == pytest.approx(analytic, rel=0.05)
    if name == "flux.1-dev":
        # 6.5B of the 11.9B weights see every token (the double blocks' two streams see their own tokens), 3.2B
        # of modulation see one vector per sample: 2 x 6.5B x 2,537 + attention 4 x 2,537^2 x 3072 x 57 = 37 TFLOP.
        assert 36e12 < simulated < 39e12


def test_live_bytes_counts_storages_until_freed():
    with LiveBytes() as memory:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2  # 4,000 more
        view = b[:10]  # no new storage
        del a
        c = torch.zeros(250, dtype=torch.float64)  # 2,000 bytes, after a's 4,000 were freed
    assert memory.peak_total == 8000
    assert memory.current["activations"] == 6000
    del b, view, c
    assert memory.current["activations"] == 0


def _trainer(name: str, output_dir: str, resolution: int, rollout_steps: int, checkpointing: int, method: str = "srpo"):
    from diffusers_srpo.trainers import trainer_class_for

    args = bench_scale.parse_args(
        ["--model", name, "--method", method, "--resolution", str(resolution), "--rollout-steps", str(rollout_steps),
         "--checkpointing", str(checkpointing)]
    )
    config = bench_scale.trainer_config(args, output_dir)
    pipe = scale_models.build_pipeline(name, dtype=torch.bfloat16)
    reward = scale_models.build_reward(name)
    return trainer_class_for(config.method)(pipe, reward=reward, prompts=bench_scale.PROMPTS, config=config)


def _measured_peak(trainer) -> tuple[int, int]:
    """(bytes alive before the update, their peak during it), from the CPU allocator's own events (the profiler's
    memory records), for the same update the simulator runs."""
    from diffusers_srpo.simulation import prepare_steady_update
    from diffusers_srpo.trainers.stopping import StopRequest

    prepare_steady_update(trainer)
    transformer = trainer.accelerator.unwrap_model(trainer.model)
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    tensors = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [
        *transformer.parameters(), *transformer.buffers(), *trainer.pipe.vae.parameters(), *trainer.pipe.vae.buffers(),
        *trainer.reward.parameters(), *trainer.reward.buffers(), *state,
    ]}  # fmt: skip
    before = sum(tensors.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        trainer._run_update(0, StopRequest())
    # Every allocation and free of the CPU allocator, in order (the kineto records keep their sizes and times).
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return before, before + peak


@pytest.mark.slow
@pytest.mark.parametrize(
    "checkpointing",
    [
        0,
        pytest.param(1, marks=pytest.mark.xfail(strict=True, reason=(
            "known simulator bug: on fake tensors activation checkpointing frees nothing (simulated 166.8 MiB against "
            "122.8 MiB measured here), so checkpointed peaks are overestimates until it is fixed"
        ))),
    ],
)  # fmt: skip
def test_simulated_peak_matches_the_measured_peak_of_a_small_model(tmp_path, fresh_accelerate_state, checkpointing):
    """The 37M FLUX-shaped model of bench_train_step.py, bf16 weights and autocast, one SRPO LoRA update: the
    simulated peak within 10% of the peak the CPU allocator reports for the same update (measured: 145.9 against
    147.9 MiB without checkpointing)."""
    resolution, rollout_steps = 128, 2
    with simulated_tensors():
        simulated = simulate_update(_trainer("flux-37m", str(tmp_path / "fake"), resolution, rollout_steps, checkpointing))
    torch.manual_seed(0)
    before, measured = _measured_peak(_trainer("flux-37m", str(tmp_path / "real"), resolution, rollout_steps, checkpointing))
    print(f"simulated peak {simulated.peak_bytes / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
          f"(before the update {before / 2**20:.1f} MiB)")  # fmt: skip
    assert simulated.peak_bytes == pytest.approx(measured, rel=0.10)
    # The part that is not weights, where a simulator can go wrong, agrees too.
    assert simulated.peak_bytes - before == pytest.approx(measured - before, rel=0.10)


def test_bench_scale_writes_one_json_point(tmp_path):
    out = tmp_path / "point.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "bench_scale.py"), "--model", "tiny", "--method", "srpo", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["simulated"] is True
    # The tiny transformer's parameters, counted from the model the script builds.
    assert result["params"] == sum(p.numel() for p in scale_models.build_pipeline("tiny").transformer.parameters())
    split = result["peak_split_gib"]
    assert sum(split.values()) == pytest.approx(result["peak_gib"], rel=1e-9)
    assert result["flops"] == result["flops_rollout"] + result["flops_gradient"] > 0
    assert all(result["fits_gb"].values())


def test_bench_scale_refuses_a_bad_setting_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "bench_scale.py"), "--model", "tiny", "--method", "srpo", "--resolution", "30"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "bench_scale: resolution must be a multiple of 4 for this model, got 30"
