"""Train the toy world's CLIP-like reward on the synthetic captioned images, on the CPU, and save it.

    python benchmarks/toyworld/train_reward.py            # writes diffusers_srpo/toyworld/weights/reward/

Every step draws a fresh batch of the dataset (seeded, so a run is reproducible on one machine and thread
count) and takes one AdamW step on CLIP's symmetric InfoNCE loss between the images and the batch's distinct
captions. The captions name the content always and each style word half the time, so several captions can be
true of one image: "a red circle" of every red circle, "dark. a red circle" of every dark one. Those pairs are
positives too: an image's target is spread evenly over the captions true of it, a caption's over the images it
is true of (CLIP's one-hot targets when every caption fits one image only). Wrong style words ("dark." under a
bright image) are negatives, and that is what teaches the reward Semantic Relative Preference's
"{word}. {prompt}" contrasts.

A light blur or pixel noise on some training images keeps the reward sensible on generated images, which are
never as crisp as the renders. At the end the weights are written in fp16 as an open_clip local folder and
reloaded through ``CLIPReward.from_pretrained`` for the final zero-shot evaluation on fresh images.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torchvision.transforms.v2 import functional as TF

from diffusers_srpo.rewards import CLIPReward, clip_preprocess
from diffusers_srpo.testing import save_open_clip_local_dir
from diffusers_srpo.toyworld.data import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    COLOURS,
    SHAPES,
    ToyAttributes,
    ToyBatch,
    ToyShapesDataset,
    content_prompt,
    render_images,
)
from diffusers_srpo.toyworld.reward import (
    REWARD_CLIP_CONFIG,
    REWARD_WEIGHTS_DIR,
    load_reward,
    srp_difference,
    zero_shot_accuracy,
)

# Dataset seeds: training batches and the held-out evaluation images never share a seed.
EVAL_SEED_OFFSET = 1_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=REWARD_WEIGHTS_DIR, help="where the open_clip folder is written")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps, one fresh batch each")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warm-up, cosine decay)")
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=0.05, help="on matrices only")
    parser.add_argument("--augment_probability", type=float, default=0.3, help="share of images blurred or noised")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on the shared 2-core machine two threads ran this model's small matmuls 10 to 100x slower than one
    # (each waits for the other to be scheduled).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval_every", type=int, default=250, help="steps between zero-shot evaluations")
    parser.add_argument("--eval_size", type=int, default=1024, help="held-out images per evaluation")
    return parser.parse_args(argv)


def distinct_captions(batch: ToyBatch) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The batch's distinct captions and their caption labels (``-1`` where a caption leaves an attribute out)."""
    first = {}
    for i, caption in enumerate(batch.captions):
        first.setdefault(caption, i)
    rows = torch.tensor(list(first.values()))
    return list(first), {name: batch.caption_labels[name][rows] for name in ATTRIBUTES}


def consistency(labels: dict[str, torch.Tensor], caption_labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[images, captions]`` bool: whether each caption is true of each image (every attribute it names matches)."""
    fits = torch.ones(len(labels[ATTRIBUTES[0]]), len(caption_labels[ATTRIBUTES[0]]), dtype=torch.bool)
    for name in ATTRIBUTES:
        named = caption_labels[name].view(1, -1)
        fits &= (named == -1) | (named == labels[name].view(-1, 1))
    return fits


def encode_text_prefix(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed on the tokens up to the longest caption's end of text only.

    The text tower is causal and pools at the end-of-text token, so the padding after it changes nothing; the
    captions are about 10 of the 77 tokens, and skipping the rest makes the text tower several times cheaper.
    """
    length = int((tokens != 0).sum(dim=1).max())
    x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens[:, :length], model.text_pool_type, eos_token_id=model.text_eos_id)
    return x @ model.text_projection


def augment(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Blur (sigma 0.3 to 0.8 px) a share of the images and add pixel noise (std up to 0.02) to another."""
    batch = images.shape[0]
    choice = torch.rand(batch, generator=generator)
    blurred = TF.gaussian_blur(images, [5, 5], [0.3 + 0.5 * torch.rand(1, generator=generator).item()] * 2)
    noise = 0.02 * torch.rand(batch, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    images = torch.where((choice < probability / 2).view(-1, 1, 1, 1), blurred, images)
    images = torch.where(
        ((choice >= probability / 2) & (choice < probability)).view(-1, 1, 1, 1), images + noise, images
    )
    return images.clamp(0.0, 1.0)


def contrastive_loss(image_embeds, text_embeds, logit_scale, fits) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over images x distinct captions, every consistent pair a positive.

    Each image's target is spread evenly over the captions true of it, each caption's over the images it is
    true of.
    """
    logits = logit_scale * image_embeds @ text_embeds.T
    image_targets = fits.float() / fits.sum(dim=1, keepdim=True)
    text_targets = fits.T.float() / fits.T.sum(dim=1, keepdim=True)  # every caption is true of its own image
    return (F.cross_entropy(logits, image_targets) + F.cross_entropy(logits.T, text_targets)) / 2


def learning_rate(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate(model, tokenizer, images, labels) -> dict[str, float]:
    """Zero-shot accuracy of a copy of the model in training, through the same ``CLIPReward`` wrapper."""
    return zero_shot_accuracy(CLIPReward(copy.deepcopy(model), tokenizer), images, labels)


def report(reward, seed: int, size: int = 4096) -> None:
    """Print the reloaded reward's numbers (those of RESULTS.md) on images it never saw."""
    fresh = ToyShapesDataset(length=size, seed=seed).batch(range(size))
    generator = torch.Generator().manual_seed(seed)
    blurred = TF.gaussian_blur(fresh.images, [5, 5], [0.8, 0.8])
    degraded = (blurred + 0.02 * torch.randn(blurred.shape, generator=generator)).clamp(0, 1)
    print(f"reloaded with CLIPReward.from_pretrained; zero-shot accuracy on {size} fresh images:")
    for name, images in (("real", fresh.images), ("blur 0.8 px + noise 0.02", degraded)):
        accuracy = zero_shot_accuracy(reward, images, fresh.labels)
        print(f"  {name:26s}" + "  ".join(f"{attribute} {value:.4f}" for attribute, value in accuracy.items()))

    # SRP's direction: pairs of images that differ in one style only (same seed: same geometry and grain).
    contents = [(colour, shape) for colour in COLOURS for shape in SHAPES] * (size // 48)
    prompts = [content_prompt(colour, shape) for colour, shape in contents]
    print("SRP difference <f_img, f_txt('{positive}. p') - f_txt('{negative}. p')>, share of the right sign:")
    for attribute, positive, negative, other in (
        ("lighting", "bright", "dark", "texture"),
        ("texture", "grainy", "smooth", "lighting"),
    ):
        shares = []
        for value in (positive, negative):
            attributes = [
                ToyAttributes(colour, shape, **{attribute: value, other: ATTRIBUTE_VALUES[other][i % 2]})
                for i, (colour, shape) in enumerate(contents)
            ]
            images = render_images(attributes, generator=torch.Generator().manual_seed(seed))
            difference = srp_difference(reward, images, prompts, positive, negative)
            right = difference > 0 if value == positive else difference < 0
            shares.append(f"{value} images {right.float().mean().item():.4f} (mean {difference.mean().item():+.3f})")
        print(f"  {positive} vs {negative}: " + ", ".join(shares))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    model = open_clip.CLIP(**REWARD_CLIP_CONFIG.open_clip_model_cfg())
    model.train()
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    train_data = ToyShapesDataset(length=args.steps * args.batch_size, seed=args.seed)
    eval_batch = ToyShapesDataset(length=args.eval_size, seed=args.seed + EVAL_SEED_OFFSET).batch(range(args.eval_size))
    augment_generator = torch.Generator().manual_seed(args.seed)
    tokens: dict[str, torch.Tensor] = {}  # the captions repeat: 108 distinct ones
    image_size = REWARD_CLIP_CONFIG.image_size
    check = tokenizer(["dark, grainy. a yellow triangle", "a red circle"])
    assert torch.allclose(encode_text_prefix(model, check), model.encode_text(check), atol=1e-5)

    parameters = sum(p.numel() for p in model.parameters())
    print(f"reward: open_clip CLIP {parameters / 1e6:.2f}M parameters, {args.steps} steps of {args.batch_size}")
    start = time.perf_counter()
    for step in range(args.steps):
        batch = train_data.batch(range(step * args.batch_size, (step + 1) * args.batch_size))
        captions, caption_labels = distinct_captions(batch)
        for caption in captions:
            if caption not in tokens:
                tokens[caption] = tokenizer([caption])[0]
        pixels = clip_preprocess(augment(batch.images, args.augment_probability, augment_generator), image_size)
        image_embeds = F.normalize(model.encode_image(pixels), dim=-1)
        text_embeds = F.normalize(encode_text_prefix(model, torch.stack([tokens[c] for c in captions])), dim=-1)
        fits = consistency(batch.labels, caption_labels)
        loss = contrastive_loss(image_embeds, text_embeds, model.logit_scale.exp(), fits)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            accuracy = evaluate(model, tokenizer, eval_batch.images, eval_batch.labels)
            elapsed = time.perf_counter() - start
            shown = " ".join(f"{name} {value:.3f}" for name, value in accuracy.items())
            print(
                f"step {step + 1:5d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():5.1f}  "
                f"zero-shot {shown}  {elapsed:6.0f} s",
                flush=True,
            )
    training_seconds = time.perf_counter() - start

    model.eval()
    save_open_clip_local_dir(model.half(), args.output_dir, REWARD_CLIP_CONFIG)
    weights = os.path.join(args.output_dir, "open_clip_model.safetensors")
    os.chmod(weights, 0o644)  # safetensors writes it owner-only; it ships in the package, readable by every user
    print(f"trained in {training_seconds:.0f} s; wrote {weights} ({os.path.getsize(weights) / 2**20:.2f} MiB, fp16)")

    report(load_reward(args.output_dir), args.seed + 2 * EVAL_SEED_OFFSET)


if __name__ == "__main__":
    main()
