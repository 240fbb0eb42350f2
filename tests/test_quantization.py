"""A quantized frozen transformer with a LoRA on top, and 8-bit AdamW (issue 21), on the CPU.

torchao's int8 and float8 weight-only load through diffusers' own ``from_pretrained(quantization_config=...)`` on a
CPU; bitsandbytes' NF4 loads only with CUDA there, so its tests quantize a model in memory with
``quantize_in_memory``, which builds the same layers as that loading path.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import BitsAndBytesConfig, FluxPipeline, PipelineQuantizationConfig, TorchAoConfig
from PIL import Image
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from diffusers_srpo import quantization_config
from diffusers_srpo.cli import main
from diffusers_srpo.quantization import check_quantize, quantization_of, quantize_in_memory
from diffusers_srpo.testing import tiny_clip_reward, tiny_flux_pipeline, tiny_trainer_config
from diffusers_srpo.trainers import trainer_class_for

bnb = pytest.importorskip("bitsandbytes")
torchao = pytest.importorskip("torchao")
ADAMW_8BIT = bnb.optim.AdamW8bit  # the class itself (a fixture below wraps the name)

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
SIZE = 32
#: The methods that back-propagate the reward (TailorPO-G through its guidance step).
REWARD_GRADIENT_METHODS = ["srpo", "direct-align", "refl", "draft", "tailorpo-g"]


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    tiny_flux_pipeline(seed=0).save_pretrained(folder)
    return str(folder)


def load_quantized(folder: str, name: str):
    return FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32, quantization_config=quantization_config(name, torch.float32))


def make_trainer(pipe, output_dir, method="srpo", **overrides):
    config = tiny_trainer_config(method, output_dir, **overrides)
    return trainer_class_for(method)(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)


def frozen_weights(transformer) -> dict[str, torch.Tensor]:
    """The quantized layers' stored weights as plain tensors (their packed or integer data, and scales)."""
    out = {}
    for name, layer in transformer.named_modules():
        weight = getattr(layer, "weight", None)
        if weight is None or "lora" in name:
            continue
        name = name.replace(".base_layer", "")  # a LoRA wraps the layer it trains
        data = weight.data
        if hasattr(data, "qdata"):  # torchao's Int8Tensor / Float8Tensor
            out[name + ".qdata"] = data.qdata.clone()
            out[name + ".scale"] = data.scale.clone()
        else:
            out[name] = data.clone()
    return out


def dequantized_weight(layer) -> torch.Tensor:
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.dequantize().float()


def dequantized_twin(quantized_transformer):
    """The tiny pipeline with every quantized layer's weight replaced by its dequantized value, in plain fp32."""
    twin = tiny_flux_pipeline(seed=0)
    layers = dict(twin.transformer.named_modules())
    with torch.no_grad():
        for name, layer in quantized_transformer.named_modules():
            if type(layer).__name__ in ("Linear4bit",) or hasattr(getattr(layer, "weight", None), "dequantize"):
                layers[name].weight.copy_(dequantized_weight(layer))
    return twin


def first_update_gradients(pipe, output_dir, **overrides) -> list[torch.Tensor]:
    """The LoRA gradients of the first update (lr ~0, no clipping), in the optimizer's order."""
    trainer = make_trainer(pipe, output_dir, max_train_steps=1, learning_rate=1e-30, max_grad_norm=0.0, **overrides)
    captured = []

    def capture(optimizer, args, kwargs):
        captured.extend(p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"])

    hook = register_optimizer_step_pre_hook(capture)
    try:
        trainer.train()
    finally:
        hook.remove()
    return captured


# ----------------------------------------------------------------------------------------------- configs
def test_quantization_configs_are_diffusers_own():
    nf4 = quantization_config("nf4")
    assert isinstance(nf4, PipelineQuantizationConfig) and list(nf4.quant_mapping) == ["transformer"]
    bnb_config = nf4.quant_mapping["transformer"]
    assert isinstance(bnb_config, BitsAndBytesConfig)
    assert (bnb_config.load_in_4bit, bnb_config.bnb_4bit_quant_type, bnb_config.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert bnb_config.bnb_4bit_compute_dtype == torch.bfloat16
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    for name, expected in (("int8", Int8WeightOnlyConfig), ("float8", Float8WeightOnlyConfig)):
        config = quantization_config(name, components=("transformer", "text_encoder_2")).quant_mapping
        assert list(config) == ["transformer", "text_encoder_2"]
        assert isinstance(config["transformer"], TorchAoConfig) and isinstance(config["transformer"].quant_type, expected)


def test_bad_quantize_values_fail_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match=r"^quantize must be one of nf4, int8, float8 \(or none\), got 'int4'$"):
        check_quantize("int4")
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "torchao" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"^quantize='float8' needs torchao, which is not installed: pip install"):
        quantization_config("float8")


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", REWARD_GRADIENT_METHODS)
def test_every_reward_gradient_method_trains_a_lora_on_an_int8_base(saved_pipeline, tmp_path, method):
    pipe = load_quantized(saved_pipeline, "int8")
    assert quantization_of(pipe.transformer) == "torchao Int8Tensor"
    before = frozen_weights(pipe.transformer)
    trainer = make_trainer(pipe, tmp_path / "run", method=method)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    after = frozen_weights(pipe.transformer)
    assert before.keys() == after.keys() and len(before) > 20
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen quantized weight changed"
    saved = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k), "the LoRA did not move"
    card = (tmp_path / "run" / "README.md").read_text()
    assert "frozen base while training**: torchao Int8Tensor" in card


@pytest.mark.parametrize("name", ["int8", "nf4"])
def test_lora_gradients_equal_those_of_the_dequantized_model(saved_pipeline, tmp_path, name):
    """A LoRA on a quantized layer trains as on a float layer holding the dequantized weight: the only difference is
    the storage. Reference: the plain fp32 tiny model with each weight replaced by its dequantized value."""
    if name == "nf4":
        pipe = tiny_flux_pipeline(seed=0)
        quantize_in_memory(pipe.transformer, "nf4", compute_dtype=torch.float32)
        assert quantization_of(pipe.transformer) == "bitsandbytes nf4 4-bit"
    else:
        pipe = load_quantized(saved_pipeline, name)
    twin = dequantized_twin(pipe.transformer)
    # The quantization is not a no-op: the dequantized weights differ from the unquantized model's.
    plain = tiny_flux_pipeline(seed=0).transformer.transformer_blocks[0].attn.to_q.weight
    assert (twin.transformer.transformer_blocks[0].attn.to_q.weight - plain).abs().max() > 1e-4
    quantized = first_update_gradients(pipe, tmp_path / "q")
    reference = first_update_gradients(twin, tmp_path / "ref")
    assert len(quantized) == len(reference) > 10 and any(g.abs().sum() > 0 for g in reference)
    for got, expected in zip(quantized, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)


def test_saved_lora_has_the_unquantized_keys_and_loads_on_a_stock_pipeline_in_a_fresh_process(saved_pipeline, tmp_path):
    quantized = load_quantized(saved_pipeline, "float8")
    make_trainer(quantized, tmp_path / "q", learning_rate=1e-2, max_train_steps=3).train()
    make_trainer(FluxPipeline.from_pretrained(saved_pipeline), tmp_path / "plain", max_train_steps=1).train()
    nf4 = tiny_flux_pipeline(seed=0)
    quantize_in_memory(nf4.transformer, "nf4", compute_dtype=torch.float32)
    make_trainer(nf4, tmp_path / "nf4", max_train_steps=1).train()
    keys = {run: set(load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors"))) for run in ("q", "plain", "nf4")}
    assert keys["q"] == keys["plain"] == keys["nf4"] and len(keys["plain"]) > 20

    script = textwrap.dedent(
        f"""
        import json, torch
        from diffusers import FluxPipeline
        pipe = FluxPipeline.from_pretrained({saved_pipeline!r})
        def images():
            return pipe(["a red circle"], height={SIZE}, width={SIZE}, num_inference_steps=4, max_sequence_length=16,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images
        base = images()
        pipe.load_lora_weights({str(tmp_path / "q")!r})
        lora = images()
        print(json.dumps({{"adapters": pipe.get_list_adapters(), "change": float((lora - base).abs().max())}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True)  # fmt: skip
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["adapters"] == {"transformer": ["default_0"]}
    assert loaded["change"] > 1e-3, "the LoRA loaded but changed nothing"


# ----------------------------------------------------------------------------------------------- refusals
def test_a_quantized_transformer_refuses_a_full_fine_tune_and_fsdp_before_anything_changes(saved_pipeline, tmp_path):
    pipe = load_quantized(saved_pipeline, "int8")
    before = frozen_weights(pipe.transformer)
    with pytest.raises(ValueError, match=r"^the transformer is quantized \(torchao Int8Tensor\): a full fine-tune"):
        make_trainer(pipe, tmp_path / "full", use_lora=False)
    with pytest.raises(ValueError, match=r"^fsdp=True cannot shard a quantized transformer"):
        make_trainer(pipe, tmp_path / "fsdp", fsdp=True)
    assert not (tmp_path / "full").exists() and not (tmp_path / "fsdp").exists()
    assert not getattr(pipe.transformer, "peft_config", None)
    assert all(torch.equal(v, frozen_weights(pipe.transformer)[k]) for k, v in before.items())


def test_8bit_adam_is_refused_with_fsdp_and_without_bitsandbytes(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^use_8bit_adam=True with fsdp=True is not supported"):
        tiny_trainer_config("srpo", tmp_path, use_8bit_adam=True, fsdp=True)
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"^use_8bit_adam=True needs bitsandbytes, which is not installed"):
        tiny_trainer_config("srpo", tmp_path, use_8bit_adam=True)


# ----------------------------------------------------------------------------------------------- 8-bit AdamW
@pytest.fixture
def eight_bit_state_for_small_tensors(monkeypatch):
    """bitsandbytes keeps fp32 state for tensors under 4,096 elements (every tensor of the tiny LoRA): lower the
    bound so that the tests step the 8-bit state that FLUX's LoRA gets (its smallest tensor has 98,304)."""
    monkeypatch.setattr(bnb.optim, "AdamW8bit", functools.partial(bnb.optim.AdamW8bit, min_8bit_size=0))


def test_8bit_adam_keeps_8bit_moments_and_follows_adamw(tmp_path, eight_bit_state_for_small_tensors):
    eight = make_trainer(tiny_flux_pipeline(seed=0), tmp_path / "8bit", use_8bit_adam=True, max_train_steps=3)
    eight.train()
    optimizer = eight.optimizer.optimizer
    assert isinstance(optimizer, ADAMW_8BIT)
    states = [optimizer.state[p] for p in eight.trainable_parameters]
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)
    plain = make_trainer(tiny_flux_pipeline(seed=0), tmp_path / "fp32", max_train_steps=3)
    plain.train()
    untrained = make_trainer(tiny_flux_pipeline(seed=0), tmp_path / "init", max_train_steps=1, learning_rate=1e-30)
    untrained.train()
    a8, a32, a0 = (load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in ("8bit", "fp32", "init"))
    # Three updates of 8-bit AdamW move each LoRA tensor as AdamW does, within a tenth of its movement (norms), and
    # not identically.
    assert any(not torch.equal(a8[key], a32[key]) for key in a32)
    moved = [key for key in a32 if (a32[key] - a0[key]).abs().max() > 0]
    assert len(moved) > 10
    apart = {key: float((a8[key] - a32[key]).norm() / (a32[key] - a0[key]).norm()) for key in moved}
    assert max(apart.values()) < 0.1, apart
    assert eight.model_card().count("bitsandbytes 8-bit AdamW") == 1


def _resumes_bit_identically(tmp_path, make_pipe):
    settings = dict(use_8bit_adam=True, checkpointing_steps=2)
    make_trainer(make_pipe(), tmp_path / "straight", max_train_steps=4, **settings).train()
    make_trainer(make_pipe(), tmp_path / "split", max_train_steps=2, **settings).train()
    resumed = make_trainer(
        make_pipe(), tmp_path / "split", max_train_steps=4, resume_from_checkpoint="latest", **settings
    )
    resumed.train()
    assert resumed.global_step == 4
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_adam_resumes_bit_identically(tmp_path, eight_bit_state_for_small_tensors):
    """The 8-bit moments and their block scales go into the checkpoint and come back exactly."""
    _resumes_bit_identically(tmp_path, lambda: tiny_flux_pipeline(seed=0))


@pytest.mark.slow
def test_8bit_adam_on_an_nf4_base_resumes_bit_identically(tmp_path, eight_bit_state_for_small_tensors):
    def nf4_pipe():
        pipe = tiny_flux_pipeline(seed=0)
        quantize_in_memory(pipe.transformer, "nf4", compute_dtype=torch.float32)
        return pipe

    _resumes_bit_identically(tmp_path, nf4_pipe)


# ----------------------------------------------------------------------------------------------- command line
def run_train(world, out, *extra):
    executable = shutil.which("diffusers-srpo")
    assert executable, "the console script is not installed"
    args = [
        "train", "--model", world / "flux", "--reward", f"clip:{world / 'clip'}", "--torch_dtype", "float32",
        "--prompt_file", world / "prompts.txt", "--output_dir", out, "--resolution", "32", "--rollout_steps", "2",
        "--max_sequence_length", "16", "--max_train_steps", "2", "--learning_rate", "1e-2", "--lora_rank", "4",
        "--mixed_precision", "no", "--cpu", "--checkpointing_steps", "0", "--validation_steps", "0", *extra,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([executable, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


def test_train_quantize_on_the_command_line(world, tmp_path):
    result = run_train(world, tmp_path / "int8", "--quantize", "int8", "--use_8bit_adam")
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "int8" / "README.md").read_text()
    assert "frozen base while training**: torchao Int8Tensor" in card and "bitsandbytes 8-bit AdamW" in card
    weights = load_file(str(tmp_path / "int8" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())

    # Sampled on the quantized base as on the bf16 one: the same LoRA, images within the quantization's error.
    def sample(name, *extra):
        args = [
            "sample", "--model", world / "flux", "--prompt", "a red circle", "--lora", tmp_path / "int8",
            "--torch_dtype", "float32", "--height", "32", "--width", "32", "--num_inference_steps", "4",
            "--max_sequence_length", "16", "--device", "cpu", "--output_dir", tmp_path / name, *extra,
        ]  # fmt: skip
        assert main(list(map(str, args))) == 0
        return np.asarray(Image.open(tmp_path / name / "grid.png"), dtype=np.float32)

    quantized, plain = sample("quantized", "--quantize", "int8"), sample("plain")
    assert 0 < np.abs(quantized - plain).mean() < 8  # uint8 levels: close, not identical


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "int4"], "quantize must be one of nf4, int8, float8 (or none), got 'int4'"),
        (["--quantize", "nf4", "--use_lora", "false"], "--quantize nf4 trains a LoRA on the quantized transformer"),
        (["--quantize", "int8", "--fsdp"], "--quantize int8 cannot be sharded"),
        (["--use_8bit_adam", "--fsdp"], "use_8bit_adam=True with fsdp=True is not supported"),
    ],
)
def test_bad_quantization_options_exit_2_in_one_line_before_loading(world, tmp_path, capsys, extra, message):
    args = [
        "train", "--model", world / "flux", "--reward", f"clip:{world / 'clip'}", "--prompt_file",
        world / "prompts.txt", "--output_dir", tmp_path / "bad", "--cpu", *extra,
    ]  # fmt: skip
    assert main(list(map(str, args))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------- NF4 values
#: The 16 NF4 levels (QLoRA, Dettmers et al. 2023, appendix E), of which the largest gap is between -1 and -0.696.
NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


@pytest.mark.parametrize("in_features", [64, 96, 480])
def test_nf4_weights_decode_within_half_a_level_of_their_block(in_features):
    """Each weight comes back within half the widest NF4 gap times its block's absmax (blocks of 64 of the
    flattened weight; the absmax itself is stored in 8 bits (double quantization): 5 % slack), in float64: a decoder that reads another
    block's scale (bitsandbytes 0.50's CPU kernel, for in_features not a multiple of 64) fails it."""
    layer = torch.nn.Sequential(torch.nn.Linear(in_features, 96, bias=False))
    torch.nn.init.normal_(layer[0].weight, generator=torch.Generator().manual_seed(0))
    weight = layer[0].weight.detach().double().clone()
    quantize_in_memory(layer, "nf4", compute_dtype=torch.float32)
    decoded = dequantized_weight(layer[0]).double()
    half_gap = max(b - a for a, b in zip(NF4_LEVELS[:-1], NF4_LEVELS[1:], strict=True)) / 2
    absmax = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    bound = (half_gap * absmax * 1.05).expand(-1, 64).reshape(weight.shape)
    assert ((decoded - weight).abs() <= bound).all()
    assert 0.05 < float((decoded - weight).norm() / weight.norm()) < 0.12  # NF4's error on Gaussian weights: ~0.09


def test_the_24gb_example_is_the_quantized_recipe():
    import yaml

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "configs", "srpo_flux_hps_24gb.yaml")
    with open(path) as file:
        settings = yaml.safe_load(file)
    assert (settings["quantize"], settings["use_8bit_adam"], settings["use_lora"]) == ("nf4", True, True)
    assert settings["gradient_checkpointing"] and settings["vae_gradient_checkpointing"]
    assert (settings["resolution"], settings["mixed_precision"], settings["lora_rank"]) == (720, "bf16", 32)


@pytest.mark.parametrize("name", ["int8", "nf4"])
def test_a_quantized_transformer_computes_in_the_compute_dtype(tmp_path, name, fresh_accelerate_state):
    """bitsandbytes' and torchao's int8 layers compute in their input's dtype, out of autocast's reach: the trainer
    gives the quantized transformer bf16 inputs, so every layer computes in bf16 (fp32 latents would make the
    whole residual stream fp32), as a stock pipeline's call does."""
    pipe = tiny_flux_pipeline(seed=0).to(torch.bfloat16)
    quantize_in_memory(pipe.transformer, name, compute_dtype=torch.bfloat16)
    dtypes = set()
    for layer in pipe.transformer.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    trainer = make_trainer(pipe, tmp_path / "run", mixed_precision="bf16")
    trainer.train()
    assert dtypes == {torch.bfloat16} and all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
