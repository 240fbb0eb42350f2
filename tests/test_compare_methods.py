"""benchmarks/compare_methods.py (with compare_settings.py, compare_runner.py, compare_report.py beside it): a tiny
comparison on the toy world (slow), its settings, verdicts, evaluation noises, forward counts, evaluations during
training, time to target, the Pareto view, reports of saved results and bad-input errors (most of them in-process,
the script loaded with importlib; the parent's loop with a fake child)."""

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
METHODS = ("direct-align", "draft-full", "grpo")
STEPS = 3  # two timed updates after the first, so that s/update is a median of two
EVAL_EVERY = 2  # evaluations after updates 2 and 3 (the last)
SWEEP_LR = 3e-3


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
        "--methods", *METHODS, "--steps", str(STEPS), "--seeds", "0", "--eval-seeds", "1", "--output-dir", str(out),
        "--eval-every", str(EVAL_EVERY), "--sweep-learning-rates", str(SWEEP_LR), "--runs-dir", str(out / "loras"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


@pytest.mark.slow
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
        if name == "grpo":  # no hinge
            assert summary["hinge_active"] == {}
        else:  # hinge_threshold 10 on the toy world: every sample is under it, every update trains.
            assert summary["hinge_active"] and all(v == 1.0 for v in summary["hinge_active"].values())
        # Evaluations during training after updates 2 and 3, the last one the run's "after"; the clock and the
        # counts grow, and the per-update counts are each method's.
        assert [e["update"] for e in run["evaluations"]] == [2, 3] and run["after"] == run["evaluations"][-1]["numbers"]
        assert 0 < run["evaluations"][0]["train_s"] < run["evaluations"][1]["train_s"] <= run["train_s"]
        calls = run["forwards"]["calls"]
        assert calls == {k: 3 * v for k, v in run["forwards_per_update"]["calls"].items()}
    per_update = {name: results["results"][name][0]["forwards_per_update"] for name in METHODS}
    assert per_update["direct-align"]["calls"] == {"no_grad": 8, "grad": 1, "recomputed": 0}  # rollout + one call
    assert per_update["draft-full"]["calls"] == {"no_grad": 0, "grad": 8, "recomputed": 8}  # every step re-run
    # GRPO: the group of 4 in one call at each of the 8 SDE steps, then the first 4 steps with gradient.
    assert per_update["grpo"]["calls"] == {"no_grad": 8, "grad": 4, "recomputed": 0}
    assert per_update["grpo"]["rows"] == {"no_grad": 32, "grad": 16, "recomputed": 0}
    # The sweep's learning rate ran with the first seed: its own row.
    for name in METHODS:
        (run,) = results["results"][f"{name} @ lr {SWEEP_LR:g}"]
        assert run["learning_rate"] == SWEEP_LR and "error" not in run, run.get("stderr_tail")


@pytest.mark.slow
def test_table_plots_time_to_target_pareto_and_time_ratio(comparison):
    out, results, stdout = comparison
    table = (out / "results.md").read_text()
    main = table.split("\n## ")[0]
    rows = [line for line in main.splitlines() if line.startswith("| ")][1:]  # minus the header
    assert [row.split("|")[1].strip() for row in rows] == [
        label for name in METHODS for label in (name, f"{name} @ lr {SWEEP_LR:g}")
    ]
    assert "hinge active" in table and "hinge_threshold=10" in table
    assert "## Time to target" in table and "## Pareto view of hacking" in table
    for png in ("curves.png", "time_to_target.png", "pareto.png"):
        assert (out / png).stat().st_size > 1000
    assert set(results["time_to_target"]["methods"]) == set(METHODS)
    assert set(results["time_to_target"]["ratios_over_srpo"]) == set()  # srpo did not run
    assert os.path.isfile(out / "loras" / "grpo-seed0" / "pytorch_lora_weights.safetensors")
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
    assert runs["grpo"]["fields"]["group_size"] == 8 and runs["grpo"]["fields"]["beta"] == 0.0  # override + variant
    cycled = runs["srpo-cycled-words"]
    assert cycled["method"] == "srpo" and cycled["fields"]["word_schedule"] == "cycle"
    assert cycled["fields"]["positive_words"] == ["Realistic photo", "Detailed", "Natural lighting"]
    assert runs["srpo-late-no-inversion"]["fields"]["train_window_start"] == 30


def test_toy_world_defaults_give_every_hinge_the_same_threshold(cm, tmp_path):
    from diffusers_srpo.toyworld.demo import TOY_TRAINER_SETTINGS

    settings = cm.resolve_settings(cm.build_parser().parse_args(["--output-dir", str(tmp_path), "--seeds", "0", "1"]))
    assert settings["methods"] == list(cm.METHOD_VARIANTS) and len(settings["runs"]) == 2 * len(cm.METHOD_VARIANTS)
    assert settings["rows"] == list(cm.METHOD_VARIANTS) and settings["eval_every"] == 0
    for run in settings["runs"]:
        fields = run["fields"]
        assert {k: fields[k] for k in TOY_TRAINER_SETTINGS} == dict(TOY_TRAINER_SETTINGS)
        if "hinge_threshold" in cm.config_fields(run["method"]):
            assert fields["hinge_threshold"] == cm.TOY_HINGE_THRESHOLD == 10.0
        else:
            assert run["method"].startswith(("tailorpo", "trajectory", "grpo")) and "hinge_threshold" not in fields
    with_hinge = {r["name"] for r in settings["runs"] if "hinge_threshold" in r["fields"]}
    assert with_hinge == set(cm.METHOD_VARIANTS) - {"tailorpo", "tailorpo-g", "trajectory-dpo", "grpo"}
    grpo = next(run for run in settings["runs"] if run["name"] == "grpo")["fields"]
    assert grpo["group_size"] == 4 and grpo["beta"] == 0.0 and grpo["reward_template"] == "bright. {prompt}"
    assert grpo["learning_rate"] == cm.DEFAULT_LEARNING_RATE  # the comparison's, not GRPOConfig's default


def test_a_sweep_runs_more_learning_rates_with_the_first_seed(cm, tmp_path):
    args = ["--methods", "srpo", "grpo", "--seeds", "3", "4", "--sweep-learning-rates", "3e-3", "3e-4",
            "--output-dir", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "loras"), "--eval-every", "5"]  # fmt: skip
    settings = cm.resolve_settings(cm.build_parser().parse_args(args))
    runs = [(r["label"], r["seed"], r["fields"]["learning_rate"], r["fields"]["output_dir"]) for r in settings["runs"]]
    loras = str(tmp_path / "loras")
    assert runs == [
        ("srpo @ lr 0.0003", 3, 3e-4, f"{loras}/srpo-lr0.0003-seed3"),
        ("srpo", 3, 1e-3, f"{loras}/srpo-seed3"),
        ("srpo", 4, 1e-3, f"{loras}/srpo-seed4"),
        ("srpo @ lr 0.003", 3, 3e-3, f"{loras}/srpo-lr0.003-seed3"),
        ("grpo @ lr 0.0003", 3, 3e-4, f"{loras}/grpo-lr0.0003-seed3"),
        ("grpo", 3, 1e-3, f"{loras}/grpo-seed3"),
        ("grpo", 4, 1e-3, f"{loras}/grpo-seed4"),
        ("grpo @ lr 0.003", 3, 3e-3, f"{loras}/grpo-lr0.003-seed3"),
    ]
    assert settings["rows"] == [
        "srpo @ lr 0.0003",
        "srpo",
        "srpo @ lr 0.003",
        "grpo @ lr 0.0003",
        "grpo",
        "grpo @ lr 0.003",
    ]
    assert settings["eval_every"] == 5
    assert settings["target_fraction"] == {"relative": 0.1} and settings["target_colour_accuracy"] == {
        "relative": -0.03
    }


@pytest.mark.parametrize(
    "value, target",
    [("base+0.10", {"relative": 0.1}), ("base - 0.03", {"relative": -0.03}), ("0.65", {"absolute": 0.65}), (0.5, {"absolute": 0.5})],
)  # fmt: skip
def test_parse_target(cm, value, target):
    assert cm.parse_target(value, "target-fraction") == target


@pytest.mark.parametrize(
    "values, median",
    [([1.0, 2.0, None], 2.0), ([1.0, None, None], None), ([3.0, 1.0], 2.0), ([1.0, None], None), ([None], None)],
)
def test_median_or_never(cm, values, median):
    assert cm.compare_report.median_or_never(values) == median


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
    one = {
        "runs": 1,
        "seeds": [0],
        "hacking_runs": 0,
        "hacking_reasons": ["reward flat/down: SRP -0.010, bright +0.00"],
    }
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
        (["--eval-every", "-1"], "--eval-every must be a non-negative integer"),
        (["--target-fraction", "bright"], "--target-fraction must be a number in [0, 1] or 'base+X'"),
        (["--target-colour-accuracy", "1.5"], "--target-colour-accuracy must be in [0, 1]"),
        (["--sweep-learning-rates", "1e-3"], "--sweep-learning-rates must differ from each other and from"),
        (["--sweep-learning-rates", "0"], "--sweep-learning-rates must be > 0"),
        (["--report-from", "x.json", "--steps", "3"], "--report-from takes only --output-dir and the target options"),
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

    monkeypatch.setattr(cm.compare_runner, "run_child", fake_child)
    assert cm.compare(settings) == 1
    assert jobs == [("before", "srpo", 0), ("train", "srpo", 0)]  # nothing loads again after the failure
    assert "FAILED while loading" in capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r.get("phase") for r in results["srpo"] + results["refl"]] == ["load", "skipped", "skipped", "skipped"]


# ----------------------------------------------------------------------------------------------- forward counts
def test_forward_counter_tells_the_kinds_apart(cm):
    from torch.utils.checkpoint import checkpoint

    module = torch.nn.Linear(3, 3)
    counter = cm.ForwardCounter(module)
    x = torch.randn(5, 3, requires_grad=True)
    with torch.no_grad():
        module(x)
    y = module(x)
    z = checkpoint(module, x[:2], use_reentrant=False)  # a forward with grad, re-run during backward
    with counter.paused():
        module(x)  # not counted (an evaluation)
    (y.sum() + z.sum()).backward()
    assert counter.snapshot() == {
        "calls": {"no_grad": 1, "grad": 2, "recomputed": 1},
        "rows": {"no_grad": 5, "grad": 7, "recomputed": 2},
    }
    counter.remove()
    module(x)
    assert counter.calls["grad"] == 2


# ----------------------------------------------------------------------------------------------- evaluations in training
def test_evaluations_during_training_change_nothing_and_are_not_counted(cm, tmp_path):
    """Two SRPO updates with an evaluation after each, and the same run without: the same losses; the evaluations'
    forwards are not counted and their time is not training time; the last evaluation is after the last update."""
    from diffusers_srpo.toyworld.demo import TOY_TRAINER_SETTINGS
    from diffusers_srpo.trainers import SRPOConfig, SRPOTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    job = {"positive_word": "bright", "negative_word": "dark", "train_prompts": ["a red circle", "a blue square"],
           "held_out_prompts": ["a green circle"], "evaluation_seeds": [10_000], "eval_batch_size": 16, "toy": True}  # fmt: skip
    runs = {}
    try:
        for eval_every in (1, 0):
            pipe, reward = cm.load_model_and_reward({"toy": True})
            config = SRPOConfig(**TOY_TRAINER_SETTINGS, output_dir=str(tmp_path / f"e{eval_every}"), max_train_steps=2,
                                learning_rate=1e-3, positive_words=["bright"], negative_words=["dark"],
                                word_schedule="fixed", hinge_threshold=10.0, checkpointing_steps=0)  # fmt: skip
            trainer = SRPOTrainer(pipe, reward=reward, prompts=job["train_prompts"], config=config)
            runs[eval_every] = cm.train_and_time(trainer, {**job, "eval_every": eval_every}, reward)
    finally:
        torch.set_num_threads(threads)
    with_eval, without = runs[1], runs[0]
    assert [h["loss"] for h in with_eval["history"]] == [h["loss"] for h in without["history"]]
    assert [e["update"] for e in with_eval["evaluations"]] == [1, 2] and without["evaluations"] == []
    # SRPO: an 8-step rollout without gradient, then the denoise and the inversion branch's call with gradient.
    per_update = {"no_grad": 8, "grad": 2, "recomputed": 0}
    assert with_eval["forwards_per_update"]["calls"] == per_update == without["forwards_per_update"]["calls"]
    assert [e["forwards"]["calls"]["no_grad"] for e in with_eval["evaluations"]] == [8, 16]
    first, second = with_eval["evaluations"]
    assert 0 < first["train_s"] < second["train_s"] and first["eval_s"] > 0
    assert with_eval["eval_s"] == pytest.approx(first["eval_s"] + second["eval_s"])
    for key in ("oracle_target_fraction", "oracle_colour_accuracy", "reward_all"):
        assert key in second["numbers"]


# ----------------------------------------------------------------------------------------------- time to target, Pareto
# A fake world: the bright fraction rises by RATE per update (x the learning rate's factor), colour accuracy falls by
# COLOUR_LOSS per update at the highest learning rate; each update takes SECONDS and pushes SAMPLES samples through
# the transformer.
FAKE_BEFORE = {"reward_held_out": 0.6, "reward_all": 0.6, "reward_all_std": 0.1, "evaluation_srp": 0.0,
               "evaluation_srp_std": 0.1, "oracle_target_fraction": 0.5, "oracle_colour_accuracy": 0.98,
               "oracle_shape_accuracy": 0.5}  # fmt: skip
RATE = {"srpo": 0.024, "grpo": 0.004, "draft-full": 0.011}
SECONDS = {"srpo": 0.5, "grpo": 1.0, "draft-full": 1.2}
SAMPLES = {"srpo": 10, "grpo": 48, "draft-full": 16}
COLOUR_LOSS = {"srpo": 0.02, "grpo": 0.001, "draft-full": 0.003}


def _fake_numbers(name, learning_rate, update):
    factor = learning_rate / 1e-3
    return {**FAKE_BEFORE,
            "oracle_target_fraction": 0.5 + RATE[name] * factor * update,
            "oracle_colour_accuracy": 0.98 - (COLOUR_LOSS[name] * update if learning_rate > 1e-3 else 0.0),
            "reward_all": 0.6 + 0.01 * update}  # fmt: skip


def _fake_child(job, workdir):
    if job["kind"] == "before":
        return {"before": dict(FAKE_BEFORE), "device": "cpu", "wall_s": 1.0}
    name, learning_rate, steps = job["name"], job["fields"]["learning_rate"], job["fields"]["max_train_steps"]
    every = job["eval_every"]

    def forwards(update):
        return {"calls": {"no_grad": 8 * update, "grad": 2 * update, "recomputed": 0},
                "rows": {"no_grad": (SAMPLES[name] - 2) * update, "grad": 2 * update, "recomputed": 0}}  # fmt: skip

    evaluations = [
        {"update": u, "train_s": SECONDS[name] * u, "forwards": forwards(u), "numbers": _fake_numbers(name, learning_rate, u),
         "eval_s": 0.1}
        for u in range(1, steps + 1) if u % every == 0 or u == steps
    ]  # fmt: skip
    return {
        "device": "cpu", "wall_s": 1.0, "update_s": SECONDS[name], "first_update_s": SECONDS[name],
        "peak_memory_mib": 1000.0, "train_memory_mib": 10.0, "train_s": SECONDS[name] * steps,
        "forwards": forwards(steps),
        "forwards_per_update": {part: {k: v / steps for k, v in c.items()} for part, c in forwards(steps).items()},
        "history": [{"reward": 0.5, "loss": 1.0} for _ in range(steps)],
        "evaluations": evaluations, "after": evaluations[-1]["numbers"],
    }  # fmt: skip


def _fake_comparison(cm, monkeypatch, out, *args):
    settings = cm.resolve_settings(cm.build_parser().parse_args(
        ["--methods", "srpo", "grpo", "draft-full", "--steps", "10", "--eval-every", "5", "--output-dir", str(out), *args]
    ))  # fmt: skip
    monkeypatch.setattr(cm.compare_runner, "run_child", _fake_child)
    assert cm.compare(settings) == 0
    return json.loads((out / "results.json").read_text())


def test_time_to_target_ratios_and_bounds(cm, tmp_path, monkeypatch, capsys):
    results = _fake_comparison(cm, monkeypatch, tmp_path, "--seeds", "0", "1")
    ttt = results["time_to_target"]
    assert ttt["target"]["thresholds"] == pytest.approx({"oracle_target_fraction": 0.6, "oracle_colour_accuracy": 0.95})
    srpo, grpo, draft = (ttt["methods"][n] for n in ("srpo", "grpo", "draft-full"))
    # srpo: +0.12 at update 5 (the first evaluation); draft-full: +0.055 at 5, +0.11 at 10; grpo: +0.04 at 10, never.
    assert [r["update"] for r in srpo["runs"]] == [5, 5] and srpo["bound"] == "=" and srpo["reached"] == 2
    assert srpo["train_s"]["mean"] == pytest.approx(2.5) and srpo["forward_rows_total"]["mean"] == 50
    assert [r["reached"] for r in grpo["runs"]] == [False, False] and grpo["bound"] == ">="
    assert grpo["train_s"]["mean"] == pytest.approx(10.0)  # its whole budget: a lower bound
    assert draft["update"]["mean"] == 10 and draft["bound"] == "="
    ratios = ttt["ratios_over_srpo"]
    assert ratios["grpo"]["bound"] == ">=" and ratios["grpo"]["train_s"] == pytest.approx(4.0)
    assert ratios["grpo"]["forward_rows_total"] == pytest.approx(480 / 50)
    assert ratios["draft-full"]["bound"] == "=" and ratios["draft-full"]["train_s"] == pytest.approx(12 / 2.5)
    # Medians: grpo's is never (no ratio), draft-full's is 12 s.
    assert grpo["median"]["train_s"] is None and ratios["grpo"]["median"]["train_s"] is None
    assert ratios["draft-full"]["median"]["train_s"] == pytest.approx(12 / 2.5)
    table = (tmp_path / "results.md").read_text()
    assert "| grpo | 0 | not reached (> 10) | ≥ 10.0 |" in table
    assert (
        "SRPO's speed-up to the target over grpo (2 and 2 seeds) by the mean (a lower bound: not every run of grpo "
        "reached the target): ≥ 4.00x in training time, ≥ 9.60x in transformer samples, ≥ 2.00x in updates; by the "
        "median (a run that never reaches it counts as never): n/a in training time"
    ) in table
    assert "over draft-full (2 and 2 seeds) by the mean: 4.80x in training time, 3.20x in transformer samples" in table
    assert (tmp_path / "time_to_target.png").stat().st_size > 1000


def test_pareto_view_names_the_method_that_keeps_content(cm, tmp_path, monkeypatch):
    results = _fake_comparison(cm, monkeypatch, tmp_path, "--seeds", "0", "--sweep-learning-rates", "3e-3")
    view = results["pareto"]
    assert set(view["points"]) == {"srpo", "grpo", "draft-full"} and view["learning_rates"] == [1e-3, 3e-3]
    assert len(view["points"]["srpo"]) == 4  # two evaluations at each of two learning rates
    levels = [row["gain"] for row in view["levels"]]
    assert levels[0] == 0.05 and levels[-1] == pytest.approx(0.70)  # srpo at 3e-3: 0.072 x 10
    row = view["levels"][1]  # gain >= 0.10: srpo and draft-full lose nothing, grpo 0.01: within the tolerance, a tie
    assert (
        row["best"]["colour"] == ["srpo", "grpo", "draft-full"] and row["methods"]["grpo"]["colour"]["colour_loss"] > 0
    )
    # Only srpo at 3e-3 reaches 0.35 and more (with a colour loss): it wins those levels alone.
    high = next(r for r in view["levels"] if r["gain"] == pytest.approx(0.40))
    assert high["methods"]["draft-full"]["colour"] is None and high["best"]["colour"] == ["srpo"]
    table = (tmp_path / "results.md").read_text()
    assert "## Pareto view of hacking" in table
    assert (
        "colour accuracy kept best at equal targeted gain, by gain level: 0.05-0.10: srpo, grpo, draft-full (tie); "
        "0.15: srpo, draft-full (tie); 0.20: srpo; 0.25-0.30: draft-full; 0.35-0.70: srpo (the only one to get there) "
        "(levels won, ties counted for each: srpo 12, draft-full 5, grpo 2)."
    ) in table
    assert (tmp_path / "pareto.png").stat().st_size > 1000


@pytest.fixture
def no_plots(cm, monkeypatch):
    """The report without its plots (tested above), to keep the merging tests fast."""
    for name in ("plot", "plot_time_to_target", "plot_pareto"):
        monkeypatch.setattr(cm.compare_report, name, lambda *args: None)


def test_report_from_saved_results_merges_seeds_and_retargets(cm, tmp_path, monkeypatch, no_plots):
    first = _fake_comparison(cm, monkeypatch, tmp_path / "a", "--seeds", "0", "--sweep-learning-rates", "3e-3")
    second = _fake_comparison(cm, monkeypatch, tmp_path / "b", "--seeds", "1", "2")
    status = cm.main(["--report-from", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json"),
                      "--output-dir", str(tmp_path / "c"), "--target-fraction", "base+0.03"])  # fmt: skip
    assert status == 0
    merged = json.loads((tmp_path / "c" / "results.json").read_text())
    assert merged["settings"]["seeds"] == [0, 1, 2] and merged["settings"]["sweep_learning_rates"] == [3e-3]
    assert merged["settings"]["rows"] == ["srpo", "srpo @ lr 0.003", "grpo", "grpo @ lr 0.003", "draft-full",
                                          "draft-full @ lr 0.003"]  # fmt: skip
    assert [r["seed"] for r in merged["results"]["grpo"]] == [0, 1, 2]
    # base+0.03: grpo reaches it at update 10 (+0.04) now, in all three seeds.
    grpo = merged["time_to_target"]["methods"]["grpo"]
    assert (
        grpo["reached"] == 3
        and grpo["of"] == 3
        and merged["time_to_target"]["ratios_over_srpo"]["grpo"]["bound"] == "="
    )
    assert merged["total_wall_s"] == pytest.approx(first["total_wall_s"] + second["total_wall_s"])
    assert merged["pareto"]["learning_rates"] == [1e-3, 3e-3] and merged["pareto"]["seed"] == 0


def test_report_from_refuses_results_that_do_not_belong_together(cm, tmp_path, monkeypatch, capsys, no_plots):
    _fake_comparison(cm, monkeypatch, tmp_path / "a", "--seeds", "0")
    _fake_comparison(cm, monkeypatch, tmp_path / "b", "--seeds", "0", "1")
    a, b = str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")
    capsys.readouterr()
    assert cm.main(["--report-from", a, b, "--output-dir", str(tmp_path / "c")]) == 2
    assert "'srpo' seed 0 is in two files" in capsys.readouterr().err
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    data["settings"]["steps"] = 20
    (tmp_path / "b" / "results.json").write_text(json.dumps(data))
    assert cm.main(["--report-from", a, b, "--output-dir", str(tmp_path / "c")]) == 2
    assert "its 'steps' (20) differs" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
