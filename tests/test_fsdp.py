"""FSDP2 (``fsdp=True``): the transformer sharded per block over two real gloo processes on the CPU.

Each rank holds half of every sharded parameter; the losses and the trained weights equal the 2-process unsharded
(DDP) run; a kill after a checkpoint and a resume give the final weights bit for bit; the outputs are whole files
that stock diffusers loads in a fresh process; srpo, draft and tailorpo run sharded. What cannot run sharded, or
an accelerate FSDP config this trainer cannot honour, is refused in one line before any model moves.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_srpo import SRPOTrainer
from diffusers_srpo.testing import TINY_PIPELINES, tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers.checkpoints import read_trainer_state
from diffusers_srpo.trainers.sharding import block_classes, fsdp_requested_by_accelerate

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]

# Trains on every rank; rank r writes its local/global numel of every sharded parameter, its logs and the trained
# weights of the user's transformer (handed back whole). argv[4] > 0 kills both processes (SIGKILL) after that update.
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from torch.distributed.tensor import DTensor
    from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline
    from diffusers_srpo.trainers import trainer_class_for

    out, method, overrides, kill_after = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    settings = dict(
        method=method, output_dir=out, seed=0, max_train_steps=2, resolution=32, rollout_steps=4, max_sequence_length=16,
        mixed_precision="no", learning_rate=1e-3, lora_rank=4, lora_alpha=4.0, checkpointing_steps=2,
        validation_steps=0, cpu=True,
    )
    settings.update(overrides)
    trainer_class = trainer_class_for(method)
    trainer = trainer_class(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0),
                            prompts=["a red circle", "a blue square", "a green triangle", "a yellow circle"],
                            config=trainer_class.config_class(**settings))
    rank = trainer.accelerator.process_index
    numel = {n: [p.to_local().numel(), p.numel(), p.shape[0]] for n, p in trainer.model.named_parameters() if isinstance(p, DTensor)}

    def kill(trainer, logs):
        if trainer.global_step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    history = trainer.train(on_update=kill)
    trained = {n: p.detach().clone() for n, p in trainer.pipe.transformer.named_parameters() if p.requires_grad or "lora" in n}
    torch.save(trained, os.path.join(out, f"trained-rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"numel": numel, "history": history, "sharded": trainer.config.fsdp}, f)
    """
)


def launch(tmp_path, out, method, overrides, port, kill_after=0, launcher="torchrun"):
    script = tmp_path / "train_sharded.py"
    script.write_text(SCRIPT)
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    else:  # accelerate launch with the example FSDP config, which turns fsdp on
        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "accelerate", "fsdp.yaml")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                   "--main_process_port", str(port), "--mixed_precision", "no"]  # fmt: skip
    command += [str(script), str(out), method, json.dumps(overrides), str(kill_after)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))


def results(out):
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(out / f"trained-rank{r}.pt") for r in (0, 1)]
    return ranks, weights


def assert_same_run(sharded, unsharded, atol):
    """The sharded and the unsharded run: the same logs per update and the same trained weights, within ``atol``."""
    (ranks, weights), (plain_ranks, plain_weights) = sharded, unsharded
    for update, plain in zip(ranks[0]["history"], plain_ranks[0]["history"], strict=True):
        for key in ("loss", "reward", "grad_norm"):
            assert update[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    assert weights[0].keys() == plain_weights[0].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(value, plain_weights[0][name], rtol=0, atol=atol, msg=name)
    moved = [n for n, v in weights[0].items() if "lora_B" in n and v.abs().max() > 0]
    assert moved or not any("lora" in n for n in weights[0]), "nothing trained"


def assert_half_of_every_parameter(rank_result, trainable_only=False):
    """Rank 0 holds the first half (rounded up) of the rows of every parameter, as torch.chunk splits them."""
    numel = rank_result["numel"]
    assert len(numel) > 10
    for name, (local, total, rows) in numel.items():
        assert local == -(-rows // 2) * (total // rows), (name, local, total, rows)
    local_sum, total_sum = sum(v[0] for v in numel.values()), sum(v[1] for v in numel.values())
    assert local_sum / total_sum == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_lora_sharded_equals_unsharded_and_loads_with_stock_diffusers(tmp_path):
    sharded_out, plain_out = tmp_path / "fsdp", tmp_path / "ddp"
    settings = {"gradient_accumulation_steps": 2, "validation_prompts": ["a red circle"], "validation_steps": 2}
    result = launch(tmp_path, sharded_out, "srpo", {**settings, "fsdp": True}, 29641)
    assert result.returncode == 0, result.stderr[-4000:]
    result = launch(tmp_path, plain_out, "srpo", settings, 29642)
    assert result.returncode == 0, result.stderr[-4000:]
    sharded, plain = results(sharded_out), results(plain_out)
    # The validation grid samples through the sharded model: the same image as unsharded.
    grids = [np.asarray(Image.open(out / "validation" / "step-000002.png"), dtype=np.int16) for out in (sharded_out, plain_out)]
    assert np.abs(grids[0] - grids[1]).max() <= 1
    assert sharded[0][0]["sharded"] and not plain[0][0]["sharded"]
    assert_half_of_every_parameter(sharded[0][0])
    assert_same_run(sharded, plain, atol=1e-6)

    # A fresh process: the stock pipeline's load_lora_weights gives exactly the trained LoRA.
    script = textwrap.dedent(
        f"""
        import torch
        from diffusers_srpo.testing import tiny_flux_pipeline
        pipe = tiny_flux_pipeline(seed=0)
        pipe.load_lora_weights({str(sharded_out)!r})
        trained = torch.load({str(sharded_out / "trained-rank0.pt")!r})
        # The trainer's adapter is "default", the stock loader names its own "default_0".
        loaded = {{n.replace(".default_0.", ".default."): p for n, p in pipe.transformer.named_parameters()}}
        for name, value in trained.items():
            assert torch.equal(loaded[name], value), name
        image = pipe("a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert torch.isfinite(image).all()
        print("loaded", len(trained))
        """
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-3000:]


@pytest.mark.slow
def test_full_fine_tune_sharded_resumes_bit_for_bit_and_loads_with_stock_diffusers(tmp_path):
    settings = {"fsdp": True, "use_lora": False, "learning_rate": 1e-4, "max_train_steps": 4}
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "ddp"
    assert launch(tmp_path, straight, "srpo", settings, 29643).returncode == 0
    killed = launch(tmp_path, resumed, "srpo", settings, 29644, kill_after=3)
    assert killed.returncode != 0 and (resumed / "checkpoint-2").is_dir() and not (resumed / "transformer").exists()
    assert (resumed / "checkpoint-2" / "optimizer" / ".metadata").is_file()  # the sharded optimizer state (DCP)
    result = launch(tmp_path, resumed, "srpo", {**settings, "resume_from_checkpoint": "latest"}, 29645)
    assert result.returncode == 0, result.stderr[-4000:]
    (_, straight_weights), (_, resumed_weights) = results(straight), results(resumed)
    for name, value in straight_weights[0].items():
        assert torch.equal(value, resumed_weights[0][name]), name

    result = launch(tmp_path, plain, "srpo", {k: v for k, v in settings.items() if k != "fsdp"}, 29646)
    assert result.returncode == 0, result.stderr[-4000:]
    sharded = results(straight)
    assert_half_of_every_parameter(sharded[0][0])
    assert_same_run(sharded, results(plain), atol=1e-6)

    script = textwrap.dedent(
        f"""
        import torch
        from diffusers import FluxTransformer2DModel
        transformer = FluxTransformer2DModel.from_pretrained({str(straight / "transformer")!r})
        trained = torch.load({str(straight / "trained-rank0.pt")!r})
        loaded = dict(transformer.named_parameters())
        assert loaded.keys() == trained.keys()
        for name, value in trained.items():
            assert torch.equal(loaded[name], value), name
        print("loaded", len(trained))
        """
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, overrides, port",
    [
        ("draft", {"draft_k": 0}, 29647),
        ("tailorpo-g", {}, 29649),
        ("tailorpo", {"use_lora": False, "learning_rate": 1e-4}, 29651),
    ],
)
def test_every_method_family_runs_sharded_as_unsharded(tmp_path, method, overrides, port):
    sharded_out, plain_out = tmp_path / "fsdp", tmp_path / "ddp"
    result = launch(tmp_path, sharded_out, method, {**overrides, "fsdp": True}, port)
    assert result.returncode == 0, result.stderr[-4000:]
    assert launch(tmp_path, plain_out, method, overrides, port + 1).returncode == 0
    assert_same_run(results(sharded_out), results(plain_out), atol=1e-6)


@pytest.mark.slow
def test_the_accelerate_fsdp_config_turns_sharding_on(tmp_path):
    out = tmp_path / "accelerate"
    result = launch(tmp_path, out, "srpo", {}, 29653, launcher="accelerate")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks, _ = results(out)
    assert ranks[0]["sharded"] and ranks[1]["sharded"]
    assert_half_of_every_parameter(ranks[0])


# ----------------------------------------------------------------------------------- refusals, in one line
@pytest.mark.parametrize(
    "environment, message",
    [
        ({"FSDP_VERSION": "1"}, "FSDP version 1; diffusers-srpo shards with FSDP2"),
        ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true"),
        ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "fsdp_reshard_after_forward: false"),
    ],
)
def test_an_accelerate_fsdp_config_this_trainer_cannot_honour_is_refused(monkeypatch, environment, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        fsdp_requested_by_accelerate()


def test_an_accelerate_fsdp2_config_maps_onto_fsdp(monkeypatch):
    assert not fsdp_requested_by_accelerate()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_requested_by_accelerate()


def test_fsdp_in_one_process_is_refused_before_the_pipeline_changes(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    config = tiny_trainer_config("srpo", tmp_path / "out", fsdp=True)
    with pytest.raises(ValueError, match="fsdp=True shards the transformer over several processes, but this run has one"):
        SRPOTrainer(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)
    assert not getattr(pipe.transformer, "peft_config", None)
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("written, wanted", [(False, True), (True, False)])
def test_a_checkpoint_is_resumed_with_the_fsdp_setting_it_was_written_with(tmp_path, written, wanted):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "method": "srpo", "fsdp": written}))
    with pytest.raises(ValueError, match=f"resume it with fsdp={written}"):
        read_trainer_state(str(checkpoint), method="srpo", use_lora=True, fsdp=wanted)
    assert read_trainer_state(str(checkpoint), method="srpo", use_lora=True, fsdp=written)["global_step"] == 2


@pytest.mark.parametrize("family", sorted(TINY_PIPELINES))
def test_every_family_names_the_blocks_fsdp_shards(family):
    transformer = TINY_PIPELINES[family](seed=0).transformer
    classes = block_classes(transformer)
    blocks = [m for m in transformer.modules() if isinstance(m, classes)]
    in_blocks = sum(p.numel() for m in blocks for p in m.parameters())
    # The blocks hold most of the weights: what the root keeps whole-per-group (embeddings, norms) is small.
    assert blocks and in_blocks > 0.5 * sum(p.numel() for p in transformer.parameters())
