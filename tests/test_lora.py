import copy
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusers_srpo.lora import extract_lora, load_transformer_state_dict, save_lora
from diffusers_srpo.testing import tiny_flux_pipeline

RANK = 4
# Attention and feed-forward projections of the double-stream and the single-stream block.
UPDATED_LAYERS = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff_context.net.2",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.0.proj_out",
)


def _base_state(transformer) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in transformer.state_dict().items()}


@pytest.fixture(scope="module")
def fine_tune():
    """``(base transformer, tuned state dict)``: the tuned one is the base plus a random rank-RANK update of
    each of UPDATED_LAYERS, twice the layer's weight in norm so that the images change visibly."""
    base = tiny_flux_pipeline(seed=0).transformer
    tuned = _base_state(base)
    generator = torch.Generator().manual_seed(1234)
    for name in UPDATED_LAYERS:
        weight = tuned[f"{name}.weight"]
        out_features, in_features = weight.shape
        left = torch.randn(out_features, RANK, generator=generator)
        update = left @ torch.randn(RANK, in_features, generator=generator)
        weight += update * (2.0 * weight.norm() / update.norm())
    return base, tuned


@pytest.fixture(scope="module")
def extraction(fine_tune):
    base, tuned = fine_tune
    return extract_lora(base, tuned, rank=RANK)


def _generate(pipe) -> np.ndarray:
    return pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_extraction_at_the_update_rank_recovers_it(fine_tune, extraction):
    base, tuned = fine_tune
    assert sorted(extraction.layers) == sorted(UPDATED_LAYERS)
    assert extraction.rank == extraction.alpha == RANK
    assert extraction.clipped_layers == []
    assert extraction.uncaptured == {}
    linear_names = [name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)]
    assert sorted(extraction.unchanged_layers) == sorted(set(linear_names) - set(UPDATED_LAYERS))
    base_state = base.state_dict()
    for name, layer in extraction.layers.items():
        assert layer.rank == RANK
        assert layer.relative_error < 1e-5, name
        assert layer.energy_kept == pytest.approx(1.0, abs=1e-10)
        assert layer.relative_change == pytest.approx(2.0, rel=1e-5)
        lora_A = extraction.state_dict[f"{name}.lora_A.weight"]
        lora_B = extraction.state_dict[f"{name}.lora_B.weight"]
        out_features, in_features = base_state[f"{name}.weight"].shape
        assert lora_A.shape == (RANK, in_features) and lora_B.shape == (out_features, RANK)
        # The report's number is the real thing: recompute it from the stored factors.
        delta = tuned[f"{name}.weight"] - base_state[f"{name}.weight"]
        assert torch.allclose(lora_B @ lora_A, delta, atol=1e-5 * delta.abs().max().item())
    assert len(extraction.state_dict) == 2 * len(UPDATED_LAYERS)


def test_extraction_below_the_update_rank_loses_exactly_the_svd_tail(fine_tune):
    base, tuned = fine_tune
    truncated = extract_lora(base, tuned, rank=RANK - 1)
    base_state = base.state_dict()
    for name in UPDATED_LAYERS:
        delta = tuned[f"{name}.weight"].double() - base_state[f"{name}.weight"].double()
        singular_values = torch.linalg.svdvals(delta)
        tail_energy = singular_values[RANK - 1 :].square().sum()
        expected_error = (tail_energy.sqrt() / delta.norm()).item()
        layer = truncated.layers[name]
        assert layer.rank == RANK - 1
        assert expected_error > 0.05, name  # a random rank-RANK update has no negligible direction
        assert layer.relative_error == pytest.approx(expected_error, rel=1e-5)
        assert layer.energy_kept == pytest.approx(1 - expected_error**2, rel=1e-5)


def test_saved_lora_loads_with_stock_pipeline_and_reproduces_the_fine_tune(fine_tune, extraction, tmp_path, tiny_pipe):
    _, tuned = fine_tune
    path = save_lora(tmp_path / "lora", extraction)
    assert path == str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")

    fine_tuned_pipe = tiny_flux_pipeline(seed=0)
    fine_tuned_pipe.transformer.load_state_dict(tuned)
    lora_pipe = tiny_flux_pipeline(seed=0)
    lora_pipe.load_lora_weights(tmp_path / "lora")

    (adapter_config,) = lora_pipe.transformer.peft_config.values()
    assert (adapter_config.r, adapter_config.lora_alpha) == (RANK, RANK)
    assert set(adapter_config.target_modules) == set(UPDATED_LAYERS)
    fine_tuned_images = _generate(fine_tuned_pipe)
    lora_images = _generate(lora_pipe)
    base_images = _generate(tiny_pipe)
    np.testing.assert_allclose(lora_images, fine_tuned_images, atol=1e-4, rtol=0)
    assert np.abs(base_images - fine_tuned_images).max() > 0.05


def test_rank_above_a_layer_size_is_clipped_and_loads_at_scale_one(tmp_path):
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    base = tiny_flux_pipeline(seed=0).transformer
    tuned = _base_state(base)
    name = "transformer_blocks.0.attn.to_q"  # 32 x 32
    tuned[f"{name}.weight"] += 0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    clipped = extract_lora(base, tuned, rank=40)
    assert clipped.clipped_layers == [name]
    assert clipped.layers[name].rank == 32
    assert clipped.layers[name].relative_error < 1e-5

    save_lora(tmp_path, clipped)
    with_lora = copy.deepcopy(base)
    with_lora.load_lora_adapter(tmp_path, weight_name=LORA_WEIGHT_NAME_SAFE, prefix="transformer")
    layer = with_lora.transformer_blocks[0].attn.to_q
    # Without a per-layer alpha, peft would scale this layer by 40 / 32.
    assert list(layer.r.values()) == [32] and list(layer.scaling.values()) == [1.0]
    inputs = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.linear(inputs, tuned[f"{name}.weight"], tuned[f"{name}.bias"])
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), expected, atol=1e-5, rtol=0)


def test_bias_and_norm_changes_are_reported_as_not_captured(tiny_pipe):
    base = tiny_pipe.transformer
    tuned = _base_state(base)
    tuned["transformer_blocks.0.attn.to_q.bias"] += 0.1
    tuned["transformer_blocks.0.attn.norm_q.weight"] *= 1.5
    only_uncaptured = extract_lora(base, tuned, rank=RANK)
    assert only_uncaptured.layers == {} and only_uncaptured.state_dict == {}
    bias_change = only_uncaptured.uncaptured["transformer_blocks.0.attn.to_q.bias"]
    norm_change = only_uncaptured.uncaptured["transformer_blocks.0.attn.norm_q.weight"]
    assert set(only_uncaptured.uncaptured) == {
        "transformer_blocks.0.attn.to_q.bias",
        "transformer_blocks.0.attn.norm_q.weight",
    }
    assert bias_change.reason == "Linear bias"
    assert bias_change.change_norm == pytest.approx(0.1 * math.sqrt(32), rel=1e-5)
    assert norm_change.reason == "not a Linear weight"
    assert norm_change.relative_change == pytest.approx(0.5, rel=1e-6)  # norm_q starts at ones
    with pytest.raises(ValueError, match="nothing to save"):
        save_lora("unused", only_uncaptured)


def test_target_modules_selects_layers_and_reports_the_others(fine_tune):
    base, tuned = fine_tune
    attention_only = extract_lora(base, tuned, rank=RANK, target_modules=["attn.to_q", "attn.to_k"])
    assert sorted(attention_only.layers) == ["single_transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_q"]
    assert sorted(attention_only.unchanged_layers) == [
        "single_transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
    ]
    left_out = {f"{name}.weight" for name in UPDATED_LAYERS} - {f"{name}.weight" for name in attention_only.layers}
    assert set(attention_only.uncaptured) == left_out
    assert {change.reason for change in attention_only.uncaptured.values()} == {"Linear weight outside target_modules"}
    with pytest.raises(ValueError, match=re.escape("target_modules ['attn.to_qq'] match no nn.Linear layer")):
        extract_lora(base, tuned, rank=RANK, target_modules=["attn.to_q", "attn.to_qq"])


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4"])
def test_rank_must_be_a_positive_int(tiny_pipe, rank):
    base = tiny_pipe.transformer
    with pytest.raises(ValueError, match="rank must be a positive int"):
        extract_lora(base, base.state_dict(), rank=rank)


def test_load_from_a_single_safetensors_file_and_a_pt_file(tiny_pipe, tmp_path):
    base = tiny_pipe.transformer
    expected = _base_state(base)
    save_file(expected, tmp_path / "srpo.safetensors")
    torch.save(expected, tmp_path / "srpo.pt")
    for file_name in ("srpo.safetensors", "srpo.pt"):
        loaded = load_transformer_state_dict(tmp_path / file_name, base=base)
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_load_from_a_sharded_save_pretrained_folder_and_its_pipeline_folder(tiny_pipe, tmp_path):
    base = tiny_pipe.transformer
    model_folder = tmp_path / "pipeline" / "transformer"
    base.save_pretrained(model_folder, max_shard_size="20KB")
    assert (model_folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    expected = base.state_dict()
    for folder in (model_folder, tmp_path / "pipeline"):
        loaded = load_transformer_state_dict(folder, base=base)
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_load_errors_name_the_path(tiny_pipe, tmp_path):
    base = tiny_pipe.transformer
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such file or folder")):
        load_transformer_state_dict(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no diffusers transformer weights"):
        load_transformer_state_dict(tmp_path / "empty")

    renamed = _base_state(base)
    renamed["proj_out.weights"] = renamed.pop("proj_out.weight")
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError) as error:
        load_transformer_state_dict(tmp_path / "renamed.safetensors", base=base)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'renamed.safetensors'}: keys do not match")
    assert "1 missing ['proj_out.weight'], 1 unexpected ['proj_out.weights']" in message
    assert "\n" not in message

    reshaped = _base_state(base)
    reshaped["proj_out.weight"] = torch.zeros(64, 31)
    save_file(reshaped, tmp_path / "reshaped.safetensors")
    shape_error = re.escape("1 tensors differ in shape") + ".*" + re.escape("proj_out.weight (64, 31) vs (64, 32)")
    with pytest.raises(ValueError, match=shape_error):
        load_transformer_state_dict(tmp_path / "reshaped.safetensors", base=base)


def test_extract_checks_keys_before_any_svd(tiny_pipe, monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("SVD ran before the keys were checked")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    base = tiny_pipe.transformer
    tuned = _base_state(base)
    tuned["transformer_blocks.0.attn.to_q.weight"] += 1.0
    del tuned["proj_out.bias"]
    with pytest.raises(ValueError, match=re.escape("tuned_state_dict: keys do not match") + ".*proj_out.bias"):
        extract_lora(base, tuned, rank=RANK)
