"""Training top-k SAEs with the paper's recipe."""

from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer, TrainingRun, train_many, train_sae

__all__ = ["TrainConfig", "Trainer", "TrainingRun", "train_many", "train_sae"]
