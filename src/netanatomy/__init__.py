"""netanatomy: find, measure and show the large-scale structure of neural networks.

Layers of the package (see docs/architecture.md):
- `netanatomy.core`: pure functions on tensors and arrays (statistics, NMF, banding, SVD,
  graphs, clustering). Knows nothing of models or files.
- `netanatomy.models`, `netanatomy.capture`, `netanatomy.data`, `netanatomy.training`:
  adapters that turn models and data sets into tensors.
- `netanatomy.cli`: thin shells.
"""
__version__ = "0.1.0"
