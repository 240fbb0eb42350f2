"""Every supported pipeline family through the trainers: each method trains what it should and nothing else, the
LoRA loads with the family's STOCK pipeline in a fresh process and samples as the trained pipeline does, resume is
exact, two processes train the same weights, settings a family cannot take are refused in one line. (Each family's sampler parity and adapter details: tests/test_model_<family>.py;
FLUX.1's trainers are covered in depth by the trainer tests.)"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_srpo.models import get_model_adapter
from diffusers_srpo.testing import TINY_PIPELINES, tiny_clip_reward, tiny_trainer_config
from diffusers_srpo.trainers import trainer_class_for

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from scale_models import METHOD_VARIANTS  # noqa: E402  (the benchmarks' names of every method's variants)

#: The families beside FLUX.1.
FAMILIES = [family for family in TINY_PIPELINES if family != "flux"]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The tiny models' small matrix products run fastest on one thread."""


def family_settings(family: str) -> dict:
    """The smallest valid size of the family's tiny pipeline, CFG on in the rollout (where the family has it), and
    a short prompt length: what every test here trains with."""
    adapter = get_model_adapter(TINY_PIPELINES[family]())
    settings = {"resolution": max(32, 2 * adapter.size_multiple), "max_sequence_length": 16, "rollout_steps": 4}
    if adapter.guidance_kind == "cfg":
        settings["rollout_guidance"] = 2.0
    return settings


def make_trainer(family, method, output_dir, pipe=None, **overrides):
    method, variant = METHOD_VARIANTS.get(method, (method, {}))
    pipe = pipe if pipe is not None else TINY_PIPELINES[family]()
    config = tiny_trainer_config(method, output_dir, **{**family_settings(family), **variant, **overrides})
    return trainer_class_for(method)(pipe, reward=tiny_clip_reward(seed=0), prompts=PROMPTS, config=config)


def sample(pipe, family: str, seed: int = 123) -> np.ndarray:
    """The stock pipeline's own ``__call__`` at the training size, with the trainer's rollout guidance."""
    settings = family_settings(family)
    adapter = get_model_adapter(pipe)
    guidance = settings.get("rollout_guidance", adapter.default_rollout_guidance)
    return pipe(
        prompt=PROMPTS[:2],
        height=settings["resolution"],
        width=settings["resolution"],
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **adapter.pipeline_call_kwargs(guidance, settings["max_sequence_length"]),
    ).images


def test_srpo_loras_load_with_the_stock_pipelines_in_a_fresh_process(tmp_path):
    """Per family, 2 SRPO updates; the trainer's pipeline (handed back) samples with its own ``__call__``; a freshly
    built pipeline in a new process (one for all families: a process start costs more than a tiny model) loads the
    LoRA with the stock ``load_lora_weights`` and gives the same images."""
    trained, untrained = {}, {}
    for family in FAMILIES:
        pipe = TINY_PIPELINES[family]()
        make_trainer(family, "srpo", tmp_path / family, pipe=pipe, learning_rate=1e-2).train()
        trained[family] = sample(pipe, family)
        untrained[family] = sample(TINY_PIPELINES[family](), family)
        card = (tmp_path / family / "README.md").read_text()
        assert f"from diffusers import {type(pipe).__name__}" in card
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_model_families import FAMILIES, TINY_PIPELINES, sample
        for family in FAMILIES:
            pipe = TINY_PIPELINES[family]()
            pipe.load_lora_weights({str(tmp_path)!r} + "/" + family)
            np.save({str(tmp_path)!r} + f"/{{family}}.npy", sample(pipe, family))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    for family in FAMILIES:
        assert np.abs(trained[family] - untrained[family]).max() > 1e-3, f"{family}: training did not change the images"
        np.testing.assert_allclose(np.load(tmp_path / f"{family}.npy"), trained[family], rtol=0, atol=1e-5, err_msg=family)


def _trains_only_what_it_should(family, method, tmp_path, use_lora):
    pipe = TINY_PIPELINES[family]()
    frozen = {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module) and name != "transformer"
    }
    transformer_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    trainer = make_trainer(family, method, tmp_path / "run", pipe=pipe, use_lora=use_lora)
    history = trainer.train()

    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    for name, before in frozen.items():
        after = pipe.components[name].state_dict()
        assert all(torch.equal(after[key], value) for key, value in before.items()), f"{name} changed"
    if use_lora:
        lora = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
        assert any("lora_B" in key and value.abs().max() > 0 for key, value in lora.items()), "no LoRA weight moved"
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_" not in name:
                assert torch.equal(parameter, transformer_before[name.replace(".base_layer", "")]), name
    else:
        after = pipe.transformer.state_dict()
        assert any(not torch.equal(after[k], v) for k, v in transformer_before.items()), "no weight moved"
        assert (tmp_path / "run" / "transformer" / "config.json").is_file()


@pytest.mark.parametrize("method", list(METHOD_VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_method_trains_only_its_lora(family, method, tmp_path):
    _trains_only_what_it_should(family, method, tmp_path, use_lora=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_srpo_full_fine_tune_trains_only_the_transformer(family, tmp_path):
    _trains_only_what_it_should(family, "srpo", tmp_path, use_lora=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHOD_VARIANTS if m != "srpo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_method_full_fine_tune_trains_only_the_transformer(family, method, tmp_path):
    _trains_only_what_it_should(family, method, tmp_path, use_lora=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_bit_identical(family, tmp_path):
    straight = make_trainer(family, "srpo", tmp_path / "straight", max_train_steps=4)
    straight.train()
    make_trainer(family, "srpo", tmp_path / "split", checkpointing_steps=2).train()
    resumed = make_trainer(family, "srpo", tmp_path / "split", max_train_steps=4, resume_from_checkpoint="latest")
    resumed.train()
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


TWO_PROCESSES = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from peft.utils import get_peft_model_state_dict
    sys.path.insert(0, sys.argv[3])
    from test_model_families import make_trainer

    out, family, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[4])
    trainer = make_trainer(family, "srpo", out, cpu=True, **overrides)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(get_peft_model_state_dict(trainer.pipe.transformer), os.path.join(out, f"lora-{rank}.pt"))
    prompts = [trainer.prompts[i] for step in range(2) for i in trainer.indices_for_step(step)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"num_processes": trainer.accelerator.num_processes, "prompts": prompts}, f)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_train_identical_loras_sharded_or_not(family, tmp_path):
    """DDP: both ranks end with the same LoRA; FSDP (the family's blocks sharded): the same LoRA as DDP."""
    script = tmp_path / "train_two.py"
    script.write_text(TWO_PROCESSES)
    weights = {}
    for offset, sharded in enumerate((False, True)):
        out = tmp_path / ("fsdp" if sharded else "ddp")
        port = 29600 + 2 * FAMILIES.index(family) + offset
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                   str(script), str(out), family, os.path.dirname(os.path.abspath(__file__)), json.dumps({"fsdp": sharded})]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr[-4000:]
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["num_processes"] == 2 for r in ranks) and ranks[0]["prompts"] != ranks[1]["prompts"]
        weights[sharded] = [torch.load(out / f"lora-{r}.pt") for r in (0, 1)]
        assert any(v.abs().max() > 0 for k, v in weights[sharded][0].items() if "lora_B" in k), "nothing trained"
        assert all(torch.equal(weights[sharded][0][k], weights[sharded][1][k]) for k in weights[sharded][0])
    for name, value in weights[False][0].items():
        torch.testing.assert_close(weights[True][0][name], value, rtol=0, atol=1e-6, msg=name)


def test_a_negative_prompt_or_guidance_a_family_cannot_take_is_refused_before_training(tmp_path):
    from diffusers_srpo.testing import tiny_flux2_klein_pipeline, tiny_flux_pipeline

    with pytest.raises(ValueError, match=r"^negative_prompt is for classifier-free guidance; FluxPipeline \(flux\)"):
        make_trainer("flux", "srpo", tmp_path / "flux", pipe=tiny_flux_pipeline(), negative_prompt="blurry")
    distilled = tiny_flux2_klein_pipeline()
    distilled.register_to_config(is_distilled=True)
    with pytest.raises(ValueError, match="step-distilled .* got guidance 2.0; use 1"):
        make_trainer("flux2-klein", "srpo", tmp_path / "klein", pipe=distilled)
    assert not (tmp_path / "flux").exists() and not (tmp_path / "klein").exists()

