"""Staged, resumable, bit-reproducible training of the toy world's generator (:mod:`.generator`, its second generation).

Training is split into two stages that each run over as many sittings as needed:

- ``vae``: the ``AutoencoderKL`` learns to reconstruct toy images (MSE + a light KL);
- ``flow``: the ``FluxTransformer2DModel`` learns rectified flow on the frozen VAE's latents
  (``x_t = t * eps + (1 - t) * x0``, target ``eps - x0``, logit-normal ``t`` shifted towards the noise end as the
  run says), keeping a moving average of its weights for evaluation and export, every caption encoded at a random
  T5 padding length up to FluxPipeline's default 512 and collapsed exactly to a 16-token context
  (:func:`~diffusers_srpo.toyworld.generator.collapse_padding`).

Everything a step uses is a pure function of the run's settings and the step index: the images of step ``s`` are
dataset items ``[offset + s * B, offset + (s + 1) * B)`` (a pure function of their index), the learning rate is a
function of ``s``, and the noise, times, guidance and padding lengths come from one ``torch.Generator`` whose
state is checkpointed. A checkpoint (model, AdamW moments, step, generator state) is written atomically every few
minutes and at the end of a sitting, so ``K`` steps then ``K`` more after a resume give the same bytes as ``2K``
steps straight (on the same machine and thread count).

Run folder (``run_dir``)::

    run.json               the run's fixed settings (seed, sizes, model config, schedules)
    log.json               one row per sitting and per evaluation
    vae/checkpoint.pt      full VAE checkpoint (fp32 weights + AdamW + generator)
    flow/vae.pt            the frozen VAE the flow stage trains on (fp32 weights, shift and scale factors)
    flow/checkpoint.pt     full transformer checkpoint (with the weights' moving average)
    flow/portable.pt       transformer weights and their average (fp32 or bf16) + step + generator, no optimizer

A portable checkpoint (no AdamW moments) resumes deterministically too, with fresh moments and a short learning
rate re-warm-up (``rewarm_steps``): the same result on any machine from the same file, but not the bytes of a run
that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from ..testing import TinyFluxConfig
from .data import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    LIGHTINGS,
    TEXTURES,
    ToyShapesDataset,
    all_attribute_combinations,
    make_caption,
)
from .generator import (
    GENERATOR_CONFIG,
    IMAGE_SIZE,
    MAX_SEQUENCE_LENGTH,
    STOCK_MAX_SEQUENCE_LENGTH,
    generator_components,
    joint_attention_bias,
)
from .oracles import oracle_labels

STAGES = ("vae", "flow")
#: T5 padding lengths the flow stage trains on (each caption's text is at most 15 tokens with its end token):
#: the toy trainers' 16 and FluxPipeline's default 512 most often, and lengths in between.
PADDING_LENGTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PADDING_WEIGHTS = (4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4)
#: Text context of the collapsed form: the caption's tokens, one pad token standing for all, masked slots.
TEXT_CONTEXT = MAX_SEQUENCE_LENGTH
#: The flow stage reads dataset items from here on (the VAE stage from 0), so the two never share images.
FLOW_DATA_OFFSET = 100_000_000


@dataclass
class RunSettings:
    """A run's fixed settings, written to ``run.json`` when the run starts."""

    seed: int = 0
    image_size: int = IMAGE_SIZE
    model: dict = field(default_factory=lambda: dataclasses.asdict(GENERATOR_CONFIG))
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_warmup_steps: int = 50
    flow_batch_size: int = 32
    flow_lr: float = 1e-3
    flow_warmup_steps: int = 200
    # Cosine decay of the flow learning rate to flow_lr * final_lr_ratio over [decay_start, decay_start + decay
    # steps]; None: constant after the warm-up (set it before the last sittings: the steps before are unchanged).
    flow_decay_start: int | None = None
    flow_decay_steps: int = 0
    final_lr_ratio: float = 0.05
    # Shifts of the flow times towards the noise end, t -> shift t / (1 + (shift - 1) t) (SD3's shift) on the
    # logit-normal draws: [first step, shift] pairs in step order, each in force until the next (none: shift 1).
    # The high-noise steps decide a shape's layout; a pair added later leaves the steps before it unchanged.
    flow_time_shifts: list = field(default_factory=list)
    # Exponential moving average of the flow weights (diffusers' EMAModel, its (1 + n) / (10 + n) warm-up capped
    # at this decay), which evaluation and export use: it smooths a constant learning rate's noise and changes no
    # update. It starts from the weights of the first sitting that keeps one.
    flow_ema_decay: float = 0.999
    # Learning-rate re-warm-up after resuming from a portable checkpoint (fresh AdamW moments).
    rewarm_steps: int = 100
    latent_statistics_images: int = 1024

    def model_config(self) -> TinyFluxConfig:
        values = dict(self.model)
        for name in ("axes_dims_rope", "vae_block_out_channels"):
            values[name] = tuple(values[name])
        return TinyFluxConfig(**values)

    @classmethod
    def load(cls, run_dir: str) -> RunSettings:
        with open(os.path.join(run_dir, "run.json")) as f:
            return cls(**json.load(f))

    def save(self, run_dir: str) -> None:
        atomic_write_text(os.path.join(run_dir, "run.json"), json.dumps(dataclasses.asdict(self), indent=2))


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def learning_rate(settings: RunSettings, stage: str, step: int, rewarm_from: int | None = None) -> float:
    """The learning rate of ``step`` (0-based): a linear warm-up, then constant or a cosine decay."""
    if stage == "vae":
        return settings.vae_lr * min(1.0, (step + 1) / settings.vae_warmup_steps)
    lr = settings.flow_lr * min(1.0, (step + 1) / settings.flow_warmup_steps)
    if settings.flow_decay_start is not None and step >= settings.flow_decay_start:
        progress = min(1.0, (step - settings.flow_decay_start) / max(1, settings.flow_decay_steps))
        ratio = settings.final_lr_ratio
        lr *= ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if rewarm_from is not None:
        lr *= min(1.0, (step - rewarm_from + 1) / settings.rewarm_steps)
    return lr


def flow_times(settings: RunSettings, step: int, normal: torch.Tensor) -> torch.Tensor:
    """The flow times of ``step`` from standard normal draws: logit-normal, shifted as ``flow_time_shifts`` says."""
    t = torch.sigmoid(normal)
    shift = 1.0
    for start, value in settings.flow_time_shifts:
        if step >= start:
            shift = value
    return shift * t / (1 + (shift - 1) * t)


# ----------------------------------------------------------------------------------------------- building


def build_components(settings: RunSettings) -> dict:
    """The untrained pipeline's components from the run's seed (the text encoders stay as built: frozen)."""
    components = generator_components(seed=settings.seed, config=settings.model_config())
    for name in ("text_encoder", "text_encoder_2", "vae"):
        components[name].requires_grad_(False)
    return components


def build_pipeline(settings: RunSettings, transformer=None, vae=None):
    from diffusers import FluxPipeline

    components = build_components(settings)
    if transformer is not None:
        components["transformer"] = transformer
    if vae is not None:
        components["vae"] = vae
    return FluxPipeline(**components)


def all_captions() -> list[str]:
    """Every caption the dataset writes: 12 contents x (no, one or both style words)."""
    captions = set()
    for attributes in all_attribute_combinations():
        for show_lighting in (False, True):
            for show_texture in (False, True):
                captions.add(make_caption(attributes, show_lighting, show_texture))
    return sorted(captions)


@torch.no_grad()
def text_cache(pipe, captions: list[str]) -> dict:
    """Collapsed T5 contexts of every caption at every training padding length, and their pooled CLIP vectors.

    ``embeds[c]`` is ``[len(PADDING_LENGTHS), TEXT_CONTEXT, D]`` and ``bias[c]`` ``[len(PADDING_LENGTHS),
    TEXT_CONTEXT]``: the caption's tokens, then one pad token with bias ``log(L - n)``, then slots masked out with
    ``-inf`` (they stand for nothing).
    """
    tokenizer = pipe.tokenizer_2
    embeds = {c: [] for c in captions}
    bias = {c: [] for c in captions}
    for length in PADDING_LENGTHS:
        ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids = ids.input_ids
        encoded = pipe.text_encoder_2(ids)[0].float()
        for row, caption in enumerate(captions):
            kept = int((ids[row] != tokenizer.pad_token_id).sum())
            if kept >= TEXT_CONTEXT or kept >= length:
                raise ValueError(f"caption {caption!r} has {kept} T5 tokens; the context holds {TEXT_CONTEXT - 1}")
            window = torch.zeros(TEXT_CONTEXT, encoded.shape[-1])
            window[: kept + 1] = encoded[row, : kept + 1]
            window[kept + 1 :] = encoded[row, kept]  # any values: masked out
            row_bias = torch.full((TEXT_CONTEXT,), float("-inf"))
            row_bias[:kept] = 0.0
            row_bias[kept] = math.log(length - kept)
            embeds[caption].append(window)
            bias[caption].append(row_bias)
    _, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, device="cpu", max_sequence_length=TEXT_CONTEXT)
    return {
        "embeds": {c: torch.stack(v) for c, v in embeds.items()},
        "bias": {c: torch.stack(v) for c, v in bias.items()},
        "pooled": {c: pooled[i].float() for i, c in enumerate(captions)},
    }


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, pack) -> torch.Tensor:
    latents = vae.encode(images * 2 - 1).latent_dist.mode()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    batch, channels, height, width = latents.shape
    return pack(latents, batch, channels, height, width)


@torch.no_grad()
def set_latent_statistics(vae, dataset: ToyShapesDataset, offset: int, count: int) -> None:
    """FLUX-style ``shift_factor`` / ``scaling_factor``: the scaled latents have mean 0 and unit variance."""
    latents = torch.cat(
        [
            vae.encode(dataset.batch(range(start, min(start + 64, offset + count))).images * 2 - 1).latent_dist.mode()
            for start in range(offset, offset + count, 64)
        ]
    )
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


# ----------------------------------------------------------------------------------------------- checkpoints


def stage_dir(run_dir: str, stage: str) -> str:
    path = os.path.join(run_dir, stage)
    os.makedirs(path, exist_ok=True)
    return path


def _checkpoint(model, optimizer, step: int, generator: torch.Generator, seconds: float, rewarm_from, ema) -> dict:
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "generator": generator.get_state(),
        "seconds": seconds,
        "rewarm_from": rewarm_from,
    }


def file_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def load_frozen_vae(run_dir: str, settings: RunSettings):
    """The VAE the flow stage trains on (``flow/vae.pt``), frozen, in eval mode."""
    vae = build_components(settings)["vae"]
    saved = torch.load(os.path.join(run_dir, "flow", "vae.pt"), weights_only=True)
    vae.load_state_dict(saved["model"])
    vae.register_to_config(shift_factor=saved["shift_factor"], scaling_factor=saved["scaling_factor"])
    vae.requires_grad_(False).eval()
    return vae


def freeze_vae_for_flow(run_dir: str, settings: RunSettings) -> dict:
    """Write ``flow/vae.pt`` from the VAE stage's checkpoint, with latent statistics measured on held-out images."""
    vae = build_components(settings)["vae"]
    vae.load_state_dict(torch.load(os.path.join(run_dir, "vae", "checkpoint.pt"), weights_only=True)["model"])
    vae.eval()
    dataset = ToyShapesDataset(length=10**12, image_size=settings.image_size, seed=settings.seed)
    set_latent_statistics(vae, dataset, FLOW_DATA_OFFSET // 2, settings.latent_statistics_images)
    saved = {
        "model": vae.state_dict(),
        "shift_factor": float(vae.config.shift_factor),
        "scaling_factor": float(vae.config.scaling_factor),
    }
    atomic_torch_save(saved, os.path.join(stage_dir(run_dir, "flow"), "vae.pt"))
    return {"shift_factor": saved["shift_factor"], "scaling_factor": saved["scaling_factor"]}


# ----------------------------------------------------------------------------------------------- training


def _fresh_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)


def train_stage(
    run_dir: str,
    stage: str,
    steps: int | None = None,
    minutes: float | None = None,
    checkpoint_minutes: float = 5.0,
    eval_every: int = 0,
    eval_samples: int = 4,
    eval_steps: int = 20,
    log_every: int = 100,
    verbose: bool = True,
) -> dict:
    """Run one sitting of ``stage``: ``steps`` more updates, or as many as fit in ``minutes`` (whichever ends first).

    Continues from the stage's checkpoint when there is one (the full one, else the portable one); otherwise
    starts from the run's seed. Writes a checkpoint every ``checkpoint_minutes`` and at the end, evaluates every
    ``eval_every`` steps (flow only; 0: at the end of the sitting only; negative: never) and appends the sitting's row to ``log.json``.
    Returns that row.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes (or both)")
    settings = RunSettings.load(run_dir)
    folder = stage_dir(run_dir, stage)
    full_path = os.path.join(folder, "checkpoint.pt")
    portable_path = os.path.join(folder, "portable.pt")
    dataset = ToyShapesDataset(length=10**12, image_size=settings.image_size, seed=settings.seed)

    components = build_components(settings)
    if stage == "vae":
        model = components["vae"]
        batch_size = settings.vae_batch_size
        data_offset = 0
    else:
        model = components["transformer"]
        components["vae"] = load_frozen_vae(run_dir, settings)
        batch_size = settings.flow_batch_size
        data_offset = FLOW_DATA_OFFSET
    model.requires_grad_(True).train()
    optimizer = _fresh_optimizer(model)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + STAGES.index(stage) + 17)
    step, seconds_before, rewarm_from, resumed = 0, 0.0, None, "fresh"
    if os.path.exists(full_path):
        saved = torch.load(full_path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        resumed = "full"
    elif os.path.exists(portable_path):
        saved = torch.load(portable_path, weights_only=True)
        model.load_state_dict(saved["model"])
        resumed = "portable"
    ema = None
    if stage == "flow" and settings.flow_ema_decay > 0:
        from diffusers.training_utils import EMAModel

        # From the loaded weights: a checkpoint written before the average was kept starts it there.
        ema = EMAModel(model.parameters(), decay=settings.flow_ema_decay)
        if resumed != "fresh" and saved.get("ema") is not None:
            ema.load_state_dict({**saved["ema"], "shadow_params": [p.float() for p in saved["ema"]["shadow_params"]]})
    if resumed != "fresh":
        step, seconds_before = saved["step"], saved["seconds"]
        generator.set_state(saved["generator"])
        rewarm_from = saved.get("rewarm_from")
        if resumed == "portable":
            rewarm_from = step
        del saved

    pipe = None
    if stage == "flow":
        from diffusers import FluxPipeline

        pipe = FluxPipeline(**components)
        texts = text_cache(pipe, all_captions())
        latent_side = settings.image_size // pipe.vae_scale_factor
        img_ids = pipe._prepare_latent_image_ids(batch_size, latent_side // 2, latent_side // 2, "cpu", torch.float32)
        txt_ids = torch.zeros(TEXT_CONTEXT, 3)
        length_weights = torch.tensor(PADDING_WEIGHTS, dtype=torch.float)

    first_step = step
    target = step + steps if steps is not None else None
    started = time.perf_counter()
    last_checkpoint = started
    losses: list[float] = []
    evaluations = []

    def elapsed() -> float:
        return time.perf_counter() - started

    def save_checkpoint() -> None:
        atomic_torch_save(
            _checkpoint(model, optimizer, step, generator, seconds_before + elapsed(), rewarm_from, ema), full_path
        )

    while True:
        if target is not None and step >= target:
            break
        if minutes is not None and elapsed() >= minutes * 60:
            break
        lr = learning_rate(settings, stage, step, rewarm_from)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = dataset.batch(range(data_offset + step * batch_size, data_offset + (step + 1) * batch_size))
        if stage == "vae":
            pixels = batch.images * 2 - 1
            posterior = model.encode(pixels).latent_dist
            reconstruction = model.decode(posterior.sample(generator=generator)).sample
            loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        else:
            x0 = encode_latents(pipe.vae, batch.images, pipe._pack_latents)
            noise = torch.randn(x0.shape, generator=generator)
            t = flow_times(settings, step, torch.randn(batch_size, generator=generator))
            guidance = 1.0 + 4.0 * torch.rand(batch_size, generator=generator)  # no meaning here: any value works
            lengths = torch.multinomial(length_weights, batch_size, replacement=True, generator=generator).tolist()
            embeds = torch.stack([texts["embeds"][c][k] for c, k in zip(batch.captions, lengths, strict=True)])
            bias = torch.stack([texts["bias"][c][k] for c, k in zip(batch.captions, lengths, strict=True)])
            pooled = torch.stack([texts["pooled"][c] for c in batch.captions])
            noisy = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
            velocity = model(
                hidden_states=noisy,
                timestep=t,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
                joint_attention_kwargs={"attention_mask": joint_attention_bias(bias, img_ids.shape[0])},
                return_dict=False,
            )[0]
            loss = torch.nn.functional.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if ema is not None:
            ema.step(model.parameters())
        step += 1
        losses.append(loss.item())
        if verbose and (step % log_every == 0):
            recent = losses[-log_every:]
            print(
                f"{stage} step {step:6d}  loss {sum(recent) / len(recent):.5f}  lr {lr:.2e}  {elapsed():6.0f} s",
                flush=True,
            )
        if time.perf_counter() - last_checkpoint >= checkpoint_minutes * 60:
            save_checkpoint()
            last_checkpoint = time.perf_counter()
        if stage == "flow" and eval_every > 0 and step % eval_every == 0:
            evaluations += _evaluate_and_log(run_dir, pipe, settings, ema, step, eval_samples, eval_steps, verbose)
            model.train()

    save_checkpoint()
    evaluate_at_end = stage == "flow" and eval_every >= 0 and step > first_step
    if evaluate_at_end and (not evaluations or evaluations[-1]["step"] != step):
        evaluations += _evaluate_and_log(run_dir, pipe, settings, ema, step, eval_samples, eval_steps, verbose)
    tail = losses[-min(len(losses), 200) :]
    row = {
        "kind": "sitting",
        "stage": stage,
        "resumed_from": resumed,
        "start_step": first_step,
        "end_step": step,
        "seconds": round(elapsed(), 1),
        "steps_per_second": round((step - first_step) / max(elapsed(), 1e-9), 4),
        "loss_last_200": sum(tail) / len(tail) if tail else None,
        "checkpoint_bytes": file_size(full_path),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": platform.machine(),
    }
    if stage == "vae" and step > first_step:
        row["reconstruction"] = evaluate_vae(model, settings)
    if evaluations:
        row["evaluation"] = evaluations[-1]
    append_log(run_dir, row)
    if verbose:
        print(json.dumps(row, indent=2), flush=True)
    return row


def append_log(run_dir: str, row: dict) -> None:
    path = os.path.join(run_dir, "log.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    rows.append(row)
    atomic_write_text(path, json.dumps(rows, indent=2))


def write_portable(run_dir: str, stage: str = "flow", dtype: torch.dtype = torch.float32) -> str:
    """``{stage}/portable.pt`` from the full checkpoint: weights (in ``dtype``; fp32 or bf16 halves the file), step
    and generator state, no optimizer. Resuming from it is deterministic: fresh AdamW moments and a
    ``rewarm_steps`` learning-rate re-warm-up from its step."""
    folder = stage_dir(run_dir, stage)
    saved = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    saved["optimizer"] = None
    saved["model"] = {
        name: value.to(dtype) if value.is_floating_point() else value for name, value in saved["model"].items()
    }
    if saved.get("ema") is not None:
        saved["ema"]["shadow_params"] = [p.to(dtype) for p in saved["ema"]["shadow_params"]]
    path = os.path.join(folder, "portable.pt")
    atomic_torch_save(saved, path)
    return path


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_vae(vae, settings: RunSettings, count: int = 256) -> dict:
    """Oracle accuracy and MSE of reconstructions (posterior mode) of held-out images."""
    vae.eval()
    dataset = ToyShapesDataset(length=10**12, image_size=settings.image_size, seed=settings.seed + 9999)
    batch = dataset.batch(range(count))
    reconstruction = ((vae.decode(vae.encode(batch.images * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
    predicted = oracle_labels(reconstruction)
    result = {name: (predicted[name] == batch.labels[name]).float().mean().item() for name in ATTRIBUTES}
    result["mse"] = torch.nn.functional.mse_loss(reconstruction, batch.images).item()
    vae.train()
    return result


@torch.no_grad()
def evaluate_generator(
    pipe,
    image_size: int,
    samples_per_prompt: int = 4,
    steps: int = 20,
    seed: int = 1,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    batch: int = 48,
) -> dict:
    """Oracle accuracy of prompted attributes (48 fully prompted captions) and the style mix of content-only prompts.

    The evaluation set is fixed: the same prompts and noises (``seed``) at every checkpoint.
    """
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)

    def generate(prompts: list[str], offset: int) -> torch.Tensor:
        images = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            images.append(
                pipe(
                    chunk,
                    height=image_size,
                    width=image_size,
                    num_inference_steps=steps,
                    guidance_scale=3.5,
                    max_sequence_length=max_sequence_length,
                    generator=torch.Generator().manual_seed(seed * 100_003 + offset + start),
                    output_type="pt",
                ).images.float()
            )
        return torch.cat(images)

    combos = all_attribute_combinations()
    prompted = [make_caption(a) for a in combos for _ in range(samples_per_prompt)]
    predicted = oracle_labels(generate(prompted, 0))
    accuracy = {}
    for name in ATTRIBUTES:
        expected = torch.tensor(
            [ATTRIBUTE_VALUES[name].index(getattr(a, name)) for a in combos for _ in range(samples_per_prompt)]
        )
        accuracy[name] = round((predicted[name] == expected).float().mean().item(), 4)
    contents = sorted({a.content for a in combos})
    unprompted_prompts = [c for c in contents for _ in range(samples_per_prompt)]
    unprompted = oracle_labels(generate(unprompted_prompts, 50_000))
    words = [p.split() for p in unprompted_prompts]
    return {
        "prompted_accuracy": accuracy,
        "unprompted_fraction": {
            "bright": round((unprompted["lighting"] == LIGHTINGS.index("bright")).float().mean().item(), 4),
            "grainy": round((unprompted["texture"] == TEXTURES.index("grainy")).float().mean().item(), 4),
        },
        "unprompted_content_accuracy": {
            name: round(
                sum(w[position] == ATTRIBUTE_VALUES[name][int(p)] for w, p in zip(words, unprompted[name], strict=True))
                / len(words),
                4,
            )
            for name, position in (("colour", 1), ("shape", 2))
        },
        "images": {"prompted": len(prompted), "unprompted": len(unprompted_prompts)},
        "max_sequence_length": max_sequence_length,
        "sampling_steps": steps,
    }


def _evaluate_and_log(run_dir, pipe, settings, ema, step, samples, steps, verbose) -> list[dict]:
    """Evaluate the training weights, then (when kept) their moving average; one log row each."""
    rows = []
    parameters = list(pipe.transformer.parameters())
    for weights in ("raw", "ema") if ema is not None else ("raw",):
        started = time.perf_counter()
        if weights == "ema":
            ema.store(parameters)
            ema.copy_to(parameters)
        try:
            result = evaluate_generator(pipe, settings.image_size, samples_per_prompt=samples, steps=steps)
        finally:
            if weights == "ema":
                ema.restore(parameters)
        row = {"kind": "evaluation", "stage": "flow", "step": step, "weights": weights, **result}
        row["seconds"] = round(time.perf_counter() - started, 1)
        append_log(run_dir, row)
        if verbose:
            print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def flow_checkpoint_path(run_dir: str) -> str:
    """The flow stage's full checkpoint where the run has one, else its portable checkpoint."""
    path = os.path.join(run_dir, "flow", "checkpoint.pt")
    return path if os.path.exists(path) else os.path.join(run_dir, "flow", "portable.pt")


def load_run_pipeline(run_dir: str, weights: str = "ema"):
    """The run's current pipeline (fp32, eval mode): its flow checkpoint's transformer on its frozen VAE.

    ``weights``: ``"ema"`` (the moving average, where the checkpoint keeps one; else the training weights) or
    ``"raw"`` (the training weights).
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw'; got {weights!r}")
    settings = RunSettings.load(run_dir)
    components = build_components(settings)
    components["vae"] = load_frozen_vae(run_dir, settings)
    saved = torch.load(flow_checkpoint_path(run_dir), weights_only=True)
    transformer = components["transformer"]
    transformer.load_state_dict(saved["model"])
    if weights == "ema" and saved.get("ema") is not None:
        with torch.no_grad():
            for parameter, average in zip(transformer.parameters(), saved["ema"]["shadow_params"], strict=True):
                parameter.copy_(average)
    transformer.eval()
    from diffusers import FluxPipeline

    return FluxPipeline(**components)


def export_pipeline(run_dir: str, output: str, dtype: torch.dtype = torch.float16) -> int:
    """Save the run's current pipeline as an ordinary ``FluxPipeline`` folder; returns its size in bytes."""
    pipe = load_run_pipeline(run_dir)
    pipe.to(dtype).save_pretrained(output)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(output) for f in files)


def start_run(run_dir: str, settings: RunSettings) -> None:
    """Create ``run_dir`` with its ``run.json`` (an error if a different run is already there)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "run.json")
    if os.path.exists(path):

        def canonical(value: RunSettings) -> str:
            return json.dumps(dataclasses.asdict(value), sort_keys=True)

        if canonical(RunSettings.load(run_dir)) != canonical(settings):
            raise ValueError(f"{run_dir} holds a run with other settings ({path}); pick another folder")
        return
    settings.save(run_dir)


__all__ = [
    "FLOW_DATA_OFFSET",
    "PADDING_LENGTHS",
    "RunSettings",
    "STAGES",
    "STOCK_MAX_SEQUENCE_LENGTH",
    "all_captions",
    "evaluate_generator",
    "evaluate_vae",
    "flow_checkpoint_path",
    "flow_times",
    "export_pipeline",
    "freeze_vae_for_flow",
    "learning_rate",
    "load_run_pipeline",
    "start_run",
    "text_cache",
    "train_stage",
    "write_portable",
]
