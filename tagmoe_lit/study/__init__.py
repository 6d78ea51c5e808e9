"""The ablation study: does task-aware gating pay off? (`python -m tagmoe_lit study`, `make study`).

`preset.py` reads a preset (variants × seeds under one budget), `runner.py` trains and tests each
run resumably, `paired.py` compares variants sample by sample, `report.py` writes docs/results.md.
"""

from tagmoe_lit.study.paired import Paired, mean_std, paired
from tagmoe_lit.study.preset import Preset, PresetError, Run

__all__ = ["Paired", "Preset", "PresetError", "Run", "mean_std", "paired"]
