"""Adapters from model sources to analyzable modules: loading, weights, layers and branches."""
from .source import LoadedModel, add_normalization, class_name, load_model, logits_layer, parse_model_args
from .weights import apply_state_dict, check_finite, load_weights, read_state_dict, save_state_dict

__all__ = [
    "LoadedModel",
    "add_normalization",
    "apply_state_dict",
    "check_finite",
    "class_name",
    "load_model",
    "load_weights",
    "logits_layer",
    "parse_model_args",
    "read_state_dict",
    "save_state_dict",
]
