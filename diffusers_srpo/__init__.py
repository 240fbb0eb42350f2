"""diffusers-srpo: align text-to-image flow models (FLUX.1-dev first) with human preference.

Direct-Align + Semantic Relative Preference (SRPO, Shen et al. 2025) and TailorPO
(Ren et al. 2025) as drop-in classes for Hugging Face diffusers.
"""

__version__ = "0.1.0.dev0"

from . import ops
from .quantization import QUANTIZE_CHOICES, quantization_config  # first of what imports diffusers' pipelines
from .rewards import (
    AestheticReward,
    CallableReward,
    CLIPReward,
    HPSv2Reward,
    PickScoreReward,
    SemanticRelativeReward,
    load_reward,
)
from .scheduling_direct_align import DirectAlignScheduler, DirectAlignSigmas
from .trainers import (
    METHODS,
    DRaFTConfig,
    DRaFTTrainer,
    GRPOConfig,
    GRPOTrainer,
    NonFiniteUpdatesError,
    ReFLConfig,
    ReFLTrainer,
    SRPOConfig,
    SRPOTrainer,
    TailorPOConfig,
    TailorPOTrainer,
    TrainingInterrupted,
    TrainingStopped,
    trainer_class_for,
)

__all__ = [
    "AestheticReward",
    "CLIPReward",
    "CallableReward",
    "DRaFTConfig",
    "DRaFTTrainer",
    "DirectAlignScheduler",
    "DirectAlignSigmas",
    "GRPOConfig",
    "GRPOTrainer",
    "HPSv2Reward",
    "METHODS",
    "NonFiniteUpdatesError",
    "PickScoreReward",
    "QUANTIZE_CHOICES",
    "ReFLConfig",
    "ReFLTrainer",
    "SRPOConfig",
    "SRPOTrainer",
    "SemanticRelativeReward",
    "TailorPOConfig",
    "TailorPOTrainer",
    "TrainingInterrupted",
    "TrainingStopped",
    "__version__",
    "load_reward",
    "ops",
    "quantization_config",
    "trainer_class_for",
]
