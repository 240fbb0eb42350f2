"""Gradient accumulation: an update of ``processes x train_batch_size x gradient_accumulation_steps`` samples is one
optimizer step, and how its samples are split changes nothing but float rounding: batch B with accumulation A
trains the LoRA of batch A*B without accumulation, and 2 processes x A = 2 that of 1 process x A = 4.

Each sample's prompt, noise and training timestep are keyed by its position in the update. SRPO / Direct-Align and
DRaFT draw nothing else, so the equivalences are exact up to rounding; ReFL's late step and TailorPO's SDE and trained
steps are drawn per micro-batch (its samples share one rollout), so their micro-batches accumulate but do not
reproduce a larger batch.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers import trainer_class_for

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple star", "an orange moon"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def train(tmp_path, name, method, **overrides):
    """Two updates of ``method``; the trainer, its LoRA and what every update saw (prompts, noise, timesteps)."""
    config = tiny_trainer_config(method, tmp_path / name, **overrides)
    trainer = trainer_class_for(method)(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)
    seen = []
    step_noise, sample_sigmas = trainer.step_noise, trainer.scheduler.sample_training_sigmas

    def recording_noise(*args, **kwargs):
        noise = step_noise(*args, **kwargs)
        seen.append(("noise", noise.clone()))
        return noise

    def recording_sigmas(*args, **kwargs):
        sigmas = sample_sigmas(*args, **kwargs)
        seen.append(("grid_index", sigmas.grid_index.clone()))
        return sigmas

    trainer.step_noise, trainer.scheduler.sample_training_sigmas = recording_noise, recording_sigmas
    history = trainer.train()
    lora = get_peft_model_state_dict(trainer.pipe.transformer)
    return trainer, lora, history, seen


def per_update(trainer, seen, kind):
    """What the update saw of ``kind``, concatenated over its micro-batches, per update."""
    tensors = [tensor for what, tensor in seen if what == kind]
    per = len(tensors) // trainer.config.max_train_steps
    return [torch.cat(tensors[i * per : (i + 1) * per]) for i in range(trainer.config.max_train_steps)]


@pytest.mark.parametrize("method, overrides", [("srpo", {}), ("draft", {"draft_k": 2})])
def test_batch_and_accumulation_train_the_same_lora(tmp_path, method, overrides):
    batched, batched_lora, batched_history, batched_seen = train(tmp_path, "batch", method, train_batch_size=2, **overrides)
    accumulated, accumulated_lora, accumulated_history, accumulated_seen = train(
        tmp_path, "accumulate", method, train_batch_size=1, gradient_accumulation_steps=2, **overrides
    )
    assert batched.samples_per_update == accumulated.samples_per_update == 2
    def prompts(trainer, step):
        micro_steps = range(trainer.config.gradient_accumulation_steps)
        return [trainer.prompts[i] for m in micro_steps for i in trainer.indices_for_step(step, m)]

    assert [prompts(batched, step) for step in range(2)] == [prompts(accumulated, step) for step in range(2)]
    kinds = ["noise", "grid_index"] if method == "srpo" else ["noise"]
    for kind in kinds:
        for a, b in zip(per_update(batched, batched_seen, kind), per_update(accumulated, accumulated_seen, kind), strict=True):
            assert torch.equal(a, b), kind
    if method == "srpo":  # the two samples of an update draw their own timesteps
        assert not torch.equal(*per_update(batched, batched_seen, "grid_index")[0])
    for a, b in zip(batched_history, accumulated_history, strict=True):
        for key in ("loss", "reward", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert any(v.abs().max() > 0 for k, v in batched_lora.items() if "lora_B" in k)
    for name, value in batched_lora.items():
        torch.testing.assert_close(accumulated_lora[name], value, rtol=0, atol=1e-6, msg=name)


def test_an_update_takes_one_optimizer_step_over_its_micro_batches(tmp_path):
    trainer, _, history, _ = train(tmp_path, "accumulate", "srpo", gradient_accumulation_steps=3, max_train_steps=2)
    assert trainer.optimizer.state[trainer.trainable_parameters[0]]["step"].item() == 2
    assert len(history) == 2 and trainer.global_step == 2
    card = (tmp_path / "accumulate" / "README.md").read_text()
    assert "- **prompts per update**: 3 (1 processes x 1 x 3 accumulated)" in card


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from peft.utils import get_peft_model_state_dict
    from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
    from diffusers_srpo.trainers import trainer_class_for

    out, accumulation = sys.argv[1], int(sys.argv[2])
    config = tiny_trainer_config("srpo", out, gradient_accumulation_steps=accumulation, cpu=True)
    trainer = trainer_class_for("srpo")(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0), prompts=PROMPTS,
                                        config=config)
    history = trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(get_peft_model_state_dict(trainer.pipe.transformer), os.path.join(out, f"lora-rank{rank}.pt"))
    prompts = [trainer.prompts[i] for step in range(2) for m in range(accumulation) for i in trainer.indices_for_step(step, m)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"history": history, "prompts": prompts, "samples": trainer.samples_per_update}, f)
    """
).replace("prompts=PROMPTS", f"prompts={PROMPTS!r}")


@pytest.mark.slow
def test_two_processes_accumulating_two_train_as_one_process_accumulating_four(tmp_path):
    script = tmp_path / "accumulate.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two, one = tmp_path / "two", tmp_path / "one"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29661"]
    result = subprocess.run([*command, str(script), str(two), "2"], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    result = subprocess.run([sys.executable, str(script), str(one), "4"], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((one / "rank0.json").read_text())
    assert ranks[0]["samples"] == single["samples"] == 4
    # The update's four prompts, split 2 x 2 or 1 x 4: the same set each update.
    for step in range(2):
        split = ranks[0]["prompts"][2 * step : 2 * step + 2] + ranks[1]["prompts"][2 * step : 2 * step + 2]
        assert sorted(split) == sorted(single["prompts"][4 * step : 4 * step + 4])
    for a, b in zip(ranks[0]["history"], single["history"], strict=True):
        for key in ("loss", "reward", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    loras = [torch.load(two / "lora-rank0.pt"), torch.load(two / "lora-rank1.pt"), torch.load(one / "lora-rank0.pt")]
    assert any(v.abs().max() > 0 for k, v in loras[2].items() if "lora_B" in k)
    for name, value in loras[2].items():
        assert torch.equal(loras[0][name], loras[1][name]), name
        torch.testing.assert_close(loras[0][name], value, rtol=0, atol=1e-6, msg=name)
