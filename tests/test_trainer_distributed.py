"""Every method in two real processes (gloo, CPU): the same LoRA on both ranks, different prompts, no deadlock."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from peft.utils import get_peft_model_state_dict
    from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline
    from diffusers_srpo.trainers import trainer_class_for

    out, method, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    trainer_class = trainer_class_for(method)
    config = trainer_class.config_class(
        method=method, output_dir=out, seed=0, max_train_steps=2, resolution=32, rollout_steps=4, max_sequence_length=16,
        mixed_precision="no", learning_rate=1e-3, lora_rank=4, lora_alpha=4.0, checkpointing_steps=2,
        validation_steps=0, cpu=True, **overrides,
    )
    trainer = trainer_class(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0),
                            prompts=["a red circle", "a blue square", "a green triangle", "a yellow circle"], config=config)
    trainer.train()
    rank = trainer.accelerator.process_index
    state = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
    torch.save(state, os.path.join(out, f"lora-rank{rank}.pt"))
    prompts = [trainer.prompts[i] for step in range(2) for i in trainer.indices_for_step(step)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"num_processes": trainer.accelerator.num_processes, "prompts": prompts}, f)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, overrides, port",
    [
        ("direct-align", {}, 29521),
        ("refl", {}, 29522),
        ("draft", {"draft_k": 0, "gradient_checkpointing": True}, 29523),
        ("tailorpo-g", {}, 29524),
        ("trajectory-dpo", {}, 29525),
    ],
)
def test_two_processes_train_identical_weights(tmp_path, method, overrides, port):
    script = tmp_path / "train_two.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), str(out), method, json.dumps(overrides)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 for r in ranks) and ranks[0]["prompts"] != ranks[1]["prompts"]
    weights = [torch.load(out / f"lora-rank{r}.pt") for r in (0, 1)]
    assert any(v.abs().max() > 0 for k, v in weights[0].items() if "lora_B" in k), "nothing trained"
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert (out / "checkpoint-2").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()


ENDINGS_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from peft.utils import get_peft_model_state_dict
    from diffusers_srpo import TrainingInterrupted
    from diffusers_srpo.rewards import CallableReward
    from diffusers_srpo.testing import tiny_flux_pipeline, tiny_trainer_config
    from diffusers_srpo.trainers import trainer_class_for

    out, scenario = sys.argv[1], sys.argv[2]
    holder = {}

    def reward(images, prompts):  # NaN on rank 1 only, during update 2 of the "nan" scenario
        scores = images.mean(dim=(1, 2, 3))
        trainer = holder.get("trainer")
        if scenario == "nan" and trainer is not None and trainer.accelerator.process_index == 1 and trainer.global_step == 1:
            scores = scores * float("nan")
        return scores

    config = tiny_trainer_config("direct-align", out, max_train_steps=4, cpu=True)
    trainer = trainer_class_for("direct-align")(tiny_flux_pipeline(seed=0), reward=CallableReward(reward),
                                                prompts=["a red circle", "a blue square"], config=config)
    holder["trainer"] = trainer
    rank = trainer.accelerator.process_index

    def signal_rank_1(trainer, logs):
        if scenario == "signal" and rank == 1 and trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    result = {}
    try:
        trainer.train(on_update=signal_rank_1)
    except TrainingInterrupted as stop:
        result = {"step": stop.step, "checkpoint": stop.checkpoint, "signal": stop.signal_number}
    result["skipped"] = [h["skipped_updates"] for h in trainer.history]
    torch.save(get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model)), os.path.join(out, f"lora-rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("scenario, port", [("nan", 29531), ("signal", 29532)])
def test_two_processes_skip_and_stop_after_the_same_update(tmp_path, scenario, port):
    """A NaN on one process skips the update on both; a signal to one process stops both after the same update."""
    script = tmp_path / "endings.py"
    script.write_text(ENDINGS_SCRIPT)
    out = tmp_path / scenario
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), str(out), scenario]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(out / f"lora-rank{r}.pt") for r in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    if scenario == "nan":
        assert ranks[0]["skipped"] == ranks[1]["skipped"] == [0, 1, 1, 1]
        assert (out / "pytorch_lora_weights.safetensors").is_file()
    else:
        # Rank 1's signal came after update 1's collective: update 2's carried it to rank 0 too.
        assert [r["step"] for r in ranks] == [2, 2] and [r["signal"] for r in ranks] == [None, 15]
        assert ranks[0]["checkpoint"] == ranks[1]["checkpoint"] == str(out / "checkpoint-2")
        assert (out / "checkpoint-2" / "trainer_state.json").is_file()
        assert not (out / "pytorch_lora_weights.safetensors").exists()
