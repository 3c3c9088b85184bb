"""Figures of docs/results/imagenet.md that no command draws: the kernels that carry the banding
score of each model's last depthwise layer (batch norm folded), the loudest 24 by energy."""
from __future__ import annotations

from pathlib import Path

import torch

from netanatomy.anatomy import layer_weights
from netanatomy.anatomy.plots import kernel_energy_figure
from netanatomy.models import load_model
from netanatomy.models.layers import discover_layers

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "imagenet"
LAST = {"mobilenet_v2-imagenet": "block17_depthwise", "efficientnet_lite0-imagenet": "block15_depthwise"}

for name, layer in LAST.items():
    model = load_model(f"zoo:{name}").module
    layers = discover_layers(model)
    w = layer_weights(model, layers, layer, fold_bn=True).weights[:, 0]          # [U, kh, kw]
    centred = w - w.mean(dim=(1, 2), keepdim=True)
    energy = centred.pow(2).sum(dim=(1, 2))
    order = torch.argsort(energy, descending=True)[:24]
    share = (energy[order] / energy.sum()).tolist()
    top = float(energy[order[:16]].sum() / energy.sum())
    fig = kernel_energy_figure(w[order], {"units": order.tolist(), "share": share},
                               title=f"zoo:{name} {layer}: the 24 kernels with most energy (of {w.shape[0]})",
                               subtitle=f"label: unit, share of the layer's sum of squares, the kernel's own H and V; "
                                        f"the top 16 hold {100 * top:.0f}% of the energy")
    path = OUT / f"{name}-{layer}-loudest.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    print(path, f"top 16 energy share {top:.3f}")
