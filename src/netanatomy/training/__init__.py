"""Training: the recipe behind `netanatomy train`, the labs and the bundled models."""
from .loop import TrainConfig, TrainResult, default_batch_size, evaluate, train

__all__ = ["TrainConfig", "TrainResult", "default_batch_size", "evaluate", "train"]
