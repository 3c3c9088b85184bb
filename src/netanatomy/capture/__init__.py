"""Activation capture: hooks that hand over layer values, and streaming per-unit statistics."""
from .activations import LayerStats, UnitStats, accumulator_bytes, capture_activations
from .hooks import LayerRecorder, StopForward, layer_values, recording

__all__ = [
    "LayerRecorder",
    "LayerStats",
    "StopForward",
    "UnitStats",
    "accumulator_bytes",
    "capture_activations",
    "layer_values",
    "recording",
]
