"""``diffusers-srpo evaluate``: a base model and its LoRAs, rendered from the same noise and scored by several rewards,
with bootstrap intervals over prompts and each LoRA's win rate against the base.

What the output folder ``D`` holds:

- ``images/<variant>/<prompt index>-<seed>.png``: every image of every variant (``base``, then one per LoRA);
- ``scores.jsonl``: one line per (variant, prompt, seed) with every reward's score of that image (and, on the toy
  world, what the oracles read from it);
- ``summary.json`` and ``summary.md``: for each variant and reward the mean and its 95% interval; for each LoRA its
  win rate against the base (the fraction of (prompt, seed) pairs where it scores higher) and the mean paired
  difference, each with its interval;
- ``grid.png``: one row per prompt, one column per variant (the first seed's images), labelled;
- ``evaluation.json``: what decides the images (the model, the prompts, the sampler settings, each variant's LoRA).
  A rerun with the same ones resumes: the images and scores already there are kept, the missing ones made.

Every file is written under a temporary name and renamed into place (:mod:`diffusers_srpo.atomic`), so a kill leaves
each one whole or absent; ``scores.jsonl`` is rewritten every :data:`~.run.SCORES_SAVE_SECONDS` while scoring and
after each reward.

Noise: image (prompt ``i``, seed ``s``) starts from the noise of ``torch.Generator().manual_seed(image_seed(s, i))``
in every variant, so variants differ only by their weights; the noise of different prompts is independent, which the
bootstrap over prompts assumes.

Intervals: percentile bootstrap over prompts (:data:`BOOTSTRAP_RESAMPLES` resamples of the prompt indices with a
fixed seed; a drawn prompt brings all its seeds), the same resamples for every statistic over the same prompts, so
a LoRA's numbers and the base's are paired.

Toy world: when ``--model`` is the shipped toy-world pipeline folder (``toyworld.generator.PIPELINE_DIR``, compared
as real paths, so a copy elsewhere is an ordinary FLUX model) and the images are square, the analytic oracles also
read every image: the fraction of each style value (bright, dark, smooth, grainy) and, for prompts that name one
colour (shape), the fraction whose colour (shape) is the named one: the truth next to the reward.
"""

from .report import GRID_MAX_PROMPTS, grid_cell_box, grid_tile_size, save_labelled_grid, summary_markdown
from .run import BASE, OUTPUT_NAMES, Evaluation, Variant, image_seed, is_toy_world_model, variants_for
from .statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, mean_with_interval

__all__ = [
    "BASE",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "GRID_MAX_PROMPTS",
    "OUTPUT_NAMES",
    "Evaluation",
    "Variant",
    "grid_cell_box",
    "grid_tile_size",
    "image_seed",
    "is_toy_world_model",
    "mean_with_interval",
    "save_labelled_grid",
    "summary_markdown",
    "variants_for",
]
