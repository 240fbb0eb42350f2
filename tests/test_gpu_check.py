"""benchmarks/gpu_check.sh end to end in its --tiny mode: the GPU check's own commands, small, on this machine."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
# What the device tool brings back: at most 8 files, named with letters, digits, '.', '_' and '-'.
RETURNED_FILE = re.compile(r"^[A-Za-z0-9._-]+$")
FILES = {
    "gpu_check.log", "status.json", "summary.md", "bench_kernels.json", "bench_scale.json", "gpu_update.json",
    "gpu_update_24gb.json",
}  # fmt: skip
UPDATE_KEYS = {
    "measured", "complete", "date", "device", "device_type", "torch", "triton", "model", "method", "resolution",
    "batch_size", "rollout_steps", "max_sequence_length", "lora_rank", "checkpointing", "warmup", "steps",
    "params", "trainable_params", "build_s", "warmup_s", "update_s", "measured_updates", "update_s_median",
    "max_memory_allocated_gib", "max_memory_reserved_gib", "simulated", "achieved_tflops", "mfu",
    "peak_measured_over_simulated", "peak_measured_minus_simulated_gib",
}  # fmt: skip


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--tiny", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return out


def _json(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_tiny_gpu_check_runs_every_step_and_writes_what_it_promises(tiny_check):
    out = tiny_check
    names = {p.name for p in out.iterdir()}
    assert names == FILES
    assert len(names) <= 8 and all(RETURNED_FILE.match(n) and (out / n).is_file() for n in names)

    status = _json(out, "status.json")
    steps = {step["step"]: step for step in status["steps"]}
    assert status["ok"] is True and status["mode"] == "tiny"
    assert set(steps) == {"environment", "kernel_tests", "bench_kernels", "bench_scale", "gpu_update", "gpu_update_24gb"}
    assert {step["status"] for step in steps.values()} == {"ok"}
    assert "skipped" in steps["kernel_tests"]["last_line"] or "passed" in steps["kernel_tests"]["last_line"]
    # The package ran from the source tree as setup.py lays it out (kernels/ as diffusers_srpo.kernels), not
    # from an install of it.
    environment = status["environment"]
    assert environment["missing"] == []
    assert environment["diffusers_srpo file"].endswith("/src/diffusers_srpo/__init__.py")
    assert environment["diffusers_srpo.kernels file"].endswith("/src/diffusers_srpo/kernels/__init__.py")

    summary = (out / "summary.md").read_text()
    assert "all steps passed" in summary and environment["device"] in summary and environment["torch"] in summary
    for name in steps:
        assert f"| {name} | {steps[name]['status']} |" in summary
    assert "seconds per update: median" in summary and "MFU:" in summary
    assert "## One update (gpu_update_24gb)" in summary and "transformer weights nf4" in summary

    kernels = _json(out, "bench_kernels.json")
    assert kernels["rows"] and _finite_positive(kernels["copy_bandwidth_gb_per_s"])
    assert all(_finite_positive(row["median_s"]) for row in kernels["rows"])
    if not environment["cuda_available"]:  # only the reference paths time on a CPU
        assert kernels["triton_kernels_timed"] is False and {row["variant"] for row in kernels["rows"]} == {"eager"}


def test_tiny_gpu_check_measures_the_update_against_the_simulation(tiny_check):
    update = _json(tiny_check, "gpu_update.json")
    assert UPDATE_KEYS <= set(update)
    assert update["measured"] is True and update["complete"] is True
    assert (update["model"], update["method"], update["resolution"], update["rollout_steps"]) == ("tiny", "srpo", 32, 2)
    assert (update["warmup"], update["steps"], update["measured_updates"]) == (1, 1, 1)
    assert len(update["warmup_s"]) == 1 and len(update["update_s"]) == 1
    assert all(_finite_positive(s) for s in update["warmup_s"] + update["update_s"])
    assert update["update_s_median"] == update["update_s"][0]
    assert _finite_positive(update["params"]) and 0 < update["trainable_params"] < update["params"]
    if update["device_type"] == "cuda":
        assert _finite_positive(update["max_memory_allocated_gib"])
    else:  # the CUDA-only numbers are absent, not made up
        assert update["max_memory_allocated_gib"] is None and update["max_memory_reserved_gib"] is None
        assert update["peak_measured_over_simulated"] is None

    simulated = _json(tiny_check, "bench_scale.json")
    assert simulated["simulated"] is True
    for key in ("model", "method", "resolution", "batch_size", "rollout_steps", "max_sequence_length", "lora_rank"):
        assert simulated[key] == update[key], key
    # The simulated and the measured update are of the same model.
    assert simulated["params"] == update["params"]
    compared = update["simulated"]
    assert compared["same_point"] is True and compared["mismatches"] == []
    for key in ("peak_gib", "flops", "flops_rollout", "flops_gradient"):
        assert _finite_positive(simulated[key]) and compared[key] == simulated[key], key
    achieved = simulated["flops"] / update["update_s_median"]
    assert update["achieved_tflops"] == pytest.approx(achieved / 1e12)
    assert update["mfu"] == pytest.approx({"spec_989e12": achieved / 989e12, "measured_790e12": achieved / 790e12})
    if update["device_type"] == "cuda":
        assert update["peak_measured_over_simulated"] == pytest.approx(
            update["max_memory_allocated_gib"] / simulated["peak_gib"]
        )


def test_tiny_gpu_check_measures_the_24gb_recipe_on_the_same_model(tiny_check):
    """Step 2: the same update with the transformer quantized NF4 in place and 8-bit AdamW."""
    update, plain = _json(tiny_check, "gpu_update_24gb.json"), _json(tiny_check, "gpu_update.json")
    assert update["complete"] is True and (update["quantize"], update["use_8bit_adam"]) == ("nf4", True)
    assert (plain["quantize"], plain["use_8bit_adam"]) == ("none", False)
    assert update["weight_dtype"] == "nf4 (compute in bfloat16)"
    # The same model and LoRA: the weights counted unpacked, the trainable parameters identical.
    assert update["params"] == plain["params"] and update["trainable_params"] == plain["trainable_params"]
    assert all(_finite_positive(s) for s in update["update_s"]) and math.isfinite(update["last_logs"]["loss"])
