"""Trainers: a shared base (accelerate, LoRA, checkpoints, outputs) and one file per method."""

from .base import BaseTrainer, StepOutput
from .config import SRPOConfig, TrainerConfig
from .srpo import SRPOTrainer

__all__ = ["BaseTrainer", "SRPOConfig", "SRPOTrainer", "StepOutput", "TrainerConfig"]
