"""Training: the recipe behind `netanatomy train`, the labs and the bundled models."""
from .loop import TrainConfig, TrainResult, evaluate, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]
