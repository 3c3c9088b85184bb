"""Weight anatomy of a model: the core weight methods applied to its layers.

Extraction of layer weights (linear layers on a map reshaped to [units, C, h, w], batch norm
folding), the wiring between layers, expanded weights through the linearized model, and
model-level pictures, banding, SVD and rotation families.
"""
from .banding import model_banding
from .equivariance import layer_rotation_families
from .expanded import ExpandedWeights, Linearized, expanded_weights, top_connections
from .family_plots import family_figure
from .graph import INPUT, feeding_layer, linear_input_map
from .pictures import LayerPictures, layer_pictures
from .svd import SVDReport, layer_svd
from .weights import LayerWeights, fold_batchnorm, layer_weights, linear_as_map

__all__ = [
    "INPUT",
    "ExpandedWeights",
    "LayerPictures",
    "LayerWeights",
    "Linearized",
    "SVDReport",
    "expanded_weights",
    "family_figure",
    "feeding_layer",
    "fold_batchnorm",
    "layer_pictures",
    "layer_rotation_families",
    "layer_svd",
    "layer_weights",
    "linear_as_map",
    "linear_input_map",
    "model_banding",
    "top_connections",
]
