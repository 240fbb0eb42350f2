"""Qwen-Image (``QwenImagePipeline``). Being written."""

from __future__ import annotations

from .base import ModelAdapter


class QwenImageAdapter(ModelAdapter):
    name = "qwen-image"
    pipeline_class_names = ("QwenImagePipeline",)
    transformer_class_names = ("QwenImageTransformer2DModel",)
