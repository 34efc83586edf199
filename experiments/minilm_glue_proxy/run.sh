#!/usr/bin/env bash
# The proxy study's sweep: 2 seeds x 3 tasks x 3 allocators = 18 runs on pretrained MiniLM-L6 (offline) and
# the real GLUE TSVs. One multirun per seed, the two seeds in parallel, each on 1 CPU thread (about 1.5 hours
# on this project's 2-core machine). Results: multirun/minilm_glue_proxy/s{1,2}/, then
#   python scripts/aggregate.py multirun/minilm_glue_proxy --out experiments/minilm_glue_proxy
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p multirun
export HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
for seed in ${SEEDS:-1 2}; do
  "$PY" run.py -m +experiment=minilm_glue_proxy seed="$seed" task=rte,mrpc,stsb allocator=lora,adalora,flexlora \
    hydra.sweep.dir="multirun/minilm_glue_proxy/s$seed" "$@" > "multirun/minilm_glue_proxy_s$seed.log" 2>&1 &
done
wait
