"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``). Being written."""

from __future__ import annotations

from .base import ModelAdapter


class SD3Adapter(ModelAdapter):
    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    transformer_class_names = ("SD3Transformer2DModel",)
