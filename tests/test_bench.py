"""Smoke test of the benchmark script: ``scripts/bench.py --quick`` runs and writes a complete results file.

No timing assertions (the numbers of a tiny model on a shared machine mean nothing); the committed results
in experiments/benchmarks/ are never touched (``--out`` points into the test's temp folder).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("lora", "adalora", "flexlora")


def _finite_positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_bench_quick_writes_results(tmp_path):
    out = tmp_path / "results.json"
    committed = REPO / "experiments" / "benchmarks" / "results.json"
    before = committed.read_bytes() if committed.is_file() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) >= {"meta", "step_time", "allocator_cost", "memory", "targets"}
    assert results["meta"]["mode"] == "quick"

    step = results["step_time"]
    for m in (*METHODS, "lora_control"):
        assert _finite_positive(step[m]["ms_per_step_median"])
        assert len(step[m]["ms_per_step_groups"]) == step["setup"]["groups"]
    for m in ("lora_control", "adalora", "flexlora"):
        assert _finite_positive(step[m]["ratio_vs_lora"]) and _finite_positive(step[m]["cpu_ratio_vs_lora"])
    for m in ("adalora", "flexlora"):
        assert step[m]["events_per_group"] == [1] * step["setup"]["groups"], "one event in every timed group"
    for m in ("lora", "lora_control"):
        assert step[m]["events_per_group"] == [0] * step["setup"]["groups"]

    components = step["components"]
    for m in ("adalora", "flexlora"):
        assert _finite_positive(components[m]["predicted_ratio_vs_lora"])
        assert set(components[m]["extra_vs_lora_ms"]) == set(components["lora"]["ms"])

    cost = results["allocator_cost"]
    assert cost["setup"]["matrices"] == 72
    for key in ("flexlora_event", "adalora_scoring", "peft_scoring", "adalora_masking_step", "peft_masking_step"):
        assert _finite_positive(cost[key]["ms_median"]), key
    for key in ("adalora_scoring", "adalora_masking_step"):
        assert _finite_positive(cost[key]["ratio_vs_peft"]), key
    assert set(cost["flexlora_event"]["breakdown_ms"]) == {"plan", "apply", "surgery"}

    memory = results["memory"]
    for m in METHODS:
        for key in ("peak_rss_fit_mb", "fit_increment_mb", "training_state_mb"):
            assert _finite_positive(memory[m][key]), (m, key)
    for m in ("adalora", "flexlora"):
        for key in ("peak_rss_fit_vs_lora", "fit_increment_vs_lora", "training_state_vs_lora"):
            assert _finite_positive(memory[m][key]), (m, key)

    targets = results["targets"]
    assert set(targets) == {
        "flexlora_step_vs_lora", "adalora_step_vs_lora", "adalora_scoring_ms", "adalora_masking_step_ms",
        "flexlora_event_ms", "flexlora_peak_rss_vs_lora", "adalora_peak_rss_vs_lora",
    }
    for name, target in targets.items():
        assert _finite_positive(target["value"]) and isinstance(target["pass"], bool), name
    assert (committed.read_bytes() if committed.is_file() else None) == before, "the committed results changed"
