"""Train the toy world's generator: a FLUX-architecture pipeline that really draws the toy world's concepts.

Three stages, seeded, on a CPU:

1. the VAE (``AutoencoderKL``, FLUX's 16 latent channels) learns to reconstruct toy images; its
   ``scaling_factor`` and ``shift_factor`` are then set from the latent statistics, as FLUX's are;
2. the text encoders (a CLIP text model with the real CLIP BPE vocabulary and a small T5) stay as built
   from their seeds: frozen random encoders still give every caption its own embedding, which is all the
   transformer needs to learn from;
3. the ``FluxTransformer2DModel`` (guidance-embedded, 2x2 packing) learns rectified flow on the VAE latents
   of captioned toy images: ``x_t = t * eps + (1 - t) * x0``, target ``eps - x0``.

The result is an ordinary ``FluxPipeline`` folder, saved in fp16. The shipped one took two runs, the second
continuing the first with a cosine decay on fresh data:

    python benchmarks/toyworld/train_generator.py --output stage1
    python benchmarks/toyworld/train_generator.py --init-from stage1 --vae-steps 0 --flow-steps 9000 \
        --flow-lr 5e-4 --cosine --data-offset 1000000 --output diffusers_srpo/toyworld/weights/pipeline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from diffusers_srpo.testing import tiny_flux_components
from diffusers_srpo.toyworld.data import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    LIGHTINGS,
    TEXTURES,
    ToyShapesDataset,
    all_attribute_combinations,
    make_caption,
)
from diffusers_srpo.toyworld.generator import GENERATOR_CONFIG, IMAGE_SIZE, MAX_SEQUENCE_LENGTH
from diffusers_srpo.toyworld.oracles import oracle_labels
from diffusers_srpo.toyworld.staged_training import all_captions, encode_latents


def train_vae(vae, dataset, steps: int, batch_size: int, lr: float, log_every: int) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        images = dataset.batch(range(step * batch_size, (step + 1) * batch_size)).images
        pixels = images * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # A light KL keeps the latent space smooth enough for the flow model without blurring the grain.
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"vae step {step:5d}  loss {loss.item():.5f}  {time.perf_counter() - start:6.0f} s", flush=True)
    vae.eval()


@torch.no_grad()
def set_latent_statistics(vae, dataset, offset: int) -> None:
    """FLUX-style ``shift_factor`` / ``scaling_factor``: the scaled latents have mean 0 and unit variance."""
    images = dataset.batch(range(offset, offset + 2048)).images
    latents = vae.encode(images * 2 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


def train_transformer(pipe, dataset, text, steps, batch_size, lr, log_every, offset, cosine=False):
    transformer = pipe.transformer
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    def schedule(step: int) -> float:  # linear warm-up, then constant or a cosine decay to zero
        warm_up = min(1.0, (step + 1) / 200)
        return warm_up * (0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    latent_size = IMAGE_SIZE // pipe.vae_scale_factor
    img_ids = pipe._prepare_latent_image_ids(batch_size, latent_size // 2, latent_size // 2, "cpu", torch.float32)
    generator = torch.Generator().manual_seed(1234)
    start = time.perf_counter()
    for step in range(steps):
        batch = dataset.batch(range(offset + step * batch_size, offset + (step + 1) * batch_size))
        x0 = encode_latents(pipe.vae, batch.images, pipe._pack_latents)
        noise = torch.randn(x0.shape, generator=generator)
        # Logit-normal times, as in SD3 / FLUX training: most weight on the middle of the trajectory.
        t = torch.sigmoid(torch.randn(batch_size, generator=generator))
        noisy = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
        embeds = torch.cat([text[c][0] for c in batch.captions])
        pooled = torch.cat([text[c][1] for c in batch.captions])
        guidance = 1.0 + 4.0 * torch.rand(batch_size, generator=generator)  # no meaning here: any value works
        velocity = transformer(
            hidden_states=noisy,
            timestep=t,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text["__ids__"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"flow step {step:5d}  loss {loss.item():.5f}  {time.perf_counter() - start:6.0f} s", flush=True)
    transformer.eval()


@torch.no_grad()
def evaluate(pipe, samples_per_prompt: int, steps: int, seed: int) -> dict:
    """Oracle accuracy of prompted attributes, and the style mix when style words are left out."""
    contents = sorted({a.content for a in all_attribute_combinations()})
    results = {}

    def generate(prompts):
        return pipe(
            prompts,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images

    correct = {name: 0 for name in ATTRIBUTES}
    total = 0
    for attributes in all_attribute_combinations():
        prompt = make_caption(attributes)
        images = generate([prompt] * samples_per_prompt)
        predicted = oracle_labels(images)
        for name in ATTRIBUTES:
            expected = ATTRIBUTE_VALUES[name].index(getattr(attributes, name))
            correct[name] += int((predicted[name] == expected).sum())
        total += samples_per_prompt
    results["prompted_accuracy"] = {name: correct[name] / total for name in ATTRIBUTES}

    unprompted = generate([c for c in contents for _ in range(samples_per_prompt)])
    predicted = oracle_labels(unprompted)
    results["unprompted_fraction"] = {
        "bright": (predicted["lighting"] == LIGHTINGS.index("bright")).float().mean().item(),
        "grainy": (predicted["texture"] == TEXTURES.index("grainy")).float().mean().item(),
    }
    expected_content = [c.split() for c in contents for _ in range(samples_per_prompt)]  # "a red circle"
    results["unprompted_content_accuracy"] = {
        name: sum(
            words[position] == ATTRIBUTE_VALUES[name][int(label)]
            for words, label in zip(expected_content, predicted[name], strict=True)
        )
        / len(expected_content)
        for name, position in (("colour", 1), ("shape", 2))
    }
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Folder of the saved FluxPipeline (fp16 safetensors).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model initialisation and the data.")
    parser.add_argument("--vae-steps", type=int, default=1000, help="VAE updates.")
    parser.add_argument("--flow-steps", type=int, default=8000, help="Transformer updates.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per update.")
    parser.add_argument("--vae-lr", type=float, default=1e-3, help="VAE learning rate.")
    parser.add_argument("--flow-lr", type=float, default=1e-3, help="Transformer learning rate.")
    parser.add_argument("--eval-samples", type=int, default=8, help="Generated images per prompt in the evaluation.")
    parser.add_argument("--eval-steps", type=int, default=20, help="Sampling steps in the evaluation.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument(
        "--init-from", help="Continue from a saved toy pipeline folder (its VAE is kept: pass --vae-steps 0)."
    )
    parser.add_argument("--data-offset", type=int, default=0, help="First dataset index of the flow updates.")
    parser.add_argument("--cosine", action="store_true", help="Cosine decay of the flow learning rate to zero.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from diffusers import FluxPipeline

    started = time.perf_counter()
    if args.init_from:
        pipe = FluxPipeline.from_pretrained(args.init_from, torch_dtype=torch.float32)
    else:
        pipe = FluxPipeline(**tiny_flux_components(seed=args.seed, config=GENERATOR_CONFIG))
    dataset = ToyShapesDataset(length=10**9, image_size=IMAGE_SIZE, seed=args.seed)

    vae_offset = args.vae_steps * args.batch_size
    if args.vae_steps:
        train_vae(pipe.vae, dataset, args.vae_steps, args.batch_size, args.vae_lr, log_every=250)
        set_latent_statistics(pipe.vae, dataset, vae_offset)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.text_encoder_2.requires_grad_(False)

    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            all_captions(), prompt_2=None, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    text = {caption: (prompt_embeds[i : i + 1], pooled[i : i + 1]) for i, caption in enumerate(all_captions())}
    text["__ids__"] = text_ids
    train_transformer(
        pipe,
        dataset,
        text,
        args.flow_steps,
        args.batch_size,
        args.flow_lr,
        log_every=250,
        offset=args.data_offset or vae_offset + 2048,
        cosine=args.cosine,
    )
    training_seconds = time.perf_counter() - started

    metrics = evaluate(pipe, args.eval_samples, args.eval_steps, seed=args.seed + 1)
    metrics["training_seconds"] = training_seconds
    metrics["args"] = vars(args)
    print(json.dumps(metrics, indent=2))

    pipe.to(torch.float16).save_pretrained(args.output)
    with open(os.path.join(args.output, "training_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.output) for f in files)
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
