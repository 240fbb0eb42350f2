"""Tiny, offline, seeded stand-ins for every supported pipeline and for the rewards.

Everything here is built from configs in memory: no file or network access beyond the
CLIP BPE vocabulary that ships inside ``open_clip``. The components are the real diffusers,
transformers and open_clip classes, so every code path of the library runs unchanged on them.
Sizes are parameters: the defaults are for unit tests, larger values give FLUX-shaped models
for CPU benchmarks. ``TINY_PIPELINES`` maps each supported family to its tiny builder.
"""

from __future__ import annotations

from .components import clip_bpe_vocab_path, tiny_clip_tokenizer, tiny_t5_tokenizer
from .flux import (
    FLUX_DEV_SCHEDULER_CONFIG,
    FLUX_DEV_TRANSFORMER_CONFIG,
    FLUX_DEV_VAE_CONFIG,
    TinyFluxConfig,
    flux_dev_shaped_pipeline,
    tiny_flux_components,
    tiny_flux_pipeline,
)
from .flux2 import (
    FLUX2_DEV_SCHEDULER_CONFIG,
    FLUX2_DEV_TRANSFORMER_CONFIG,
    FLUX2_VAE_CONFIG,
    TinyFlux2Config,
    flux2_dev_shaped_pipeline,
    tiny_flux2_components,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
)
from .qwen_image import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QWEN_IMAGE_TRANSFORMER_CONFIG,
    QWEN_IMAGE_VAE_CONFIG,
    TinyQwenImageConfig,
    qwen_image_shaped_pipeline,
    tiny_qwen_image_components,
    tiny_qwen_image_pipeline,
)
from .rewards import (
    HPS_ARCHITECTURE,
    TinyCLIPConfig,
    hps_shaped_reward,
    save_aesthetic_mlp,
    save_hps_checkpoint,
    save_open_clip_local_dir,
    save_transformers_clip_dir,
    tiny_aesthetic_mlp,
    tiny_clip_reward,
    tiny_open_clip_model,
    tiny_transformers_clip_model,
)
from .sd3 import (
    SD3_SCHEDULER_CONFIG,
    SD3_VAE_CONFIG,
    SD35_LARGE_TRANSFORMER_CONFIG,
    TinySD3Config,
    sd35_shaped_pipeline,
    tiny_sd3_components,
    tiny_sd3_pipeline,
)

#: Each supported family's tiny pipeline builder, by the family's adapter name (``models.MODEL_ADAPTERS``).
TINY_PIPELINES = {
    "flux": tiny_flux_pipeline,
    "flux2": tiny_flux2_pipeline,
    "flux2-klein": tiny_flux2_klein_pipeline,
    "qwen-image": tiny_qwen_image_pipeline,
    "sd3": tiny_sd3_pipeline,
}

__all__ = [
    "TINY_PIPELINES",
    "FLUX2_DEV_SCHEDULER_CONFIG",
    "FLUX2_DEV_TRANSFORMER_CONFIG",
    "FLUX2_VAE_CONFIG",
    "TinyFlux2Config",
    "flux2_dev_shaped_pipeline",
    "tiny_flux2_components",
    "tiny_flux2_klein_pipeline",
    "tiny_flux2_pipeline",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "QWEN_IMAGE_TRANSFORMER_CONFIG",
    "QWEN_IMAGE_VAE_CONFIG",
    "TinyQwenImageConfig",
    "qwen_image_shaped_pipeline",
    "tiny_qwen_image_components",
    "tiny_qwen_image_pipeline",
    "SD3_SCHEDULER_CONFIG",
    "SD3_VAE_CONFIG",
    "SD35_LARGE_TRANSFORMER_CONFIG",
    "TinySD3Config",
    "sd35_shaped_pipeline",
    "tiny_sd3_components",
    "tiny_sd3_pipeline",
    "FLUX_DEV_SCHEDULER_CONFIG",
    "FLUX_DEV_TRANSFORMER_CONFIG",
    "FLUX_DEV_VAE_CONFIG",
    "HPS_ARCHITECTURE",
    "flux_dev_shaped_pipeline",
    "hps_shaped_reward",
    "TinyFluxConfig",
    "TinyCLIPConfig",
    "clip_bpe_vocab_path",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "tiny_flux_components",
    "tiny_flux_pipeline",
    "tiny_open_clip_model",
    "save_open_clip_local_dir",
    "tiny_clip_reward",
    "tiny_trainer_config",
    "tiny_transformers_clip_model",
    "save_transformers_clip_dir",
    "save_hps_checkpoint",
    "tiny_aesthetic_mlp",
    "save_aesthetic_mlp",
]


def tiny_trainer_config(method: str, output_dir: str, **overrides):
    """The config of ``method``'s trainer for :func:`tiny_flux_pipeline` at 32x32: 2 fp32 updates of a rank-4 LoRA
    at lr 1e-3, 4 rollout steps, no checkpoint or validation; ``overrides`` set any field."""
    from diffusers_srpo.trainers import trainer_class_for

    values = dict(
        method=method,
        output_dir=str(output_dir),
        seed=0,
        max_train_steps=2,
        resolution=32,
        rollout_steps=4,
        max_sequence_length=16,
        mixed_precision="no",
        learning_rate=1e-3,
        max_grad_norm=1.0,
        lora_rank=4,
        lora_alpha=4.0,
        checkpointing_steps=0,
        validation_steps=0,
    )
    values.update(overrides)
    return trainer_class_for(method).config_class(**values)
