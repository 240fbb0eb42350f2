"""Analytic oracles: read an image's colour, shape, lighting and texture from its pixels, with no learning.

They measure the truth of generated images independently of any reward. Each oracle maps square images
``[B, 3, S, S]`` in [0, 1] to ``LongTensor[B]`` indices into the vocabulary of its attribute
(:data:`~diffusers_srpo.toyworld.data.COLOURS` and so on). They are exact on the dataset's images and are
built on statistics that degrade gracefully on blurry, noisy generations:

- the object is where the chroma (max - min over RGB) is high, since the background is neutral grey and
  the grain keeps hues; chroma is read relative to the object's own (a high quantile of the image's), so dim
  objects count as fully as bright ones;
- colour: the hue of the chroma-weighted mean colour of the object, nearest to the palette's hues;
- shape: which shape, redrawn with the object's area and centroid, matches the object's coverage best;
- lighting: the mean brightness of the whole image;
- texture: the upper quartile of the luminance's detail at the grain's scale, on the background away
  from the object (whose outline is detail too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    COLOUR_RGB,
    COLOURS,
    LIGHTINGS,
    SHAPE_AREA,
    SHAPE_CENTROID_OFFSET,
    SHAPES,
    TEXTURES,
    default_grain_cell_size,
    shape_coverage,
)

__all__ = [
    "ORACLES",
    "oracle_accuracy",
    "oracle_labels",
    "predict_colour",
    "predict_lighting",
    "predict_shape",
    "predict_texture",
    "style_fraction",
    "object_coverage",
    "object_mask",
    "shape_errors",
    "mean_brightness",
    "grain_energy",
]

# The object covers at least 6 % of the image (the smallest triangle), so the 98th percentile of the chroma lies
# inside it, where the coverage is full.
OBJECT_CHROMA_QUANTILE = 0.98
# Relative chroma below this is read as no object at all (colour noise of generated images).
COVERAGE_FLOOR = 0.1
# How many times the background's median colour noise is also read as no object.
BACKGROUND_NOISE_MARGIN = 2.0
# Mean brightness between the darkest bright scene (about 0.47) and the brightest dark scene (about 0.33).
BRIGHT_THRESHOLD = 0.40
# Grain cells shifted towards the near end of the range (black in dark scenes, white in bright ones) barely change,
# so only about half the cells show the grain: an upper quantile of the detail sees them, the median may not.
GRAIN_QUANTILE = 0.75
# Grain energy of smooth images is 0, that of grainy ones at least about 0.04; blur and noise bring them to about
# 0.02 from either side.
GRAIN_THRESHOLD = 0.022


def _hue_degrees(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in degrees [0, 360) of colours ``[..., 3]``, as in HSV."""
    red, green, blue = rgb.unbind(-1)
    # atan2 form of the hexagonal hue: the same angles at the primaries and secondaries, smooth in between.
    return torch.rad2deg(torch.atan2(math.sqrt(3.0) * (green - blue), 2 * red - green - blue)) % 360.0


_PALETTE_HUES = _hue_degrees(torch.tensor([COLOUR_RGB[c] for c in COLOURS]))


def _check(images: torch.Tensor) -> torch.Tensor:
    if (
        not isinstance(images, torch.Tensor)
        or images.ndim != 4
        or images.shape[1] != 3
        or images.shape[2] != images.shape[3]
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape [B, 3, S, S] (square) in [0, 1]; got {shape}")
    return images.detach().float().cpu()


def _chroma(images: torch.Tensor) -> torch.Tensor:
    return images.amax(dim=1) - images.amin(dim=1)


def _object_chroma(chroma: torch.Tensor) -> torch.Tensor:
    """``[B]``: the chroma of the object's inside, a high quantile rather than the maximum to ignore specks."""
    return torch.quantile(chroma.flatten(1), OBJECT_CHROMA_QUANTILE, dim=1).clamp_min(1e-6)


def object_coverage(images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` in [0, 1]: how much of each pixel the object covers, from the pixel's chroma.

    On the dataset's images a pixel's chroma is its coverage times the object's chroma (grey background,
    hue-keeping grain), so this is the anti-aliased coverage itself, less a small floor, raised with the
    background's own colour noise, that keeps the faint colour noise of generated images out.
    """
    chroma = _chroma(_check(images))
    relative = chroma / _object_chroma(chroma).view(-1, 1, 1)
    # Most pixels are background, so the median relative chroma is the background's colour noise (0 when clean).
    floor = COVERAGE_FLOOR + BACKGROUND_NOISE_MARGIN * relative.flatten(1).median(dim=1).values
    floor = floor.clamp(max=0.5).view(-1, 1, 1)
    return ((relative - floor) / (1 - floor)).clamp(0.0, 1.0)


def object_mask(images: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, H, W]``: the pixels at least half covered by the object."""
    return object_coverage(images) >= 0.5


def predict_colour(images: torch.Tensor) -> torch.Tensor:
    """Indices into ``COLOURS``: the palette hue nearest the object's chroma-weighted mean colour."""
    images = _check(images)
    weights = _chroma(images) * object_mask(images)
    mean_rgb = (images * weights.unsqueeze(1)).sum(dim=(2, 3)) / weights.sum(dim=(1, 2)).clamp_min(1e-6).unsqueeze(1)
    difference = (_hue_degrees(mean_rgb).unsqueeze(1) - _PALETTE_HUES.unsqueeze(0)).abs()
    return torch.minimum(difference, 360.0 - difference).argmin(dim=1)


def shape_errors(images: torch.Tensor) -> torch.Tensor:
    """``[B, len(SHAPES)]``: how far the object's coverage is from each shape redrawn with its area and centroid.

    The error is the L1 distance between :func:`object_coverage` and the ideal coverage of the shape whose area
    and centroid equal the object's, over the object's area: at most 0.03 for the right shape of a dataset image,
    at least 0.17 for the others. Blur and noise add to every shape's error alike, so the ranking holds.
    """
    coverage = object_coverage(images)
    batch, size = coverage.shape[0], coverage.shape[-1]
    area = coverage.sum(dim=(1, 2)).clamp_min(1e-6)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    centroid_x = (coverage.sum(dim=1) * coords).sum(dim=1) / area
    centroid_y = (coverage.sum(dim=2) * coords).sum(dim=1) / area
    errors = []
    for index, shape in enumerate(SHAPES):
        half_extent = torch.sqrt(area / SHAPE_AREA[shape])
        centre_y = centroid_y - SHAPE_CENTROID_OFFSET[shape] * half_extent
        ideal = shape_coverage(torch.full((batch,), index), centroid_x, centre_y, half_extent, size)
        errors.append((coverage - ideal).abs().sum(dim=(1, 2)) / area)
    return torch.stack(errors, dim=1)


def predict_shape(images: torch.Tensor) -> torch.Tensor:
    """Indices into ``SHAPES``: the shape of smallest :func:`shape_errors`."""
    return shape_errors(images).argmin(dim=1)


def mean_brightness(images: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean over pixels and channels."""
    return _check(images).mean(dim=(1, 2, 3))


def predict_lighting(images: torch.Tensor) -> torch.Tensor:
    """Indices into ``LIGHTINGS`` from the mean brightness."""
    bright = mean_brightness(images) >= BRIGHT_THRESHOLD
    return torch.where(bright, LIGHTINGS.index("bright"), LIGHTINGS.index("dark"))


def grain_energy(images: torch.Tensor, grain_cell_size: int | None = None) -> torch.Tensor:
    """``[B]``: upper quartile over the background of |luminance - its local mean| in a window about a cell wide.

    The window is the odd size nearest above ``grain_cell_size`` (default: the dataset's cell for the image
    size), so every pixel of a grainy background sees several cells and differs from its local mean. Pixels whose
    window touches the object are left out: the object's outline is detail too, and saturated objects show little
    grain (where no background is left, all pixels count).
    """
    images = _check(images)
    cell = grain_cell_size or default_grain_cell_size(images.shape[-1])
    window = 2 * (cell // 2) + 1
    luminance = images.mean(dim=1, keepdim=True)
    local_mean = F.avg_pool2d(F.pad(luminance, [window // 2] * 4, mode="reflect"), window, stride=1)
    detail = (luminance - local_mean).abs().flatten(1)
    on_object = (object_coverage(images) > 0).float().unsqueeze(1)
    near_object = F.max_pool2d(on_object, window, stride=1, padding=window // 2).flatten(1) > 0
    background = detail.masked_fill(near_object, float("nan")).nanquantile(GRAIN_QUANTILE, dim=1)
    return torch.where(background.isnan(), detail.quantile(GRAIN_QUANTILE, dim=1), background)


def predict_texture(images: torch.Tensor, grain_cell_size: int | None = None) -> torch.Tensor:
    """Indices into ``TEXTURES`` from :func:`grain_energy`."""
    grainy = grain_energy(images, grain_cell_size) >= GRAIN_THRESHOLD
    return torch.where(grainy, TEXTURES.index("grainy"), TEXTURES.index("smooth"))


#: The oracle of each attribute.
ORACLES = {"colour": predict_colour, "shape": predict_shape, "lighting": predict_lighting, "texture": predict_texture}


def oracle_labels(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{attribute: LongTensor[B]}``: every oracle's prediction."""
    return {name: ORACLES[name](images) for name in ATTRIBUTES}


def oracle_accuracy(images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of images whose oracle prediction equals ``labels[attribute]``, for each attribute given."""
    return {
        name: (ORACLES[name](images) == labels[name].cpu()).float().mean().item()
        for name in ATTRIBUTES
        if name in labels
    }


def style_fraction(images: torch.Tensor, attribute: str, value: str) -> float:
    """Fraction of ``images`` that the oracle of ``attribute`` reads as ``value``, e.g. the bright fraction."""
    if attribute not in ORACLES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}; got {attribute!r}")
    if value not in ATTRIBUTE_VALUES[attribute]:
        raise ValueError(f"{attribute} must be one of {ATTRIBUTE_VALUES[attribute]}; got {value!r}")
    return (ORACLES[attribute](images) == ATTRIBUTE_VALUES[attribute].index(value)).float().mean().item()
