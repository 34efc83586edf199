#!/usr/bin/env bash
# The proxy study's sweep: 2 seeds x 3 tasks x 3 allocators = 18 runs, one after another, on 1 CPU thread
# (about 2.5 hours on this project's 2-core machine). Results: multirun/minilm_glue_proxy/, then
#   python scripts/aggregate.py multirun/minilm_glue_proxy --out experiments/minilm_glue_proxy
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
"$PY" run.py -m +experiment=minilm_glue_proxy seed=1,2 task=rte,mrpc,stsb allocator=lora,adalora,flexlora \
  hydra.sweep.dir=multirun/minilm_glue_proxy "$@"
