"""Real widths in real precision on the CPU (issue 16, point 2).

FLUX.1-dev's real widths (3072 wide, 24 heads x 128, T5 4096, pooled 768, rope 16/56/56, guidance embedding) with one
double and one single block, the real FLUX VAE config, and an HPSv2 reward of ViT-H-14's widths with two layers per
tower, all in bf16 weights under bf16 autocast: ONE update of every method the registry knows, at 256x256 (256
image tokens, FLUX's base sequence length). On the CPU the library's ops take their reference path by themselves.

For each method: the logged numbers are finite and no update was skipped; the LoRA moved exactly as AdamW's first
step from peft's gaussian init says (B = 0, so lora_A gets a zero gradient and only its weight decay, and lora_B
takes the bias-corrected step -lr * g / (|g| + eps) off zero); every other weight of the pipeline and of the reward
is bit-identical to before; and the written folder loads with stock ``load_lora_weights`` into a fresh pipeline of
the same seed, whose LoRA equals the trained one and whose transformer gives the trained pipeline's output.

The base pipeline and the reward are built once for the module (about 25 s); each method trains a deep copy, so
the untouched originals are the "before" of every comparison, and a deep copy of the original pipeline is exactly
what a fresh build from the same seed gives (the build is seeded and never trained).
"""

from __future__ import annotations

import copy
import gc
import math
import time

import pytest
import torch

from diffusers_srpo.testing import flux_dev_shaped_pipeline, hps_shaped_reward, tiny_trainer_config
from diffusers_srpo.trainers import METHODS, trainer_class_for

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle", "a blue square"]
RESOLUTION = 256
ROLLOUT_STEPS = 2
# Shared by every method: one bf16 update of a rank-4 LoRA. The VAE's activation checkpointing is off: it only
# re-runs the (real-size) decoder forward once more per reward backward, ~2-3 s each on this CPU, and the tiny
# tests cover it; the transformer's block checkpointing stays on, as by default.
COMMON_SETTINGS = dict(
    max_train_steps=1,
    resolution=RESOLUTION,
    rollout_steps=ROLLOUT_STEPS,
    max_sequence_length=16,
    mixed_precision="bf16",
    lora_rank=4,
    lora_alpha=4.0,
    vae_gradient_checkpointing=False,
)
# The smallest setting of each method that still runs all of it on a 2-step rollout.
METHOD_SETTINGS = {
    "srpo": {},  # both branches: denoise and inversion, SRP's control words
    "direct-align": {},
    "refl": {"refl_window_start": 0.5},  # the gradient step is the rollout's last
    "draft": {"draft_k": 0},  # the full chain: two checkpointed steps with gradient (DRaFT-1 = ReFL here)
    # One ranked step, the first: its step-wise reward takes the model's x0 estimate at sigma > 0, and
    # TailorPO-G's guidance differentiates through the transformer there; the second step is the ODE's.
    "tailorpo": {"preference_window_end": 0.5},
    "tailorpo-g": {"preference_window_end": 0.5},
    "trajectory-dpo": {"preference_window_end": 0.5},
    "grpo": {"group_size": 2},  # two trajectories (a group needs two to have a spread), not Flow-GRPO's 24
}


def _probe_inputs() -> dict:
    """One small transformer input (16 image tokens, 8 text tokens) in bf16: the check that two transformers agree."""
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=generator).to(bf16),
        encoder_hidden_states=torch.randn(1, 8, 4096, generator=generator).to(bf16),
        pooled_projections=torch.randn(1, 768, generator=generator).to(bf16),
        timestep=torch.tensor([0.75], dtype=bf16),
        guidance=torch.tensor([3.5], dtype=bf16),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", bf16),
        txt_ids=torch.zeros(8, 3, dtype=bf16),
        return_dict=False,
    )


@torch.no_grad()
def _transformer_output(transformer) -> torch.Tensor:
    return transformer(**_probe_inputs())[0]


@pytest.fixture(scope="module")
def base():
    """The pipeline and the reward at real widths, built once; never trained (each test trains deep copies)."""
    start = time.perf_counter()
    pipe = flux_dev_shaped_pipeline(1, 1, seed=0, dtype=torch.bfloat16)
    reward = hps_shaped_reward(2, 2, seed=0, dtype=torch.bfloat16)
    built = {
        "pipe": pipe,
        "reward": reward,
        "transformer_state": dict(pipe.transformer.state_dict()),
        "output": _transformer_output(pipe.transformer),
    }
    print(f"\nreal-width pipeline and reward built in {time.perf_counter() - start:.1f} s")
    return built


def test_every_registered_method_has_its_settings():
    assert set(METHOD_SETTINGS) == set(METHODS)


def _lora_by_module(transformer) -> dict[str, torch.Tensor]:
    """LoRA tensors by ``<module>.lora_A/lora_B`` (the adapter's name dropped: training's is "default",
    ``load_lora_weights`` names its "default_0")."""
    (adapter,) = transformer.peft_config
    return {
        name.replace(f".{adapter}.weight", ""): param.detach()
        for name, param in transformer.named_parameters()
        if "lora_" in name
    }


def _assert_same_weights(trained: torch.nn.Module, before: torch.nn.Module, what: str) -> None:
    trained_state, before_state = trained.state_dict(), before.state_dict()
    assert trained_state.keys() == before_state.keys(), what
    for name, value in trained_state.items():
        expected = before_state[name]
        assert value.dtype == expected.dtype and torch.equal(value, expected), f"{what} {name} changed"


@pytest.mark.parametrize("method", list(METHODS))
def test_one_bf16_update_at_real_width(tmp_path, method, base, fresh_accelerate_state):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    pipe, reward = copy.deepcopy(base["pipe"]), copy.deepcopy(base["reward"])
    output_dir = tmp_path / "run"
    config = tiny_trainer_config(method, output_dir, **COMMON_SETTINGS, **METHOD_SETTINGS.get(method, {}))
    trainer = trainer_class_for(method)(pipe, reward=reward, prompts=PROMPTS, config=config)

    # The LoRA as initialised (its fp32 training copy) and every gradient it receives (the last call sees the sum
    # over the update's micro-steps; clipping at max_grad_norm=1 leaves these small norms as they are).
    trained_names = {id(p): n for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert trained_names and all("lora_" in n for n in trained_names.values())
    assert {id(p) for p in trainer.trainable_parameters} == set(trained_names)
    initial = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in initial.values())
    gradients: dict[str, torch.Tensor] = {}

    def record(parameter: torch.Tensor) -> None:
        gradients[trained_names[id(parameter)]] = parameter.grad.detach().clone()

    hooks = [p.register_post_accumulate_grad_hook(record) for p in trainer.trainable_parameters]
    train_start = time.perf_counter()
    history = trainer.train()
    train_seconds = time.perf_counter() - train_start
    for hook in hooks:
        hook.remove()

    # Finite numbers, one update, not skipped.
    assert len(history) == 1
    logs = history[0]
    assert all(math.isfinite(value) for value in logs.values()), logs
    assert logs["skipped_updates"] == 0 and logs["grad_norm"] > 0 and "reward" in logs
    if "tie_fraction" in logs:
        assert logs["tie_fraction"] == 0, "a tied pair would carry no gradient"

    # The LoRA moved exactly as AdamW's first step from B = 0 says. The written file holds the fp32 training copy.
    from safetensors.torch import load_file

    saved = load_file(str(output_dir / "pytorch_lora_weights.safetensors"))
    assert len(saved) == len(initial) and all(v.dtype == torch.float32 for v in saved.values())
    assert set(gradients) == set(initial), "every LoRA tensor receives a gradient"
    lr, decay = config.learning_rate, config.adam_weight_decay
    beta1, beta2, eps = config.adam_beta1, config.adam_beta2, config.adam_epsilon
    for name, before in initial.items():
        value, gradient = saved["transformer." + name.replace(".default.weight", ".weight")], gradients[name]
        if ".lora_A." in name:
            # B = 0: no gradient reaches A, so A only decays (bit-exact).
            assert torch.count_nonzero(gradient) == 0, name
            assert torch.equal(value, before * (1 - lr * decay)), f"{name} moved beyond its weight decay"
        else:
            assert torch.count_nonzero(before) == 0, f"{name} does not start at 0"
            assert torch.count_nonzero(gradient) > 0, f"{name} got no gradient"
            # Bias-corrected Adam from zero moments: -lr * g / (|g| + eps), element by element (the decay of 0 is 0).
            step = (
                (lr / (1 - beta1))
                * ((1 - beta1) * gradient)
                / (((1 - beta2) * gradient.square()).sqrt() / math.sqrt(1 - beta2) + eps)
            )
            torch.testing.assert_close(value, -step, rtol=1e-5, atol=0, msg=name)
            assert torch.count_nonzero(value) > 0 and value.abs().max() <= lr, name

    # The pipeline handed back: the trained LoRA in the pipeline's bf16, everything else bit-identical to before.
    trained_lora = _lora_by_module(pipe.transformer)
    assert len(trained_lora) == len(saved)
    for key, value in trained_lora.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, saved[f"transformer.{key}.weight"].to(torch.bfloat16)), key
    base_state, compared = base["transformer_state"], set()
    for name, value in pipe.transformer.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "")
        expected = base_state[name]
        assert value.dtype == expected.dtype == torch.bfloat16 and torch.equal(value, expected), (
            f"transformer {name} changed"
        )
        compared.add(name)
    assert compared == set(base_state)
    _assert_same_weights(pipe.vae, base["pipe"].vae, "VAE")
    _assert_same_weights(pipe.text_encoder, base["pipe"].text_encoder, "CLIP text encoder")
    _assert_same_weights(pipe.text_encoder_2, base["pipe"].text_encoder_2, "T5 encoder")
    _assert_same_weights(reward, base["reward"], "reward")
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training

    # Stock diffusers loads the folder into a fresh pipeline of the same seed: the same LoRA, the same transformer.
    fresh = copy.deepcopy(base["pipe"])
    fresh.load_lora_weights(str(output_dir))
    loaded = _lora_by_module(fresh.transformer)
    assert loaded.keys() == trained_lora.keys()
    for key, value in loaded.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, trained_lora[key]), key
    trained_output = _transformer_output(pipe.transformer)
    assert torch.isfinite(trained_output).all()
    assert torch.equal(_transformer_output(fresh.transformer), trained_output)
    assert not torch.equal(trained_output, base["output"]), "the trained LoRA does not change the transformer's output"

    print(
        f"\n{method}: one update in {train_seconds:.1f} s, whole test {time.perf_counter() - start_wall:.1f} s wall, "
        f"{time.process_time() - start_cpu:.1f} s CPU; logs {logs}"
    )
    del trainer, pipe, reward, fresh
    gc.collect()
