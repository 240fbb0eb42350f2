"""What ``evaluate`` shows: the tables of ``summary.md`` and the labelled ``grid.png``."""

from __future__ import annotations

import textwrap

# The grid's tiles are this tall whatever the image size (nearest-neighbour upscaled, so the toy world's 32-pixel
# images stay crisp), with a band for the variant names on top and one for the prompts on the left.
GRID_TILE_HEIGHT = 256
GRID_PADDING = 4
GRID_LABEL_HEIGHT = 28
GRID_LABEL_WIDTH = 240
# More rows than this make a PNG too large to look at; summary.md says when the grid leaves prompts out.
GRID_MAX_PROMPTS = 64


def _with_interval(stats: dict, number: str = ".4f") -> str:
    low, high = stats["ci95"]
    return f"{stats['mean']:{number}} [{low:{number}}, {high:{number}}]"


def summary_markdown(summary: dict, grid_prompts: int) -> str:
    """The tables of ``summary.md``: rewards (with the LoRAs against the base) and, on the toy world, the oracles."""
    seeds = summary["seeds"]
    lines = [
        f"# Evaluation of {summary['model']}",
        "",
        f"{summary['prompts']} prompts x {len(seeds)} seeds ({', '.join(map(str, seeds))}) = "
        f"{summary['images_per_variant']} images per variant. Intervals: 95%, percentile bootstrap over prompts "
        f"({summary['bootstrap']['resamples']} resamples, seed {summary['bootstrap']['seed']}). Win rate: the fraction "
        "of (prompt, seed) pairs where the LoRA scores higher than the base from the same noise.",
        "",
        "| reward | variant | mean [95% CI] | win rate vs base [95% CI] | mean difference vs base [95% CI] |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in summary["rewards"]:
        for name, variant in summary["variants"].items():
            stats = variant["scores"][spec]
            against = stats.get("against_base")
            versus = ""
            if against:
                wins = {"mean": against["win_rate"], "ci95": against["win_rate_ci95"]}
                difference = {"mean": against["mean_difference"], "ci95": against["mean_difference_ci95"]}
                versus = f"{_with_interval(wins, '.2f')} | {_with_interval(difference, '+.4f')}"
            lines.append(f"| {spec} | {name} | {_with_interval(stats)} | {versus or ' | '} |")
    oracles = {name: variant["oracles"] for name, variant in summary["variants"].items() if "oracles" in variant}
    if oracles:
        metrics = list(next(iter(oracles.values())))
        headers = [m.removeprefix("oracle_").replace("_", " ") for m in metrics]
        lines += [
            "",
            "## Toy-world oracles (what the pixels show; the reward never sees them)",
            "",
            f"| variant | {' | '.join(headers)} |",
            f"| --- |{' --- |' * len(metrics)}",
        ]
        for name, numbers in oracles.items():
            lines.append(f"| {name} | {' | '.join(_with_interval(numbers[m], '.2f') for m in metrics)} |")
    left_out = summary["prompts"] - grid_prompts
    lines += ["", f"grid.png: one row per prompt, one column per variant, seed {seeds[0]}."]
    if left_out:
        lines[-1] += f" It shows the first {grid_prompts} prompts ({left_out} left out)."
    return "\n".join(lines) + "\n"


def grid_tile_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of a grid tile for images of ``image_size`` (width, height)."""
    width, height = image_size
    return max(1, round(width * GRID_TILE_HEIGHT / height)), GRID_TILE_HEIGHT


def grid_cell_box(row: int, column: int, tile_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of cell (``row``, ``column``) in ``grid.png``."""
    width, height = tile_size
    left = GRID_LABEL_WIDTH + GRID_PADDING + column * (width + GRID_PADDING)
    top = GRID_LABEL_HEIGHT + GRID_PADDING + row * (height + GRID_PADDING)
    return left, top, left + width, top + height


def save_labelled_grid(path: str, image_paths: list[list[str]], row_labels: list[str], column_labels: list[str]):
    """Images ``image_paths[row][column]`` as tiles of :func:`grid_tile_size`, variant names on top, prompts left."""
    from PIL import Image, ImageDraw, ImageFont

    with Image.open(image_paths[0][0]) as first:
        tile = grid_tile_size(first.size)
    right, bottom = grid_cell_box(len(row_labels) - 1, len(column_labels) - 1, tile)[2:]
    canvas = Image.new("RGB", (right + GRID_PADDING, bottom + GRID_PADDING), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    for column, label in enumerate(column_labels):
        left, _, right, _ = grid_cell_box(0, column, tile)
        draw.text(((left + right) / 2, GRID_LABEL_HEIGHT / 2), label, fill="black", font=font, anchor="mm")
    for row, (paths, label) in enumerate(zip(image_paths, row_labels, strict=True)):
        top = grid_cell_box(row, 0, tile)[1]
        wrapped = textwrap.wrap(label, width=30, max_lines=GRID_TILE_HEIGHT // 18, placeholder=" ...")
        draw.multiline_text((GRID_PADDING, top), "\n".join(wrapped), fill="black", font=font)
        for column, image_path in enumerate(paths):
            with Image.open(image_path) as image:
                upscaling = tile[1] >= image.height
                resized = image.convert("RGB").resize(tile, Image.NEAREST if upscaling else Image.LANCZOS)
            canvas.paste(resized, grid_cell_box(row, column, tile)[:2])
    canvas.save(path)
