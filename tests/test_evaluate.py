"""``diffusers-srpo evaluate`` on the toy world: base vs the demo's LoRA, checked against an independent scoring of the
same images, the stock pipeline from the same noise, the oracles, a resumed rerun, and bad inputs."""

import contextlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_srpo.cli import build_parser, main
from diffusers_srpo.evaluation import (
    BASE,
    OUTPUT_NAMES,
    grid_cell_box,
    grid_tile_size,
    image_seed,
    mean_with_interval,
    variants_for,
)
from diffusers_srpo.toyworld.generator import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, PIPELINE_DIR
from diffusers_srpo.toyworld.reward import REWARD_WEIGHTS_DIR

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SEEDS = [5, 6]
TOY_REWARD = f"clip:{REWARD_WEIGHTS_DIR}"
SAMPLER = [
    "--height", IMAGE_SIZE, "--width", IMAGE_SIZE, "--num_inference_steps", 8, "--guidance_scale", 1.0,
    "--max_sequence_length", MAX_SEQUENCE_LENGTH, "--torch_dtype", "float32", "--device", "cpu", "--batch_size", 4,
]  # fmt: skip


def run_main(argv) -> tuple[int, str, str]:
    """``main(argv)`` with its exit status, stdout and stderr (argparse's own errors exit)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def evaluate_argv(output_dir, lora, *extra, prompt_file=None):
    return [
        "evaluate", "--model", PIPELINE_DIR, "--lora", lora, "--prompt_file", prompt_file, "--reward", TOY_REWARD,
        "--num_images_per_prompt", len(SEEDS), "--seed", SEEDS[0], *SAMPLER, "--output_dir", output_dir, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, one_thread_per_module):
    """The demo's LoRA (a few updates), then ``evaluate`` of base vs it with the toy reward."""
    from diffusers_srpo.toyworld.demo import run_demo

    root = tmp_path_factory.mktemp("evaluate")
    run_demo(str(root / "demo"), max_train_steps=4, evaluation_seeds=1, evaluate_every=4)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = evaluate_argv(root / "out", root / "demo", prompt_file=root / "prompts.txt")
    status, stdout, stderr = run_main(argv)
    assert status == 0, stderr[-3000:]
    return root, argv, stdout, stderr


def read_images(out, variant) -> torch.Tensor:
    """``[prompt * seed, 3, H, W]`` in [0, 1], read by the test itself, prompt-major."""
    pixels = [
        np.asarray(Image.open(out / "images" / variant / f"{i}-{seed}.png").convert("RGB"), dtype=np.float32)
        for i in range(len(PROMPTS))
        for seed in SEEDS
    ]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 255


@pytest.fixture(scope="module")
def own_scores(evaluated):
    """The test's own scoring of every image: the shipped toy reward, loaded without the registry."""
    from diffusers_srpo.toyworld.reward import load_reward

    root = evaluated[0]
    reward = load_reward()
    prompts = [prompt for prompt in PROMPTS for _ in SEEDS]
    with torch.no_grad():
        return {variant: reward(read_images(root / "out", variant), prompts).numpy() for variant in (BASE, "demo")}


def test_writes_every_file_with_a_progress_bar(evaluated):
    root, _, stdout, stderr = evaluated
    out = root / "out"
    assert sorted(os.listdir(out)) == sorted(OUTPUT_NAMES)
    assert sorted(os.listdir(out / "images")) == [BASE, "demo"]
    for variant in (BASE, "demo"):
        assert sorted(os.listdir(out / "images" / variant)) == sorted(f"{i}-{s}.png" for i in range(3) for s in SEEDS)
    assert "render: 100%" in stderr and "12/12" in stderr
    assert "| base |" in stdout and "12 images rendered and 12 scores computed now" in stdout
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [(e["variant"], e["prompt_index"], e["seed"]) for e in lines] == [
        (v, i, s) for v in (BASE, "demo") for i in range(3) for s in SEEDS
    ]
    assert all(set(e["scores"]) == {TOY_REWARD} and e["prompt"] == PROMPTS[e["prompt_index"]] for e in lines)


def test_the_means_and_scores_are_the_rewards_own(evaluated, own_scores):
    out = evaluated[0] / "out"
    summary = json.loads((out / "summary.json").read_text())
    for variant in (BASE, "demo"):
        stats = summary["variants"][variant]["scores"][TOY_REWARD]
        assert stats["mean"] == pytest.approx(float(own_scores[variant].mean()), abs=1e-5)
        assert stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1]
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    written = np.array([e["scores"][TOY_REWARD] for e in lines])
    np.testing.assert_allclose(written, np.concatenate([own_scores[BASE], own_scores["demo"]]), rtol=0, atol=1e-5)


def test_the_win_rate_is_the_tests_own_count(evaluated, own_scores):
    summary = json.loads((evaluated[0] / "out" / "summary.json").read_text())
    against = summary["variants"]["demo"]["scores"][TOY_REWARD]["against_base"]
    lora, base = own_scores["demo"], own_scores[BASE]
    assert against["win_rate"] == pytest.approx(np.sum(lora > base) / len(base), abs=1e-12)
    assert against["mean_difference"] == pytest.approx(float((lora - base).mean()), abs=1e-5)
    low, high = against["win_rate_ci95"]
    assert 0 <= low <= against["win_rate"] <= high <= 1
    assert "against_base" not in summary["variants"][BASE]["scores"][TOY_REWARD]


def test_every_variant_is_the_stock_pipeline_from_the_same_noise(evaluated):
    from diffusers import FluxPipeline

    root = evaluated[0]
    pipe = FluxPipeline.from_pretrained(PIPELINE_DIR, torch_dtype=torch.float32)
    settings = dict(height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=8, guidance_scale=1.0, output_type="np")
    prompt_index, seed = 1, SEEDS[1]

    def render():
        generator = torch.Generator().manual_seed(image_seed(seed, prompt_index))
        image = pipe(PROMPTS[prompt_index], generator=generator, max_sequence_length=MAX_SEQUENCE_LENGTH, **settings)
        return (image.images[0] * 255).round()

    base = render()
    pipe.load_lora_weights(str(root / "demo"))
    lora = render()
    for variant, expected in ((BASE, base), ("demo", lora)):
        written = np.asarray(Image.open(root / "out" / "images" / variant / f"{prompt_index}-{seed}.png"), np.float32)
        assert np.abs(written - expected).max() <= 1, variant
    assert np.abs(lora - base).max() > 1, "the LoRA changed nothing"


def test_the_grid_has_a_row_per_prompt_and_a_column_per_variant(evaluated):
    out = evaluated[0] / "out"
    grid = Image.open(out / "grid.png").convert("RGB")
    tile = grid_tile_size((IMAGE_SIZE, IMAGE_SIZE))
    last_right, last_bottom = grid_cell_box(len(PROMPTS) - 1, 1, tile)[2:]
    assert last_right < grid.size[0] < grid_cell_box(0, 2, tile)[2]  # two columns, no room for a third
    assert last_bottom < grid.size[1] < grid_cell_box(len(PROMPTS), 0, tile)[3]  # a row per prompt, no more
    for row in range(len(PROMPTS)):
        for column, variant in enumerate((BASE, "demo")):
            image = Image.open(out / "images" / variant / f"{row}-{SEEDS[0]}.png").convert("RGB")
            cell = grid.crop(grid_cell_box(row, column, tile))
            assert np.array_equal(np.asarray(cell), np.asarray(image.resize(tile, Image.NEAREST))), (row, variant)


def test_the_toy_world_reports_the_oracles_next_to_the_reward(evaluated):
    from diffusers_srpo.toyworld.demo import oracle_numbers

    out = evaluated[0] / "out"
    summary = json.loads((out / "summary.json").read_text())
    for variant in (BASE, "demo"):
        oracles = summary["variants"][variant]["oracles"]
        own = oracle_numbers(read_images(out, variant), [p for p in PROMPTS for _ in SEEDS], "bright")
        for name, value in own.items():
            assert oracles[name]["mean"] == pytest.approx(value, abs=1e-6), (variant, name)  # theirs: float32
        assert oracles["oracle_bright_fraction"]["mean"] + oracles["oracle_dark_fraction"]["mean"] == pytest.approx(1)
        assert {"oracle_smooth_fraction", "oracle_grainy_fraction"} <= set(oracles)
    markdown = (out / "summary.md").read_text()
    assert "## Toy-world oracles" in markdown and "| demo | " in markdown and "colour accuracy" in markdown


def test_a_rerun_resumes_without_rendering_or_scoring_again(evaluated, tmp_path, monkeypatch):
    root, argv, _, _ = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    argv = [out if a == root / "out" else a for a in argv]
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    def refuse(*args, **kwargs):
        raise AssertionError("a rerun with every image and score in place loaded a model")

    monkeypatch.setattr("diffusers.DiffusionPipeline.from_pretrained", refuse)
    monkeypatch.setattr("diffusers_srpo.evaluation.run.load_reward", refuse)
    status, stdout, stderr = run_main(argv)
    assert status == 0, stderr[-3000:]
    assert "0 images rendered and 0 scores computed now" in stdout
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    # A reward added on the rerun that does not load: one line, and the folder as it was.
    monkeypatch.undo()
    (tmp_path / "no_clip_here").mkdir()
    status, _, stderr = run_main([*argv, "--reward", f"clip:{tmp_path / 'no_clip_here'}"])
    assert status == 1 and len(stderr.splitlines()) == 1 and "does not load" in stderr, stderr
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    # One image gone: it alone is rendered again (from the same noise) and scored again.
    missing = out / "images" / "demo" / f"2-{SEEDS[0]}.png"
    missing.unlink()
    status, stdout, stderr = run_main(argv)
    assert status == 0, stderr[-3000:]
    assert "1 images rendered and 1 scores computed now" in stdout
    again, first = (np.asarray(Image.open(folder / missing.relative_to(out)), np.float32) for folder in (out, root / "out"))
    assert np.abs(again - first).max() <= 1
    after, before = (json.loads((folder / "summary.json").read_text())["variants"] for folder in (out, root / "out"))
    assert after[BASE] == before[BASE]
    assert after["demo"]["scores"][TOY_REWARD]["mean"] == pytest.approx(before["demo"]["scores"][TOY_REWARD]["mean"], abs=1e-3)


def test_overwrite_output_dir_replaces_what_evaluate_wrote_and_nothing_else(evaluated, tmp_path):
    out = tmp_path / "out"
    (out / "images" / BASE).mkdir(parents=True)
    shutil.copy(evaluated[0] / "out" / "evaluation.json", out)  # another evaluation: other prompts and steps
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE)).save(out / "images" / BASE / f"0-{SEEDS[0]}.png")  # a stale image
    (out / "notes.txt").write_text("the user's")
    (tmp_path / "one.txt").write_text("a yellow square\n")
    argv = evaluate_argv(out, evaluated[0] / "demo", prompt_file=tmp_path / "one.txt")
    argv = argv[: argv.index("--lora")] + argv[argv.index("--lora") + 2 :]
    argv[argv.index("--num_images_per_prompt") + 1] = 1
    argv[argv.index("--num_inference_steps") + 1] = 2
    assert run_main(argv)[0] == 2  # busy with another evaluation
    status, stdout, stderr = run_main([*argv, "--overwrite_output_dir"])
    assert status == 0, stderr[-3000:]
    assert "1 images rendered and 1 scores computed now" in stdout
    assert sorted(os.listdir(out)) == sorted([*OUTPUT_NAMES, "notes.txt"]) and (out / "notes.txt").read_text() == "the user's"
    assert np.asarray(Image.open(out / "images" / BASE / f"0-{SEEDS[0]}.png")).max() > 0, "the stale image was kept"
    assert json.loads((out / "evaluation.json").read_text())["prompts"] == ["a yellow square"]


@pytest.fixture(scope="module")
def other_models_lora(tmp_path_factory):
    """A LoRA trained for another (narrower) FLUX model: the tiny test pipeline's."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers_srpo.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    pipe.transformer.add_adapter(config)
    folder = tmp_path_factory.mktemp("other-lora")
    FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return folder


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("reward_that_does_not_load", 1, "reward 'clip:no_clip_here' does not load: 'no_clip_here' holds neither"),
        ("unknown_reward", 2, "unknown reward 'imagereward'"),
        ("empty_prompt_file", 2, "prompt file 'empty.txt' holds no prompt"),
        ("busy_output_dir", 2, "output_dir 'busy' already holds files of another run; pass --overwrite_output_dir"),
        ("another_evaluation", 2, f"holds an evaluation with other settings: height ({IMAGE_SIZE} there)"),
        ("no_prompt_file", 2, "no prompts: pass --prompt_file"),
        ("reward_twice", 2, f"--reward {TOY_REWARD!r} is given twice"),
        ("negative_seed", 2, "--seed must be >= 0, got -1"),
    ],
)
def test_a_bad_input_is_one_line_before_any_image(case, status, message, evaluated, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "no_clip_here").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("someone else's")
    (tmp_path / "evaluated").mkdir()
    shutil.copy(evaluated[0] / "out" / "evaluation.json", tmp_path / "evaluated")
    lora, output_dir, prompt_file = evaluated[0] / "demo", "out", "prompts.txt"
    extra = []
    if case == "reward_that_does_not_load":
        extra = ["--reward", "clip:no_clip_here"]
    elif case == "unknown_reward":
        extra = ["--reward", "imagereward:x"]
    elif case == "empty_prompt_file":
        prompt_file = "empty.txt"
    elif case == "busy_output_dir":
        output_dir = "busy"
    elif case == "another_evaluation":
        output_dir, extra, prompt_file = "evaluated", ["--height", IMAGE_SIZE // 2], evaluated[0] / "prompts.txt"
    elif case == "reward_twice":
        extra = ["--reward", TOY_REWARD]
    elif case == "negative_seed":
        extra = ["--seed", -1]
    argv = evaluate_argv(output_dir, lora, *extra, prompt_file=prompt_file)
    if case == "no_prompt_file":
        argv = argv[: argv.index("--prompt_file")] + argv[argv.index("--prompt_file") + 2 :]
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    got_status, _, stderr = run_main(argv)
    assert got_status == status and stderr.startswith("diffusers-srpo evaluate: error: "), stderr
    assert len(stderr.splitlines()) == 1 and message in stderr, stderr
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before


def test_a_lora_for_another_model_is_one_line_once_the_model_is_loaded(
    evaluated, other_models_lora, tmp_path, capsys, monkeypatch
):
    from diffusers.utils import logging as diffusers_logging

    # diffusers' log handler keeps the stderr of its first use; here it writes where a terminal would show it.
    monkeypatch.setattr(diffusers_logging._get_library_root_logger().handlers[0], "stream", sys.stderr)
    argv = evaluate_argv(tmp_path / "out", other_models_lora, prompt_file=evaluated[0] / "prompts.txt")
    assert main([str(a) for a in argv]) == 1
    # The pipeline's loading bars, then the one line that speaks of an error (diffusers' own log of it is held back).
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == stderr.strip().splitlines()[-1:], stderr[-3000:]
    assert errors[0].startswith(f"diffusers-srpo evaluate: error: LoRA '{other_models_lora}' does not fit '{PIPELINE_DIR}'")
    assert "Was it trained for another model?" in errors[0]
    assert os.listdir(tmp_path) == []


def test_bootstrap_resamples_whole_prompts():
    # Every prompt has the same mean over its seeds: however prompts are drawn, the mean is the same.
    values = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert mean_with_interval(values) == {"mean": 0.5, "ci95": [0.5, 0.5]}
    spread = mean_with_interval(np.array([[0.0], [1.0], [0.0], [1.0]]))
    assert spread["mean"] == 0.5 and spread["ci95"][0] < 0.5 < spread["ci95"][1]


def test_variants_are_named_after_their_loras(tmp_path):
    for folder in ("a/srpo-output", "b/srpo-output", "c/run"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "c" / "run" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    loras = [
        (str(tmp_path / "a" / "srpo-output"), 1.0),
        (str(tmp_path / "a" / "srpo-output"), 0.5),
        (str(tmp_path / "b" / "srpo-output"), 1.0),
        (str(tmp_path / "c" / "run" / "pytorch_lora_weights.safetensors"), 1.0),
        ("owner/some-lora", 0.8),
    ]
    variants = variants_for(loras)
    assert [v.name for v in variants] == [BASE, "srpo-output", "srpo-output@0.5", "srpo-output-2", "run", "some-lora@0.8"]
    assert variants[4].weights_sha256 is not None and variants[5].weights_sha256 is None


def test_help_gives_every_option_of_evaluate_its_help():
    _, subparsers = build_parser()
    for action in subparsers["evaluate"]._actions:
        assert action.dest == "help" or (action.help and action.help.strip()), action.dest
    args = subparsers["evaluate"].parse_args(["--lora", "a", "--lora", "b:0.5", "c", "--reward", "x", "--reward", "y"])
    assert args.lora == ["a", "b:0.5", "c"] and args.reward == ["x", "y"]
