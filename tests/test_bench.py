"""Smoke test of the benchmark: ``python -m benchmarks --quick`` runs every
part end to end and writes a complete results file.

No timing assertions (the numbers of tiny models on a shared machine mean nothing, and quick mode judges no
target); the committed results in experiments/benchmarks/ are never touched (``--out`` points into the test's
temp folder).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end tier: python -m pytest (README)

REPO = Path(__file__).resolve().parents[1]
STEP_RUNS = ("lora", "lora_control", "adalora", "flexlora", "flexlora_2x", "flexlora_4x")
CAUSAL_RUNS = ("lora", "lora_control", "adalora", "flexlora")


def _finite_positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_step_part(step: dict, runs: tuple[str, ...]) -> None:
    groups = step["setup"]["groups"]
    for name in runs:
        assert _finite_positive(step[name]["ms_per_step_median"]), name
        assert len(step[name]["ms_per_step_groups"]) == groups
        dynamic = not name.startswith("lora")
        assert step[name]["events_per_group"] == [int(dynamic)] * groups, f"{name}: events in every timed group"
        if name != "lora":
            assert _finite_positive(step[name]["ratio_vs_lora"]) and _finite_positive(step[name]["cpu_ratio_vs_lora"])


def test_bench_quick_writes_results(tmp_path):
    out = tmp_path / "results.json"
    committed = REPO / "experiments" / "benchmarks" / "results.json"
    before = committed.read_bytes() if committed.is_file() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"meta", "memory", "step_time", "causal_step_time", "allocator_cost", "llama3_event",
                            "targets"}, results["meta"].get("parts")
    assert results["meta"]["mode"] == "quick"

    step = results["step_time"]
    _check_step_part(step, STEP_RUNS)
    assert step["setup"]["max_rank"]["flexlora_4x"] == 4 * step["setup"]["rank_r0"]
    components = step["components"]
    for name in STEP_RUNS[2:]:
        assert _finite_positive(components[name]["predicted_ratio_vs_lora"]), name
        assert set(components[name]["extra_vs_lora_ms"]) == set(components["lora"]["ms"])
    causal = results["causal_step_time"]
    assert causal["setup"]["backbone"] == "tiny_llama" and causal["setup"]["task"] == "commonsense"
    _check_step_part(causal, CAUSAL_RUNS)

    cost = results["allocator_cost"]
    assert cost["setup"]["matrices"] == 72
    for key in ("flexlora_event", "adalora_scoring", "peft_scoring", "adalora_masking_step", "peft_masking_step"):
        assert _finite_positive(cost[key]["ms_median"]) and _finite_positive(cost[key]["cpu_ms_median"]), key
    for key in ("adalora_scoring", "adalora_masking_step"):
        assert _finite_positive(cost[key]["ratio_vs_peft"]), key
    assert set(cost["flexlora_event"]["breakdown_ms"]) == {"plan", "apply_event"}

    llama = results["llama3_event"]
    assert llama["setup"]["matrices"] == 5 * results["meta"]["settings"]["llama_layers"]
    assert _finite_positive(llama["event"]["ms_median"]) and _finite_positive(llama["event"]["cpu_ms_median"])
    memory_cost = llama["memory"]
    assert memory_cost["ratio_params_plus_moments"] == 2.0  # 64 slots hold twice what 32 hold
    assert memory_cost["capacity_64"]["params_plus_moments"] - llama["setup"]["allocated_params_plus_moments_bytes"] \
        == memory_cost["capacity_64"]["step_counts"], "computed bytes match the allocated tensors"

    memory = results["memory"]
    for name in ("lora", "adalora", "flexlora", "flexlora_4x"):
        for key in ("peak_rss_fit_mb", "fit_increment_mb", "training_state_mb"):
            assert _finite_positive(memory[name][key]), (name, key)
    assert memory["flexlora_4x"]["training_state_mb"] > memory["flexlora"]["training_state_mb"]

    targets = results["targets"]
    assert set(targets) == {
        "flexlora_step_vs_lora", "adalora_step_vs_lora", "flexlora_2x_step_vs_lora", "flexlora_4x_step_vs_lora",
        "smollm2_flexlora_step_vs_lora", "smollm2_adalora_step_vs_lora", "adalora_scoring_ms",
        "adalora_masking_step_ms", "flexlora_event_ms", "llama3_8b_flexlora_event_ms", "flexlora_peak_rss_vs_lora",
        "adalora_peak_rss_vs_lora",
    }
    for name, target in targets.items():
        assert _finite_positive(target["value"]) and target["pass"] is None, name  # quick mode judges nothing
    assert "PASS" not in proc.stdout and "MISS" not in proc.stdout
    assert (committed.read_bytes() if committed.is_file() else None) == before, "the committed results changed"
