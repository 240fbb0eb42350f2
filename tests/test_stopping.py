"""How a run ends: clean stops on SIGTERM / SIGINT, outputs a kill cannot truncate, the user's pipeline handed back."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from diffusers_srpo import SRPOConfig, SRPOTrainer, TrainingInterrupted
from diffusers_srpo.atomic import STAGING_NAME, move_into_place, staged_outputs
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline
from diffusers_srpo.testing import tiny_trainer_config as tiny_config

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
PROMPTS = ["a red circle", "a blue square"]  # those of the shared world's prompts.txt
LORA = "pytorch_lora_weights.safetensors"


def train_command(world, out, steps, *extra):
    executable = shutil.which("diffusers-srpo")
    assert executable, "the console script is not installed"
    return [
        executable, "train", "--model", world / "flux", "--reward", f"clip:{world / 'clip'}", "--torch_dtype",
        "float32", "--prompt_file", world / "prompts.txt", "--output_dir", out, "--resolution", "32",
        "--rollout_steps", "2", "--max_sequence_length", "16", "--max_train_steps", str(steps), "--learning_rate",
        "1e-2", "--lora_rank", "4", "--mixed_precision", "no", "--cpu", "--checkpointing_steps", "2",
        "--validation_steps", "0", *extra,
    ]  # fmt: skip


def wait_for(path, process, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------- clean stops
def test_sigterm_mid_run_checkpoints_and_the_resumed_lora_is_bit_identical(world, tmp_path):
    steps = 24
    straight, out = tmp_path / "straight", tmp_path / "stopped"
    # The uninterrupted run goes on beside the one that is stopped.
    reference_log = open(tmp_path / "reference.log", "w")  # a file, not a pipe: nothing reads it until the end
    reference = subprocess.Popen(
        list(map(str, train_command(world, straight, steps))), stdout=reference_log, stderr=subprocess.STDOUT, env=ENV
    )
    command = list(map(str, train_command(world, out, steps)))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(out / "checkpoint-2", process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    assert reference.wait(timeout=240) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    reference_log.close()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    (stopped_at,) = [int(name.split("-")[1]) for name in os.listdir(out) if name.startswith("checkpoint-") and name != "checkpoint-2"] or [2]
    assert 2 <= stopped_at < steps
    assert errors == [
        f"diffusers-srpo train: error: stopped by SIGTERM after update {stopped_at} of {steps}; the checkpoint is "
        f"{out / f'checkpoint-{stopped_at}'}: to continue, run the same command with --resume_from_checkpoint latest"
    ]
    assert stderr.rstrip().endswith(errors[0])
    assert not (out / LORA).exists(), "a stopped run must not look finished"

    resumed = subprocess.run(command + ["--resume_from_checkpoint", "latest"], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = load_file(straight / LORA), load_file(out / LORA)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """A shell without job control starts a background job (``cmd &``) with SIGINT ignored, which the trainer rightly
    leaves ignored; these tests press Ctrl-C, so they start from Python's own handler whatever launched the suite."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def make_trainer(tmp_path, name="run", pipe=None, **overrides):
    pipe = pipe if pipe is not None else tiny_flux_pipeline(seed=0)
    config = tiny_config("srpo", tmp_path / name, **overrides)
    return SRPOTrainer(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)


def test_sigint_finishes_the_update_writes_a_checkpoint_and_puts_the_handlers_back(tmp_path):
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    trainer = make_trainer(tmp_path, max_train_steps=6, checkpointing_steps=0)

    def press_ctrl_c(trainer, logs):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after update 2 of 6") as caught:
        trainer.train(on_update=press_ctrl_c)
    assert caught.value.checkpoint == str(tmp_path / "run" / "checkpoint-2") and caught.value.signal_number == signal.SIGINT
    assert [os.path.basename(p) for p in trainer.checkpoint_dirs()] == ["checkpoint-2"] and len(trainer.history) == 2
    assert {number: signal.getsignal(number) for number in handlers} == handlers


def test_repeated_sigterms_are_one_stop_and_an_ignored_signal_stays_ignored(tmp_path):
    trainer = make_trainer(tmp_path, max_train_steps=6)

    def scheduler_sends_three(trainer, logs):
        if trainer.global_step == 1:
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after update 1 of 6"):
        trainer.train(on_update=scheduler_sends_three)

    from diffusers_srpo.trainers.stopping import stop_on_signals

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with stop_on_signals() as request:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
        assert not request.requested and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    trainer = make_trainer(tmp_path, max_train_steps=6)

    def press_twice(trainer, logs):
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        trainer.train(on_update=press_twice)
    assert trainer.global_step == 1 and not trainer.checkpoint_dirs()
    assert "forward" not in trainer.pipe.transformer.__dict__  # handed back on this way out too


# ------------------------------------------------------------------------------------------- atomic outputs
def test_a_kill_while_the_final_lora_is_written_leaves_the_old_one(tmp_path):
    make_trainer(tmp_path, max_train_steps=1).train()
    out = tmp_path / "run"
    old = {name: (out / name).read_bytes() for name in (LORA, "README.md", "srpo_config.json")}
    script = textwrap.dedent(
        f"""
        import time, safetensors.torch
        from diffusers_srpo import SRPOTrainer
        from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
        real_save = safetensors.torch.save_file

        def save_half_then_hang(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(64)  # what a kill half-way through the write leaves
            print("writing", flush=True)
            time.sleep(600)

        safetensors.torch.save_file = save_half_then_hang
        config = tiny_trainer_config("srpo", {str(out)!r}, max_train_steps=2, overwrite_output_dir=True)
        SRPOTrainer(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0), prompts={PROMPTS!r}, config=config).train()
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    assert process.stdout.readline().strip() == "writing"
    process.kill()
    process.wait(timeout=60)
    for name, content in old.items():
        assert (out / name).read_bytes() == content, name
    assert (out / STAGING_NAME / LORA).stat().st_size == 64  # the half-written file never got the final name

    # The next write clears the leftover staging folder.
    with staged_outputs(str(out)) as staging:
        (tmp_path / "marker").write_text("x")
        os.replace(tmp_path / "marker", os.path.join(staging, "marker"))
    assert not (out / STAGING_NAME).exists() and (out / "marker").read_text() == "x"


def test_staged_outputs_keep_the_folder_as_it_was_when_the_block_fails(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "old.safetensors").write_text("old")
    (tmp_path / "README.md").write_text("old card")
    with pytest.raises(RuntimeError, match="disk full"), staged_outputs(str(tmp_path)) as staging:
        (open(os.path.join(staging, "README.md"), "w")).close()
        raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["README.md", "transformer"]
    assert (tmp_path / "README.md").read_text() == "old card"

    new = tmp_path / "new"
    new.mkdir()
    (new / "new.safetensors").write_text("new")
    move_into_place(str(new), str(tmp_path / "transformer"))  # a folder replaces a folder
    assert os.listdir(tmp_path / "transformer") == ["new.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["README.md", "transformer"]


# ------------------------------------------------------------------------------------------- the pipeline handed back
def default_config(tmp_path, name="run", **overrides):
    """The DEFAULT settings (bf16 mixed precision, activation checkpointing on, ...), at the tiny world's sizes."""
    values = dict(
        output_dir=str(tmp_path / name), resolution=32, rollout_steps=2, max_sequence_length=16, max_train_steps=2,
        lora_rank=4, learning_rate=1e-2, checkpointing_steps=0, validation_steps=0, cpu=True,
    )  # fmt: skip
    values.update(overrides)
    config = SRPOConfig(**values)
    assert config.mixed_precision == "bf16" and config.gradient_checkpointing and config.vae_gradient_checkpointing
    return config


def sample(pipe, seed=7):
    return pipe(
        PROMPTS, height=32, width=32, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images  # fmt: skip


def flags(pipe):
    modules = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    return [
        (
            [m.training for m in module.modules()],
            {id(p): p.requires_grad for p in module.parameters()},
            getattr(module, "is_gradient_checkpointing", None),
            sorted(set(module.__dict__) - {"_modules", "_parameters"}),
            {p.device for p in module.parameters()},
        )
        for module in modules
    ]


def test_with_default_settings_the_pipeline_is_handed_back_as_a_fresh_stock_load(tmp_path, fresh_accelerate_state):
    pipes = {"float32": tiny_flux_pipeline(seed=0), "bfloat16": tiny_flux_pipeline(seed=0).to(torch.bfloat16)}
    during = {}
    for name, pipe in pipes.items():
        base = sample(pipe)  # (sampling adds diffusers' hook registry: the flags are read after it)
        found = flags(pipe)
        trainer = SRPOTrainer(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=default_config(tmp_path, name))
        trainer.train(on_update=lambda trainer, logs, name=name: during.setdefault(name, dict(trainer.pipe.transformer.__dict__)))
        # During training accelerate's autocast wrapper sat on the user's transformer: this is what is undone.
        assert "forward" in during[name] and "_is_accelerate_prepared" in during[name]
        transformer = pipe.transformer
        assert "forward" not in transformer.__dict__ and transformer.forward.__func__ is FluxTransformer2DModel.forward
        lora_parameters = [p for n, p in transformer.named_parameters() if "lora_" in n]
        assert lora_parameters and {p.dtype for p in lora_parameters} == {getattr(torch, name)}
        handed_back = flags(pipe)
        assert handed_back[1:] == found[1:]  # VAE and text encoders exactly as found
        modes, requires_grad, checkpointing, attributes, devices = handed_back[0]
        assert (checkpointing, devices) == (found[0][2], found[0][4]) and not any(modes)
        assert set(attributes) - set(found[0][3]) == {"peft_config", "_hf_peft_config_loaded"}  # the LoRA's own
        assert {k: requires_grad[k] for k in found[0][1]} == found[0][1]  # the base weights' flags as found
        assert all(p.requires_grad for p in lora_parameters)  # the LoRA's as load_lora_weights gives them
        np.save(tmp_path / f"in-process-{name}.npy", sample(pipe))
        assert np.abs(np.load(tmp_path / f"in-process-{name}.npy") - base).max() > 1e-3, "training changed nothing"

    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from diffusers_srpo.testing import tiny_flux_pipeline
        for name in ("float32", "bfloat16"):
            pipe = tiny_flux_pipeline(seed=0).to(getattr(torch, name))
            pipe.load_lora_weights({str(tmp_path)!r} + "/" + name)
            images = pipe({PROMPTS!r}, height=32, width=32, num_inference_steps=3, guidance_scale=3.5,
                          max_sequence_length=16, generator=torch.Generator().manual_seed(7), output_type="np").images
            np.save({str(tmp_path)!r} + f"/fresh-{{name}}.npy", images)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env=ENV)
    for name in pipes:
        fresh, in_process = np.load(tmp_path / f"fresh-{name}.npy"), np.load(tmp_path / f"in-process-{name}.npy")
        np.testing.assert_allclose(in_process, fresh, rtol=0, atol=1e-5, err_msg=name)


def test_a_full_fine_tune_of_a_bf16_pipeline_is_handed_back_in_bf16(tmp_path, fresh_accelerate_state):
    pipe = tiny_flux_pipeline(seed=0).to(torch.bfloat16)
    trainer = SRPOTrainer(
        pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=default_config(tmp_path, use_lora=False, learning_rate=1e-3)
    )
    trainer.train()
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    saved = FluxTransformer2DModel.from_pretrained(tmp_path / "run" / "transformer", torch_dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_pipeline_is_handed_back_after_an_error_and_a_trainer_trains_once(tmp_path, fresh_accelerate_state):
    pipe = tiny_flux_pipeline(seed=0)
    found = flags(pipe)

    class Failing(SRPOTrainer):
        def training_step(self, step, micro_step=0):
            if step == 1:
                raise RuntimeError("out of memory")
            return super().training_step(step, micro_step)

    trainer = Failing(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=default_config(tmp_path, max_train_steps=3))
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    handed_back = flags(pipe)
    assert handed_back[1:] == found[1:] and "forward" not in pipe.transformer.__dict__
    assert handed_back[0][2] == found[0][2] and not any(handed_back[0][0])
    with pytest.raises(RuntimeError, match="train\\(\\) runs once per trainer"):
        trainer.train()


def test_a_setup_that_fails_removes_the_lora_it_added(tmp_path, fresh_accelerate_state):
    pipe = tiny_flux_pipeline(seed=0)
    found = flags(pipe)

    class BrokenSetup(SRPOTrainer):
        def setup_method(self):
            raise ValueError("no such thing")

    with pytest.raises(ValueError, match="no such thing"):
        BrokenSetup(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=default_config(tmp_path))
    assert flags(pipe) == found and not any("lora_" in n for n, _ in pipe.transformer.named_parameters())
    SRPOTrainer(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=default_config(tmp_path)).train()
