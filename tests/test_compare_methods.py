"""benchmarks/compare_methods.py: a tiny comparison on the toy world, its settings, verdicts, evaluation noises and
bad-input errors (most of them in-process, the script loaded with importlib)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "compare_methods.py")
EXAMPLE_CONFIG = os.path.join(ROOT, "benchmarks", "compare_methods.yaml")
METHODS = ("direct-align", "draft-full")
STEPS = 3  # two timed updates after the first, so that s/update is a median of two


def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=600)


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- end to end
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
    assert before["reward_all_std"] > 0 and before["evaluation_srp_std"] > 0
    for name in METHODS:
        (run,) = results["results"][name]
        assert "error" not in run, run.get("stderr_tail")
        assert "before" not in run  # the base model is measured by a run of its own
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
        # hinge_threshold 10 on the toy world: every sample is under it, every update trains.
        assert summary["hinge_active"] and all(v == 1.0 for v in summary["hinge_active"].values())


def test_table_plot_and_time_ratio(comparison):
    out, results, stdout = comparison
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # minus the header
    assert [row.split("|")[1].strip() for row in rows] == list(METHODS)
    assert "hinge active" in table and "hinge_threshold=10" in table
    assert (out / "curves.png").stat().st_size > 1000
    # DRaFT-full back-propagates through all 8 rollout steps, Direct-Align through one transformer call: about 3x
    # slower per update on this CPU, a margin wide enough for a busy machine.
    ratio = results["time_ratios"]["draft-full/direct-align"]
    assert ratio > 1
    assert "draft-full/direct-align" in stdout


# ----------------------------------------------------------------------------------------------- settings
def test_example_config_resolves_as_documented(cm, tmp_path, monkeypatch):
    prompts = [f"prompt {i}" for i in range(12)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"")
    with open(EXAMPLE_CONFIG) as f:
        config = yaml.safe_load(f)
    config["reward"] = f"hpsv2:{tmp_path / 'HPS_v2.1_compressed.pt'}"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # the example's "prompts: prompts.txt" is relative
    args = cm.build_parser().parse_args(["--config", "config.yaml", "--output-dir", str(tmp_path / "out")])
    settings = cm.resolve_settings(args)

    assert settings["held_out_prompts"] == prompts[3::4]
    assert settings["train_prompts"] == [p for i, p in enumerate(prompts) if i % 4 != 3]
    assert settings["methods"] == config["run"]
    assert (settings["steps"], settings["eval_batch_size"], len(settings["evaluation_seeds"])) == (20, 4, 2)
    runs = {run["name"]: run for run in settings["runs"]}
    assert list(runs) == config["run"]  # one seed
    for name, run in runs.items():
        fields = run["fields"]
        for key, value in config["trainer"].items():  # the shared trainer settings reach every method
            assert fields[key] == value, (name, key)
        assert fields["learning_rate"] == 1e-4 and fields["max_train_steps"] == 20 and fields["seed"] == 0
        assert fields["output_dir"] == str(tmp_path / "out" / "runs" / f"{name}-seed0")
        assert "hinge_threshold" not in fields  # the toy world's threshold is not a real model's
        if run["method"] == "srpo":
            assert "reward_template" not in fields
        else:  # plain-reward methods aim at the same target through their template
            assert fields["reward_template"] == "Realistic photo. {prompt}"
    assert runs["srpo"]["fields"]["positive_words"] == ["Realistic photo"]
    assert runs["srpo"]["fields"]["negative_words"] == ["CG Render"]
    assert runs["draft-full"]["fields"]["gradient_checkpointing"] is True
    assert runs["draft-full"]["fields"]["draft_k"] == 0  # the variant's own setting survives the override
    assert "gradient_checkpointing" not in runs["draft-1"]["fields"]
    assert runs["tailorpo"]["fields"]["trained_step_fraction"] == 0.25
    cycled = runs["srpo-cycled-words"]
    assert cycled["method"] == "srpo" and cycled["fields"]["word_schedule"] == "cycle"
    assert cycled["fields"]["positive_words"] == ["Realistic photo", "Detailed", "Natural lighting"]
    assert runs["srpo-late-no-inversion"]["fields"]["train_window_start"] == 30


def test_toy_world_defaults_give_every_hinge_the_same_threshold(cm, tmp_path):
    from diffusers_srpo.toyworld.demo import TOY_TRAINER_SETTINGS

    settings = cm.resolve_settings(cm.build_parser().parse_args(["--output-dir", str(tmp_path), "--seeds", "0", "1"]))
    assert settings["methods"] == list(cm.METHOD_VARIANTS) and len(settings["runs"]) == 2 * len(cm.METHOD_VARIANTS)
    for run in settings["runs"]:
        fields = run["fields"]
        assert {k: fields[k] for k in TOY_TRAINER_SETTINGS} == dict(TOY_TRAINER_SETTINGS)
        if "hinge_threshold" in cm.config_fields(run["method"]):
            assert fields["hinge_threshold"] == cm.TOY_HINGE_THRESHOLD == 10.0
        else:
            assert run["method"].startswith(("tailorpo", "trajectory")) and "hinge_threshold" not in fields
    with_hinge = {r["name"] for r in settings["runs"] if "hinge_threshold" in r["fields"]}
    assert with_hinge == set(cm.METHOD_VARIANTS) - {"tailorpo", "tailorpo-g", "trajectory-dpo"}


# ----------------------------------------------------------------------------------------------- verdicts
BEFORE = {
    "evaluation_srp": 0.0,
    "evaluation_srp_std": 0.1,  # margin 0.025
    "reward_all": 0.6,
    "reward_all_std": 0.2,  # margin 0.05
    "oracle_target_fraction": 0.5,
    "oracle_colour_accuracy": 0.98,
    "oracle_shape_accuracy": 0.5,
}


@pytest.mark.parametrize(
    "own_key, after, flagged, verdict",
    [
        # The reward rose, the targeted fraction did not: hacking.
        ("evaluation_srp", {"evaluation_srp": 0.1, "oracle_target_fraction": 0.52}, True, "hacking: SRP +0.100, bright +0.02"),
        # Colour accuracy fell, whatever the reward did: degraded.
        ("reward_all", {"reward_all": 0.59, "oracle_target_fraction": 0.7, "oracle_colour_accuracy": 0.76}, True, "degraded: colour -0.22"),
        # The reward and the fraction rose: ok.
        ("reward_all", {"reward_all": 0.7, "oracle_target_fraction": 0.6}, False, "ok: reward +0.100, bright +0.10"),
        # A rise under the plain reward's margin (0.04 < 0.25 x 0.2) is flat, though it is over the SRP's.
        ("reward_all", {"reward_all": 0.64, "oracle_target_fraction": 0.5}, False, "reward flat/down: reward +0.040, bright +0.00"),
    ],
)  # fmt: skip
def test_hacking_flag(cm, own_key, after, flagged, verdict):
    assert cm.hacking_flag(own_key, BEFORE, {**BEFORE, **after}, "bright") == (flagged, verdict)


def test_hacking_cell_counts_flagged_runs(cm):
    entry = {
        "runs": 3,
        "seeds": [0, 1, 2],
        "hacking_runs": 2,
        "hacking_reasons": ["degraded: colour -0.35", "ok: SRP +0.1, bright +0.2", "hacking: SRP +0.2, bright +0.0"],
    }
    assert cm.hacking_cell(entry) == "**2/3** (seed 0: degraded: colour -0.35; seed 2: hacking: SRP +0.2, bright +0.0)"
    one = {"runs": 1, "seeds": [0], "hacking_runs": 0, "hacking_reasons": ["reward flat/down: SRP -0.010, bright +0.00"]}
    assert cm.hacking_cell(one) == "reward flat/down: SRP -0.010, bright +0.00"


@pytest.mark.parametrize(
    "means, cell",
    [
        ({}, "-"),
        ({"hinge_active": 0.5}, "0.50"),
        ({"hinge_active": 1.0, "hinge_active_invert": 0.75}, "1.00 (invert 0.75)"),
        ({"hinge_active_denoise": 1.0, "hinge_active_invert": 0.75}, "denoise 1.00, invert 0.75"),
    ],
)
def test_hinge_cell(cm, means, cell):
    assert cm.hinge_cell({"hinge_active": means}) == cell


# ----------------------------------------------------------------------------------------------- evaluation noises
@pytest.fixture(scope="module")
def toy_trainer(cm, tmp_path_factory):
    from diffusers_srpo.toyworld.demo import TOY_TRAINER_SETTINGS
    from diffusers_srpo.trainers import SRPOConfig, SRPOTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe, reward = cm.load_model_and_reward({"toy": True})
    config = SRPOConfig(**TOY_TRAINER_SETTINGS, output_dir=str(tmp_path_factory.mktemp("toy")), positive_words=["bright"],
                        negative_words=["dark"], word_schedule="fixed")  # fmt: skip
    yield SRPOTrainer(pipe, reward=reward, prompts=["a red circle"], config=config)
    torch.set_num_threads(threads)


def test_one_evaluation_batch_is_generate_images(cm, toy_trainer):
    from diffusers_srpo.toyworld.demo import CONTENT_PROMPTS

    prompts = list(CONTENT_PROMPTS)
    images = cm.evaluation_images(toy_trainer, prompts, [10_000, 10_001], batch_size=16)
    expected = torch.cat([toy_trainer.generate_images(prompts, seed) for seed in (10_000, 10_001)])
    assert torch.equal(images, expected)  # the toy world's numbers are those of one generate_images call per seed
    batched = cm.evaluation_images(toy_trainer, prompts, [10_000, 10_001], batch_size=5)
    torch.testing.assert_close(batched, expected, atol=1e-4, rtol=0)  # each prompt keeps its own noise


def test_evaluation_batches_draw_different_noises(cm, toy_trainer):
    images = cm.evaluation_images(toy_trainer, ["a red circle"] * 6, [10_000], batch_size=3)
    assert not torch.allclose(images[0], images[3])  # prompt i and i + batch size: different noise


# ----------------------------------------------------------------------------------------------- bad input
def _real_model(tmp_path, **values) -> dict:
    """A config with a model and a reward file that exist (never loaded: the checks refuse it before)."""
    (tmp_path / "hps.pt").write_bytes(b"")
    return {"model": str(tmp_path), "reward": f"hpsv2:{tmp_path / 'hps.pt'}", "prompts": ["a", "b", "c", "d"], **values}


BAD_CONFIGS = [
    (lambda t: {"methods": {"draft-full": 3}}, "'draft-full' must map to its trainer settings"),
    (lambda t: {"methods": {"draft-full": [1, 2]}}, "'draft-full' must map to its trainer settings"),
    (lambda t: {"methods": [{"srpo": {}}]}, "config 'methods' must map a table name"),
    (lambda t: {"methods": {"new": {"method": "nope"}}}, "unknown method 'nope'"),
    (lambda t: {"run": "srpo"}, "config 'run' must be a list of method names, got 'srpo'"),
    (lambda t: {"prompts": ["a purple blob"]}, "toy world prompt 'a purple blob' is not one of its content prompts"),
    (lambda t: {"held_out_prompts": ["a red circle."]}, "toy world prompt 'a red circle.' is not one of"),
    (lambda t: _real_model(t, reward="nosuch:/x"), "unknown reward 'nosuch'"),
    (lambda t: _real_model(t, reward="hpsv2:/no/such/HPS.pt"), "'/no/such/HPS.pt' (in 'hpsv2:/no/such/HPS.pt') does not exist"),
    (lambda t: _real_model(t, reward="aesthetic:/no/such/mlp.pt"), "'/no/such/mlp.pt'"),
    (lambda t: {"methods": {"srpo": {"resolution": 64}}}, "config method 'srpo' must not set 'resolution'"),
    (lambda t: {"methods": {"refl": {"rollout_steps": 4}}}, "must not set 'rollout_steps'"),
    (lambda t: {"methods": {"refl": {"rollout_guidance": 1.0}}}, "must not set 'rollout_guidance'"),
    (lambda t: {"methods": {"refl": {"max_sequence_length": 8}}}, "must not set 'max_sequence_length'"),
    (lambda t: {"trainer": {"seed": 3}}, "config 'trainer' must not set 'seed'"),
    (lambda t: {"trainer": {"no_such_setting": 3}}, "is a setting of none of the methods run"),
    (lambda t: {"methods": {"refl": {"no_such_setting": 3}}}, "method 'refl': unknown ReFLConfig fields"),
]  # fmt: skip


@pytest.mark.parametrize("make_config, message", BAD_CONFIGS, ids=[message for _, message in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line(cm, tmp_path, capsys, make_config, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(make_config(tmp_path)))
    status = cm.main(["--config", str(path), "--output-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("compare_methods.py: error:") and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "no-such-method"], "unknown method 'no-such-method'"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--seeds", "1", "1"], "--seeds must differ"),
    ],
)
def test_bad_command_line_exits_2_with_one_line(cm, tmp_path, capsys, args, message):
    status = cm.main([*args, "--output-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("compare_methods.py: error:") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_script_itself_prints_one_line(tmp_path):
    proc = run_script("--methods", "no-such-method", "--output-dir", str(tmp_path / "out"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "unknown method 'no-such-method'" in lines[0]


def test_a_load_failure_stops_the_comparison(cm, tmp_path, monkeypatch, capsys):
    settings = cm.resolve_settings(
        cm.build_parser().parse_args(["--methods", "srpo", "refl", "--seeds", "0", "1", "--output-dir", str(tmp_path)])
    )
    jobs = []

    def fake_child(job, workdir):
        jobs.append((job["kind"], job["name"], job["seed"]))
        if job["kind"] == "before":
            return {"before": {"reward_held_out": 0.5, "evaluation_srp": 0.0, "oracle_target_fraction": 0.5,
                               "oracle_colour_accuracy": 1.0, "oracle_shape_accuracy": 0.5},
                    "device": "cpu", "wall_s": 1.0}  # fmt: skip
        return {"error": "load failed: OSError: out of memory", "phase": "load", "wall_s": 1.0}

    monkeypatch.setattr(cm, "run_child", fake_child)
    assert cm.compare(settings) == 1
    assert jobs == [("before", "srpo", 0), ("train", "srpo", 0)]  # nothing loads again after the failure
    assert "FAILED while loading" in capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r.get("phase") for r in results["srpo"] + results["refl"]] == ["load", "skipped", "skipped", "skipped"]
