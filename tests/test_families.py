"""Every task family end to end through train(): metrics.json keys, predictions.jsonl, official metric values."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, matthews_corrcoef

from flexlora.train import train
from tests.conftest import shared_data
from tests.helpers import compose_config

SHARED = shared_data() or Path("/nonexistent")


def run(tmp_path: Path, *overrides: str) -> tuple[dict, list[dict]]:
    run_dir = tmp_path / "run"
    train(compose_config("debug=tiny", *overrides, output_dir=run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert metrics["predictions"] == "predictions.jsonl"
    return metrics, rows


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9


@pytest.mark.parametrize("task, folder", [("cola", "CoLA"), ("stsb", "STS-B"), ("mrpc", "MRPC")])
def test_reported_glue_metrics_equal_sklearn_and_scipy_on_the_runs_own_predictions(tmp_path, real_glue_dir, task,
                                                                                    folder):
    metrics, rows = run(tmp_path, f"task={task}", f"task.data_dir={real_glue_dir / folder}",
                        "task.max_eval_samples=200", "trainer.max_steps=12")
    final = metrics["final"]
    assert [r["idx"] for r in rows] == list(range(200)) and {r["split"] for r in rows} == {"val"}
    y, p = [r["label"] for r in rows], [r["prediction"] for r in rows]
    constant = len(set(p)) == 1
    near_constant = task == "stsb" and statistics.pstdev(p) < 1e-3 * statistics.pstdev(y)  # regression only
    assert metrics["degenerate"] == {"val": constant or near_constant}
    assert metrics["degenerate_check"] == "constant-or-near-constant"  # the rule a study's record checks against
    if task == "cola":
        assert same(final["val/mcc"], matthews_corrcoef(y, p))  # 0.0 for constant predictions, never 0.0256
        assert same(final["val/accuracy"], accuracy_score(y, p))
    elif task == "stsb":
        for key, fn in (("val/pearson", pearsonr), ("val/spearman", spearmanr)):
            assert same(final[key], math.nan if constant else float(fn(p, y)[0]))
    else:
        assert same(final["val/accuracy"], accuracy_score(y, p))
    assert all(len(r["score"]) == 2 for r in rows) if task != "stsb" else all("score" not in r for r in rows)


def test_commonsense_family_on_tiny_llama(tmp_path):
    metrics, rows = run(tmp_path, "backbone=tiny_llama", "task=commonsense", f"task.data_dir={SHARED / 'commonsense'}",
                        "task.eval_sets=[boolq,piqa]", "task.max_eval_samples=12", "task.max_train_samples=48",
                        "task.cutoff_len=96", "trainer.max_steps=10")
    final = metrics["final"]
    assert set(final) == {"boolq/accuracy", "piqa/accuracy", "avg/accuracy"}
    assert final["avg/accuracy"] == pytest.approx((final["boolq/accuracy"] + final["piqa/accuracy"]) / 2)
    for split in ("boolq", "piqa"):
        mine = [r for r in rows if r["split"] == split]
        assert len(mine) == 12 and all(r["prediction"] in ("true", "false", "solution1", "solution2") for r in mine)
        assert final[f"{split}/accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in mine) / 12)
        assert all(len(r["score"]) == 2 for r in mine)  # one log-likelihood per candidate
    assert metrics["events"] > 0 and metrics["optimized_metric"] == "avg/accuracy"
    assert metrics["degenerate_check"] == "constant-per-answer-format"


def test_commonsense_generate_protocol_and_missing_set(tmp_path):
    _, rows = run(tmp_path, "backbone=tiny_llama", "task=commonsense", f"task.data_dir={SHARED / 'commonsense'}",
                  "task.eval_sets=[boolq]", "task.eval_protocol=generate", "task.max_eval_samples=4",
                  "task.max_new_tokens=4", "task.max_train_samples=16", "task.cutoff_len=64",
                  "trainer.max_steps=8", "allocator=lora")
    assert len(rows) == 4 and all("output" in r for r in rows)
    from flexlora.errors import FlexLoRAError

    with pytest.raises(FlexLoRAError, match="ARC-Challenge"):
        run(tmp_path / "b", "backbone=tiny_llama", "task=commonsense", f"task.data_dir={SHARED / 'commonsense'}",
            "task.eval_sets=[ARC-Challenge]")


def test_vtab_family_on_tiny_vit(tmp_path):
    vtab = SHARED / "vtab-1k" / "fashion_mnist"
    metrics, rows = run(tmp_path, "backbone=tiny_vit", "task=vtab", f"task.data_dir={vtab}", "task.max_eval_samples=64",
                        "trainer.max_steps=12", "task.batch_size=16")
    assert set(metrics["final"]) == {"test/accuracy", "test/loss"} and metrics["events"] > 0
    assert len(rows) == 64 and {r["split"] for r in rows} == {"test"} and all(0 <= r["prediction"] < 10 for r in rows)
    assert metrics["final"]["test/accuracy"] == pytest.approx(sum(r["label"] == r["prediction"] for r in rows) / 64)


@pytest.mark.parametrize("allocator", ["lora", "flexlora"])
def test_rank_recovery_reports_mse_spearman_and_energy(tmp_path, allocator):
    metrics, rows = run(tmp_path, "+experiment=rank_recovery", f"allocator={allocator}", "trainer.max_steps=80",
                        "task.n_train=1024", "task.n_val=256")
    final = metrics["final"]
    for key in ("val/mse", "val/relative_mse", "rank/spearman", "rank/energy"):
        assert math.isfinite(final[key]), key
    assert 0.0 <= final["rank/energy"] <= 1.0 and final["val/relative_mse"] < 1.0  # it learns something
    assert len(rows) == 256
    if allocator == "lora":
        assert final["rank/spearman"] == 0.0  # a constant allocation carries no ordering
    else:
        assert metrics["total_rank"] == 12 * 8 and metrics["events"] > 0
