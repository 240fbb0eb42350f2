"""SRPOTrainer end to end on the tiny FLUX pipeline and a tiny CLIP reward (CPU)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from diffusers_srpo import SRPOConfig, SRPOTrainer
from diffusers_srpo.models import FluxAdapter
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers.base import with_model_defaults

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
SIZE = 32


def make_config(tmp_path, name="run", **overrides):
    return tiny_trainer_config("srpo", tmp_path / name, **overrides)


def make_trainer(tmp_path, name="run", pipe=None, reward=None, prompts=PROMPTS, **overrides):
    pipe = pipe if pipe is not None else tiny_flux_pipeline(seed=0)
    reward = reward if reward is not None else tiny_clip_reward(seed=0)
    return SRPOTrainer(pipe, reward=reward, prompts=prompts, config=make_config(tmp_path, name, **overrides))


def lora_weights(directory) -> dict:
    return load_file(os.path.join(directory, "pytorch_lora_weights.safetensors"))


def generate(pipe, prompts, seed=123, steps=4):
    return pipe(
        prompts,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=3.5,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


# ------------------------------------------------------------------------------------------- config and errors
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_train_steps", 0, "max_train_steps"),
        ("learning_rate", -1.0, "learning_rate"),
        ("mixed_precision", "fp8", "mixed_precision"),
        ("train_window_start", 30, "train_window_start"),
        ("word_schedule", "random", "word_schedule"),
        ("positive_words", [], "positive_words"),
        ("x0_source", "dataset", "image_folder"),
        ("lr_scheduler", "nope", "lr_scheduler"),
    ],
)
def test_config_is_validated_at_construction(field, value, message):
    with pytest.raises(ValueError, match=message):
        SRPOConfig(**{field: value})


def test_config_defaults_follow_the_spec():
    config = SRPOConfig()
    assert (config.train_window_start, config.train_window_end) == (5, 25)
    # Guidance and the prompt length are the model's: FLUX.1's are the reference's (SPEC 1).
    assert config.rollout_guidance is None and config.train_guidance is None and config.max_sequence_length is None
    flux = with_model_defaults(config, FluxAdapter(tiny_flux_pipeline()))
    assert flux.rollout_guidance == 1.0 and flux.train_guidance == 3.5 and flux.max_sequence_length == 512
    assert config.rollout_steps == 25
    assert config.hinge_threshold == 0.7 and config.max_grad_norm == 0.1 and config.use_inversion
    assert (config.adam_beta1, config.adam_beta2, config.adam_epsilon, config.adam_weight_decay) == (0.9, 0.999, 1e-8, 1e-4)
    assert config.use_lora and config.learning_rate == 1e-4
    assert SRPOConfig(use_lora=False).learning_rate == 5e-6  # the reference's full fine-tune


def test_clear_errors_before_any_training(tmp_path):
    with pytest.raises(TypeError, match="FluxPipeline"):
        SRPOTrainer(object(), reward=tiny_clip_reward(), prompts=PROMPTS, config=make_config(tmp_path))
    with pytest.raises(ValueError, match="no prompt"):
        make_trainer(tmp_path, prompts=["", "  "])
    with pytest.raises(ValueError, match="no training prompts"):
        make_trainer(tmp_path, prompts=None)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "pytorch_lora_weights.safetensors").write_bytes(b"another run")
    with pytest.raises(FileExistsError, match="another run"):
        make_trainer(tmp_path, name="busy")
    assert (busy / "pytorch_lora_weights.safetensors").read_bytes() == b"another run"

    from diffusers_srpo.rewards import CallableReward

    with pytest.raises(TypeError, match="CLIP-like"):
        make_trainer(tmp_path, reward=CallableReward(lambda images, prompts: images.mean(dim=(1, 2, 3))))

    class DetachedReward(type(tiny_clip_reward())):
        def encode_image(self, images):
            return super().encode_image(images).detach()

    detached = tiny_clip_reward()
    detached.__class__ = DetachedReward
    with pytest.raises(ValueError, match="not differentiable"):
        make_trainer(tmp_path, reward=detached)
    assert not (tmp_path / "run").exists()


def test_prompts_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a red circle\n\n a blue square \n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a red circle"}\n{"text": "a blue square"}\n')
    for source in (txt, jsonl):
        trainer = make_trainer(tmp_path, prompts=str(source))
        assert trainer.prompts == ["a red circle", "a blue square"]


# ------------------------------------------------------------------------------------------- training
def test_only_lora_parameters_change_and_outputs_are_written(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    base_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    trainer = make_trainer(tmp_path, pipe=pipe, validation_prompts=["a red circle"], validation_steps=2)
    lora_before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    history = trainer.train()

    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    for name, param in pipe.transformer.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.dtype == torch.float32
        else:
            base_name = name.replace(".base_layer", "")
            assert param.requires_grad  # handed back as found (from_pretrained's default)
            assert torch.equal(param, base_before[base_name]), f"base weight {name} changed"
    changed = [n for n, p in pipe.transformer.named_parameters() if "lora_B" in n and not torch.equal(p, lora_before[n])]
    assert changed, "no LoRA weight moved"
    assert all(torch.equal(v, vae_before[k]) for k, v in pipe.vae.state_dict().items())

    out = tmp_path / "run"
    weights = lora_weights(out)
    assert weights and all(k.startswith("transformer.") for k in weights)
    card = (out / "README.md").read_text()
    for expected in ("srpo", "LoRA", "positive control words", "Natural", "training window"):
        assert expected in card
    assert json.loads((out / "srpo_config.json").read_text())["max_train_steps"] == 2
    assert (out / "validation" / "step-000002.png").is_file()


def test_saved_lora_loads_in_a_fresh_process_and_reproduces_images(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    make_trainer(tmp_path, pipe=pipe, max_train_steps=3, learning_rate=1e-2).train()
    expected = generate(pipe, ["a red circle", "a blue square"])
    untrained = generate(tiny_flux_pipeline(seed=0), ["a red circle", "a blue square"])

    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from diffusers_srpo.testing import tiny_flux_pipeline
        pipe = tiny_flux_pipeline(seed=0)
        pipe.load_lora_weights({str(tmp_path / "run")!r})
        images = pipe(["a red circle", "a blue square"], height={SIZE}, width={SIZE}, num_inference_steps=4,
                      guidance_scale=3.5, max_sequence_length=16, generator=torch.Generator().manual_seed(123),
                      output_type="np").images
        np.save({str(tmp_path / "fresh.npy")!r}, images)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    fresh = np.load(tmp_path / "fresh.npy")
    assert np.abs(expected - untrained).max() > 1e-3, "training did not change the images"
    np.testing.assert_allclose(fresh, expected, rtol=0, atol=1e-5)


def test_resume_is_bit_identical(tmp_path):
    straight = make_trainer(tmp_path, name="straight", max_train_steps=10, checkpointing_steps=5)
    straight.train()

    first = make_trainer(tmp_path, name="split", max_train_steps=5, checkpointing_steps=5)
    first.train()
    assert [os.path.basename(p) for p in first.checkpoint_dirs()] == ["checkpoint-5"]
    resumed = make_trainer(
        tmp_path, name="split", max_train_steps=10, checkpointing_steps=5, resume_from_checkpoint="latest"
    )
    resumed.train()
    assert resumed.global_step == 10 and len(resumed.history) == 10

    a, b = lora_weights(tmp_path / "straight"), lora_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_full_fine_tune_writes_the_transformer_and_resumes(tmp_path):
    from diffusers import FluxTransformer2DModel

    straight = make_trainer(tmp_path, name="straight", use_lora=False, learning_rate=1e-3, max_train_steps=2)
    straight.train()
    make_trainer(
        tmp_path, name="split", use_lora=False, learning_rate=1e-3, max_train_steps=1, checkpointing_steps=1
    ).train()
    resumed = make_trainer(
        tmp_path,
        name="split",
        use_lora=False,
        learning_rate=1e-3,
        max_train_steps=2,
        checkpointing_steps=1,
        resume_from_checkpoint="latest",
    )
    resumed.train()

    base = tiny_flux_pipeline(seed=0).transformer.state_dict()
    saved = FluxTransformer2DModel.from_pretrained(str(tmp_path / "straight" / "transformer")).state_dict()
    trained = straight.accelerator.unwrap_model(straight.model).state_dict()
    assert saved.keys() == base.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    assert any(not torch.equal(saved[k], base[k]) for k in saved), "no transformer weight moved"
    assert not (tmp_path / "straight" / "pytorch_lora_weights.safetensors").exists()
    again = FluxTransformer2DModel.from_pretrained(str(tmp_path / "split" / "transformer")).state_dict()
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_x0_from_an_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a green triangle\n")
    trainer = make_trainer(tmp_path, x0_source="dataset", image_folder=str(folder), max_train_steps=1)
    assert trainer.prompts == ["a green triangle", PROMPTS[1]]  # b.png has no caption: the prompts in turn

    noise = torch.randn(2, *trainer.adapter.packed_shape(SIZE, SIZE))
    x0 = trainer.clean_latents(noise, trainer.text_for(trainer.prompts), [0, 1])
    # The reference: resize the shorter side and centre-crop by hand, then the stock VAE encoding.
    image = torch.from_numpy(np.array(Image.open(folder / "a.png"))).permute(2, 0, 1).float() / 255
    image = torch.nn.functional.interpolate(image[None], size=(38, 32), mode="bicubic", antialias=True)[0]
    image = image[:, 3:35, :].clamp(0, 1)
    latents = trainer.pipe.vae.encode(image[None] * 2 - 1).latent_dist.mode()
    config = trainer.pipe.vae.config
    expected = trainer.pipe._pack_latents((latents - config.shift_factor) * config.scaling_factor, 1, 16, 16, 16)
    # The trainer resizes the uint8 image (as PIL-based loaders do): 0.015 apart at a latent scale of 0.7.
    torch.testing.assert_close(x0[:1], expected, rtol=0, atol=0.05)
    history = trainer.train()
    assert len(history) == 1 and np.isfinite(history[0]["loss"])


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    trainer = make_trainer(tmp_path, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".partial-checkpoint-9").mkdir()  # a save that crashed half-way
    (out / "checkpoint-7").mkdir()  # a folder without the trainer state, written last
    trainer.config.overwrite_output_dir = True
    trainer.train()
    assert [os.path.basename(p) for p in trainer.checkpoint_dirs()] == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "checkpoint-4" / "pytorch_lora_weights.safetensors").is_file()
    assert not any(name.startswith("model") for name in os.listdir(out / "checkpoint-4")), "frozen base weights saved"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        make_trainer(tmp_path, name="run", resume_from_checkpoint=str(out / "checkpoint-7"), max_train_steps=5).train()


def _one_update_gradients(tmp_path, name, **overrides):
    """LoRA gradients of the first update (lr ~0 so that nothing moves, clip off) and the number of transformer
    forwards that carried a gradient."""
    pipe = tiny_flux_pipeline(seed=0)
    trainer = make_trainer(
        tmp_path, name=name, pipe=pipe, max_train_steps=1, learning_rate=1e-30, max_grad_norm=0.0, **overrides
    )
    captured = {}
    forwards_with_grad = []

    def capture(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                captured[len(captured)] = p.grad.detach().clone()

    def count(module, args, output):
        forwards_with_grad.append(output[0].requires_grad)

    step_hook = register_optimizer_step_pre_hook(capture)
    forward_hook = pipe.transformer.register_forward_hook(count)
    try:
        trainer.train()
    finally:
        step_hook.remove()
        forward_hook.remove()
    return trainer, captured, sum(forwards_with_grad)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, plain, _ = _one_update_gradients(tmp_path, "plain", gradient_checkpointing=False, vae_gradient_checkpointing=False)
    _, checkpointed, _ = _one_update_gradients(
        tmp_path, "ckpt", gradient_checkpointing=True, vae_gradient_checkpointing=True
    )
    assert plain.keys() == checkpointed.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-8)


def test_inversion_switch(tmp_path):
    with_inversion, grads_on, forwards_on = _one_update_gradients(tmp_path, "on", use_inversion=True)
    without, grads_off, forwards_off = _one_update_gradients(tmp_path, "off", use_inversion=False)
    assert "reward_invert" in with_inversion.history[0] and "reward_invert" not in without.history[0]
    # One transformer forward with gradient per branch; the rollout's forwards carry none.
    assert (forwards_on, forwards_off) == (2, 1)
    assert any(not torch.allclose(grads_on[k], grads_off[k]) for k in grads_on)


@pytest.mark.slow
def test_short_run_raises_the_srp_reward_beyond_seed_spread(tmp_path):
    from diffusers_srpo.rewards import SemanticRelativeReward

    reward = tiny_clip_reward(seed=0)
    srp = SemanticRelativeReward(reward)

    def mean_srp(trainer):
        """Mean SRP (k = 0, the first control words) of the training prompts over fixed evaluation noises."""
        with torch.no_grad():
            return float(np.mean([srp(trainer.generate_images(PROMPTS, seed), PROMPTS).mean().item() for seed in range(4)]))

    before, gains = [], []
    for seed in (0, 1, 2):
        trainer = make_trainer(tmp_path, name=f"seed{seed}", reward=reward, seed=seed, max_train_steps=12, learning_rate=1e-2)
        before.append(mean_srp(trainer))  # the LoRA starts at zero: this is the base model
        trainer.train()
        gains.append(mean_srp(trainer) - before[-1])
    print("SRP reward before:", before[0], "gains per training seed:", gains)
    assert len(set(before)) == 1
    assert min(gains) > 0
    assert np.mean(gains) > np.max(gains) - np.min(gains)


TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from diffusers_srpo import SRPOConfig, SRPOTrainer
    from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config

    out = sys.argv[1]
    config = SRPOConfig(output_dir=out, seed=0, max_train_steps=2, resolution=32, rollout_steps=4, max_sequence_length=16,
                        mixed_precision="no", learning_rate=1e-3, lora_rank=4, lora_alpha=4.0, checkpointing_steps=0,
                        validation_prompts=["a red circle"], validation_steps=2, cpu=True)
    trainer = SRPOTrainer(tiny_flux_pipeline(seed=0), reward=tiny_clip_reward(seed=0),
                          prompts=["a red circle", "a blue square", "a green triangle", "a yellow circle"], config=config)
    trainer.train()
    from peft.utils import get_peft_model_state_dict
    import torch
    state = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
    rank = trainer.accelerator.process_index
    torch.save(state, os.path.join(out, f"lora-rank{rank}.pt"))
    prompts = [trainer.prompts[i] for step in range(2) for i in trainer.indices_for_step(step)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"num_processes": trainer.accelerator.num_processes, "prompts": prompts}, f)
    """
)


@pytest.mark.slow
def test_two_processes_train_identical_weights_on_different_prompts(tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 for r in ranks)
    assert ranks[0]["prompts"] != ranks[1]["prompts"]
    weights = [torch.load(out / f"lora-rank{r}.pt") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert (out / "validation" / "step-000002.png").is_file()
    written = lora_weights(out)
    assert torch.equal(written["transformer." + next(iter(weights[0]))], next(iter(weights[0].values())))


def test_adapter_recovers_into_the_vae_layout_like_the_scheduler_then_decode():
    from diffusers_srpo import DirectAlignScheduler
    from diffusers_srpo.models import get_model_adapter

    pipe = tiny_flux_pipeline(seed=0)
    adapter = get_model_adapter(pipe)
    scheduler = DirectAlignScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    velocity, sample, noise = torch.randn(3, 2, *adapter.packed_shape(SIZE, SIZE), generator=generator).unbind(0)
    sigmas = scheduler.sample_training_sigmas(2, generator=generator)
    with torch.no_grad():
        fused = adapter.decode_vae_input(
            adapter.recover_vae_input(velocity, sample, sigmas.sigma_hi, sigmas.sigma_mid, noise, SIZE, SIZE)
        )
        x0_hat = scheduler.step_and_recover(velocity, sample, sigmas.sigma_hi, sigmas.sigma_mid, noise)
        expected = adapter.decode(x0_hat, SIZE, SIZE)
    assert fused.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)


def test_on_update_sees_every_update_and_can_add_logs(tmp_path):
    seen = []

    def evaluate(trainer, logs):
        seen.append(trainer.global_step)
        logs["evaluation"] = 10.0 * trainer.global_step

    history = make_trainer(tmp_path, max_train_steps=3).train(on_update=evaluate)
    assert seen == [1, 2, 3]
    assert [h["evaluation"] for h in history] == [10.0, 20.0, 30.0]
