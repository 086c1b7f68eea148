"""Training top-k SAEs with the paper's recipe."""

from saelab.train.config import TrainConfig
from saelab.utils.lazy import lazy_names

# The trainer imports torch when first used: saelab.train.config (the parser's settings) is read without it.
lazy_names(__name__, {"saelab.train.trainer": ("Trainer", "TrainingRun", "train_many", "train_sae")})

__all__ = ["TrainConfig", "Trainer", "TrainingRun", "train_many", "train_sae"]
