"""Trainers: a shared base (accelerate, LoRA, checkpoints, outputs) and one file per method."""

from .base import BaseTrainer, StepOutput
from .config import DRaFTConfig, GRPOConfig, ReFLConfig, RewardLossConfig, SRPOConfig, TailorPOConfig, TrainerConfig
from .draft import DRaFTTrainer
from .grpo import GRPOTrainer
from .refl import ReFLTrainer
from .srpo import SRPOTrainer
from .stopping import NonFiniteUpdatesError, TrainingInterrupted, TrainingStopped
from .tailorpo import TailorPOTrainer

#: Every training method by name: the trainer that runs it (its config class is ``trainer.config_class``).
METHODS: dict[str, type[BaseTrainer]] = {
    method: trainer
    for trainer in (SRPOTrainer, ReFLTrainer, DRaFTTrainer, TailorPOTrainer, GRPOTrainer)
    for method in trainer.config_class.methods
}


def trainer_class_for(method: str) -> type[BaseTrainer]:
    """The trainer class of a method name (``"srpo"``, ``"refl"``, ``"tailorpo-g"``, ...)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return METHODS[method]


__all__ = [
    "METHODS",
    "BaseTrainer",
    "DRaFTConfig",
    "DRaFTTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "NonFiniteUpdatesError",
    "ReFLConfig",
    "ReFLTrainer",
    "RewardLossConfig",
    "SRPOConfig",
    "SRPOTrainer",
    "StepOutput",
    "TailorPOConfig",
    "TailorPOTrainer",
    "TrainerConfig",
    "TrainingInterrupted",
    "TrainingStopped",
    "trainer_class_for",
]
