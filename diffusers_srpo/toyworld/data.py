"""The toy world's data: one coloured shape on a grey background, with a lighting and a texture style.

Every image shows one shape (:data:`SHAPES`) in one colour (:data:`COLOURS`), of random size and position,
under one lighting (:data:`LIGHTINGS`) and with one texture (:data:`TEXTURES`). Captions always name the
content ("a red circle") and name each style word only with some probability ("dark, grainy. a red circle",
"bright. a red circle"), so a generator trained on them and asked for the content alone draws a mix of styles,
which alignment can then move.

Images are rendered on the fly with vectorised torch ops from a matrix of uniform random numbers, one row per
image; the row of item ``index`` of :class:`ToyShapesDataset` comes from numpy's generator seeded by
``(seed, index)``, so an item is the same whether it is read alone or in a batch, in any order.

How the pixels encode the attributes (what :mod:`diffusers_srpo.toyworld.oracles` reads back):

- colour: the object's hue; the background is neutral grey and the grain changes no pixel's hue;
- shape: axis-aligned square, disc, or upright isosceles triangle, whose bounding boxes they fill to
  1, pi / 4 and 1 / 2; edges are anti-aliased (pixel coverage from a signed distance);
- lighting: bright scenes have a light background and a full-strength object, dark scenes a dark background
  and a dimmed object;
- texture: grainy images are cut into square cells of :func:`default_grain_cell_size` pixels (4 at 32x32, coarse
  enough for a small VAE to keep), each shifted towards black or white by a random amount, the same on the three
  channels (strong on the grey background, weaker on saturated objects, whose chroma and hue it keeps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_VALUES",
    "COLOURS",
    "COLOUR_RGB",
    "LIGHTINGS",
    "SHAPES",
    "SHAPE_AREA",
    "SHAPE_CENTROID_OFFSET",
    "STYLE_ATTRIBUTES",
    "TEXTURES",
    "ToyAttributes",
    "ToyBatch",
    "ToySample",
    "ToyShapesDataset",
    "all_attribute_combinations",
    "collate_samples",
    "content_prompt",
    "default_grain_cell_size",
    "labels_from_attributes",
    "make_caption",
    "render_images",
    "shape_coverage",
    "style_prompt",
]

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
LIGHTINGS = ("bright", "dark")
TEXTURES = ("smooth", "grainy")

#: The four attributes of an image, in the order used everywhere, with their vocabularies.
ATTRIBUTES = ("colour", "shape", "lighting", "texture")
ATTRIBUTE_VALUES = {"colour": COLOURS, "shape": SHAPES, "lighting": LIGHTINGS, "texture": TEXTURES}
#: The attributes that captions may leave out, and that alignment acts on.
STYLE_ATTRIBUTES = ("lighting", "texture")

#: Saturated RGB of each colour at full strength; far apart in hue (about 0, 120, 227 and 55 degrees).
COLOUR_RGB = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.75, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.92, 0.85, 0.10),
}

#: Area of each shape over its half extent squared, and how far below the box's centre its centroid lies (over
#: the half extent): what the shape oracle needs to redraw a shape from an object's area and centroid.
SHAPE_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
SHAPE_CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}

# Half the object's width (radius, half side), as a fraction of the image side: objects 12 to 19 px wide at 32x32.
HALF_EXTENT_RANGE = (0.18, 0.30)
# Pixels kept free between the object and the image border, so that the whole shape is always visible.
BORDER_MARGIN = 1.0
# Grey level of the background and strength multiplier of the object colour, per lighting. The ranges are far
# apart, so the mean brightness of an image says its lighting whatever the object's colour and size.
BACKGROUND_RANGE = {"bright": (0.60, 0.80), "dark": (0.08, 0.20)}
OBJECT_GAIN_RANGE = {"bright": (0.85, 1.0), "dark": (0.35, 0.50)}
# How far a grain cell shifts its pixels towards black or white, at most and at least, as a fraction of the way.
GRAIN_STRENGTH = 0.35
GRAIN_MIN_AMOUNT = 0.35

# Columns of the per-image uniform random numbers; the grain cells follow.
_U_SHAPE, _U_COLOUR, _U_LIGHTING, _U_TEXTURE = 0, 1, 2, 3
_U_CENTRE_X, _U_CENTRE_Y, _U_HALF_EXTENT = 4, 5, 6
_U_BACKGROUND, _U_GAIN = 7, 8
_U_SHOW_LIGHTING, _U_SHOW_TEXTURE = 9, 10
_NUM_SCENE_UNIFORMS = 11
_LABEL_COLUMNS = {"colour": _U_COLOUR, "shape": _U_SHAPE, "lighting": _U_LIGHTING, "texture": _U_TEXTURE}
_SHOW_COLUMNS = {"lighting": _U_SHOW_LIGHTING, "texture": _U_SHOW_TEXTURE}


@dataclass(frozen=True)
class ToyAttributes:
    """What one image shows: values from :data:`COLOURS`, :data:`SHAPES`, :data:`LIGHTINGS`, :data:`TEXTURES`."""

    colour: str
    shape: str
    lighting: str
    texture: str

    def __post_init__(self):
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value not in ATTRIBUTE_VALUES[name]:
                raise ValueError(f"{name} must be one of {ATTRIBUTE_VALUES[name]}; got {value!r}")

    @property
    def content(self) -> str:
        """The content prompt, e.g. ``"a red circle"``."""
        return content_prompt(self.colour, self.shape)


@dataclass
class ToySample:
    """One item of :class:`ToyShapesDataset`: an image ``[3, H, W]`` in [0, 1], its attributes and caption."""

    image: torch.Tensor
    attributes: ToyAttributes
    caption: str


@dataclass
class ToyBatch:
    """A batch of images ``[B, 3, H, W]`` in [0, 1] with their labels and captions.

    ``labels[name]`` is a ``LongTensor[B]`` of indices into ``ATTRIBUTE_VALUES[name]``. ``caption_labels[name]``
    is the same, except ``-1`` where the caption leaves that attribute out (only style attributes are left out).
    """

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    caption_labels: dict[str, torch.Tensor]
    captions: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def attributes(self) -> list[ToyAttributes]:
        """The attributes of each image, as :class:`ToyAttributes`."""
        return attributes_from_labels(self.labels)


def content_prompt(colour: str, shape: str) -> str:
    """``"a {colour} {shape}"``: the caption's content, always present."""
    return f"a {colour} {shape}"


def style_prompt(words: str | Sequence[str], prompt: str) -> str:
    """``"{words}. {prompt}"`` with the words joined by ``", "``: SRP's ``"{word}. {prompt}"`` for one word."""
    words = [words] if isinstance(words, str) else list(words)
    return f"{', '.join(words)}. {prompt}" if words else prompt


def make_caption(attributes: ToyAttributes, show_lighting: bool = True, show_texture: bool = True) -> str:
    """The caption of an image: ``"dark, grainy. a red circle"``, without the style words not shown."""
    words = [attributes.lighting] if show_lighting else []
    words += [attributes.texture] if show_texture else []
    return style_prompt(words, attributes.content)


def all_attribute_combinations() -> list[ToyAttributes]:
    """The 48 combinations of colour, shape, lighting and texture."""
    return [
        ToyAttributes(colour, shape, lighting, texture)
        for colour in COLOURS
        for shape in SHAPES
        for lighting in LIGHTINGS
        for texture in TEXTURES
    ]


def labels_from_attributes(attributes: Sequence[ToyAttributes]) -> dict[str, torch.Tensor]:
    """``{name: LongTensor[B]}`` of indices into ``ATTRIBUTE_VALUES[name]``."""
    return {
        name: torch.tensor([ATTRIBUTE_VALUES[name].index(getattr(a, name)) for a in attributes], dtype=torch.long)
        for name in ATTRIBUTES
    }


def attributes_from_labels(labels: dict[str, torch.Tensor]) -> list[ToyAttributes]:
    """The inverse of :func:`labels_from_attributes`."""
    columns = {name: labels[name].tolist() for name in ATTRIBUTES}
    count = len(columns[ATTRIBUTES[0]])
    return [
        ToyAttributes(**{name: ATTRIBUTE_VALUES[name][columns[name][i]] for name in ATTRIBUTES}) for i in range(count)
    ]


def default_grain_cell_size(image_size: int) -> int:
    """Side in pixels of a grain cell: an eighth of the image, at least 2 (4 px at 32x32)."""
    return max(2, image_size // 8)


def _num_uniforms(image_size: int, grain_cell_size: int) -> int:
    cells = math.ceil(image_size / grain_cell_size)
    return _NUM_SCENE_UNIFORMS + cells * cells


def _labels_from_uniforms(uniforms: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        name: (uniforms[:, column] * len(ATTRIBUTE_VALUES[name])).long().clamp(max=len(ATTRIBUTE_VALUES[name]) - 1)
        for name, column in _LABEL_COLUMNS.items()
    }


def _lerp_by_label(uniform: torch.Tensor, labels: torch.Tensor, ranges: dict, values: Sequence[str]) -> torch.Tensor:
    low = torch.tensor([ranges[v][0] for v in values])[labels]
    high = torch.tensor([ranges[v][1] for v in values])[labels]
    return low + (high - low) * uniform


def shape_coverage(
    shape: torch.Tensor, centre_x: torch.Tensor, centre_y: torch.Tensor, half_extent: torch.Tensor, image_size: int
) -> torch.Tensor:
    """Anti-aliased coverage ``[B, S, S]`` in [0, 1] of shapes drawn with the dataset's geometry.

    ``shape`` holds indices into ``SHAPES``; centres (of the bounding box) and half extents (radius, half side,
    half base) are in pixels, ``[B]`` each. A pixel's coverage is 1/2 plus its centre's signed distance to the
    outline, clamped: exact for straight edges, close for the disc.
    """
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
    dx = coords.view(1, 1, -1) - centre_x.float().view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - centre_y.float().view(-1, 1, 1)
    h = half_extent.float().view(-1, 1, 1)
    circle = h - torch.sqrt(dx * dx + dy * dy)
    square = torch.minimum(h - dx.abs(), h - dy.abs())
    # Upright isosceles triangle: apex at (0, -h), base from (-h, h) to (h, h); distances along inward normals.
    to_apex_y = dy + h
    left = (2 * dx + to_apex_y) / math.sqrt(5.0)
    right = (-2 * dx + to_apex_y) / math.sqrt(5.0)
    triangle = torch.minimum(torch.minimum(left, right), h - dy)
    index = shape.view(-1, 1, 1)
    distance = torch.where(
        index == SHAPES.index("circle"), circle, torch.where(index == SHAPES.index("square"), square, triangle)
    )
    return (distance + 0.5).clamp(0.0, 1.0)


def _render(
    uniforms: torch.Tensor, labels: dict[str, torch.Tensor], image_size: int, grain_cell_size: int
) -> torch.Tensor:
    """Images ``[B, 3, S, S]`` from per-image uniforms ``[B, K]`` and the labels they show."""
    batch = uniforms.shape[0]
    size = float(image_size)
    half_extent = size * (
        HALF_EXTENT_RANGE[0] + (HALF_EXTENT_RANGE[1] - HALF_EXTENT_RANGE[0]) * uniforms[:, _U_HALF_EXTENT]
    )
    free = size - 2 * (half_extent + BORDER_MARGIN)
    centre_x = half_extent + BORDER_MARGIN + free * uniforms[:, _U_CENTRE_X]
    centre_y = half_extent + BORDER_MARGIN + free * uniforms[:, _U_CENTRE_Y]
    coverage = shape_coverage(labels["shape"], centre_x, centre_y, half_extent, image_size).unsqueeze(1)

    background = _lerp_by_label(uniforms[:, _U_BACKGROUND], labels["lighting"], BACKGROUND_RANGE, LIGHTINGS)
    gain = _lerp_by_label(uniforms[:, _U_GAIN], labels["lighting"], OBJECT_GAIN_RANGE, LIGHTINGS)
    colour = torch.tensor([COLOUR_RGB[c] for c in COLOURS])[labels["colour"]] * gain.unsqueeze(1)
    images = background.view(batch, 1, 1, 1) * (1 - coverage) + colour.view(batch, 3, 1, 1) * coverage

    cells = math.ceil(image_size / grain_cell_size)
    signed = uniforms[:, _NUM_SCENE_UNIFORMS:].view(batch, 1, cells, cells) * 2 - 1
    # Every cell moves by at least GRAIN_MIN_AMOUNT of the way, so that no grainy image is nearly smooth.
    grain = signed.sign() * (GRAIN_MIN_AMOUNT + (1 - GRAIN_MIN_AMOUNT) * signed.abs())
    grain = grain * (labels["texture"] == TEXTURES.index("grainy")).float().view(batch, 1, 1, 1)
    grain = grain.repeat_interleave(grain_cell_size, dim=2).repeat_interleave(grain_cell_size, dim=3)
    grain = GRAIN_STRENGTH * grain[:, :, :image_size, :image_size]
    # The same shift on the three channels keeps every pixel's chroma and hue; scaled by the room left below the
    # darkest channel or above the brightest one, it never clips.
    lowest, highest = images.amin(dim=1, keepdim=True), images.amax(dim=1, keepdim=True)
    images = images + torch.where(grain < 0, grain * lowest, grain * (1 - highest))
    return images.clamp(0.0, 1.0).contiguous()


def _captions(uniforms: torch.Tensor, labels: dict[str, torch.Tensor], style_word_probability: float):
    shown = {name: uniforms[:, column] < style_word_probability for name, column in _SHOW_COLUMNS.items()}
    caption_labels = {
        name: torch.where(shown[name], labels[name], -1) if name in shown else labels[name].clone()
        for name in ATTRIBUTES
    }
    captions = [
        make_caption(a, show_lighting=bool(lit), show_texture=bool(tex))
        for a, lit, tex in zip(
            attributes_from_labels(labels), shown["lighting"].tolist(), shown["texture"].tolist(), strict=True
        )
    ]
    return caption_labels, captions


def render_images(
    attributes: Sequence[ToyAttributes] | dict[str, torch.Tensor],
    image_size: int = 32,
    generator: torch.Generator | None = None,
    grain_cell_size: int | None = None,
) -> torch.Tensor:
    """Render images ``[B, 3, S, S]`` in [0, 1] of given attributes, with random size, position and grain.

    ``attributes`` is a list of :class:`ToyAttributes` or a ``{name: LongTensor[B]}`` label dict. The
    randomness is drawn from ``generator`` (the global one when ``None``).
    """
    labels = attributes if isinstance(attributes, dict) else labels_from_attributes(attributes)
    cell = grain_cell_size or default_grain_cell_size(image_size)
    batch = labels[ATTRIBUTES[0]].shape[0]
    uniforms = torch.rand(batch, _num_uniforms(image_size, cell), generator=generator)
    return _render(uniforms, {name: labels[name].long() for name in ATTRIBUTES}, image_size, cell)


class ToyShapesDataset(torch.utils.data.Dataset):
    """Captioned toy images generated on the fly; item ``i`` is a pure function of ``(seed, i)``.

    Args:
        length: number of items (any size: nothing is stored).
        image_size: side of the square images in pixels.
        seed: the dataset's seed, a non-negative integer.
        style_word_probability: probability that a caption names the lighting, and independently the texture.
        grain_cell_size: side of a grain cell in pixels; :func:`default_grain_cell_size` when ``None``.

    Attributes are drawn uniformly and independently, so all 48 combinations are equally likely.
    ``dataset[i]`` gives a :class:`ToySample`; :meth:`batch` renders many items at once (the fast path, identical
    items); for a ``DataLoader`` pass ``collate_fn=collate_samples``.
    """

    def __init__(
        self,
        length: int = 100_000,
        image_size: int = 32,
        seed: int = 0,
        style_word_probability: float = 0.5,
        grain_cell_size: int | None = None,
    ):
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed}")
        if not 0.0 <= style_word_probability <= 1.0:
            raise ValueError(f"style_word_probability must be in [0, 1]; got {style_word_probability}")
        self.length = length
        self.image_size = image_size
        self.seed = seed
        self.style_word_probability = style_word_probability
        self.grain_cell_size = grain_cell_size or default_grain_cell_size(image_size)
        self._num_uniforms = _num_uniforms(image_size, self.grain_cell_size)

    def __len__(self) -> int:
        return self.length

    def _uniforms(self, indices: Sequence[int]) -> torch.Tensor:
        rows = []
        for index in indices:
            if not 0 <= index < self.length:
                raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
            # torch's CPU generator keeps only 32 bits of its seed, so (seed, index) pairs would collide;
            # numpy's SeedSequence turns each distinct pair into an independent stream.
            rows.append(np.random.default_rng([self.seed, index]).random(self._num_uniforms, dtype=np.float32))
        return torch.from_numpy(np.stack(rows))

    def batch(self, indices: Sequence[int]) -> ToyBatch:
        """Items ``indices`` rendered together: the same images, labels and captions as one by one."""
        indices = [int(i) for i in indices]
        uniforms = self._uniforms(indices)
        labels = _labels_from_uniforms(uniforms)
        images = _render(uniforms, labels, self.image_size, self.grain_cell_size)
        caption_labels, captions = _captions(uniforms, labels, self.style_word_probability)
        return ToyBatch(images=images, labels=labels, caption_labels=caption_labels, captions=captions)

    def __getitem__(self, index: int) -> ToySample:
        if index < 0:
            index += self.length
        batch = self.batch([index])
        return ToySample(image=batch.images[0], attributes=batch.attributes[0], caption=batch.captions[0])


def collate_samples(samples: Sequence[ToySample]) -> ToyBatch:
    """Collate :class:`ToySample` items into a :class:`ToyBatch` (a ``DataLoader``'s ``collate_fn``).

    Samples carry no record of which style words their caption shows, so ``caption_labels`` are read back
    from the captions' style words.
    """
    attributes = [s.attributes for s in samples]
    labels = labels_from_attributes(attributes)
    caption_labels = {name: labels[name].clone() for name in ATTRIBUTES}
    shown = [_caption_style_words(s.caption) for s in samples]
    for name in STYLE_ATTRIBUTES:
        caption_labels[name] = torch.where(
            torch.tensor([getattr(a, name) in words for a, words in zip(attributes, shown, strict=True)]),
            labels[name],
            -1,
        )
    return ToyBatch(
        images=torch.stack([s.image for s in samples]),
        labels=labels,
        caption_labels=caption_labels,
        captions=[s.caption for s in samples],
    )


def _caption_style_words(caption: str) -> set[str]:
    if ". " not in caption:
        return set()
    return {word.strip() for word in caption.split(". ", 1)[0].split(",")}
