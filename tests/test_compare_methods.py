"""benchmarks/compare_methods.py: a tiny comparison on the toy world, and its bad-input errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "compare_methods.py")
METHODS = ("direct-align", "draft-full")
STEPS = 3  # two timed updates after the first, so that s/update is a median of two


def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=600)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = run_script(
        "--methods", *METHODS, "--steps", str(STEPS), "--seeds", "0", "--eval-seeds", "1", "--output-dir", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


def test_per_method_numbers_are_finite_and_sensible(comparison):
    _, results, _ = comparison
    assert results["settings"]["methods"] == list(METHODS)
    before = results["before"]
    for key in ("oracle_target_fraction", "oracle_colour_accuracy", "oracle_shape_accuracy"):
        assert 0 <= before[key] <= 1
    assert math.isfinite(before["reward_held_out"]) and math.isfinite(before["evaluation_srp"])
    for name in METHODS:
        (run,) = results["results"][name]
        assert "error" not in run, run.get("stderr_tail")
        assert run["update_s"] > 0 and run["first_update_s"] > 0
        assert run["peak_memory_mib"] > 0
        assert len(run["history"]) == STEPS
        assert all(math.isfinite(h["reward"]) and math.isfinite(h["loss"]) for h in run["history"])
        for key in ("oracle_target_fraction", "oracle_colour_accuracy", "oracle_shape_accuracy"):
            assert 0 <= run["after"][key] <= 1
        assert all(math.isfinite(v) for v in run["after"].values())
        summary = results["summary"][name]
        assert summary["runs"] == 1 and summary["hacking_runs"] in (0, 1)
        assert len(summary["train_reward_curve_mean"]) == STEPS


def test_table_plot_and_time_ratio(comparison):
    out, results, stdout = comparison
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # minus the header
    assert [row.split("|")[1].strip() for row in rows] == list(METHODS)
    assert (out / "curves.png").stat().st_size > 1000
    # DRaFT-full back-propagates through all 8 rollout steps, Direct-Align through one transformer call: about 3x
    # slower per update on this CPU, a margin wide enough for a busy machine.
    ratio = results["time_ratios"]["draft-full/direct-align"]
    assert ratio > 1
    assert "draft-full/direct-align" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "no-such-method"], "unknown method 'no-such-method'"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--seeds", "1", "1"], "--seeds must differ"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    proc = run_script(*args, "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compare_methods.py: error:") and message in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass
