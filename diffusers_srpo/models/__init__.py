"""One adapter per model architecture: the only place that knows a pipeline's internals."""

from .flux import FLUX_LORA_TARGET_MODULES, FluxAdapter, PromptEmbeds, get_model_adapter

__all__ = ["FLUX_LORA_TARGET_MODULES", "FluxAdapter", "PromptEmbeds", "get_model_adapter"]
