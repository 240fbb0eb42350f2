"""A catalogue of bad inputs: each is one ``diffusers-srpo CMD: error: ...`` line, a non-zero exit, and a folder left
exactly as it was; through the Python API, one exception naming the value and what was expected."""

import hashlib
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from diffusers_srpo import DirectAlignScheduler, DRaFTConfig, ReFLConfig, SRPOConfig, SRPOTrainer, TailorPOConfig
from diffusers_srpo.cli import main
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline

T = ["--prompt_file", "p.txt"]  # a valid prompt file, so that the case's own fault is the first one found
TUNED = ["--tuned", "notlora.safetensors"]  # a readable safetensors file: extract-lora's next check is the case's

CASES = [
    # train: settings
    ("train", [*T, "--hinge_threshold", "nan"], "hinge_threshold must be a finite number, got nan"),
    ("train", [*T, "--learning_rate", "inf"], "learning_rate must be a finite number, got inf"),
    ("train", [*T, "--max_grad_norm", "nan"], "max_grad_norm must be a finite number"),
    ("train", [*T, "--adam_epsilon=-inf"], "adam_epsilon must be a finite number, got -inf"),
    ("train", [*T, "--rollout_guidance", "nan"], "rollout_guidance must be a finite number"),
    ("train", [*T, "--train_guidance", "inf"], "train_guidance must be a finite number"),
    ("train", [*T, "--method", "tailorpo", "--noise_level", "nan"], "noise_level must be a finite number"),
    ("train", [*T, "--method", "tailorpo-g", "--guidance_eta", "inf"], "guidance_eta must be a finite number"),
    ("train", [*T, "--method", "refl", "--refl_window_start", "nan"], "refl_window_start must be a finite number"),
    ("train", [*T, "--lora_dropout", "1.5"], "lora_dropout must be in [0, 1), got 1.5"),
    ("train", [*T, "--max_consecutive_skips", "0"], "max_consecutive_skips must be a positive integer, got 0"),
    ("train", [*T, "--checkpoints_total_limit", "0"], "checkpoints_total_limit must be >= 1"),
    ("train", [*T, "--mixed_precision", "fp8"], "mixed_precision must be one of"),
    ("train", [*T, "--lr_scheduler", "warp"], "lr_scheduler must be one of"),
    ("train", [*T, "--resolution", "0"], "resolution must be a positive integer, got 0"),
    ("train", [*T, "--positive_words", ""], "positive_words must be a non-empty list of non-empty words"),
    ("train", [*T, "--method", "direct-align", "--reward_template", "{prompt} {style}"], "reward_template must contain"),
    # train: the config file
    ("train", ["--config", "broken.yaml"], "config file 'broken.yaml' cannot be read"),
    ("train", ["--config", "broken.json"], "config file 'broken.json' cannot be read"),
    ("train", ["--config", "list.yaml"], "must hold a mapping of option names to values"),
    ("train", ["--config", "settings.toml"], "must end in .yaml, .yml or .json"),
    ("train", ["--config", "fraction.yaml"], "max_train_steps must be an integer, got 2.5"),
    # train: files it names
    ("train", [*T, "--resume_from_checkpoint", "nowhere"], "resume_from_checkpoint 'nowhere' is not a complete checkpoint"),
    ("train", [*T, "--resume_from_checkpoint", "empty_folder"], "is not a complete checkpoint folder"),
    ("train", [*T, "--resume_from_checkpoint", "corrupt"], "trainer_state.json cannot be read"),
    ("train", [*T, "--resume_from_checkpoint", "no_step"], "holds no global_step >= 0 (got None)"),
    ("train", [*T, "--resume_from_checkpoint", "refl_checkpoint"], "was written by method 'refl'"),
    ("train", [*T, "--resume_from_checkpoint", "full_checkpoint"], "holds no pytorch_lora_weights.safetensors"),
    ("train", [*T, "--output_dir", "file.txt"], "output_dir 'file.txt' is an existing file"),
    ("train", [*T, "--output_dir", "busy", "--resume_from_checkpoint", "latest"], "holds no checkpoint, only a finished run's"),
    ("train", ["--prompt_file", "missing.txt"], "prompt file 'missing.txt' does not exist"),
    ("train", ["--prompt_file", "prompts.csv"], "must end in .txt"),
    ("train", ["--prompt_file", "empty.txt"], "holds no prompt"),
    ("train", ["--prompt_file", "bad.jsonl"], "bad.jsonl:1 is not valid JSON"),
    ("train", [*T, "--reward", "imagereward:x"], "unknown reward 'imagereward'"),
    ("train", [*T, "--reward", "clip"], "reward 'clip' needs a source"),
    ("train", [*T, "--model", "empty_folder"], "--model 'empty_folder' is a folder without model_index.json"),
    ("train", [*T, "--model", "nowhere/at/all"], "--model 'nowhere/at/all' is neither a local folder nor a hub id"),
    ("train", [*T, "--model", "p.txt"], "--model 'p.txt' is a file"),
    ("train", [*T, "--x0_source", "dataset", "--image_folder", "nowhere"], "image_folder 'nowhere' does not exist"),
    ("train", [*T, "--x0_source", "dataset", "--image_folder", "empty_folder"], "holds no image"),
    # sample
    ("sample", ["--prompt", "x", "--lora", "notlora.safetensors"], "holds no LoRA weights"),
    ("sample", ["--prompt", "x", "--lora", "garbage.safetensors"], "is not a readable .safetensors file"),
    ("sample", ["--prompt", "x", "--lora", "empty_folder"], "holds 0 .safetensors files"),
    ("sample", ["--prompt", "x", "--guidance_scale", "nan"], "guidance_scale must be a finite number, got nan"),
    ("sample", ["--prompt", "x", "--num_inference_steps", "0"], "--num_inference_steps must be a positive integer"),
    ("sample", ["--prompt", "x", "--output_dir", "file.txt"], "output_dir 'file.txt' is an existing file"),
    ("sample", ["--prompt", "x", "--device", "quantum"], "--device 'quantum' is not a device name"),
    ("sample", ["--prompt", "x", "--model", "empty_folder"], "--model 'empty_folder' is a folder without"),
    ("sample", ["--prompt_file", "missing.txt"], "prompt file 'missing.txt' does not exist"),
    ("sample", ["--prompt", "x", "--torch_dtype", "int8"], "--torch_dtype must be one of"),
    # demo
    ("demo", ["--learning_rate=-1"], "learning_rate must be > 0, got -1.0"),
    ("demo", ["--learning_rate", "nan"], "learning_rate must be a finite number, got nan"),
    ("demo", ["--max_train_steps", "0"], "max_train_steps must be a positive integer, got 0"),
    ("demo", ["--train_batch_size", "0"], "train_batch_size must be a positive integer, got 0"),
    ("demo", ["--positive_word", "bright", "--negative_word", "bright"], "are both 'bright'"),
    ("demo", ["--output_dir", "file.txt"], "output_dir 'file.txt' is an existing file"),
    ("demo", ["--output_dir", "busy"], "output_dir 'busy' already holds files of another run"),
    # extract-lora
    ("extract-lora", ["--tuned", "nowhere.safetensors"], "--tuned 'nowhere.safetensors' does not exist"),
    ("extract-lora", ["--tuned", "garbage.safetensors"], "--tuned 'garbage.safetensors' is not a readable .safetensors"),
    ("extract-lora", ["--tuned", "p.txt"], "unsupported weight file"),
    ("extract-lora", ["--tuned", "empty_folder"], "no diffusers transformer weights"),
    ("extract-lora", [*TUNED, "--rank", "0"], "--rank must be a positive integer, got 0"),
    ("extract-lora", [*TUNED, "--base", "empty_folder"], "--base 'empty_folder' is a folder without model_index.json or config.json"),
    ("extract-lora", [*TUNED, "--output_dir", "file.txt"], "output_dir 'file.txt' is an existing file"),
    ("extract-lora", [*TUNED, "--output_dir", "busy"], "already holds files of another run"),
    ("extract-lora", [*TUNED, "--device", "quantum"], "--device 'quantum' is not a device name"),
]


def make_files(root):
    """Every file the cases name, as a user might have them lying around."""
    (root / "p.txt").write_text("a red circle\n")
    (root / "file.txt").write_text("not a folder")
    (root / "empty.txt").write_text("\n  \n")
    (root / "prompts.csv").write_text("a red circle\n")
    (root / "bad.jsonl").write_text("{not json\n")
    (root / "broken.yaml").write_text("learning_rate: [1e-4\n")
    (root / "broken.json").write_text('{"learning_rate": 1e-4,}')
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "settings.toml").write_text("learning_rate = 1e-4\n")
    (root / "fraction.yaml").write_text("prompt_file: p.txt\nmax_train_steps: 2.5\n")
    (root / "empty_folder").mkdir()
    (root / "busy").mkdir()
    (root / "busy" / "pytorch_lora_weights.safetensors").write_bytes(b"another run")
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    save_file({"transformer.proj_out.weight": torch.zeros(2, 2)}, root / "notlora.safetensors")
    for name, state, model_file in [
        ("corrupt", "{broken", "pytorch_lora_weights.safetensors"),
        ("no_step", json.dumps({"method": "srpo"}), "pytorch_lora_weights.safetensors"),
        ("refl_checkpoint", json.dumps({"global_step": 1, "method": "refl"}), "pytorch_lora_weights.safetensors"),
        ("full_checkpoint", json.dumps({"global_step": 1, "method": "srpo"}), "transformer"),
    ]:
        (root / name).mkdir()
        (root / name / "trainer_state.json").write_text(state)
        if model_file == "transformer":
            (root / name / model_file).mkdir()
        else:
            (root / name / model_file).write_bytes(b"x")


def snapshot(root) -> dict:
    """Every path under ``root`` with its size, modification time and content digest."""
    found = {}
    for folder, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else None
            found[os.path.relpath(path, root)] = (stat.st_size if digest else None, stat.st_mtime_ns, digest)
    return found


def run_main(argv, capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    return status, capsys.readouterr().err.strip()


def assert_one_line(command, status, err, message):
    assert status not in (0, None)
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"diffusers-srpo {command}: error: "), err
    assert message in err, err


@pytest.mark.parametrize("command, argv, message", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_a_bad_command_line_is_one_line_and_writes_nothing(command, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_files(tmp_path)
    before = snapshot(tmp_path)
    status, err = run_main([command, *argv], capsys)
    assert_one_line(command, status, err, message)
    assert snapshot(tmp_path) == before


def test_the_catalogue_covers_every_command():
    assert len(CASES) >= 40
    assert {command for command, _, _ in CASES} == {"train", "sample", "demo", "extract-lora"}


# ------------------------------------------------------------------------------------------- faults found once loaded
@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """LoRA files that do not fit the tiny world's transformer: one too wide, one for modules it lacks."""
    root = tmp_path_factory.mktemp("loras")
    in_features = 32  # the tiny transformer's width
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, in_features + 3),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(in_features, 4),
        },
        root / "wrong_shape.safetensors",
    )
    save_file(
        {"transformer.no_such_block.lora_A.weight": torch.zeros(4, 8), "transformer.no_such_block.lora_B.weight": torch.zeros(8, 4)},
        root / "no_match.safetensors",
    )
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--resolution", "33"], "resolution must be a multiple of 4 for this model, got 33"),
        (["sample", "--prompt", "x", "--lora", "LORAS/wrong_shape.safetensors"], "widened the weight from (32, 32) to (32, 35)"),
        (["sample", "--prompt", "x", "--lora", "LORAS/no_match.safetensors"], "Target modules {'no_such_block'} not found"),
    ],
)
def test_faults_found_once_the_model_is_loaded_are_one_line_too(world, loras, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("LORAS", str(loras)) for a in argv]
    common = ["--model", str(world / "flux"), "--torch_dtype", "float32", "--output_dir", "out"]
    if argv[0] == "train":
        common += ["--reward", f"clip:{world / 'clip'}", "--prompt_file", str(world / "prompts.txt"), "--cpu"]
    else:
        common += ["--height", "32", "--width", "32", "--num_inference_steps", "1", "--max_sequence_length", "16", "--device", "cpu"]
    status, err = run_main([*argv, *common], capsys)
    # Loading draws its progress bars on stderr; the report is the one line after them.
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    assert_one_line(argv[0], status, errors[0], message)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- the Python API
API_CASES = [
    (lambda: SRPOConfig(learning_rate="1e-4"), TypeError, "learning_rate must be a number or None, got '1e-4' (str)"),
    (lambda: SRPOConfig(max_train_steps=2.5), TypeError, "max_train_steps must be an integer, got 2.5"),
    (lambda: SRPOConfig(use_lora="yes"), TypeError, "use_lora must be true or false, got 'yes'"),
    (lambda: SRPOConfig(validation_prompts="a red circle"), TypeError, "validation_prompts must be a list of strings"),
    (lambda: SRPOConfig(hinge_threshold=math.nan), ValueError, "hinge_threshold must be a finite number, got nan"),
    (lambda: ReFLConfig(refl_window_end=math.inf), ValueError, "refl_window_end must be a finite number, got inf"),
    (lambda: DRaFTConfig(draft_k=True), TypeError, "draft_k must be an integer, got True"),
    (lambda: TailorPOConfig(beta=-math.inf), ValueError, "beta must be a finite number, got -inf"),
    (lambda: SRPOConfig(max_consecutive_skips=-1), ValueError, "max_consecutive_skips must be a positive integer"),
    (lambda: DirectAlignScheduler(invert_discount_end=math.nan), ValueError, "invert_discount_end=nan is invalid"),
    (lambda: SRPOConfig(gradient_accumulation_steps=0), ValueError, "gradient_accumulation_steps must be a positive integer, got 0"),
    (lambda: SRPOConfig(denoise_discount_end=-0.1), ValueError, "denoise_discount_end must be >= 0 (SRP scores"),
    (lambda: SRPOConfig(fsdp=True, mixed_precision="fp16"), ValueError, "fsdp=True with mixed_precision='fp16' is not supported"),
]


@pytest.mark.parametrize("build, error, message", API_CASES)
def test_a_bad_setting_through_the_python_api_is_one_clear_exception(build, error, message):
    with pytest.raises(error) as caught:
        build()
    assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"resume_from_checkpoint": "nowhere"}, FileNotFoundError, "is not a complete checkpoint folder"),
        ({"output_dir": "file.txt"}, NotADirectoryError, "is an existing file"),
        ({"x0_source": "dataset", "image_folder": "nowhere"}, FileNotFoundError, "image_folder 'nowhere' does not exist"),
    ],
)
def test_the_trainer_refuses_bad_files_before_touching_the_pipeline(overrides, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    pipe = tiny_flux_pipeline(seed=0)
    config = SRPOConfig(**{"output_dir": "out", "resolution": 32, "cpu": True, **overrides})
    with pytest.raises(error, match=message):
        SRPOTrainer(pipe, reward=tiny_clip_reward(seed=0), prompts=["a red circle"], config=config)
    assert not any("lora_" in name for name, _ in pipe.transformer.named_parameters())
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]
