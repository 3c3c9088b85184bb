"""Feature visualization (Lucid's recipe, batched) and dataset examples: how a unit is shown."""
from .objectives import Objective, channel, custom, direction, diversity, parse_objective, unit, units
from .param import ImageParam, image_param
from .render import Rendering, objective_values, render
from .transforms import NO_TRANSFORMS, TransformConfig, apply_transforms, draw_params

__all__ = [
    "NO_TRANSFORMS",
    "ImageParam",
    "Objective",
    "Rendering",
    "TransformConfig",
    "apply_transforms",
    "channel",
    "custom",
    "direction",
    "diversity",
    "draw_params",
    "image_param",
    "objective_values",
    "parse_objective",
    "render",
    "unit",
    "units",
]
