"""Training top-k SAEs with the paper's recipe."""

from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer, train_sae

__all__ = ["TrainConfig", "Trainer", "train_sae"]
