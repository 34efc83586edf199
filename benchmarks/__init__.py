"""The project's benchmark: what AdaLoRA and FlexLoRA cost over static LoRA, measured side by side.

Run from the checkout (the package is not installed with ``flexlora``)::

    python -m benchmarks                          # full mode, writes experiments/benchmarks/results.json
    python -m benchmarks --quick                  # tiny backbones and shapes, ~1 minute, a temp file
    python -m benchmarks --parts step,llama --out /tmp/bench.json

Every timing figure is a ratio of two things measured in ONE process, interleaved, reduced by medians:
run-to-run drift on a shared machine is ~10 %, so only same-process interleaved ratios mean anything.
The method, the parts and the last results: experiments/benchmarks/README.md.

Importing the package pins the thread counts and offline flags before torch is imported (timings are
single-threaded by design, and nothing may reach the network).
"""

from __future__ import annotations

import os
from pathlib import Path

for _key, _value in {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "benchmarks" / "results.json"
