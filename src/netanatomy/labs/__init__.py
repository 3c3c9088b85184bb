"""Labs: published experiments re-run end to end, resumable, with a results table beside the
paper's numbers. `netanatomy lab NAME` runs them from the command line.

- `specialization`: Filan et al.'s clusterability and Hod et al.'s importance and coherence
  on the Fashion-MNIST MLP (`run_specialization`).
- `stages`: the resumable-stage machinery every lab uses (`run_stage`).
"""
from .stages import StageResult, run_stage, settings_key

__all__ = ["StageResult", "run_stage", "settings_key"]
