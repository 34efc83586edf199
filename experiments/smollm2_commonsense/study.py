"""The SmolLM2-135M commonsense study on CPU: the untuned floor, then LoRA / AdaLoRA / FlexLoRA, two seeds.

    python experiments/smollm2_commonsense/study.py run     # start one per core: each claims the next free run
    python experiments/smollm2_commonsense/study.py report

Every run is the framework's own train() with +experiment=smollm2_commonsense (loglik protocol, 300 items per
set on the 7 local sets), written under multirun/smollm2_commonsense/<arm>/s<seed>/ (ignored by git); the floor
is the same evaluation of the untrained model (trainer.max_steps=0: LoRA's B = 0, so the model is the base one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = REPO / "multirun" / "smollm2_commonsense"
sys.path.insert(0, str(REPO))

from flexlora.studies import claim  # noqa: E402

# Learning rates transferred from the MiniLM proxy's selection on held-out training data (the median over its
# three tasks of each method's chosen grid value: experiments/minilm_glue_proxy/lr_selection.md), never from the
# commonsense test sets: the SVD-form methods need a larger lr than LoRA at the same alpha / r0 (their update
# starts at lambda = 0 with small P, Q), so one shared lr would confound the comparison.
LR = {"lora": 1e-3, "adalora": 8e-3, "flexlora": 4e-3}
JOBS = [("floor", 1, ["allocator=lora", "trainer.max_steps=0"])] + [
    (method, seed, [f"allocator={method}", f"model.optimizer.lr={LR[method]}"])
    for seed in (1, 2) for method in ("lora", "adalora", "flexlora")
]


def run() -> None:
    from flexlora.conf_store import compose
    from flexlora.train import train

    for arm, seed, overrides in JOBS:
        out = RUNS / arm / f"s{seed}"
        if (out / "metrics.json").is_file() or not claim(out):
            continue
        train(compose("+experiment=smollm2_commonsense", "trainer.enable_progress_bar=false", f"seed={seed}",
                             *overrides, output_dir=out))
        print(f"done {arm} s{seed}", flush=True)


def report() -> None:
    from flexlora.aggregate.cli import main as aggregate

    aggregate([str(RUNS / "floor"), str(RUNS / "lora"), str(RUNS / "adalora"), str(RUNS / "flexlora"),
               "--rows", "allocator.name,trainer.max_steps", "--out", str(HERE)])
    for a, b in (("flexlora", "adalora"), ("flexlora", "lora"), ("adalora", "lora")):
        aggregate([str(RUNS / a), str(RUNS / b), "--compare", f"{a},{b}", "--out", str(HERE / f"compare_{a}_{b}")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("run", "report"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase == "report":
        report()
    else:
        run()


if __name__ == "__main__":
    main()
