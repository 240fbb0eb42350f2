"""The ``diffusers-srpo`` command line, end to end through real subprocesses on the tiny offline world."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_srpo import SRPOConfig
from diffusers_srpo.cli import COMMANDS, build_parser, main

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def run_cli(*args, cwd=None):
    executable = shutil.which("diffusers-srpo")
    assert executable, "the console script is not installed"
    return subprocess.run([executable, *map(str, args)], capture_output=True, text=True, timeout=600, env=ENV, cwd=cwd)


@pytest.fixture(scope="module")
def trained(world):
    """``diffusers-srpo train`` from a YAML file with one option overridden on the command line."""
    config = world / "srpo.yaml"
    config.write_text(
        f"model: {world / 'flux'}\n"
        f"reward: clip:{world / 'clip'}\n"
        "torch_dtype: float32\n"
        f"prompt_file: {world / 'prompts.txt'}\n"
        f"output_dir: {world / 'lora'}\n"
        "resolution: 32\nrollout_steps: 2\nmax_sequence_length: 16\nmax_train_steps: 5\n"
        "learning_rate: 1e-2\n"  # YAML reads this as a string: the option's type must turn it into a float
        "lora_rank: 4\nmixed_precision: 'no'\ncpu: true\ncheckpointing_steps: 0\nvalidation_steps: 0\n"
        "positive_words: [Bright, Sharp]\n"
    )
    result = run_cli("train", "--config", config, "--max_train_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return world / "lora", result


def test_train_from_a_yaml_file_with_overrides(trained):
    out, result = trained
    assert f"to {out}" in result.stdout
    settings = json.loads((out / "srpo_config.json").read_text())
    assert settings["max_train_steps"] == 2  # the command line wins over the file
    assert settings["learning_rate"] == 0.01 and settings["positive_words"] == ["Bright", "Sharp"]
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())


def test_sample_with_a_scaled_lora_matches_the_pipeline(world, trained, tmp_path):
    lora, _ = trained
    out = tmp_path / "samples"
    common = ["--height", 32, "--width", 32, "--num_inference_steps", 2, "--max_sequence_length", 16, "--seed", 3]
    result = run_cli(
        "sample", "--model", world / "flux", "--prompt", "a red circle", "a blue square", "--lora", f"{lora}:0.5",
        "--torch_dtype", "float32", "--device", "cpu", "--output_dir", out, *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["000-a-red-circle.png", "001-a-blue-square.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (32, 64)

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(world / "flux")
    kwargs = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    generate = lambda: pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(3), **kwargs).images  # noqa: E731
    base = generate()
    pipe.load_lora_weights(str(lora), adapter_name="trained")
    pipe.set_adapters(["trained"], adapter_weights=[0.5])
    expected = (generate() * 255).round()
    written = np.stack([np.asarray(Image.open(out / name), dtype=np.float32) for name in files[:2]])
    assert np.abs(written - expected).max() <= 1
    assert np.abs(written - (base * 255).round()).max() > 1, "the LoRA changed nothing"


def test_demo_writes_lora_grids_curves_and_metrics(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--output_dir", out, "--max_train_steps", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("pytorch_lora_weights.safetensors", "before_after.png", "curves.png", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "oracle_bright_fraction" in metrics["history"][-1]
    for numbers in (metrics["before"], metrics["after"]):
        assert 0 <= numbers["oracle_bright_fraction"] <= 1 and numbers["oracle_colour_accuracy"] > 0.5
    assert "unprompted bright fraction" in result.stdout

    from diffusers_srpo.toyworld.generator import load_pipeline

    load_pipeline().load_lora_weights(str(out))  # what the demo wrote loads into a stock pipeline


def test_help_lists_every_option_with_its_help():
    _, subparsers = build_parser()
    assert set(subparsers) == set(COMMANDS) == {"train", "sample", "demo", "extract-lora", "evaluate"}
    for name, subparser in subparsers.items():
        for action in subparser._actions:
            if action.dest != "help":
                assert action.help and action.help.strip(), f"{name} --{action.dest} has no help"
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for config_field in fields(SRPOConfig):
        assert f"--{config_field.name}" in result.stdout, config_field.name
    assert "Gradient-norm clip" in result.stdout and "--reward" in result.stdout
    top = run_cli("--help")
    assert all(command in top.stdout for command in COMMANDS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--no_such_option", "1"], "unrecognized arguments: --no_such_option"),
        (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["train", "--max_train_steps", "many"], "invalid int value: 'many'"),
        (["train", "--prompt_file", "p.txt", "--train_window_start", "30"], "train_window_start"),
        (["train", "--prompt_file", "p.txt", "--torch_dtype", "float8"], "--torch_dtype must be one of"),
        (["train", "--output_dir", "out"], "no training prompts"),
        (["train", "--config", "bad.yaml"], "unknown settings: learning_rat"),
        (["sample", "--output_dir", "out"], "no prompt"),
        (["sample", "--prompt", "x", "--lora", "nowhere/at/all:0.5"], "LoRA 'nowhere/at/all'"),
        (["demo", "--positive_word", "purple", "--output_dir", "out"], "control word 'purple' names no style"),
        (["demo", "--positive_word", "bright", "--negative_word", "grainy"], "name different styles"),
        (["extract-lora", "--output_dir", "out"], "--tuned is required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["train", "--method", "dpo"], "--method must be one of srpo, direct-align, refl, draft, tailorpo"),
        (["train", "--method", "refl", "--draft_k", "2"], "unrecognized arguments: --draft_k"),
        (["train", "--method", "draft", "--prompt_file", "p.txt", "--draft_k", "99"], "draft_k must be an integer"),
        (["train", "--config", "draft.yaml", "--prompt_file", "p.txt"], "draft_k must be an integer"),
        (["train", "--method", "srpo", "--config", "draft.yaml"], "unknown settings: draft_k"),
        (["train", "--method", "direct-align", "--prompt_file", "p.txt", "--use_inversion", "true"], "use_inversion"),
        (["train", "--method", "tailorpo", "--prompt_file", "p.txt", "--beta", "0"], "beta must be > 0"),
    ],
)
def test_bad_command_lines_fail_with_one_line_and_write_nothing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    (tmp_path / "draft.yaml").write_text("method: draft\ndraft_k: -3\n")
    before = sorted(os.listdir(tmp_path))
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("diffusers-srpo")
    assert sorted(os.listdir(tmp_path)) == before


def test_help_of_each_method_lists_its_own_options():
    from diffusers_srpo.trainers import METHODS

    for method, trainer_class in METHODS.items():
        _, subparsers = build_parser(method)
        options = {action.dest for action in subparsers["train"]._actions}
        assert {f.name for f in fields(trainer_class.config_class)} <= options, method
    result = run_cli("train", "--method", "tailorpo-g", "--help")
    assert result.returncode == 0 and "--guidance_eta" in result.stdout and "--train_window_start" not in result.stdout


@pytest.mark.parametrize(
    "method, extra, config_file",
    [
        ("direct-align", ["--reward_template", "bright. {prompt}"], "srpo_config.json"),
        ("draft", ["--draft_k", "0"], "draft_config.json"),
        ("tailorpo-g", ["--guidance_eta", "0.5", "--rollout_steps", "2"], "tailorpo_config.json"),
    ],
)
def test_train_another_method_from_the_command_line(world, tmp_path, method, extra, config_file):
    out = tmp_path / method
    result = run_cli(
        "train", "--method", method, "--model", world / "flux", "--reward", f"clip:{world / 'clip'}",
        "--torch_dtype", "float32", "--prompt_file", world / "prompts.txt", "--output_dir", out, "--resolution", "32",
        "--rollout_steps", "2", "--max_sequence_length", "16", "--max_train_steps", "2", "--learning_rate", "1e-2",
        "--lora_rank", "4", "--mixed_precision", "no", "--cpu", "--checkpointing_steps", "0", "--validation_steps", "0",
        *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"{method}: wrote the LoRA")
    settings = json.loads((out / config_file).read_text())
    assert settings["method"] == method
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())


def test_busy_output_dir_is_refused_before_loading_anything(world, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "pytorch_lora_weights.safetensors").write_bytes(b"another run")
    result = run_cli("train", "--model", "no/such-model", "--prompt_file", world / "prompts.txt", "--output_dir", busy)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"diffusers-srpo train: error: output_dir '{busy}' already holds files of another run; pass "
        "--resume_from_checkpoint latest, --overwrite_output_dir, or choose another --output_dir"
    ]
    assert (busy / "pytorch_lora_weights.safetensors").read_bytes() == b"another run"


def test_an_fsdp1_accelerate_config_is_refused_before_loading_anything(world, tmp_path):
    env = dict(ENV, ACCELERATE_USE_FSDP="true", FSDP_VERSION="1")
    result = subprocess.run(
        [shutil.which("diffusers-srpo"), "train", "--model", "no/such-model", "--prompt_file", str(world / "prompts.txt"),
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "diffusers-srpo train: error: the accelerate config asks for FSDP version 1; diffusers-srpo shards with FSDP2 "
        "(fully_shard): set fsdp_version: 2 in the accelerate config (examples/accelerate/fsdp.yaml)"
    ]
    assert not (tmp_path / "out").exists()


def test_module_entry_point_is_the_console_script():
    result = subprocess.run([sys.executable, "-m", "diffusers_srpo", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "extract-lora" in result.stdout


def test_extract_lora_recovers_a_known_low_rank_update(world, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    rank = 3
    tuned = FluxPipeline.from_pretrained(world / "flux")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (tuned.transformer.transformer_blocks[0].attn.to_q, tuned.transformer.single_transformer_blocks[0].proj_out):
            out_features, in_features = layer.weight.shape
            update = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
            layer.weight += 0.05 * update
    state = {k: v.contiguous() for k, v in tuned.transformer.state_dict().items()}
    save_file(state, tmp_path / "tuned.safetensors")

    out = tmp_path / "extracted"
    result = run_cli(
        "extract-lora", "--base", world / "flux", "--tuned", tmp_path / "tuned.safetensors", "--rank", rank,
        "--output_dir", out, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "extraction_report.json").read_text())
    assert set(report["layers"]) == {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"}
    assert max(layer["relative_error"] for layer in report["layers"].values()) < 1e-5
    assert "relative error mean" in result.stdout

    kwargs = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    expected = tuned("a red circle", generator=torch.Generator().manual_seed(1), **kwargs).images
    pipe = FluxPipeline.from_pretrained(world / "flux")
    base = pipe("a red circle", generator=torch.Generator().manual_seed(1), **kwargs).images
    pipe.load_lora_weights(str(out))
    extracted = pipe("a red circle", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.abs(expected - base).max() > 1e-2
    np.testing.assert_allclose(extracted, expected, rtol=0, atol=1e-4)


def test_train_runs_under_accelerate_launch(world, tmp_path):
    out = tmp_path / "launched"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "diffusers_srpo", "train",
        "--model", world / "flux", "--reward", f"clip:{world / 'clip'}", "--torch_dtype", "float32",
        "--prompt_file", world / "prompts.txt", "--output_dir", out, "--resolution", "32", "--rollout_steps", "2",
        "--max_sequence_length", "16", "--max_train_steps", "1", "--lora_rank", "4", "--mixed_precision", "no",
        "--checkpointing_steps", "1", "--validation_steps", "0",
    ]  # fmt: skip
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"to {out}" in result.stdout
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-1").is_dir()


# ----------------------------------------------------------------------------------------------- every family
def _other_families():
    from diffusers_srpo.testing import TINY_PIPELINES

    # One family beside FLUX.1 in the quick suite (a CLI run is a process start); the others are slow.
    return [pytest.param(f, marks=() if f == "sd3" else pytest.mark.slow) for f in TINY_PIPELINES if f != "flux"]


@pytest.mark.parametrize("family", _other_families())
def test_train_sample_and_extract_lora_take_any_supported_pipeline(world, tmp_path, family):
    """``train``, ``sample`` and ``extract-lora`` on a saved pipeline of another family (its own ``model_index.json``,
    loaded with ``DiffusionPipeline``): the trained LoRA is written for that family's stock loader and ``sample``
    with it gives the stock pipeline's images with the LoRA loaded."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from diffusers_srpo.models import get_model_adapter
    from diffusers_srpo.testing import TINY_PIPELINES

    pipe = TINY_PIPELINES[family]()
    pipe.save_pretrained(tmp_path / "model")
    size = str(max(32, 2 * get_model_adapter(pipe).size_multiple))
    out = tmp_path / "lora"
    result = run_cli(
        "train", "--model", tmp_path / "model", "--reward", f"clip:{world / 'clip'}", "--torch_dtype", "float32",
        "--prompt_file", world / "prompts.txt", "--output_dir", out, "--resolution", size, "--rollout_steps", "2",
        "--max_sequence_length", "16", "--max_train_steps", "2", "--learning_rate", "1e-2", "--lora_rank", "4",
        "--mixed_precision", "no", "--cpu", "--checkpointing_steps", "0", "--validation_steps", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from diffusers import {type(pipe).__name__}" in (out / "README.md").read_text()

    samples = tmp_path / "samples"
    common = ["--height", size, "--width", size, "--num_inference_steps", 2, "--max_sequence_length", 16, "--seed", 3]
    result = run_cli(
        "sample", "--model", tmp_path / "model", "--prompt", "a red circle", "--lora", out, "--torch_dtype",
        "float32", "--device", "cpu", "--output_dir", samples, *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stock = DiffusionPipeline.from_pretrained(tmp_path / "model")
    stock.load_lora_weights(str(out))
    kwargs = get_model_adapter(stock).pipeline_call_kwargs(None, 16)
    expected = stock(
        prompt="a red circle", height=int(size), width=int(size), num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(3), **kwargs,
    ).images  # fmt: skip
    written = np.asarray(Image.open(samples / "000-a-red-circle.png"), dtype=np.float32)
    assert np.abs(written - (expected[0] * 255).round()).max() <= 1

    # A full fine-tune as a weight file, back to a LoRA of the family's format.
    tuned = TINY_PIPELINES[family]().transformer
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if name.endswith("to_q.weight"):
                parameter += 0.05 * torch.randn(parameter.shape[0], 2) @ torch.randn(2, parameter.shape[1])
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, tmp_path / "tuned.safetensors")
    extracted = tmp_path / "extracted"
    result = run_cli(
        "extract-lora", "--base", tmp_path / "model", "--tuned", tmp_path / "tuned.safetensors", "--rank", 2,
        "--output_dir", extracted, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stock = DiffusionPipeline.from_pretrained(tmp_path / "model")
    stock.load_lora_weights(str(extracted))
    loaded = dict(stock.transformer.named_parameters())
    for name, parameter in tuned.named_parameters():
        if name.endswith("to_q.weight"):
            base = loaded[name.replace(".weight", ".base_layer.weight")]
            lora_a = loaded[name.replace(".weight", ".lora_A.default_0.weight")]
            lora_b = loaded[name.replace(".weight", ".lora_B.default_0.weight")]
            torch.testing.assert_close(base + lora_b @ lora_a, parameter.detach(), rtol=0, atol=1e-5)


def test_an_unsupported_pipeline_is_one_line_naming_the_supported_ones(tmp_path, capsys):
    model = tmp_path / "sdxl"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for argv in (
        ["train", "--model", str(model), "--prompt_file", str(prompts), "--output_dir", str(tmp_path / "out")],
        ["sample", "--model", str(model), "--prompt", "a red circle", "--output_dir", str(tmp_path / "samples")],
    ):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "is a StableDiffusionXLPipeline; supported pipelines: FluxPipeline (flux)" in lines[0]
        assert "QwenImagePipeline (qwen-image)" in lines[0] and "StableDiffusion3Pipeline (sd3)" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "samples").exists()


def test_a_negative_prompt_for_a_distilled_guidance_pipeline_is_one_line_before_loading(world, tmp_path, capsys):
    for argv in (
        ["train", "--model", str(world / "flux"), "--prompt_file", str(world / "prompts.txt"), "--output_dir",
         str(tmp_path / "out"), "--negative_prompt", "blurry"],
        ["sample", "--model", str(world / "flux"), "--prompt", "a red circle", "--negative_prompt", "blurry",
         "--output_dir", str(tmp_path / "samples")],
    ):  # fmt: skip
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "--negative_prompt is for classifier-free guidance" in lines[0]
        assert "is a FluxPipeline, which uses distilled guidance" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "samples").exists()
