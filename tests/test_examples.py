"""The example scripts run end to end on tiny models saved the way real checkpoints are laid out."""

import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusers_srpo.testing import save_open_clip_local_dir, tiny_flux_pipeline, tiny_open_clip_model

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_train_srpo_flux_writes_a_lora_that_stock_flux_loads(tmp_path):
    model_dir, clip_dir, out = tmp_path / "flux", tmp_path / "clip", tmp_path / "out"
    tiny_flux_pipeline(seed=0).save_pretrained(model_dir)
    save_open_clip_local_dir(tiny_open_clip_model(seed=0), str(clip_dir))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = [
        "--model", str(model_dir), "--reward", f"clip:{clip_dir}", "--torch_dtype", "float32",
        "--prompt_file", str(prompts), "--output_dir", str(out), "--resolution", "32", "--rollout_steps", "2",
        "--max_sequence_length", "16", "--max_train_steps", "2", "--learning_rate", "1e-2", "--lora_rank", "4",
        "--mixed_precision", "no", "--cpu", "--checkpointing_steps", "0", "--validation_steps", "0",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "train_srpo_flux.py"), *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"to {out}" in result.stdout

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())
    pipe = FluxPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(out))
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    assert np.isfinite(image).all()
    assert "max_train_steps" in (out / "srpo_config.json").read_text()

    side_by_side = tmp_path / "side_by_side.png"
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "inference_with_lora.py"), "--model", str(model_dir), "--lora", str(out),
         "--prompt", "a red circle", "--height", "32", "--width", "32", "--num_inference_steps", "2",
         "--max_sequence_length", "16", "--output", str(side_by_side)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pair = np.asarray(Image.open(side_by_side), dtype=np.float32)
    assert pair.shape == (32, 64, 3)
    assert np.abs(pair[:, :32] - pair[:, 32:]).max() > 1, "the LoRA changed nothing"


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(EXAMPLES, "configs"))))
def test_example_training_configs_are_valid(name):
    from diffusers_srpo.cli import _config_file_values, _train_method, build_parser
    from diffusers_srpo.trainers import trainer_class_for

    path = os.path.join(EXAMPLES, "configs", name)
    method, _ = _train_method(["--config", path])
    assert method == name.split("_")[0].replace("tailorpo", "tailorpo-g")  # the file's method picks the options
    config_class = trainer_class_for(method).config_class
    parser, subparsers = build_parser(method)
    values = _config_file_values(path, subparsers["train"])
    subparsers["train"].set_defaults(**values)
    args = parser.parse_args(["train"])
    config = config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})
    assert config.resolution == 720 and config.mixed_precision == "bf16"
    assert isinstance(config.learning_rate, float) and args.reward.split(":")[0] in ("hpsv2", "pickscore")


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(EXAMPLES, "accelerate"))))
def test_example_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(os.path.join(EXAMPLES, "accelerate", name))
    assert config.mixed_precision == "bf16"


def test_train_srpo_flux_help_lists_every_config_field():
    from diffusers_srpo import SRPOConfig

    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "train_srpo_flux.py"), "--help"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    for config_field in fields(SRPOConfig):
        assert f"--{config_field.name}" in result.stdout, config_field.name
    assert "--reward" in result.stdout and "hpsv2" in result.stdout
