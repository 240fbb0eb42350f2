"""One adapter per model family: the only place that knows a pipeline's internals (``base.ModelAdapter``)."""

from .base import ModelAdapter, TextConditioning
from .flux import FLUX_LORA_TARGET_MODULES, FluxAdapter, FluxConditioning
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .qwen_image import QwenImageAdapter
from .sd3 import SD3Adapter

#: Every family the trainers drive, in the order the error message names them.
MODEL_ADAPTERS: tuple[type[ModelAdapter], ...] = (
    FluxAdapter,
    Flux2Adapter,
    Flux2KleinAdapter,
    QwenImageAdapter,
    SD3Adapter,
)


def get_model_adapter(pipe, negative_prompt: str | None = None) -> ModelAdapter:
    """The adapter that drives ``pipe``; a one-line error naming the supported pipelines otherwise."""
    for adapter_class in MODEL_ADAPTERS:
        if adapter_class.supports(pipe):
            return adapter_class(pipe, negative_prompt=negative_prompt)
    raise TypeError(
        f"diffusers-srpo cannot drive a {type(pipe).__name__}; supported pipelines: {supported_pipelines()}"
    )


def adapter_class_for_pipeline(class_name: str | None) -> type[ModelAdapter] | None:
    """The adapter of the pipeline class named ``class_name`` (as ``model_index.json`` names it), or ``None``."""
    return next((cls for cls in MODEL_ADAPTERS if class_name in cls.pipeline_class_names), None)


def adapter_class_for_transformer(class_name: str) -> type[ModelAdapter] | None:
    """The adapter of the family whose transformer class is named ``class_name``, or ``None``."""
    return next((cls for cls in MODEL_ADAPTERS if class_name in cls.transformer_class_names), None)


def supported_pipelines() -> str:
    """``FluxPipeline (flux), ...``: what the error messages and the README name."""
    return ", ".join(f"{name} ({cls.name})" for cls in MODEL_ADAPTERS for name in cls.pipeline_class_names)


__all__ = [
    "FLUX_LORA_TARGET_MODULES",
    "MODEL_ADAPTERS",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "FluxConditioning",
    "ModelAdapter",
    "QwenImageAdapter",
    "SD3Adapter",
    "TextConditioning",
    "adapter_class_for_pipeline",
    "adapter_class_for_transformer",
    "get_model_adapter",
    "supported_pipelines",
]
