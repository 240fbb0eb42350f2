"""FLUX.2 (``Flux2Pipeline``, ``Flux2KleinPipeline``). Being written."""

from __future__ import annotations

from .base import ModelAdapter


class Flux2Adapter(ModelAdapter):
    name = "flux2"
    pipeline_class_names = ("Flux2Pipeline",)
    transformer_class_names = ("Flux2Transformer2DModel",)
